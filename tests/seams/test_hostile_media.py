"""``hevc-vit encode`` on media files as phones, screen recorders and music players write them: a clip with a
rotation matrix, an anamorphic clip, a variable frame rate, an audio file with cover art. Each hostile file is built
here and compared with the plain file it stands for (the same picture stored upright, with square pixels, at a
constant rate), or with a full decode by PyAV; none of them may give a row that says ``ok`` for a wrong clip."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hevc_vit.encode import encode, read_index
from hevc_vit.media.video import matrix_rotation, read_video
from tests.helpers import assert_close_rel, features_by_path
from tests.helpers.encode import OPTIONS, PROC

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video


def _picture(width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` uint8, telling every turn and flip apart: a red left quarter, a green top quarter, blue
    elsewhere; edges on multiples of 8 pixels, so 4:2:0 chroma blocks never straddle them."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[...] = (30, 40, 210)
    pixels[: height // 4] = (40, 210, 60)
    pixels[:, : width // 4] = (220, 30, 30)
    return pixels


def _write(path: Path, frames: list[np.ndarray], rotation: int | None = None, aspect: Fraction | None = None,
           pts: list[int] | None = None) -> Path:  # fmt: skip
    """A near-lossless mpeg4 clip of ``frames``; ``rotation``: the display matrix a phone writes (counterclockwise
    degrees); ``aspect``: the sample aspect ratio; ``pts``: each frame's timestamp in milliseconds."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        if pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if aspect is not None:
            stream.codec_context.sample_aspect_ratio = aspect
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _rows(tmp_path: Path, *paths: Path, **options) -> dict[str, dict]:
    encode(list(paths), tmp_path / "out", **{**OPTIONS, **options})
    return {Path(row["path"]).name: row for row in read_index(tmp_path / "out")}


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size, (a.size, b.size)
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_phone_clip_with_a_rotation_matrix_is_encoded_upright(model, tmp_path, rotation):
    upright = _picture(32, 64)  # a portrait clip as it is shown
    # a phone stores the sensor's pixels and a matrix turning them counterclockwise by `rotation` for display
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))
    plain = _write(tmp_path / "plain.mp4", [upright] * 3)
    turned = _write(tmp_path / "turned.mp4", [stored] * 3, rotation=rotation)
    if rotation == 270:  # the matrix a phone writes for a portrait clip (ffprobe: "rotation of -90"), whose
        # stored top edge is shown on the right: (p, q) -> (H - q, p); ffmpeg turns such a clip clockwise
        with av.open(str(turned)) as container:
            side = next(container.decode(video=0)).side_data.get("DISPLAYMATRIX")
        assert (np.frombuffer(bytes(side), "<i4")[[0, 1, 3, 4]] / 2**16).tolist() == [0, 1, -1, 0]
    rows = _rows(tmp_path, plain, turned, model=model)
    assert rows["turned.mp4"]["status"] == "ok", rows["turned.mp4"]["error"]
    expected = list(PROC.grid_size(64, 32, num_frames=3))  # computed from the shown (upright) size
    for name in ("plain.mp4", "turned.mp4"):
        assert rows[name]["grid_thw"] == [3, *expected] and rows[name]["size"] == [32, 64], rows[name]
    for a, b in zip(read_video(plain, 3).frames, read_video(turned, 3).frames):
        assert _mean_difference(a, b) < 4  # the same picture, up to the codec (a sideways frame differs by ~60)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270, 45])
def test_the_display_matrix_read_for_an_old_pyav_gives_pyavs_own_rotation(tmp_path, rotation):
    if not hasattr(av.VideoFrame, "rotation"):
        pytest.skip("this PyAV has no VideoFrame.rotation to compare with")
    clip = _write(tmp_path / "turned.mp4", [_picture(32, 16)], rotation=rotation)
    with av.open(str(clip)) as container:
        frame = next(container.decode(video=0))
        assert round(matrix_rotation(frame)) == round(frame.rotation)
    if rotation % 90:  # no rectangle upright: refused, naming the angle
        with pytest.raises(ValueError, match="turns its frames by 45"):
            read_video(clip, 1)


