"""The encoder inside another model (a LLaVA vision tower): weights saved under other names load, and
weights read from a checkpoint are never silently re-initialised.

A LLaVA checkpoint stores its tower as ``model.vision_tower.vision_tower.<names>``, with the names of the
tower that saved it: the reference standard names (``embeddings.patch_embedding``, split
``self_attn.{q,k,v}_proj``, ``self_attn.out_proj``), the packing names, or ours (the packing names). Three
loader paths reach the encoder's weights, and each gets the same conversion (``checkpoints.STANDARD_RULES``):

* ``torch``'s ``load_state_dict`` on any model that holds the encoder: a pre-hook on the encoder renames
  and fuses the keys under its prefix; tower keys that still fit no weight raise, even with ``strict=False``.
* transformers 5's ``from_pretrained`` of the whole model: the same rules registered with its conversion
  mechanism for our model classes, scoped by transformers to wherever the encoder sits. Saving keeps our
  names (the reverse of a rule is the identity), so what we save loads under every transformers release.
* any loader that cannot convert (transformers 4.x ``from_pretrained`` with standard names): it loads the
  names that coincide and asks the encoder to initialise the rest. An encoder holding checkpoint weights
  refuses: a partial load raises naming the keys; when the outer checkpoint held none of its weights, the
  encoder keeps the ones it read itself (what a frozen tower is for).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from hevc_vit.checkpoints import load_checkpoint
from hevc_vit.checkpoints.names import STANDARD_RULES, convert_to_native, detect_format_from_keys

logger = logging.getLogger(__name__)

# formats whose names need converting; "packing" and "hevc_vit" are the models' own names
_FOREIGN_FORMATS = ("standard",)


def convert_nested_keys(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Rename / fuse, in place, the keys of ``state_dict`` under ``prefix`` that use the reference standard
    names into ``module``'s own names; then raise ``ValueError`` when keys under ``prefix`` still name no
    weight of ``module`` (the keys, and what the module holds, are named)."""
    local = {key[len(prefix) :]: key for key in state_dict if key.startswith(prefix)}
    if not local:
        return
    fmt = detect_format_from_keys(local)
    if fmt in _FOREIGN_FORMATS:
        converted = convert_to_native({name: state_dict[key] for name, key in local.items()}, fmt)
        for key in local.values():
            del state_dict[key]
        state_dict.update({prefix + name: value for name, value in converted.items()})
        local = {name: prefix + name for name in converted}
    expected = set(module.state_dict(keep_vars=True))
    unknown = sorted(key for name, key in local.items() if name not in expected)
    if unknown:
        raise ValueError(
            f"{len(unknown)} weights under {prefix or 'the root'!r} fit no tensor of {type(module).__name__} "
            f"(first: {unknown[:6]}); expected this library's / the packing names or the reference standard "
            f"names (e.g. {prefix}embeddings.patch_embedding.weight) — the tower weights would be lost"
        )


def _load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    convert_nested_keys(module, state_dict, prefix)


def attach_load_hooks(module: nn.Module) -> None:
    """Make ``torch``'s ``load_state_dict`` of any model holding ``module`` convert its tower keys."""
    module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)


# --------------------------------------------------------------------------------------------------
# transformers 5: the same rules, through its own conversion mechanism
# --------------------------------------------------------------------------------------------------


def _suffix_pattern(template: str) -> str:
    """``encoder.layers.{i}.self_attn.q_proj.weight`` -> the regex of the part after the layer index."""
    return re.escape(template.split("{i}.")[-1])


