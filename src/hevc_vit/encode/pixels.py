"""The pixel steps of the image processors, as pure functions: bit depth, RGB, the native and the CLIP
size rules, the centre crop.

Legend: ``p`` patch size, ``h``/``w`` sides in patches, ``H``/``W`` sides in pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# modes whose samples go past 8 bits: PIL's convert("RGB") clips them at 255 rather than scaling them
_HIGH_BIT_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit image (mode ``I;16*``, or ``I`` as PIL opens 16-bit PNGs and TIFFs) as 8-bit ``L``, scaled with
    ``value >> 8`` (65535 -> 255) instead of clipped at 255; any other image as it is. Samples of mode ``I`` are
    taken as 16-bit (0..65535); values outside are clamped."""
    if image.mode not in _HIGH_BIT_DEPTH:
        return image
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # (H, W) uint8: mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``; transparent pixels are laid over white (not left as arbitrary colours)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def native_grid_size(height: int, width: int, patch_size: int, lo: int, hi: int) -> tuple[int, int]:
    """``(h, w)`` in patches for an image of ``height x width`` pixels, with ``lo <= h * w <= hi``.

    Keeps the aspect ratio: each side is within one patch of the ideal scaled side (one scale for both),
    unless the image is so elongated that its short side would fall under one patch at ``hi``. An image
    whose patch count is already inside the bounds only rounds its sides to the nearest patch.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image is {width}x{height}; expected at least 1x1 pixels")
    h0, w0 = height / patch_size, width / patch_size  # ideal sides, in patches
    area = h0 * w0
    scale = 1.0 if lo <= area <= hi else math.sqrt((lo if area < lo else hi) / area)
    hs, ws = h0 * scale, w0 * scale
    nearest = (max(round(hs), 1), max(round(ws), 1))
    if lo <= nearest[0] * nearest[1] <= hi:
        return nearest
    # Rounding left the bounds: the floor/ceil combination inside them that best keeps the aspect ratio.
    candidates = [
        (h, w)
        for h in {max(math.floor(hs), 1), math.ceil(hs)}
        for w in {max(math.floor(ws), 1), math.ceil(ws)}
        if lo <= h * w <= hi
    ]
    if candidates:
        return min(candidates, key=lambda hw: (abs(math.log(hw[0] / hw[1] / (h0 / w0))), abs(hw[0] * hw[1] - hs * ws)))
    # So elongated that the short side is under one patch: one patch across, the long side clamped.
    if hs < ws:
        return 1, min(max(math.ceil(ws), lo), hi)
    return min(max(math.ceil(hs), lo), hi), 1


def short_side_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """``(H, W)`` with the short side ``shortest_edge`` and the long side ``int(shortest_edge * long / short)``:
    the rule of transformers' ``CLIPImageProcessor``."""
    short, long = min(height, width), max(height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C)`` -> ``(height, width, C)`` around the centre; zero padding where the image is smaller."""
    H, W = pixels.shape[:2]
    if H < height or W < width:
        canvas = np.zeros((max(H, height), max(W, width)) + pixels.shape[2:], dtype=pixels.dtype)
        top, left = math.ceil((canvas.shape[0] - H) / 2), math.ceil((canvas.shape[1] - W) / 2)
        canvas[top : top + H, left : left + W] = pixels
        # the crop window keeps its place relative to the original image, as if the canvas were not there
        crop_top, crop_left = (H - height) // 2 + top, (W - width) // 2 + left
        return canvas[max(crop_top, 0) : crop_top + height, max(crop_left, 0) : crop_left + width]
    top, left = (H - height) // 2, (W - width) // 2
    return pixels[top : top + height, left : left + width]
