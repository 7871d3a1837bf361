"""Pure functions on frames and scores: sampling, the camera's shift, difference and motion-vector maps,
fusion and the global top-K. Testable without a video."""

from __future__ import annotations

import math

import numpy as np


def sample_frame_ids(num_frames: int, frames: int) -> np.ndarray:
    """``(T,)`` int64 ``linspace(0, N-1, T)`` floored (the reference's sampling); all ``N`` frames if ``N <= T``."""
    if num_frames < 1 or frames < 1:
        raise ValueError(f"num_frames={num_frames}, frames={frames}; expected both >= 1")
    if num_frames <= frames:
        return np.arange(num_frames, dtype=np.int64)
    return np.linspace(0, num_frames - 1, frames).astype(np.int64)


def global_shift(prev: np.ndarray, cur: np.ndarray, candidates: int = 5) -> tuple[int, int]:
    """The integer ``(dy, dx)`` with ``cur[y, x] ≈ prev[y - dy, x - dx]`` for ``(H, W)`` luma: of no shift and the
    ``candidates`` highest peaks of the phase correlation (Hann window), the shift with the lowest mean
    difference over the overlap. Checking the peaks keeps a textured moving object or a flat frame's noise
    from passing for the camera."""
    H, W = cur.shape
    window = np.outer(np.hanning(H), np.hanning(W)).astype(np.float32)
    a = np.fft.rfft2((prev - prev.mean()) * window)
    b = np.fft.rfft2((cur - cur.mean()) * window)
    cross = b * np.conj(a)
    surface = np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-9), s=(H, W)).reshape(-1)
    peaks = np.argpartition(surface, -candidates)[-candidates:]
    peaks = peaks[np.argsort(-surface[peaks], kind="stable")]
    shifts = [(0, 0)] + [
        (int(y) - H if y > H // 2 else int(y), int(x) - W if x > W // 2 else int(x))
        for y, x in zip(*np.unravel_index(peaks, (H, W)))
    ]
    costs = [_overlap_mad(prev, cur, dy, dx) for dy, dx in shifts]
    return shifts[int(np.argmin(costs))]  # the first of equals: no shift wins a tie


def _overlap(H: int, W: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of ``cur`` and of ``prev`` that ``cur[y, x] = prev[y - dy, x - dx]`` pairs up."""
    dy, dx = max(-H, min(H, dy)), max(-W, min(W, dx))
    cur = (slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0)))
    prev = (slice(max(-dy, 0), H + min(-dy, 0)), slice(max(-dx, 0), W + min(-dx, 0)))
    return cur, prev


def _overlap_mad(prev: np.ndarray, cur: np.ndarray, dy: int, dx: int) -> float:
    c, p = _overlap(*cur.shape, dy, dx)
    return float(np.abs(cur[c] - prev[p]).mean()) if cur[c].size else math.inf


def aligned_difference(prev: np.ndarray, cur: np.ndarray, shift: tuple[int, int], patch_size: int) -> np.ndarray:
    """``(h, w)`` float32 mean ``|cur - prev shifted by shift|`` per patch of ``(H, W)`` luma; pixels the shift
    exposes (no counterpart in ``prev``) count as 0."""
    H, W = cur.shape
    p = patch_size
    diff = np.zeros((H, W), np.float32)
    c, q = _overlap(H, W, *shift)
    diff[c] = np.abs(cur[c] - prev[q])
    return diff.reshape(H // p, p, W // p, p).mean(axis=(1, 3))  # (h, w)


def mv_grid(vectors: np.ndarray, frame_hw: tuple[int, int], grid_hw: tuple[int, int], patch_size: int) -> np.ndarray:
    """``(h, w)`` float32 mean motion per patch in model pixels, the camera's (median) motion removed.

    vectors: FFmpeg's ``MOTION_VECTORS`` side data as a structured array (``frame.side_data`` ->
        ``to_ndarray()``): ``w, h, dst_x, dst_y`` (block centre, coded pixels), ``motion_x, motion_y,
        motion_scale``, ``source`` (< 0 past, > 0 future reference: such vectors are negated).
    frame_hw: the coded frame's ``(height, width)``; grid_hw: ``(h, w)`` of the model grid it is resized to.
    Each patch gets ``Σ |v_b - median| · area(b ∩ patch) / area(patch)`` over blocks ``b``; a block with a
    vector to each of two references counts once (vectors averaged); the median is weighted by block area.
    """
    (Hs, Ws), (h, w) = frame_hw, grid_hw
    if len(vectors) == 0:
        return np.zeros((h, w), np.float32)
    scale = (h * patch_size / Hs, w * patch_size / Ws)
    edges = (np.linspace(0, Hs, h + 1), np.linspace(0, Ws, w + 1))
    return mv_cells(vectors, scale, edges, (Hs / h) * (Ws / w))


def mv_cells(
    vectors: np.ndarray, scale_yx: tuple[float, float], edges_yx: tuple[np.ndarray, np.ndarray], cell_area: float
) -> np.ndarray:
    """``(len(edges_y) - 1, len(edges_x) - 1)`` float32 motion energy of ``vectors`` (see :func:`mv_grid`) on any
    grid of cells laid over the coded frame: ``scale_yx`` model pixels per coded pixel (the resize), ``edges_yx``
    the cells' edges in coded pixels (a cell outside the frame has equal edges: no area, no motion) and
    ``cell_area`` a whole cell's area in coded pixels. :func:`mv_grid` is the grid that covers the frame exactly;
    :func:`hevc_vit.codec.assets.selection.motion_map` places the frame on a padded square."""
    edges_y, edges_x = edges_yx
    sign = np.where(vectors["source"] > 0, -1.0, 1.0)
    scale = np.maximum(vectors["motion_scale"].astype(np.float64), 1.0)
    vx = sign * vectors["motion_x"] / scale * scale_yx[1]  # model pixels
    vy = sign * vectors["motion_y"] / scale * scale_yx[0]
    keys = np.stack([vectors[k].astype(np.int64) for k in ("dst_x", "dst_y", "w", "h")], axis=1)
    blocks, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    vx = np.bincount(inverse, vx) / counts
    vy = np.bincount(inverse, vy) / counts
    area = (blocks[:, 2] * blocks[:, 3]).astype(np.float64)
    mag = np.hypot(vx - _weighted_median(vx, area), vy - _weighted_median(vy, area))
    ox = _overlaps(blocks[:, 0] - blocks[:, 2] / 2, blocks[:, 0] + blocks[:, 2] / 2, edges_x)  # (nb, w)
    oy = _overlaps(blocks[:, 1] - blocks[:, 3] / 2, blocks[:, 1] + blocks[:, 3] / 2, edges_y)  # (nb, h)
    grid = np.einsum("b,bh,bw->hw", mag, oy, ox) / cell_area
    return grid.astype(np.float32)


def _overlaps(lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``(nb, cells)`` length of each interval ``[lo, hi)`` inside each cell ``[edges[i], edges[i+1])``."""
    return np.clip(np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1]), 0, None)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def score_volume(
    maps: dict[str, np.ndarray],
    present: dict[str, np.ndarray],
    floors: dict[str, float],
    weights: dict[str, float] | None = None,
    normalize: str = "volume",
) -> np.ndarray:
    """Fuse raw signal volumes into one ``(T, h, w)`` float32 score.

    maps: name -> ``(T, h, w)`` raw signal; present: name -> ``(T,)`` bool, whether frame ``t`` has it;
    floors: name -> noise floor (values at or below it become 0). Each signal is normalised (``"volume"``: by
    the p95 of its positive values over the clip; ``"frame"``: by each frame's p95, at least the floor, and
    clipped to [0, 1]); frame ``t`` scores the weighted mean over the signals it has, 0 if none.
    """
    weights = weights or {name: 1.0 for name in maps}
    total = np.zeros(next(iter(maps.values())).shape, np.float64)
    norm = np.zeros(total.shape[0], np.float64)
    for name, raw in maps.items():
        has = present[name]
        x = np.where((raw > floors[name]) & has[:, None, None], raw, 0.0).astype(np.float64)
        if normalize == "frame":
            scale = np.percentile(x.reshape(len(x), -1), 95, axis=1)
            x = np.clip(x / np.maximum(scale, max(floors[name], 1e-6))[:, None, None], 0.0, 1.0)
        elif (x > 0).any():
            x = x / np.percentile(x[x > 0], 95)
        total += weights[name] * x
        norm += weights[name] * has
    return (total / np.maximum(norm, 1e-12)[:, None, None]).astype(np.float32)


