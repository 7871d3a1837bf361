"""Shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE, FRAMES, SQUARE, P = 224, 32, 32, 16  # clips: 224x224, 32 frames, a 32-px square; grid 14x14 of 16-px patches

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")


GRID = SIZE // P


ENCODERS = {
    "mpeg4": {"g": "16", "bit_rate": 1_000_000},
    "libx264": {"g": "16", "bf": "2"},
    "libx265": {"x265-params": "keyint=16:bframes=2:log-level=error"},
}


def write_moving_clip(
    path: Path, codec: str = "mpeg4", frames: int = FRAMES, size: int = SIZE, pan=(0, 0), moving=True, seed: int = 0
) -> list[tuple[int, int]]:
    """A ``frames``-frame clip: a 32-px square of 4-px random blocks moving (3, 5) px/frame over 8-px random blocks,
    the whole frame panned by ``pan`` px/frame; returns the square's top-left ``(y, x)`` in every frame."""
    rng = np.random.default_rng(seed)
    span = size + (abs(pan[0]) + abs(pan[1])) * frames
    coarse = rng.integers(0, 256, (span // 8 + 1, span // 8 + 1, 3), dtype=np.uint8)
    background = np.kron(coarse, np.ones((8, 8, 1), np.uint8))
    square = np.kron(rng.integers(0, 256, (SQUARE // 4, SQUARE // 4, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8))
    options = dict(ENCODERS[codec])
    boxes = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        if "bit_rate" in options:
            stream.bit_rate = options.pop("bit_rate")
        stream.options = options
        for i in range(frames):
            oy, ox = pan[0] * (frames - i), pan[1] * (frames - i)  # content moves down/right by pan per frame
            frame = background[oy : oy + size, ox : ox + size].copy()
            y, x = ((16 + 3 * i) % (size - SQUARE), (16 + 5 * i) % (size - SQUARE)) if moving else (96, 96)
            frame[y : y + SQUARE, x : x + SQUARE] = square
            boxes.append((y, x))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return boxes


def square_patches(boxes, frame_ids, grid: int = GRID, min_cover: float = 1 / 8) -> np.ndarray:
    """``(T, grid, grid)`` bool: the patches at least ``min_cover`` of whose pixels the moving square covers in each
    sampled frame (1/8 = a 2-px strip; a 1-px sliver changes fewer pixels than codec noise does). The clip is
    ``SIZE`` px, its patches ``P`` px."""
    edges = np.arange(grid) * P
    truth = np.zeros((len(frame_ids), grid, grid), bool)
    for t, f in enumerate(frame_ids):
        y, x = boxes[int(f)]
        cover_y = np.clip(np.minimum(y + SQUARE, edges + P) - np.maximum(y, edges), 0, None)
        cover_x = np.clip(np.minimum(x + SQUARE, edges + P) - np.maximum(x, edges), 0, None)
        truth[t] = np.outer(cover_y, cover_x) >= min_cover * P * P
    return truth


def moving_clip_or_skip(folder: Path, codec: str, pan=(0, 0)) -> tuple[Path, list[tuple[int, int]]]:
    """:func:`write_moving_clip` at ``folder/<codec>.mp4`` (full size and length); the test is skipped where this
    PyAV was built without the encoder. Returns the path and the square's boxes."""
    try:
        av.codec.Codec(codec, "w")
    except ValueError:  # UnknownCodecError: a wheel built without it
        pytest.skip(f"this PyAV has no {codec} encoder")
    path = folder / f"{codec}.mp4"
    return path, write_moving_clip(path, codec, pan=pan)


def square_recall(boxes, frame_ids, positions, grid: int = GRID) -> float:
    """The share of the moving square's patches (:func:`square_patches`) in sampled frames 1.. that the kept
    ``(t, h, w)`` ``positions`` cover (frame 0 is kept whole by every selection)."""
    truth = square_patches(boxes, frame_ids, grid)
    keep = np.zeros_like(truth)
    keep[tuple(np.asarray(positions).T)] = True
    return (keep & truth)[1:].sum() / truth[1:].sum()
