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

import io
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from .configuration import PRESETS, HEVCViTConfig, architecture_keys, check_hyperparameters

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


def read_config_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """The contents of a folder's ``config.json``: a JSON object (``ValueError`` naming the file otherwise)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; expected a Hugging Face checkpoint folder")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {_json_type(data)}; expected an object of hyper-parameters")
    return data


def _json_type(value: Any) -> str:
    return {type(None): "null", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


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


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files holding a folder's weights (one, or the shards of an index); None if it has none."""
    if (folder / SAFETENSORS_NAME).is_file():
        return [folder / SAFETENSORS_NAME]
    if (folder / SAFETENSORS_INDEX_NAME).is_file():
        index = folder / SAFETENSORS_INDEX_NAME
        with open(index, encoding="utf-8") as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{index} is not a valid safetensors index (expected a 'weight_map'): {e!r}") from None
        for shard in shards:
            if not isinstance(shard, str) or not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names the shard {shard!r}, which is not in {folder}")
        return [folder / shard for shard in shards]
    return None


def read_weight_shapes(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The weights of a safetensors folder as meta tensors (name, shape, dtype; no data), from the file
    headers alone; None for a folder whose weights are a pickle (``pytorch_model.bin``)."""
    from safetensors import safe_open

    files = _safetensors_files(Path(folder))
    if files is None:
        return None
    dtypes = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip
    shapes: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    dtype = dtypes.get(part.get_dtype(), torch.float32)
                    shapes[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error type for damaged headers and short files
            raise ValueError(f"{path} could not be read as safetensors (corrupt or truncated?): {e}") from None
    return shapes


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint folder: ``model.safetensors``, a sharded safetensors index, or
    ``pytorch_model.bin`` read with ``torch.load(weights_only=True)`` — never an arbitrary unpickle."""
    folder = Path(folder)
    files = _safetensors_files(folder)
    if files is not None:
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(read_safetensors(path))
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
        if message.startswith("Weights only load failed"):
            raise UnsafeCheckpointError(_refusal(path, e)) from None
        detail = _refusal_reason(message)
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint (corrupt or truncated?): {detail}"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint (corrupt or truncated?): {type(e).__name__}: {text}"
        ) from None


def _refusal(path: str | os.PathLike, error: pickle.UnpicklingError) -> str:
    """The message for a pickle ``torch.load(weights_only=True)`` refused: what it needs, in torch's words
    and by name, and what to do — never torch's advice to retry with ``weights_only=False``."""
    # torch re-raises the unpickler's own error with its advice around it; the original is the context
    inner = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
    detail = _refusal_reason(str(inner))
    blocked = _blocked_globals(path)
    if not blocked:
        m = re.search(r"GLOBAL (\S+?)\.? (?:was not an allowed|whose module)", detail)
        blocked = [m.group(1)] if m else []
    if blocked:
        more = f" and {len(blocked) - 6} more" if len(blocked) > 6 else ""
        needs = f"the Python object{'s' if len(blocked) > 1 else ''} {', '.join(blocked[:6])}{more}"
    else:
        needs = "pickle features"
    return (
        f"{path} was refused: the safe loader torch.load(weights_only=True) cannot read it ({detail}). It needs "
        f"{needs}, beyond tensors and plain containers; hevc-vit never unpickles arbitrary objects or runs code "
        f"from a checkpoint. If you trust the file, re-save its state_dict (tensors only) in a trusted environment"
    )


