"""From the reference's LLaVA-NeXT fork to transformers: a ``LlavaQwenForCausalLM`` checkpoint (``model_type``
``llava_qwen`` / ``llava_qwen3``: the Qwen text model with ``mm_*`` fields, the tower at
``model.vision_tower.vision_tower.*``, the projector at ``model.mm_projector.*``) into an ``hevc_vit_llava``
folder (``HEVCViTLlavaForConditionalGeneration``): the tower at ``model.vision_tower.*`` (native names), the
projector at ``model.multi_modal_projector.*`` (the same module names), the text model at
``model.language_model.*``, ``lm_head.weight`` as it is.

The fork stores the tower's weights but not its architecture: ``mm_vision_tower`` names the tower it was
built from (a folder or a Hub name). Its ``config.json`` is read from ``vision_tower`` when given, else from
``mm_vision_tower`` when that is a folder here (as written, or relative to SRC, or SRC's sub-folder of that
name); otherwise the conversion stops and says to pass ``--vision-tower``. The tower's weight names may be
any format :mod:`hevc_vit.checkpoints.names` reads (the fork's own ``OneVisionEncoderTower`` holds the
reference's standard names, this library's towers the packing names).

Only the fork's recipe settings have a counterpart: ``mm_patch_merge_type="flat"``, no resampler, no
``add_faster_video``, ``mm_vision_select_feature="patch"``; anything else is a ``ValueError`` naming the setting.
The fork marks each image with one ``-200`` in ``input_ids``, outside the vocabulary; the converted model needs
real ids (``image_token_id`` / ``video_token_id``: given, else the config's ``image_token_index`` /
``video_token_index``; with a tokenizer in SRC, those of ``<image>`` / ``<video>``, added when missing, and a
processor is written: :mod:`hevc_vit.convert.llava_processor`). Videos: the fork's flat path pools every video
item with ``get_2dPool`` at its default stride 2 in ``mm_spatial_pool_mode``.

Verification before DST is moved into place (as for towers, :mod:`hevc_vit.convert`): the written weights
re-read and compared with SRC's tensor by tensor (exactly, after the cast); the tower's features from the
written weights compared with SRC's tower on the tower verification inputs; ``config.json`` re-read, its
text and vision parts rebuilt; the projector loaded strictly; and, where ``hevc_vit_llava`` is registered
with transformers, the whole folder loaded with ``from_pretrained`` without a missing or unexpected weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

import hevc_vit.convert.llava_processor as fork_processor
from hevc_vit.checkpoints import load_checkpoint, read_folder_config
from hevc_vit.checkpoints.architecture import check_weights_fit
from hevc_vit.checkpoints.io import read_config_dict, read_state_dict
from hevc_vit.checkpoints.names import NATIVE_FORMATS, convert_to_native, detect_format_from_keys
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.convert.commit import no_stage
from hevc_vit.convert.transaction import check_paths, transaction
from hevc_vit.convert.verify import (
    TOLERANCES,
    VerificationFailed,
    VerificationReport,
    build_model,
    compare_outputs,
    make_verification_cases,
    model_outputs,
    reference_outputs,
)
from hevc_vit.convert.write import ARCH_KEYS, stored_dtype
from hevc_vit.files import CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME, fsync_folder, write_atomic
from hevc_vit.llava.projector import build_projector
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.runtime.devices import parse_dtype, resolve_device

# the fork's model types and the text model each wraps
FORK_MODEL_TYPES: dict[str, str] = {"llava_qwen": "qwen2", "llava_qwen3": "qwen3"}
TARGET_MODEL_TYPE, TARGET_ARCHITECTURE = "hevc_vit_llava", "HEVCViTLlavaForConditionalGeneration"
FORK_TOWER, FORK_PROJECTOR, FORK_TEXT = "model.vision_tower.vision_tower.", "model.mm_projector.", "model."
TOWER, PROJECTOR, TEXT = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."
VIDEO_POOL_MODES = ("average", "max", "bilinear")
VIDEO_POOL_STRIDE = 2  # get_2dPool's default, the stride the fork's flat path pools videos with
# config.json fields of the fork's LLaVA wrapper, not of its text model (besides every ``mm_*`` field)
FORK_FIELDS = frozenset(
    "add_faster_video delay_load faster_token_stride force_sample image_aspect_ratio image_crop_resolution "
    "image_grid_pinpoints image_split_resolution image_token_index pos_skipping_range tokenizer_model_max_length "
    "tokenizer_padding_side tune_mm_mlp_adapter unfreeze_mm_vision_tower use_mm_proj use_pos_skipping "
    "video_token_index vision_tower vision_tower_pretrained architectures transformers_version _name_or_path".split()
)
# files of SRC copied as they are (the tokenizer and generation settings the fork saved beside its weights; with
# a tokenizer, only the generation settings: the processor's save_pretrained writes the tokenizer and template)
COPIED_FILES = tuple(
    "generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json "
    "added_tokens.json vocab.json merges.txt chat_template.json chat_template.jinja".split()
)


def is_fork_checkpoint(src: str | os.PathLike) -> bool:
    """Whether ``src`` is a folder whose ``config.json`` has one of the fork's model types."""
    path = Path(src)
    if not (path / CONFIG_NAME).is_file():
        return False
    try:
        return read_config_dict(path).get("model_type") in FORK_MODEL_TYPES
    except (OSError, ValueError):
        return False


