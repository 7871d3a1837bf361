"""Loading a checkpoint into a model: which loader runs, with which options.

* transformers 5 and a safetensors folder: transformers' own ``from_pretrained`` (``device_map`` incl.
  ``"auto"`` and per-module maps, ``max_memory``, ``quantization_config``, ``output_loading_info``, its dtype
  default), the reference names converted by the rules :mod:`hevc_vit.checkpoints.embedded` registers — except inside
  another model's ``from_pretrained`` (a LLaVA tower built on the meta device), where transformers refuses
  to nest;
* otherwise (legacy ``.pt`` files, pickled ``pytorch_model.bin`` folders, transformers 4.x, ``strict=False``):
  :func:`~hevc_vit.checkpoints.load_checkpoint` reads, renames and fuses the weights, and they are loaded
  strictly into a model built on the meta device.

Both check the config against the weights before building anything and load strictly; both record where the
weights came from (``model.checkpoint_source``) so they are never silently re-initialised.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from torch import nn
from transformers import PreTrainedModel

from hevc_vit.attention import backend_name, get_attention
from hevc_vit.checkpoints import load_checkpoint, read_folder_config
from hevc_vit.checkpoints.architecture import config_kwargs
from hevc_vit.checkpoints.names import TORCH_SUFFIXES
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.runtime.devices import parse_dtype

# from_pretrained keyword arguments that only steer downloading (forwarded to the Hub client or ignored)
HUB_KWARGS = {"cache_dir", "force_download", "local_files_only", "token", "revision", "proxies", "subfolder"}
IGNORED_KWARGS = {
    "trust_remote_code",
    "use_safetensors",
    "low_cpu_mem_usage",
    "resume_download",
    "code_revision",
    "adapter_kwargs",
}
TRANSFORMERS_ONLY_KWARGS = {"max_memory", "quantization_config", "offload_folder", "offload_state_dict", "key_mapping"}
TRANSFORMERS_LOADS_FOLDERS = int(transformers.__version__.split(".")[0]) >= 5
EMPTY_LOADING_INFO = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def load_pretrained(
    cls: type[PreTrainedModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *model_args: Any,
    config: HEVCViTConfig | None = None,
    attn_implementation: str | None = None,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | torch.device | dict | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> Any:
    """``cls.from_pretrained``: a checkpoint of any supported format (hevc_vit, packing, standard, legacy).

    pretrained_model_name_or_path: a checkpoint folder, a Hub id, or a weights-only file (a legacy training
        ``.pt``, a bare ``.safetensors``).
    preset / config_json: the architecture of a weights-only file (a preset name, or a JSON file of
        hyper-parameters); without them the JSON beside the file (``model.json`` for ``model.pt``) is used.
    dtype: None -> transformers' default for the loader that runs (the stored dtype under transformers 5,
        float32 otherwise); ``"auto"`` -> as stored; or a ``torch.dtype`` / its name.
    device_map: a device (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``{"": device}``), or, with transformers' loader,
        ``"auto"`` / a per-module map (these need ``accelerate``, as for any transformers model).
    attn_implementation: ours (``auto``, ``eager``, ``sdpa``, ``torch_varlen``, ``flash_attn``) or
        transformers' (``flash_attention_2`` ...): unknown -> ``ValueError``, unavailable -> ``ImportError``.
    output_loading_info: also return the missing / unexpected / mismatched keys (always empty: loads are strict).
    Other keyword arguments that name config attributes override them.
    """
    if model_args:
        raise TypeError(f"from_pretrained takes no extra positional arguments; got {len(model_args)}")
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
    preset, config_json = kwargs.pop("preset", None), kwargs.pop("config_json", None)
    if attn_implementation is not None:  # checked before anything is read
        get_attention(attn_implementation)
        attn_implementation = backend_name(attn_implementation)
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is not None and dtype != "auto":
        dtype = parse_dtype(dtype)
    path = resolve_folder(pretrained_model_name_or_path, hub)
    nested = torch.empty(()).device.type == "meta"  # inside another model's from_pretrained
    if TRANSFORMERS_LOADS_FOLDERS and strict and not nested and os.path.isdir(path) and not (preset or config_json):
        checked, _, headers = read_folder_config(path)
        if headers is not None:  # safetensors: transformers' own loader
            config = fresh_config(config or checked, kwargs, attn_implementation)
            model, info = _load_with_transformers(cls, path, config, dtype, device_map, kwargs)
            return _finish(model, pretrained_model_name_or_path, dict(path=path, preset=None, config_json=None), info)
    loaded = load_checkpoint(path, preset=preset, config_json=config_json)
    want_info = bool(kwargs.pop("output_loading_info", False))
    for key in [k for k in kwargs if k in IGNORED_KWARGS or k.startswith("_")]:
        kwargs.pop(key)
    config = fresh_config(config or loaded.config, kwargs, attn_implementation)
    _refuse_leftovers(kwargs)
    model = _build_and_load(cls, config, loaded.state_dict, strict)
    if dtype != "auto":
        model.to(torch.float32 if dtype is None else dtype)
    device = single_device(device_map)
    if device is not None:
        model.to(device)
    source = dict(path=path, preset=preset, config_json=config_json)
    return _finish(model, pretrained_model_name_or_path, source, dict(EMPTY_LOADING_INFO) if want_info else None)


def fresh_config(config: HEVCViTConfig, kwargs: dict[str, Any], attn_implementation: str | None) -> HEVCViTConfig:
    """A validated copy of ``config`` (loading never changes the caller's object) with the keyword arguments
    that name config attributes applied (and removed from ``kwargs``)."""
    config = HEVCViTConfig(**config_kwargs(config.to_dict()))
    for key in [k for k in kwargs if hasattr(config, k) and not k.startswith("_")]:
        setattr(config, key, kwargs.pop(key))
    if attn_implementation is not None:
        config.attention_backend = attn_implementation
    config.validate()
    return config


def _refuse_leftovers(kwargs: dict[str, Any]) -> None:
    if kwargs:
        hint = (
            " (transformers' own loader takes them: transformers >= 5 and a safetensors folder)"
            if set(kwargs) & TRANSFORMERS_ONLY_KWARGS
            else ""
        )
        raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(kwargs)}{hint}")


def _build_and_load(cls: type[PreTrainedModel], config: HEVCViTConfig, state: dict[str, torch.Tensor], strict: bool):
    if strict:
        with torch.device("meta"):
            model = cls(config)
        load_state_dict_checked(model, state, strict=True, assign=True)
    else:
        model = cls(config)
        load_state_dict_checked(model, state, strict=False)
    return model


def _load_with_transformers(cls, path: str, config: HEVCViTConfig, dtype, device_map, kwargs: dict[str, Any]):
    """transformers' ``from_pretrained`` for ``cls``, strict; a single device is placed here (transformers
    needs accelerate for any ``device_map``)."""
    want_info = bool(kwargs.pop("output_loading_info", False))
    for key in IGNORED_KWARGS & set(kwargs):
        kwargs.pop(key)
    device = single_device(device_map, transformers_loader=True)
    model, info = PreTrainedModel.from_pretrained.__func__(
        cls, path, config=config, dtype=dtype, device_map=device_map if device is None else None,
        output_loading_info=True, **kwargs,
    )  # fmt: skip
    if device is not None:
        model.to(device)
    info = dict(info)
    problems = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items() if v)
        raise ValueError(f"checkpoint {path} does not fit {cls.__name__}: {found}")
    model.set_attn_implementation(config.attention_backend)
    return model, (info if want_info else None)


def _finish(model, name_or_path, source: dict[str, Any], info: dict | None):
    model.config.name_or_path = str(name_or_path)
    model.checkpoint_source = source  # where to re-read the weights (see hevc_vit.checkpoints.embedded)
    model.eval()
    return (model, info) if info is not None else model


def load_state_dict_checked(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False
) -> None:
    """``load_state_dict`` with one ``ValueError`` that lists missing keys, unexpected keys and shape
    mismatches (name, expected shape, found shape); with ``strict=False`` only mismatches are errors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: expected {expected[k]}, found {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches [{'; '.join(mismatched)}]")
    if problems:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict, assign=assign)


