"""An SDPA attention for the vendored reference model (ours, not the reference's: at c2cd3e0 it ships only
``eager`` and ``flash_attention_2``).

:class:`OneVisionEncoderSdpaAttention` is the reference's ``OneVisionEncoderAttention`` with its
``matmul -> softmax -> matmul`` replaced by one ``F.scaled_dot_product_attention`` call (no mask: the standard
model runs one item per call); projections, RoPE and reshapes are the reference's own lines. Importing this
module registers it as ``"sdpa"`` in the reference's attention table, so a config with
``_attn_implementation = "sdpa"`` builds the reference with it (and the model class is marked as
supporting SDPA, which transformers checks).
"""

from __future__ import annotations

import torch.nn.functional as F
from onevision_encoder import modeling_onevision_encoder as reference


class OneVisionEncoderSdpaAttention(reference.OneVisionEncoderAttention):
    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, output_attentions=False):
        batch_size, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        query_states = query_states.view(batch_size, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = key_states.view(batch_size, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(batch_size, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        if rotary_pos_emb is not None:
            query_states, key_states = reference.apply_rotary_pos_emb(query_states, key_states, rotary_pos_emb)
        attn_output = F.scaled_dot_product_attention(
            query_states,
            key_states,
            value_states,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )  # (B, H, L, Dh)
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, q_len, self.embed_dim)
        return self.out_proj(attn_output), None


reference.ONEVISION_ENCODER_ATTENTION_CLASSES.setdefault("sdpa", OneVisionEncoderSdpaAttention)
reference.OneVisionEncoderPreTrainedModel._supports_sdpa = True  # transformers refuses "sdpa" without it
__all__ = ["OneVisionEncoderSdpaAttention"]
