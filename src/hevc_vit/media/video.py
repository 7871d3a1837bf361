"""Video input through PyAV (the optional ``video`` extra; or torchcodec, :mod:`.video_torchcodec`): uniform frame
sampling, decoding, and the temporal RoPE positions of the sampled frames.

Legend: ``T`` sampled frames, ``h``/``w`` sides in patches.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import IO

import numpy as np
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


# counterclockwise turn of the display matrix (PyAV's frame.rotation, 0 without one) -> PIL's transposition
_TURNS = {0: None, 90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def frame_rotation(frame) -> int:
    """The counterclockwise turn, 0, 90, 180 or 270 degrees, that shows ``frame`` upright: the rotation of its
    stream's display matrix (a phone stores a portrait clip as landscape frames and this matrix; ffmpeg, players and
    torchcodec turn the frames). A PyAV without ``frame.rotation`` (before 14): read from the frame's display matrix
    (:func:`matrix_rotation`). A turn that is not a multiple of 90 degrees raises ``ValueError``: the frame would not
    be a rectangle upright."""
    angle = getattr(frame, "rotation", None)
    angle = matrix_rotation(frame) if angle is None else angle
    if not math.isfinite(angle):
        raise ValueError(f"the video's display matrix is singular (rotation {angle}); expected a rotation")
    turn = round(angle)
    if turn % 90:
        raise ValueError(f"the video's display matrix turns its frames by {angle} degrees; expected a multiple of 90")
    return turn % 360


def matrix_rotation(frame) -> float:
    """The counterclockwise degrees of the frame's ``DISPLAYMATRIX`` side data, as FFmpeg's ``av_display_rotation_get``
    computes them (what PyAV 14+ gives as ``frame.rotation``); 0 without one. The matrix is 9 int32 in 16.16 fixed
    point, row-major ``[a b u; c d v; x y w]``: a stored point ``(p, q)`` goes to ``(a·p + c·q + x, b·p + d·q + y)``."""
    side = _display_matrix(frame)
    if side is None:
        return 0.0
    a, b, _, c, d = np.frombuffer(bytes(side), dtype="<i4")[:5].astype(np.float64)
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if not scale_x or not scale_y:
        return math.nan
    return -math.degrees(math.atan2(b / scale_y, a / scale_x))


def _display_matrix(frame):
    """The frame's ``DISPLAYMATRIX`` side data, or None. Looked up by name: iterating ``frame.side_data`` gives the
    entries in PyAV up to 18.1.0 but their types from 18.1.1 on."""
    sides = getattr(frame, "side_data", None)
    if sides is None:
        return None
    try:
        return sides.get("DISPLAYMATRIX")
    except (AttributeError, KeyError, TypeError, ValueError):  # a PyAV without lookup by name: look at each entry
        return next((s for s in sides if str(getattr(s, "type", "")).upper().endswith("DISPLAYMATRIX")), None)


def sample_aspect(stream) -> Fraction:
    """The width of one stored pixel over its height as the stream is shown (1 when it says nothing): an anamorphic
    clip (DVD, HDV: 1440x1080 shown as 1920x1080) stores fewer columns than it shows."""
    for aspect in (getattr(stream, "sample_aspect_ratio", None), stream.codec_context.sample_aspect_ratio):
        if aspect and aspect > 0:
            return Fraction(aspect)
    return Fraction(1)


def upright_image(frame, aspect: Fraction = Fraction(1)) -> Image.Image:
    """The frame as it is shown: :func:`rgb_image` with its width scaled by the stream's ``aspect``
    (:func:`sample_aspect`; ``ffmpeg -vf scale=iw*sar:ih``), turned upright as its display matrix says
    (:func:`frame_rotation`). The processor then sizes the clip by its shown aspect ratio, as a player shows it."""
    width = max(1, round(frame.width * aspect))
    limit = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb bound; it refuses images over twice this
    if limit and width * frame.height > 2 * limit:
        raise ValueError(
            f"the clip's frames are {frame.width}x{frame.height}, shown {width}x{frame.height} (sample aspect ratio "
            f"{aspect}): {width * frame.height:,} pixels, over the {2 * limit:,} an image may have (Pillow's "
            f"decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS x 2)"
        )
    if width == frame.width:
        image = rgb_image(frame)
    else:
        image = reformat_here(frame, format="rgb24", width=width, height=frame.height).to_image()
    turn = _TURNS[frame_rotation(frame)]
    return image if turn is None else image.transpose(turn)


def _import_av():
    try:
        import av  # optional: the 'video' extra
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


def read_video(path: str | os.PathLike | IO[bytes], num_frames: int, backend: str = "pyav") -> DecodedVideo:
    """Decode ``num_frames`` uniformly sampled frames of the first video stream of ``path`` (a cover picture, an
    audio file's album art, is not one); ``backend`` ``"torchcodec"``: the same frames decoded by torchcodec
    (:func:`.video_torchcodec.read_video_torchcodec`). Frames come as they are shown (:func:`upright_image`):
    turned upright by the stream's display matrix (a phone's portrait clip), stretched to square pixels.

    The clip is decoded once from the start, keeping only the sampled frames; sampled frames more than
    ``SEEK_MIN_GAP`` frames apart are reached by seeking instead (an hour sampled at 8 frames decodes a few
    keyframe intervals, not the hour), with the same frames as a decode from the start (only when every frame's
    timestamp shows a constant frame rate: see :func:`_steady`). When the container does not
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
    total, times = _stated_frame_count(av, path)
    if total is None or (times is None and total > SEEK_MIN_GAP + 1):  # a seek needs every frame's timestamp
        counted, times = _count_frames(av, path)
        total = total or counted
    for _ in range(2):
        if total < 1:
            raise ValueError("the video stream has no frames")
        wanted = sample_frame_indices(total, num_frames)
        frames, decoded = _decode_frames(av, path, wanted, times)
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
    if video_stream(container) is None:
        covers = len(container.streams.video)
        container.close()
        cover = f" (only {covers} attached cover picture: an audio file's album art)" if covers else ""
        raise ValueError(f"the file has no video stream{cover}")
    return container