def test_an_anamorphic_clip_is_encoded_at_the_aspect_ratio_it_is_shown_at(model, tmp_path):
    shown = _picture(128, 48)
    squeezed = np.asarray(Image.fromarray(shown).resize((64, 48), Image.Resampling.BOX))  # 2:1 pixels, as on DVDs
    plain = _write(tmp_path / "plain.mp4", [shown] * 2)
    anamorphic = _write(tmp_path / "anamorphic.mp4", [squeezed] * 2, aspect=Fraction(2, 1))
    with av.open(str(anamorphic)) as container:  # the file says how it is shown: 64 stored columns, 128 shown
        assert container.streams.video[0].display_aspect_ratio == Fraction(128, 48)
    rows = _rows(tmp_path, plain, anamorphic, model=model)
    expected = list(PROC.grid_size(48, 128, num_frames=2))
    for name in ("plain.mp4", "anamorphic.mp4"):
        assert rows[name]["grid_thw"] == [2, *expected] and rows[name]["size"] == [128, 48], rows[name]
    for a, b in zip(read_video(plain, 2).frames, read_video(anamorphic, 2).frames):
        assert _mean_difference(a, b) < 6  # stretched back: edges soften by one resample, nothing moves


def test_a_sample_aspect_ratio_that_would_make_a_decompression_bomb_is_a_failed_row(model, tmp_path):
    # a few kilobytes whose one 1024x768 frame is shown 255 times as wide: 200 M pixels, over Pillow's bomb limit;
    # stretched, it took 7 s and 2.9 GiB (one frame; eight would be five times that)
    bomb = _write(tmp_path / "bomb.mp4", [_picture(1024, 768)], aspect=Fraction(255, 1))
    assert 1024 * 255 * 768 > 2 * Image.MAX_IMAGE_PIXELS
    row = _rows(tmp_path, bomb, model=model)["bomb.mp4"]
    assert row["status"] == "failed" and "sample aspect ratio 255" in row["error"], row
    assert "decompression-bomb" in row["error"], row


