"""What a run encodes with: the packing model, the processor, the pooling, and the settings that
``encode_config.json`` records for ``--resume`` to compare.

Legend: ``D`` width.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging as transformers_logging

from hevc_vit.configuration import PRESETS, HEVCViTConfig
from hevc_vit.encode.options import DEFAULT_MODEL, EncodeOptions, recorded_options
from hevc_vit.files import PREPROCESSOR_NAME
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.processing.files import default_processor, load_processor
from hevc_vit.processing.processors import FixedSizeProcessor, ImageProcessor, NativeResolutionProcessor

if TYPE_CHECKING:
    from hevc_vit.modeling import HEVCViTPackingModel

DEMO_SEED = 0
# the architecture of the weights, recorded in encode_config.json (with a checksum of the weights)
ARCHITECTURE_FIELDS = (
    "patch_size",
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "num_channels",
    "use_head",
)


@dataclass
class Encoder:
    """The model of a run with its processor and pooling, resolved from the options."""

    model: HEVCViTPackingModel
    name: str  # what --resume compares: the preset, the checkpoint's absolute path, or the Hub id
    processor: ImageProcessor
    pool: str  # "head", "mean" or "none"


def prepare_encoder(
    options: EncodeOptions, device: torch.device, dtype: torch.dtype, say: Callable[[str], None]
) -> Encoder:
    """Load the model and build the processor the options ask for; refuse a pooling the model cannot do."""
    quiet = options.progress is False  # --quiet: transformers' loading bars and notes off too
    packing, name, random_weights = load_model(options.model, device, dtype, options.attn_implementation, quiet)
    config = packing.config
    if random_weights:
        say(
            f"model: {name}. These weights are random: the features only show that the pipeline runs. "
            f"Pass --model PATH (a checkpoint folder) for real features."
        )
    folder = name if isinstance(options.model, (str, os.PathLike)) and os.path.isdir(name) else None
    bounds = (options.min_image_tokens, options.max_image_tokens, options.max_video_tokens)
    processor = build_processor(options.processor, config, folder, *bounds)
    pool = options.pool or ("head" if config.use_head else "mean")
    if pool == "head" and not config.use_head:
        raise ValueError("pool='head' but the model has no pooling head (use_head=False); use 'mean' or 'none'")
    if options.pooled_only and pool == "none":
        raise ValueError("pooled_only=True with pool='none' would save nothing; choose pool 'head' or 'mean'")
    fit = processor.frames_that_fit(options.video_frames)
    if fit < options.video_frames and not options.codec_sparse:  # codec-sparse: frames sized as `fit`
        instead = f"each video is sampled at {fit} frames instead" if fit else "videos fail"
        say(
            f"note: frames={options.video_frames} at {processor.min_tokens} patches per frame (min_image_tokens) "
            f"exceed max_video_tokens={processor.max_video_tokens}; {instead}"
        )
    largest = largest_item(processor, options.video_frames, config.patch_size)
    if largest > options.max_tokens:
        say(
            f"note: max_tokens={options.max_tokens} is below the largest item this processor can make "
            f"({largest} patches); such items run alone, one per forward"
        )
    return Encoder(packing, name, processor, pool)


def run_settings(
    options: EncodeOptions, encoder: Encoder, dtype: torch.dtype, world_size: int, with_weights: bool
) -> dict[str, Any]:
    """What ``encode_config.json`` records: the recorded options (as resolved for this run), the architecture,
    the weights' checksum (``with_weights``: only rank 0 checks and writes settings) and the world size."""
    resolved = {
        "model": encoder.name,
        "processor": encoder.processor.to_dict(),
        "pool": encoder.pool,
        "dtype": str(dtype).removeprefix("torch."),
        "frames": options.video_frames,
        "normalize": options.normalizes,  # on with the clip-retrieval layout even when not asked for
    }
    settings = {name: resolved.get(name, getattr(options, name)) for name in recorded_options()}
    config = encoder.model.config
    settings["architecture"] = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS}
    settings["weights"] = weights_identity(encoder.model) if with_weights else None
    settings["world_size"] = world_size
    return settings


