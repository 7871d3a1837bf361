"""The mosaics against the reference's ``_build_mosaics_time_spatial_np`` (vendored), pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.codec.assets import build_mosaics, render_sheet
from tests.helpers.reference_codec_assets import _build_mosaics_time_spatial_np


@pytest.mark.parametrize(("T", "size", "p", "N"), [(8, 96, 16, 3), (5, 64, 16, 2), (4, 56, 14, 2)])
def test_mosaics_equal_the_reference_pixel_for_pixel(T, size, p, N):
    rng = np.random.default_rng(T)
    frames = rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8)
    g = size // p
    positions = np.stack(  # random rows, repeats included (the reference's padding repeats rows)
        [rng.integers(0, T, N * g * g), rng.integers(0, g, N * g * g), rng.integers(0, g, N * g * g)], axis=1
    ).astype(np.int32)
    ours = build_mosaics(frames, positions, N, p)
    theirs = _build_mosaics_time_spatial_np(list(frames), positions, N, size, p)
    assert ours.shape == (N, size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, np.stack(theirs))


def test_mosaic_rows_are_row_major_slots():
    frames = np.arange(2 * 32 * 32 * 1, dtype=np.uint8).reshape(2, 32, 32, 1) % 251
    positions = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], np.int32)
    mosaic = build_mosaics(frames, positions, 1, 16)[0]
    for j, (t, h, w) in enumerate(positions.tolist()):
        r, c = divmod(j, 2)
        assert np.array_equal(
            mosaic[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16], frames[t, h * 16 : h * 16 + 16, w * 16 : w * 16 + 16]
        )


def test_build_mosaics_checks_the_rows():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"positions \(3, 3\); expected \(1·4, 3\)"):
        build_mosaics(frames, np.zeros((3, 3), np.int32), 1, 16)
    with pytest.raises(ValueError, match="outside the"):
        build_mosaics(frames, np.full((4, 3), 2, np.int32), 1, 16)


def test_render_sheet_dims_the_patches_not_kept_and_appends_the_mosaics():
    squares = np.full((3, 32, 32, 3), 200, np.uint8)
    positions = np.array([[0, 0, 0], [2, 1, 1]], np.int32)
    mosaics = np.full((1, 32, 32, 3), 50, np.uint8)
    sheet = np.asarray(render_sheet(squares, positions, mosaics, 16, tile=32, columns=2, gap=2))
    assert sheet.shape == (2 * 34 + 34 + 6, 2 + 2 * 34, 3)  # 2 frame rows, 1 mosaic row; 2 columns
    frame = lambda i: sheet[2 + (i // 2) * 34 : 2 + (i // 2) * 34 + 32, 2 + (i % 2) * 34 :][:, :32]  # noqa: E731
    assert frame(0)[:16, :16].min() == 200 and frame(0)[16:, 16:].max() == 60  # kept, and dimmed to 0.3
    assert frame(2)[16:, 16:].min() == 200 and frame(1).max() == 60
    assert (sheet[2 + 2 * 34 + 4 : 2 + 2 * 34 + 4 + 32, 2:34] == 50).all()  # the mosaic, below a wider gap
    with pytest.raises(ValueError, match="columns=0"):
        render_sheet(squares, positions, mosaics, 16, columns=0)
