"""Frame preparation of the codec assets: which frames are sampled, and each one resized and centred on a square.

The reference's offline tool (OneVision-Encoder ``offline_precompute_llava_codec_assets.py``) samples
``linspace(start, end, T)`` frame ids (cast to int32: floored, repeated when the clip is shorter than ``T``),
resizes each frame with its longer side to ``square_size`` by OpenCV's ``INTER_LINEAR`` (bilinear, no
antialiasing, sides ``round(H·s)``, ``round(W·s)``) and centres it on a black square. :func:`resize_linear`
is that resize in numpy, with OpenCV's fixed-point arithmetic (11-bit weights): measured against
``cv2.resize(..., INTER_LINEAR)`` it is identical on downscales and at most 1 level off on upscales (about
0.05 % of the pixels). Pillow's bilinear antialiases when it shrinks (up to 144 levels off), so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WINDOW_PICKS = ("none", "begin", "mid", "end")
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


@dataclass(frozen=True)
class SquareGeometry:
    """Where a ``height x width`` frame lands on the ``size x size`` square: resized to ``Hn x Wn`` at
    ``(top, left)``; the rest is black padding."""

    height: int
    width: int
    size: int
    Hn: int
    Wn: int
    top: int
    left: int

    @classmethod
    def of(cls, height: int, width: int, size: int) -> SquareGeometry:
        """The reference's rule: scale ``size / max(H, W)``, sides ``max(1, round(side·scale))``, centred."""
        if height < 1 or width < 1 or size < 1:
            raise ValueError(f"frame {width}x{height}, square_size={size}; expected positive sides")
        scale = float(size) / float(max(height, width))
        Hn, Wn = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
        return cls(height, width, size, Hn, Wn, (size - Hn) // 2, (size - Wn) // 2)

    def valid_patches(self, patch_size: int) -> np.ndarray:
        """``(h, w)`` bool: the grid cells wholly inside the resized frame (padding cells are invalid)."""
        p, g = patch_size, self.size // patch_size
        y0 = np.arange(g) * p
        rows = (y0 >= self.top) & (y0 + p <= self.top + self.Hn)
        cols = (y0 >= self.left) & (y0 + p <= self.left + self.Wn)
        return np.outer(rows, cols)


def window_range(total_frames: int, window_len: int = 0, window_pick: str = "none") -> tuple[int, int]:
    """``(start, end)`` frame ids (inclusive) sampled over: the whole clip, or a ``window_len``-frame window at
    its ``begin``, ``mid`` (``(N - L) // 2``) or ``end`` when the clip is longer than the window. ``none`` with
    a window starts at 0 (the reference's fallback)."""
    if window_pick not in WINDOW_PICKS:
        raise ValueError(f"window_pick={window_pick!r}; expected one of {WINDOW_PICKS}")
    if total_frames < 1:
        raise ValueError(f"total_frames={total_frames}; expected a clip of at least 1 frame")
    if window_len <= 0 or total_frames <= window_len:
        return 0, total_frames - 1
    start = {"none": 0, "begin": 0, "mid": (total_frames - window_len) // 2, "end": total_frames - window_len}
    first = start[window_pick]
    return first, min(total_frames - 1, first + window_len - 1)


def sample_frame_ids(start: int, end: int, frames: int) -> np.ndarray:
    """``(frames,)`` int32 ``linspace(start, end, frames)`` floored: ids repeat when the range is shorter."""
    if frames < 1:
        raise ValueError(f"frames={frames}; expected >= 1")
    return np.linspace(start, max(start, end), frames, dtype=np.int32)


def _linear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights of OpenCV's INTER_LINEAR along one axis (float32 like it)."""
    f = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    a = (f - i0.astype(np.float32)).astype(np.float32)
    a = np.where((i0 < 0) | (i0 >= n_in - 1), np.float32(0), a)
    i0 = np.clip(i0, 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = np.rint((np.float32(1) - a) * np.float32(_COEF_SCALE)).astype(np.int32)
    return i0, i1, w0, _COEF_SCALE - w0


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(H, W, C)`` or ``(H, W)`` uint8 -> ``(height, width[, C])`` uint8 by bilinear interpolation without
    antialiasing, pixel centres aligned (OpenCV ``INTER_LINEAR``'s arithmetic, see the module docstring)."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image {image.dtype} {image.shape}; expected uint8 (H, W) or (H, W, C)")
    squeeze = image.ndim == 2
    x = image[..., None] if squeeze else image
    H, W, C = x.shape
    y0, y1, wy0, wy1 = _linear_taps(height, H)
    x0, x1, wx0, wx1 = _linear_taps(width, W)
    flat = x.reshape(H, W * C)  # columns gathered on a 2-D view: channels follow their pixel
    c = np.arange(C)
    i0, i1 = (x0[:, None] * C + c).ravel(), (x1[:, None] * C + c).ravel()
    w0, w1 = np.repeat(wx0, C), np.repeat(wx1, C)
    # every intermediate fits int32: 255·2^11 after the horizontal pass, (2^15)·2^11 in the vertical one
    rows = flat.take(i0, axis=1).astype(np.int32) * w0 + flat.take(i1, axis=1).astype(np.int32) * w1  # (H, w·C)
    rows >>= 4  # OpenCV's vertical pass: each term shifted by 4 then 16 bits, rounded by +2 >> 2 (total 2^22)
    out = ((wy0[:, None] * rows[y0]) >> 16) + ((wy1[:, None] * rows[y1]) >> 16)  # (height, width·C)
    out += 2
    out >>= 2
    out = np.clip(out, 0, 255).astype(np.uint8).reshape(height, width, C)
    return out[..., 0] if squeeze else out


def prepare_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)`` uint8: the longer side resized to ``size`` (see
    :class:`SquareGeometry`), centred on black (the reference's ``_preprocess_bgr_to_square``, any channel order)."""
    geometry = SquareGeometry.of(rgb.shape[0], rgb.shape[1], size)
    canvas = np.zeros((size, size, rgb.shape[2]), np.uint8)
    g = geometry
    canvas[g.top : g.top + g.Hn, g.left : g.left + g.Wn] = resize_linear(rgb, g.Hn, g.Wn)
    return canvas
