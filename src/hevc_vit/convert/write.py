"""The target folder: ``model.safetensors`` renamed to the target format and cast, ``config.json`` with the
reference project's ``model_type``, and ``preprocessor_config.json`` (SRC's own, or a CLIP processor).

Test seam: tests replace ``convert_from_native`` / ``reference_config_dict`` in this module to write a
wrong folder and check that verification catches it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from hevc_vit.checkpoints.names import REFERENCE_ARCHITECTURES, REFERENCE_MODEL_TYPES, convert_from_native
from hevc_vit.configuration import HEVCViTConfig, architecture_keys
from hevc_vit.convert.commit import no_stage
from hevc_vit.files import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    SAFETENSORS_NAME,
    fsync_folder,
    write_atomic,
    write_json_atomic,
)
from hevc_vit.processing.processors import FixedSizeProcessor

TARGET_FORMATS = ("packing", "standard")
# config.json keys written for the target formats (the architecture; the runtime backend is not written)
ARCH_KEYS = architecture_keys()


def reference_config_dict(config: HEVCViTConfig, fmt: str, dtype: torch.dtype) -> dict:
    """``config.json`` contents for target format ``fmt`` (the reference project's ``model_type``)."""
    if fmt not in REFERENCE_MODEL_TYPES:
        raise ValueError(f"target format {fmt!r}; expected one of {sorted(REFERENCE_MODEL_TYPES)}")
    d = {k: getattr(config, k) for k in ARCH_KEYS if k != "head_norm_eps"}
    head_eps = config.head_norm_eps
    if head_eps is not None:
        d["head_norm_eps"] = float(head_eps)
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(
        architectures=[REFERENCE_ARCHITECTURES[fmt]],
        model_type=REFERENCE_MODEL_TYPES[fmt],
        torch_dtype=dtype_name,  # transformers 4 reads this name ...
        dtype=dtype_name,  # ... transformers 5 this one
        transformers_version=transformers.__version__,
    )
    return dict(sorted(d.items()))


def clip_preprocessor_dict(image_size: int) -> dict:
    """A ``CLIPImageProcessor`` config at ``image_size`` (what the OneVision encoder's processor uses): the
    fixed-size processor's own, plus the legacy ``feature_extractor_type`` key older readers look for."""
    return {**FixedSizeProcessor(shortest_edge=image_size).to_dict(), "feature_extractor_type": "CLIPFeatureExtractor"}


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most parameters."""
    counts = Counter()
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] += v.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def target_state_dict(native: dict[str, torch.Tensor], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Native weights cast to ``dtype`` (floating tensors only) and renamed to format ``fmt``; every tensor
    contiguous and with its own storage, as safetensors requires."""
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in native.items()}
    out = convert_from_native(cast, fmt)
    seen: set[int] = set()
    for key, value in out.items():
        value = value.contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def write_folder(
    folder: Path,
    src: Path,
    native: dict[str, torch.Tensor],
    config: HEVCViTConfig,
    fmt: str,
    dtype: torch.dtype,
    on_stage: Callable[[str], None] = no_stage,
) -> None:
    """Write the checkpoint of ``native`` (SRC's weights, native names) into ``folder`` in format ``fmt``
    and ``dtype``, each file flushed to disk; ``on_stage("write")`` once the weights are written."""
    tensors = target_state_dict(native, fmt, dtype)
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    _fsync_file(folder / SAFETENSORS_NAME)
    del tensors
    on_stage("write")
    processor = src / PREPROCESSOR_NAME if src.is_dir() else None
    if processor is not None and processor.is_file():
        write_atomic(folder / PREPROCESSOR_NAME, processor.read_bytes())  # keep SRC's own processor settings
    else:
        write_json_atomic(folder / PREPROCESSOR_NAME, clip_preprocessor_dict(config.image_size))
    write_json_atomic(folder / CONFIG_NAME, reference_config_dict(config, fmt, dtype))
    # mkdtemp (and safetensors) create private files; DST gets the permissions of a folder made by hand
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
    fsync_folder(folder)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
