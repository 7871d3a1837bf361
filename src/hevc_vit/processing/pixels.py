"""The pixel steps of the image processors, as pure functions: bit depth, RGB, the native and the CLIP
size rules, the centre crop.

Legend: ``p`` patch size, ``h``/``w`` sides in patches, ``H``/``W`` sides in pixels.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

# modes whose samples go past 8 bits: PIL's convert("RGB") clips them at 255 rather than scaling them (and a float
# image in [0, 1] becomes black)
_16_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(image: Image.Image) -> Image.Image:
    """An image whose samples go past 8 bits as 8-bit ``L``, scaled rather than clipped at 255; any other image
    as it is. The rule, by mode:

    * ``I;16*`` and ``I`` (as PIL opens 16-bit PNGs and TIFFs, and 32-bit integer TIFFs): 16-bit samples,
      ``value >> 8`` (65535 -> 255);
    * ``F`` (32-bit float TIFFs): samples in [0, 1], ``round(value * 255)`` (1.0 -> 255).

    Samples outside that range (negative, above 65535, a float above 1 — e.g. a float image holding 0..255),
    NaN or infinity raise ``ValueError`` naming the range found and the one expected: scaling them by a guess
    could give a wrong image (all black, or clipped white) that looks like a success."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        _check_range(values, 0, 1, "a float image (mode F)", "0 = black, 1 = white")
        return Image.fromarray(np.round(values * 255).astype(np.uint8))  # (H, W) uint8: mode L
    if image.mode not in _16_BIT:
        return image
    values = np.asarray(image).astype(np.int64)
    _check_range(values, 0, 65535, f"a mode {image.mode} image", "16-bit samples, 65535 = white")
    return Image.fromarray((values >> 8).astype(np.uint8))  # (H, W) uint8: mode L


