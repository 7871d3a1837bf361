"""Where the packing forward's time goes, per dtype: ``torch.profiler`` self time grouped by kind of op.

    PYTHONPATH=src python benchmarks/forward_profile.py --preset small --device cpu --dtypes float32,bfloat16

For each dtype: the forward's FLOP rate as a fraction of that dtype's matmul peak (measured in the same run, as
``hevc-vit bench --compare-dtypes`` does), then the share of self time of attention, the dense matmuls, the norms,
the activation, RoPE's element-wise ops, copies and concatenations (chunk joins, layout changes, casts), and the
rest. Run it where the question is (e.g. a CPU with AMX, where bf16 matmuls are fast and the other groups weigh
more). Random weights; one warm-up forward, then one profiled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch

from hevc_vit.bench import make_workload, model_flops
from hevc_vit.bench.measure import matmul_peak_flops, time_median
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.modeling import HEVCViTPackingModel
from hevc_vit.packing import PackingPlan, patchify_items
from hevc_vit.runtime.devices import describe_dtype_choice, parse_dtype, resolve_device

GROUPS = {
    "attention": ("scaled_dot_product", "flash_attention", "varlen", "_efficient_attention"),
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul"),
    "norm": ("layer_norm", "rms_norm"),
    "activation": ("gelu",),
    "rope_elementwise": ("aten::mul", "aten::add", "aten::neg", "aten::sub", "aten::stack"),
    "copies": ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "index"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "other"


def profile(model, patches, plan, device) -> dict[str, float]:
    with torch.inference_mode():
        model.encode_packed(patches, plan)
        with torch.profiler.profile() as prof:
            model.encode_packed(patches, plan)
    shares: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        shares[group_of(event.key)] += (
            event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        )
    total = sum(shares.values())
    return {group: shares[group] / total for group in (*GROUPS, "other")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = HEVCViTConfig.from_preset(args.preset)
    patches, grid = patchify_items(
        make_workload(args.workload, 1, config.num_channels, patch_size=config.patch_size), config.patch_size
    )
    plan = PackingPlan.from_grid_thw(grid, device=device)
    flops = model_flops(config, list(plan.seqlens))
    report = {"auto_dtype": describe_dtype_choice(device), "tokens": plan.total_tokens, "dtypes": {}}
    print(report["auto_dtype"], file=sys.stderr)
    for name in args.dtypes.split(","):
        dtype = parse_dtype(name)
        model = HEVCViTPackingModel(config).to(device, dtype).eval()
        x = patches.to(device, dtype)
        with torch.inference_mode():
            model.encode_packed(x, plan)
            seconds = time_median(lambda m=model, x=x: m.encode_packed(x, plan), device, args.iters)
        peak = matmul_peak_flops(device, dtype)
        report["dtypes"][name] = {
            "seconds": seconds,
            "of_matmul_peak": flops / seconds / peak,
            "matmul_peak_flops": peak,
            "self_time_shares": profile(model, x, plan, device),
        }
        shares = ", ".join(f"{g} {s * 100:.1f} %" for g, s in report["dtypes"][name]["self_time_shares"].items())
        print(
            f"{name}: {seconds:.3f} s, {flops / seconds / 1e9:,.0f} GFLOP/s = "
            f"{flops / seconds / peak * 100:.1f} % of the {peak / 1e9:,.0f} GFLOP/s matmul peak; {shares}"
        )
    report["date"] = time.strftime("%Y-%m-%d")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
