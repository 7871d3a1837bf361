"""The ``motion_vectors`` signal of the codec assets: the decoder's vectors mapped through the frame preparation
(on an unpadded square they are ``select_patches``' own maps; on a letterboxed clip they land on the object's
cells inside the picture, none in the padding), the fallback for a codec without vectors, recall of the moving
square, worker processes, and resume refusing other signals."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.codec import CodecSparseConfig, select_patches, write_assets
from hevc_vit.codec import read_signals as encode_signals
from hevc_vit.codec.assets import AssetSettings, SquareGeometry, compute_assets
from hevc_vit.codec.assets.video import decode_squares
from hevc_vit.codec.signals import sample_frame_ids
from tests.helpers.codec_clips import ENCODERS, FRAMES, SIZE, P, moving_clip_or_skip, square_recall, write_moving_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips

MV = ("motion_vectors",)


def test_settings_take_motion_vectors_and_read_older_records():
    settings = AssetSettings(signals=MV)
    assert settings.motion_vectors and not AssetSettings().motion_vectors
    reference = AssetSettings.reference()
    assert reference.signals == CodecSparseConfig.reference().signals and reference.normalize == "frame"
    older = {k: v for k, v in AssetSettings().as_dict().items() if k not in ("mv_floor", "mosaic_format")}
    assert AssetSettings().same_as(older)  # written before mv_floor existed: its default
    assert AssetSettings(mv_floor=1.0).differences(older) == ["mv_floor"]
    assert settings.differences(AssetSettings().as_dict()) == ["signals"]
    assert AssetSettings().differences({**older, "unknown": 1}) == ["unknown"]
    with pytest.raises(ValueError, match="mv_floor=-1"):
        AssetSettings(mv_floor=-1)


def test_on_an_unpadded_square_the_maps_are_select_patches_own(tmp_path):
    path = tmp_path / "square.mp4"
    write_moving_clip(path, "mpeg4", frames=12)
    frame_ids = sample_frame_ids(12, 12)
    theirs, has, _, types = encode_signals(str(path), frame_ids, (SIZE, SIZE), P, MV)
    _, (ours, ours_has) = decode_squares(str(path), frame_ids.astype(np.int32), SIZE, P)  # the square is the frame
    assert types.count("P") >= 8 and has[1:].sum() >= 8
    assert np.array_equal(ours_has, has) and (ours > 0).any()
    np.testing.assert_allclose(ours, theirs["motion_vectors"], rtol=1e-6, atol=1e-6)


def write_letterboxed_clip(path, height: int, width: int, frames: int = 10) -> list[tuple[int, int]]:
    """A static textured ``width x height`` clip with a 32-px textured square moving 6 px a frame along the longer
    side and 2 across; returns its top-left ``(y, x)`` in every frame."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    background = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
    square = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    wide = width >= height
    boxes = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate, stream.options = 2_000_000, {"g": "100"}
        for i in range(frames):
            y, x = (40 + 2 * i, 40 + 6 * i) if wide else (40 + 6 * i, 40 + 2 * i)
            frame = background.copy()
            frame[y : y + 32, x : x + 32] = square
            boxes.append((y, x))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return boxes


@pytest.mark.parametrize("shape", [(128, 256), (256, 128)], ids=["wide", "tall"])
def test_the_motion_field_lands_on_the_objects_cells_inside_the_picture(tmp_path, shape):
    height, width = shape
    path = tmp_path / "boxed.mp4"
    boxes = write_letterboxed_clip(path, height, width)
    frame_ids = np.arange(10, dtype=np.int32)
    _, (motion, has) = decode_squares(str(path), frame_ids, 128, 16)  # scale 0.5: the picture 64 px of 128
    G = SquareGeometry.of(height, width, 128)
    valid = G.valid_patches(16)
    assert valid.sum() == 4 * 8 and (G.top, G.left) == ((32, 0) if width > height else (0, 32))
    assert has[1:].sum() >= 8
    edges = np.arange(8) * 16
    for t in np.flatnonzero(has[1:]) + 1:
        y, x = boxes[t]
        top, left = G.top + y * G.Hn / height, G.left + x * G.Wn / width  # the square's box on the square, 16 px
        rows = (edges < top + 16) & (edges + 16 > top)
        cols = (edges < left + 16) & (edges + 16 > left)
        on_object = np.outer(rows, cols)  # (8, 8) the cells the moved square touches
        assert (motion[t][~valid] == 0).all(), f"t={t}: motion in the padding"
        assert motion[t][on_object].sum() >= 0.8 * motion[t].sum() > 0, f"t={t}: motion off the object"
    settings = AssetSettings(frames=10, num_images=3, square_size=128, patch_size=16, signals=MV)
    assets = compute_assets(path, settings)
    assert assets.info["frames_with_vectors"] == int(has[1:].sum()) and assets.info["motion_fallback_frames"] == 0
    later = assets.positions[assets.positions[:, 0] > 0]
    assert valid[later[:, 1], later[:, 2]].all()  # never a padding cell


