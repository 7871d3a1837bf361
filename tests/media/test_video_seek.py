"""Reading a long clip seeks to the sampled frames: few frames decoded, the same frames as decoding from the start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hevc_vit.media import video
from hevc_vit.media.video import read_video

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video


def write_long_clip(path: Path, num_frames: int, width: int = 48, height: int = 32) -> Path:
    """Frame ``i`` is flat, coloured ``(i % 256, 40 * (i // 256), 128)``, so a decoded frame tells its index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1", "g": "25"}  # a keyframe a second
        for i in range(num_frames):
            frame = Image.new("RGB", (width, height), (i % 256, 40 * (i // 256), 128))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_long_clip_is_read_by_seeking_and_gives_the_frames_of_a_full_decode(tmp_path, monkeypatch):
    path = write_long_clip(tmp_path / "long.mp4", 600)
    decoded = []
    real = video.decode_stream

    def counting(container, stream):
        for frame in real(container, stream):
            decoded.append(1)
            yield frame

    monkeypatch.setattr(video, "decode_stream", counting)
    sought = read_video(path, 4)
    assert sought.indices == [75, 225, 375, 525] and sought.total_frames == 600
    assert len(decoded) <= 4 * 26, len(decoded)  # at most a keyframe interval per sampled frame
    decoded.clear()
    monkeypatch.setattr(video, "SEEK_MIN_GAP", 10**9)  # decode from the start, as before
    whole = read_video(path, 4)
    assert len(decoded) == 526
    for i, a, b in zip(sought.indices, sought.frames, whole.frames):
        assert np.array_equal(np.asarray(a), np.asarray(b)), i
        assert abs(int(np.asarray(a)[0, 0, 0]) - i % 256) <= 3  # the frame's own colour: the right frame
