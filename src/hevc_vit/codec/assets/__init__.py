"""Codec-sparse assets in the layout of the reference's offline tool, without a patched FFmpeg.

Per video, ``OUT/assets/<key>/`` holds ``mosaic_000.jpg … mosaic_{N-1}.jpg`` (N square canvases of the kept patches;
``.png``, lossless, with ``mosaic_format="png"``), ``positions_thw.npy`` ``(N·S, 3)`` int32, ``visible_indices.npy``
``(N·S,)`` int64 ``t·S + h·g + w``, ``frame_ids.npy`` ``(T,)`` int32 and ``meta.json``: what the reference's LLaVA
``train.py`` and its lmms-eval ``llava_ov_encoder`` read (OneVision-Encoder
``llava_next/Compressed_Video_Reader/tool/offline_precompute_llava_codec_assets.py``). Frames are sampled and prepared
as it does (:mod:`.frames`), scored with our signals and selected by its rules (:mod:`.selection`), laid out as its
mosaics (:mod:`.mosaics`), written atomically (:mod:`.writer`); :func:`write_assets` runs many videos (:mod:`.run`);
:mod:`.read` reads them back and encodes mosaics + positions on the towers.
"""

from __future__ import annotations

from hevc_vit.codec.assets.frames import SquareGeometry, prepare_square, resize_linear, sample_frame_ids, window_range
from hevc_vit.codec.assets.inputs import Job, expand_jobs, read_job_list
from hevc_vit.codec.assets.mosaics import build_mosaics, render_sheet
from hevc_vit.codec.assets.read import AssetFolder, encode_mosaics, mosaic_pixels, read_asset_folder
from hevc_vit.codec.assets.run import (
    INDEX,
    MANIFEST,
    RUN_RECORD,
    AssetsReport,
    launcher_shard,
    process_job,
    read_index,
    write_assets,
)
from hevc_vit.codec.assets.selection import (
    motion_map,
    score_squares,
    select_asset_positions,
    top_patches,
    visible_indices,
)
from hevc_vit.codec.assets.settings import ASSET_SIGNALS, MODES, MOSAIC_FORMATS, AssetSettings
from hevc_vit.codec.assets.video import VideoAssets, compute_assets
from hevc_vit.codec.assets.writer import asset_dir, check_key, is_done, write_asset_folder

__all__ = [
    "ASSET_SIGNALS",
    "AssetFolder",
    "INDEX",
    "MANIFEST",
    "MODES",
    "MOSAIC_FORMATS",
    "RUN_RECORD",
    "AssetSettings",
    "AssetsReport",
    "Job",
    "SquareGeometry",
    "VideoAssets",
    "asset_dir",
    "build_mosaics",
    "check_key",
    "compute_assets",
    "encode_mosaics",
    "expand_jobs",
    "is_done",
    "launcher_shard",
    "mosaic_pixels",
    "motion_map",
    "prepare_square",
    "process_job",
    "read_asset_folder",
    "read_index",
    "read_job_list",
    "render_sheet",
    "resize_linear",
    "sample_frame_ids",
    "score_squares",
    "select_asset_positions",
    "top_patches",
    "visible_indices",
    "window_range",
    "write_asset_folder",
    "write_assets",
]