def transformers_weight_conversions() -> list[Any] | None:
    """``STANDARD_RULES`` as transformers 5 ``WeightConverter`` / ``WeightRenaming`` objects whose reverse
    (used when saving) is the identity; None when the installed transformers has no such mechanism."""
    try:
        from transformers.core_model_loading import (  # optional: transformers 5
            Concatenate,
            WeightConverter,
            WeightRenaming,
        )
    except ImportError:  # transformers 4.x
        return None

    class LoadOnlyRenaming(WeightRenaming):
        __slots__ = ()

        def reverse_transform(self):  # save our own names: they load everywhere
            return _identity(self)

    class LoadOnlyConverter(WeightConverter):
        __slots__ = ()

        def reverse_transform(self):
            return _identity(self)

    def _identity(transform):
        identity = WeightRenaming(list(transform._original_target_patterns), list(transform._original_target_patterns))
        identity.scope_prefix, identity.base_model_prefix = transform.scope_prefix, transform.base_model_prefix
        return identity

    transforms = []
    for rule in STANDARD_RULES:
        sources = [_suffix_pattern(s) for s in rule.sources]
        target = _suffix_pattern(rule.target).replace("\\", "")
        if len(sources) == 1:
            transforms.append(LoadOnlyRenaming(sources[0], target))
        else:
            transforms.append(LoadOnlyConverter(sources, target, operations=[Concatenate(dim=0)]))
    return transforms


def register_transformers_conversions(class_names: tuple[str, ...]) -> bool:
    """Register :func:`transformers_weight_conversions` for our model classes (transformers 5); returns
    whether it could."""
    try:
        from transformers.conversion_mapping import (  # optional: transformers 5 only
            register_checkpoint_conversion_mapping,
        )

        transforms = transformers_weight_conversions()
        if transforms is None:
            return False
        for name in class_names:
            register_checkpoint_conversion_mapping(name, transforms, overwrite=True)
    except Exception as e:  # noqa: BLE001 — an internal API that moves between 5.x releases: never break import
        # without it, from_pretrained of a LLaVA checkpoint with standard names fails loudly (check_reinitialisation)
        logger.debug("transformers weight conversions not registered: %r", e)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# re-initialisation: never of weights read from a checkpoint
# --------------------------------------------------------------------------------------------------


def check_reinitialisation(model: nn.Module) -> None:
    """Called when transformers asks ``model``, which holds checkpoint weights, to initialise weights.

    transformers marks every tensor its loader filled with ``_is_hf_initialized``:

    * all marked: nothing to do;
    * none marked: the outer checkpoint held none of the encoder's weights, or this is a plain ``post_init``
      of the outer model. The encoder's own weights may not have survived the outer model's construction
      on the meta device, so they are read again from ``model.checkpoint_source``, never re-initialised;
    * some marked: the checkpoint held the encoder's weights but transformers could not place these
      under the names it found: raise naming them.
    """
    params = dict(model.named_parameters())
    filled = [name for name, p in params.items() if getattr(p, "_is_hf_initialized", False)]
    if len(filled) == len(params):
        return
    if not filled:
        _reread_weights(model)
        return
    left = sorted(set(params) - set(filled))
    raise ValueError(
        f"loading the model that holds this {type(model).__name__} filled {len(filled)} of its {len(params)} "
        f"weights from the checkpoint but not {len(left)}: {left[:8]}{' ...' if len(left) > 8 else ''} — the "
        f"checkpoint stores them under other names (e.g. the reference standard names q_proj/k_proj/v_proj, "
        f"embeddings.patch_embedding), which this transformers version cannot convert inside from_pretrained. "
        f"They are not re-initialised silently: load with transformers >= 5, or build the model and call "
        f"model.load_state_dict(weights) (hevc_vit converts the names there)"
    )


def _reread_weights(model: nn.Module) -> None:
    source = model.checkpoint_source
    logger.info(
        "re-reading the weights of %s from %s (the outer checkpoint holds none)", type(model).__name__, source["path"]
    )
    state = load_checkpoint(source["path"], preset=source["preset"], config_json=source["config_json"]).state_dict
    on_meta = any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        model.load_state_dict(state, strict=True, assign=on_meta)
    for p in model.parameters():
        p._is_hf_initialized = True
