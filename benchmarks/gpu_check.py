"""Everything GPU-side in one prepared run: correctness in fp32/bf16/fp16, host syncs, and the benchmark.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run            # the same code paths on the CPU, tiny sizes

Prints PASS/FAIL lines and the bench tables; writes gpu_check.json (and bench_*.json) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from safetensors.torch import load_file

from hevc_vit import HEVCViTModel, HEVCViTPackingModel, PackingPlan, patchify_items, unpack
from hevc_vit.attention import available_backends, backend_unavailable_reason
from hevc_vit.bench import BenchSetup, run_benchmark
from hevc_vit.cli.bench import format_report
from hevc_vit.configuration import HEVCViTConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")  # carried by the repo
RTOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
results: dict = {"checks": {}}


def record(name: str, ok: bool, detail: str = "") -> None:
    results["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check(name, fn):
    try:
        fn()
    except Exception as e:  # keep going: one failure must not hide the other figures
        record(name, False, f"{type(e).__name__}: {e}".splitlines()[0][:300])
        traceback.print_exc()


def goldens(device):
    golden_path = os.path.join(FIXTURES, "golden_onevision_encoder_tiny.safetensors")
    g = load_file(golden_path)
    folder = os.path.dirname(golden_path)
    cases = sorted({k.split(".")[0] for k in g})
    for backend in ("eager", "sdpa", "auto"):
        model = HEVCViTModel.from_pretrained(
            os.path.join(folder, "llava_vit_packing_tiny"), attn_implementation=backend
        ).to(device)
        worst = 0.0
        for case in cases:
            pos = g.get(f"{case}.patch_positions")
            with torch.no_grad():
                out = model(
                    g[f"{case}.pixel_values"].to(device), patch_positions=None if pos is None else pos.to(device)
                )
            worst = max(worst, (out.last_hidden_state.cpu() - g[f"{case}.last_hidden_state"]).abs().max().item())
            worst = max(worst, (out.pooler_output.cpu() - g[f"{case}.pooler_output"]).abs().max().item())
        record(f"goldens fp32 {backend} on {device.type}", worst <= 1e-4, f"max abs diff {worst:.2e}")


def mixed_items(device, dtype, p):
    g = torch.Generator().manual_seed(1)
    shapes = [
        (3, 16 * p, 24 * p),
        (3, 8, 16 * p, 16 * p),
        (3, 32 * p, 32 * p),
        (3, 16 * p, 24 * p),
        (3, 1 * p, 1 * p),
        (3, 7 * p, 5 * p),
    ]
    return [torch.randn(*s, generator=g).to(device, dtype) for s in shapes]


def backends_vs_eager(device, config, dtypes):
    torch.manual_seed(0)
    base = HEVCViTPackingModel(config).eval()
    state = base.state_dict()
    for dtype in dtypes:
        items = mixed_items(device, dtype, config.patch_size)
        patches, grid_thw = patchify_items(items, config.patch_size)
        eager = HEVCViTPackingModel(config).eval()
        eager.load_state_dict(state)
        eager.to(device, dtype).set_attn_implementation("eager")
        with torch.no_grad():
            ref = eager(patches, grid_thw)
        for name in ("sdpa", "torch_varlen", "flash_attn", "auto"):
            if backend_unavailable_reason(name):
                print(f"skip   {name}: {backend_unavailable_reason(name)}")
                continue
            if name in ("torch_varlen", "flash_attn") and dtype == torch.float32:
                continue

            def run(name=name):
                eager.set_attn_implementation(name)
                with torch.no_grad():
                    out = eager(patches, grid_thw)
                r1, r2 = rel(out.last_hidden_state, ref.last_hidden_state), rel(out.pooler_output, ref.pooler_output)
                record(
                    f"{name} vs eager {dtype} on {device.type}",
                    max(r1, r2) <= RTOL[dtype],
                    f"tokens {r1:.1e}, pooled {r2:.1e}",
                )

            check(f"{name} vs eager {dtype}", run)
        eager.set_attn_implementation("eager")

        # packed vs one at a time through the standard model, same dtype and backend
        def packed_vs_items():
            standard = HEVCViTModel(config).eval()
            standard.load_state_dict(state)
            standard.to(device, dtype).set_attn_implementation("auto")
            eager.set_attn_implementation("auto")
            with torch.no_grad():
                out = eager(patches, grid_thw)
                worst = 0.0
                for item, feats in zip(items, unpack(out.last_hidden_state, PackingPlan.from_grid_thw(grid_thw))):
                    worst = max(worst, rel(feats, standard(item[None]).last_hidden_state[0]))
            record(f"packed vs per item (auto) {dtype} on {device.type}", worst <= RTOL[dtype], f"max rel {worst:.1e}")

        check(f"packed vs per item {dtype}", packed_vs_items)


def host_syncs(device, config, dtype):
    """No sync inside the forward when grid_thw comes as a CPU tensor: CUDA's own sync check."""
    torch.manual_seed(0)
    model = HEVCViTPackingModel(config).to(device, dtype).eval()
    items = mixed_items(device, dtype, config.patch_size)
    patches, grid_thw = patchify_items(items, config.patch_size)
    for name in ("sdpa", "torch_varlen", "flash_attn", "auto"):
        if backend_unavailable_reason(name):
            continue

        def run(name=name):
            model.set_attn_implementation(name)
            with torch.no_grad():
                model(patches, grid_thw)  # warm: lazy imports, allocator
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    out = model(patches, grid_thw, output_hidden_states=True)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            record(f"no host sync in forward ({name}, grid_thw on host)", out.last_hidden_state.isfinite().all().item())

        check(f"no host sync {name}", run)


