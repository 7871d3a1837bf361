"""One video's assets on the synthetic clips: frame preparation against the reference's on decoded frames, the
mosaics (before JPEG) against its builder, the layout rules on short clips, and recall of the moving square."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.codec.assets import AssetSettings, compute_assets, visible_indices
from hevc_vit.codec.assets.video import decode_squares
from tests.helpers.codec_clips import ENCODERS, FRAMES, SIZE, P, moving_clip_or_skip, square_recall, write_moving_clip
from tests.helpers.reference_codec_assets import (
    _build_mosaics_time_spatial_np,
    _preprocess_bgr_to_square,
    _sample_frame_ids_uniform_range,
)

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips


def decoded_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "square.mp4"
    return path, write_moving_clip(path, "mpeg4", frames=12, size=160)


def test_prepared_frames_and_mosaics_match_the_reference(clip):
    pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) runs the reference's resize")
    path, _ = clip
    settings = AssetSettings(frames=16, num_images=3, square_size=96, patch_size=16)
    assets = compute_assets(path, settings)
    frame_ids = _sample_frame_ids_uniform_range(0, 11, 16)  # a 12-frame clip: ids repeat
    assert assets.frame_ids.tolist() == frame_ids and assets.frame_ids.dtype == np.int32
    frames = decoded_frames(path)
    theirs = [_preprocess_bgr_to_square(frames[f], 96) for f in frame_ids]
    ours, _ = decode_squares(str(path), assets.frame_ids, 96)
    diff = np.abs(ours.astype(int) - np.stack(theirs).astype(int)).max()
    assert diff == 0  # 160 -> 96 shrinks: OpenCV's arithmetic exactly
    mosaics = _build_mosaics_time_spatial_np(theirs, assets.positions, 3, 96, 16)
    assert np.array_equal(assets.mosaics, np.stack(mosaics))  # before JPEG
    assert assets.positions.shape == (3 * 36, 3) and assets.positions.dtype == np.int32
    assert np.array_equal(assets.visible, visible_indices(assets.positions, 6))
    repeated = [t for t in range(1, 16) if frame_ids[t] == frame_ids[t - 1]]
    assert repeated and (assets.scores[repeated] == 0).all()  # a repeated frame changes nothing


def test_a_wide_clip_keeps_padding_out_of_the_selection(tmp_path):
    path = tmp_path / "wide.mp4"
    with av.open(str(path), "w") as container:  # 128x48: on a 96 square the picture is 96x36, rows 30..66
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 128, 48, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(10):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 128, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    settings = AssetSettings(frames=8, num_images=4, square_size=96, patch_size=16)
    assets = compute_assets(path, settings)
    later = assets.positions[assets.positions[:, 0] > 0]
    assert set(later[:, 1].tolist()) == {2, 3}  # the only rows of patches wholly inside 30..66
    assert assets.info["valid_patches"] == 12 and assets.info["resized"] == [36, 96]
    # 7 frames x 12 valid = 84 < 3 x 36 = 108 rows left: every valid patch once, then the last row repeats
    assert len(np.unique(later, axis=0)) == 84 and len(later) == 108


@pytest.mark.slow
@pytest.mark.parametrize("pan", [(0, 0), (3, 4)], ids=["square", "pan"])
@pytest.mark.parametrize("codec", list(ENCODERS))
def test_kept_patches_cover_the_moving_square(tmp_path, codec, pan):
    path, boxes = moving_clip_or_skip(tmp_path, codec, pan)
    settings = AssetSettings(frames=FRAMES, num_images=4, square_size=SIZE, patch_size=P)  # 12.5 % of the patches
    assets = compute_assets(path, settings)
    recall = square_recall(boxes, assets.frame_ids, assets.positions, SIZE // P)
    assert recall >= 0.9, f"{codec} {pan}: the kept patches of frames 1.. cover {recall:.3f} of the square"
