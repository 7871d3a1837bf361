"""Device and dtype names, parsed in one place (the CLI, ``encode``, ``bench``, ``convert`` and loading).

``resolve_device`` turns ``None`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a ``torch.device`` this
process can use; ``resolve_dtype`` turns ``None`` / ``"auto"`` / a name / a ``torch.dtype`` into a
``torch.dtype`` for a device. Both raise ``ValueError`` naming the value and what was expected.
"""

from __future__ import annotations

import os

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype from its name (``"bfloat16"``, ``"torch.bfloat16"``) or as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)} or a torch.dtype")
    return DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """What ``"auto"`` means for computing on ``device``: bfloat16 on a GPU, float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
