"""``hevc-vit info``: a checkpoint's format, architecture (and the preset it matches), parameter count,
dtype and file sizes, and whether its weights load strictly."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from hevc_vit.checkpoints import LoadedCheckpoint, load_checkpoint
from hevc_vit.checkpoints.architecture import check_weights_fit, sibling_config_json
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.files import CONFIG_NAME
from hevc_vit.modeling import HEVCViTModel, load_state_dict_checked


def describe_architecture(config: HEVCViTConfig) -> str:
    """One line: the numbers, the norm and the preset they match."""
    preset = config.matching_preset()
    head_eps = config.head_norm_eps
    return (
        f"patch {config.patch_size}, width {config.hidden_size}, heads {config.num_attention_heads} "
        f"(head_dim {config.head_dim}), layers {config.num_hidden_layers}, mlp {config.intermediate_size}, "
        f"{config.layer_norm_type} eps {config.layer_norm_eps:g}"
        + (f" (head norm eps {head_eps:g})" if head_eps is not None else "")
        + f", pooling head {'yes' if config.use_head else 'no'}, image_size {config.image_size}; "
        + (f"preset {preset}" if preset else "no preset (custom)")
    )


def architecture_source(src: Path, preset: str | None, config_json: str | os.PathLike | None) -> str:
    """Where the architecture of a weights-only SRC comes from, in words."""
    if preset is not None:
        return f"preset {preset!r}"
    if config_json is not None:
        return str(config_json)
    sidecar = sibling_config_json(src)
    return f"{sidecar} and tensor shapes" if sidecar is not None else "tensor shapes"


def format_size(size: int) -> str:
    """Bytes in binary units: ``691.4 KiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@dataclass
class CheckpointInfo:
    path: Path
    format: str
    model_type: str | None
    config: HEVCViTConfig
    num_parameters: int
    dtypes: dict[str, int]  # dtype name -> parameters stored in it
    files: list[tuple[str, int]]  # (name, bytes)
    fits: str  # "yes", or the strict-loading error

    def render(self) -> str:
        """The text ``hevc-vit info`` prints."""
        total = sum(self.dtypes.values()) or 1
        if len(self.dtypes) == 1:
            dtypes = next(iter(self.dtypes))
        else:
            dtypes = ", ".join(f"{name} ({100 * n / total:.1f}%)" for name, n in self.dtypes.items())
        kind = f" (model_type {self.model_type})" if self.model_type else " (weights only, no config.json)"
        lines = [
            f"path:          {self.path}",
            f"format:        {self.format}{kind}",
            f"architecture:  {describe_architecture(self.config)}",
            f"parameters:    {self.num_parameters:,}",
            f"dtype:         {dtypes}",
            f"weights fit:   {self.fits}",
            "files:",
        ]
        for name, size in self.files:
            lines.append(f"  {name:<40}{format_size(size):>12}")
        lines.append(f"  {'total':<40}{format_size(sum(size for _, size in self.files)):>12}")
        return "\n".join(lines)


def describe_checkpoint(
    path: str | os.PathLike, preset: str | None = None, config_json: str | os.PathLike | None = None
) -> CheckpointInfo:
    """Format, architecture (and the preset it matches), parameter count, dtype and file sizes of a
    checkpoint of any format; ``fits`` says whether the weights load strictly into that architecture."""
    path = Path(path)
    loaded = load_checkpoint(path, preset=preset, config_json=config_json, check_fit=False)
    model_type = None
    if (path / CONFIG_NAME).is_file():
        with open(path / CONFIG_NAME, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    dtypes = Counter()
    for v in loaded.state_dict.values():
        dtypes[str(v.dtype).removeprefix("torch.")] += v.numel()
    return CheckpointInfo(
        path=path,
        format=loaded.format,
        model_type=model_type,
        config=loaded.config,
        num_parameters=sum(dtypes.values()),
        dtypes=dict(dtypes.most_common()),
        files=_files(path, preset, config_json),
        fits=_fits(loaded, path, model_type, preset, config_json),
    )


def _files(path: Path, preset: str | None, config_json: str | os.PathLike | None) -> list[tuple[str, int]]:
    """``(name, bytes)`` of the checkpoint's files: a folder's, or a file and its side-car JSON."""
    if path.is_dir():
        return sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.is_file())
    files = [(path.name, path.stat().st_size)]
    sidecar = config_json if config_json is not None else (None if preset else sibling_config_json(path))
    if sidecar is not None:
        files.append((Path(sidecar).name, Path(sidecar).stat().st_size))
    return files


def _fits(
    loaded: LoadedCheckpoint,
    path: Path,
    model_type: str | None,
    preset: str | None,
    config_json: str | os.PathLike | None,
) -> str:
    """``"yes (strict load)"``, or ``"NO: "`` and why the weights do not load strictly."""
    try:
        source = str(path / CONFIG_NAME) if model_type is not None else architecture_source(path, preset, config_json)
        check_weights_fit(loaded.config, loaded.state_dict, loaded.format, path, source)  # before building
        with torch.device("meta"):
            model = HEVCViTModel(loaded.config)
        load_state_dict_checked(model, loaded.state_dict, strict=True, assign=True)
    except ValueError as e:
        return f"NO: {e}"
    return "yes (strict load)"
