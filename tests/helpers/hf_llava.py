"""Tiny transformers LLaVA models (``Llava``, ``LlavaNext``, ``LlavaOnevision``) with this library's encoder as
their vision tower, random weights, and what their forwards need: pixels, image sizes, and ``input_ids`` holding
as many image (video) tokens as the class computes features. No tokenizer: the ids are built directly."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from hevc_vit import HEVCViTConfig

IMAGE_TOKEN, VIDEO_TOKEN = 60, 61
TEXT_CONFIG = dict(
    model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
)  # fmt: skip
# anyres tilings: multiples of the encoder's image_size (56)
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
CLASSES = {
    "llava": (LlavaForConditionalGeneration, LlavaConfig),
    "llava_next": (LlavaNextForConditionalGeneration, LlavaNextConfig),
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig),
}


def vision_config() -> HEVCViTConfig:
    """tests/fixtures/llava_vit_packing_tiny's architecture: hidden 64, 2 heads, 3 layers, patch 14, image 56."""
    return HEVCViTConfig(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=3, intermediate_size=128, patch_size=14, image_size=56
    )


def llava_config(kind: str, strategy: str = "full", layer: int | list[int] = -2):
    """The config of a tiny ``kind`` model (a key of :data:`CLASSES`)."""
    extra = {} if kind == "llava" else {"image_grid_pinpoints": PINPOINTS}
    if kind == "llava_onevision":
        extra["video_token_index"] = VIDEO_TOKEN
    return CLASSES[kind][1](
        vision_config=vision_config(), text_config=dict(TEXT_CONFIG), image_token_index=IMAGE_TOKEN,
        vision_feature_select_strategy=strategy, vision_feature_layer=layer, **extra,
    )  # fmt: skip


def build(kind: str, strategy: str = "full", layer: int | list[int] = -2, attn_implementation=None, seed: int = 0):
    """A tiny ``kind`` model in eval mode, random weights from ``seed``."""
    torch.manual_seed(seed)
    cls = CLASSES[kind][0]
    config = llava_config(kind, strategy, layer)
    if attn_implementation is None:
        return cls(config).eval()
    return cls._from_config(config, attn_implementation=attn_implementation).eval()


def image_inputs(kind: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Pixels for ``kind``: Llava two 56x56 images; the anyres classes two images of different sizes, as tiles
    (the base image + the tiles of its best pinpoint, padded to the most tiles) with their ``image_sizes``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "llava":
        return {"pixel_values": torch.randn(2, 3, 56, 56, generator=g)}
    return {
        "pixel_values": torch.randn(2, 5, 3, 56, 56, generator=g),
        "image_sizes": torch.tensor([[112, 112], [40, 100]]),
    }


def video_inputs(seed: int = 2) -> dict[str, torch.Tensor]:
    """One video of 4 frames of 56x56 for LlavaOnevision."""
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values_videos": torch.randn(1, 4, 3, 56, 56, generator=g)}


def _pooled(out):
    """transformers 5 returns the features as ``pooler_output``; 4.x returns them."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def image_feature_counts(model, inputs: dict[str, torch.Tensor]) -> list[int]:
    """Tokens per image the model computes for ``inputs`` (what the prompt must hold)."""
    config = model.config
    kwargs = dict(
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    if "image_sizes" in inputs:
        kwargs["image_sizes"] = inputs["image_sizes"]
    with torch.no_grad():
        features = _pooled(model.model.get_image_features(inputs["pixel_values"], **kwargs))
    return [f.shape[-2] if f.dim() == 3 else f.shape[0] for f in features]


def video_feature_count(model, inputs: dict[str, torch.Tensor]) -> int:
    config = model.config
    with torch.no_grad():
        out = model.model.get_video_features(
            inputs["pixel_values_videos"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    # transformers 5 appends the newline token inside get_video_features (its pooler_output); 4.x's forward after
    return out.pooler_output.shape[1] if hasattr(out, "pooler_output") else out.shape[1] + 1


def prompt_ids(counts: list[int], token: int = IMAGE_TOKEN) -> torch.Tensor:
    """One prompt per entry of ``counts`` (``(B, L)``, equal lengths): text, ``count`` image tokens, text."""
    longest = max(counts)
    rows = [[1] * (longest - n + 1) + [token] * n + [2, 3] for n in counts]
    return torch.tensor(rows)


def projector_inputs(model: nn.Module) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Record what the model's multi-modal projector receives: the selected tower features."""
    seen: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    return seen, handle
