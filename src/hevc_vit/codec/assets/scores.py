"""Scores of the prepared squares from our signals (:mod:`hevc_vit.codec.signals`).

The difference of frame ``t`` against ``t-1`` is taken per pixel on the resized frame only (the black padding
is left out, so the camera's shift is found on the picture and pixels a shift exposes count as 0, as in
``select_patches``), placed on the square and averaged per patch; each frame's median over its valid patches is
subtracted (codec noise and flicker lift a whole frame), then :func:`score_volume` fuses the signals with their
noise floor. Repeated frame ids (a clip shorter than ``T``) differ by nothing and score 0.
"""

from __future__ import annotations

import numpy as np

from hevc_vit.codec.assets.frames import SquareGeometry
from hevc_vit.codec.assets.settings import AssetSettings
from hevc_vit.codec.signals import aligned_difference, global_shift, score_volume

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, the Y of FFmpeg's gray conversion


def luma(square_rgb: np.ndarray) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB -> ``(size, size)`` float32 luma."""
    x = square_rgb.astype(np.float32)
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]  # no BLAS: no threads per worker


def difference_maps(
    lumas: np.ndarray, geometry: SquareGeometry, patch_size: int, signals: tuple[str, ...]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw maps name -> ``(T, g, g)`` float32 and the camera shifts ``(T, 2)`` int64 (0 for ``t = 0``).

    lumas: ``(T, size, size)`` float32 of the prepared squares."""
    T, size = lumas.shape[0], lumas.shape[1]
    g, p, G = size // patch_size, patch_size, geometry
    crop = (slice(G.top, G.top + G.Hn), slice(G.left, G.left + G.Wn))
    maps = {name: np.zeros((T, g, g), np.float32) for name in signals}
    shifts = np.zeros((T, 2), np.int64)
    pixels = np.zeros((size, size), np.float32)
    for t in range(1, T):
        prev, cur = lumas[t - 1][crop], lumas[t][crop]
        if np.array_equal(prev, cur):  # a repeated frame id: nothing changed
            continue
        for name in signals:
            shift = global_shift(prev, cur) if name == "aligned_difference" else (0, 0)
            if name == "aligned_difference":
                shifts[t] = shift
            pixels[crop] = aligned_difference(prev, cur, shift, 1)  # per pixel, exposed pixels 0
            maps[name][t] = pixels.reshape(g, p, g, p).mean(axis=(1, 3))  # (g, g)
    return maps, shifts


def score_squares(
    lumas: np.ndarray, geometry: SquareGeometry, settings: AssetSettings
) -> tuple[np.ndarray, np.ndarray]:
    """``(T, g, g)`` float32 fused scores (invalid cells 0) and ``(T, 2)`` shifts of the prepared squares."""
    valid = geometry.valid_patches(settings.patch_size)
    maps, shifts = difference_maps(lumas, geometry, settings.patch_size, settings.signals)
    T = lumas.shape[0]
    for raw in maps.values():
        if valid.any():
            median = np.median(raw[:, valid], axis=1)  # (T,) over the picture's patches only
            raw[:] = np.maximum(raw - median[:, None, None], 0)
        raw[:, ~valid] = 0
    has = np.arange(T) > 0
    present = {name: has for name in maps}
    floors = {name: settings.diff_floor for name in maps}
    weights = dict(zip(settings.signals, settings.weights)) if settings.weights else None
    return score_volume(maps, present, floors, weights, settings.normalize), shifts
