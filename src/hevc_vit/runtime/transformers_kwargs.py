"""The keyword arguments transformers' LLaVA classes pass to their vision tower, and how the encoder reads them.

``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration`` call ``vision_tower(pixel_values, **kwargs)`` with, besides
``output_hidden_states`` / ``output_attentions`` / ``return_dict``, names that mean nothing to a fixed-size
encoder: the language model's own keyword arguments (transformers' ``TransformersKwargs`` /
``FlashAttentionKwargs`` reach the tower in 5.x: ``position_ids``, ``cu_seq_lens_q``, ...), the anyres and
video settings filled in from the parent config (``vision_aspect_ratio``, ``use_cache``, ``is_causal``) and
the image sizes (``image_sizes``, ``batch_num_images``). The encoder's forwards accept and ignore these, but for
``image_sizes``: only ``LlavaForConditionalGeneration`` passes it to the tower, for pixtral's path (features
packed across images cropped to their sizes), which this encoder does not give, so it is refused. Any other
name is ignored with a warning naming it (once per name): a newer transformers release that passes one more
argument to its vision tower must not break a model that worked, and a misspelt argument is still reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()

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
    """Warn, once per name, about the keyword arguments in ``kwargs`` that are not transformers' tower arguments
    (:data:`IGNORED_TOWER_KWARGS`) and so are ignored; ``owner`` names the forward that got them. Raises
    ``ValueError`` on ``image_sizes`` (see the module docstring): ignoring it would misalign the features."""
    if kwargs.get("image_sizes") is not None:
        sizes = kwargs["image_sizes"]
        sizes = sizes.tolist() if hasattr(sizes, "tolist") else sizes
        raise ValueError(
            f"{owner}() got image_sizes={sizes}: transformers' LlavaForConditionalGeneration then reads pixtral's "
            "features (one block, each image cropped to its size, read with vision_tower.patch_size), which this "
            "encoder does not give; expected no image_sizes (images of one size) — for images at their own sizes "
            "use hevc_vit.llava.vlm.HEVCViTLlavaForConditionalGeneration"
        )
    unknown = sorted(name for name in set(kwargs) - IGNORED_TOWER_KWARGS if (owner, name) not in _warned)
    if unknown:
        _warned.update((owner, name) for name in unknown)
        logger.warning(
            "%s() ignores the keyword arguments %s: they are neither its own nor those transformers' LLaVA classes "
            "pass to a vision tower (%s)",
            owner, unknown, sorted(IGNORED_TOWER_KWARGS),
        )  # fmt: skip


def wants_hidden_states(value: bool | int | list[int] | None, default: bool) -> bool:
    """Whether to return the hidden states: ``value`` is a flag, or (transformers 5, from a LLaVA class's
    ``vision_feature_layer``) the index or indices the caller selects — then all of them are returned, the
    tuple those indices select from (index ``0`` included). None means ``default`` (the config's)."""
    if value is None:
        return bool(default)
    if isinstance(value, bool):
        return value
    return True
