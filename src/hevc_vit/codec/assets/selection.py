"""Which patches the assets keep, by the reference's rules, from our scores.

The rules of the reference's offline tool (``_compute_visible_indices_pack_topk_time_spatial``): the whole first
sampled frame (raster order) comes first; optionally one whole middle frame; the rest is one global top-K over
the remaining frames' valid (non-padding) patches (``global``), or one mosaic's worth per contiguous bucket of
frames (``time_bucket``); when too few are available the last row repeats up to exactly ``N·S`` rows; the rows
are then sorted by ``(t, h, w)``. Top-K takes descending score, ties by index; with ``static_fallback`` the
patches that did not change (score 0) are spread evenly over frames and positions rather than piling into the
earliest frames. Legend: ``T`` frames, ``g`` grid side, ``S = g²``, ``N`` mosaics.
"""

from __future__ import annotations

import math

import numpy as np

from hevc_vit.codec.assets.settings import AssetSettings
from hevc_vit.codec.signals import spread_order


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
