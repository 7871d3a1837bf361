"""A tiny native-resolution LLaVA for tests, built offline: the fixture tower (tests/fixtures/llava_vit_packing_tiny),
a 2-layer Qwen2 of width 64, and a word-level tokenizer made with the ``tokenizers`` library (no hub download).

``tiny_vlm(projector_type=..., seed=...)`` -> ``(model, processor)``; other helpers and tests reuse it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast, Qwen2Config

from hevc_vit import HEVCViTImageProcessor, HEVCViTPackingModel
from hevc_vit.llava.config import read_tower_config
from hevc_vit.llava.vlm import HEVCViTLlavaForConditionalGeneration
from hevc_vit.llava.vlm_config import HEVCViTLlavaConfig
from hevc_vit.llava.vlm_processing import HEVCViTLlavaProcessor
from tests.helpers import FIXTURES

TOWER = FIXTURES / "llava_vit_packing_tiny"
SPECIAL = ["<pad>", "<unk>", "<eos>", "<image>", "<video>"]
WORDS = ["describe", "the", "image", "video", "and", "what", "is", "in", "a", "cat", "dog", "red", "blue", "one",
         "two", "three", "yes", "no", "here", ".", ",", "?", ":"] + [f"w{i}" for i in range(35)]  # fmt: skip


def tiny_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0-4 the special tokens (pad, unk, eos, ``<image>``, ``<video>``), then words."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens(SPECIAL)  # never split, whatever the pre-tokenizer does
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.padding_side = padding_side
    return tokenizer


def tiny_image_processor() -> HEVCViTImageProcessor:
    """Native resolution with small bounds: 4 to 64 patches per image, 256 per clip."""
    return HEVCViTImageProcessor(patch_size=14, min_tokens=4, max_tokens=64, max_video_tokens=256)


def tiny_text_config(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_vlm_config(projector_type: str = "mlp2x_gelu", **overrides) -> HEVCViTLlavaConfig:
    tokenizer = tiny_tokenizer()
    settings = dict(
        vision_config=read_tower_config(TOWER),
        text_config=tiny_text_config(len(tokenizer)),
        projector_type=projector_type,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        pad_token_id=0,
        eos_token_id=2,
    )
    settings.update(overrides)
    return HEVCViTLlavaConfig(**settings)


def tiny_vlm(
    projector_type: str = "mlp2x_gelu", seed: int = 0, **overrides
) -> tuple[HEVCViTLlavaForConditionalGeneration, HEVCViTLlavaProcessor]:
    """The tiny model (fixture tower weights, the rest drawn with ``seed``), in eval mode, and its processor."""
    config = tiny_vlm_config(projector_type, **overrides)
    torch.manual_seed(seed)
    model = HEVCViTLlavaForConditionalGeneration(config)
    tower = HEVCViTPackingModel.from_pretrained(TOWER)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    processor = HEVCViTLlavaProcessor.from_model_config(tiny_image_processor(), tiny_tokenizer(), config)
    return model.eval(), processor
