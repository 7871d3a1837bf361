"""Packing maths as pure functions: pixels -> patches + grid_thw, the PackingPlan, and unpacking.

Legend: ``T`` packed tokens, ``n`` items (images/videos), ``B`` batch, ``D`` width, ``p`` patch,
``C`` channels. A flattened patch is channel-first ``(C, p, p)`` — the layout of the patch-embedding
Conv2d weight — and patches are ordered frame-major, then row-major (t, then h, then w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch

GridLike = torch.Tensor | Sequence[Sequence[int]]

# the most tokens one packed sequence may hold: cu_seqlens, what varlen kernels take, are int32
MAX_TOKENS = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# pixels -> patches
# --------------------------------------------------------------------------------------------------


def check_sides(what: str, height: int, width: int, patch_size: int) -> None:
    """Raise ``ValueError`` naming ``what``, its size and the nearest valid size unless both sides are
    positive multiples of ``patch_size``."""
    if height % patch_size or width % patch_size or height == 0 or width == 0:
        p = patch_size
        near_h, near_w = max(height // p, 1) * p, max(width // p, 1) * p
        raise ValueError(
            f"{what} is {height}x{width}; both sides must be positive multiples of patch_size={p} "
            f"(nearest: {near_h}x{near_w})"
        )


def check_pixels(what: str, pixels: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``what`` unless it is a floating-point tensor: integer (e.g. uint8 images
    not yet normalised), boolean and complex tensors are refused. Meta tensors pass: cutting them into
    patches is shape arithmetic; a model refuses them unless it is on the meta device too."""
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"{what} is a {type(pixels).__name__}; expected a floating-point torch.Tensor")
    if not pixels.is_floating_point():
        hint = ""
        if not pixels.is_complex() and pixels.dtype != torch.bool:
            hint = "; integer pixels need .float(), rescaling and normalising, as the processor does"
        raise ValueError(
            f"{what} has dtype {pixels.dtype}; expected a floating-point tensor (float32, bfloat16, float16 or "
            f"float64){hint}"
        )


