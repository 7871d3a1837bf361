"""Video input through PyAV (the optional ``video`` extra; or torchcodec, :mod:`.video_torchcodec`): uniform frame
sampling, decoding, and the temporal RoPE positions of the sampled frames.

Legend: ``T`` sampled frames, ``h``/``w`` sides in patches.
"""

from __future__ import annotations

import os
from typing import IO

import torch
from PIL import Image

from hevc_vit.media.frames import DecodedVideo, sample_frame_indices
from hevc_vit.media.video_torchcodec import read_video_torchcodec
from hevc_vit.packing import grid_positions

SEEK_MIN_GAP = 120  # frames: a sampled frame further ahead is reached by a seek, not by decoding up to it
INSTALL_HINT = "PyAV is not installed; install the video extra: pip install 'hevc-vit[video]'"
VIDEO_BACKENDS = ("pyav", "torchcodec")  # --video-backend: the decoder of the sampled frames


def temporal_positions(num_frames: int, temporal_context: int | None = None) -> list[int]:
    """The RoPE ``t`` position of each of ``num_frames`` sampled frames.

    ``temporal_context=None``: the frame's index in the sample, ``0..T-1``. Otherwise the frames are
    spread over ``0..temporal_context-1``, first and last at the ends, rounded to the nearest integer:
    8 frames over 64 give 0, 9, 18, ..., 63.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}; expected at least 1")
    if temporal_context is None:
        return list(range(num_frames))
    if temporal_context < num_frames:
        raise ValueError(
            f"temporal_context={temporal_context} is smaller than the {num_frames} sampled frames; "
            f"expected temporal_context >= frames"
        )
    if num_frames == 1:
        return [0]
    span, last = temporal_context - 1, num_frames - 1
    return [(i * span + last // 2) // last for i in range(num_frames)]


def video_patch_positions(grid_thw: tuple[int, int, int], t_positions: list[int] | None) -> torch.Tensor:
    """``(T·h·w, 3)`` int64 ``(t, h, w)`` positions of one clip's patches, the ``t`` of frame ``i`` replaced
    by ``t_positions[i]`` (the grid's own frame numbers when None)."""
    t, h, w = grid_thw
    positions = grid_positions(torch.tensor([[t, h, w]]))  # (T·h·w, 3)
    if t_positions is not None:
        if len(t_positions) != t:
            raise ValueError(f"t_positions has {len(t_positions)} entries; the clip has {t} frames")
        positions[:, 0] = torch.tensor(t_positions, dtype=torch.int64).repeat_interleave(h * w)
    return positions


_SCALE_HERE = {"threads": 1}  # emptied once when the installed PyAV's reformat takes no ``threads``


def reformat_here(frame, **kwargs):
    """``frame.reformat(**kwargs)`` with swscale on the calling thread: PyAV 18 asks swscale for automatic
    threads, and in a forked decoding worker its slice threads waited forever (a hung test suite); the workers
    already take a core each. A PyAV whose reformat has no ``threads`` uses swscale's default, one thread."""
    try:
        return frame.reformat(**kwargs, **_SCALE_HERE)
    except TypeError:
        if not _SCALE_HERE:
            raise
        _SCALE_HERE.clear()
        return frame.reformat(**kwargs)


def rgb_image(frame) -> Image.Image:
    """A decoded video frame as an RGB PIL image, scaled on this thread (:func:`reformat_here`)."""
    return reformat_here(frame, format="rgb24").to_image()


def _import_av():
    try:
        import av  # optional: the 'video' extra
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


def read_video(path: str | os.PathLike | IO[bytes], num_frames: int, backend: str = "pyav") -> DecodedVideo:
    """Decode ``num_frames`` uniformly sampled frames of the first video stream of ``path``; ``backend``
    ``"torchcodec"``: the same frames decoded by torchcodec (:func:`.video_torchcodec.read_video_torchcodec`).

    The clip is decoded once from the start, keeping only the sampled frames; sampled frames more than
    ``SEEK_MIN_GAP`` frames apart are reached by seeking instead (an hour sampled at 8 frames decodes a few
    keyframe intervals, not the hour), with the same frames as a decode from the start. When the container does not
    state its frame count, the packets are counted first. When it states a count and fewer frames decode, a
    shortfall of a few frames (at most 2, or 5 % of the count: containers round, and edit lists or decoder
    delay drop a frame or two) draws the sample again over the frames that decode; a larger one means the file
    is truncated or damaged and raises ``ValueError`` — its clip would be another clip than the stream states.
    """
    if backend != "pyav":
        if backend not in VIDEO_BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {VIDEO_BACKENDS}")
        return read_video_torchcodec(path, num_frames)
    av = _import_av()
    total = _stated_frame_count(av, path)
    if total is None:
        total = _count_frames(av, path)
    for _ in range(2):
        if total < 1:
            raise ValueError("the video stream has no frames")
        wanted = sample_frame_indices(total, num_frames)
        frames, decoded = _decode_frames(av, path, wanted)
        if len(frames) == len(wanted):
            return DecodedVideo(frames, wanted, total)
        if decoded < total - max(2, total // 20):
            raise ValueError(
                f"the video is truncated or damaged: its stream states {total} frames, but only {decoded} decode "
                f"(the sampled frames {wanted} need {wanted[-1] + 1})"
            )
        total = decoded  # the stated count was slightly off: sample again over the frames that exist
    raise ValueError(f"the video decoded {decoded} frames, fewer than its stream states; it may be truncated")


def _open(av, path):
    if hasattr(path, "read"):  # the bytes of a clip from a tar shard, a URL or a dataset (a BytesIO)
        path.seek(0)
        container = av.open(path)
    else:
        container = av.open(os.fspath(path))
    if not container.streams.video:
        container.close()
        raise ValueError("the file has no video stream")
    return container


def _stated_frame_count(av, path) -> int | None:
    with _open(av, path) as container:
        frames = container.streams.video[0].frames
    return frames if frames and frames > 0 else None


def _count_frames(av, path) -> int:
    with _open(av, path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_stream(container, stream):
    """The decoded frames of ``stream`` from the container's position (a test seam: a test may wrap it to count
    the frames a read decodes; it is looked up when called)."""
    return container.decode(stream)


def _decode_frames(av, path, wanted: list[int]) -> tuple[list[Image.Image], int]:
    """The frames at ``wanted`` (sorted indices), and how many frames were decoded in all. Frames far apart
    (more than ``SEEK_MIN_GAP``) are reached by seeking to the keyframe before each, when the stream's
    timestamps allow it; otherwise, or when a seek misses a frame, the clip is decoded from the start."""
    if wanted[-1] > SEEK_MIN_GAP:
        frames = _seek_frames(av, path, wanted)
        if frames is not None:
            return frames, wanted[-1] + 1
    keep = set(wanted)
    last = wanted[-1]
    frames: list[Image.Image] = []
    decoded = 0
    with _open(av, path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in decode_stream(container, stream):
            if decoded in keep:
                frames.append(rgb_image(frame))
            decoded += 1
            if decoded > last:
                break
    return frames, decoded


def _seek_frames(av, path, wanted: list[int]) -> list[Image.Image] | None:
    """The frames at ``wanted`` found by seeking (frame ``i`` is the one presented at ``start + i / rate``), or
    None when the stream's timestamps do not identify every wanted frame (variable frame rate, no timestamps,
    a frame missing): the caller then decodes from the start, as before."""
    with _open(av, path) as container:
        stream = container.streams.video[0]
        rate, base = stream.average_rate or stream.guessed_rate, stream.time_base
        if not rate or not base:
            return None
        start = stream.start_time or 0
        frames: list[Image.Image] = []
        decoding, position = None, -1  # the frame iterator, and the index of the last frame it gave
        for target in wanted:
            if decoding is None or target - position > SEEK_MIN_GAP:
                container.seek(start + int(target / (rate * base)), stream=stream, backward=True)  # keyframe before
                decoding = iter(decode_stream(container, stream))
            for frame in decoding:
                if frame.pts is None:
                    return None
                position = round(float((frame.pts - start) * base * rate))
                if position >= target:
                    break
            else:
                return None  # the stream ended first
            if position != target:
                return None
            frames.append(rgb_image(frame))
    return frames
