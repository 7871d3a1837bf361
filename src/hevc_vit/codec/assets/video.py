"""One video's assets in memory: probe, sample, decode and prepare the frames, score, select, build mosaics."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from hevc_vit.codec.assets.frames import SquareGeometry, prepare_square, sample_frame_ids, window_range
from hevc_vit.codec.assets.mosaics import build_mosaics
from hevc_vit.codec.assets.selection import luma, score_squares, select_asset_positions, visible_indices
from hevc_vit.codec.assets.settings import AssetSettings
from hevc_vit.codec.decode import StreamEnded, check_path, open_video

MIN_FRAMES = 2  # a single picture has no motion to select by


@dataclass
class VideoAssets:
    """What one asset folder holds, before it is written.

    frame_ids: ``(T,)`` int32 source frame of each ``t``; positions: ``(N·S, 3)`` int32 sorted ``(t, h, w)``;
    visible: ``(N·S,)`` int64; mosaics: ``(N, size, size, 3)`` uint8 RGB; scores: ``(T, g, g)`` float32;
    info: JSON-ready facts (frame counts, sizes, window, selection summary); timings: seconds per stage;
    squares: ``(T, S, S, 3)`` uint8 prepared frames, kept only when asked (for a preview)."""

    frame_ids: np.ndarray
    positions: np.ndarray
    visible: np.ndarray
    mosaics: np.ndarray
    scores: np.ndarray
    info: dict
    timings: dict = field(default_factory=dict)
    squares: np.ndarray | None = None


def probe_video(path: str) -> tuple[int, int, int, float]:
    """Frames (stated, else packets counted), height, width and frame rate (0.0 when unknown) of the first
    video stream; ``ValueError`` naming the file when it has no video stream or no frames."""
    with open_video(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        height, width = stream.codec_context.height, stream.codec_context.width
        rate = float(stream.average_rate) if stream.average_rate else 0.0
    if total < 1:
        raise ValueError(f"video {path} has a video stream without frames")
    return total, height, width, rate


def decode_squares(path: str, frame_ids: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """``(T, size, size, 3)`` uint8 prepared squares of the sampled frames (repeated ids decoded once) and the
    frames decoded. Raises :class:`StreamEnded` when the stream stops before the last sampled frame."""
    wanted = {int(f) for f in frame_ids}
    last, decoded, got = int(frame_ids.max()), 0, {}
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if decoded in wanted:
                got[decoded] = prepare_square(frame.to_ndarray(format="rgb24"), size)
            decoded += 1
            if decoded > last:
                break
    if decoded <= last:
        raise StreamEnded(path, decoded, last)
    return np.stack([got[int(f)] for f in frame_ids]), decoded


def compute_assets(video: str | os.PathLike, settings: AssetSettings, keep_squares: bool = False) -> VideoAssets:
    """The assets of the first video stream of ``video`` (see :mod:`hevc_vit.codec.assets`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that is not a
    video, has fewer than 2 frames, is smaller than one patch, or leaves no whole patch after resizing."""
    clock = time.perf_counter()
    path = check_path(video)
    if os.path.getsize(path) == 0:
        raise ValueError(f"video {path} is an empty file (0 bytes)")
    total, height, width, rate = probe_video(path)
    if min(height, width) < settings.patch_size:
        raise ValueError(f"video {path} is {width}x{height}; expected both sides >= patch_size={settings.patch_size}")
    geometry = SquareGeometry.of(height, width, settings.square_size)
    valid = geometry.valid_patches(settings.patch_size)
    if not valid.any():
        raise ValueError(
            f"video {path} is {width}x{height}: resized to {geometry.Wn}x{geometry.Hn} on the {settings.square_size}"
            f"-px square it holds no whole {settings.patch_size}-px patch; expected a less extreme aspect ratio"
        )
    try:
        frame_ids, start, end = _frame_ids(path, total, settings)
        squares, decoded = decode_squares(path, frame_ids, settings.square_size)
    except StreamEnded as ended:
        if ended.decoded < max(MIN_FRAMES, total - max(2, total // 20)):  # more than rounding off: damaged
            raise
        total = ended.decoded  # the stated count was slightly off: sample again over the frames that exist
        frame_ids, start, end = _frame_ids(path, total, settings)
        squares, decoded = decode_squares(path, frame_ids, settings.square_size)
    timings = {"decode": time.perf_counter() - clock}
    clock = time.perf_counter()
    scores, shifts = score_squares(np.stack([luma(s) for s in squares]), geometry, settings)
    positions = select_asset_positions(scores, valid, settings)
    timings["signals"] = time.perf_counter() - clock
    clock = time.perf_counter()
    mosaics = build_mosaics(squares, positions, settings.num_images, settings.patch_size)
    timings["mosaics"] = time.perf_counter() - clock
    info = dict(
        total_frames=int(total),
        fps=rate,
        size=[int(height), int(width)],
        resized=[geometry.Hn, geometry.Wn],
        pad=[geometry.top, geometry.left],
        valid_patches=int(valid.sum()),
        start_offset=int(start),
        end_offset=int(end),
        frame_ids_unique=int(len(np.unique(frame_ids))),
        changed_patches=int((scores > 0).sum()),
        kept_unique=int(len(np.unique(positions, axis=0))),
        camera_shift_max=int(np.abs(shifts).max()) if len(shifts) else 0,
    )
    visible = visible_indices(positions, settings.grid)
    return VideoAssets(frame_ids, positions, visible, mosaics, scores, info, timings, squares if keep_squares else None)


def _frame_ids(path: str, total: int, settings: AssetSettings) -> tuple[np.ndarray, int, int]:
    if total < MIN_FRAMES:
        raise ValueError(f"video {path} has {total} frame(s); codec assets need at least {MIN_FRAMES} (motion)")
    start, end = window_range(total, settings.window_len, settings.window_pick)
    return sample_frame_ids(start, end, settings.frames), start, end
