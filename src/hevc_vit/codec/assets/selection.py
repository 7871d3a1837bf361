"""Which patches the assets keep: scores from our signals, then the reference's rules.

Scores (:func:`score_squares`, from :mod:`hevc_vit.codec.signals`): the difference of frame ``t`` against
``t-1`` is taken per pixel on the resized frame only (the black padding is left out, so the camera's shift is
found on the picture and pixels a shift exposes count as 0, as in ``select_patches``), placed on the square and
averaged per patch; each frame's median over its valid patches is subtracted (codec noise and flicker lift a
whole frame). ``motion_vectors`` are the decoder's own (:func:`motion_map`: mapped through the frame
preparation onto the square's grid, the camera's median motion removed). Then :func:`score_volume` fuses the
signals with their noise floors. Repeated frame ids (a clip shorter than ``T``) differ by nothing and score 0.

Rules (:func:`select_asset_positions`, the reference's ``_compute_visible_indices_pack_topk_time_spatial``):
the whole first sampled frame (raster order) comes first; optionally one whole middle frame; the rest is one
global top-K over the remaining frames' valid (non-padding) patches (``global``), or one mosaic's worth per
contiguous bucket of frames (``time_bucket``); when too few are available the last row repeats up to exactly
``N·S`` rows; the rows are then sorted by ``(t, h, w)``. Top-K takes descending score, ties by index; with
``static_fallback`` the patches that did not change (score 0) are spread evenly over frames and positions
rather than piling into the earliest frames. Legend: ``T`` frames, ``g`` grid side, ``S = g²``, ``N`` mosaics.
"""

from __future__ import annotations

import math

import numpy as np

from hevc_vit.codec.assets.frames import SquareGeometry
from hevc_vit.codec.assets.settings import AssetSettings
from hevc_vit.codec.signals import aligned_difference, global_shift, mv_cells, score_volume, spread_order

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601, the Y of FFmpeg's gray conversion


def luma(square_rgb: np.ndarray) -> np.ndarray:
    """``(size, size, 3)`` uint8 RGB -> ``(size, size)`` float32 luma."""
    x = square_rgb.astype(np.float32)
    return x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]  # no BLAS: no threads per worker


