"""One asset folder on disk: ``OUT/assets/<key>/`` with ``mosaic_000.jpg …`` (``.png`` with
``mosaic_format="png"``), ``positions_thw.npy``, ``visible_indices.npy``, ``frame_ids.npy`` and ``meta.json``,
each written atomically (temporary file, then a rename). ``meta.json`` goes last and is removed first when a
folder is rewritten, so a folder is "done" (the reference's rule: every file exists, plus our settings check in
``meta.json``) only once all of it is there."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hevc_vit.codec.assets.settings import FORMAT, MOSAIC_FORMATS, AssetSettings
from hevc_vit.codec.assets.video import VideoAssets
from hevc_vit.files import write_atomic, write_json_atomic

ASSETS = "assets"
ARRAYS = ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy")
META = "meta.json"


def mosaic_name(i: int, mosaic_format: str = "jpg") -> str:
    """``mosaic_000.jpg`` (or ``.png``): what the lmms-eval lookup globs (``mosaic*.jpg`` … ``mosaic*.png``, sorted
    by the number) and the manifest's ``images`` list."""
    return f"mosaic_{i:03d}.{mosaic_format}"


def check_key(key: object) -> str:
    """``key`` when it names one folder inside ``OUT/assets/``; ``ValueError`` for an empty key or one holding
    ``/``, ``\\``, ``..``, NUL or other control characters (it could write outside, or nowhere)."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"key {key!r}; expected a non-empty string (the asset folder's name)")
    if "/" in key or "\\" in key or ".." in key or key in (".",) or any(ord(c) < 32 for c in key):
        raise ValueError(f"key {key!r}; expected a single folder name without '/', '\\', '..' or control characters")
    return key


def asset_dir(out: str | os.PathLike, key: str) -> Path:
    """``OUT/assets/<key>`` after :func:`check_key`, and never a path that resolves outside ``OUT/assets``
    (e.g. through a symbolic link)."""
    root = Path(out) / ASSETS
    folder = root / check_key(key)
    real_root, real = os.path.realpath(root), os.path.realpath(folder)
    if os.path.dirname(real) != real_root:
        raise ValueError(f"key {key!r} resolves to {real}, outside {real_root}; refusing to write there")
    return folder


def is_done(folder: Path, settings: AssetSettings) -> bool:
    """Every file exists (the mosaics in the settings' format) and ``meta.json`` records these settings."""
    names = [META, *ARRAYS, *(mosaic_name(i, settings.mosaic_format) for i in range(settings.num_images))]
    if not all((folder / name).is_file() for name in names):
        return False
    return settings.same_as(recorded_settings(folder))


def recorded_settings(folder: Path) -> dict | None:
    """The settings ``folder/meta.json`` records, None when it is missing or unreadable."""
    try:
        return json.loads((folder / META).read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    """``(H, W, 3)`` uint8 RGB as JPEG (Pillow, 4:2:0 like OpenCV's default)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def mosaic_bytes(rgb: np.ndarray, settings: AssetSettings) -> bytes:
    """One mosaic file's bytes: JPEG at ``settings.jpeg_quality``, or PNG (lossless, deterministic)."""
    if settings.mosaic_format == "jpg":
        return jpeg_bytes(rgb, settings.jpeg_quality)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def write_asset_folder(
    folder: Path, assets: VideoAssets, settings: AssetSettings, video: str, key: str, extra: dict | None = None
) -> dict:
    """Write ``folder`` (see the module doc) and return the seconds spent; ``meta.json`` holds ``video`` and
    ``key`` (the lmms-eval lookup indexes both), the settings, the reference's ``cfg`` block, facts and timings."""
    clock = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # not done until everything below is rewritten
    for fmt in MOSAIC_FORMATS:  # a previous run's extra canvases, or its other format: the lmms-eval lookup
        for stale in folder.glob(f"mosaic_*.{fmt}"):  # takes every mosaic* image, so never leave two formats
            stale.unlink()
    for i, canvas in enumerate(assets.mosaics):
        write_atomic(folder / mosaic_name(i, settings.mosaic_format), mosaic_bytes(canvas, settings))
    arrays = (assets.positions.astype(np.int32), assets.visible.astype(np.int64), assets.frame_ids.astype(np.int32))
    for name, array in zip(ARRAYS, arrays):
        write_atomic(folder / name, _npy_bytes(array))
    timings = {**assets.timings, "write": time.perf_counter() - clock}
    meta = dict(
        format=FORMAT,
        video=os.fspath(video),
        key=key,
        created_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        settings=settings.as_dict(),
        cfg=settings.reference_cfg(),
        debug=assets.info,
        stats=dict(elapsed_sec=sum(timings.values()), timings=timings),
        **(extra or {}),
    )
    write_json_atomic(folder / META, meta)
    return timings
