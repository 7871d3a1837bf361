"""hevc-vit: the HEVC ViT (OneVision) vision encoder in packing mode.

Every image and video at its native size in one forward: patches of all items are packed into one
sequence ``(T, C·p·p)`` with a ``grid_thw`` row ``(t, h, w)`` per item, the transformer runs
variable-length attention with 3D RoPE, and the output is split back per item.
"""

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from hevc_vit import moved
from hevc_vit.attention import available_backends, get_attention
from hevc_vit.checkpoints.embedded import register_transformers_conversions
from hevc_vit.configuration import PRESETS, HEVCViTConfig
from hevc_vit.llava.transformers_classes import register_feature_select_warning
from hevc_vit.llava.vlm import HEVCViTLlavaForConditionalGeneration, HEVCViTLlavaModel
from hevc_vit.llava.vlm_config import HEVCViTLlavaConfig
from hevc_vit.llava.vlm_processing import HEVCViTLlavaProcessor
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel, HEVCViTPreTrainedModel
from hevc_vit.packing import PackingPlan, grid_positions, patchify, patchify_items, unpack, unpack_batch
from hevc_vit.processing.image_processing import HEVCViTImageProcessor, HEVCViTNativeImageProcessor

__version__ = "0.1.0"

moved.install()  # old module names (hevc_vit.towers, hevc_vit.ray, ...) import their new modules

AutoConfig.register(HEVCViTConfig.model_type, HEVCViTConfig, exist_ok=True)
AutoModel.register(HEVCViTConfig, HEVCViTModel, exist_ok=True)
AutoImageProcessor.register(HEVCViTConfig, slow_image_processor_class=HEVCViTImageProcessor, exist_ok=True)


def _register_reference_model_types() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` open the reference project's folders (``onevision_encoder``,
    ``llava_vit``, ``llava_vit_packing``) without ``trust_remote_code``: each model_type gets a config
    subclass and a model subclass of the same name as ours, and loads through our ``from_pretrained``."""
    for model_type, model_cls in (
        ("onevision_encoder", HEVCViTModel),
        ("llava_vit", HEVCViTModel),
        ("llava_vit_packing", HEVCViTPackingModel),
    ):
        # its own __init__ (ours): transformers 5 gives a config subclass without one a generated dataclass
        # __init__, which would skip our validation and drop attention_backend / attn_implementation
        namespace = {"model_type": model_type, "__init__": HEVCViTConfig.__init__}
        config_cls = type(f"HEVCViTConfig_{model_type}", (HEVCViTConfig,), namespace)
        alias = type(model_cls.__name__, (model_cls,), {"config_class": config_cls, "__module__": model_cls.__module__})
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, alias, exist_ok=True)
        if model_type == "llava_vit_packing":  # files of encode's native processor saved before one format
            AutoImageProcessor.register(
                config_cls, slow_image_processor_class=HEVCViTNativeImageProcessor, exist_ok=True
            )


_register_reference_model_types()


def _register_llava() -> None:
    """The whole LLaVA model (:mod:`hevc_vit.llava.vlm`): ``AutoConfig``, ``AutoModel`` (the base model),
    ``AutoModelForImageTextToText`` (and ``AutoModelForVision2Seq`` where it exists), ``AutoProcessor``."""
    AutoConfig.register(HEVCViTLlavaConfig.model_type, HEVCViTLlavaConfig, exist_ok=True)
    AutoModel.register(HEVCViTLlavaConfig, HEVCViTLlavaModel, exist_ok=True)
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is not None:
            auto.register(HEVCViTLlavaConfig, HEVCViTLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(HEVCViTLlavaConfig, HEVCViTLlavaProcessor, exist_ok=True)


_register_llava()
# transformers 5: a model holding ours (a LLaVA tower) loads tower weights saved under the reference names
register_transformers_conversions((HEVCViTModel.__name__, HEVCViTPackingModel.__name__))
# transformers' LlavaForConditionalGeneration & co. with this encoder as the vision tower: warn about "default"
register_feature_select_warning()

__all__ = [
    "PRESETS",
    "HEVCViTConfig",
    "HEVCViTImageProcessor",
    "HEVCViTLlavaConfig",
    "HEVCViTLlavaForConditionalGeneration",
    "HEVCViTLlavaModel",
    "HEVCViTLlavaProcessor",
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
