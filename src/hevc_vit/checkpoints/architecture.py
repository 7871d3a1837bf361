"""The architecture of a checkpoint: from a preset or a JSON file, from what the weight shapes tell, and
whether a config fits its weights — checked before any model is built.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hevc_vit.checkpoints.names import LEGACY_HEAD_NORM_EPS, LEGACY_LAYER_NORM_EPS, convert_from_native
from hevc_vit.configuration import PRESETS, HEVCViTConfig, architecture_keys, check_hyperparameters

# the architecture of a weights-only file
# --------------------------------------------------------------------------------------------------

# config.json keys that describe the file, not the architecture
_NON_ARCH_KEYS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map"}


def config_kwargs(config_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for :class:`HEVCViTConfig` from any supported ``config.json``."""
    return {k: v for k, v in config_dict.items() if k not in _NON_ARCH_KEYS}


def config_from_dict(config_dict: Mapping[str, Any], source: str | os.PathLike) -> HEVCViTConfig:
    """:class:`HEVCViTConfig` from a ``config.json``'s contents; a value of the wrong type or out of range
    is a ``ValueError`` naming ``source``, the field, the value and what was expected. Nothing is built."""
    try:
        return HEVCViTConfig(**config_kwargs(config_dict))
    except (ValueError, TypeError) as e:  # transformers' own config checks raise either
        raise ValueError(f"{source}: {e}") from None


# names a JSON architecture file may use besides HEVCViTConfig's own arguments
_EXTRA_ARCH_KEYS = {"head_dim", "attention_backend", "attn_implementation"}


def _config_arguments() -> set[str]:
    return set(architecture_keys())


def read_architecture_json(path: str | os.PathLike) -> dict[str, Any]:
    """Hyper-parameters from a JSON file: a legacy side-car (``model.json``) or any ``config.json``.

    Keys that are not hyper-parameters (descriptions, ``model_type``...) are ignored with a warning naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture JSON {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected an object of hyper-parameters")
    known = _config_arguments() | _EXTRA_ARCH_KEYS
    values = {k: v for k, v in config_kwargs(data).items() if k in known}
    ignored = sorted(k for k in data if k not in values and k not in _NON_ARCH_KEYS)
    if ignored:
        warnings.warn(f"{path}: ignoring {ignored}, which are not HEVC ViT hyper-parameters", stacklevel=2)
    return values


def infer_architecture(state_dict: Mapping[str, torch.Tensor], fmt: str = "hevc_vit") -> dict[str, tuple[Any, str]]:
    """What the tensor shapes of a native state_dict tell: ``{name: (value, evidence)}``.

    ``evidence`` names the tensor (in the names of format ``fmt``) and its shape, for error messages.
    ``num_attention_heads`` cannot be read from shapes and is never returned.
    """

    def evidence(native_key: str) -> str:
        return f"{_stored_name(native_key, state_dict[native_key], fmt)} {tuple(state_dict[native_key].shape)}"

    found: dict[str, tuple[Any, str]] = {}
    key = "patch_embed.proj.weight"
    if key in state_dict:
        shape = tuple(state_dict[key].shape)
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(f"{evidence(key)}: expected a Conv2d weight (D, C, p, p)")
        found["hidden_size"] = (shape[0], evidence(key))
        found["num_channels"] = (shape[1], evidence(key))
        found["patch_size"] = (shape[2], evidence(key))
    layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    if layers:
        last = sorted(k for k in state_dict if k.startswith(f"encoder.layers.{layers[-1]}."))[0]
        found["num_hidden_layers"] = (layers[-1] + 1, f"the last layer's {evidence(last)}")
    key = f"encoder.layers.{layers[0]}.mlp.fc1.weight" if layers else ""
    if key in state_dict:
        found["intermediate_size"] = (tuple(state_dict[key].shape)[0], evidence(key))
    if "layernorm_pre.weight" in state_dict:
        with_bias = "layernorm_pre.bias" in state_dict
        found["layer_norm_type"] = (
            "layer_norm" if with_bias else "rms_norm",
            evidence("layernorm_pre.weight") + (" with a bias" if with_bias else " without a bias"),
        )
    if state_dict:
        has_head = "head.probe" in state_dict
        found["use_head"] = (has_head, "head.probe present" if has_head else "no head.* weights")
    return found


def _stored_name(native_key: str, tensor: torch.Tensor, fmt: str) -> str:
    """The name a native weight has in format ``fmt`` (the first part of a fused one)."""
    return next(iter(convert_from_native({native_key: tensor}, fmt)))


def expected_shapes(config: HEVCViTConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the architecture ``config`` describes, native name -> shape, computed without
    building the model (a nonsense config must not allocate one)."""
    D, M, C, p = config.hidden_size, config.intermediate_size, config.num_channels, config.patch_size
    norm = ("weight",) if config.layer_norm_type == "rms_norm" else ("weight", "bias")

    def mlp(prefix: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.fc1.weight": (M, D), f"{prefix}.fc1.bias": (M,),
            f"{prefix}.fc2.weight": (D, M), f"{prefix}.fc2.bias": (D,),
        }  # fmt: skip

    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (D, C, p, p)}
    shapes.update({f"layernorm_pre.{s}": (D,) for s in norm})
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        shapes.update({f"{layer}.layer_norm1.{s}": (D,) for s in norm})
        shapes.update({
            f"{layer}.self_attn.qkv.weight": (3 * D, D), f"{layer}.self_attn.qkv.bias": (3 * D,),
            f"{layer}.self_attn.proj.weight": (D, D), f"{layer}.self_attn.proj.bias": (D,),
        })  # fmt: skip
        shapes.update({f"{layer}.layer_norm2.{s}": (D,) for s in norm})
        shapes.update(mlp(f"{layer}.mlp"))
    shapes.update({f"layernorm_post.{s}": (D,) for s in norm})
    if config.use_head:
        shapes.update({
            "head.probe": (1, 1, D),
            "head.attention.in_proj_weight": (3 * D, D), "head.attention.in_proj_bias": (3 * D,),
            "head.attention.out_proj.weight": (D, D), "head.attention.out_proj.bias": (D,),
            "head.norm.weight": (D,),
        })  # fmt: skip
        shapes.update(mlp("head.mlp"))
    return shapes


