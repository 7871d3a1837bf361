"""Checkpoint formats: recognising them, reading their weights safely, and converting key names.

Formats (see DESIGN.md):
    hevc_vit   this library's own folders (``model_type: hevc_vit``); weight names as ``packing``.
    packing    the reference packing model (``model_type: llava_vit_packing``): ``patch_embed.proj``,
               fused ``self_attn.qkv`` (rows q, k, v), ``self_attn.proj``.
    standard   the Hugging Face OneVision encoder (``model_type: onevision_encoder`` or ``llava_vit``):
               ``embeddings.patch_embedding``, ``self_attn.{q,k,v,out}_proj``.
    legacy     training checkpoints: one ``.pt`` file, no config (``conv1``, ``ln_pre``,
               ``transformer.layers.N.{ln_1,attn.in_proj,attn.out_proj,ln_2,mlp.0,mlp.2}``, ``ln_post``, ``head``);
               the architecture comes from a preset or a JSON file plus what the tensor shapes tell.

Conversion is a pure ``state_dict -> state_dict`` function over a declarative key table; both models of
this library hold the ``packing`` names, so every format is converted to those on load.
:func:`load_checkpoint` is the one entry point for reading any of them (``from_pretrained`` and
``hevc-vit convert`` both use it). Weights are read with safetensors or ``torch.load(weights_only=True)``;
a pickle that needs any other Python object is refused, never retried unsafely.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from .configuration import PRESETS, HEVCViTConfig, architecture_keys

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
            KeyRule((f"encoder.layers.{{i}}.self_attn.{fmt_out}.{suffix}",), f"encoder.layers.{{i}}.self_attn.proj.{suffix}")
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
    folder = Path(folder)
    if (folder / SAFETENSORS_NAME).is_file():
        return read_safetensors(folder / SAFETENSORS_NAME)
    if (folder / SAFETENSORS_INDEX_NAME).is_file():
        index = folder / SAFETENSORS_INDEX_NAME
        with open(index, encoding="utf-8") as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index (expected a 'weight_map'): {e!r}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names the shard {shard}, which is not in {folder}")
            state.update(read_safetensors(folder / shard))
        return state
    if (folder / PYTORCH_NAME).is_file():
        return extract_state_dict(read_torch_file(folder / PYTORCH_NAME), folder / PYTORCH_NAME)
    raise FileNotFoundError(
        f"{folder} has no weights; expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"
    )


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that needs Python objects other than tensors and plain containers."""


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a damaged file raises ``ValueError`` naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error type for damaged headers and short files
        raise ValueError(f"{path} could not be read as safetensors (corrupt or truncated?): {e}") from None