def check_fork_settings(fork: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first fork setting the converted model does not reproduce."""
    merge = fork.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise ValueError(
            f"mm_patch_merge_type={merge!r} is not supported; expected 'flat' (the anyres/unpad modes add the "
            f"learned image_newline and tile layouts the converted model does not have)"
        )
    for name in ("add_faster_video", "mm_resampler_type"):
        if fork.get(name):
            raise ValueError(f"{name}={fork[name]!r} is not supported; expected it unset or false")
    select = fork.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise ValueError(f"mm_vision_select_feature={select!r} is not supported; expected 'patch'")
    if not isinstance(fork.get("mm_vision_select_layer", -2), int):
        raise ValueError(f"mm_vision_select_layer={fork['mm_vision_select_layer']!r}; expected an int")
    pool = fork.get("mm_spatial_pool_mode")
    if pool is not None and pool not in VIDEO_POOL_MODES:
        raise ValueError(f"mm_spatial_pool_mode={pool!r}; expected one of {list(VIDEO_POOL_MODES)}")


def text_config_dict(fork: dict[str, Any]) -> dict[str, Any]:
    """The text model's ``config.json`` fields: the fork's, less its LLaVA fields, with the text model type.
    Kept as written (not re-serialised) so transformers 4 and 5 read them alike; checked by building it."""
    text = {k: v for k, v in fork.items() if not k.startswith("mm_") and k not in FORK_FIELDS}
    text["model_type"] = FORK_MODEL_TYPES[fork["model_type"]]
    try:
        transformers.AutoConfig.for_model(**text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"SRC's text model config does not build as {text['model_type']}: {e}") from None
    return text


def find_tower(src: Path, fork: dict[str, Any], vision_tower: str | os.PathLike | None) -> Path:
    """The folder holding the tower's ``config.json`` (see the module docstring)."""
    if vision_tower is not None:
        tower = Path(vision_tower)
        if not (tower / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"vision_tower {tower} has no {CONFIG_NAME}; expected the tower's checkpoint folder"
            )
        return tower
    name = fork.get("mm_vision_tower")
    if not name:
        raise ValueError(f"{src / CONFIG_NAME} has no mm_vision_tower; pass --vision-tower PATH (the tower's folder)")
    tried = [Path(name), src / name, src / Path(name).name]
    for tower in tried:
        if (tower / CONFIG_NAME).is_file():
            return tower
    raise FileNotFoundError(
        f"SRC's mm_vision_tower={name!r} is no folder with a {CONFIG_NAME} here (tried {', '.join(map(str, tried))}); "
        f"the fork's checkpoint stores the tower's weights but not its architecture: pass --vision-tower PATH, the "
        f"tower's checkpoint folder (e.g. a download of {name})"
    )


def map_fork_state(state: dict[str, torch.Tensor], tower_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fork's weights (tower excluded) under the converted model's names, with ``tower_state`` (native
    names) under ``model.vision_tower.``. A weight with no counterpart is a ``ValueError`` naming it."""
    out = {TOWER + k: v for k, v in tower_state.items()}
    foreign = [
        k for k in state if k.startswith(("model.image_newline", "model.faster_token", "model.vision_resampler."))
    ]
    if foreign:
        raise ValueError(f"SRC has {foreign[:3]}: weights of fork modes the converted model does not have")
    for key, value in state.items():
        if key.startswith(FORK_TOWER):
            continue
        if key.startswith(FORK_PROJECTOR):
            out[PROJECTOR + key[len(FORK_PROJECTOR) :]] = value
        elif key.startswith(FORK_TEXT):
            out[TEXT + key[len(FORK_TEXT) :]] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            raise ValueError(f"SRC has weight {key!r}; expected model.*, lm_head.weight (the fork's names)")
    return out


@dataclass
class ForkCheckpoint:
    """A fork checkpoint read: its config, the tower's config and folder, and the converted model's weights."""

    fork: dict[str, Any]
    tower_dir: Path
    vision_config: HEVCViTConfig
    tower_format: str
    tower_state: dict[str, torch.Tensor]  # native names, as stored
    state: dict[str, torch.Tensor]  # the converted model's names


def read_fork_checkpoint(
    src: str | os.PathLike, vision_tower: str | os.PathLike | None = None, log: Callable[[str], None] = print
) -> ForkCheckpoint:
    """Read and check a fork checkpoint (settings, tower config against the tower weights, projector)."""
    src = Path(src)
    fork = read_config_dict(src)
    if fork.get("model_type") not in FORK_MODEL_TYPES:
        raise ValueError(
            f"{src / CONFIG_NAME} has model_type={fork.get('model_type')!r}; expected one of {list(FORK_MODEL_TYPES)}"
        )
    check_fork_settings(fork)
    tower_dir = find_tower(src, fork, vision_tower)
    vision_config, _, _ = read_folder_config(tower_dir, check_fit=False)
    state = read_state_dict(src)
    stored = {k[len(FORK_TOWER) :]: v for k, v in state.items() if k.startswith(FORK_TOWER)}
    if stored:
        fmt = detect_format_from_keys(stored)
        if fmt is None:
            raise ValueError(f"SRC's tower weights ({FORK_TOWER}*) are in no known format, e.g. {next(iter(stored))}")
        tower_state = stored if fmt in NATIVE_FORMATS else convert_to_native(stored, fmt)
        check_weights_fit(vision_config, tower_state, fmt, src, str(tower_dir / CONFIG_NAME))
    else:  # a checkpoint saved without the frozen tower: the tower's own weights are the ones it ran with
        log(f"SRC has no {FORK_TOWER}* weights; taking the tower's weights from {tower_dir}")
        loaded = load_checkpoint(tower_dir)
        fmt, tower_state = loaded.format, loaded.state_dict
    if fork.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"SRC's mm_hidden_size={fork['mm_hidden_size']}; the tower {tower_dir} has {vision_config.hidden_size}"
        )
    return ForkCheckpoint(fork, tower_dir, vision_config, fmt, tower_state, map_fork_state(state, tower_state))


def llava_config_dict(
    ckpt: ForkCheckpoint, image_token_id: int | None, video_token_id: int | None, dtype: torch.dtype
) -> dict[str, Any]:
    """The converted model's ``config.json`` (``HEVCViTLlavaConfig``'s fields)."""
    fork, text = ckpt.fork, text_config_dict(ckpt.fork)
    ids = {}
    for name, given, field_name in (
        ("image_token_id", image_token_id, "image_token_index"),
        ("video_token_id", video_token_id, "video_token_index"),
    ):
        value = given if given is not None else fork.get(field_name)
        if value is None:
            raise ValueError(
                f"{name}: SRC's config has no {field_name} (the fork marks each item with -200, outside the "
                f"vocabulary); pass --{name.replace('_', '-')} ID, the id in [0, {text.get('vocab_size')}) the "
                f"processor repeats in place of each item's features (e.g. the tokenizer's <image> / <video> id)"
            )
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < text.get("vocab_size", 0):
            raise ValueError(f"{name}={value!r}; expected an int in [0, vocab_size={text.get('vocab_size')})")
        ids[name] = value
    if ids["image_token_id"] == ids["video_token_id"]:
        raise ValueError(f"image_token_id and video_token_id are both {ids['image_token_id']}; expected two ids")
    dtype_name = str(dtype).removeprefix("torch.")
    vision = {k: getattr(ckpt.vision_config, k) for k in ARCH_KEYS}
    return {
        "architectures": [TARGET_ARCHITECTURE],
        "model_type": TARGET_MODEL_TYPE,
        "text_config": text,
        "vision_config": {**vision, "model_type": HEVCViTConfig.model_type},
        "projector_type": fork.get("mm_projector_type", "linear"),
        "vision_feature_layer": fork.get("mm_vision_select_layer", -2),
        **ids,
        "video_pool_mode": fork.get("mm_spatial_pool_mode"),
        "video_pool_stride": VIDEO_POOL_STRIDE if fork.get("mm_spatial_pool_mode") else None,
        "tie_word_embeddings": bool(fork.get("tie_word_embeddings", False)),
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "transformers_version": transformers.__version__,
    }


@dataclass
class LlavaConversionResult:
    src: Path
    dst: Path
    tower_dir: Path
    dtype: torch.dtype
    report: VerificationReport


def convert_llava_fork(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    on_stage: Callable[[str], None] | None = None,
) -> LlavaConversionResult:
    """Convert the fork checkpoint SRC into a verified ``hevc_vit_llava`` folder DST.

    vision_tower: the tower's checkpoint folder, when SRC's ``mm_vision_tower`` is not a folder here.
    image_token_id / video_token_id: the placeholder ids of the converted model, in ``[0, vocab_size)``;
        default: SRC's ``image_token_index`` / ``video_token_index`` (a ``ValueError`` when neither is there).
    dtype: of DST's weights (default: as stored in SRC). Errors and the all-or-nothing DST as for
    :func:`hevc_vit.convert.convert_checkpoint`: nothing is written for bad input, a failed verification or
    an interrupt.
    """
    src, dst = Path(src), Path(dst)
    device = resolve_device(device)
    check_paths(src, dst)
    stage = on_stage if on_stage is not None else no_stage
    with transaction(dst, force, log, stage) as tx:
        ckpt = read_fork_checkpoint(src, vision_tower, log)
        target = parse_dtype(dtype) if dtype is not None else stored_dtype(ckpt.state)
        if target not in TOLERANCES:
            raise ValueError(f"dtype={target}; expected one of {[str(d) for d in TOLERANCES]}")
        tokenizer = fork_processor.read_tokenizer(src)
        ids = fork_processor.placeholder_ids(tokenizer, ckpt.fork, image_token_id, video_token_id, log)
        config = llava_config_dict(ckpt, *ids, target)
        log(
            f"SRC {src}: LLaVA fork ({ckpt.fork['model_type']}, projector {config['projector_type']}), tower "
            f"{ckpt.tower_dir} ({ckpt.tower_format} names)"
        )
        _check_projector(config, ckpt.state)
        tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in ckpt.state.items()}
        folder = tx.make_folder()
        log(f"writing {TARGET_MODEL_TYPE} checkpoint ({config['dtype']}) to {folder.name}")
        save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})  # read from files: none shared
        stage("write")
        write_atomic(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        for name in (*COPIED_FILES, PREPROCESSOR_NAME) if tokenizer is None else COPIED_FILES[:1]:
            source = (ckpt.tower_dir if name == PREPROCESSOR_NAME else src) / name
            if source.is_file():
                write_atomic(folder / name, source.read_bytes())
        fork_processor.write_processor(folder, tokenizer, ckpt.tower_dir, ckpt.vision_config, config, log)
        fsync_folder(folder)
        stage("verify")
        report = verify_llava_folder(folder, ckpt, tensors, config, target, device)
        report.config_mismatches += fork_processor.check_processor(folder, config, tokenizer is not None)
        log(report.table())
        if not report.passed:
            raise VerificationFailed(report)
        tx.commit()
    log(f"wrote {dst}")
    return LlavaConversionResult(src, dst, ckpt.tower_dir, target, report)


def _check_projector(config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """The projector ``build_projector`` makes for the config takes SRC's projector weights strictly."""
    text = config["text_config"]
    settings = {"mm_projector_type": config["projector_type"], "mm_hidden_size": config["vision_config"]["hidden_size"]}
    projector = build_projector({**settings, "hidden_size": text["hidden_size"]})
    weights = {k[len(PROJECTOR) :]: v for k, v in state.items() if k.startswith(PROJECTOR)}
    try:
        projector.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"SRC's mm_projector weights do not fit mm_projector_type={settings['mm_projector_type']!r}: {e}"
        ) from None


