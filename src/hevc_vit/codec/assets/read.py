"""Assets back into the towers: read an asset folder, turn its mosaics into pixels and patches, encode them.

A clip given as mosaics plus ``positions_thw`` is what the reference's LLaVA fork passes its tower: the ``N``
canvases as a stack of frames and the positions as one clip's ``patch_positions (1, N·S, 3)``. The canvases
hold the kept patches in the positions' order (row-major), so cutting them into patches gives the selection's
patches in that order: :func:`encode_mosaics` encodes them as one packed item, as
:func:`hevc_vit.codec.encode_selection` encodes a selection."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hevc_vit.codec.assets.writer import ARRAYS, META, mosaic_name
from hevc_vit.packing import PackingPlan, patchify
from hevc_vit.processing.processors import CLIP_MEAN, CLIP_STD

RUN_RECORD = "codec_assets.json"  # the run's settings, in the output folder (see :mod:`.run`)


@dataclass
class AssetFolder:
    """One asset folder read back: mosaics ``(N, S, S, 3)`` uint8 RGB (the decoded JPEG or PNG files),
    positions ``(K, 3)`` int64, visible ``(K,)`` int64, frame_ids ``(T,)`` int64 and the ``meta.json`` dict."""

    mosaics: np.ndarray
    positions: np.ndarray
    visible: np.ndarray
    frame_ids: np.ndarray
    meta: dict


def is_asset_folder(folder: str | os.PathLike) -> bool:
    """``folder`` holds an asset folder's ``meta.json`` and ``positions_thw.npy`` (its mosaics are checked when
    it is read)."""
    folder = Path(folder)
    return (folder / META).is_file() and (folder / ARRAYS[0]).is_file()


def is_assets_output(folder: str | os.PathLike) -> bool:
    """``folder`` is the output folder of a codec-assets run (its run record and an ``assets`` folder)."""
    folder = Path(folder)
    return (folder / RUN_RECORD).is_file() and (folder / "assets").is_dir()


def read_asset_folder(folder: str | os.PathLike) -> AssetFolder:
    """Read ``folder`` (``OUT/assets/<key>``); ``FileNotFoundError`` naming a missing file."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; expected a finished asset folder")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    num_images = int(meta["settings"]["num_images"])
    names = [mosaic_name(i, meta["settings"].get("mosaic_format", "jpg")) for i in range(num_images)]
    missing = [n for n in (*ARRAYS, *names) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}; expected a finished asset folder")
    mosaics = np.stack([np.asarray(Image.open(folder / name).convert("RGB")) for name in names])
    positions, visible, frame_ids = (np.load(folder / name).astype(np.int64) for name in ARRAYS)
    return AssetFolder(mosaics, positions, visible, frame_ids, meta)


def mosaic_pixels(
    mosaics: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """``(N, S, S, 3)`` uint8 -> ``(N, 3, S, S)`` float32: rescaled to [0, 1] and normalised (the arithmetic of
    :mod:`hevc_vit.processing.processors`; no resize: the canvases are already the model's squares)."""
    x = (mosaics.astype(np.float64) / 255.0).astype(np.float32)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # (N, 3, S, S)


def encode_mosaics(
    model, pixels: torch.Tensor, positions: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode the mosaics as one packed item on ``model`` (``HEVCViTPackingModel`` or ``HEVCViTModel``):
    ``last (K, D)`` and ``pooled (1, D)`` (None without a head), RoPE at ``positions (K, 3)``.

    pixels: ``(N, C, S, S)`` (:func:`mosaic_pixels`); ``K = N·(S/p)²`` must equal the positions' rows."""
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
    patches, _ = patchify(pixels, model.config.patch_size)  # (N·g·g, C·p·p), canvas after canvas, row-major
    if patches.shape[0] != positions.shape[0]:
        raise ValueError(
            f"the mosaics hold {patches.shape[0]} patches of {model.config.patch_size} px; positions has "
            f"{positions.shape[0]} rows; expected one row per patch"
        )
    device = next(model.parameters()).device
    plan = PackingPlan.from_seqlens([positions.shape[0]], positions, device=device)
    last, pooled, _ = model.encode_packed(patches.to(device), plan)
    return last, pooled