def read_torch_file(path: str | os.PathLike) -> Any:
    """The contents of a ``torch.save`` file, read with ``torch.load(weights_only=True)`` only.

    Raises :class:`UnsafeCheckpointError` when the pickle needs any other Python object (it is never
    retried unsafely) and ``ValueError`` when the file is damaged, both naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        message = str(e)
        m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|Please use|Check the documentation|$)", message, re.S)
        detail = " ".join(m.group(1).split()).removesuffix(".") if m else (message.splitlines() or [""])[0]
        if message.startswith("Weights only load failed"):
            raise UnsafeCheckpointError(
                f"{path} was refused: the safe loader torch.load(weights_only=True) cannot read it ({detail}); it "
                f"needs Python objects or pickle features beyond tensors and plain containers. hevc-vit never "
                f"unpickles arbitrary objects or runs code from a checkpoint; if you trust the file, re-save its "
                f"state_dict (tensors only) in a trusted environment"
            ) from None
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint (corrupt or truncated?): {detail}"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint (corrupt or truncated?): {type(e).__name__}: {text}"
        ) from None


# prefixes that wrappers add to every name: DistributedDataParallel / DataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# where training scripts put the model's state_dict inside a saved dict
_STATE_DICT_KEYS = ("model", "state_dict")


def extract_state_dict(obj: Any, path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights inside a loaded ``.pt`` object: the dict itself, or the one under ``"model"`` /
    ``"state_dict"``; ``module.`` and ``_orig_mod.`` prefixes are removed from every name."""
    for _ in range(2):  # e.g. {"state_dict": {"model": {...}}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict of tensors (a state_dict)")
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not obj or others:
        found = f"non-tensor entries {others[:8]}" if others else "nothing"
        raise ValueError(
            f"{path} has {found} where weights were expected; expected a state_dict (name -> tensor) at the top "
            f"level or under one of {list(_STATE_DICT_KEYS)}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in state:
            raise ValueError(
                f"{path}: {key!r} and another weight both become {name!r} once wrapper prefixes are removed"
            )
        state[name] = value
    return state


# --------------------------------------------------------------------------------------------------
# the architecture of a weights-only file
# --------------------------------------------------------------------------------------------------

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
        names = list(convert_from_native({native_key: state_dict[native_key]}, fmt))
        return f"{names[0]} {tuple(state_dict[native_key].shape)}"

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


def sibling_config_json(path: str | os.PathLike) -> Path | None:
    """``model.json`` beside ``model.pt``: the side-car a legacy checkpoint's architecture is read from."""
    candidate = Path(path).with_suffix(".json")
    return candidate if Path(path).is_file() and candidate.is_file() else None


def _architecture(
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
        if not isinstance(head_dim, int) or head_dim <= 0 or hidden is None or hidden % head_dim:
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
    return HEVCViTConfig(**values)


# --------------------------------------------------------------------------------------------------
# the one entry point
# --------------------------------------------------------------------------------------------------


class LoadedCheckpoint(NamedTuple):
    """A checkpoint of any format, read: its config, its weights under the native names, its format."""

    config: HEVCViTConfig
    state_dict: dict[str, torch.Tensor]
    format: str


def load_checkpoint(
    path: str | os.PathLike,
    preset: str | None = None,
    config_json: str | os.PathLike | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint of any supported format: ``(config, native state_dict, format)``.

    path: a Hugging Face folder (``config.json`` + weights; format from its ``model_type``), or a
        weights-only file — a legacy training ``.pt`` (top-level state_dict or under ``"model"`` /
        ``"state_dict"``, ``module.`` / ``_orig_mod.`` prefixes removed) or a bare ``.safetensors`` —
        whose format is recognised from its key names.
    preset / config_json: the architecture of a weights-only file (one of them; without either, the JSON
        beside the file, ``model.json`` for ``model.pt``, is used when it exists). Whatever the tensor shapes
        tell is inferred and checked against them: a disagreement is a ``ValueError`` naming each
        hyper-parameter and the tensor that contradicts it. Legacy files keep their LayerNorm eps 1e-5.
    Tensors keep their stored dtype, on the CPU. Pickles are read with ``torch.load(weights_only=True)``
    only (:class:`UnsafeCheckpointError` otherwise).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        if preset is not None or config_json is not None:
            given = f"preset={preset!r}" if preset is not None else f"config_json={str(config_json)!r}"
            raise ValueError(
                f"{given} applies to weights-only files; {path} is a checkpoint folder with its own {CONFIG_NAME}"
            )
        config_dict = read_config_dict(path)
        raw = read_state_dict(path)
        fmt = detect_format(config_dict, set(raw))
        state = convert_to_native(raw, fmt) if fmt not in NATIVE_FORMATS else raw
        return LoadedCheckpoint(HEVCViTConfig(**config_kwargs(config_dict)), state, fmt)
    if path.is_dir():
        raw, where = read_state_dict(path), path
    elif path.suffix == ".safetensors":
        raw, where = read_safetensors(path), path
    else:
        raw, where = extract_state_dict(read_torch_file(path), path), path
    fmt = detect_format_from_keys(raw)
    if fmt is None:
        raise ValueError(
            f"{where}: the weight names {sorted(raw)[:4]}... fit no known format; expected legacy (conv1.*, "
            f"transformer.layers.*), standard (embeddings.patch_embedding.*) or packing (patch_embed.proj.*)"
        )
    state = convert_to_native(raw, fmt)
    return LoadedCheckpoint(_architecture(state, fmt, path, preset, config_json), state, fmt)
