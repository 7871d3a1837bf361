"""What to select (:class:`CodecSparseConfig`) and what was selected (:class:`Selection`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SIGNALS = ("aligned_difference", "difference", "motion_vectors")
NORMALIZE = ("volume", "frame")
DEFAULT_RATIO = 0.125  # 8 of 64 frames: the reference's K = 8 whole-frame equivalents

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
        them and, with ``max_tokens_per_frame``, shrunk to at most that many patches, each side within one
        patch of the aspect ratio (the native processor's rule, :func:`hevc_vit.processing.pixels.native_grid_size`).
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
            raise ValueError(
                f"budget={b!r}; a float is a fraction of the dense patches, in (0, 1]; for a token count pass an int"
            )
        f = self.budget_frames
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0):
            raise ValueError(f"budget_frames={f!r}; expected a positive number of whole-frame equivalents")
        object.__setattr__(self, "signals", tuple(self.signals))
        unknown = [s for s in self.signals if s not in SIGNALS]
        if not self.signals or unknown or len(set(self.signals)) != len(self.signals):
            raise ValueError(f"signals={self.signals}; expected distinct names from {SIGNALS}")
        if self.weights is not None and (len(self.weights) != len(self.signals) or min(self.weights) < 0):
            raise ValueError(
                f"weights={self.weights}; expected {len(self.signals)} non-negative numbers, "
                f"one per signal {self.signals}"
            )
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r}; expected one of {NORMALIZE}")
        if not self.diff_floor >= 0 or not self.mv_floor >= 0:
            raise ValueError(f"diff_floor={self.diff_floor}, mv_floor={self.mv_floor}; expected numbers >= 0")
        m = self.max_tokens_per_frame
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_tokens_per_frame={m!r}; expected a positive integer or None")

    @classmethod
    def reference(cls, **overrides) -> CodecSparseConfig:
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
        (e.g. ``hevc_vit.media.video.temporal_positions(T, 64)``)."""
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
        return dict(
            tokens=self.num_tokens,
            dense_tokens=T * h * w,
            frames=T,
            total_frames=self.total_frames,
            size=list(self.size),
            pict_types=self.pict_types,
            frames_with_vectors=int(self.has_vectors.sum()),
            signals=sorted({s for used in self.frame_signals for s in used}),
            spread_tokens=self.spread_tokens,
        )
