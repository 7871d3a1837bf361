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

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hevc_vit.codec.assets import AssetSettings, write_assets
from hevc_vit.codec.config import DEFAULT_RATIO, NORMALIZE, SIGNALS, CodecSparseConfig, Preprocess, Selection
from hevc_vit.codec.decode import StreamEnded, check_path, motion_vectors_of, pict_letter, probe, sampled_frames
from hevc_vit.codec.signals import (
    aligned_difference,
    global_shift,
    mv_grid,
    sample_frame_ids,
    score_volume,
    select_topk,
)
from hevc_vit.media.video import reformat_here
from hevc_vit.packing import PackingPlan, patchify
from hevc_vit.processing.processors import CLIP_MEAN, CLIP_STD


def select_patches(video: str | os.PathLike, patch_size: int, config: CodecSparseConfig | None = None) -> Selection:
    """Score and select the patches of the first video stream of ``video`` (see :class:`CodecSparseConfig`).

    The clip is decoded once from the start to its last sampled frame, one frame in memory at a time, with
    slice threading (frame threading drops motion-vector side data at random) and ``flags2=+export_mvs``.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one that is not a
    video (no video stream, e.g. audio only; unreadable; no frame decodes).
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size={patch_size!r}; expected a positive integer (the model's patch size)")
    config = config or CodecSparseConfig()
    path, total, (H, W) = probe(video, patch_size, config)
    p, h, w = patch_size, H // patch_size, W // patch_size
    try:
        frame_ids = sample_frame_ids(total, config.frames)
        maps, has_vectors, shifts, types = read_signals(path, frame_ids, (H, W), p, config.signals)
    except StreamEnded as ended:
        if ended.decoded < max(1, total - max(2, total // 20)):  # more than rounding or an edit list: damaged
            raise
        total = ended.decoded  # the stated count was slightly off: sample again over the frames that exist
        frame_ids = sample_frame_ids(total, config.frames)
        maps, has_vectors, shifts, types = read_signals(path, frame_ids, (H, W), p, config.signals)
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


def read_signals(path: str, frame_ids: np.ndarray, size: tuple[int, int], p: int, signals: tuple[str, ...]):
    """Raw signal maps name -> ``(T, h, w)``, ``has_vectors (T,)``, ``shifts (T, 2)`` and picture types."""
    (H, W), T = size, len(frame_ids)
    maps = {name: np.zeros((T, H // p, W // p), np.float32) for name in signals}
    has_vectors, shifts, types = np.zeros(T, bool), np.zeros((T, 2), np.int64), []
    prev = None
    for t, frame in sampled_frames(path, frame_ids, thread_type="SLICE", export_mvs=True):
        gray = reformat_here(frame, width=W, height=H, format="gray", interpolation="AREA")
        luma = gray.to_ndarray().astype(np.float32)
        types.append(pict_letter(frame.pict_type))
        vectors = motion_vectors_of(frame)
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
    arithmetic of :mod:`hevc_vit.processing.processors`)."""
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
    for t, frame in sampled_frames(check_path(video), selection.frame_ids.numpy(), thread_type="AUTO"):
        rows = local[starts[t] : starts[t + 1]]
        if len(rows) == 0:
            continue
        x = preprocess(reformat_here(frame, format="rgb24").to_ndarray())  # (C, H, W)
        if x.dim() != 3 or tuple(x.shape[1:]) != selection.size:
            raise ValueError(
                f"preprocess returned shape {tuple(x.shape)}; expected (C, {selection.size[0]}, "
                f"{selection.size[1]}), the selection's frame size"
            )
        patches, _ = patchify(x[None], selection.patch_size)  # (S, C·p·p)
        parts.append(patches[rows])
    return torch.cat(parts), selection.positions.clone()


