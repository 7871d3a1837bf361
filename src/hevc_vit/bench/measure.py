"""Measuring for ``hevc-vit bench``: wall time with the device drained, peak memory, the matmul peak of a
device in a dtype, and the per-token cosine of two runs' features."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median wall time of ``iters`` calls, the device drained before and after each."""
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RssPeak:
    """Peak resident memory above the level at entry, sampled every millisecond (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory of one call above what was allocated before it (CUDA allocator; RSS on the CPU)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _RssPeak() as rss:
        fn()
    return rss.growth


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None, iters: int = 10
) -> float:
    """Measured dense matmul rate (FLOP/s) of this device in ``dtype``: the median of ``iters`` ``n³`` products
    after 3 warm-ups; ``n`` 8192 on a GPU, 2048 on a CPU (where 4096 runs no faster, measured)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = time_median(lambda: a @ b, device, iters)
    return 2 * n**3 / seconds


def per_token_cosine(actual: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    """Min and mean cosine similarity between matching token rows of two lists of ``(N_i, D)``."""
    cos = F.cosine_similarity(torch.cat(actual).float(), torch.cat(reference).float(), dim=-1)
    return {"min": cos.min().item(), "mean": cos.mean().item()}