def patchify(pixel_values: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch of images or videos of one size into packed patches.

    pixel_values: ``(B, C, H, W)`` images or ``(B, C, T, H, W)`` videos; ``H`` and ``W`` multiples of ``p``.
    Returns ``patches (B·T·h·w, C·p·p)`` in the input dtype and ``grid_thw (B, 3)`` int64 on the CPU,
    ``(T, H/p, W/p)`` per item (``T = 1`` for images). One vectorised reshape, no loop over items.
    Raises ``ValueError`` for pixels that are not a floating-point tensor, or an empty batch.
    """
    check_pixels("pixel_values", pixel_values)
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() == 4:
        pixel_values = pixel_values.unsqueeze(2)  # (B, C, 1, H, W)
    if pixel_values.dim() != 5:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, C, H, W) images "
            f"or (B, C, T, H, W) videos"
        )
    B, C, T, H, W = pixel_values.shape
    if B == 0 or C == 0 or T == 0:
        raise ValueError(
            f"pixel_values has shape {shape}; expected at least one item (B >= 1) with channels and frames "
            f"(C >= 1, T >= 1)"
        )
    check_sides("pixel_values", H, W, patch_size)
    p, h, w = patch_size, H // patch_size, W // patch_size
    x = pixel_values.reshape(B, C, T, h, p, w, p)
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # (B, T, h, w, C, p, p)
    patches = x.reshape(B * T * h * w, C * p * p)  # (T_tot, C·p·p)
    grid_thw = torch.tensor([[T, h, w]], dtype=torch.int64).expand(B, 3).clone()
    return patches, grid_thw


def patchify_items(
    items: Sequence[torch.Tensor], patch_size: int, num_channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a list of items of any sizes into one sequence.

    Each item is an image ``(C, H, W)``, a stack of images ``(n, C, H, W)`` (each image its own item) or
    a video ``(C, T, H, W)``. A 4-D item whose second axis is ``C`` is read as an image stack (the
    LLaVA convention for frames), otherwise as a video when its first axis is ``C``.
    Returns ``patches (T_tot, C·p·p)`` and ``grid_thw (n, 3)`` int64 on the CPU; runs of items with one
    shape are cut in one vectorised call. Raises ``ValueError`` naming the first item that is not a
    floating-point tensor of one of those shapes.
    """
    batches = [as_batch(item, num_channels, f"item {i}") for i, item in enumerate(items)]
    for i, item in enumerate(items):
        check_pixels(f"item {i} {tuple(item.shape)}", item)
    if not batches:
        raise ValueError("items is empty; expected at least one image or video")
    for i, batch in enumerate(batches):
        if batch.device != batches[0].device:
            raise ValueError(
                f"item {i} {tuple(items[i].shape)} is on {batch.device}; item 0 is on {batches[0].device}, "
                f"expected every item on one device"
            )
        H, W = batch.shape[-2:]
        check_sides(f"item {i} {tuple(items[i].shape)}", H, W, patch_size)
    patches, grids = [], []
    run = [batches[0]]
    for batch in batches[1:] + [None]:
        if batch is not None and batch.shape[1:] == run[-1].shape[1:]:
            run.append(batch)
            continue
        chunk = torch.cat(run) if len(run) > 1 else run[0]
        p, g = patchify(chunk, patch_size)
        patches.append(p)
        grids.append(g)
        run = [batch]
    return torch.cat(patches) if len(patches) > 1 else patches[0], torch.cat(grids)


def as_batch(item: torch.Tensor, num_channels: int, what: str = "item") -> torch.Tensor:
    """One item as a batch: image ``(C,H,W)`` -> ``(1,C,H,W)``; stack ``(n,C,H,W)`` as is;
    video ``(C,T,H,W)`` -> ``(1,C,T,H,W)``. Raises ``ValueError`` naming ``what`` otherwise."""
    C = num_channels
    expected = f"an image ({C}, H, W), an image stack (n, {C}, H, W) or a video ({C}, T, H, W)"
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"{what} is a {type(item).__name__}; expected a torch.Tensor: {expected}")
    shape = tuple(item.shape)
    if item.dim() == 3 and shape[0] == C:
        return item.unsqueeze(0)  # (1, C, H, W)
    if item.dim() == 4 and shape[1] == C and shape[0] > 0:
        return item  # (n, C, H, W)
    if item.dim() == 4 and shape[0] == C and shape[1] > 0:
        return item.unsqueeze(0)  # (1, C, T, H, W)
    raise ValueError(f"{what} has shape {shape}; expected {expected}")


def split_sizes(grid_thw: torch.Tensor) -> list[int]:
    """Tokens per item, ``t·h·w``, as Python ints (``grid_thw`` on the CPU)."""
    return grid_thw.prod(-1).tolist()


# --------------------------------------------------------------------------------------------------
# grid_thw validation and positions
# --------------------------------------------------------------------------------------------------


def as_grid_thw(grid_thw: GridLike) -> torch.Tensor:
    """Validate ``grid_thw`` and return it as an int64 CPU tensor of shape ``(n, 3)``.

    A device tensor is copied to the host once, here: this is the only place a plan may sync. Every entry
    must be a positive integer, and the patches of all items together (``t·h·w`` summed, computed exactly)
    at most ``MAX_TOKENS``: a row like ``(1, 2**20, 2**20)`` is refused before anything is allocated.
    """
    if isinstance(grid_thw, torch.Tensor):
        if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
            raise ValueError(f"grid_thw has dtype {grid_thw.dtype}; expected an integer tensor")
        if grid_thw.is_meta:
            raise ValueError("grid_thw is on the meta device (a shape without values); expected (n, 3) integers")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise ValueError(f"grid_thw has shape {tuple(grid_thw.shape)}; expected (n, 3) with n >= 1, rows (t, h, w)")
        rows = grid_thw.detach().cpu().tolist()  # exact Python ints, whatever the integer dtype
    else:
        try:
            rows = [list(row) for row in grid_thw]
        except TypeError:
            raise ValueError(
                f"grid_thw is a {type(grid_thw).__name__}; expected an (n, 3) integer tensor or a list of (t, h, w)"
            ) from None
        for i, row in enumerate(rows):
            for v in row:
                if (
                    isinstance(v, bool)
                    or not isinstance(v, Integral)
                    and not (
                        isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and not v.is_meta
                    )
                ):
                    raise ValueError(f"grid_thw row {i} is {row}; expected integers (t, h, w)")
        if not rows:
            raise ValueError("grid_thw is empty; expected at least one (t, h, w) row")
        rows = [[int(v) for v in row] for row in rows]
        if any(len(row) != 3 for row in rows):
            lengths = sorted({len(row) for row in rows})
            shape = (len(rows), lengths[0]) if len(lengths) == 1 else f"({len(rows)}, {lengths})"
            raise ValueError(f"grid_thw has shape {shape}; expected (n, 3) with n >= 1, rows (t, h, w)")
    total = 0
    for i, (t, h, w) in enumerate(rows):
        if min(t, h, w) <= 0:
            raise ValueError(f"grid_thw row {i} is {[t, h, w]}; every entry must be a positive integer")
        total += t * h * w
        if total > MAX_TOKENS:
            raise ValueError(
                f"grid_thw row {i} is {[t, h, w]} ({t * h * w:,} patches); the items up to it hold {total:,} "
                f"patches, expected at most {MAX_TOKENS:,} in one packed sequence (cu_seqlens are int32)"
            )
    return torch.tensor(rows, dtype=torch.int64)