def _check_range(values: np.ndarray, low: int, high: int, what: str, meaning: str) -> None:
    if values.size == 0:
        return
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{what} holds {bad} NaN or infinite samples; expected finite samples in [{low}, {high}]")
    least, most = values.min().item(), values.max().item()
    if least < low or most > high:
        shown = ", ".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in (least, most))
        raise ValueError(f"{what} holds samples in [{shown}]; expected [{low}, {high}] ({meaning})")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``; transparent pixels are laid over white (not left as arbitrary colours)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBa", "La"):  # premultiplied alpha (a TIFF's associated alpha): PIL's RGB drops the alpha
        image = image.convert(image.mode.upper())  # RGBA / LA: unpremultiplied, then laid over white below
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def native_grid_size(height: int, width: int, patch_size: int, lo: int, hi: int) -> tuple[int, int]:
    """``(h, w)`` in patches for an image of ``height x width`` pixels, with ``h * w <= hi`` and, wherever a grid
    that keeps the aspect ratio allows it, ``lo <= h * w``.

    Keeps the aspect ratio: each side is within one patch of the ideal side at one scale for both (an image so
    elongated that its short side falls under one patch gets one patch across). An image whose patch count is
    already inside the bounds only rounds its sides to the nearest patch. When no such grid has between ``lo``
    and ``hi`` patches (bounds a few patches apart), the result is the largest such grid under ``hi``: a few
    patches under ``lo``, never a grid of another shape.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image is {width}x{height}; expected at least 1x1 pixels")
    if hi < 1:
        raise ValueError(f"the token bounds are [{lo}, {hi}]; expected at least one patch")
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
    return _kept_aspect_grid(h0, w0, hs * ws, lo, hi)


def _kept_aspect_grid(h0: float, w0: float, target: float, lo: int, hi: int) -> tuple[int, int]:
    """Among the grids within one patch of ``(h0, w0)`` scaled (one scale for both sides) with at most ``hi``
    patches: one inside ``[lo, hi]`` nearest ``target`` patches, else the largest; then the truest aspect ratio."""
    flip = h0 > w0
    a0, b0 = (w0, h0) if flip else (h0, w0)  # short and long ideal sides
    ratio = b0 / a0
    best: tuple | None = None
    a = 1
    while True:
        # |a - s·a0| < 1 and |b - s·b0| < 1 for some scale s  <=>  (a - 1)·ratio - 1 < b < (a + 1)·ratio + 1
        b_low = max(math.floor((a - 1) * ratio - 1) + 1, 1)
        b_high = min(math.ceil((a + 1) * ratio + 1) - 1, hi // a)
        if b_low * a > hi:
            break
        if b_low <= b_high:
            for b in {b_low, b_high, min(max(round(target / a), b_low), b_high), min(max(-(-lo // a), b_low), b_high)}:
                n = a * b
                key = (not lo <= n, abs(n - target) if lo <= n else -n, abs(math.log(b / a / ratio)))
                if best is None or key < best[0]:
                    best = (key, a, b)
        a += 1
    assert best is not None  # a = 1, b = 1 always qualifies
    _, a, b = best
    return (b, a) if flip else (a, b)


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


def draft_jpeg(image: Image.Image, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """Ask a JPEG that is not decoded yet to decode at the smallest DCT scale (1/2, 1/4 or 1/8) that still
    gives at least ``size = (H, W)`` pixels, which costs a fraction of a full decode and of the resize after
    it. Returns the box of the reduced image that covers the whole picture (for ``Image.resize(box=...)``: the
    reduced sides are rounded up), or None when the image decodes as it is (not a JPEG, already decoded,
    or not larger than twice ``size``)."""
    if image.format != "JPEG" or getattr(image, "tile", None) is None or len(image.tile) != 1:
        return None
    H, W = size
    width, height = image.size
    if width < 2 * W or height < 2 * H:
        return None
    drafted = image.draft(image.mode, (W, H))  # keeps the mode: colour conversion stays as in a full decode
    if drafted is None or drafted[1][2] == width:
        return None
    return drafted[1]


ORIENTATION_TAG = 0x0112  # EXIF Orientation
_T = Image.Transpose
# EXIF orientation -> the transposition that turns the stored pixels upright, as in PIL.ImageOps.exif_transpose,
# and where a point (x, y) of a W x H image lands
_UPRIGHT = {
    2: (_T.FLIP_LEFT_RIGHT, lambda x, y, W, H: (W - x, y)),
    3: (_T.ROTATE_180, lambda x, y, W, H: (W - x, H - y)),
    4: (_T.FLIP_TOP_BOTTOM, lambda x, y, W, H: (x, H - y)),
    5: (_T.TRANSPOSE, lambda x, y, W, H: (y, x)),
    6: (_T.ROTATE_270, lambda x, y, W, H: (H - y, x)),
    7: (_T.TRANSVERSE, lambda x, y, W, H: (H - y, W - x)),
    8: (_T.ROTATE_90, lambda x, y, W, H: (y, W - x)),
}


def exif_orientation(image: Image.Image) -> int:
    """``image``'s EXIF orientation as ``PIL.ImageOps.exif_transpose`` reads it: 2..8 when the pixels must be
    flipped or turned to show it upright (a phone photo taken sideways: 6 or 8), else 1. It is read after loading
    (a TIFF is turned by Pillow as it loads, and loses the tag), except from a JPEG, whose loading leaves the tag
    as it is: that one stays undecoded, to be decoded at draft scale."""
    if image.format != "JPEG":
        image.load()
    value = image.getexif().get(ORIENTATION_TAG, 1)
    return value if value in _UPRIGHT else 1


def upright_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """``(H, W)`` of an image stored as ``height x width`` once turned upright."""
    return (width, height) if orientation >= 5 else (height, width)


def turn_upright(
    image: Image.Image, orientation: int, box: tuple[float, float, float, float] | None = None
) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """``image`` turned upright for its EXIF ``orientation``, and ``box`` (the part of a draft decode that covers
    the picture, see :func:`draft_jpeg`) turned with it."""
    if orientation not in _UPRIGHT:
        return image, box
    method, move = _UPRIGHT[orientation]
    turned = image.transpose(method)
    if box is None:
        return turned, None
    (x0, y0), (x1, y1) = (move(x, y, image.width, image.height) for x, y in ((box[0], box[1]), (box[2], box[3])))
    return turned, (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


class Normalizer:
    """Rescale and normalisation of 8-bit samples, by table lookup: ``(..., C)`` -> float32 with exactly the
    values of :func:`normalize_reference` (the arithmetic of transformers' image processors), or straight into
    patch order (:meth:`patches`). Samples that are not 8-bit go through :func:`normalize_reference`."""

    def __init__(self, mean, std, rescale_factor: float, do_rescale: bool, do_normalize: bool):
        self.settings = (list(mean), list(std), rescale_factor, do_rescale, do_normalize)
        self._tables: dict[tuple[int, bool], np.ndarray] = {}

    def table(self, channels: int, pairs: bool = False) -> np.ndarray:
        """``(C, 256)`` float32: what each sample value of each channel becomes. ``pairs``: ``(C, 65536)`` 8-byte
        words, each the two floats of two consecutive samples (index: their bytes read as a little-endian
        16-bit number)."""
        if (channels, pairs) not in self._tables:
            values = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, channels))  # (256, C)
            table = np.ascontiguousarray(normalize_reference(values, *self.settings).T)  # (C, 256)
            if pairs:
                index = np.arange(65536)
                table = np.stack([table[:, index & 255], table[:, index >> 8]], axis=-1).view(np.uint64)[..., 0]
            self._tables[channels, pairs] = table
        return self._tables[channels, pairs]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.dtype != np.uint8:
            return normalize_reference(pixels, *self.settings)
        return self._lookup(pixels, (1,) * (pixels.ndim - 1) + (-1,), self.table(pixels.shape[-1]))

    def patches(self, pixels: np.ndarray, patch_size: int, normalize: bool = True) -> np.ndarray:
        """``(T, H, W, C)`` frames of one size -> ``(T·h·w, C·p·p)`` float32 patches in the order and layout of
        :func:`hevc_vit.packing.patchify`: the samples are put in patch order as bytes, then each lookup writes
        two floats (one for odd ``p``). ``normalize=False``: 8-bit samples stay uint8 in that layout, for
        :func:`normalize_patches` where they are used (a quarter of the bytes to move); others are normalised."""
        T, H, W, C = pixels.shape
        p, h, w = patch_size, H // patch_size, W // patch_size
        if pixels.dtype != np.uint8:
            pixels = normalize_reference(pixels, *self.settings)
        order = pixels.reshape(T, h, p, w, p, C).transpose(0, 1, 3, 5, 2, 4).reshape(T * h * w, C, p * p)
        if order.dtype != np.uint8:
            return order.reshape(T * h * w, C * p * p)
        if not normalize:
            _check_channels(C, self.settings)
            return np.ascontiguousarray(order).reshape(T * h * w, C * p * p)
        if p % 2:
            return self._lookup(order, (1, -1, 1), self.table(C)).reshape(T * h * w, C * p * p)
        pairs = np.ascontiguousarray(order).view("<u2")  # (T·h·w, C, p·p/2): two samples of one channel each
        return self._lookup(pairs, (1, -1, 1), self.table(C, pairs=True)).view(np.float32).reshape(T * h * w, -1)

    @staticmethod
    def _lookup(samples: np.ndarray, channel_shape: tuple[int, ...], table: np.ndarray) -> np.ndarray:
        index = samples.astype(np.intp)
        index += (np.arange(table.shape[0], dtype=np.intp) * table.shape[1]).reshape(channel_shape)  # flat row
        return np.take(table.reshape(-1), index)


def normalize_reference(
    pixels: np.ndarray, mean: list[float], std: list[float], rescale_factor: float, do_rescale: bool, do_normalize: bool
) -> np.ndarray:
    """``(..., C)`` samples -> float32 ``(..., C)``: rescale in float64, then float32, then normalise in float32 —
    the arithmetic of transformers' image processors (the specification; the table lookup reproduces it)."""
    x = pixels.astype(np.float64)
    if do_rescale:
        x = x * rescale_factor
    x = x.astype(np.float32)
    if do_normalize:
        _check_channels(x.shape[-1], (mean, std, rescale_factor, do_rescale, do_normalize))
        x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    return x


def normalize_patches(
    samples: torch.Tensor,
    mean: list[float],
    std: list[float],
    rescale_factor: float,
    do_rescale: bool,
    do_normalize: bool,
) -> torch.Tensor:
    """``(N, C·p·p)`` 8-bit patches (uint8, from ``Normalizer.patches(..., normalize=False)``, on any device) ->
    float32 patches with the values of :func:`normalize_reference`, bit for bit: the same IEEE operations in the
    same order (rescale in float64, round to float32, subtract and divide in float32), run where the samples are."""
    N = samples.shape[0]
    out = torch.empty(samples.shape, dtype=torch.float32, device=samples.device)
    mean_, std_ = (torch.tensor(v, dtype=torch.float32, device=samples.device)[:, None] for v in (mean, std))
    # on the CPU in chunks that stay in cache: whole-tensor float64 temporaries cost twice the time (page faults)
    rows = max(N, 1) if samples.device.type != "cpu" else max(1, 2**18 // max(samples.shape[1], 1))
    for start in range(0, N, rows):
        x = samples[start : start + rows].to(torch.float64)
        if do_rescale:
            x.mul_(rescale_factor)
        chunk = out[start : start + rows]
        chunk.copy_(x)  # rounded to float32
        if do_normalize:
            chunk.view(chunk.shape[0], len(mean), -1).sub_(mean_).div_(std_)  # (n, C, p·p) against (C, 1)
    return out


def _check_channels(channels: int, settings: tuple) -> None:
    mean, do_normalize = settings[0], settings[4]
    if do_normalize and channels != len(mean):
        raise ValueError(f"image has {channels} channels; image_mean/image_std have {len(mean)} entries")


def normalizer_for(
    mean: list[float], std: list[float], rescale_factor: float, do_rescale: bool, do_normalize: bool
) -> Normalizer:
    """The :class:`Normalizer` of these settings, built once (its lookup tables are kept with it)."""
    return _normalizer_of(tuple(mean), tuple(std), float(rescale_factor), bool(do_rescale), bool(do_normalize))


@functools.lru_cache(maxsize=16)
def _normalizer_of(*settings) -> Normalizer:
    return Normalizer(*settings)