def verify_llava_folder(
    folder: Path,
    ckpt: ForkCheckpoint,
    expected: dict[str, torch.Tensor],
    config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
) -> VerificationReport:
    """Re-read ``folder`` and compare it with SRC (see the module docstring)."""
    report = VerificationReport(str(dtype).removeprefix("torch."), TOLERANCES[dtype])
    problems = report.config_mismatches
    written = load_file(str(folder / SAFETENSORS_NAME))
    if written.keys() != expected.keys():
        problems.append(
            f"weights: missing {sorted(expected.keys() - written.keys())[:3]}, "
            f"unexpected {sorted(written.keys() - expected.keys())[:3]}"
        )
    problems += [
        f"weight {k} differs from SRC's"
        for k in expected.keys() & written.keys()
        if not torch.equal(written[k], expected[k])
    ]
    reread = read_config_dict(folder)
    vision = HEVCViTConfig(**{k: v for k, v in reread["vision_config"].items() if k != "model_type"})
    problems += [
        f"vision_config.{k}: SRC {getattr(ckpt.vision_config, k)!r}, DST {getattr(vision, k)!r}"
        for k in ARCH_KEYS
        if getattr(ckpt.vision_config, k) != getattr(vision, k)
    ]
    if reread["text_config"] != config["text_config"]:
        problems.append("text_config differs from SRC's")
    tower = {k[len(TOWER) :]: v for k, v in written.items() if k.startswith(TOWER)}
    cases = make_verification_cases(vision)
    reference = reference_outputs(ckpt.vision_config, ckpt.tower_state, cases, device)  # SRC's tower, float32
    for cls, packed in ((HEVCViTModel, False), (HEVCViTPackingModel, True)):
        model = build_model(cls, vision, tower).to(device)
        for case in [c for c in cases if (c.items is not None) == packed]:
            actual = model_outputs(model, case, packed=packed, device=device)
            report.cases.append(
                compare_outputs(f"tower {case.name}", case.num_items, reference[case.name], actual, report.tolerance)
            )
    if TARGET_MODEL_TYPE in transformers.CONFIG_MAPPING:  # the model class is registered: load the folder whole
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, output_loading_info=True
        )
        problems += [
            f"from_pretrained: {kind} {keys[:3]}" for kind, keys in info.items() if keys and kind != "mismatched_keys"
        ]
        problems += (
            [f"from_pretrained: mismatched {info['mismatched_keys'][:3]}"] if info.get("mismatched_keys") else []
        )
    return report
