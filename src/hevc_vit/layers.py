"""The building blocks of the encoder; every one works on packed ``(T, D)`` tokens.

Legend: ``T`` packed tokens, ``n`` items, ``H`` heads, ``Dh`` head dim, ``D`` width, ``p`` patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from hevc_vit.attention import AttendFn
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.packing import PackingPlan
from hevc_vit.rope import apply_rope


def make_norm(config: HEVCViTConfig) -> nn.Module:
    """The block norm the config asks for (``layer_norm`` or ``rms_norm``), with its eps."""
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class PatchProjection(nn.Conv2d):
    """The patch embedding's Conv2d weight applied as one matmul to flattened patches, in its own forward: under
    DeepSpeed ZeRO-3 a weight read by another module's forward is gathered for all of that module's forward."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: ``(T, C·p·p)``, any float dtype -> ``(T, D)`` in the weight's dtype; equal to the strided
        convolution."""
        return F.linear(patches.to(self.weight.dtype), self.weight.flatten(1))  # (T, D)


class HEVCViTPatchEmbed(nn.Module):
    """Linear embedding of flattened ``(C, p, p)`` patches; the weight keeps the Conv2d layout."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = PatchProjection(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: ``(T, C·p·p)`` -> ``(T, D)``, in the weight's dtype."""
        return self.proj(patches)  # (T, D)


class HEVCViTAttention(nn.Module):
    """Weights of the fused-qkv self-attention (rows q, k, v) and its output projection.

    The computation lives in :func:`attention_inputs` and :func:`attention_output_and_mlp`, around the
    attention backend, so that the two dense parts can be compiled while the backend stays as it is.
    """

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # rows: q, k, v
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)


class HEVCViTMLP(nn.Module):
    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def attention_inputs(
    layer: HEVCViTEncoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``norm1 -> qkv -> RoPE`` of one block: ``x (T, D)`` -> ``q, k, v`` each ``(T, H, Dh)``."""
    attn = layer.self_attn
    T = x.shape[0]
    qkv = attn.qkv(layer.layer_norm1(x)).view(T, 3, attn.num_heads, attn.head_dim)  # (T, 3, H, Dh)
    q, k = apply_rope(qkv[:, :2], cos, sin).unbind(1)  # (T, H, Dh) each; q and k rotated in one op
    return q, k, qkv[:, 2]


def attention_output_and_mlp(layer: HEVCViTEncoderLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The rest of one block: ``x + proj(attn)``, then ``+ mlp(norm2(.))``; ``attn_out (T, H, Dh)``."""
    x = x + layer.self_attn.proj(attn_out.flatten(1))  # (T, D)
    return x + layer.mlp(layer.layer_norm2(x))


BLOCK_FNS = (attention_inputs, attention_output_and_mlp)


class HEVCViTEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config)
        self.self_attn = HEVCViTAttention(config)
        self.layer_norm2 = make_norm(config)
        self.mlp = HEVCViTMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: PackingPlan, attend: AttendFn,
        block_fns: tuple = BLOCK_FNS,
    ) -> torch.Tensor:  # fmt: skip
        """x: ``(T, D)``; ``block_fns`` are the two dense halves (compiled versions may be passed)."""
        before, after = block_fns
        chunk = cpu_chunk_tokens(x, self.mlp.fc1.out_features)
        if chunk is None:
            q, k, v = before(self, x, cos, sin)
        else:
            # each chunk's q, k, v go straight to one head-major (3, H, T, Dh) buffer: every head's rows adjacent,
            # as the CPU attention kernel reads them, so neither a join of the chunks nor a layout copy is needed
            T, H, Dh = x.shape[0], self.self_attn.num_heads, self.self_attn.head_dim
            qkv = x.new_empty(3, H, T, Dh)
            for start in range(0, T, chunk):
                rows = slice(start, start + chunk)
                for i, part in enumerate(before(self, x[rows], cos[rows], sin[rows])):
                    qkv[i, :, rows] = part.transpose(0, 1)
            q, k, v = (qkv[i].transpose(0, 1) for i in range(3))  # (T, H, Dh) views
        dropout = self.self_attn.dropout if self.training else 0.0
        out = attend(q, k, v, plan, self.self_attn.scale, dropout_p=dropout)  # (T, H, Dh)
        if chunk is None:
            return after(self, x, out)
        return torch.cat([after(self, xc, oc) for xc, oc in zip(x.split(chunk), out.split(chunk))])  # (T, D)


# On the CPU, an allocation above glibc's mmap threshold (at most 32 MiB) is a fresh mapping whose pages
# fault in on first touch: long packed sequences would pay that for the MLP and qkv activations of every
# block (measured: page faults 7x and element-wise ops 2.4x slower per element than item by item). Token
# chunks keep them below it; attention still sees whole items. Public so tests can lower it.
CPU_CHUNK_BYTES = 8 * 2**20


def cpu_chunk_tokens(x: torch.Tensor, widest: int) -> int | None:
    """Tokens per chunk for the dense halves of a block on the CPU, or None to run them whole."""
    if x.device.type != "cpu":
        return None
    chunk = max(256, CPU_CHUNK_BYTES // (widest * x.element_size()))
    return chunk if x.shape[0] > chunk else None


class HEVCViTEncoder(nn.Module):
    """The stack of blocks; gradient checkpointing is switched on by ``model.gradient_checkpointing_enable()``."""

    def __init__(self, config: HEVCViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(HEVCViTEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.block_fns = BLOCK_FNS

    def compile_blocks(self, **compile_kwargs) -> None:
        """Compile the two dense halves of every block with ``torch.compile`` (one graph each, shared by
        all layers and all sequence lengths: ``dynamic=True``); attention keeps its backend as it is."""
        compile_kwargs.setdefault("dynamic", True)
        self.block_fns = tuple(torch.compile(fn, **compile_kwargs) for fn in BLOCK_FNS)

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
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, plan, attend, self.block_fns)
            else:
                x = layer(x, cos, sin, plan, attend, self.block_fns)
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
        eps = config.head_norm_eps if config.head_norm_eps is not None else config.layer_norm_eps
        self.norm = nn.RMSNorm(D, eps=eps)
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
