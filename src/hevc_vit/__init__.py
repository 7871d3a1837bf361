"""hevc-vit: the HEVC ViT (OneVision) vision encoder in packing mode.

Every image and video at its native size in one forward: patches of all items are packed into one
sequence ``(T, C·p·p)`` with a ``grid_thw`` row ``(t, h, w)`` per item, the transformer runs
variable-length attention with 3D RoPE, and the output is split back per item.
"""

from transformers import AutoConfig, AutoModel

from .attention import available_backends, get_attention
from .configuration import PRESETS, HEVCViTConfig
from .modeling import HEVCViTModel, HEVCViTPackingModel, HEVCViTPreTrainedModel
from .packing import PackingPlan, grid_positions, patchify, patchify_items, unpack, unpack_batch

__version__ = "0.1.0"

AutoConfig.register(HEVCViTConfig.model_type, HEVCViTConfig, exist_ok=True)
AutoModel.register(HEVCViTConfig, HEVCViTModel, exist_ok=True)

__all__ = [
    "PRESETS",
    "HEVCViTConfig",
    "HEVCViTModel",
    "HEVCViTPackingModel",
    "HEVCViTPreTrainedModel",
    "PackingPlan",
    "available_backends",
    "get_attention",
    "grid_positions",
    "patchify",
    "patchify_items",
    "unpack",
    "unpack_batch",
]