def resolve_folder(name_or_path: str | os.PathLike, hub: dict[str, Any]) -> str:
    """A local folder or weights-only file as it is; anything else is fetched from the Hub."""
    subfolder = hub.pop("subfolder", None) or ""
    if os.path.isdir(name_or_path):
        return os.path.join(name_or_path, subfolder)
    if os.path.isfile(name_or_path):
        if subfolder:
            raise ValueError(f"subfolder={subfolder!r} was given, but {name_or_path!s} is a file, not a folder")
        return str(name_or_path)
    if str(name_or_path).endswith(TORCH_SUFFIXES + (".safetensors",)) or os.path.isabs(name_or_path):
        raise FileNotFoundError(f"checkpoint {name_or_path!s} does not exist")
    try:
        folder = snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.bin"], **hub)
    except Exception as e:  # the hub client raises many types; the message is what matters
        raise FileNotFoundError(
            f"{name_or_path!s} is not a local folder and could not be fetched from the Hugging Face Hub: {e}"
        ) from e
    return os.path.join(folder, subfolder)


def single_device(device_map: Any, transformers_loader: bool = False) -> torch.device | None:
    """The one device a ``device_map`` places the whole model on, or None: no placement, or a real map
    (``"auto"``, ``"balanced"``, per module) that transformers' loader applies. With this library's loader
    ``"auto"`` means CUDA when available, and a map must name one device."""
    if device_map is None:
        return None
    spread = isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        spread = set(device_map) != {""}
        if spread and not transformers_loader and len(devices) != 1:
            raise ValueError(
                f"device_map={device_map}; this loader places a model on one device, e.g. {{'': 'cuda:0'}}"
            )
        device_map = next(iter(devices))
    if spread and transformers_loader:
        return None
    if device_map == "auto" or spread:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)