ATTACHED_PIC = 0x0400  # AV_DISPOSITION_ATTACHED_PIC: a still cover picture (a song's album art), not a clip


def video_stream(container):
    """The first video stream of ``container`` that is a clip, not a still cover picture (an audio file's album art
    is a one-frame video stream; encoding it would give a one-frame "video" of the cover); None when none is."""
    clips = (s for s in container.streams.video if not int(getattr(s, "disposition", 0)) & ATTACHED_PIC)
    return next(clips, None)


def _stated_frame_count(av, path) -> tuple[int | None, list[int] | None]:
    """The frame count the stream states (None when it states none), and the timestamps of all its frames when the
    container indexes every frame (MP4/MOV's sample table, an AVI index; read without reading the frames)."""
    with _open(av, path) as container:
        stream = video_stream(container)
        frames = stream.frames
        entries = getattr(stream, "index_entries", None) or ()  # PyAV >= 15
        times = [e.timestamp for e in entries] if frames and len(entries) == frames else None
    return (frames, times) if frames and frames > 0 else (None, None)


def _count_frames(av, path) -> tuple[int, list[int] | None]:
    """The frames found by reading the stream's packets, and their timestamps (None when a packet has none)."""
    count, times = 0, []
    with _open(av, path) as container:
        for packet in container.demux(video_stream(container)):
            if packet.size:
                count += 1
                times.append(packet.pts if packet.pts is not None else packet.dts)
    return count, None if None in times else times


def _steady(times: list[int], ticks_rate) -> bool:
    """Whether frame ``i`` of ``times`` (every frame's timestamp, in time-base ticks) lies within a third of a frame
    of ``first + i / rate`` (``ticks_rate``: frames per tick): only then does a timestamp name its frame's index.
    A variable frame rate (a screen recording, a WebM from a browser) fails: there a frame found by its time
    can be another frame than the one sampled by index — a seek to frame 300 of 320 landed on frame 215."""
    ordered = np.sort(np.asarray(times, dtype=np.float64))
    if not ordered.size:
        return False
    return bool((np.abs((ordered - ordered[0]) * float(ticks_rate) - np.arange(ordered.size)) < 1 / 3).all())


def decode_stream(container, stream):
    """The decoded frames of ``stream`` from the container's position (a test seam: a test may wrap it to count
    the frames a read decodes; it is looked up when called)."""
    return container.decode(stream)


def _decode_frames(av, path, wanted: list[int], times: list[int] | None = None) -> tuple[list[Image.Image], int]:
    """The frames at ``wanted`` (sorted indices), and how many frames were decoded in all. Frames far apart
    (more than ``SEEK_MIN_GAP``) are reached by seeking to the keyframe before each, when the stream's
    timestamps ``times`` (of every frame, from the container's index or its packets) show a constant frame rate;
    otherwise, or when a seek misses a frame, the clip is decoded from the start."""
    if wanted[-1] > SEEK_MIN_GAP and times is not None:
        frames = _seek_frames(av, path, wanted, times)
        if frames is not None:
            return frames, wanted[-1] + 1
    keep = set(wanted)
    last = wanted[-1]
    frames: list[Image.Image] = []
    decoded = 0
    with _open(av, path) as container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        aspect = sample_aspect(stream)
        for frame in decode_stream(container, stream):
            if decoded in keep:
                frames.append(upright_image(frame, aspect))
            decoded += 1
            if decoded > last:
                break
    return frames, decoded


def _seek_frames(av, path, wanted: list[int], times: list[int]) -> list[Image.Image] | None:
    """The frames at ``wanted`` found by seeking (frame ``i`` is the one presented at ``start + i / rate``), or
    None when the stream's timestamps do not identify every wanted frame (variable frame rate, no timestamps,
    a frame missing): the caller then decodes from the start, as before."""
    with _open(av, path) as container:
        stream = video_stream(container)
        rate, base = stream.average_rate or stream.guessed_rate, stream.time_base
        if not rate or not base or not _steady(times, rate * base):
            return None
        aspect = sample_aspect(stream)
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
            frames.append(upright_image(frame, aspect))
    return frames
