"""The mosaics: canvas ``i`` holds rows ``i·S … (i+1)·S - 1`` of the positions, row-major over its grid; slot
``j`` is the patch at ``(h, w)`` of sampled frame ``t`` (the reference's ``_build_mosaics_time_spatial_np``).
And a contact sheet of the selection beside them (:func:`render_sheet`)."""

from __future__ import annotations

import numpy as np
from PIL import Image


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


def render_sheet(
    squares: np.ndarray,
    positions: np.ndarray,
    mosaics: np.ndarray,
    patch_size: int,
    tile: int = 144,
    columns: int = 8,
    dim: float = 0.3,
    gap: int = 2,
) -> Image.Image:
    """A contact sheet: the ``T`` prepared squares (``(T, S, S, 3)`` uint8), kept patches at full brightness and
    the others dimmed to ``dim``, ``columns`` a row, then the ``N`` mosaics, each drawn ``tile`` px wide."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns={columns!r}; expected a positive integer (frames per row of the sheet)")
    T, S = squares.shape[0], squares.shape[1]
    g = S // patch_size
    keep = np.zeros((T, g, g), bool)
    keep[tuple(positions.astype(np.int64).T)] = True
    shade = np.where(np.kron(keep, np.ones((patch_size, patch_size), bool)), 1.0, dim)  # (T, g·p, g·p)
    frames = squares.astype(np.float32)
    frames[:, : g * patch_size, : g * patch_size] *= shade[..., None]
    tiles = [Image.fromarray(f.round().astype(np.uint8)) for f in frames] + [Image.fromarray(m) for m in mosaics]
    frame_rows, mosaic_rows = -(-T // columns), -(-len(mosaics) // columns)
    cols = min(columns, max(T, len(mosaics)))
    sheet = Image.new("RGB", (cols * tile + (cols + 1) * gap, (frame_rows + mosaic_rows) * (tile + gap) + 3 * gap))
    for i, image in enumerate(tiles):
        row, col = (i // columns, i % columns) if i < T else (frame_rows + (i - T) // columns, (i - T) % columns)
        y = gap + row * (tile + gap) + (2 * gap if i >= T else 0)  # a wider gap between frames and mosaics
        sheet.paste(image.resize((tile, tile), Image.Resampling.BILINEAR), (gap + col * (tile + gap), y))
    return sheet
