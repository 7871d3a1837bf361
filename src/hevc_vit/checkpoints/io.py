"""Reading checkpoint files safely: ``config.json``, safetensors (headers alone, or all tensors), and pickles
through ``torch.load(weights_only=True)`` only — a pickle that needs any other Python object is refused,
naming the object, and never retried unsafely.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch._weights_only_unpickler import _get_allowed_globals

from hevc_vit.files import CONFIG_NAME, PYTORCH_NAME, SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME


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
        op = pickletools.code2op.get(chr(int(m.group(1))))
        reason += f" (the pickle instruction {op.name})" if op is not None else ""
    return reason


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _blocked_globals(path: str | os.PathLike) -> list[str]:
    """``module.name`` of every global a pickle file (``torch.save`` zip or plain pickle) imports that the
    safe loader does not allow, read from its opcodes — nothing is executed. Empty when unsure."""
    try:
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
                    name, stripped = name[len(prefix) :], True
        if name in state:
            raise ValueError(
                f"{path}: {key!r} and another weight both become {name!r} once wrapper prefixes are removed"
            )
        state[name] = value
    return state
