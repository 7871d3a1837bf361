"""What a video decoder gives (:class:`DecodedVideo`) and which frames it samples (:func:`sample_frame_indices`):
a leaf shared by both backends, :mod:`.video` (PyAV) and :mod:`.video_torchcodec`."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``total_frames`` (the middle of ``num_frames`` equal
    segments); every frame when the clip has no more than ``num_frames``."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}; expected at least 1")
    if total_frames < 1:
        raise ValueError(f"total_frames={total_frames}; the video has no frames")
    if total_frames <= num_frames:
        return list(range(total_frames))
    return [int((2 * i + 1) * total_frames // (2 * num_frames)) for i in range(num_frames)]


@dataclass
class DecodedVideo:
    """Sampled frames of one clip: RGB PIL images, their indices in the clip, and the clip's frame count."""

    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
