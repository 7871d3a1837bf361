"""This encoder as the vision tower of transformers' own LLaVA classes (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``).

Those classes read the tower's ``hidden_states`` and, with their default
``vision_feature_select_strategy="default"``, drop the first token of every image as a CLS token. This
encoder has no CLS token: "default" drops a real patch (the top-left one) and the prompt needs one image
token fewer than the image has patches. The parent's config is out of the encoder's sight, so a
module-registration hook (torch's, registered once by ``import hevc_vit``) sees the moment a model with such a
config takes the encoder as a submodule, and says so once, with the fix: ``vision_feature_select_strategy="full"``.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from hevc_vit.modeling import HEVCViTCore

logger = logging.getLogger(__name__)

_handle: RemovableHandle | None = None


def warn_on_default_feature_select(parent: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """torch's module-registration hook: when ``parent`` (whose config says
    ``vision_feature_select_strategy="default"``) takes one of this library's encoders as ``name``, log a
    warning naming the fix. Returns None: the submodule is registered as it is."""
    if not isinstance(submodule, HEVCViTCore):
        return None
    if getattr(getattr(parent, "config", None), "vision_feature_select_strategy", None) == "default":
        logger.warning(
            "%s.%s is a %s, which has no CLS token, under vision_feature_select_strategy='default': transformers "
            "drops the first token of every image as a CLS token, so a real patch is lost and the prompt needs one "
            "image token fewer than the image's patches. Set vision_feature_select_strategy='full' in the %s.",
            type(parent).__name__,
            name,
            type(submodule).__name__,
            type(parent.config).__name__,
        )
    return None


def register_feature_select_warning() -> None:
    """Register :func:`warn_on_default_feature_select` with torch (once per process; later calls do nothing)."""
    global _handle
    if _handle is None:
        _handle = register_module_module_registration_hook(warn_on_default_feature_select)