def _numbered(i: int) -> np.ndarray:
    """Frame ``i`` (< 320) of a clip: its left half says ``i // 16``, its right half ``i % 16``, in steps of 12."""
    pixels = np.empty((32, 64, 3), np.uint8)
    pixels[:, :32], pixels[:, 32:] = (i // 16) * 12 + 8, (i % 16) * 12 + 8
    return pixels


def _number_of(frame: Image.Image) -> int:
    pixels = np.asarray(frame, np.float64)
    return round((pixels[:, :32].mean() - 8) / 12) * 16 + round((pixels[:, 32:].mean() - 8) / 12)


def test_a_variable_frame_rate_clip_gives_the_frames_its_row_names(model, tmp_path):
    # 30 fps for 130 frames, then 15 fps, in Matroska (no frame count: the packets are counted): a frame found by its
    # time at the stated 30 fps is another frame than the one sampled by its index (as a screen recording would be)
    count = 320
    pts = [round(1000 * (i if i < 130 else 130 + 2 * (i - 130)) / 30) for i in range(count)]
    clip = _write(tmp_path / "vfr.mkv", [_numbered(i) for i in range(count)], pts=pts)
    with av.open(str(clip)) as container:
        every = [_number_of(frame.to_image()) for frame in container.decode(video=0)]
    assert every == list(range(count))  # the numbering survives the codec
    row = _rows(tmp_path, clip, model=model)["vfr.mkv"]
    assert row["status"] == "ok" and row["total_frames"] == count, row
    sampled = read_video(clip, len(row["frames"]))
    assert sampled.indices == row["frames"] and row["frames"][-1] > 120  # far enough apart to be sought
    assert [_number_of(frame) for frame in sampled.frames] == row["frames"]


def _song(path: Path) -> Path:
    """An AAC audio file with album art: a one-frame mjpeg stream marked as an attached picture."""
    with av.open(str(path), "w") as container:
        audio = container.add_stream("aac", rate=16000)
        cover = container.add_stream("mjpeg")
        cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        for i in range(10):
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 16000, i * 1024
            for packet in audio.encode(samples):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
        jpeg = io.BytesIO()
        Image.fromarray(_picture(64, 48)).save(jpeg, "JPEG")
        packet = av.Packet(jpeg.getvalue())
        packet.stream, packet.pts, packet.dts, packet.is_keyframe = cover, 0, 0, True
        container.mux(packet)
    with av.open(str(path)) as container:  # the file holds a cover picture, and no clip
        assert [int(s.disposition) & 0x0400 for s in container.streams.video] == [0x0400]
    return path


def test_an_audio_file_with_cover_art_is_a_failed_row_not_a_one_frame_clip(model, tmp_path):
    row = _rows(tmp_path, _song(tmp_path / "song.mp4"), model=model)["song.mp4"]
    assert row["status"] == "failed" and "no video stream" in row["error"] and "cover" in row["error"], row


def test_codec_sparse_refuses_clips_it_would_encode_sideways_squeezed_or_from_a_cover(model, tmp_path):
    # the selection works on the stored frames: each of these would be a wrong clip with status ok
    frames = [_picture(64, 32)] * 4
    files = {
        "turned.mp4": _write(tmp_path / "turned.mp4", frames, rotation=90),
        "anamorphic.mp4": _write(tmp_path / "anamorphic.mp4", frames, aspect=Fraction(2, 1)),
        "song.mp4": _song(tmp_path / "song.mp4"),
        "plain.mp4": _write(tmp_path / "plain.mp4", frames),
    }
    rows = _rows(tmp_path, *files.values(), model=model, codec_sparse=True)
    assert rows["plain.mp4"]["status"] == "ok", rows["plain.mp4"]
    for name, reason in (("turned.mp4", "turned by 90 degrees"), ("anamorphic.mp4", "sample aspect ratio 2"),
                         ("song.mp4", "cover picture")):  # fmt: skip
        assert rows[name]["status"] == "failed" and reason in rows[name]["error"], rows[name]


def test_the_codec_tools_refuse_the_same_clips_and_take_the_plain_one(tmp_path):
    """select_patches and codec-assets' compute_assets also work on the stored frames: the same three clips are
    refused with the reason, the plain clip is taken."""
    from hevc_vit.codec import CodecSparseConfig, select_patches
    from hevc_vit.codec.assets import AssetSettings, compute_assets

    frames = [_picture(64, 32)] * 4
    cases = (
        (_write(tmp_path / "turned.mp4", frames, rotation=90), "turned by 90 degrees"),
        (_write(tmp_path / "anamorphic.mp4", frames, aspect=Fraction(2, 1)), "sample aspect ratio 2"),
        (_song(tmp_path / "song.mp4"), "cover picture"),
    )
    settings = AssetSettings(frames=4, num_images=1, square_size=64, patch_size=16)
    for path, reason in cases:
        with pytest.raises(ValueError, match=reason):
            select_patches(path, 16, CodecSparseConfig(frames=4))
        with pytest.raises(ValueError, match=reason):
            compute_assets(path, settings)
    plain = _write(tmp_path / "plain.mp4", frames)
    assert select_patches(plain, 16, CodecSparseConfig(frames=4)).num_tokens > 0
    assert len(compute_assets(plain, settings).positions) > 0


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png", ".tif"])
def test_an_animated_image_or_a_multi_page_tiff_is_encoded_as_its_first_frame(model, tmp_path, suffix):
    pages = [Image.fromarray(np.roll(_picture(70, 40), 9 * i, axis=1)) for i in range(3)]  # each page differs
    animated = tmp_path / f"animated{suffix}"
    pages[0].save(animated, save_all=True, append_images=pages[1:], **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(animated) as image:
        assert getattr(image, "n_frames", 1) == 3
        image.convert("RGB").save(tmp_path / "first.png")  # what Image.open and load_image give: the first frame
    rows = _rows(tmp_path, animated, tmp_path / "first.png", model=model)
    assert rows[animated.name]["status"] == "ok" and rows[animated.name]["kind"] == "image", rows[animated.name]
    assert rows[animated.name]["grid_thw"] == rows["first.png"]["grid_thw"]
    features = features_by_path(tmp_path / "out")
    assert_close_rel(features[str(animated)]["pooled"], features[str(tmp_path / "first.png")]["pooled"])