def encode_selection(
    model,
    video: str | os.PathLike,
    selection: Selection,
    preprocess: Preprocess | None = None,
    t_positions: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode the selection as one packed item on ``model`` (``HEVCViTPackingModel`` or ``HEVCViTModel``):
    ``last (K, D)`` and ``pooled (1, D)`` (None without a head), RoPE at ``selection.patch_positions(t_positions)``."""
    patches, _ = gather_selected_patches(video, selection, preprocess)
    device = next(model.parameters()).device
    plan = PackingPlan.from_seqlens([selection.num_tokens], selection.patch_positions(t_positions), device=device)
    last, pooled, _ = model.encode_packed(patches.to(device), plan)
    return last, pooled


def selection_as_frames(
    patches: torch.Tensor, selection: Selection, t_positions: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept patches laid out as the reference's LLaVA pipeline feeds them to a vision tower: ``K / S``
    canvas frames ``(K/S, C, H, W)`` (``S = h·w``), filled in raster order with the patches in ``selection``
    order, and their true positions ``(1, K, 3)`` — so ``tower(frames, patch_positions=[positions])`` encodes
    the selection as one clip (a stack of ``B`` frames with ``B·h·w`` positions is one item).

    patches: ``(K, C·p·p)`` from :func:`gather_selected_patches`. Raises ``ValueError`` unless ``K`` is a whole
    number of frames (choose the budget in whole-frame equivalents, ``budget_frames``).
    """
    T, h, w = selection.grid_thw
    K, p = patches.shape[0], selection.patch_size
    if K % (h * w):
        raise ValueError(
            f"the selection keeps {K} patches, not a whole number of {h}x{w}-patch frames; expected a multiple of "
            f"{h * w} (e.g. CodecSparseConfig(budget_frames=...))"
        )
    B, C = K // (h * w), patches.shape[1] // (p * p)
    frames = patches.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)  # (B, C, H, W)
    return frames, selection.patch_positions(t_positions)[None]


def render_preview(
    video: str | os.PathLike,
    selection: Selection,
    path: str | os.PathLike,
    columns: int = 8,
    dim: float = 0.3,
    labels: bool = True,
    gap: int = 2,
) -> Path:
    """Write a PNG contact sheet of the sampled frames at the selection's size, kept patches at full
    brightness and the others dimmed to ``dim``; labels ``t``, source frame, picture type and kept count.
    The sheet is ``c·W + (c+1)·gap`` by ``r·H + (r+1)·gap`` pixels, ``c = min(columns, T)``, ``r = ceil(T/c)``."""
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns={columns!r}; expected a positive integer (frames per row of the sheet)")
    (H, W), p = selection.size, selection.patch_size
    T, h, w = selection.grid_thw
    cols = min(columns, T)
    rows = math.ceil(T / cols)
    sheet = Image.new("RGB", (cols * W + (cols + 1) * gap, rows * H + (rows + 1) * gap), (24, 24, 24))
    keep = np.zeros((T, h, w), bool)
    keep[tuple(selection.positions.numpy().T)] = True
    for t, frame in sampled_frames(check_path(video), selection.frame_ids.numpy(), thread_type="AUTO"):
        rgb = reformat_here(frame, width=W, height=H, format="rgb24").to_ndarray().astype(np.float32)  # (H, W, 3)
        shade = np.where(keep[t].repeat(p, 0).repeat(p, 1), 1.0, dim)[..., None]  # (H, W, 1)
        tile = Image.fromarray((rgb * shade).round().clip(0, 255).astype(np.uint8))
        if labels:
            text = (
                f"t={t} #{int(selection.frame_ids[t])} {selection.pict_types[t : t + 1]} {int(keep[t].sum())}/{h * w}"
            )
            draw = ImageDraw.Draw(tile)
            draw.text((3, 3), text, fill=(0, 0, 0))
            draw.text((2, 2), text, fill=(255, 255, 0))
        sheet.paste(tile, (gap + (t % cols) * (W + gap), gap + (t // cols) * (H + gap)))
    sheet.save(path, format="PNG")
    return Path(path)


__all__ = [
    "DEFAULT_RATIO",
    "AssetSettings",
    "NORMALIZE",
    "SIGNALS",
    "CodecSparseConfig",
    "Selection",
    "aligned_difference",
    "default_preprocess",
    "encode_selection",
    "gather_selected_patches",
    "global_shift",
    "mv_grid",
    "render_preview",
    "sample_frame_ids",
    "score_volume",
    "select_patches",
    "select_topk",
    "selection_as_frames",
    "write_assets",
]