def load_model(
    model: str | os.PathLike | torch.nn.Module | None,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None = None,
    quiet: bool = False,
) -> tuple[HEVCViTPackingModel, str, bool]:
    """The packing model to encode with: ``(model, description, weights_are_random)``.

    model: None (the demo: the ``small`` preset), a preset name (random weights, seed 0), anything
        ``HEVCViTPackingModel.from_pretrained`` reads (a checkpoint folder of any supported format, a
        weights-only file, a Hub id ``org/name``), or a model object (``HEVCViTPackingModel``/``HEVCViTModel``).
    quiet: transformers' and the Hub's progress bars ("Loading weights", downloads) and notes off while loading.
    """
    if isinstance(model, torch.nn.Module):
        if isinstance(model, HEVCViTModel):  # same layers, same weight names: reuse the weights
            packing = HEVCViTPackingModel(model.config)
            packing.load_state_dict(model.state_dict())
            model = packing
        if not isinstance(model, HEVCViTPackingModel):
            raise ValueError(f"model is a {type(model).__name__}; expected an HEVCViTPackingModel or HEVCViTModel")
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        name = str(getattr(model.config, "name_or_path", "") or f"<{type(model).__name__} object>")
        return model.to(device=device, dtype=dtype).eval(), name, False
    name = os.fspath(model) if model is not None else DEFAULT_MODEL
    if name in PRESETS:
        config = HEVCViTConfig.from_preset(name, attn_implementation=attn_implementation)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DEMO_SEED)
            packing = HEVCViTPackingModel(config)
        return packing.to(device=device, dtype=dtype).eval(), f"preset:{name} (random weights, seed {DEMO_SEED})", True
    local = os.path.exists(name)
    hub_id = not local and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not (local or hub_id):
        raise ValueError(
            f"model={name!r} is neither a preset ({', '.join(PRESETS)}), nor an existing checkpoint folder or file, "
            f"nor a Hugging Face Hub id (org/name)"
        )
    with transformers_silenced(quiet):
        packing = HEVCViTPackingModel.from_pretrained(
            name, attn_implementation=attn_implementation, dtype=dtype, device_map=device
        )
    return packing.eval(), os.path.abspath(name) if local else name, False


@contextmanager
def transformers_silenced(quiet: bool) -> Iterator[None]:
    """transformers' progress bars (and with them the Hub's) and its notes below errors off inside, when ``quiet``;
    as they were afterwards."""
    if not quiet:
        yield
        return
    bars, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def weights_identity(model: torch.nn.Module) -> str:
    """``sha256:HEX`` over the model's tensors as loaded: name, dtype, shape and bytes of every state-dict entry,
    in name order. ``--resume`` compares it, so new weights saved at the same ``--model`` path are refused.

    Why the loaded tensors rather than the files: they are what the features depend on, whatever the checkpoint
    format (folder, single file, Hub id, model object), and a partial hash of the files (size, dates, first and
    last MB) would miss a fine-tune that left the first and last tensors alone. One pass over the weights costs
    about as much as loading them (~1 s per GB), once per run, on rank 0 only; tensors are copied to the host one
    at a time, so memory stays bounded.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        host = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{str(host.dtype).removeprefix('torch.')}:{tuple(host.shape)}\n".encode())
        digest.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def build_processor(
    processor: str | os.PathLike | ImageProcessor,
    config: HEVCViTConfig,
    model_folder: str | None = None,
    min_image_tokens: int | None = None,
    max_image_tokens: int | None = None,
    max_video_tokens: int | None = None,
) -> ImageProcessor:
    """The processor: ``"native"`` (default), ``"clip"``, a ``preprocessor_config.json`` path, or an object.

    ``native`` and ``clip`` take their normalisation from the checkpoint's ``preprocessor_config.json`` when
    the model folder has one (a native one there is used as is, with the token bounds given here on top).
    """
    bounds = dict(min_tokens=min_image_tokens, max_tokens=max_image_tokens, max_video_tokens=max_video_tokens)
    overrides = {k: v for k, v in bounds.items() if v is not None}
    if isinstance(processor, ImageProcessor):
        chosen = processor
    elif processor in ("native", "clip"):
        base = None
        if model_folder is not None and (Path(model_folder) / PREPROCESSOR_NAME).is_file():
            base = load_processor(model_folder)
        if processor == "native" and isinstance(base, NativeResolutionProcessor):
            return NativeResolutionProcessor.from_dict({**base.to_dict(), **overrides})
        return default_processor(processor, config.patch_size, config.image_size, base=base, **overrides)
    else:
        chosen = load_processor(processor)
    if overrides:
        if not isinstance(chosen, NativeResolutionProcessor):
            raise ValueError(f"{sorted(overrides)} only apply to the native processor; got {type(chosen).__name__}")
        chosen = NativeResolutionProcessor.from_dict({**chosen.to_dict(), **overrides})
    if isinstance(chosen, NativeResolutionProcessor) and chosen.patch_size != config.patch_size:
        raise ValueError(
            f"the processor's patch_size={chosen.patch_size} differs from the model's patch_size={config.patch_size}"
        )
    return chosen


def largest_item(processor: ImageProcessor, frames: int, patch_size: int) -> int:
    """Patches of the largest item the processor can produce (an image, or a clip of ``frames`` frames)."""
    frames = processor.frames_that_fit(frames)
    if isinstance(processor, NativeResolutionProcessor):
        return max(processor.max_tokens, frames * max(processor.token_bounds(frames)) if frames else 0)
    if isinstance(processor, FixedSizeProcessor) and processor.do_center_crop:
        h, w = processor.crop_size
        return frames * (h // patch_size) * (w // patch_size)
    return 0
