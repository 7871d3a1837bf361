"""What a LLaVA config asks of a vision tower, read without building one: which ``hidden_states`` a
``mm_vision_select_feature`` takes, the tower's encoder config, and its image processor.

Legend: ``L`` entries of ``hidden_states`` (``num_hidden_layers + 1``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import transformers
from huggingface_hub import hf_hub_download

from hevc_vit.checkpoints.architecture import config_kwargs
from hevc_vit.checkpoints.io import read_config_dict
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.files import CONFIG_NAME, PREPROCESSOR_NAME
from hevc_vit.processing.processors import FixedSizeProcessor  # the one CLIP config (encode's fixed-size processor)

logger = logging.getLogger(__name__)


# mm_vision_select_feature -> number of hidden_states entries concatenated on the feature axis.
# The model has no CLS token, so every "cls_patch" variant equals its "patch" variant.
SELECT_FEATURES: dict[str, int] = {
    "patch": 1,
    "cls_patch": 1,
    "slicefour_patch": 4,
    "slicefour_cls_patch": 4,
    "slice_m25811_f6_patch": 5,
    "slice_m25811_f6_cls_patch": 5,
}
SLICE_M25811_F6_LAYERS = (-2, -5, -8, -11, 6)
SPATIAL_MERGE_PROJECTOR = "spatial_merge"  # the projector that merges 2x2 patches: /2 per side, /4 in total

STACK_AS_CLIP_SETTING = "hevc_vit_stack_as_clip"  # opt-in LLaVA config attribute, see HEVCViTVisionTowerBase


# --------------------------------------------------------------------------------------------------
# pure helpers: layer selection, config and processor loading
# --------------------------------------------------------------------------------------------------


def select_layer_indices(select_feature: str, select_layer: int, num_hidden_states: int) -> list[int]:
    """The entries of ``hidden_states`` a ``select_feature`` concatenates, as indices in ``[0, L)``.

    ``L = num_hidden_states`` (``num_hidden_layers + 1``: the input of every block, then the last output).

    * ``patch`` / ``cls_patch``: ``[select_layer]``.
    * ``slicefour_patch`` / ``slicefour_cls_patch``: LLaVA-NeXT's rule — with ``k = L // 4``, the indices
      ``k + select_layer, k + select_layer + k, ...`` below ``L`` (24 layers, ``select_layer=-2``:
      4, 10, 16, 22). The rule must give exactly four layers starting at an index >= 0, because the
      projector is sized ``4 · D``; otherwise this raises and names the ``select_layer`` values that fit.
    * ``slice_m25811_f6_patch`` / ``slice_m25811_f6_cls_patch``: -2, -5, -8, -11 and 6 (``select_layer`` is
      not used); needs ``L >= 11``.

    Raises ``ValueError`` for an unknown ``select_feature`` or a selection outside ``hidden_states``.
    """
    L = num_hidden_states
    if select_feature not in SELECT_FEATURES:
        raise ValueError(f"mm_vision_select_feature={select_feature!r}; expected one of {list(SELECT_FEATURES)}")
    if select_feature.startswith("slicefour_"):
        k = L // 4
        fits = [s for s in range(-L, L) if k >= 1 and k + s >= 0 and len(range(k + s, L, k)) == 4]
        if not fits or select_layer not in fits:
            taken = list(range(k + select_layer, L, k)) if k >= 1 else []
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} with mm_vision_select_layer={select_layer} takes "
                f"hidden_states {taken} of {L} (every k = {L}//4 = {k}-th from index k + select_layer); expected "
                f"exactly 4 layers from an index >= 0 — select_layer values that fit here: {fits or 'none'}"
            )
        return list(range(k + select_layer, L, k))
    if select_feature.startswith("slice_m25811_f6_"):
        if L < 11:
            raise ValueError(
                f"mm_vision_select_feature={select_feature!r} takes hidden_states {list(SLICE_M25811_F6_LAYERS)}; "
                f"the model has only {L} (num_hidden_layers={L - 1}), expected at least 11 (10 layers)"
            )
        return [i % L for i in SLICE_M25811_F6_LAYERS]
    if not -L <= select_layer < L:
        raise ValueError(
            f"mm_vision_select_layer={select_layer}; expected an index into the {L} hidden_states "
            f"(num_hidden_layers + 1), from {-L} to {L - 1}"
        )
    return [select_layer % L]


def read_tower_config(name_or_path: str | os.PathLike) -> HEVCViTConfig:
    """The encoder config of a checkpoint (any supported format), reading only its ``config.json``."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return HEVCViTConfig(**config_kwargs(read_config_dict(path)))
    try:
        folder = os.path.dirname(hf_hub_download(path, CONFIG_NAME))
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(
            f"vision tower {path!r} is not a local folder and its {CONFIG_NAME} could not be fetched: {e}"
        ) from e
    return HEVCViTConfig(**config_kwargs(read_config_dict(folder)))


def clip_image_processor_class() -> type:
    """transformers' CLIP image processor class, imported when first needed. Without torchvision,
    transformers 5 answers ``CLIPImageProcessor`` with its PIL version and a warning on every use; asking
    for that version by name gives the same processor quietly (transformers 4 has only the one)."""

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def load_image_processor(name_or_path: str | os.PathLike, config: HEVCViTConfig) -> Any:
    """The checkpoint's ``CLIPImageProcessor`` (from its ``preprocessor_config.json``), or, when it has none,
    a CLIP-normalised one that resizes the short side to ``config.image_size`` and centre-crops a square."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, PREPROCESSOR_NAME)):
            return clip_image_processor_class().from_pretrained(path)
    else:
        try:
            return clip_image_processor_class().from_pretrained(path)
        except (OSError, ValueError):  # not on the Hub, or no processor config there
            pass
    logger.info("%s has no %s; using a CLIP-normalised processor at %d px", path, PREPROCESSOR_NAME, config.image_size)
    return default_image_processor(config)


def default_image_processor(config: HEVCViTConfig) -> Any:
    """A CLIP-normalised processor: short side resized to ``config.image_size``, centre-cropped square."""
    settings = FixedSizeProcessor(shortest_edge=config.image_size).to_dict()
    settings.pop("image_processor_type")
    return clip_image_processor_class()(**settings)


def llava_arg(args: Any, name: str, default: Any = None) -> Any:
    """``args.name`` for a config / namespace, ``args[name]`` for a mapping; ``default`` when absent."""
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)
