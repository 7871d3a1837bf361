"""The selection rules against the reference's own code (:func:`tests.helpers.reference_codec_assets.reference_select`,
vendored): for the same scores, the same rows in the same order, the same visible indices; short clips, padding,
``time_bucket`` and the kept middle frame included. Scores are distinct so that top-K has one answer."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.codec.assets import (
    AssetSettings,
    SquareGeometry,
    motion_map,
    select_asset_positions,
    top_patches,
    visible_indices,
)
from tests.helpers.reference_codec_assets import reference_select


def distinct_scores(T: int, g: int, seed: int) -> np.ndarray:
    """``(T, g, g)`` float32 positive scores, all different (a random permutation of 1..T·g²)."""
    return (np.random.default_rng(seed).permutation(T * g * g) + 1).astype(np.float32).reshape(T, g, g)


CASES = {
    "global": dict(T=64, frame=(100, 37), settings=dict(num_images=8)),
    "global, full frame": dict(T=64, frame=(96, 96), settings=dict(num_images=8)),
    "short clip": dict(T=5, frame=(96, 96), settings=dict(num_images=3)),
    "padding": dict(T=6, frame=(100, 37), settings=dict(num_images=8)),  # 5 frames x 6 valid < 7 mosaics
    "one mosaic": dict(T=64, frame=(96, 96), settings=dict(num_images=1)),
    "time_bucket": dict(T=64, frame=(100, 60), settings=dict(num_images=8, mode="time_bucket")),
    "time_bucket, 3 buckets": dict(
        T=64, frame=(96, 96), settings=dict(num_images=8, mode="time_bucket", time_bucket_count=3)
    ),
    "time_bucket, padding": dict(T=10, frame=(100, 37), settings=dict(num_images=6, mode="time_bucket")),
    "middle frame": dict(T=64, frame=(96, 96), settings=dict(num_images=8, keep_mid_full_frame=True)),
    "middle frame at 5": dict(
        T=64,
        frame=(96, 96),
        settings=dict(num_images=4, keep_mid_full_frame=True, mid_full_frame_index=5, mode="time_bucket"),
    ),
    "middle frame at 0": dict(
        T=64, frame=(96, 96), settings=dict(num_images=4, keep_mid_full_frame=True, mid_full_frame_index=0)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_selection_equals_the_reference(case):
    spec = CASES[case]
    settings = AssetSettings(frames=spec["T"], square_size=96, patch_size=16, **spec["settings"])
    valid = SquareGeometry.of(*spec["frame"], 96).valid_patches(16)
    scores = distinct_scores(spec["T"], 6, seed=len(case))
    ours = select_asset_positions(scores, valid, settings)
    theirs, their_visible = reference_select(
        scores.reshape(spec["T"], 36),
        valid,
        settings.num_images,
        settings.keep_mid_full_frame,
        settings.mid_full_frame_index,
        settings.mode,
        settings.time_bucket_count,
    )
    assert ours.dtype == np.int32 and ours.shape == (settings.num_images * 36, 3)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(visible_indices(ours, 6), their_visible)
    assert np.array_equal(ours, ours[np.lexsort((ours[:, 2], ours[:, 1], ours[:, 0]))])  # sorted by (t, h, w)
    assert np.array_equal(ours[:36], np.argwhere(np.ones((1, 6, 6), bool)))  # the first frame whole, first
    later = ours[ours[:, 0] > 0]
    if settings.keep_mid_full_frame and settings.mid_full_frame_index != 0:
        later = later[later[:, 0] != (settings.mid_full_frame_index if settings.mid_full_frame_index > 0 else 32)]
    assert valid[later[:, 1], later[:, 2]].all()  # after the whole frames, padding cells are never kept


def test_padding_repeats_the_last_picked_row():
    """Too few valid patches: the rows run out and the reference's last row (the lowest score picked) repeats."""
    settings = AssetSettings(frames=3, num_images=4, square_size=96, patch_size=16)
    valid = SquareGeometry.of(100, 37, 96).valid_patches(16)  # 2 columns of 6: 12 valid cells of 36
    scores = distinct_scores(3, 6, seed=0)
    ours = select_asset_positions(scores, valid, settings)
    picked = [tuple(r) for r in ours[36:].tolist()]
    unique = sorted(set(picked))
    assert valid.sum() == 12 and len(unique) == 2 * 12  # every valid cell of frames 1 and 2, once
    lowest = min(unique, key=lambda thw: scores[thw])
    assert picked.count(lowest) == len(picked) - len(unique) + 1


