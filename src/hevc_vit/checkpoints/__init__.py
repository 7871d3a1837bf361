"""Checkpoint formats: recognising them, reading their weights safely, and converting key names.

Formats:
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

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from hevc_vit.checkpoints.architecture import (
    check_weights_fit,
    config_from_dict,
    resolve_architecture,
    sibling_config_json,
)
from hevc_vit.checkpoints.io import (
    extract_state_dict,
    read_config_dict,
    read_safetensors,
    read_state_dict,
    read_torch_file,
    read_weight_shapes,
)
from hevc_vit.checkpoints.names import NATIVE_FORMATS, convert_to_native, detect_format, detect_format_from_keys
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.files import CONFIG_NAME

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
    config = resolve_architecture(state, fmt, path, preset, config_json)
    if check_fit:
        sidecar = config_json if config_json is not None else sibling_config_json(path)
        source = f"preset {preset!r}" if preset is not None else str(sidecar or "tensor shapes")
        check_weights_fit(config, state, fmt, path, source)
    return LoadedCheckpoint(config, state, fmt)
