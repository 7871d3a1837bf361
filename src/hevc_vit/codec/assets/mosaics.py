"""The mosaics: canvas ``i`` holds rows ``i·S … (i+1)·S - 1`` of the positions, row-major over its grid; slot
``j`` is the patch at ``(h, w)`` of sampled frame ``t`` (the reference's ``_build_mosaics_time_spatial_np``)."""

from __future__ import annotations

import numpy as np


def build_mosaics(frames: np.ndarray, positions: np.ndarray, num_images: int, patch_size: int) -> np.ndarray:
    """``(N, size, size, C)`` uint8 mosaics.

    frames: ``(T, size, size, C)`` uint8 prepared squares; positions: ``(N·S, 3)`` ``(t, h, w)``, ``S = g²``,
    ``g = size // patch_size``."""
    T, size, _, C = frames.shape
    p = patch_size
    g = size // p
    S = g * g
    if positions.shape != (num_images * S, 3):
        raise ValueError(f"positions {positions.shape}; expected ({num_images}·{S}, 3) for {num_images} mosaics")
    t, h, w = positions.astype(np.int64).T
    if t.min() < 0 or t.max() >= T or h.max() >= g or w.max() >= g or min(h.min(), w.min()) < 0:
        raise ValueError(f"positions outside the (T={T}, {g}, {g}) grid of the frames")
    grid = frames[:, : g * p, : g * p].reshape(T, g, p, g, p, C)  # (T, g, p, g, p, C)
    patches = grid[t, h, :, w]  # (N·S, p, p, C)
    out = patches.reshape(num_images, g, g, p, p, C).transpose(0, 1, 3, 2, 4, 5)  # (N, g, p, g, p, C)
    mosaics = np.zeros((num_images, size, size, C), np.uint8)
    mosaics[:, : g * p, : g * p] = out.reshape(num_images, g * p, g * p, C)
    return mosaics
