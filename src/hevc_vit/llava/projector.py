"""Projectors from the vision tower to the LLM (LLaVA-NeXT ``mm_projector``), aware of packed sequences.

Legend: ``T`` packed tokens, ``n`` items (images/videos), ``B`` batch, ``N`` tokens of one item, ``D`` vision
width, ``L`` LLM width, ``m`` merge size. An item's tokens are frame-major, then row-major (t, h, w), as the
towers return them.

Every projector's forward takes each form a tower produces, and the packed form:
  * ``(B, N, D)`` with optional ``height=`` / ``width=`` ints (``N = t·h·w``) -> ``(B, N', L)``;
  * ``(T, D)`` with ``grid_thw (n, 3)`` -> ``(T', L)`` — one gather and one MLP call, no loop over items;
  * a list of ``(N_i, D)`` / ``(n_i, N_i, D)`` with ``height=`` / ``width=`` ints or per-element lists -> a list,
    packed, projected in one forward and split again.
Module names follow the reference LLaVA fork (``ln_q``, ``mlp.0``, ``mlp.2``; ``0``, ``2``, ... for
``mlp{k}x_gelu``; ``weight`` / ``bias`` for ``linear``), so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hevc_vit.packing import GridLike, as_grid_thw, split_sizes

Features = torch.Tensor | list[torch.Tensor]
Side = int | Sequence[int] | None
PROJECTOR_TYPES = ("linear", "identity", "patch_merger", "spatial_merge", "mlp{k}x_gelu (k >= 1)")


# --------------------------------------------------------------------------------------------------
# pure index maths (on the CPU, from grid_thw)
# --------------------------------------------------------------------------------------------------


def _check_sides(height: int, width: int, merge: int, what: str) -> None:
    if height % merge or width % merge:
        need = "both even" if merge == 2 else f"both multiples of {merge}"
        raise ValueError(f"{what} has h x w = {height} x {width} patches; spatial_merge needs {need}")


def _check_mergeable(grid: torch.Tensor, merge: int) -> None:
    bad = (grid[:, 1] % merge != 0) | (grid[:, 2] % merge != 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        _check_sides(int(grid[i, 1]), int(grid[i, 2]), merge, f"item {i}")


def merged_grid_thw(grid_thw: GridLike, merge: int = 2) -> torch.Tensor:
    """The grid after an ``m x m`` spatial merge: ``(n, 3)`` int64 on the CPU, rows ``(t, h/m, w/m)``.

    Raises ``ValueError`` naming the item when its ``h`` or ``w`` is not a multiple of ``merge``.
    """
    grid = as_grid_thw(grid_thw)
    _check_mergeable(grid, merge)
    return grid // torch.tensor([1, merge, merge])


def spatial_merge_index(grid_thw: GridLike, merge: int = 2) -> torch.Tensor:
    """Gather index that brings the tokens of every ``m x m`` block of every frame next to each other.

    grid_thw: ``(n, 3)`` — ``(t, h, w)`` in patches per item, ``h`` and ``w`` multiples of ``merge``.
    Returns ``(T,)`` int64 on the CPU such that ``x.index_select(0, index).view(T // m², m²·D)`` has one row
    per merged token — items, then frames, then merged rows, then merged columns — each row the block's
    tokens in ``(dy, dx)`` row-major order. Vectorised over items.
    """
    grid = as_grid_thw(grid_thw)
    t, h, w = grid.unbind(-1)  # (n,) each
    out = merged_grid_thw(grid, merge)  # (n, 3)
    frame_out = out[:, 1] * out[:, 2]  # merged tokens per frame, (n,)
    sizes_in, sizes_out = t * h * w, t * frame_out  # (n,)
    item = torch.repeat_interleave(torch.arange(len(grid)), sizes_out)  # item of every merged token, (T',)
    local = torch.arange(int(sizes_out.sum())) - (sizes_out.cumsum(0) - sizes_out)[item]  # (T',)
    frame, cell = local // frame_out[item], local % frame_out[item]
    row, col = cell // out[item, 2], cell % out[item, 2]
    width = w[item]  # (T',)
    corner = (sizes_in.cumsum(0) - sizes_in)[item] + frame * (h * w)[item] + row * merge * width + col * merge
    d = torch.arange(merge)
    block = d[None, :, None] * width[:, None, None] + d[None, None, :]  # (T', m, m): dy·w + dx
    return (corner[:, None, None] + block).reshape(-1)  # (T,)


# --------------------------------------------------------------------------------------------------
# input forms -> packed tokens + grid_thw -> the caller's form
# --------------------------------------------------------------------------------------------------


def _side(value: Any, name: str) -> int | None:
    if value is None:
        return None
    try:
        side = operator.index(value)
    except TypeError:
        side = 0
    if isinstance(value, bool) or side <= 0:
        raise ValueError(f"{name}={value!r}; expected a positive int (patches)")
    return side


def _sides(value: Side, count: int, name: str) -> list[int | None]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries; expected one per feature tensor, {count}")
        return [_side(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return [_side(value, name)] * count


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


class Projector(nn.Module):
    """What every projector shares: reading the input forms, validating them, restoring the output form.

    Subclasses define ``_project(x (T, D), grid (n, 3)) -> (T', L)``; those that group tokens also
    ``_item_grid`` (an item's ``(t, h, w)`` from its token count), ``_check_grid`` and ``_tokens_out``.
    """

    in_features: int | None = None  # D; the input width is checked against it

    def forward(
        self,
        x: Features,
        grid_thw: GridLike | None = None,
        *,
        height: Side = None,
        width: Side = None,
    ) -> Features:
        """Project tower features; see the module docstring for the forms. Returns the input's form."""
        if isinstance(x, (list, tuple)):
            if grid_thw is not None:
                raise ValueError("grid_thw was given with a list of features; pass one packed (T, D) tensor")
            return self._forward_list(x, height, width)
        self._check_features(x, f"x {_shape(x)}", "(B, N, D) batched or (T, D) packed features")
        if grid_thw is not None:
            if x.dim() != 2:
                raise ValueError(f"x has shape {_shape(x)} with grid_thw; expected packed features (T, D)")
            grid = as_grid_thw(grid_thw)
            total = int(grid.prod(-1).sum())
            if total != x.shape[0]:
                raise ValueError(f"grid_thw holds {total} tokens (sum of t·h·w); x has {x.shape[0]}, expected equal")
            self._check_grid(grid)
            return self._project(x, grid)
        row = self._grid_row(x.shape[-2], _side(height, "height"), _side(width, "width"), f"x {_shape(x)}")
        if x.dim() == 2:  # one item
            return self._project(x, torch.tensor([row]))  # (N', L)
        B, N, D = x.shape
        out = self._project(x.reshape(B * N, D), torch.tensor([row] * B))  # (B·N', L)
        return out.view(B, -1, out.shape[-1])  # (B, N', L)

    def _forward_list(self, items: Sequence[torch.Tensor], height: Side, width: Side) -> list[torch.Tensor]:
        if len(items) == 0:
            raise ValueError("x is an empty list; expected at least one (N, D) or (n, N, D) tensor")
        heights, widths = _sides(height, len(items), "height"), _sides(width, len(items), "width")
        rows, counts = [], []
        for i, item in enumerate(items):
            what = f"item {i} {_shape(item)}"
            self._check_features(item, what, "(N, D) or (n, N, D) features")
            count = item.shape[0] if item.dim() == 3 else 1
            if count == 0:
                raise ValueError(f"{what} holds no images; expected (n, N, D) with n >= 1")
            rows += [self._grid_row(item.shape[-2], heights[i], widths[i], what)] * count
            counts.append(count)
        packed = torch.cat([item.reshape(-1, item.shape[-1]) for item in items])  # (T, D)
        grid = torch.tensor(rows)  # (n, 3)
        out = self._project(packed, grid)  # (T', L)
        per_row, sizes, first = self._tokens_out(grid), [], 0
        for count in counts:
            sizes.append(sum(per_row[first : first + count]))
            first += count
        parts = torch.split(out, sizes)  # per element: (n_i·N_i', L)
        return [part.view(*item.shape[:-2], -1, part.shape[-1]) for part, item in zip(parts, items)]

    def _check_features(self, x: Any, what: str, expected: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ValueError(f"{what}; expected {expected}")
        if self.in_features is not None and x.shape[-1] != self.in_features:
            raise ValueError(f"{what} has width {x.shape[-1]}; expected mm_hidden_size={self.in_features}")

    def _grid_row(self, tokens: int, height: int | None, width: int | None, what: str) -> tuple[int, int, int]:
        if tokens <= 0:
            raise ValueError(f"{what} has {tokens} tokens; expected at least one")
        if (height is None) != (width is None):
            raise ValueError(f"{what}: height={height}, width={width}; pass both or neither")
        return self._item_grid(tokens, height, width, what)

    # hooks for the projectors that group tokens; the per-token ones keep these defaults
    def _item_grid(self, tokens: int, height: int | None, width: int | None, what: str) -> tuple[int, int, int]:
        return (1, 1, tokens)

    def _check_grid(self, grid: torch.Tensor) -> None:
        pass

    def _tokens_out(self, grid: torch.Tensor) -> list[int]:
        return split_sizes(grid)

    _project: Any  # every subclass: (x (T, D), grid (n, 3)) -> (T', L)


class _MergeProjector(Projector):
    """``ln_q`` LayerNorm(D), a merge of ``m²`` tokens into one of width ``m²·D``, then the ``mlp``."""

    def __init__(self, vision_dim: int, llm_dim: int, merge: int = 2):
        super().__init__()
        self.in_features, self.merge = vision_dim, merge
        hidden = vision_dim * merge**2
        self.ln_q = nn.LayerNorm(vision_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))


class SpatialMergeProjector(_MergeProjector):
    """``spatial_merge``: every ``m x m`` block of every frame becomes one token, ``(t, h, w) -> (t, h/m, w/m)``.

    Without ``height`` / ``width`` an item of ``N`` tokens must be a square ``sqrt(N) x sqrt(N)`` grid.
    """

    def _item_grid(self, tokens: int, height: int | None, width: int | None, what: str) -> tuple[int, int, int]:
        if height is None or width is None:
            height = width = math.isqrt(tokens)
            if height * height != tokens:
                raise ValueError(f"{what} has {tokens} tokens, not a square number; pass height= and width= (patches)")
        t, rest = divmod(tokens, height * width)
        if rest:
            raise ValueError(f"{what} has {tokens} tokens; expected a multiple of height x width = {height} x {width}")
        _check_sides(height, width, self.merge, what)
        return (t, height, width)

    def _check_grid(self, grid: torch.Tensor) -> None:
        _check_mergeable(grid, self.merge)

    def _tokens_out(self, grid: torch.Tensor) -> list[int]:
        return split_sizes(merged_grid_thw(grid, self.merge))

    def _project(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        index = spatial_merge_index(grid, self.merge).to(x.device, non_blocking=True)  # (T,)
        x = self.ln_q(x).index_select(0, index)  # (T, D), the m² tokens of each block back to back
        return self.mlp(x.view(-1, self.merge**2 * x.shape[-1]))  # (T/m², m²·D) -> (T/m², L)


class PatchMergerProjector(_MergeProjector):
    """``patch_merger`` (the fork's PatchMerger): every ``m²`` consecutive tokens of an item become one token."""

    def _item_grid(self, tokens: int, height: int | None, width: int | None, what: str) -> tuple[int, int, int]:
        if tokens % self.merge**2:
            raise ValueError(
                f"{what} has {tokens} tokens; patch_merger groups {self.merge**2} consecutive tokens, "
                f"expected a multiple of {self.merge**2}"
            )
        return (1, 1, tokens)

    def _check_grid(self, grid: torch.Tensor) -> None:
        bad = (grid.prod(-1) % self.merge**2 != 0).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            self._item_grid(int(grid[i].prod()), None, None, f"item {i} (t, h, w) = {tuple(grid[i].tolist())}")

    def _tokens_out(self, grid: torch.Tensor) -> list[int]:
        return [tokens // self.merge**2 for tokens in split_sizes(grid)]

    def _project(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        # items hold multiples of m² tokens, so packed groups never straddle two items
        return self.mlp(self.ln_q(x).view(-1, self.merge**2 * x.shape[-1]))  # (T/m², m²·D) -> (T/m², L)


class MLPProjector(Projector, nn.Sequential):
    """``mlp{k}x_gelu``: ``Linear(D, L)``, then ``k - 1`` times ``GELU, Linear(L, L)``; per token."""

    def __init__(self, vision_dim: int, llm_dim: int, depth: int = 2):
        layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
        super().__init__(*layers)
        self.in_features = vision_dim

    def _project(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, x)  # (T, L)


class LinearProjector(Projector, nn.Linear):
    """``linear``: ``Linear(D, L)`` per token, with the fork's parameter names ``weight`` and ``bias``."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__(vision_dim, llm_dim)

    def _project(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x)  # (T, L)


class IdentityProjector(Projector):
    """``identity``: returns its input as it is, in any form."""

    def forward(self, x: Features, *args: Any, **kwargs: Any) -> Features:
        return x


# --------------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------------


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


# widths far above any real model (the tower's hidden_size bound), an MLP depth and a parameter count that no
# projector comes near: a nonsense config is refused before anything is allocated
MAX_WIDTH, MAX_DEPTH, MAX_PROJECTOR_PARAMETERS = 65536, 64, 10**9


def count_projector_parameters(kind: str, vision_dim: int, llm_dim: int, depth: int = 2, merge: int = 2) -> int:
    """Weights of the projector ``kind`` (``"mlp"`` for ``mlp{depth}x_gelu``), computed without building it."""
    D, L = vision_dim, llm_dim
    if kind in ("spatial_merge", "patch_merger"):
        H = D * merge**2
        return 2 * D + H * H + H + H * L + L
    return D * L + L + (depth - 1) * (L * L + L) if kind == "mlp" else D * L + L


def build_projector(config: Any) -> nn.Module:
    """The projector named by ``config.mm_projector_type`` (default ``"linear"``).

    config: attributes or a dict with ``mm_projector_type``, ``mm_hidden_size`` (``D``, the tower's width)
        and ``hidden_size`` (``L``, the LLM's width). Raises ``ValueError`` for an unknown type, a width outside
        ``[1, MAX_WIDTH]``, an MLP deeper than ``MAX_DEPTH`` or more than ``MAX_PROJECTOR_PARAMETERS`` weights.
    """
    kind = _config_value(config, "mm_projector_type") or "linear"
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind) if isinstance(kind, str) else None
    if kind not in PROJECTOR_TYPES[:4] and not (depth and 1 <= int(depth.group(1)) <= MAX_DEPTH):
        raise ValueError(
            f"mm_projector_type={kind!r}; expected one of {', '.join(PROJECTOR_TYPES)} (k in [1, {MAX_DEPTH}])"
        )
    if kind == "identity":
        return IdentityProjector()
    dims = []
    for name in ("mm_hidden_size", "hidden_size"):
        value = _config_value(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WIDTH:
            raise ValueError(f"{name}={value!r}; the {kind} projector needs an int in [1, {MAX_WIDTH:,}]")
        dims.append(value)
    vision_dim, llm_dim = dims
    n = count_projector_parameters("mlp" if depth else kind, vision_dim, llm_dim, int(depth.group(1)) if depth else 2)
    if n > MAX_PROJECTOR_PARAMETERS:
        raise ValueError(
            f"mm_projector_type={kind!r} with mm_hidden_size={vision_dim}, hidden_size={llm_dim} has {n:,} weights; "
            f"expected at most {MAX_PROJECTOR_PARAMETERS:,}"
        )
    if kind == "linear":
        return LinearProjector(vision_dim, llm_dim)
    if kind == "patch_merger":
        return PatchMergerProjector(vision_dim, llm_dim)
    if kind == "spatial_merge":
        return SpatialMergeProjector(vision_dim, llm_dim)
    return MLPProjector(vision_dim, llm_dim, depth=int(depth.group(1)))