def grid_positions(grid_thw: torch.Tensor) -> torch.Tensor:
    """Default ``(t, h, w)`` position of every patch, ``(T_tot, 3)`` int64 on the CPU.

    Frames are numbered ``0..t-1``, rows ``0..h-1``, columns ``0..w-1``, in packing order.
    """
    parts = []
    for t, h, w in grid_thw.tolist():
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([tt, hh, ww], dim=-1).reshape(t * h * w, 3))  # (t·h·w, 3)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PackingPlan:
    """Everything the layers need to know about a packed sequence, built once per forward on the host.

    Attributes:
        seqlens: tokens per item, Python ints.
        cu_seqlens: ``(n + 1,)`` int32 on the device — cumulative token offsets (varlen kernels).
        max_seqlen: longest item, a Python int.
        positions: ``(T_tot, 3)`` int64 on the device — the ``(t, h, w)`` RoPE position of every token.
        grid_thw: ``(n, 3)`` int64 on the CPU, or None when items are not full grids (sparse input).
    """

    seqlens: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor
    grid_thw: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_grid_thw(
        cls,
        grid_thw: GridLike,
        device: torch.device | str | None = None,
        patch_positions: torch.Tensor | None = None,
        num_tokens: int | None = None,
    ) -> PackingPlan:
        """Plan for items given as full ``(t, h, w)`` patch grids.

        grid_thw: ``(n, 3)`` — CPU tensor, device tensor (copied to the host once) or list of triples.
        patch_positions: optional ``(T_tot, 3)`` explicit ``(t, h, w)`` per patch, overriding the grid's.
        num_tokens: the rows of the packed patches (``hidden_states``) the grid must describe; checked
            before the positions are built.
        """
        grid = as_grid_thw(grid_thw)
        seqlens = split_sizes(grid)
        if num_tokens is not None and sum(seqlens) != num_tokens:
            raise ValueError(
                f"grid_thw describes {sum(seqlens)} patches (sum of t·h·w over {len(seqlens)} items); "
                f"hidden_states has {num_tokens}"
            )
        positions = grid_positions(grid) if patch_positions is None else patch_positions
        return cls.from_seqlens(seqlens, positions, device=device, grid_thw=grid)

    @classmethod
    def from_seqlens(
        cls,
        seqlens: Sequence[int],
        positions: torch.Tensor,
        device: torch.device | str | None = None,
        grid_thw: torch.Tensor | None = None,
    ) -> PackingPlan:
        """Plan for items of the given token counts with explicit ``(T_tot, 3)`` positions."""
        seqlens = tuple(int(s) for s in seqlens)
        if not seqlens or min(seqlens) <= 0:
            raise ValueError(f"seqlens={list(seqlens)}; expected at least one item, each with >= 1 token")
        total = sum(seqlens)
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape != (total, 3):
            shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise ValueError(f"patch_positions has shape {shape}; expected ({total}, 3), one (t, h, w) per patch")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"patch_positions has dtype {positions.dtype}; expected an integer tensor")
        device = torch.device(device) if device is not None else positions.device
        cu = torch.tensor((0,) + tuple(_cumsum(seqlens)), dtype=torch.int32)
        return cls(
            seqlens=seqlens,
            cu_seqlens=cu.to(device, non_blocking=True),
            max_seqlen=max(seqlens),
            positions=positions.to(device, torch.int64, non_blocking=True),
            grid_thw=grid_thw,
        )

    @property
    def num_items(self) -> int:
        return len(self.seqlens)

    @property
    def total_tokens(self) -> int:
        return sum(self.seqlens)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def segment_ids(self) -> torch.Tensor:
        """``(T_tot,)`` int64 on the device: the item index of every token (built once, on the host)."""
        if "segment_ids" not in self._cache:
            ids = torch.repeat_interleave(torch.arange(self.num_items), torch.tensor(self.seqlens))
            self._cache["segment_ids"] = ids.to(self.device, non_blocking=True)
        return self._cache["segment_ids"]

    @property
    def length_groups(self) -> list[tuple[int, int, slice | torch.Tensor]]:
        """Items grouped by token count, for batched attention over equal lengths.

        Returns ``[(length, count, tokens)]`` where ``tokens`` selects the group's tokens in packed
        order, item after item: a ``slice`` when they are contiguous, else an int64 index on the device.
        """
        if "length_groups" not in self._cache:
            starts: dict[int, list[int]] = {}
            offset = 0
            for length in self.seqlens:
                starts.setdefault(length, []).append(offset)
                offset += length
            groups: list[tuple[int, int, slice | torch.Tensor]] = []
            for length, firsts in starts.items():
                count = len(firsts)
                if firsts[-1] - firsts[0] == (count - 1) * length:  # back to back
                    tokens: slice | torch.Tensor = slice(firsts[0], firsts[0] + count * length)
                else:
                    index = (torch.tensor(firsts)[:, None] + torch.arange(length)).reshape(-1)
                    tokens = index.to(self.device, non_blocking=True)
                groups.append((length, count, tokens))
            self._cache["length_groups"] = groups
        return self._cache["length_groups"]

    def to(self, device: torch.device | str) -> PackingPlan:
        """The same plan with its device tensors on ``device``."""
        return PackingPlan(
            seqlens=self.seqlens,
            cu_seqlens=self.cu_seqlens.to(device),
            max_seqlen=self.max_seqlen,
            positions=self.positions.to(device),
            grid_thw=self.grid_thw,
        )