def _refusal_reason(message: str) -> str:
    """The unpickler's own reason from a ``torch.load`` error, without torch's advice (``weights_only=False``,
    allow-listing): its sentences that mention neither."""
    message = message.split("WeightsUnpickler error:")[-1].replace("\033[1m", "").replace("\033[0m", "")
    sentences = re.split(r"(?<=\.)\s+|\n+", message)
    keep = [
        " ".join(s.split()).removesuffix(".")
        for s in sentences
        if s.strip()
        and not re.search(r"weights_only|safe_globals|Weights only load failed|trust|documentation|file an issue", s)
    ]
    reason = "; ".join(keep) or "a pickle it does not support"
    m = re.fullmatch(r"Unsupported operand (\d+)", reason)
    if m:
        import pickletools

        op = pickletools.code2op.get(chr(int(m.group(1))))
        reason += f" (the pickle instruction {op.name})" if op is not None else ""
    return reason


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _blocked_globals(path: str | os.PathLike) -> list[str]:
    """``module.name`` of every global a pickle file (``torch.save`` zip or plain pickle) imports that the
    safe loader does not allow, read from its opcodes — nothing is executed. Empty when unsure."""
    import pickletools
    import zipfile

    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # torch's own allowlist

        allowed = set(_get_allowed_globals())
    except Exception:  # a private API: without it, name every global
        allowed = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(name) for name in z.namelist() if name.endswith(".pkl")]
        else:
            with open(path, "rb") as f:
                blobs = [f.read(64 << 20)]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    for blob in blobs:
        stream = io.BytesIO(blob)
        while stream.tell() < len(blob):  # legacy torch files hold several pickles, then raw storage bytes
            recent: list[str | None] = []  # what the last opcodes pushed, when it was a string
            memo: dict[int, str | None] = {}
            try:
                for op, arg, _ in pickletools.genops(stream):
                    name = None
                    if op.name in _STRING_OPS:
                        recent.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                        continue
                    if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                        memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
                        continue
                    if op.name in ("GET", "BINGET", "LONG_BINGET"):
                        recent.append(memo.get(int(arg)))
                        continue
                    if op.name in ("GLOBAL", "INST"):
                        name = str(arg).replace(" ", ".")
                    elif op.name == "STACK_GLOBAL" and len(recent) >= 2 and None not in recent[-2:]:
                        name = f"{recent[-2]}.{recent[-1]}"
                    recent.append(None)
                    if name is not None and name.startswith("__builtin__."):  # protocol 2 spells builtins so
                        name = "builtins." + name.removeprefix("__builtin__.")
                    if name is not None and name not in allowed and name not in found:
                        found.append(name)
            except Exception:  # not (or no longer) a pickle: the storage bytes of a legacy file
                break
    return found


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


# --------------------------------------------------------------------------------------------------
# the one entry point
# --------------------------------------------------------------------------------------------------


def read_folder_config(
    path: str | os.PathLike, check_fit: bool = True
) -> tuple[HEVCViTConfig, dict[str, Any], dict[str, torch.Tensor] | None]:
    """A checkpoint folder's validated config, its raw ``config.json`` dict and its weights' safetensors
    headers (meta tensors; None for a pickled ``pytorch_model.bin``). With ``check_fit`` the config is checked
    against the weight names and shapes before any tensor is read (:func:`check_weights_fit`)."""
    path = Path(path)
    config_dict = read_config_dict(path)
    config = config_from_dict(config_dict, path / CONFIG_NAME)
    headers = read_weight_shapes(path)
    if check_fit and headers is not None:
        fmt = detect_format(config_dict, set(headers))
        native = convert_to_native(headers, fmt) if fmt not in NATIVE_FORMATS else headers
        check_weights_fit(config, native, fmt, path, str(path / CONFIG_NAME))
    return config, config_dict, headers


class LoadedCheckpoint(NamedTuple):
    """A checkpoint of any format, read: its config, its weights under the native names, its format."""

    config: HEVCViTConfig
    state_dict: dict[str, torch.Tensor]
    format: str


def load_checkpoint(
    path: str | os.PathLike,
    preset: str | None = None,
    config_json: str | os.PathLike | None = None,
    check_fit: bool = True,
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

    A folder's ``config.json`` is validated first (a value of the wrong type or out of range is a
    ``ValueError`` naming the field), then, with ``check_fit``, checked against the weight names and shapes
    (:func:`check_weights_fit`; from the safetensors headers, before any tensor is read), so nothing is
    built for a config that cannot work or does not match its weights.
    """
    path = Path(path)
    if not path.exists():
        journal = path.parent / f".{path.name}.commit"  # see hevc_vit.convert: a commit killed half-way
        if journal.exists():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist: a conversion to it was interrupted while replacing it (see "
                f"{journal}); any hevc-vit convert to {path}, or hevc_vit.convert.finish_interrupted_commit("
                f"{str(path)!r}), puts the verified result in place"
            )
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        if preset is not None or config_json is not None:
            given = f"preset={preset!r}" if preset is not None else f"config_json={str(config_json)!r}"
            raise ValueError(
                f"{given} applies to weights-only files; {path} is a checkpoint folder with its own {CONFIG_NAME}"
            )
        config, config_dict, headers = read_folder_config(path, check_fit)
        raw = read_state_dict(path)
        fmt = detect_format(config_dict, set(raw))
        state = convert_to_native(raw, fmt) if fmt not in NATIVE_FORMATS else raw
        if check_fit and headers is None:
            check_weights_fit(config, state, fmt, path, str(path / CONFIG_NAME))
        return LoadedCheckpoint(config, state, fmt)
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
    config = _architecture(state, fmt, path, preset, config_json)
    if check_fit:
        sidecar = config_json if config_json is not None else sibling_config_json(path)
        source = f"preset {preset!r}" if preset is not None else str(sidecar or "tensor shapes")
        check_weights_fit(config, state, fmt, path, source)
    return LoadedCheckpoint(config, state, fmt)
