"""Checkpoint formats: recognising them, reading their weights safely, and converting key names.

Formats (see DESIGN.md):
    hevc_vit   this library's own folders (``model_type: hevc_vit``); weight names as ``packing``.
    packing    the reference packing model (``model_type: llava_vit_packing``): ``patch_embed.proj``,
               fused ``self_attn.qkv`` (rows q, k, v), ``self_attn.proj``.
    standard   the Hugging Face OneVision encoder (``model_type: onevision_encoder`` or ``llava_vit``):
               ``embeddings.patch_embedding``, ``self_attn.{q,k,v,out}_proj``.

Conversion is a pure ``state_dict -> state_dict`` function over a declarative key table; both models of
this library hold the ``packing`` names, so every format is converted to those on load.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"

MODEL_TYPES: dict[str, str] = {
    "hevc_vit": "hevc_vit",
    "llava_vit_packing": "packing",
    "onevision_encoder": "standard",
    "llava_vit": "standard",
}
NATIVE_FORMATS = ("hevc_vit", "packing")  # formats whose weight names the models hold as they are


# --------------------------------------------------------------------------------------------------
# the key table
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """``sources`` (foreign names) become ``target`` (native name); several sources are concatenated on
    dim 0, in order — and split back into equal parts when converting the other way. ``{i}`` is a layer."""

    sources: tuple[str, ...]
    target: str


def _attn_rules(fmt_qkv: tuple[str, str, str], fmt_out: str) -> list[KeyRule]:
    rules = []
    for suffix in ("weight", "bias"):
        rules.append(
            KeyRule(
                tuple(f"encoder.layers.{{i}}.self_attn.{name}.{suffix}" for name in fmt_qkv),
                f"encoder.layers.{{i}}.self_attn.qkv.{suffix}",
            )
        )
        rules.append(
            KeyRule((f"encoder.layers.{{i}}.self_attn.{fmt_out}.{suffix}",), f"encoder.layers.{{i}}.self_attn.proj.{suffix}")
        )
    return rules


STANDARD_RULES: tuple[KeyRule, ...] = (
    KeyRule(("embeddings.patch_embedding.weight",), "patch_embed.proj.weight"),
    *_attn_rules(("q_proj", "k_proj", "v_proj"), "out_proj"),
)

FORMAT_RULES: dict[str, tuple[KeyRule, ...]] = {
    "hevc_vit": (),
    "packing": (),
    "standard": STANDARD_RULES,
}


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def convert_to_native(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename (and fuse) the weights of format ``fmt`` to the models' native names.

    Keys that no rule names pass through unchanged; strict loading reports any that do not belong.
    Raises ``ValueError`` when only some parts of a fused group are present or their shapes differ.
    """
    rules = _rules(fmt)
    out: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for rule in rules:
        first = _pattern(rule.sources[0])
        for key in state_dict:
            m = first.match(key)
            if m is None:
                continue
            names = [src.format(**m.groupdict()) for src in rule.sources]
            missing = [name for name in names if name not in state_dict]
            if missing:
                raise ValueError(f"checkpoint has {key} but not {missing}; the {fmt} format needs them together")
            parts = [state_dict[name] for name in names]
            if len({tuple(p.shape) for p in parts}) != 1:
                shapes = {name: tuple(p.shape) for name, p in zip(names, parts)}
                raise ValueError(f"parts to fuse into {rule.target} have different shapes: {shapes}")
            out[rule.target.format(**m.groupdict())] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            taken.update(names)
    for key, value in state_dict.items():
        if key not in taken:
            out.setdefault(key, value)
    return out


def convert_from_native(state_dict: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_to_native`: native names (and fused tensors) to format ``fmt``."""
    rules = _rules(fmt)
    out: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for rule in rules:
        pattern = _pattern(rule.target)
        for key, value in state_dict.items():
            m = pattern.match(key)
            if m is None:
                continue
            names = [src.format(**m.groupdict()) for src in rule.sources]
            if value.shape[0] % len(names):
                raise ValueError(f"{key} has shape {tuple(value.shape)}; dim 0 must split into {len(names)} equal parts")
            for name, part in zip(names, value.chunk(len(names), dim=0)):
                out[name] = part.clone() if len(names) > 1 else part
            taken.add(key)
    for key, value in state_dict.items():
        if key not in taken:
            out.setdefault(key, value)
    return out


def _rules(fmt: str) -> tuple[KeyRule, ...]:
    if fmt not in FORMAT_RULES:
        raise ValueError(f"checkpoint format {fmt!r} is unknown; expected one of {sorted(FORMAT_RULES)}")
    return FORMAT_RULES[fmt]


# --------------------------------------------------------------------------------------------------
# reading folders
# --------------------------------------------------------------------------------------------------


def detect_format(config_dict: Mapping[str, Any], keys: set[str] | None = None) -> str:
    """The format of a checkpoint from its ``config.json`` contents (and, failing that, its key names)."""
    model_type = config_dict.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    if keys is not None:
        if any(k.startswith("embeddings.patch_embedding") for k in keys):
            return "standard"
        if any(k.startswith("patch_embed.proj") for k in keys):
            return "packing"
    raise ValueError(f"config.json has model_type={model_type!r}; expected one of {sorted(MODEL_TYPES)}")


def read_config_dict(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; expected a Hugging Face checkpoint folder")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


# config.json keys that describe the file, not the architecture
_NON_ARCH_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map"}


def config_kwargs(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :class:`HEVCViTConfig` from any supported ``config.json``."""
    return {k: v for k, v in config_dict.items() if k not in _NON_ARCH_KEYS}


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint folder: ``model.safetensors``, a sharded safetensors index, or
    ``pytorch_model.bin`` read with ``torch.load(weights_only=True)`` — never an arbitrary unpickle."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / SAFETENSORS_NAME).is_file():
        return load_file(folder / SAFETENSORS_NAME)
    if (folder / SAFETENSORS_INDEX_NAME).is_file():
        with open(folder / SAFETENSORS_INDEX_NAME, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if (folder / PYTORCH_NAME).is_file():
        return torch.load(folder / PYTORCH_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{folder} has no weights; expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"
    )
