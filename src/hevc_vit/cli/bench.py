"""``hevc-vit bench``: time packing against the per-item loop and the padded batch (:mod:`hevc_vit.bench`),
print the table and optionally write the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..bench import WORKLOADS, BenchSetup, run_benchmark
from ..devices import DTYPES
from ..files import write_atomic
from .common import EXIT_OK, run_guarded


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="time packing against the per-item loop and the padded batch",
        description="Measure, in one process and on the same weights and items, the packing path (all items in "
        "one forward), the standard model once per item, and one padded batch with a key mask: seconds, tokens/s, "
        "peak memory and (on CUDA) MFU, plus their ratios. Prints a table and optionally writes JSON.",
        epilog="exit status: 0 measured, 1 the report could not be written, 2 invalid options, 130 interrupted.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="small", help="random weights of this size preset (default: small)")
    source.add_argument("--model", dest="model_path", help="a checkpoint folder instead of a preset")
    p.add_argument("--workload", choices=WORKLOADS, default="mixed", help="mixed sizes and videos, or equal 448 images")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--attn-implementation",
        default="auto",
        help="attention backend of the packing and per-item runs; the padded batch always uses masked SDPA "
        "(default: auto)",
    )
    p.add_argument("--repeat", type=int, default=1, help="copies of the workload in one run (default: 1)")
    p.add_argument("--iters", type=int, default=5, help="timed runs per method; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per method first (default: 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the dense parts of every block")
    p.add_argument("--json", dest="json_path", help="also write the report as JSON to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit bench``; returns the exit status."""
    return run_setup(setup_from_args(args), args.json_path)


def setup_from_args(args: argparse.Namespace) -> BenchSetup:
    """The :class:`BenchSetup` the options describe."""
    return BenchSetup(
        preset=args.preset,
        model_path=args.model_path,
        workload=args.workload,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        repeat=args.repeat,
        iters=args.iters,
        warmup=args.warmup,
        compile=args.compile,
    )


def run_setup(setup: BenchSetup, json_path: str | None = None) -> int:
    """The command on a prepared setup (what :func:`run` does after parsing; tests pass a smaller model
    through ``setup.config_overrides``): progress on stderr, the table on stdout, the JSON report written
    to ``json_path`` (all or nothing). Returns the exit status."""

    def bench() -> int:
        report = run_benchmark(setup, log=lambda s: print(s, file=sys.stderr))
        print(format_report(report))
        if json_path:
            write_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
        return EXIT_OK

    return run_guarded("bench", bench)


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a :func:`~hevc_vit.bench.run_benchmark` report."""
    model, workload = report["model"], report["workload"]
    lines = [
        f"hevc-vit bench — {model['preset'] or model['path']}, {workload['name']} workload "
        f"({workload['items']} items, {workload['tokens']} tokens), {report['dtype']} on "
        f"{report['machine']}, torch {report['torch']}, attention {report['backend']}"
        + (", compiled blocks" if report["compiled"] else ""),
        "",
        f"| method | seconds (median of {report['iters']}) | tokens/s | peak memory (MiB) | MFU |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["methods"].items():
        mfu = f"{r['mfu'] * 100:.1f} %" if r["mfu"] is not None else "—"
        lines.append(
            f"| {name} | {r['seconds']:.4f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_bytes'] / 2**20:,.1f} | {mfu} |"
        )
    ratios = report["ratios"]
    lines += [
        "",
        f"packing_vs_loop    {ratios['packing_vs_loop']:.2f}x",
        f"packing_vs_padded  {ratios['packing_vs_padded']:.2f}x",
        f"packing memory / padded memory  {ratios['packing_mem_vs_padded']:.2f}",
        f"conversion_share   {report['conversion_share'] * 100:.2f} % of packing time",
        "agreement with packing (max abs diff / max |value|): "
        + ", ".join(f"{k} {v:.1e}" for k, v in report["agreement_max_rel_diff_vs_packing"].items()),
    ]
    if report["matmul_peak_flops"]:
        lines.append(f"measured {report['dtype']} matmul peak: {report['matmul_peak_flops'] / 1e12:.0f} TFLOP/s")
    if report["accuracy_vs_fp32"]:
        for name, c in report["accuracy_vs_fp32"].items():
            lines.append(f"per-token cosine vs fp32 reference, {name}: min {c['min']:.5f}, mean {c['mean']:.6f}")
    return "\n".join(lines)
