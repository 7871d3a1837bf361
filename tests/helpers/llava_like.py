"""A small LLaVA-like ``PreTrainedModel`` for tests: the tower sits where LLaVA-NeXT puts it.

LLaVA-NeXT mixes ``LlavaMetaModel`` into the language model (``model``), which builds the tower with
``build_vision_tower(config, delay_load=getattr(config, "delay_load", False))`` at construction — so the
tower's encoder weights live at ``model.vision_tower.vision_tower.<names>`` and a LLaVA checkpoint stores
them there. This model has the same attribute path, a projector and a token embedding, and nothing else.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hevc_vit.llava.projector import build_projector
from hevc_vit.llava.towers import build_vision_tower

TOWER_PREFIX = "model.vision_tower.vision_tower."


class TinyLlavaConfig(PretrainedConfig):
    model_type = "hevc_vit_tiny_llava_test"

    def __init__(
        self,
        mm_vision_tower: str | None = None,
        hidden_size: int = 32,
        mm_hidden_size: int = 64,
        mm_projector_type: str = "mlp2x_gelu",
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        delay_load: bool = False,
        unfreeze_mm_vision_tower: bool = False,
        vocab_size: int = 16,
        **kwargs,
    ):
        self.mm_vision_tower = mm_vision_tower
        self.hidden_size = hidden_size
        self.mm_hidden_size = mm_hidden_size
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.delay_load = delay_load
        self.unfreeze_mm_vision_tower = unfreeze_mm_vision_tower
        self.vocab_size = vocab_size
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class TinyLlavaModel(nn.Module):
    def __init__(self, config: TinyLlavaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_tower = build_vision_tower(config, delay_load=config.delay_load)
        self.mm_projector = build_projector(config)


class TinyLlavaForCausalLM(PreTrainedModel):
    config_class = TinyLlavaConfig
    base_model_prefix = "model"

    def __init__(self, config: TinyLlavaConfig):
        super().__init__(config)
        self.model = TinyLlavaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
