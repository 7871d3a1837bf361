"""Shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")


def write_clip(path: Path, num_frames: int, width: int = 48, height: int = 32, fps: int = 8) -> Path:
    """A near-lossless clip whose frame ``i`` is a flat grey of level ``8 * i`` (so decoded frames can be told
    apart)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "1"}
        for i in range(num_frames):
            frame = Image.new("RGB", (width, height), (8 * i, 8 * i, 8 * i))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def noisy_clip(path: Path, num_frames: int) -> Path:
    """A clip of random frames (so its data is much larger than its header), its index (moov) written first,
    so a cut file still opens and states ``num_frames``."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
