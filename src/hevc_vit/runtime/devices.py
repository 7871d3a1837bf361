"""Device and dtype names, parsed in one place (the CLI, ``encode``, ``bench``, ``convert`` and loading).

``resolve_device`` turns ``None`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a ``torch.device`` this
process can use; ``resolve_dtype`` turns ``None`` / ``"auto"`` / a name / a ``torch.dtype`` into a
``torch.dtype`` for a device. Both raise ``ValueError`` naming the value and what was expected.
``dtype_choice`` is the one rule behind ``"auto"``, with the reason it gives.
"""

from __future__ import annotations

import os

import torch

from hevc_vit.runtime.calibration import cpu_dtype_calibration

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DTYPE_VARIABLE = "HEVC_VIT_CPU_DTYPE"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype from its name (``"bfloat16"``, ``"torch.bfloat16"``) or as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)} or a torch.dtype")
    return DTYPES[name]


def dtype_choice(device: torch.device) -> tuple[torch.dtype, str]:
    """What ``"auto"`` means for computing on ``device``, and why: bfloat16 on a GPU; on a CPU, what a short
    measurement says (:func:`.calibration.cpu_dtype_calibration`: bfloat16 only where its matmul is at least
    ``BF16_MIN_SPEEDUP`` times as fast as float32 and as accurate as bf16 should be), since CPU flags do not
    predict it (AVX-512-BF16 without AMX measured 0.5x fp32 on one CPU and 2.3x on another). The environment
    variable ``HEVC_VIT_CPU_DTYPE`` (a dtype name) replaces the rule on CPUs, e.g. to make machines agree."""
    if device.type == "cuda":
        return torch.bfloat16, "GPU"
    override = os.environ.get(CPU_DTYPE_VARIABLE)
    if override:
        try:
            return parse_dtype(override), f"set by {CPU_DTYPE_VARIABLE}"
        except ValueError:
            raise ValueError(f"{CPU_DTYPE_VARIABLE}={override!r}; expected one of {list(DTYPES)}") from None
    return cpu_dtype_calibration().choice()


def describe_dtype_choice(device: torch.device) -> str:
    """One line for logs: ``auto dtype: bfloat16 (matmul measured: bf16 410 GFLOP/s vs fp32 178 (2.30x) >= 1.2x)``."""
    dtype, reason = dtype_choice(device)
    return f"auto dtype: {str(dtype).removeprefix('torch.')} ({reason})"


def default_dtype(device: torch.device) -> torch.dtype:
    """What ``"auto"`` means for computing on ``device`` (:func:`dtype_choice`)."""
    return dtype_choice(device)[0]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` / ``"auto"`` -> :func:`default_dtype`; otherwise :func:`parse_dtype`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    return parse_dtype(dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU; ``"cuda"`` -> this
    rank's GPU; ``"cpu"`` / ``"cuda:N"`` as given, checked to exist here."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}; CUDA is not available here (use 'cpu')")
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}; this machine has {torch.cuda.device_count()} CUDA devices")
    return resolved