def test_unchanged_patches_are_spread_over_frames_not_piled_into_the_first():
    settings = AssetSettings(frames=17, num_images=3, square_size=96, patch_size=16)
    valid = np.ones((6, 6), bool)
    scores = np.zeros((17, 6, 6), np.float32)
    scores[5, 2, 3] = 1.0  # one change
    rows = top_patches(scores, np.arange(1, 17), valid, 72, static_fallback=True)
    assert tuple(rows[0]) == (5, 2, 3) and len({tuple(r) for r in rows.tolist()}) == 72
    per_frame = np.bincount(rows[:, 0], minlength=17)[1:]
    assert per_frame.max() - per_frame.min() <= 1  # 72 over 16 frames: 4 or 5 each
    piled = top_patches(scores, np.arange(1, 17), valid, 72, static_fallback=False)
    assert set(piled[1:, 0].tolist()) == {1, 2}  # index order: the earliest frames
    full = select_asset_positions(scores, valid, settings)
    assert full.shape == (108, 3)


def test_settings_refuse_what_the_layout_cannot_hold():
    with pytest.raises(ValueError, match="square_size=100, patch_size=16; expected a multiple"):
        AssetSettings(square_size=100)
    with pytest.raises(ValueError, match="mode='bucket'"):
        AssetSettings(mode="bucket")
    with pytest.raises(ValueError, match="signals=\\('residual',\\)"):  # the reference's, stock FFmpeg has none
        AssetSettings(signals=("residual",))
    with pytest.raises(ValueError, match="expected distinct names"):
        AssetSettings(signals=("motion_vectors", "motion_vectors"))
    with pytest.raises(ValueError, match="jpeg_quality=0"):
        AssetSettings(jpeg_quality=0)
    with pytest.raises(ValueError, match=r"scores \(2, 5, 5\)"):
        select_asset_positions(np.zeros((2, 5, 5)), np.ones((5, 5), bool), AssetSettings(square_size=96))


def block_vectors(blocks) -> np.ndarray:
    """FFmpeg's ``MOTION_VECTORS`` rows (the fields :func:`hevc_vit.codec.signals.mv_cells` reads) for
    ``(dst_x, dst_y, size, motion_x)`` square blocks, past references, quarter-pel scale 1."""
    dtype = [("source", "<i4"), ("w", "u1"), ("h", "u1"), ("dst_x", "<i2"), ("dst_y", "<i2")]
    dtype += [("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")]
    return np.array([(-1, s, s, x, y, mx, 0, 1) for x, y, s, mx in blocks], dtype=dtype)


@pytest.mark.parametrize("factor", [1, 2])
def test_motion_vectors_map_through_the_resize_and_the_padding(factor):
    # a (64·f) x (32·f) frame of still (16·f)-px blocks, one moving 8·f px: on the 64-px square the picture is
    # 64x32 at top 16, the moving block 16 px at x 32..48, y 16..32 -> cell (1, 2), 8 square px of motion
    f = factor
    cells = [(i, j) for i in range(4) for j in range(2) if (i, j) != (2, 0)]
    still = [(8 * f + 16 * f * i, 8 * f + 16 * f * j, 16 * f, 0) for i, j in cells]
    vectors = block_vectors(still + [(40 * f, 8 * f, 16 * f, 8 * f)])
    geometry = SquareGeometry.of(32 * f, 64 * f, 64)
    assert (geometry.top, geometry.left, geometry.Hn, geometry.Wn) == (16, 0, 32, 64)
    expected = np.zeros((4, 4), np.float32)
    expected[1, 2] = 8.0
    np.testing.assert_allclose(motion_map(vectors, geometry, 16), expected, atol=1e-6)
    tall = block_vectors([(y, x, s, m) for x, y, s, m in still + [(40 * f, 8 * f, 16 * f, 8 * f)]])  # transposed
    np.testing.assert_allclose(motion_map(tall, SquareGeometry.of(64 * f, 32 * f, 64), 16), expected.T, atol=1e-6)