def training_step(device, config, dtype):
    def run():
        torch.manual_seed(0)
        model = HEVCViTPackingModel(config).to(device, dtype).train()
        items = mixed_items(device, dtype, config.patch_size)[:3]
        patches, grid_thw = patchify_items(items, config.patch_size)
        grads = {}
        for name in ("eager", "auto"):
            model.zero_grad()
            model.set_attn_implementation(name)
            out = model(patches, grid_thw)
            (out.last_hidden_state.float().square().mean() + out.pooler_output.float().mean()).backward()
            grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        r = rel(grads["auto"], grads["eager"])
        record(f"backward auto vs eager {dtype} on {device.type}", r <= 5 * RTOL[dtype], f"grad max rel {r:.1e}")

    check("training step", run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    results["env"] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "available_backends": available_backends(),
    }
    print(json.dumps(results["env"]), flush=True)
    t0 = time.time()
    check("goldens", lambda: goldens(device))
    small = HEVCViTConfig(
        hidden_size=256, num_attention_heads=4, num_hidden_layers=3, intermediate_size=512, patch_size=14
    )
    if args.dry_run:
        small = HEVCViTConfig(
            hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, patch_size=2
        )
    dtypes = (torch.float32, torch.bfloat16) if args.dry_run else (torch.float32, torch.bfloat16, torch.float16)
    backends_vs_eager(device, small, dtypes)
    if device.type == "cuda":
        host_syncs(device, small, torch.bfloat16)
    training_step(device, small, torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"checks took {time.time() - t0:.0f} s", flush=True)
    if not args.skip_bench:
        runs = [("eager_blocks", False), ("compiled_blocks", True)]
        for label, compiled in runs:
            setup = BenchSetup(
                preset="small" if args.dry_run else "large",
                workload="mixed",
                repeat=1 if args.dry_run else 4,
                iters=2 if args.dry_run else 5,
                warmup=1 if args.dry_run else 2,
                compile=compiled,
                device=device.type,
                dtype="bfloat16",
            )
            t = time.time()
            try:
                report = run_benchmark(setup, log=lambda s: print(s, flush=True))
            except Exception:
                traceback.print_exc()
                continue
            print(format_report(report), flush=True)
            print(f"bench {label} took {time.time() - t:.0f} s", flush=True)
            results[f"bench_{label}"] = report
            with open(os.path.join(args.out, f"bench_{label}.json"), "w") as f:
                json.dump(report, f, indent=2)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)
    failed = [k for k, v in results["checks"].items() if not v["ok"]]
    print(f"{len(results['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
