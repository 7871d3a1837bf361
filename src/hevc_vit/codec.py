"""Codec-aligned sparse video input: keep the K patches of a clip that change, encode only those.

``select_patches`` scores every patch of ``T`` sampled frames on the model's patch grid and keeps a global
top-K, the scheme of the reference's codec pipelines (OneVision-Encoder ``llava_next/.../stage1.py``). Its
inputs are the signals stock FFmpeg gives, per sampled frame ``t`` against the previous sampled frame:

    aligned_difference  mean ``|Y_t - shift(Y_{t-1}, g_t)|`` over the patch, luma at the model's frame size,
                        ``g_t`` the camera's translation found by phase correlation. The default: it works for
                        every codec (stock FFmpeg exports no HEVC, AV1 or VP9 motion vectors) and scored best.
    difference          the same without the shift: fails on a panning camera, kept as a control.
    motion_vectors      mean ``|v - median v|`` over the patch, from the vectors the decoder exports (H.264,
                        MPEG-2/4); I-frames and codecs without vectors use the other signals alone.

A difference map has its frame's median patch value subtracted (codec noise, a re-quantised I-frame or
flicker lift every patch of a frame alike); values at or below a noise floor count as unchanged. The kept
patches are gathered by decoding the sampled frames again, one at a time (``gather_selected_patches``), and
encoded as one packed item with explicit positions (``encode_selection``); ``render_preview`` draws them.

Legend: ``T`` sampled frames, ``h``/``w`` grid sides in patches, ``S = h·w``, ``K`` kept patches, ``p`` patch
size, ``H``/``W`` frame size in pixels.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .packing import PackingPlan, check_sides, patchify
from .processing import CLIP_MEAN, CLIP_STD
from .video import INSTALL_HINT

SIGNALS = ("aligned_difference", "difference", "motion_vectors")
NORMALIZE = ("volume", "frame")
DEFAULT_RATIO = 0.125  # 8 of 64 frames: the reference's K = 8 whole-frame equivalents
_PICT_TYPES = {1: "I", 2: "P", 3: "B", 4: "S", 5: "i", 6: "p", 7: "b"}  # AVPictureType -> letter

Preprocess = Callable[[np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class CodecSparseConfig:
    """Every setting of the selection, validated here.

    frames: ``T``, frames sampled at ``linspace(0, N-1, T)`` (first and last included, as the reference); a
        clip of ``N < T`` frames uses all ``N`` (then ``T = N``, as ``Selection.frame_ids`` shows).
    budget: ``K``, the patches kept: an ``int`` is a token count, a ``float`` in (0, 1] a fraction of the ``T·S``
        dense patches. ``None`` with ``budget_frames=None``: ``0.125``. ``K >= T·S`` keeps every patch.
    budget_frames: ``K`` in whole-frame equivalents, ``round(budget_frames·S)`` (the reference's 8); not with
        ``budget``.
    keep_first_frame: keep the whole ``t = 0`` frame (raster order; its first ``K`` patches if ``K < S``), then
        a global top-K over ``t >= 1``. False: top-K over all frames, ``t = 0`` scoring 0 (no previous frame).
    signals: the scores fused, from ``SIGNALS``; ``weights`` one per signal (default equal).
    normalize: ``"volume"`` divides each signal by the p95 of its positive values over the clip; ``"frame"``
        by each frame's own p95, clipped to [0, 1] (the reference's fusion).
    static_fallback: when fewer patches change than the budget has left, spread the rest evenly over frames and
        positions; False takes them in index order (ties pile into the earliest frames, as the reference).
    diff_floor / mv_floor: a patch whose difference (luma levels, 0..255, after its frame's median is
        subtracted) or motion (model pixels) is at most this counts as unchanged: codec noise.
    size: ``(H, W)`` frame size in pixels, multiples of the patch size; None: the video's, rounded down to
        them and, with ``max_tokens_per_frame``, shrunk (aspect kept) until ``S <= max_tokens_per_frame``.
    """

    frames: int = 64
    budget: int | float | None = None
    budget_frames: float | None = None
    keep_first_frame: bool = True
    signals: tuple[str, ...] = ("aligned_difference",)
    weights: tuple[float, ...] | None = None
    normalize: str = "volume"
    static_fallback: bool = True
    diff_floor: float = 2.0
    mv_floor: float = 0.5
    size: tuple[int, int] | None = None
    max_tokens_per_frame: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames={self.frames!r}; expected a positive integer")
        if self.budget is not None and self.budget_frames is not None:
            raise ValueError(f"budget={self.budget!r} and budget_frames={self.budget_frames!r}; give one of them")
        b = self.budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"budget={b!r}; expected a token count (int >= 1) or a fraction in (0, 1]")
        if isinstance(b, float) and not b <= 1.0:
            raise ValueError(f"budget={b!r}; a float is a fraction of the dense patches, in (0, 1]; "
                             f"for a token count pass an int")
        f = self.budget_frames
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0):
            raise ValueError(f"budget_frames={f!r}; expected a positive number of whole-frame equivalents")
        object.__setattr__(self, "signals", tuple(self.signals))
        unknown = [s for s in self.signals if s not in SIGNALS]
        if not self.signals or unknown or len(set(self.signals)) != len(self.signals):
            raise ValueError(f"signals={self.signals}; expected distinct names from {SIGNALS}")
        if self.weights is not None and (len(self.weights) != len(self.signals) or min(self.weights) < 0):
            raise ValueError(f"weights={self.weights}; expected {len(self.signals)} non-negative numbers, "
                             f"one per signal {self.signals}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r}; expected one of {NORMALIZE}")
        if not self.diff_floor >= 0 or not self.mv_floor >= 0:
            raise ValueError(f"diff_floor={self.diff_floor}, mv_floor={self.mv_floor}; expected numbers >= 0")
        m = self.max_tokens_per_frame
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_tokens_per_frame={m!r}; expected a positive integer or None")

    @classmethod
    def reference(cls, **overrides) -> "CodecSparseConfig":
        """The reference's fusion: motion vectors + difference at equal weights, per-frame p95, 8 frames' worth,
        the first frame whole; its codec residual, which stock FFmpeg does not give, is replaced by the aligned
        difference."""
        values = dict(signals=("motion_vectors", "aligned_difference"), normalize="frame", budget_frames=8)
        return cls(**{**values, **overrides})

    def num_tokens(self, num_frames: int, frame_tokens: int) -> int:
        """``K`` for ``T = num_frames`` frames of ``S = frame_tokens`` patches, at most ``T·S``."""
        dense = num_frames * frame_tokens
        if self.budget_frames is not None:
            k = round(self.budget_frames * frame_tokens)
        elif isinstance(self.budget, int):
            k = self.budget
        else:
            k = round((DEFAULT_RATIO if self.budget is None else self.budget) * dense)
        return int(min(max(k, 1), dense))


@dataclass
class Selection:
    """The kept patches of one clip.

    positions: ``(K, 3)`` int64 ``(t, h, w)``, ``t`` the index among the sampled frames, sorted by (t, h, w).
    frame_ids: ``(T,)`` int64 source frame number of each ``t``. scores: ``(T, h, w)`` float32 fused scores.
    shifts: ``(T, 2)`` int64 ``(dy, dx)`` camera shift from ``t-1`` to ``t`` (0 without alignment).
    frame_signals: per ``t``, the signals its score used (``()`` for ``t = 0``). pict_types: ``"IPB..."``.
    has_vectors: ``(T,)`` bool, whether the decoder exported motion vectors for the frame.
    spread_tokens: tokens placed by the static fallback (0: every kept patch scored above the noise floor).
    size: ``(H, W)`` frame size in pixels; total_frames: frames in the clip.
    """

    positions: torch.Tensor
    frame_ids: torch.Tensor
    scores: torch.Tensor
    shifts: torch.Tensor
    frame_signals: tuple[tuple[str, ...], ...]
    pict_types: str
    has_vectors: torch.Tensor
    spread_tokens: int
    size: tuple[int, int]
    patch_size: int
    total_frames: int

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """The dense ``(T, h, w)`` grid the positions index."""
        return tuple(self.scores.shape)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def indices(self) -> torch.Tensor:
        """``(K,)`` int64 ``t·S + h·w_grid + w``: ``HEVCViTModel``'s ``visible_indices`` into the dense grid."""
        _, h, w = self.grid_thw
        t, hh, ww = self.positions.unbind(1)
        return t * (h * w) + hh * w + ww

    def patch_positions(self, t_positions: Sequence[int] | None = None) -> torch.Tensor:
        """``(K, 3)`` RoPE positions: ``positions`` with ``t`` replaced by ``t_positions[t]`` when given
        (e.g. ``hevc_vit.video.temporal_positions(T, 64)``)."""
        positions = self.positions.clone()
        if t_positions is not None:
            if len(t_positions) != self.grid_thw[0]:
                raise ValueError(
                    f"t_positions has {len(t_positions)} entries; the selection has {self.grid_thw[0]} frames"
                )
            positions[:, 0] = torch.as_tensor(list(t_positions), dtype=torch.int64)[positions[:, 0]]
        return positions

    def summary(self) -> dict:
        """What an index row records: token counts, frames, signals, fallbacks (JSON-ready)."""
        T, h, w = self.grid_thw
        return dict(tokens=self.num_tokens, dense_tokens=T * h * w, frames=T, total_frames=self.total_frames,
                    size=list(self.size), pict_types=self.pict_types, frames_with_vectors=int(self.has_vectors.sum()),
                    signals=sorted({s for used in self.frame_signals for s in used}), spread_tokens=self.spread_tokens)


