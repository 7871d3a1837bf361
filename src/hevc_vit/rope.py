"""3D rotary position embedding over (t, h, w), as the trained HEVC ViT weights expect it.

``head_dim / 2`` frequencies are split t:h:w = 4:6:6 (in units of ``u = head_dim // 32``), each axis with
its own ``inv_freq = 1 / theta ** (arange(n) / n)``. The angle vector ``cat(t·inv_t, h·inv_h, w·inv_w)``
is duplicated by concatenation to ``head_dim``, while the rotation pairs *adjacent* channels. That mix
is what the checkpoints were trained with; reproduce it exactly.

Nothing here is a module buffer: the frequencies are recomputed where they are used, so a model built
on the meta device (transformers 5) can never carry stale or uninitialised values.
"""

from __future__ import annotations

import torch


def rope_axis_sizes(head_dim: int) -> tuple[int, int, int]:
    """Frequencies per axis ``(t, h, w)``; they sum to ``head_dim / 2``."""
    if head_dim % 32:
        raise ValueError(f"head_dim={head_dim}; expected a multiple of 32 for the 4:6:6 RoPE split")
    u = head_dim // 32
    return 4 * u, 6 * u, 6 * u


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``(head_dim / 2,)`` float32: the t, h and w inverse frequencies, concatenated."""
    parts = []
    for n in rope_axis_sizes(head_dim):
        parts.append(1.0 / theta ** (torch.arange(n, dtype=torch.float32, device=device) / n))
    return torch.cat(parts)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``(T, 3)`` integer ``(t, h, w)`` positions, each ``(T, head_dim)`` in ``dtype``.

    Angles are computed in float32 (positions up to thousands keep full precision), then cast once.
    """
    inv_t, inv_h, inv_w = rope_inv_freq(head_dim, theta, device=positions.device).split(rope_axis_sizes(head_dim))
    pos = positions.to(torch.float32)  # (T, 3)
    angles = torch.cat([pos[:, 0:1] * inv_t, pos[:, 1:2] * inv_h, pos[:, 2:3] * inv_w], dim=-1)  # (T, Dh/2)
    emb = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: adjacent channels form the rotated pairs."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (T, ..., Dh)`` by the ``(T, Dh)`` tables (broadcast over the middle axes)."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    return x * cos.view(shape) + rotate_pairs(x) * sin.view(shape)