def _cumsum(values: Sequence[int]) -> list[int]:
    out, running = [], 0
    for v in values:
        running += v
        out.append(running)
    return out


# --------------------------------------------------------------------------------------------------
# packed -> per item
# --------------------------------------------------------------------------------------------------


def unpack(x: torch.Tensor, plan: PackingPlan | Sequence[int]) -> list[torch.Tensor]:
    """Split a packed ``(T_tot, ...)`` tensor into one ``(N_i, ...)`` view per item."""
    sizes = list(plan.seqlens) if isinstance(plan, PackingPlan) else [int(s) for s in plan]
    if x.shape[0] != sum(sizes):
        raise ValueError(f"x has {x.shape[0]} tokens; the plan's items hold {sum(sizes)}")
    return list(torch.split(x, sizes, dim=0))


def unpack_batch(x: torch.Tensor, plan: PackingPlan | Sequence[int]) -> torch.Tensor:
    """Reshape a packed ``(T_tot, D)`` tensor of ``B`` equal-length items to ``(B, N, D)`` (a view)."""
    sizes = list(plan.seqlens) if isinstance(plan, PackingPlan) else [int(s) for s in plan]
    if len(set(sizes)) != 1:
        raise ValueError(f"items have token counts {sizes}; a (B, N, D) batch needs equal counts, use unpack()")
    return x.view(len(sizes), sizes[0], *x.shape[1:])  # (B, N, D)


def unpack_per_item(x: torch.Tensor, plan: PackingPlan | Sequence[int]) -> torch.Tensor:
    """A packed ``(T_tot, D)`` tensor as one entry per item, ``x[i]`` being item ``i``'s ``(N_i, D)``: a dense
    ``(n, N, D)`` view when every item holds ``N`` tokens, else a jagged nested tensor ``(n, j, D)``."""
    sizes = list(plan.seqlens) if isinstance(plan, PackingPlan) else [int(s) for s in plan]
    if len(set(sizes)) == 1:
        return unpack_batch(x, sizes)  # (n, N, D)
    return torch.nested.as_nested_tensor(unpack(x, sizes), layout=torch.jagged)  # (n, j, D)