def difference_maps(
    lumas: np.ndarray,
    geometry: SquareGeometry,
    patch_size: int,
    signals: tuple[str, ...],
    frames: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw maps name -> ``(T, g, g)`` float32 and the camera shifts ``(T, 2)`` int64 (0 for ``t = 0``).

    lumas: ``(T, size, size)`` float32 of the prepared squares; frames: ``(T,)`` bool, the frames to compute
    (None: all; the others stay 0)."""
    T, size = lumas.shape[0], lumas.shape[1]
    g, p, G = size // patch_size, patch_size, geometry
    crop = (slice(G.top, G.top + G.Hn), slice(G.left, G.left + G.Wn))
    maps = {name: np.zeros((T, g, g), np.float32) for name in signals}
    shifts = np.zeros((T, 2), np.int64)
    pixels = np.zeros((size, size), np.float32)
    for t in range(1, T):
        if frames is not None and not frames[t]:
            continue
        prev, cur = lumas[t - 1][crop], lumas[t][crop]
        if np.array_equal(prev, cur):  # a repeated frame id: nothing changed
            continue
        for name in signals:
            shift = global_shift(prev, cur) if name == "aligned_difference" else (0, 0)
            if name == "aligned_difference":
                shifts[t] = shift
            pixels[crop] = aligned_difference(prev, cur, shift, 1)  # per pixel, exposed pixels 0
            maps[name][t] = pixels.reshape(g, p, g, p).mean(axis=(1, 3))  # (g, g)
    return maps, shifts


def motion_map(vectors: np.ndarray, geometry: SquareGeometry, patch_size: int) -> np.ndarray:
    """``(g, g)`` float32 motion energy per patch of the square (:func:`hevc_vit.codec.signals.mv_cells`: mean
    ``|v - median v|`` in square pixels), the frame's motion vectors mapped through the frame preparation:
    the ``height x width`` coded frame resized to ``Hn x Wn`` and placed at ``(top, left)``. Padding cells get no
    motion (a cell the picture's edge crosses, the motion of its part inside; :func:`score_squares` drops it)."""
    G, p = geometry, patch_size
    g = G.size // p
    if len(vectors) == 0:
        return np.zeros((g, g), np.float32)
    sy, sx = G.Hn / G.height, G.Wn / G.width  # square pixels per coded pixel
    cells = np.arange(g + 1) * p
    edges_y = np.clip((cells - G.top) / sy, 0, G.height)  # the square's cell edges in coded pixels
    edges_x = np.clip((cells - G.left) / sx, 0, G.width)
    return mv_cells(vectors, (sy, sx), (edges_y, edges_x), (p / sy) * (p / sx))


def score_squares(
    lumas: np.ndarray,
    geometry: SquareGeometry,
    settings: AssetSettings,
    motion: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(T, g, g)`` float32 fused scores (invalid cells 0), ``(T, 2)`` shifts of the prepared squares, and the
    frames scored by the motion fallback.

    motion: with ``motion_vectors`` in the signals, ``(T, g, g)`` float32 :func:`motion_map` maps and ``(T,)`` bool,
    whether frame ``t`` has vectors (a repeated frame id: True, with no motion). Frame ``t >= 1`` without vectors
    is scored by the other signals (``CodecSparseConfig``'s rule); with ``motion_vectors`` alone, by
    ``aligned_difference`` (the fallback: an I-frame, or a codec whose decoder exports none, e.g. HEVC, VP9,
    AV1, MJPEG)."""
    valid = geometry.valid_patches(settings.patch_size)
    T = lumas.shape[0]
    has = compute = np.arange(T) > 0
    mv = "motion_vectors" in settings.signals
    others = tuple(s for s in settings.signals if s != "motion_vectors")
    fallback = np.zeros(T, bool)
    if mv:
        if motion is None or motion[0].shape != (T, *valid.shape) or motion[1].shape != (T,):
            raise ValueError(f"signals={settings.signals} include motion_vectors; expected (T, g, g) motion maps")
        if not others:
            fallback = has & ~motion[1]
            if fallback.any():
                others, compute = ("aligned_difference",), fallback
    present = {name: compute for name in others}
    maps, shifts = difference_maps(lumas, geometry, settings.patch_size, others, compute)
    for raw in maps.values():
        if valid.any():
            median = np.median(raw[:, valid], axis=1)  # (T,) over the picture's patches only
            raw[:] = np.maximum(raw - median[:, None, None], 0)
        raw[:, ~valid] = 0
    floors = {name: settings.diff_floor for name in maps}
    if mv:
        maps["motion_vectors"] = np.where(valid, motion[0], 0).astype(np.float32)  # (T, g, g)
        present["motion_vectors"], floors["motion_vectors"] = motion[1] & has, settings.mv_floor
    weights = dict(zip(settings.signals, settings.weights)) if settings.weights else None
    if weights is not None and fallback.any():
        weights["aligned_difference"] = weights["motion_vectors"]
    scores = score_volume(maps, present, floors, weights, settings.normalize)
    return scores, shifts, int(fallback.sum())


def whole_frame(t: int, g: int) -> np.ndarray:
    """``(S, 3)`` int32: every ``(t, h, w)`` of frame ``t`` in raster order."""
    h, w = np.divmod(np.arange(g * g, dtype=np.int32), g)
    return np.stack([np.full(g * g, t, np.int32), h, w], axis=1)


def middle_frame(settings: AssetSettings, T: int) -> int | None:
    """The ``t`` of the whole middle frame kept, or None (not asked, fewer than 2 mosaics or frames, or t = 0)."""
    if not (settings.keep_mid_full_frame and settings.num_images >= 2 and T >= 2):
        return None
    t = settings.mid_full_frame_index if settings.mid_full_frame_index >= 0 else T // 2
    t = max(0, min(T - 1, t))
    return t or None


def top_patches(scores: np.ndarray, frames: np.ndarray, valid: np.ndarray, k: int, static_fallback: bool) -> np.ndarray:
    """``(k', 3)`` int32 ``(t, h, w)`` of the best ``k' = min(k, len(frames)·valid.sum())`` patches of ``frames``
    (valid cells only), best first: descending score, ties by ``(t, h, w)``; with ``static_fallback`` the ones
    scoring 0 follow spread evenly over the frames and positions.

    scores: ``(T, g, g)`` float; frames: ``(F,)`` sorted t's to choose from; valid: ``(g, g)`` bool."""
    g = valid.shape[0]
    spots = np.flatnonzero(valid.reshape(-1))  # (V,)
    k = min(int(k), len(frames) * len(spots))
    if k <= 0:
        return np.zeros((0, 3), np.int32)
    cells = (frames[:, None] * g * g + spots[None, :]).reshape(-1)  # (F·V,) flat t·S + s, ascending
    flat = scores.reshape(-1)[cells]
    order = cells[np.argsort(-flat, kind="stable")]
    changed = int((flat > 0).sum())
    if changed >= k or not static_fallback:
        picked = order[:k]
    else:
        picked = np.concatenate([order[:changed], _spread(frames, spots, g * g, set(order[:changed]), k - changed)])
    t, s = np.divmod(picked, g * g)
    h, w = np.divmod(s, g)
    return np.stack([t, h, w], axis=1).astype(np.int32)


def _spread(frames: np.ndarray, spots: np.ndarray, S: int, taken: set[int], n: int) -> np.ndarray:
    """``n`` flat cells not in ``taken``, each round giving every frame one spot no other frame took in it
    (the pairing of :func:`hevc_vit.codec.signals.select_topk`'s fallback, over valid spots only)."""
    F, V = len(frames), len(spots)
    f_order, s_order = frames[spread_order(F)], spots[spread_order(V)]
    m = np.arange(F * V)
    pairs = f_order[m % F] * S + s_order[(m + m // math.lcm(F, V)) % V]  # every (frame, spot) once
    return np.array([c for c in pairs.tolist() if c not in taken][:n], np.int64)


def select_asset_positions(scores: np.ndarray, valid: np.ndarray, settings: AssetSettings) -> np.ndarray:
    """``(N·S, 3)`` int32 ``(t, h, w)`` sorted by ``(t, h, w)``: the reference's selection rules (module doc).

    scores: ``(T, g, g)`` float scores of the sampled frames; valid: ``(g, g)`` bool non-padding cells."""
    T, g, _ = scores.shape
    if valid.shape != (g, g) or g != settings.grid:
        raise ValueError(f"scores {scores.shape}, valid {valid.shape}; expected (T, {settings.grid}, {settings.grid})")
    S, target = g * g, settings.tokens
    mid = middle_frame(settings, T)
    whole = [whole_frame(0, g)] + ([whole_frame(mid, g)] if mid is not None else [])
    left = target - S * len(whole)
    rest = np.zeros((0, 3), np.int32)
    if left > 0:
        remaining = np.array([t for t in range(1, T) if t != mid], np.int64)
        if settings.mode == "global":
            rest = top_patches(scores, remaining, valid, left, settings.static_fallback)
        else:
            rest = _time_buckets(scores, remaining, valid, settings, len(whole))[:left]
    thw = np.concatenate([*whole, rest])[:target]
    if len(thw) < target:  # the reference pads with its last row to exactly N·S
        thw = np.concatenate([thw, np.repeat(thw[-1:], target - len(thw), axis=0)])
    return thw[np.lexsort((thw[:, 2], thw[:, 1], thw[:, 0]))].astype(np.int32)


def _time_buckets(
    scores: np.ndarray, remaining: np.ndarray, valid: np.ndarray, settings: AssetSettings, num_full: int
) -> np.ndarray:
    """One mosaic's worth (``S``) of top patches per contiguous bucket of ``remaining`` frames, buckets in time
    order: ``time_bucket_count`` buckets, or the mosaics left after the whole frames (at least 1, at most the
    frames left)."""
    T, g = scores.shape[0], scores.shape[1]
    count = settings.time_bucket_count if settings.time_bucket_count > 0 else settings.num_images - num_full
    count = max(1, min(count, max(1, T - num_full)))
    parts = [
        top_patches(scores, bucket, valid, g * g, settings.static_fallback)
        for bucket in np.array_split(remaining, count)
        if bucket.size
    ]
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.int32)


def visible_indices(positions: np.ndarray, grid: int) -> np.ndarray:
    """``(K,)`` int64 ``t·g² + h·g + w`` (the reference's ``visible_indices``)."""
    thw = positions.astype(np.int64)
    return thw[:, 0] * grid * grid + thw[:, 1] * grid + thw[:, 2]
