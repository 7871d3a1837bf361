"""Frame preparation against the reference's: ``_preprocess_bgr_to_square`` (OpenCV ``INTER_LINEAR``), its
valid-patch mask, frame sampling and window choice. Measured: our numpy resize equals OpenCV on downscales and is
at most 1 level off on upscales; Pillow's bilinear (antialiased) is far off on downscales."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hevc_vit.codec.assets import SquareGeometry, prepare_square, resize_linear, sample_frame_ids, window_range
from tests.helpers.reference_codec_assets import (
    _preprocess_bgr_to_square,
    _sample_frame_ids_uniform_range,
    _valid_patch_mask_from_pad,
    reference_window,
)

# (H, W) -> a square side: shrinking, enlarging, odd aspect ratios, a side that rounds
SHAPES = [(224, 224, 96), (224, 224, 576), (1080, 1920, 576), (360, 640, 576), (240, 320, 576), (100, 37, 96)]


def textured(H: int, W: int, seed: int) -> np.ndarray:
    """Random 4-px blocks (edges at every scale) plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (H // 4 + 1, W // 4 + 1, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    noise = rng.integers(-20, 21, (H, W, 3))
    return np.clip(blocks[:H, :W].astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("H", "W", "size"), SHAPES)
def test_prepare_square_matches_the_reference_within_one_level(H, W, size):
    pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) runs the reference's resize")
    frame = textured(H, W, seed=H + W)
    ours = prepare_square(frame, size).astype(int)
    theirs = _preprocess_bgr_to_square(frame, size).astype(int)  # per-channel: the channel order does not matter
    assert ours.shape == theirs.shape == (size, size, 3)
    g = SquareGeometry.of(H, W, size)
    assert (ours == 0).all(axis=2)[: g.top].all() and (theirs == 0).all(axis=2)[: g.top].all()  # the same padding
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    if size <= max(H, W):  # shrinking: OpenCV's fixed-point arithmetic reproduced exactly
        assert diff.max() == 0


def test_pillow_bilinear_is_not_the_reference_resize():
    """Why the library does not use Pillow: it antialiases when it shrinks (this measures > 1 level)."""
    cv2 = pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) runs the reference's resize")
    frame = textured(360, 640, seed=1)
    pillow = np.asarray(Image.fromarray(frame).resize((576, 324), Image.Resampling.BILINEAR)).astype(int)
    opencv = cv2.resize(frame, (576, 324), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(pillow - opencv).max() > 1
    assert np.abs(resize_linear(frame, 324, 576).astype(int) - opencv).max() == 0


def test_resize_linear_takes_gray_frames_and_refuses_other_dtypes():
    gray = textured(30, 50, seed=2)[..., 0]
    assert np.array_equal(resize_linear(gray, 12, 20), resize_linear(gray[..., None], 12, 20)[..., 0])
    with pytest.raises(ValueError, match="expected uint8"):
        resize_linear(gray.astype(np.float32), 12, 20)


@pytest.mark.parametrize(("H", "W", "size", "p"), [(224, 224, 96, 16), (1080, 1920, 576, 16), (100, 37, 96, 16)])
def test_valid_patches_equal_the_reference_mask(H, W, size, p):
    g = SquareGeometry.of(H, W, size)
    expected = _valid_patch_mask_from_pad(size, p, g.top, g.left, g.Hn, g.Wn)
    assert np.array_equal(g.valid_patches(p), expected)
    assert g.Hn == max(1, round(H * size / max(H, W))) and g.top == (size - g.Hn) // 2


@pytest.mark.parametrize("total", [1, 2, 7, 63, 64, 65, 1000])
@pytest.mark.parametrize(
    ("window_len", "pick"), [(0, "none"), (100, "begin"), (100, "mid"), (100, "end"), (50, "none")]
)
def test_frame_ids_and_window_follow_the_reference(total, window_len, pick):
    start, end = window_range(total, window_len, pick)
    assert (start, end) == reference_window(total, window_len, pick)
    ids = sample_frame_ids(start, end, 64)
    assert ids.dtype == np.int32 and ids.tolist() == _sample_frame_ids_uniform_range(start, end, 64)


def test_window_and_geometry_errors_name_the_value():
    with pytest.raises(ValueError, match="window_pick='energy3'"):
        window_range(100, 10, "energy3")
    with pytest.raises(ValueError, match="total_frames=0"):
        window_range(0)
    with pytest.raises(ValueError, match="frame 0x10"):
        SquareGeometry.of(10, 0, 96)
