"""Verified checkpoint conversion (``hevc-vit convert``) and checkpoint inspection (``hevc-vit info``).

A conversion reads SRC in any format (:func:`~hevc_vit.checkpoints.load_checkpoint`), renames its weights
with the key table (:func:`~hevc_vit.checkpoints.convert_from_native`) and writes a Hugging Face folder in a
temporary folder beside DST. It then reloads that folder and compares it with SRC on inputs it makes (two
image sizes, a non-square image, a video, a mixed packed batch); only when every case passes is the folder
renamed to DST. A failure, Ctrl-C or a kill leaves no DST and no temporary files (after ``kill -9`` the
next conversion to the same DST removes the leftover), and SRC is only ever read.

Replacing an existing DST (``--force``) is a journaled commit (:func:`commit_folder`): a small journal beside
DST records the two folders before anything moves, the old folder is kept until the new one is in place (on
Linux the two are swapped in one atomic step, so DST is never missing), and a run killed anywhere in the
commit is finished by the next conversion to that DST (:func:`finish_interrupted_commit`).

The modules: :mod:`.verify` (inputs, tolerances, comparison, report), :mod:`.write` (the target folder),
:mod:`.transaction` (signals, the temporary folder, stages), :mod:`.commit` (the journaled commit),
:mod:`.info` (``hevc-vit info``), :mod:`.llava_fork` (a whole LLaVA model from the reference's LLaVA-NeXT
fork to ``hevc_vit_llava``: :func:`convert_llava_fork`). The command line is :mod:`hevc_vit.cli.convert`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hevc_vit.checkpoints import LoadedCheckpoint, load_checkpoint
from hevc_vit.convert.commit import (
    COMMIT_STAGES,
    COMMIT_WAIT_S,
    InterruptedCommitError,
    commit_folder,
    finish_interrupted_commit,
    no_stage,
)
from hevc_vit.convert.info import (
    CheckpointInfo,
    architecture_source,
    describe_architecture,
    describe_checkpoint,
    format_size,
)
from hevc_vit.convert.llava_fork import LlavaConversionResult, convert_llava_fork, is_fork_checkpoint
from hevc_vit.convert.transaction import STAGES, ConversionInterrupted, check_paths, transaction
from hevc_vit.convert.verify import (
    TOLERANCES,
    CaseResult,
    Tolerance,
    VerificationCase,
    VerificationFailed,
    VerificationReport,
    build_model,
    compare_outputs,
    make_verification_cases,
    reference_outputs,
    verify_folder,
)
from hevc_vit.convert.write import (
    ARCH_KEYS,
    TARGET_FORMATS,
    clip_preprocessor_dict,
    reference_config_dict,
    stored_dtype,
    target_state_dict,
    write_folder,
)
from hevc_vit.files import CONFIG_NAME
from hevc_vit.runtime.devices import DTYPES, parse_dtype, resolve_device

__all__ = [
    "ARCH_KEYS",
    "COMMIT_STAGES",
    "COMMIT_WAIT_S",
    "DTYPES",
    "STAGES",
    "TARGET_FORMATS",
    "TOLERANCES",
    "CaseResult",
    "CheckpointInfo",
    "ConversionInterrupted",
    "ConversionResult",
    "InterruptedCommitError",
    "LlavaConversionResult",
    "Tolerance",
    "VerificationCase",
    "VerificationFailed",
    "VerificationReport",
    "build_model",
    "clip_preprocessor_dict",
    "commit_folder",
    "compare_outputs",
    "convert_checkpoint",
    "convert_llava_fork",
    "describe_architecture",
    "describe_checkpoint",
    "finish_interrupted_commit",
    "format_size",
    "is_fork_checkpoint",
    "make_verification_cases",
    "reference_config_dict",
    "stored_dtype",
    "target_state_dict",
]


@dataclass
class ConversionResult:
    src: Path
    dst: Path
    source_format: str
    target_format: str
    dtype: torch.dtype
    report: VerificationReport


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str = "packing",
    preset: str | None = None,
    config_json: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    on_stage: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert SRC (any format) into a verified Hugging Face folder DST in format ``to``.

    to: ``packing`` (``model_type: llava_vit_packing``) or ``standard`` (``model_type: onevision_encoder``).
    preset / config_json: the architecture of a weights-only SRC (see :func:`load_checkpoint`).
    dtype: ``float32``, ``bfloat16``, ``float16`` or None (as stored in SRC).
    force: replace an existing DST folder — only once the new checkpoint has passed verification.
    device: where the verification forwards run.
    on_stage: called with the name of each stage the conversion reaches (``STAGES``, in order), e.g. to
        interrupt it at a known point in tests.
    Returns the :class:`ConversionResult` with the verification report (also printed through ``log``).
    Raises ``FileExistsError`` / ``FileNotFoundError`` / ``ValueError`` for bad input (nothing written),
    :class:`VerificationFailed` when DST does not reproduce SRC, :class:`ConversionInterrupted` on a signal;
    in every case DST is left as it was and the temporary folder is removed. A commit to DST that an
    earlier run left half-done (killed while replacing DST) is finished first
    (:func:`finish_interrupted_commit`); an error during this run's own commit finishes it the same way.
    """
    src, dst = Path(src), Path(dst)
    dtype, device = _check_options(to, dtype, device)
    check_paths(src, dst)
    stage = on_stage if on_stage is not None else no_stage
    with transaction(dst, force, log, stage) as tx:
        loaded = load_checkpoint(src, preset=preset, config_json=config_json)
        config, source_format = loaded.config, loaded.format
        config.attention_backend = "eager"  # the specification; the comparison is about the weights
        target_dtype = _target_dtype(loaded, dtype)
        _log_source(src, loaded, preset, config_json, log)
        cases = make_verification_cases(config)
        expected = reference_outputs(config, loaded.state_dict, cases, device)

        folder = tx.make_folder()
        log(f"writing {to} checkpoint ({str(target_dtype).removeprefix('torch.')}) to {folder.name}")
        write_folder(folder, src, loaded.state_dict, config, to, target_dtype, stage)
        del loaded  # SRC's weights: not needed for the verification
        stage("verify")
        log(f"verifying: reloading it and comparing with SRC on {len(cases)} cases")
        report = verify_folder(folder, config, cases, expected, target_dtype, device)
        log(report.table())
        if not report.passed:
            raise VerificationFailed(report)
        tx.commit()
    log(f"wrote {dst}")
    return ConversionResult(src, dst, source_format, to, target_dtype, report)