def select_topk(
    scores: np.ndarray, num_tokens: int, keep_first_frame: bool = True, static_fallback: bool = True
) -> tuple[np.ndarray, int]:
    """``K = num_tokens`` positions ``(K, 3)`` int64 ``(t, h, w)`` sorted, and how many the fallback placed.

    With ``keep_first_frame`` the ``t = 0`` frame comes first (raster order), then a global top-K over the
    other frames by descending score, ties by index. Only scores > 0 count as change; when fewer are left than
    the budget, ``static_fallback`` spreads the rest evenly over the frames and the positions (each round gives
    every frame one token at a position no other frame took in that round), else they follow in index order.
    """
    if scores.ndim != 3 or num_tokens < 1:
        raise ValueError(f"scores {scores.shape}, num_tokens={num_tokens}; expected (T, h, w) scores and K >= 1")
    T, h, w = scores.shape
    S = h * w
    K = min(int(num_tokens), T * S)
    keep = np.zeros(T * S, bool)
    first = S if keep_first_frame else 0
    keep[: min(K, first)] = True
    left = K - min(K, first)
    flat = scores.reshape(-1)[first:]
    order = np.argsort(-flat, kind="stable") + first
    changed = order[: min(left, int((flat > 0).sum()))]
    keep[changed] = True
    left -= len(changed)
    spread = 0
    if left > 0 and static_fallback:
        eligible = np.arange(first // S, T)[spread_order(T - first // S)]  # (F,)
        spots = spread_order(S)
        F = len(eligible)
        n = np.arange(F * S)
        pairs = eligible[n % F] * S + spots[(n + n // math.lcm(F, S)) % S]  # every (frame, spot) once
        extra = pairs[~keep[pairs]][:left]
        keep[extra] = True
        spread, left = len(extra), left - len(extra)
    if left > 0:
        keep[order[~keep[order]][:left]] = True
    positions = np.argwhere(keep.reshape(T, h, w)).astype(np.int64)  # (K, 3), sorted by (t, h, w)
    assert len(positions) == K, (len(positions), K)
    return positions, spread


def spread_order(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` whose every prefix is spread evenly: 0, n/2, n/4, 3n/4, ... (van der Corput)."""
    bits = max(1, (n - 1).bit_length())
    k = np.arange(1 << bits)
    reversed_bits = sum(((k >> b) & 1) << (bits - 1 - b) for b in range(bits))
    order = (reversed_bits * n) >> bits
    _, first_seen = np.unique(order, return_index=True)
    return order[np.sort(first_seen)]
