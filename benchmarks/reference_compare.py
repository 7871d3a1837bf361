"""The reference's standard model per item (SDPA) beside our packing forward and our per-item loop, in one run.

    PYTHONPATH=src python benchmarks/reference_compare.py --preset small --workload mixed --dtypes float32,bfloat16

Variants, the same weights and the same pixels (``hevc_vit.bench.make_workload``):
    reference_sdpa  the reference's ``OneVisionEncoderModel`` (vendored in ``benchmarks/reference/``, commit
                    c2cd3e0) once per image/video, with ``attn_implementation="sdpa"`` (``reference/sdpa.py``).
    packing         our ``HEVCViTPackingModel``: patchify the list, one packed forward.
    per_item        our ``HEVCViTModel`` once per image/video.
Our random weights (seeded) are converted to the reference's names by ``hevc_vit.checkpoints.convert_from_native``
and loaded into the reference with ``strict=True``; ``--model`` takes a checkpoint folder in any format instead.
Every variant returns the final tokens and the pooled vector of each item; the max relative difference of the
tokens against the reference is printed per dtype. Timing: ``--iters`` rounds, each running every
(dtype, variant) pair once, the order rotated every round (a slow spell of a shared machine hits all alike);
the median per pair counts (``--clock cpu``: the process's CPU time instead of the wall clock, for a
shared machine, where waiting for a core would otherwise count). Printed: tokens/s per variant, the ratios to
the reference, threads, CPU model and the load average before and after. ``--json`` writes the report.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "reference"))

import sdpa  # noqa: E402,F401  (registers "sdpa" in the reference's attention table)
from onevision_encoder import OneVisionEncoderModel  # noqa: E402
from onevision_encoder.configuration_onevision_encoder import OneVisionEncoderConfig  # noqa: E402

from hevc_vit.bench import make_workload  # noqa: E402
from hevc_vit.checkpoints.names import convert_from_native  # noqa: E402
from hevc_vit.configuration import HEVCViTConfig  # noqa: E402
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel  # noqa: E402
from hevc_vit.packing import PackingPlan, patchify_items  # noqa: E402
from hevc_vit.runtime.devices import parse_dtype  # noqa: E402

VARIANTS = ("reference_sdpa", "packing", "per_item")
# the architecture keys the reference's config takes (it has no head_norm_eps: its head norm uses layer_norm_eps)
REFERENCE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "layer_norm_type", "rope_theta", "use_head",
)  # fmt: skip


def build_models(preset: str, model_path: str | None) -> tuple[HEVCViTPackingModel, HEVCViTModel, torch.nn.Module]:
    """Our packing and standard models and the reference, float32 on the CPU, all with one set of weights."""
    if model_path:
        packing = HEVCViTPackingModel.from_pretrained(model_path, attn_implementation="sdpa")
    else:
        torch.manual_seed(0)
        packing = HEVCViTPackingModel(HEVCViTConfig.from_preset(preset, attn_implementation="sdpa"))
        for p in packing.parameters():  # norms and biases away from 1 and 0, so a mix-up shows
            p.data.add_(torch.randn_like(p) * 0.02)
    config = packing.config
    standard = HEVCViTModel(config)
    standard.load_state_dict(packing.state_dict())
    ref_config = OneVisionEncoderConfig(**{k: getattr(config, k) for k in REFERENCE_KEYS})
    ref_config._attn_implementation = "sdpa"
    reference = OneVisionEncoderModel(ref_config)
    head_eps = config.head_norm_eps if config.head_norm_eps is not None else config.layer_norm_eps
    if reference.head is not None and head_eps != reference.head.norm.eps:
        raise ValueError(f"head_norm_eps={head_eps}; the reference's head norm uses layer_norm_eps")
    reference.load_state_dict(convert_from_native(packing.state_dict(), "standard"), strict=True)
    if not isinstance(reference.encoder.layers[0].self_attn, sdpa.OneVisionEncoderSdpaAttention):
        raise RuntimeError("the reference was not built with the SDPA attention")
    return packing.eval(), standard.eval(), reference.eval()


def run_reference(model, items):
    out = [model(x.unsqueeze(0)) for x in items]
    return [o.last_hidden_state[0] for o in out], [o.pooler_output for o in out]


def run_packing(model: HEVCViTPackingModel, items):
    config = model.config
    patches, grid = patchify_items(items, config.patch_size, config.num_channels)
    plan = PackingPlan.from_grid_thw(grid, device=patches.device)
    last, pooled, _ = model.encode_packed(patches, plan)
    return list(last.split(plan.seqlens)), [pooled] if pooled is not None else []


def run_per_item(model: HEVCViTModel, items):
    out = [model(x.unsqueeze(0)) for x in items]
    return [o.last_hidden_state[0] for o in out], [o.pooler_output for o in out]


def max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).float(), torch.cat(b).float()
    return ((x - y).abs().max() / y.abs().max()).item()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", default=None, help="a checkpoint folder instead of random weights")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time (a shared machine)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [parse_dtype(name) for name in args.dtypes.split(",")]
    packing32, standard32, reference32 = build_models(args.preset, args.model)
    config = packing32.config
    pixels = make_workload(args.workload, args.repeat, config.num_channels, patch_size=config.patch_size)
    models, items = {}, {}
    for dtype in dtypes:
        models[dtype] = {
            "reference_sdpa": (run_reference, reference32 if dtype == torch.float32 else _copy(reference32, dtype)),
            "packing": (run_packing, packing32 if dtype == torch.float32 else _copy(packing32, dtype)),
            "per_item": (run_per_item, standard32 if dtype == torch.float32 else _copy(standard32, dtype)),
        }
        items[dtype] = [x.to(dtype) for x in pixels]
    load_before = loadavg()
    outputs, agreement = {}, {}
    with torch.inference_mode():
        for dtype in dtypes:
            for name, (fn, model) in models[dtype].items():
                outputs[(dtype, name)] = fn(model, items[dtype])  # warm-up, and the outputs compared
            ref_tokens, ref_pooled = outputs[(dtype, "reference_sdpa")]
            agreement[dtype] = {
                name: {
                    "tokens": max_rel_diff(outputs[(dtype, name)][0], ref_tokens),
                    "pooled": max_rel_diff(outputs[(dtype, name)][1], ref_pooled)
                    if ref_pooled[0] is not None
                    else None,
                }
                for name in ("packing", "per_item")
            }
        tokens = sum(t.shape[0] for t in outputs[(dtypes[0], "packing")][0])
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        pairs = [(dtype, name) for dtype in dtypes for name in VARIANTS]
        times: dict[tuple, list[float]] = {pair: [] for pair in pairs}
        for round_ in range(args.iters):
            shift = round_ % len(pairs)
            for dtype, name in pairs[shift:] + pairs[:shift]:
                fn, model = models[dtype][name]
                start = clock()
                fn(model, items[dtype])
                times[(dtype, name)].append(clock() - start)
    load_after = loadavg()
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "torch": torch.__version__,
        },
        "workload": {"name": args.workload, "repeat": args.repeat, "items": len(pixels), "tokens": tokens},
        "model": {"preset": config.matching_preset(), "path": args.model},
        "iters": args.iters,
        "clock": args.clock,
        "dtypes": {},
    }
    print(f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"{args.workload} workload: {len(pixels)} items, {tokens} tokens; {config.matching_preset() or 'custom'} model"
    )
    for dtype in dtypes:
        name_ = str(dtype).removeprefix("torch.")
        seconds = {name: statistics.median(times[(dtype, name)]) for name in VARIANTS}
        rows = {
            name: {
                "seconds": seconds[name],
                "tokens_per_s": tokens / seconds[name],
                "vs_reference": seconds["reference_sdpa"] / seconds[name],
                "vs_reference_best": min(times[(dtype, "reference_sdpa")]) / min(times[(dtype, name)]),
                "rounds_s": times[(dtype, name)],
            }
            for name in VARIANTS
        }
        report["dtypes"][name_] = {"variants": rows, "max_rel_diff_vs_reference": agreement[dtype]}
        for name, row in rows.items():
            print(
                f"{name_:>9} {name:>15}: {row['tokens_per_s']:9.0f} tok/s  {row['seconds'] * 1e3:8.1f} ms  "
                f"{row['vs_reference']:.3f}x reference (best round {row['vs_reference_best']:.3f}x)"
            )
        for name, diff in agreement[dtype].items():
            print(
                f"{name_:>9} {name:>15}: max rel diff vs reference tokens {diff['tokens']:.2e}, pooled {diff['pooled']}"
            )
    print(f"clock: {args.clock}; load average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


if __name__ == "__main__":
    main()