def check_weights_fit(
    config: HEVCViTConfig, state_dict: Mapping[str, torch.Tensor], fmt: str, where: str | os.PathLike, source: str
) -> None:
    """Raise ``ValueError`` when the architecture ``config`` (read from ``source``) does not fit the weights
    ``state_dict`` (native names; meta tensors will do): every hyper-parameter the tensor shapes contradict,
    and every weight whose shape differs from the one the config gives. Builds nothing, so a config that
    does not match its weights never allocates a model. Missing and unexpected weights are left to the
    strict load."""
    problems = [
        f"{name}={getattr(config, name)!r} but {why} gives {name}={value!r}"
        for name, (value, why) in infer_architecture(state_dict, fmt).items()
        if getattr(config, name) != value
    ]
    expected = expected_shapes(config)
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            stored = _stored_name(key, tensor, fmt)
            label = key if stored == key else f"{key} (from {stored})"
            problems.append(f"{label}: expected {expected[key]}, found {tuple(tensor.shape)}")
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(
            f"shape mismatch: the architecture from {source} does not fit the weights in {where}: "
            + "; ".join(problems[:8])
            + more
        )


def sibling_config_json(path: str | os.PathLike) -> Path | None:
    """``model.json`` beside ``model.pt``: the side-car a legacy checkpoint's architecture is read from."""
    candidate = Path(path).with_suffix(".json")
    return candidate if Path(path).is_file() and candidate.is_file() else None


def resolve_architecture(
    state_dict: Mapping[str, torch.Tensor],
    fmt: str,
    path: Path,
    preset: str | None,
    config_json: str | os.PathLike | None,
) -> HEVCViTConfig:
    """The config of a weights-only checkpoint: preset or JSON values, checked against and completed by
    what the shapes tell."""
    if preset is not None and config_json is not None:
        raise ValueError(f"preset={preset!r} and config_json={str(config_json)!r}: pass one of them, not both")
    given: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}; expected one of {sorted(PRESETS)}")
        given, source = dict(PRESETS[preset]), f"preset {preset!r}"
    else:
        config_json = config_json if config_json is not None else sibling_config_json(path)
        if config_json is not None:
            given, source = read_architecture_json(config_json), str(config_json)
    if given:
        try:
            check_hyperparameters({k: v for k, v in given.items() if k != "head_dim"})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    inferred = infer_architecture(state_dict, fmt)
    conflicts = [
        f"{name}={given[name]!r} but {why} gives {name}={value!r}"
        for name, (value, why) in inferred.items()
        if name in given and given[name] != value
    ]
    if conflicts:
        raise ValueError(
            f"shape mismatch: the architecture from {source} does not fit the weights in {path}: "
            + "; ".join(conflicts)
        )
    values = {name: value for name, (value, _) in inferred.items()}
    values.update(given)
    head_dim = values.pop("head_dim", None)
    if head_dim is not None:
        hidden = values.get("hidden_size")
        bad = not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0
        if bad or hidden is None or hidden % head_dim:
            raise ValueError(f"head_dim={head_dim!r} does not divide hidden_size={hidden!r}")
        heads = values.setdefault("num_attention_heads", hidden // head_dim)
        if heads * head_dim != hidden:
            raise ValueError(
                f"head_dim={head_dim} and num_attention_heads={heads} disagree with hidden_size={hidden} "
                f"(from {source})"
            )
    if "num_attention_heads" not in values:
        width = values.get("hidden_size")
        matches = [name for name, numbers in PRESETS.items() if numbers["hidden_size"] == width]
        if len(matches) != 1:
            raise ValueError(
                f"num_attention_heads of {path} cannot be read from tensor shapes (hidden_size={width} matches "
                f"{'no preset' if not matches else 'presets ' + str(matches)}); pass a preset or a JSON file "
                f"with num_attention_heads (or head_dim)"
            )
        values["num_attention_heads"] = PRESETS[matches[0]]["num_attention_heads"]
    if fmt == "legacy":
        values.setdefault("layer_norm_eps", LEGACY_LAYER_NORM_EPS)
        values.setdefault("head_norm_eps", LEGACY_HEAD_NORM_EPS)
    try:
        return HEVCViTConfig(**values)
    except ValueError as e:
        raise ValueError(f"the architecture of {path}{f' (from {source})' if given else ''}: {e}") from None
