"""``hevc-vit bench --compare-dtypes``: the packing forward in float32 and in bfloat16, side by side, in one run.

The same weights and items run through the packing tower in each dtype, timed round-robin (the order rotated
every round, so a slow spell of a shared machine hits both alike). Each dtype's model FLOPs utilisation is taken
against that dtype's dense matmul peak, measured in the same run before and after the timing (the higher
counts), so the two fractions say how well each dtype's forward uses what the device offers in it — on a CPU
without AMX the bf16 peak is lower than the fp32 one. The bfloat16 features are compared with the float32 ones
token by token (cosine, min and mean).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hevc_vit.bench import BenchSetup, _load_models, _machine, make_workload, model_flops, packing_input, run_packing
from hevc_vit.bench.measure import matmul_peak_flops, per_token_cosine, time_median
from hevc_vit.llava.towers import HEVCViTPackingVisionTower
from hevc_vit.runtime.devices import describe_dtype_choice, resolve_device

COMPARED = (torch.float32, torch.bfloat16)


def compare_dtypes(setup: BenchSetup, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time the packing forward in float32 and bfloat16 on one workload; return the JSON-ready report."""
    device = resolve_device(setup.device)
    model, _, _ = _load_models(setup, device, torch.float32)
    if setup.compile:
        model.compile_blocks()
    config = model.config
    towers, items, outputs = {}, {}, {}
    pixels = make_workload(setup.workload, setup.repeat, config.num_channels, patch_size=config.patch_size)
    for dtype in COMPARED:
        copy_ = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        towers[dtype] = HEVCViTPackingVisionTower.from_model(copy_, {"mm_vision_select_layer": -1})
        items[dtype] = [x.to(device, dtype) for x in pixels]
    seqlens = list(packing_input(towers[torch.float32], items[torch.float32])[1].seqlens)
    flops = model_flops(config, seqlens)
    log(f"{len(pixels)} items, {sum(seqlens)} tokens; packing in {', '.join(_name(d) for d in COMPARED)} on {device}")
    with torch.inference_mode():
        for dtype in COMPARED:
            for _ in range(max(setup.warmup, 1)):
                outputs[dtype] = run_packing(towers[dtype], items[dtype])
        peaks = {dtype: [matmul_peak_flops(device, dtype)] for dtype in COMPARED}
        times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in COMPARED}
        for round_ in range(max(setup.iters, 1)):
            for dtype in COMPARED[round_ % 2 :] + COMPARED[: round_ % 2]:
                times[dtype].append(time_median(lambda d=dtype: run_packing(towers[d], items[d]), device, 1))
        for dtype in COMPARED:
            peaks[dtype].append(matmul_peak_flops(device, dtype))
    seconds = {dtype: statistics.median(t) for dtype, t in times.items()}
    rows = {
        _name(dtype): {
            "seconds": seconds[dtype],
            "tokens_per_s": sum(seqlens) / seconds[dtype],
            "matmul_peak_flops": max(peaks[dtype]),
            "matmul_peak_flops_before_after": peaks[dtype],
            "mfu": flops / seconds[dtype] / max(peaks[dtype]),
            "speed_vs_float32": seconds[torch.float32] / seconds[dtype],
        }
        for dtype in COMPARED
    }
    return {
        "dtypes": rows,
        "cosine_bfloat16_vs_float32": per_token_cosine(outputs[torch.bfloat16][0], outputs[torch.float32][0]),
        "auto_dtype": describe_dtype_choice(device),
        "model_flops": flops,
        "workload": {"name": setup.workload, "repeat": setup.repeat, "items": len(pixels), "tokens": sum(seqlens)},
        "model": {"preset": config.matching_preset(), "path": setup.model_path},
        "backend": setup.attn_implementation,
        "compiled": setup.compile,
        "device": str(device),
        "machine": _machine(device),
        "torch": torch.__version__,
        "iters": setup.iters,
        "date": time.strftime("%Y-%m-%d"),
    }


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_dtype_report(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`compare_dtypes` report."""
    model, workload = report["model"], report["workload"]
    lines = [
        f"hevc-vit bench --compare-dtypes — {model['preset'] or model['path']}, {workload['name']} workload "
        f"({workload['items']} items, {workload['tokens']:,} tokens), packing on {report['machine']}, torch "
        f"{report['torch']}, attention {report['backend']}" + (", compiled blocks" if report["compiled"] else ""),
        report["auto_dtype"],
        "",
        f"| dtype | seconds (median of {report['iters']}) | tokens/s | matmul peak (GFLOP/s) | MFU (of that peak) "
        "| speed vs float32 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["dtypes"].items():
        lines.append(
            f"| {name} | {r['seconds']:.4f} | {r['tokens_per_s']:,.0f} | {r['matmul_peak_flops'] / 1e9:,.0f} | "
            f"{r['mfu'] * 100:.1f} % | {r['speed_vs_float32']:.2f}x |"
        )
    cos = report["cosine_bfloat16_vs_float32"]
    lines += ["", f"per-token cosine, bfloat16 vs float32 packing: min {cos['min']:.6f}, mean {cos['mean']:.6f}"]
    return "\n".join(lines)
