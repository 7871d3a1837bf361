"""The keyword arguments transformers' LLaVA classes pass to their vision tower, and how the encoder reads them.

``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration`` call ``vision_tower(pixel_values, **kwargs)`` with, besides
``output_hidden_states`` / ``output_attentions`` / ``return_dict``, names that mean nothing to a fixed-size
encoder: the language model's own keyword arguments (transformers' ``TransformersKwargs`` /
``FlashAttentionKwargs`` reach the tower in 5.x: ``position_ids``, ``cu_seq_lens_q``, ...), the anyres and
video settings filled in from the parent config (``vision_aspect_ratio``, ``use_cache``, ``is_causal``) and
the image sizes (``image_sizes``, ``batch_num_images``). The encoder's forwards accept and ignore exactly these;
any other name is a ``TypeError``, as an unknown keyword argument is in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# transformers 4.57 and 5.x, read from the three classes' get_image_features / get_video_features and
# from the kwargs types their forwards pass on (TransformersKwargs, FlashAttentionKwargs)
IGNORED_TOWER_KWARGS = frozenset(
    {
        # the LLaVA classes' own inputs and config defaults
        "image_sizes", "image_sizes_videos", "batch_num_images", "vision_aspect_ratio", "vision_feature_layer",
        "vision_feature_select_strategy", "use_cache", "is_causal",
        # TransformersKwargs / FlashAttentionKwargs: the language model's (its positions and varlen metadata)
        "num_items_in_batch", "output_router_logits", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
        "max_length_q", "max_length_k",
    }
)  # fmt: skip


def check_tower_kwargs(owner: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming the keyword arguments in ``kwargs`` that are not transformers' tower
    arguments (:data:`IGNORED_TOWER_KWARGS`); ``owner`` names the forward that got them."""
    unknown = sorted(set(kwargs) - IGNORED_TOWER_KWARGS)
    if unknown:
        raise TypeError(
            f"{owner}() got unexpected keyword arguments {unknown}; besides its own it accepts (and ignores) "
            f"only those transformers' LLaVA classes pass to a vision tower: {sorted(IGNORED_TOWER_KWARGS)}"
        )


def wants_hidden_states(value: bool | int | list[int] | None, default: bool) -> bool:
    """Whether to return the hidden states: ``value`` is a flag, or (transformers 5, from a LLaVA class's
    ``vision_feature_layer``) the index or indices the caller selects — then all of them are returned, the
    tuple those indices select from (index ``0`` included). None means ``default`` (the config's)."""
    if value is None:
        return bool(default)
    if isinstance(value, bool):
        return value
    return True
