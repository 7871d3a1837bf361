"""What a vision tower is handed, resolved — from shapes alone — into the items it encodes.

LLaVA clients call a tower in several forms: a batch ``(B, C, H, W)`` (single images, anyres tiles and
video frames stacked on dim 0) or ``(B, C, T, H, W)``; a list of images ``(C, H, W)``, image stacks
``(n, C, H, W)`` and videos ``(C, T, H, W)``; with optional ``grid_thw`` rows ``(t, h, w)``, per-sample
``patch_positions`` and ``num_frames``. :func:`resolve_tower_input` turns any of them into a
:class:`TowerInput`: for every list element (one for a batch), which consecutive frames form one encoded
item (an image, or a clip of ``k`` frames) and the RoPE positions of its patches. Both towers encode that
description, so they cannot disagree on what a call means.

How a stack ``(B, C, H, W)`` of ``h x w``-patch frames is grouped, first rule that applies:

1. ``patch_positions`` — one entry of ``h·w`` patches: every image, with those positions; one entry of
   ``B·h·w``: the stack is one clip of ``B`` frames; several entries (one per sample): each covers
   ``k·h·w`` patches, i.e. the next ``k`` frames, one clip (``k > 1``) or image (``k = 1``).
2. ``num_frames=k``: consecutive clips of ``k`` frames (``B`` must be a multiple of ``k``).
3. ``grid_thw`` rows with ``t > 1``: those clips.
4. ``stack_as_clip=k`` (opt-in): a stack of exactly ``k`` square frames is one clip — the reference
   fork's tower does this for 8 frames unasked; here it is off unless a config says so.
5. otherwise ``B`` separate images.

Nothing here reads a device tensor on the host except the sign check of positions that are on the CPU.
Legend: ``B`` batch, ``h``/``w`` patches per side, ``M`` positions in one entry, ``D`` width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hevc_vit.packing import as_batch, as_grid_thw, check_sides, grid_positions

ImagesInput = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class Element:
    """One list element (the whole tensor for a batch) and the items it is encoded as.

    shape: the element's output shape without the feature axis — ``(B, h·w)`` for a stack, ``(B, T·h·w)``
        for a video batch, ``(h·w,)`` / ``(n, h·w)`` / ``(T·h·w,)`` for a list image / stack / video.
    h, w: patches per side.
    frames: frames per encoded item, in order (1: an image; ``k > 1``: a clip of ``k`` frames).
    positions: ``(tokens, 3)`` int64 explicit ``(t, h, w)`` RoPE positions, or None for the grid's own.
    """

    shape: tuple[int, ...]
    h: int
    w: int
    frames: tuple[int, ...]
    positions: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return sum(self.frames) * self.h * self.w

    def grid_rows(self) -> list[list[int]]:
        return [[k, self.h, self.w] for k in self.frames]


@dataclass(frozen=True)
class TowerInput:
    """A tower call resolved: ``batched`` (one tensor, else a list), the input dtype (features come back
    in it) and one :class:`Element` per list element."""

    batched: bool
    dtype: torch.dtype
    elements: tuple[Element, ...]

    @property
    def tokens(self) -> list[int]:
        """Packed tokens per element."""
        return [e.tokens for e in self.elements]

    def grid_thw(self) -> torch.Tensor:
        """``(n, 3)`` int64 on the CPU, one ``(k, h, w)`` row per encoded item."""
        return torch.tensor([row for e in self.elements for row in e.grid_rows()], dtype=torch.int64)

    def positions(self) -> torch.Tensor | None:
        """``(T, 3)`` int64 explicit positions of every packed patch, or None when no element has any."""
        if all(e.positions is None for e in self.elements):
            return None
        parts = [
            e.positions if e.positions is not None else grid_positions(torch.tensor(e.grid_rows()))
            for e in self.elements
        ]
        device = next(e.positions.device for e in self.elements if e.positions is not None)
        return torch.cat([p.to(device, torch.int64) for p in parts])

    def spatial_dims(self) -> tuple[int, int] | tuple[list[int], list[int]]:
        """``(h, w)`` shared by every element, else ``([h_0, ...], [w_0, ...])`` per element."""
        sizes = [(e.h, e.w) for e in self.elements]
        if len(set(sizes)) == 1:
            return sizes[0]
        return [h for h, _ in sizes], [w for _, w in sizes]


def resolve_tower_input(
    images: ImagesInput,
    *,
    num_channels: int,
    patch_size: int,
    grid_thw: Any = None,
    patch_positions: Any = None,
    num_frames: int | None = None,
    stack_as_clip: int = 0,
) -> TowerInput:
    """Validate a tower call and resolve it (see the module docstring); ``ValueError`` names what is wrong."""
    raw = _raw_elements(images, num_channels, patch_size)
    entries = _position_entries(patch_positions)
    per_element = _distribute(entries, len(raw), isinstance(images, torch.Tensor))
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames={num_frames!r}; expected a positive int (frames per clip) or None")
    grid = as_grid_thw(grid_thw) if grid_thw is not None else None
    grid_frames = [int(t) for t in grid[:, 0]] if grid is not None and bool((grid[:, 0] > 1).any()) else None
    batched = isinstance(images, torch.Tensor)
    elements = [
        _resolve_element(
            kind, batch, what, own, patch_size, num_frames, grid_frames if batched else None, stack_as_clip, batched
        )
        for (kind, batch, what), own in zip(raw, per_element)
    ]
    resolved = TowerInput(batched, _dtype(images), tuple(elements))
    if grid is not None:
        _check_grid(grid, resolved)
    return resolved


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def _raw_elements(images: ImagesInput, C: int, p: int) -> list[tuple[str, torch.Tensor, str]]:
    """``(kind, batch, what)`` per element: kind ``stack`` (``(n, C, H, W)``), ``video`` (``(B, C, T, H, W)``)
    or ``image``; raises ``ValueError`` for anything else."""
    if isinstance(images, torch.Tensor):
        shape = tuple(images.shape)
        if images.dim() not in (4, 5) or shape[1] != C:
            raise ValueError(
                f"images has shape {shape}; expected a batch of images (B, {C}, H, W) or of videos "
                f"(B, {C}, T, H, W), or a list of images ({C}, H, W), image stacks (n, {C}, H, W) "
                f"and videos ({C}, T, H, W)"
            )
        if 0 in shape[:-2]:
            raise ValueError(
                f"images has shape {shape}; expected at least one image (and one frame per video) — a rank "
                f"without images calls dummy_forward()"
            )
        what = f"images {shape}"
        _check_pixels(images, what)
        check_sides(what, shape[-2], shape[-1], p)
        return [("stack" if images.dim() == 4 else "video", images, what)]
    if not isinstance(images, (list, tuple)):
        raise ValueError(
            f"images is a {type(images).__name__}; expected a tensor (B, {C}, H, W) / (B, {C}, T, H, W) "
            f"or a list of tensors"
        )
    if len(images) == 0:
        raise ValueError(
            f"images is an empty list; expected at least one image ({C}, H, W), image stack (n, {C}, H, W) "
            f"or video ({C}, T, H, W) (a rank without images calls dummy_forward())"
        )
    out = []
    for i, item in enumerate(images):
        batch = as_batch(item, C, f"item {i}")  # (n, C, H, W) or (1, C, T, H, W)
        what = f"item {i} {tuple(item.shape)}"
        _check_pixels(item, what)
        first = images[0]
        if item.dtype != first.dtype:
            raise ValueError(f"{what} has dtype {item.dtype}; item 0 has {first.dtype}, expected one dtype")
        if item.device != first.device:
            raise ValueError(
                f"{what} is on {item.device}; item 0 is on {first.device}, expected every item on one device"
            )
        check_sides(what, batch.shape[-2], batch.shape[-1], p)
        kind = "video" if batch.dim() == 5 else ("image" if item.dim() == 3 else "stack")
        out.append((kind, batch, what))
    return out


def _check_pixels(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} has dtype {x.dtype}; expected processed floating-point pixels")


def _dtype(images: ImagesInput) -> torch.dtype:
    return images.dtype if isinstance(images, torch.Tensor) else images[0].dtype


# --------------------------------------------------------------------------------------------------
# patch_positions
# --------------------------------------------------------------------------------------------------


def _position_entries(patch_positions: Any) -> list[torch.Tensor] | None:
    """``patch_positions`` as a list of ``(M, 3)`` int64 tensors (None: no positions).

    Accepted: None; a per-sample list / tuple of ``(1, M, 3)`` or ``(M, 3)`` tensors (``[None]`` or all None:
    no positions); a tensor ``(M, 3)`` (one entry) or ``(S, M, 3)`` (``S`` entries).
    """
    if patch_positions is None:
        return None
    if isinstance(patch_positions, torch.Tensor):
        if patch_positions.dim() == 3:
            return [_check_entry(e, f"patch_positions[{i}]") for i, e in enumerate(patch_positions)]
        return [_check_entry(patch_positions, "patch_positions")]
    if not isinstance(patch_positions, (list, tuple)):
        raise ValueError(
            f"patch_positions is a {type(patch_positions).__name__}; expected None, a tensor (M, 3) or a "
            f"per-sample list of (1, M, 3) / (M, 3) integer tensors"
        )
    present = [e is not None for e in patch_positions]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(
            f"patch_positions has None at {[i for i, ok in enumerate(present) if not ok]} and tensors elsewhere; "
            f"expected positions for every sample or for none"
        )
    return [_check_entry(e, f"patch_positions[{i}]") for i, e in enumerate(patch_positions)]


def _check_entry(entry: Any, what: str) -> torch.Tensor:
    if not isinstance(entry, torch.Tensor):
        raise ValueError(f"{what} is a {type(entry).__name__}; expected an integer tensor (1, M, 3) or (M, 3)")
    shape = tuple(entry.shape)
    if entry.dim() == 3 and shape[0] == 1:
        entry = entry[0]
    if entry.dim() != 2 or entry.shape[1] != 3 or entry.shape[0] == 0:
        raise ValueError(f"{what} has shape {shape}; expected (1, M, 3) or (M, 3) with M >= 1, one (t, h, w) per patch")
    if entry.is_floating_point() or entry.is_complex() or entry.dtype == torch.bool:
        raise ValueError(f"{what} has dtype {entry.dtype}; expected integer (t, h, w) positions (e.g. int64)")
    if entry.device.type == "cpu":  # on a device the check would stall it; the CPU check is free
        low = int(entry.min())
        if low < 0:
            raise ValueError(f"{what} holds {low}; expected non-negative (t, h, w) positions")
    return entry


def _distribute(entries: list[torch.Tensor] | None, n: int, batched: bool) -> list[list[torch.Tensor] | None]:
    """Position entries per element: a batch takes them all; a list takes one entry per element (or one
    entry shared by every element)."""
    if entries is None:
        return [None] * n
    if batched:
        return [entries]
    if len(entries) == n:
        return [[e] for e in entries]
    if len(entries) == 1:
        return [entries] * n
    raise ValueError(
        f"patch_positions has {len(entries)} entries for a list of {n} elements; expected one entry per "
        f"element, or one shared by all"
    )


# --------------------------------------------------------------------------------------------------
# grouping frames into items
# --------------------------------------------------------------------------------------------------


def _resolve_element(
    kind: str,
    batch: torch.Tensor,
    what: str,
    entries: list[torch.Tensor] | None,
    p: int,
    num_frames: int | None,
    grid_frames: list[int] | None,
    stack_as_clip: int,
    batched: bool,
) -> Element:
    h, w = batch.shape[-2] // p, batch.shape[-1] // p
    hw = h * w
    B = batch.shape[0]
    if kind == "video":  # B videos of T frames: each one item
        T = batch.shape[2]
        if num_frames is not None and num_frames != T:
            raise ValueError(f"num_frames={num_frames}, but {what} holds videos of {T} frames")
        positions = _per_unit_positions(entries, B, T * hw, what, "video")
        shape = (B, T * hw) if batched else (T * hw,)
        return Element(shape, h, w, (T,) * B, positions)
    shape = (B, hw) if kind == "stack" else (hw,)
    if entries is not None:
        frames, positions = _frames_from_positions(entries, B, hw, h, w, what)
        if num_frames is not None and any(k != num_frames for k in frames):
            raise ValueError(
                f"num_frames={num_frames}, but patch_positions group {what} into items of {list(frames)} frames"
            )
        return Element(shape, h, w, frames, positions)
    if num_frames is not None:
        if B % num_frames:
            raise ValueError(f"num_frames={num_frames}; {what} has {B} frames, expected a multiple of {num_frames}")
        return Element(shape, h, w, (num_frames,) * (B // num_frames), None)
    if grid_frames is not None:
        return Element(shape, h, w, tuple(grid_frames), None)  # checked against the frames by _check_grid
    if stack_as_clip and kind == "stack" and B == stack_as_clip and h == w:
        return Element(shape, h, w, (B,), None)
    return Element(shape, h, w, (1,) * B, None)


def _frames_from_positions(
    entries: list[torch.Tensor], B: int, hw: int, h: int, w: int, what: str
) -> tuple[tuple[int, ...], torch.Tensor]:
    Ms = [int(e.shape[0]) for e in entries]
    if len(entries) == 1 and Ms[0] == hw:  # per image: the same positions for every image
        return (1,) * B, entries[0].expand(B, hw, 3).reshape(B * hw, 3)
    if len(entries) == 1 and Ms[0] == B * hw:  # the whole stack is one clip
        return (B,), entries[0]
    if len(entries) > 1 and all(M % hw == 0 for M in Ms) and sum(Ms) == B * hw:  # per sample, in order
        return tuple(M // hw for M in Ms), torch.cat(entries)
    raise ValueError(
        f"patch_positions cover {Ms} patches for {what} of {B} frames of {h}x{w} patches; expected one entry "
        f"of h·w = {hw} (the same positions for every image) or of B·h·w = {B * hw} (the stack is one clip), "
        f"or one entry per sample of k·{hw} patches adding up to {B * hw}"
    )


def _per_unit_positions(
    entries: list[torch.Tensor] | None, B: int, N: int, what: str, unit: str
) -> torch.Tensor | None:
    if entries is None:
        return None
    Ms = [int(e.shape[0]) for e in entries]
    if len(entries) == 1 and Ms[0] == N:
        return entries[0].expand(B, N, 3).reshape(B * N, 3)
    if all(M == N for M in Ms) and len(Ms) == B or Ms == [B * N]:  # one entry per unit, or all in one
        return torch.cat(entries)
    raise ValueError(
        f"patch_positions cover {Ms} patches for {what}; expected {N} per {unit} ({B} {unit}s: one entry of "
        f"{N}, {B} entries of {N}, or one of {B * N})"
    )


def _check_grid(grid: torch.Tensor, resolved: TowerInput) -> None:
    """``grid_thw`` must describe the frames the pixels hold, in order, and group them as resolved."""
    given = [(int(h), int(w)) for t, h, w in grid.tolist() for _ in range(int(t))]
    frames = [(e.h, e.w) for e in resolved.elements for _ in range(sum(e.frames))]
    rows = [row for e in resolved.elements for row in e.grid_rows()]
    grouped = bool((grid[:, 0] > 1).any())
    if given != frames or (grouped and grid.tolist() != rows):
        shown = grid.tolist() if len(grid) <= 8 else grid.tolist()[:8] + ["..."]
        raise ValueError(
            f"grid_thw {shown} ({len(given)} frames) disagrees with the pixels: expected rows (t, h, w) "
            f"describing {len(frames)} frames: {rows if len(rows) <= 8 else rows[:8] + ['...']}"
        )
