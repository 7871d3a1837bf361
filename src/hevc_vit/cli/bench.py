"""``hevc-vit bench``: time packing against the per-item loop and the padded batch (:mod:`hevc_vit.bench`),
packing in float32 against bfloat16 (``--compare-dtypes``, :mod:`hevc_vit.bench.dtypes`), or one loader
worker's input pipeline (``--pipeline``, :mod:`hevc_vit.bench.pipeline`); print the table and optionally write
the JSON report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from hevc_vit.bench import BENCH_COUNTS, WORKLOADS, BenchSetup, run_benchmark
from hevc_vit.bench.dtypes import compare_dtypes, format_dtype_report
from hevc_vit.bench.pipeline import PipelineSetup, format_pipeline_report, run_pipeline_benchmark
from hevc_vit.cli.common import EXIT_OK, integer_in, run_guarded
from hevc_vit.files import write_atomic
from hevc_vit.runtime.devices import DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``hevc-vit`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="time packing against the per-item loop and the padded batch",
        description="Measure, in one process and on the same weights and items, the packing path (all items in "
        "one forward), the standard model once per item, and one padded batch with a key mask: seconds, tokens/s, "
        "peak memory and MFU (against the matmul peak in the run's dtype, measured in the same run), plus their "
        "ratios. Prints a table and optionally writes JSON.",
        epilog="exit status: 0 measured, 1 the report could not be written, 2 invalid options, 130 interrupted.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="small", help="random weights of this size preset (default: small)")
    source.add_argument("--model", dest="model_path", help="a checkpoint folder instead of a preset")
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="mixed",
        help="mixed: square sizes and videos; varied: 7 aspect ratios and a clip (11,965 tokens); uniform: 448² images",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        help="default auto: bfloat16 on GPUs; on CPUs bfloat16 where a one-time matmul measurement finds it "
        ">= 1.2x float32, else float32 (the run says which and why)",
    )
    p.add_argument(
        "--attn-implementation",
        default="auto",
        help="attention backend of the packing and per-item runs; the padded batch always uses masked SDPA "
        "(default: auto)",
    )
    counts = {name: integer_in(low, high) for name, low, high in BENCH_COUNTS}  # the ranges BenchSetup checks
    p.add_argument("--repeat", type=counts["repeat"], default=1, help="copies of the workload in one run (default: 1)")
    p.add_argument(
        "--iters", type=counts["iters"], default=5, help="timed runs per method; the median is reported (default: 5)"
    )
    p.add_argument("--warmup", type=counts["warmup"], default=2, help="untimed runs per method first (default: 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the dense parts of every block")
    p.add_argument("--json", dest="json_path", help="also write the report as JSON to this file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--compare-dtypes",
        action="store_true",
        help="instead: packing in float32 and bfloat16 side by side, each one's MFU against its own matmul peak, "
        "and the per-token cosine of bfloat16 against float32",
    )
    mode.add_argument(
        "--pipeline",
        nargs="?",
        const="",
        metavar="FOLDER",
        help="instead: one loader worker's preprocessing (read, decode, resize, normalise, patchify) on the images "
        "and videos of FOLDER (default: a synthetic set of JPEGs of 256..4000 px and two clips), the path before "
        "the JPEG draft decode and the table lookup against the current one, and how far the draft decode moves "
        "the inputs and features; --iters loads per file",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """``hevc-vit bench``; returns the exit status."""
    setup = setup_from_args(args)
    if getattr(args, "pipeline", None) is not None:
        pipeline = PipelineSetup(args.pipeline or None, args.preset, args.model_path, iters=args.iters)
        return run_setup(
            setup, args.json_path, lambda log: run_pipeline_benchmark(pipeline, log), format_pipeline_report
        )
    if getattr(args, "compare_dtypes", False):
        return run_setup(setup, args.json_path, lambda log: compare_dtypes(setup, log), format_dtype_report)
    return run_setup(setup, args.json_path)


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


def run_setup(
    setup: BenchSetup,
    json_path: str | None = None,
    measure: Callable[[Callable[[str], None]], dict[str, Any]] | None = None,
    formatter: Callable[[dict[str, Any]], str] | None = None,
) -> int:
    """The command on a prepared setup (what :func:`run` does after parsing; tests pass a smaller model
    through ``setup.config_overrides``): progress on stderr, the table on stdout, the JSON report written
    to ``json_path`` (all or nothing). ``measure(log)`` / ``formatter`` replace :func:`run_benchmark` /
    :func:`format_report` (the other modes). Returns the exit status."""

    def bench() -> int:
        log = lambda s: print(s, file=sys.stderr)  # noqa: E731
        report = measure(log) if measure else run_benchmark(setup, log=log)
        print((formatter or format_report)(report))
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
        report.get("dtype_choice", ""),
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
        peak = report["matmul_peak_flops"]
        scale, unit = (1e12, "TFLOP/s") if peak >= 1e12 else (1e9, "GFLOP/s")
        lines.append(f"measured {report['dtype']} matmul peak: {peak / scale:,.0f} {unit} (MFU is against it)")
    if report["accuracy_vs_fp32"]:
        for name, c in report["accuracy_vs_fp32"].items():
            lines.append(f"per-token cosine vs fp32 reference, {name}: min {c['min']:.5f}, mean {c['mean']:.6f}")
    return "\n".join(lines)
