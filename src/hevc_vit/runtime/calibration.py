"""How fast this CPU multiplies in bfloat16 against float32, measured once and kept per machine.

CPU flags do not predict it: two CPUs that both report AVX-512-BF16 and no AMX ran a bf16 matmul at 0.5x and
at 2.3x their fp32 rate. So ``"auto"`` on a CPU (:func:`hevc_vit.runtime.devices.dtype_choice`) asks a measurement: a
matmul of a ViT block's size in each dtype, alternating, the best of 3 to 50 rounds (at most about a quarter of a
second), plus the cosine of the bf16 result against the fp32 one (a broken or emulated kernel shows there). The
result is cached in ``$HEVC_VIT_CACHE`` (default ``$XDG_CACHE_HOME/hevc_vit``, else ``~/.cache/hevc_vit``), in
``cpu_dtype.json``, keyed by what changes the answer: the CPU model, the core count, torch's thread count and
the torch version. Delete the file (or set ``HEVC_VIT_CPU_DTYPE``) to decide again or by hand.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hevc_vit.files import json_bytes, write_atomic

BF16_MIN_SPEEDUP = 1.2  # bf16 is taken only where clearly faster: a marginal gain is not worth its rounding
BF16_MIN_COSINE = 0.999  # per-row cosine of a bf16 matmul against fp32; a healthy kernel gives ~0.99999
CACHE_VARIABLE = "HEVC_VIT_CACHE"
CACHE_NAME = "cpu_dtype.json"
CALIBRATION_SHAPE = (256, 1024, 1024)  # (tokens, width, width): one ViT-L linear on a quarter of a 448² image
ROUNDS = (3, 50)  # at least 3 rounds, and more while under TIME_BUDGET: a busy moment slows a round, not all
TIME_BUDGET = 0.25  # seconds of measuring (a quiet CPU needs ~30 ms for 3 rounds)


@dataclass(frozen=True)
class Calibration:
    """One machine's measured matmul rates (GFLOP/s) in float32 and bfloat16, and the bf16 result's accuracy."""

    machine: str
    fp32_gflops: float
    bf16_gflops: float
    bf16_cosine: float
    seconds: float  # what the measurement itself cost
    cached: bool = False

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops

    def choice(self) -> tuple[torch.dtype, str]:
        """bfloat16 where its matmul is >= ``BF16_MIN_SPEEDUP`` x fp32 and accurate, else float32; and why."""
        rates = f"matmul measured{' (cached)' if self.cached else ''}: bf16 {self.bf16_gflops:.0f} GFLOP/s vs fp32"
        rates += f" {self.fp32_gflops:.0f} ({self.speedup:.2f}x)"
        if self.bf16_cosine < BF16_MIN_COSINE:
            return torch.float32, f"{rates}, but bf16 cosine {self.bf16_cosine:.5f} < {BF16_MIN_COSINE}"
        if self.speedup >= BF16_MIN_SPEEDUP:
            return torch.bfloat16, f"{rates} >= {BF16_MIN_SPEEDUP}x"
        return torch.float32, f"{rates} < {BF16_MIN_SPEEDUP}x"


def machine_key() -> str:
    """What the answer depends on: CPU model, cores, torch threads, torch version."""
    return f"{cpu_model()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    folder = os.environ.get(CACHE_VARIABLE)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hevc_vit"
    return Path(folder) / CACHE_NAME


_memo: dict[str, Calibration] = {}  # this process's answers, so a run asks the cache file once


def cpu_dtype_calibration() -> Calibration:
    """This machine's :class:`Calibration`: from this process's memory, else the cache file, else measured (and
    stored; a cache that cannot be written is only not kept)."""
    key = machine_key()
    if key in _memo:
        return _memo[key]
    path = cache_path()
    stored = _read_cache(path)
    if key in stored:
        result = Calibration(**{**stored[key], "machine": key, "cached": True})
    else:
        result = measure_cpu_dtypes(key)
        stored[key] = {k: v for k, v in asdict(result).items() if k not in ("machine", "cached")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json_bytes(stored))
        except OSError:
            pass
    _memo[key] = result
    return result


def _read_cache(path: Path) -> dict[str, dict]:
    """The cache file's entries; an unreadable or malformed file counts as empty (it is rewritten)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict):
        return {}
    fields = {"fp32_gflops", "bf16_gflops", "bf16_cosine", "seconds"}
    return {k: v for k, v in stored.items() if isinstance(v, dict) and set(v) == fields}


def measure_cpu_dtypes(machine: str = "", shape: tuple[int, int, int] = CALIBRATION_SHAPE) -> Calibration:
    """Matmul rates on the CPU in float32 and bfloat16 (the best round of 3 to 50, as many as fit in
    ``TIME_BUDGET``, alternating so that a change of clock or load hits both: on a busy machine the best round is
    the one least disturbed), and the bf16 result's smallest per-row cosine against the fp32 one."""
    start = time.perf_counter()
    tokens, width, out = shape
    generator = torch.Generator().manual_seed(0)
    a32 = torch.randn(tokens, width, generator=generator)
    b32 = torch.randn(width, out, generator=generator)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for pair in (("fp32", (a32, b32)), ("bf16", (a16, b16))):  # warm both kernels up (oneDNN builds them once)
        torch.mm(*pair[1])
    rounds = 0
    while rounds < ROUNDS[0] or (rounds < ROUNDS[1] and time.perf_counter() - start < TIME_BUDGET):
        for name, (a, b) in (("fp32", (a32, b32)), ("bf16", (a16, b16))):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    exact, approx = torch.mm(a32, b32), torch.mm(a16, b16).float()
    cosine = torch.nn.functional.cosine_similarity(approx, exact, dim=1).min().item()
    flops = 2 * tokens * width * out / 1e9
    return Calibration(
        machine=machine or machine_key(),
        fp32_gflops=flops / best["fp32"],
        bf16_gflops=flops / best["bf16"],
        bf16_cosine=cosine,
        seconds=time.perf_counter() - start,
    )
