"""Weight names of every checkpoint format, and the pure ``state_dict -> state_dict`` conversion between
them over one declarative key table (see :mod:`hevc_vit.checkpoints` for the formats).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MODEL_TYPES: dict[str, str] = {
    "hevc_vit": "hevc_vit",
    "llava_vit_packing": "packing",
    "onevision_encoder": "standard",
    "llava_vit": "standard",
}
NATIVE_FORMATS = ("hevc_vit", "packing")  # formats whose weight names the models hold as they are

# the reference project's model_type and class name for each format a conversion can write
REFERENCE_MODEL_TYPES: dict[str, str] = {"packing": "llava_vit_packing", "standard": "onevision_encoder"}
REFERENCE_ARCHITECTURES: dict[str, str] = {"packing": "LlavaViTPackingModel", "standard": "OneVisionEncoderModel"}

# legacy training checkpoints used PyTorch's defaults: LayerNorm eps 1e-5, and the head's RMSNorm eps=None,
# which PyTorch resolves to the float32 machine epsilon
LEGACY_LAYER_NORM_EPS = 1e-5
LEGACY_HEAD_NORM_EPS = float(torch.finfo(torch.float32).eps)

# file names a weights-only (config-less) checkpoint may have
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


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
            KeyRule(
                (f"encoder.layers.{{i}}.self_attn.{fmt_out}.{suffix}",), f"encoder.layers.{{i}}.self_attn.proj.{suffix}"
            )
        )
    return rules


STANDARD_RULES: tuple[KeyRule, ...] = (
    KeyRule(("embeddings.patch_embedding.weight",), "patch_embed.proj.weight"),
    *_attn_rules(("q_proj", "k_proj", "v_proj"), "out_proj"),
)


def _legacy_rules() -> tuple[KeyRule, ...]:
    renames = [("conv1.weight", "patch_embed.proj.weight")]
    for suffix in ("weight", "bias"):
        renames += [(f"ln_pre.{suffix}", f"layernorm_pre.{suffix}"), (f"ln_post.{suffix}", f"layernorm_post.{suffix}")]
        for old, new in (
            ("ln_1", "layer_norm1"),
            ("attn.in_proj", "self_attn.qkv"),  # already fused, rows q, k, v
            ("attn.out_proj", "self_attn.proj"),
            ("ln_2", "layer_norm2"),
            ("mlp.0", "mlp.fc1"),
            ("mlp.2", "mlp.fc2"),
        ):
            renames.append((f"transformer.layers.{{i}}.{old}.{suffix}", f"encoder.layers.{{i}}.{new}.{suffix}"))
    return tuple(KeyRule((old,), new) for old, new in renames)


# the head (`head.probe`, `head.attention.*`, `head.norm.weight`, `head.mlp.*`) has one name in every format
LEGACY_RULES: tuple[KeyRule, ...] = _legacy_rules()

FORMAT_RULES: dict[str, tuple[KeyRule, ...]] = {
    "hevc_vit": (),
    "packing": (),
    "standard": STANDARD_RULES,
    "legacy": LEGACY_RULES,
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
            if len(parts) > 1 and any(p.dim() == 0 for p in parts):
                shapes = {name: tuple(p.shape) for name, p in zip(names, parts)}
                raise ValueError(f"parts to fuse into {rule.target} have shapes {shapes}; expected (rows, ...) each")
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
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}; dim 0 must split into {len(names)} equal parts"
                )
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
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    fmt = detect_format_from_keys(keys) if keys is not None else None
    if fmt is not None:
        return fmt
    raise ValueError(f"config.json has model_type={model_type!r}; expected one of {sorted(MODEL_TYPES)}")


def detect_format_from_keys(keys: set[str] | Mapping[str, Any]) -> str | None:
    """``standard``, ``packing`` or ``legacy`` from the weight names alone; None when none fits."""
    if any(k.startswith("embeddings.patch_embedding") for k in keys):
        return "standard"
    if any(k.startswith("patch_embed.proj") for k in keys):
        return "packing"
    if any(k.startswith(("conv1.", "transformer.layers.")) for k in keys):
        return "legacy"
    return None
