"""Codec-sparse videos for ``hevc-vit encode --codec-sparse``: the patches that change, at their true positions.

A clip's frames are sampled and scored by :func:`hevc_vit.codec.select_patches` at the size the processor
gives them, then decoded again one frame at a time keeping only the selected patches (never the whole clip
in memory). The item carries those ``K`` patches with their ``(t, h, w)`` positions (``t`` spread over the
temporal context when one is set); its ``grid_thw`` stays the dense ``(T, h, w)`` grid they come from, and its
index row records the selection (``codec``: kept and dense tokens, frames, signals, picture types).

A codec-assets folder (``OUT/assets/KEY``, :mod:`hevc_vit.codec.assets`) is read back as the selection it was
written from: its mosaics cut into patches in row order, at the positions of ``positions_thw.npy``
(:func:`load_asset_folder`).

Frame size: a ratio budget ``r`` keeps about ``r·T`` frames' worth of patches, so frames are sized as for a
dense clip of ``max(1, round(r·T))`` frames (64 frames at 12.5 % are sized like 8); a patch-count budget sizes
them as for a dense clip of ``T`` frames; either never as more frames than the processor's clip budget holds at
its minimum per frame (:meth:`~.processing.ImageProcessor.frames_that_fit`): frames keep that minimum size.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hevc_vit.codec import gather_selected_patches, render_preview, select_patches
from hevc_vit.codec.assets.read import read_asset_folder
from hevc_vit.codec.decode import check_path, check_shown_as_stored, open_video
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.readers.spec import item_key
from hevc_vit.media.video import temporal_positions
from hevc_vit.processing.pixels import normalizer_for

# what to do with a clip codec-sparse refuses (turned, anamorphic): encode shows it properly without the selection
ENCODE_HINT = "encode it without codec_sparse (which shows it upright, at its aspect ratio), or re-encode it upright"


def load_codec_video(item: LoadedItem, options: LoadOptions, source=None) -> None:
    """Select, gather and describe the kept patches of the video ``item.path`` — or of ``source`` (its bytes as a
    ``BytesIO``, or a local path) for a clip in a tar, at a URL or in a dataset, which is decoded from a
    temporary file since selection reads the clip more than once. Errors propagate to the loader, which
    records them as the item's failure."""
    if source is None or isinstance(source, (str, os.PathLike)):
        _load_codec_file(item, options, os.fspath(source) if source is not None else item.path)
        return
    suffix = Path(item.path.split("::")[0]).suffix or ".mp4"
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        f.write(source.getbuffer() if hasattr(source, "getbuffer") else source.read())
        f.flush()
        _load_codec_file(item, options, f.name)


def _load_codec_file(item: LoadedItem, options: LoadOptions, path: str) -> None:
    config, processor, p = options.codec, options.processor, options.patch_size
    check_shown_as_stored(check_path(path), ENCODE_HINT)
    with open_video(path) as container:
        stream = container.streams.video[0].codec_context
        width, height = stream.width, stream.height
    equivalent = max(1, round(config.budget * config.frames)) if isinstance(config.budget, float) else config.frames
    equivalent = max(processor.frames_that_fit(equivalent), 1)  # never under the processor's minimum per frame
    size = processor.output_size(height, width, num_frames=equivalent)  # (H, W), multiples of p
    selection = select_patches(path, p, dataclasses.replace(config, size=tuple(size)))
    patches, _ = gather_selected_patches(
        path, selection, preprocess=lambda rgb: processor.process(Image.fromarray(rgb), tuple(size))
    )  # (K, C·p·p)
    T = selection.grid_thw[0]
    t_positions = temporal_positions(T, options.temporal_context)
    item.kind = "video"
    item.patches = patches.contiguous()
    item.grid_thw = tuple(selection.grid_thw)  # the dense grid the patches come from
    item.positions = selection.patch_positions(t_positions)  # (K, 3), t spread over the context
    item.info = {
        "size": [width, height],
        "frames": [int(f) for f in selection.frame_ids],
        "total_frames": selection.total_frames,
        "temporal_positions": t_positions,
        "codec": {**selection.summary(), "budget": config.budget},
    }
    if options.preview_dir is not None:
        folder = Path(options.preview_dir)
        folder.mkdir(parents=True, exist_ok=True)
        key = options.keys[item.index] if options.keys else item_key(item.index)
        render_preview(path, selection, folder / f"{key}.png")


def load_asset_folder(item: LoadedItem, options: LoadOptions) -> None:
    """The codec-assets folder ``item.path`` as one codec-sparse clip: the ``N`` mosaics cut into ``N·g·g``
    patches canvas after canvas, row-major (the order they were laid out in), with ``positions_thw`` as their
    ``(t, h, w)`` (``t`` spread over the temporal context when one is set) and the dense grid ``(T, g, g)``. The
    canvases are taken at their own size (no resize): the folder's patch size must be the model's."""
    folder = read_asset_folder(item.path)
    settings, p = folder.meta["settings"], options.patch_size
    if int(settings["patch_size"]) != p:
        raise ValueError(
            f"the asset folder {item.path} was written with patch_size={settings['patch_size']}; the model's "
            f"patch size is {p}: write the assets with --patch-size {p}"
        )
    N, S = folder.mosaics.shape[:2]
    normalization = options.processor.normalization
    patches = normalizer_for(*normalization).patches(np.ascontiguousarray(folder.mosaics), p, False)  # (N·g·g, C·p·p)
    if patches.shape[0] != len(folder.positions):
        raise ValueError(
            f"the asset folder {item.path} holds {patches.shape[0]} patches in {N} mosaics and "
            f"{len(folder.positions)} positions; expected one position per patch"
        )
    T, g = len(folder.frame_ids), S // p
    t_positions = temporal_positions(T, options.temporal_context)
    positions = torch.from_numpy(folder.positions.copy())  # (K, 3) int64
    positions[:, 0] = torch.tensor(t_positions, dtype=torch.int64)[positions[:, 0]]
    item.kind = "video"
    item.patches = torch.from_numpy(patches)
    item.normalization = normalization if item.patches.dtype == torch.uint8 else None
    item.grid_thw = (T, g, g)
    item.positions = positions
    debug = folder.meta.get("debug", {})
    item.info = {
        "size": list(reversed(debug.get("size", [S, S]))),  # [width, height] of the source video
        "frames": [int(f) for f in folder.frame_ids],
        "total_frames": int(debug.get("total_frames", 0)),
        "temporal_positions": t_positions,
        "codec": {"tokens": len(positions), "dense_tokens": T * g * g, "frames": T, "assets": folder.meta.get("key")},
    }