def _check_options(
    to: str, dtype: str | torch.dtype | None, device: str | torch.device
) -> tuple[torch.dtype | None, torch.device]:
    """The target format checked, the dtype (None: SRC's) and the device parsed."""
    if to not in TARGET_FORMATS:
        raise ValueError(f"to={to!r}; expected one of {list(TARGET_FORMATS)}")
    if dtype is not None:
        dtype = parse_dtype(dtype)
        if dtype not in TOLERANCES:
            raise ValueError(f"dtype={dtype}; expected one of {list(DTYPES)}")
    return dtype, resolve_device(device)


def _target_dtype(loaded: LoadedCheckpoint, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or the dtype SRC is stored in when it has verification thresholds."""
    if dtype is not None:
        return dtype
    stored = stored_dtype(loaded.state_dict)
    if stored not in TOLERANCES:
        raise ValueError(f"SRC is stored in {stored}; pass --dtype with one of {list(DTYPES)}")
    return stored


def _log_source(
    src: Path,
    loaded: LoadedCheckpoint,
    preset: str | None,
    config_json: str | os.PathLike | None,
    log: Callable[[str], None],
) -> None:
    weights_only = not (src / CONFIG_NAME).is_file()
    where = f" (architecture from {architecture_source(src, preset, config_json)})" if weights_only else ""
    log(f"SRC {src}: {loaded.format} format{where}")
    log(f"  {describe_architecture(loaded.config)}")
