"""Decoding for the codec path with PyAV: the sampled frames one at a time, with their motion vectors
(slice threading: frame threading drops them at random) and picture types."""

from __future__ import annotations

import os

import numpy as np

from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.media.kinds import special_file
from hevc_vit.media.video import INSTALL_HINT, frame_rotation, sample_aspect, video_stream
from hevc_vit.packing import check_sides
from hevc_vit.processing.pixels import native_grid_size

_PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "i", 6: "p", 7: "b"}  # AVPictureType -> letter


def import_av():
    try:
        import av  # optional: the 'video' extra
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


def check_path(video: str | os.PathLike) -> str:
    path = os.fspath(video)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path} does not exist")
    if special := special_file(os.stat(path).st_mode):
        raise ValueError(f"video {path} is not a regular file but {special}; expected a video file")
    return path


def open_video(path: str):
    av = import_av()
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"video {path} is not a readable media file: {e}") from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise ValueError(f"video {path} has no video stream (its streams: {', '.join(kinds)}); expected a video")
    return container


REENCODE_HINT = "re-encode it as shown, e.g. ffmpeg -i IN -vf scale=iw*sar:ih,setsar=1 OUT (ffmpeg applies the turn)"


def check_shown_as_stored(path: str, hint: str = REENCODE_HINT) -> None:
    """Refuse a clip that is not shown as its frames are stored: codec selection scores the stored frames (motion
    vectors, residuals) and places patches on their grid, so a phone's portrait clip (a display matrix) would come
    out sideways and an anamorphic one squeezed; an audio file's cover picture is no clip. ``hint`` says what to
    do instead. (Without the codec path such clips are turned and stretched: ``media.video.upright_image``.) Opens
    the file on its own: the first frame is decoded, which would move a caller's container."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        cover = video_stream(container) is not stream
        aspect = sample_aspect(stream)
        first = None if cover or aspect != 1 else next(iter(container.decode(stream)), None)
    if cover:
        raise ValueError(
            f"video {path}: its first video stream is an attached cover picture (album art), not a clip; "
            f"expected a video whose first video stream is the clip"
        )
    if aspect != 1:
        raise ValueError(
            f"video {path}: its pixels are not square (sample aspect ratio {aspect}); codec selection works on the "
            f"stored frames and would give them squeezed; expected square pixels: {hint}"
        )
    turn = frame_rotation(first) if first is not None else 0
    if turn:
        raise ValueError(
            f"video {path}: it is shown turned by {turn} degrees (a display matrix, as phones write); codec "
            f"selection works on the stored frames and would give them sideways; expected an upright clip: {hint}"
        )


def probe(video: str | os.PathLike, patch_size: int, config: CodecSparseConfig) -> tuple[str, int, tuple[int, int]]:
    """The path, the frame count (stated, else packets counted) and the model frame size ``(H, W)``."""
    path = check_path(video)
    check_shown_as_stored(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        height, width = stream.codec_context.height, stream.codec_context.width
    if total < 1:
        raise ValueError(f"video {path} has a video stream without frames")
    if config.size is not None:
        check_sides("config.size", config.size[0], config.size[1], patch_size)
        return path, total, tuple(config.size)
    h, w = height // patch_size, width // patch_size
    if h < 1 or w < 1:
        raise ValueError(f"video {path} is {width}x{height}; expected both sides >= patch_size={patch_size}")
    cap = config.max_tokens_per_frame
    if cap is not None and h * w > cap:  # shrunk within one patch of the aspect ratio, at most `cap` patches
        h, w = native_grid_size(height, width, patch_size, 1, cap)
    return path, total, (h * patch_size, w * patch_size)


def sampled_frames(path: str, frame_ids: np.ndarray, thread_type: str, export_mvs: bool = False):
    """Yield ``(t, frame)`` for each sampled frame, decoding from the start and stopping after the last.

    A stream that ends before the last sampled frame (its stated count was off) raises ``ValueError``."""
    wanted = {int(f): t for t, f in enumerate(frame_ids)}
    last, decoded = int(frame_ids[-1]), 0
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        if export_mvs:
            stream.codec_context.options = {"flags2": "+export_mvs"}
        for frame in container.decode(stream):
            if decoded in wanted:
                yield wanted[decoded], frame
            decoded += 1
            if decoded > last:
                return
    raise StreamEnded(path, decoded, last)


class StreamEnded(ValueError):
    def __init__(self, path: str, decoded: int, last: int):
        super().__init__(
            f"video {path} decoded {decoded} frames, fewer than its stream states (sampled frame "
            f"{last} is missing): it may be truncated or damaged"
        )
        self.decoded = decoded


def motion_vectors_of(frame) -> np.ndarray | None:
    """The frame's exported motion vectors as a structured array, None when it carries none."""
    try:
        side = frame.side_data.get("MOTION_VECTORS")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    vectors = side.to_ndarray() if side is not None else None
    return vectors if vectors is not None and len(vectors) else None


def pict_letter(pict_type) -> str:
    """``frame.pict_type`` (an int in PyAV >= 14, an enum before) as FFmpeg's letter, ``?`` if unknown."""
    try:
        return _PICT_TYPES.get(int(pict_type), "?")
    except (TypeError, ValueError):
        name = getattr(pict_type, "name", "")
        return name if name in _PICT_TYPES.values() else "?"