# --------------------------------------------------------------------------------------------------
# pure functions: sampling, signals, fusion, top-K
# --------------------------------------------------------------------------------------------------


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
    shifts = [(0, 0)] + [(int(y) - H if y > H // 2 else int(y), int(x) - W if x > W // 2 else int(x))
                         for y, x in zip(*np.unravel_index(peaks, (H, W)))]
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
    sign = np.where(vectors["source"] > 0, -1.0, 1.0)
    scale = np.maximum(vectors["motion_scale"].astype(np.float64), 1.0)
    vx = sign * vectors["motion_x"] / scale * (w * patch_size / Ws)  # model pixels
    vy = sign * vectors["motion_y"] / scale * (h * patch_size / Hs)
    keys = np.stack([vectors[k].astype(np.int64) for k in ("dst_x", "dst_y", "w", "h")], axis=1)
    blocks, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    vx = np.bincount(inverse, vx) / counts
    vy = np.bincount(inverse, vy) / counts
    area = (blocks[:, 2] * blocks[:, 3]).astype(np.float64)
    mag = np.hypot(vx - _weighted_median(vx, area), vy - _weighted_median(vy, area))
    ox = _overlaps(blocks[:, 0] - blocks[:, 2] / 2, blocks[:, 0] + blocks[:, 2] / 2, Ws, w)  # (nb, w)
    oy = _overlaps(blocks[:, 1] - blocks[:, 3] / 2, blocks[:, 1] + blocks[:, 3] / 2, Hs, h)  # (nb, h)
    grid = np.einsum("b,bh,bw->hw", mag, oy, ox) / ((Hs / h) * (Ws / w))
    return grid.astype(np.float32)


def _overlaps(lo: np.ndarray, hi: np.ndarray, extent: int, cells: int) -> np.ndarray:
    """``(nb, cells)`` length of each interval ``[lo, hi)`` inside each of ``cells`` equal cells of ``[0, extent)``."""
    edges = np.linspace(0, extent, cells + 1)
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
        eligible = np.arange(first // S, T)[_spread_order(T - first // S)]  # (F,)
        spots = _spread_order(S)
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


def _spread_order(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` whose every prefix is spread evenly: 0, n/2, n/4, 3n/4, ... (van der Corput)."""
    bits = max(1, (n - 1).bit_length())
    k = np.arange(1 << bits)
    reversed_bits = sum(((k >> b) & 1) << (bits - 1 - b) for b in range(bits))
    order = (reversed_bits * n) >> bits
    _, first_seen = np.unique(order, return_index=True)
    return order[np.sort(first_seen)]


# --------------------------------------------------------------------------------------------------
# the video path
# --------------------------------------------------------------------------------------------------


def select_patches(video: str | os.PathLike, patch_size: int, config: CodecSparseConfig | None = None) -> Selection:
    """Score and select the patches of the first video stream of ``video`` (see :class:`CodecSparseConfig`).

    The clip is decoded once from the start to its last sampled frame, one frame in memory at a time, with
    slice threading (frame threading drops motion-vector side data at random) and ``flags2=+export_mvs``.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that is not a
    video (no video stream, e.g. audio only; unreadable; no frame decodes).
    """
    config = config or CodecSparseConfig()
    path, total, (H, W) = _probe(video, patch_size, config)
    p, h, w = patch_size, H // patch_size, W // patch_size
    try:
        frame_ids = sample_frame_ids(total, config.frames)
        maps, has_vectors, shifts, types = _read_signals(path, frame_ids, (H, W), p, config.signals)
    except _StreamEnded as ended:
        if ended.decoded < max(1, total - max(2, total // 20)):  # more than rounding or an edit list: damaged
            raise
        total = ended.decoded  # the stated count was slightly off: sample again over the frames that exist
        frame_ids = sample_frame_ids(total, config.frames)
        maps, has_vectors, shifts, types = _read_signals(path, frame_ids, (H, W), p, config.signals)
    T = len(frame_ids)
    for name in ("aligned_difference", "difference"):
        if name in maps:  # codec noise, a re-quantised I-frame or flicker lift every patch of a frame alike
            maps[name] = np.maximum(maps[name] - np.median(maps[name], axis=(1, 2), keepdims=True), 0)
    has_diff = np.arange(T) > 0
    present = {name: has_vectors if name == "motion_vectors" else has_diff for name in maps}
    floors = {name: config.mv_floor if name == "motion_vectors" else config.diff_floor for name in maps}
    weights = dict(zip(config.signals, config.weights)) if config.weights else None
    scores = score_volume(maps, present, floors, weights, config.normalize)
    K = config.num_tokens(T, h * w)
    positions, spread = select_topk(scores, K, config.keep_first_frame, config.static_fallback)
    return Selection(
        positions=torch.from_numpy(positions),
        frame_ids=torch.from_numpy(frame_ids),
        scores=torch.from_numpy(scores),
        shifts=torch.from_numpy(shifts),
        frame_signals=tuple(tuple(s for s in config.signals if present[s][t]) for t in range(T)),
        pict_types=types,
        has_vectors=torch.from_numpy(has_vectors),
        spread_tokens=spread,
        size=(H, W),
        patch_size=p,
        total_frames=total,
    )


def _read_signals(path: str, frame_ids: np.ndarray, size: tuple[int, int], p: int, signals: tuple[str, ...]):
    """Raw signal maps name -> ``(T, h, w)``, ``has_vectors (T,)``, ``shifts (T, 2)`` and picture types."""
    (H, W), T = size, len(frame_ids)
    maps = {name: np.zeros((T, H // p, W // p), np.float32) for name in signals}
    has_vectors, shifts, types = np.zeros(T, bool), np.zeros((T, 2), np.int64), []
    prev = None
    for t, frame in _sampled_frames(path, frame_ids, thread_type="SLICE", export_mvs=True):
        luma = frame.reformat(width=W, height=H, format="gray", interpolation="AREA").to_ndarray().astype(np.float32)
        types.append(_pict_letter(frame.pict_type))
        vectors = _motion_vectors(frame)
        has_vectors[t] = vectors is not None
        if vectors is not None and "motion_vectors" in maps:
            maps["motion_vectors"][t] = mv_grid(vectors, (frame.height, frame.width), (H // p, W // p), p)
        if prev is not None:
            if "aligned_difference" in maps:
                shifts[t] = global_shift(prev, luma)
                maps["aligned_difference"][t] = aligned_difference(prev, luma, tuple(shifts[t]), p)
            if "difference" in maps:
                maps["difference"][t] = aligned_difference(prev, luma, (0, 0), p)
        prev = luma
    return maps, has_vectors, shifts, "".join(types)


def default_preprocess(
    size: tuple[int, int], mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Preprocess:
    """``rgb (H0, W0, 3) uint8 -> (3, H, W) float32``: bicubic resize to ``size``, rescale, normalise (the
    arithmetic of :mod:`hevc_vit.processing`)."""
    H, W = size
    mean32, std32 = np.array(mean, np.float32), np.array(std, np.float32)

    def preprocess(rgb: np.ndarray) -> torch.Tensor:
        pixels = np.asarray(Image.fromarray(rgb).resize((W, H), Image.Resampling.BICUBIC))  # (H, W, 3)
        x = (pixels.astype(np.float64) / 255.0).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(((x - mean32) / std32).transpose(2, 0, 1)))  # (3, H, W)

    return preprocess


def gather_selected_patches(
    video: str | os.PathLike, selection: Selection, preprocess: Preprocess | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected patches ``(K, C·p·p)`` (the preprocess's dtype) and their positions ``(K, 3)`` int64.

    The sampled frames are decoded again one at a time; a frame with kept patches goes through
    ``preprocess(rgb (H0, W0, 3) uint8) -> (C, H, W)`` (default: :func:`default_preprocess` at the selection's
    size), is cut into patches and only its kept ones are held. Rows follow ``selection.positions``.
    """
    preprocess = preprocess or default_preprocess(selection.size)
    T, _, w = selection.grid_thw
    t_of, local = selection.positions[:, 0], selection.positions[:, 1] * w + selection.positions[:, 2]
    starts = torch.searchsorted(t_of, torch.arange(T + 1))  # rows of frame t: starts[t]:starts[t+1]
    parts = []
    for t, frame in _sampled_frames(_check_path(video), selection.frame_ids.numpy(), thread_type="AUTO"):
        rows = local[starts[t]: starts[t + 1]]
        if len(rows) == 0:
            continue
        x = preprocess(frame.to_ndarray(format="rgb24"))  # (C, H, W)
        if x.dim() != 3 or tuple(x.shape[1:]) != selection.size:
            raise ValueError(f"preprocess returned shape {tuple(x.shape)}; expected (C, {selection.size[0]}, "
                             f"{selection.size[1]}), the selection's frame size")
        patches, _ = patchify(x[None], selection.patch_size)  # (S, C·p·p)
        parts.append(patches[rows])
    return torch.cat(parts), selection.positions.clone()


def encode_selection(
    model, video: str | os.PathLike, selection: Selection, preprocess: Preprocess | None = None,
    t_positions: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode the selection as one packed item on ``model`` (``HEVCViTPackingModel`` or ``HEVCViTModel``):
    ``last (K, D)`` and ``pooled (1, D)`` (None without a head), RoPE at ``selection.patch_positions(t_positions)``."""
    patches, _ = gather_selected_patches(video, selection, preprocess)
    device = next(model.parameters()).device
    plan = PackingPlan.from_seqlens([selection.num_tokens], selection.patch_positions(t_positions), device=device)
    last, pooled, _ = model.encode_packed(patches.to(device), plan)
    return last, pooled


def render_preview(
    video: str | os.PathLike, selection: Selection, path: str | os.PathLike, columns: int = 8,
    dim: float = 0.3, labels: bool = True, gap: int = 2,
) -> Path:
    """Write a PNG contact sheet of the sampled frames at the selection's size, kept patches at full
    brightness and the others dimmed to ``dim``; labels ``t``, source frame, picture type and kept count.
    The sheet is ``c·W + (c+1)·gap`` by ``r·H + (r+1)·gap`` pixels, ``c = min(columns, T)``, ``r = ceil(T/c)``."""
    (H, W), p = selection.size, selection.patch_size
    T, h, w = selection.grid_thw
    cols = max(1, min(columns, T))
    rows = math.ceil(T / cols)
    sheet = Image.new("RGB", (cols * W + (cols + 1) * gap, rows * H + (rows + 1) * gap), (24, 24, 24))
    keep = np.zeros((T, h, w), bool)
    keep[tuple(selection.positions.numpy().T)] = True
    for t, frame in _sampled_frames(_check_path(video), selection.frame_ids.numpy(), thread_type="AUTO"):
        rgb = frame.reformat(width=W, height=H, format="rgb24").to_ndarray().astype(np.float32)  # (H, W, 3)
        shade = np.where(keep[t].repeat(p, 0).repeat(p, 1), 1.0, dim)[..., None]  # (H, W, 1)
        tile = Image.fromarray((rgb * shade).round().clip(0, 255).astype(np.uint8))
        if labels:
            text = f"t={t} #{int(selection.frame_ids[t])} {selection.pict_types[t:t + 1]} {int(keep[t].sum())}/{h * w}"
            draw = ImageDraw.Draw(tile)
            draw.text((3, 3), text, fill=(0, 0, 0))
            draw.text((2, 2), text, fill=(255, 255, 0))
        sheet.paste(tile, (gap + (t % cols) * (W + gap), gap + (t // cols) * (H + gap)))
    sheet.save(path, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# decoding helpers
# --------------------------------------------------------------------------------------------------


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


def _check_path(video: str | os.PathLike) -> str:
    path = os.fspath(video)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path} does not exist")
    return path


def _open(path: str):
    av = _import_av()
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


def _probe(video: str | os.PathLike, patch_size: int, config: CodecSparseConfig) -> tuple[str, int, tuple[int, int]]:
    """The path, the frame count (stated, else packets counted) and the model frame size ``(H, W)``."""
    path = _check_path(video)
    with _open(path) as container:
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
    if cap is not None and h * w > cap:
        factor = math.sqrt(cap / (h * w))
        h, w = max(1, int(h * factor)), max(1, int(w * factor))
    return path, total, (h * patch_size, w * patch_size)


def _sampled_frames(path: str, frame_ids: np.ndarray, thread_type: str, export_mvs: bool = False):
    """Yield ``(t, frame)`` for each sampled frame, decoding from the start and stopping after the last.

    A stream that ends before the last sampled frame (its stated count was off) raises ``ValueError``."""
    wanted = {int(f): t for t, f in enumerate(frame_ids)}
    last, decoded = int(frame_ids[-1]), 0
    with _open(path) as container:
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
    raise _StreamEnded(path, decoded, last)


class _StreamEnded(ValueError):
    def __init__(self, path: str, decoded: int, last: int):
        super().__init__(f"video {path} decoded {decoded} frames, fewer than its stream states (sampled frame "
                         f"{last} is missing): it may be truncated or damaged")
        self.decoded = decoded


def _motion_vectors(frame) -> np.ndarray | None:
    """The frame's exported motion vectors as a structured array, None when it carries none."""
    try:
        side = frame.side_data.get("MOTION_VECTORS")
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    vectors = side.to_ndarray() if side is not None else None
    return vectors if vectors is not None and len(vectors) else None


def _pict_letter(pict_type) -> str:
    """``frame.pict_type`` (an int in PyAV >= 14, an enum before) as FFmpeg's letter, ``?`` if unknown."""
    try:
        return _PICT_TYPES.get(int(pict_type), "?")
    except (TypeError, ValueError):
        name = getattr(pict_type, "name", "")
        return name if name in _PICT_TYPES.values() else "?"


# --------------------------------------------------------------------------------------------------
# command line: hevc-vit codec-preview
# --------------------------------------------------------------------------------------------------


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "codec-preview",
        help="draw the patches codec-aligned selection keeps, as a contact sheet",
        description="Select the changing patches of VIDEO (see hevc_vit.codec) and draw the sampled frames as a "
        "PNG contact sheet, kept patches bright and the others dimmed. Prints the selection summary as JSON.",
    )
    p.add_argument("video", help="a video file")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--patch-size", type=int, default=16, help="the model's patch size (default: 16)")
    p.add_argument("--frames", type=int, default=64, help="frames sampled over the clip (default: 64)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of the dense patches kept (default: 0.125)")
    budget.add_argument("--tokens", type=int, help="number of patches kept")
    budget.add_argument("--budget-frames", type=float, help="patches kept, in whole-frame equivalents")
    p.add_argument("--signals", default="aligned_difference", help=f"comma-separated, from {', '.join(SIGNALS)}")
    p.add_argument("--normalize", choices=NORMALIZE, default="volume", help="signal normalisation (default: volume)")
    p.add_argument("--no-keep-first-frame", action="store_true", help="do not keep the first frame whole")
    p.add_argument("--size", help="frame size HxW in pixels, multiples of the patch size (default: the video's)")
    p.add_argument("--max-tokens-per-frame", type=int, help="shrink the default frame size to this many patches")
    p.add_argument("--columns", type=int, default=8, help="frames per row of the sheet (default: 8)")
    p.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    try:
        size = None
        if args.size:
            try:
                size = tuple(int(v) for v in args.size.lower().split("x"))
            except ValueError:
                size = ()
            if len(size) != 2:
                raise ValueError(f"--size {args.size!r}; expected HxW, e.g. 224x224")
        budget = args.tokens if args.tokens is not None else args.ratio
        config = CodecSparseConfig(
            frames=args.frames, budget=budget, budget_frames=args.budget_frames,
            keep_first_frame=not args.no_keep_first_frame, signals=tuple(args.signals.split(",")),
            normalize=args.normalize, size=size, max_tokens_per_frame=args.max_tokens_per_frame,
        )
        selection = select_patches(args.video, args.patch_size, config)
        render_preview(args.video, selection, args.output, columns=args.columns)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"hevc-vit codec-preview: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"preview": str(args.output), **selection.summary()}))
    return 0
