"""The building blocks of the encoder; every one works on packed ``(T, D)`` tokens.

Legend: ``T`` packed tokens, ``n`` items, ``H`` heads, ``Dh`` head dim, ``D`` width, ``p`` patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .attention import AttendFn
from .configuration import HEVCViTConfig
from .packing import PackingPlan
from .rope import apply_rope


def make_norm(config: HEVCViTConfig) -> nn.Module:
    """The block norm the config asks for (``layer_norm`` or ``rms_norm``), with its eps."""
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class HEVCViTPatchEmbed(nn.Module):
    """Linear embedding of flattened ``(C, p, p)`` patches; the weight keeps the Conv2d layout."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: ``(T, C·p·p)`` -> ``(T, D)``; one matmul, equal to the strided convolution."""
        return F.linear(patches, self.proj.weight.flatten(1))  # (T, D)


class HEVCViTAttention(nn.Module):
    """Fused-qkv self-attention with 3D RoPE; tokens see only their own item."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows: q, k, v
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: PackingPlan, attend: AttendFn
    ) -> torch.Tensor:
        T, D = x.shape
        qkv = self.qkv(x).view(T, 3, self.num_heads, self.head_dim)  # (T, 3, H, Dh)
        q, k = apply_rope(qkv[:, :2], cos, sin).unbind(1)  # (T, H, Dh) each; q and k rotated in one op
        v = qkv[:, 2]  # (T, H, Dh)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, plan, self.scale, dropout_p=dropout)  # (T, H, Dh)
        return self.proj(out.reshape(T, D))  # (T, D)


class HEVCViTMLP(nn.Module):
    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HEVCViTEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = HEVCViTAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = HEVCViTMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: PackingPlan, attend: AttendFn
    ) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, plan, attend)
        return x + self.mlp(self.layer_norm2(x))


class HEVCViTEncoder(nn.Module):
    """The stack of blocks; gradient checkpointing is switched on by ``model.gradient_checkpointing_enable()``."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(HEVCViTEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: PackingPlan,
        attend: AttendFn,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """x: ``(T, D)``. Returns the last block's output and, when asked, the input of every block plus
        that output (``num_hidden_layers + 1`` entries)."""
        hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, plan, attend)
            else:
                x = layer(x, cos, sin, plan, attend)
        if output_hidden_states:
            hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


class HEVCViTPoolingHead(nn.Module):
    """Attention pooling: a learned probe attends over the tokens of each item, then ``x + mlp(norm(x))``.

    Weights follow ``torch.nn.MultiheadAttention``; the forward runs it for all items at once on packed
    tokens (a segment softmax), so there is no loop over items and no padding.
    """

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, D))
        self.attention = nn.MultiheadAttention(D, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(D, eps=config.layer_norm_eps)
        self.mlp = HEVCViTMLP(config)

    def forward(self, x: torch.Tensor, plan: PackingPlan) -> torch.Tensor:
        """x: ``(T, D)`` -> ``(n, D)``, one pooled vector per item."""
        T, D = x.shape
        H, n = self.num_heads, plan.num_items
        Dh = D // H
        w_q, w_k, w_v = self.attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attention.in_proj_bias.chunk(3)
        q = F.linear(self.probe.view(1, D), w_q, b_q).view(H, Dh)  # (H, Dh) one query shared by all items
        k = F.linear(x, w_k, b_k).view(T, H, Dh)  # (T, H, Dh)
        v = F.linear(x, w_v, b_v).view(T, H, Dh)  # (T, H, Dh)
        # Segment softmax in float32: scores of each item's tokens against the probe.
        scores = (k.float() * q.float()).sum(-1) * Dh**-0.5  # (T, H)
        seg = plan.segment_ids.unsqueeze(1).expand(T, H)  # (T, H)
        peak = scores.new_full((n, H), float("-inf")).scatter_reduce(0, seg, scores, "amax")  # (n, H)
        weights = (scores - peak.gather(0, seg)).exp()  # (T, H)
        denom = scores.new_zeros(n, H).index_add_(0, plan.segment_ids, weights)  # (n, H)
        pooled = scores.new_zeros(n, H, Dh).index_add_(0, plan.segment_ids, weights[..., None] * v.float())
        pooled = (pooled / denom[..., None]).to(x.dtype).reshape(n, D)  # (n, D)
        pooled = self.attention.out_proj(pooled)  # (n, D)
        return pooled + self.mlp(self.norm(pooled))
