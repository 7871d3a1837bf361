"""One video's assets in memory: probe, sample, decode and prepare the frames, score, select, build mosaics."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from hevc_vit.codec.assets.frames import SquareGeometry, prepare_square, sample_frame_ids, window_range
from hevc_vit.codec.assets.mosaics import build_mosaics
from hevc_vit.codec.assets.selection import luma, motion_map, score_squares, select_asset_positions, visible_indices
from hevc_vit.codec.assets.settings import AssetSettings
from hevc_vit.codec.decode import (
    StreamEnded,
    check_path,
    check_shown_as_stored,
    motion_vectors_of,
    open_video,
    sampled_frames,
)
from hevc_vit.media.video import reformat_here

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
    check_shown_as_stored(path)
    with open_video(path) as container:
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        height, width = stream.codec_context.height, stream.codec_context.width
        rate = float(stream.average_rate) if stream.average_rate else 0.0
    if total < 1:
        raise ValueError(f"video {path} has a video stream without frames")
    return total, height, width, rate


def decode_squares(
    path: str, frame_ids: np.ndarray, size: int, motion_patch: int | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``(T, size, size, 3)`` uint8 prepared squares of the sampled frames (repeated ids decoded once) and, with
    ``motion_patch`` (the patch size), the decoder's motion vectors on the squares' grid: ``(T, g, g)`` float32
    :func:`~hevc_vit.codec.assets.selection.motion_map` maps and ``(T,)`` bool whether frame ``t`` has vectors (a
    repeated id: True, with no motion: nothing moved). Raises :class:`StreamEnded` when the stream stops before
    the last sampled frame.

    Motion vectors are exported as ``select_patches`` does (``flags2=+export_mvs``, slice threading: frame
    threading drops them at random); without them every thread type is allowed."""
    unique = np.unique(frame_ids)  # sorted: decoded in one pass from the start
    got, vectors = {}, {}
    motion = motion_patch is not None
    for i, frame in sampled_frames(path, unique, "SLICE" if motion else "AUTO", export_mvs=motion):
        rgb = reformat_here(frame, format="rgb24").to_ndarray()
        got[int(unique[i])] = prepare_square(rgb, size)
        if motion:
            found = motion_vectors_of(frame)
            geometry = SquareGeometry.of(rgb.shape[0], rgb.shape[1], size)
            vectors[int(unique[i])] = None if found is None else motion_map(found, geometry, motion_patch)
    squares = np.stack([got[int(f)] for f in frame_ids])
    if not motion:
        return squares, None
    g = size // motion_patch
    maps, has = np.zeros((len(frame_ids), g, g), np.float32), np.zeros(len(frame_ids), bool)
    for t, f in enumerate(frame_ids.tolist()):
        if t and f == frame_ids[t - 1]:
            has[t] = True  # the same frame again: no motion
        elif vectors[f] is not None:
            maps[t], has[t] = vectors[f], True
    return squares, (maps, has)


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
    motion_patch = settings.patch_size if settings.motion_vectors else None
    try:
        frame_ids, start, end = _frame_ids(path, total, settings)
        squares, motion = decode_squares(path, frame_ids, settings.square_size, motion_patch)
    except StreamEnded as ended:
        if ended.decoded < max(MIN_FRAMES, total - max(2, total // 20)):  # more than rounding off: damaged
            raise
        total = ended.decoded  # the stated count was slightly off: sample again over the frames that exist
        frame_ids, start, end = _frame_ids(path, total, settings)
        squares, motion = decode_squares(path, frame_ids, settings.square_size, motion_patch)
    timings = {"decode": time.perf_counter() - clock}
    clock = time.perf_counter()
    scores, shifts, fallback = score_squares(np.stack([luma(s) for s in squares]), geometry, settings, motion)
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
    if motion is not None:  # which frames the decoder gave vectors for, and how many the fallback scored
        others = [s for s in settings.signals if s != "motion_vectors"] or ["aligned_difference"]
        info.update(frames_with_vectors=int(motion[1][1:].sum()), signals_without_vectors=others)
        info.update(motion_fallback_frames=fallback)
    visible = visible_indices(positions, settings.grid)
    return VideoAssets(frame_ids, positions, visible, mosaics, scores, info, timings, squares if keep_squares else None)


def _frame_ids(path: str, total: int, settings: AssetSettings) -> tuple[np.ndarray, int, int]:
    if total < MIN_FRAMES:
        raise ValueError(f"video {path} has {total} frame(s); codec assets need at least {MIN_FRAMES} (motion)")
    start, end = window_range(total, settings.window_len, settings.window_pick)
    return sample_frame_ids(start, end, settings.frames), start, end