def test_a_codec_without_vectors_is_scored_by_the_fallback(tmp_path):
    path = tmp_path / "intra.avi"
    boxes = write_moving_clip(path, "mpeg4", frames=12, size=96)
    with av.open(str(path)) as src, av.open(str(tmp_path / "mjpeg.avi"), "w") as dst:  # intra only: no vectors
        stream = dst.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuvj420p"
        for frame in src.decode(video=0):
            for packet in stream.encode(frame.reformat(format="yuvj420p")):
                dst.mux(packet)
        for packet in stream.encode():
            dst.mux(packet)
    base = dict(frames=12, num_images=3, square_size=96, patch_size=16)
    alone = compute_assets(tmp_path / "mjpeg.avi", AssetSettings(**base, signals=MV))
    assert alone.info["frames_with_vectors"] == 0 and alone.info["motion_fallback_frames"] == 11
    assert alone.info["signals_without_vectors"] == ["aligned_difference"]
    difference = compute_assets(tmp_path / "mjpeg.avi", AssetSettings(**base))
    assert np.array_equal(alone.positions, difference.positions)  # aligned_difference alone, as documented
    both = compute_assets(tmp_path / "mjpeg.avi", AssetSettings(**base, signals=(*MV, "aligned_difference")))
    assert both.info["motion_fallback_frames"] == 0 and np.array_equal(both.positions, difference.positions)
    assert len(boxes) == 12


@pytest.mark.slow
@pytest.mark.parametrize("pan", [(0, 0), (3, 4)], ids=["square", "pan"])
@pytest.mark.parametrize("codec", list(ENCODERS))
def test_kept_patches_cover_the_moving_square_with_motion_vectors(tmp_path, codec, pan):
    path, boxes = moving_clip_or_skip(tmp_path, codec, pan)
    layout = dict(frames=FRAMES, num_images=4, square_size=SIZE, patch_size=P)  # 12.5 % of the patches

    def recall(settings: AssetSettings) -> tuple[float, dict]:
        assets = compute_assets(path, settings)
        return square_recall(boxes, assets.frame_ids, assets.positions, SIZE // P), assets.info

    fused, _ = recall(AssetSettings.reference(**layout))
    assert fused >= 0.9, f"{codec} {pan}: motion vectors + aligned difference cover {fused:.3f} of the square"
    alone, info = recall(AssetSettings(**layout, signals=MV))
    if info["frames_with_vectors"] == 0:  # HEVC: stock FFmpeg exports no vectors, the fallback scores it
        assert info["motion_fallback_frames"] == FRAMES - 1 and alone >= 0.9, (codec, pan, alone)
        return
    # the vectors alone mark the blocks the encoder moved, not the ones it coded intra at the square's edges:
    # the same signal as select_patches', so the same recall (measured 0.27-0.74 there, see docs/codec-assets.md)
    selection = select_patches(path, P, CodecSparseConfig(frames=FRAMES, signals=MV, budget=4 * (SIZE // P) ** 2))
    theirs = square_recall(boxes, selection.frame_ids.numpy(), selection.positions.numpy())
    assert alone >= theirs - 0.02, f"{codec} {pan}: motion vectors alone cover {alone:.3f}, select_patches {theirs:.3f}"


def test_worker_processes_write_the_same_bytes_and_resume_refuses_other_signals(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    for name, codec in (("a", "mpeg4"), ("b", "libx264")):
        write_moving_clip(clips / f"{name}.mp4", codec, frames=10, size=64)
    settings = AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16, signals=(*MV, "difference"))
    one = write_assets([clips], tmp_path / "one", settings)
    two = write_assets([clips], tmp_path / "two", settings, workers=2)
    assert [r["status"] for r in one.rows] == [r["status"] for r in two.rows] == ["ok", "ok"]
    for key in ("a", "b"):
        for name in ("positions_thw.npy", "visible_indices.npy", "frame_ids.npy", "mosaic_000.jpg", "mosaic_001.jpg"):
            a = (tmp_path / "one" / "assets" / key / name).read_bytes()
            assert a == (tmp_path / "two" / "assets" / key / name).read_bytes(), (key, name)
    with pytest.raises(ValueError, match="signals differ"):
        write_assets([clips], tmp_path / "one", AssetSettings(frames=8, num_images=2, square_size=64), resume=True)
