"""The benchmark compares like with like: its three methods give the same features, and its report is
consistent with itself. (Speed targets are checked by running ``hevc-vit bench``, never in tests.)"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from hevc_vit import HEVCViTModel, HEVCViTPackingModel, patchify_items
from hevc_vit.bench import BenchSetup, make_workload, model_flops, run_benchmark, run_padded, run_per_item_loop
from hevc_vit.bench.dtypes import compare_dtypes, format_dtype_report
from hevc_vit.cli import build_parser, main
from hevc_vit.cli.bench import format_report, run, run_setup, setup_from_args
from hevc_vit.convert.verify import TOLERANCES
from tests.helpers import assert_close_rel, tiny_config


def test_workloads():
    mixed = make_workload("mixed", repeat=2)
    assert [tuple(x.shape) for x in mixed[:6]] == [
        (3, 224, 224), (3, 336, 336), (3, 448, 448), (3, 1008, 1008), (3, 8, 224, 224), (3, 8, 224, 224)
    ]  # fmt: skip
    assert len(mixed) == 12
    assert len(make_workload("uniform")) == 8 and make_workload("uniform")[0].shape == (3, 448, 448)
    with pytest.raises(ValueError, match="workload='odd'"):
        make_workload("odd")


@pytest.mark.parametrize("patch", [14, 16])
def test_varied_workload_has_the_issue_token_count_at_every_patch_size(patch):
    """The round-2 workload (7 images 160×96 … 1008×1008 and an 8-frame clip, 11,965 tokens), counted from the
    pixel shapes and from the packing plan."""
    items = make_workload("varied", patch_size=patch)
    assert len(items) == 8 and items[-1].shape[1] == 8  # 7 images, then the clip (C, T, H, W)
    shapes = [tuple(x.shape[-2:]) for x in items]
    assert (
        any(h != w for h, w in shapes) and min(shapes) == (6 * patch, 10 * patch) and max(shapes) == (63 * patch,) * 2
    )
    by_shape = sum((x.shape[1] if x.dim() == 4 else 1) * x.shape[-2] * x.shape[-1] // patch**2 for x in items)
    _, grid = patchify_items(items, patch)
    assert by_shape == int(grid.prod(dim=1).sum()) == 11_965


def test_padded_baseline_equals_the_standard_model_item_by_item():
    model = HEVCViTModel(tiny_config()).eval()
    items = [torch.randn(3, 28, 42), torch.randn(3, 2, 28, 28), torch.randn(3, 56, 14)]
    with torch.no_grad():
        padded, padded_pooled = run_padded(model, items)
        looped, looped_pooled = run_per_item_loop(model, items)
    for a, b in zip(padded, looped):
        assert_close_rel(a, b)
    assert_close_rel(padded_pooled, looped_pooled)


def test_model_flops_counts_dense_and_attention_work():
    config = tiny_config(use_head=False)
    D, M, L, P = 64, 128, 2, 3 * 14 * 14
    assert model_flops(config, [4, 9]) == 13 * (2 * P * D + L * 2 * D * (4 * D + 2 * M)) + L * 4 * D * (16 + 81)


@pytest.mark.slow  # a benchmark run, a torch.compile or the base preset: seconds
def test_report_is_consistent(tmp_path, small_matmul_peak):
    setup = BenchSetup(
        preset="small", workload="uniform", iters=1, warmup=1, accuracy=True, device="cpu",
        config_overrides=dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128),
    )  # fmt: skip
    report = run_benchmark(setup)
    methods = report["methods"]
    assert set(methods) == {"packing", "per_item_loop", "padded"}
    assert report["workload"]["tokens"] == 8 * (448 // 16) ** 2
    for r in methods.values():
        assert r["tokens_per_s"] == pytest.approx(report["workload"]["tokens"] / r["seconds"])
        assert r["mfu"] == pytest.approx(report["model_flops"] / r["seconds"] / report["matmul_peak_flops"])
    assert report["matmul_peak_flops"] == max(report["matmul_peak_flops_before_after"])  # measured in this run
    assert report["ratios"]["packing_vs_loop"] == pytest.approx(
        methods["per_item_loop"]["seconds"] / methods["packing"]["seconds"]
    )
    assert max(report["agreement_max_rel_diff_vs_packing"].values()) <= 1e-5
    assert report["accuracy_vs_fp32"]["packing"]["min"] > 0.99999
    # a ratio of two timings taken apart: only its kind is checked (shared machines make any bound flaky)
    assert math.isfinite(report["conversion_share"]) and report["conversion_share"] > 0
    text = format_report(report)
    assert "packing_vs_padded" in text and "| per_item_loop |" in text


def test_cli_writes_json(tmp_path, capsys, small_matmul_peak):
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    path = tmp_path / "bench.json"
    argv = ["bench", "--workload", "uniform", "--device", "cpu", "--iters", "1", "--warmup", "1", "--json", str(path)]
    args = build_parser().parse_args(argv)
    assert args.run is run  # what main() calls: run_setup(setup_from_args(args), ...), here on a smaller model
    assert run_setup(replace(setup_from_args(args), config_overrides=small), args.json_path) == 0
    report = json.loads(path.read_text())
    assert set(report["ratios"]) >= {"packing_vs_loop", "packing_vs_padded"}
    assert "packing_vs_loop" in capsys.readouterr().out


@pytest.mark.slow  # a benchmark run, a torch.compile or the base preset: seconds
def test_compiled_blocks_give_the_same_outputs():
    """The compile path traces the same maths (aot_eager here: no code generation on the CI machine;
    the GPU check runs inductor and reports its accuracy)."""
    model = HEVCViTPackingModel(tiny_config()).eval()
    patches, grid_thw = patchify_items([torch.randn(3, 28, 42), torch.randn(3, 2, 28, 28), torch.randn(3, 42, 42)], 14)
    with torch.no_grad():
        expected = model(patches, grid_thw, output_hidden_states=True)
        model.compile_blocks(backend="aot_eager")
        got = model(patches, grid_thw, output_hidden_states=True)
        again = model(patches[:6], [[1, 2, 3]])  # another length: the same dynamic graph
    assert_close_rel(got.last_hidden_state, expected.last_hidden_state)
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert_close_rel(a, b)
    assert_close_rel(again.last_hidden_state, expected.last_hidden_state[:6])


def test_cli_reports_bad_options(capsys):
    with pytest.raises(SystemExit) as stop:  # a count out of its range stops the parser
        main(["bench", "--repeat", "0", "--device", "cpu"])
    assert stop.value.code == 2 and "argument --repeat: '0'; expected an integer from 1 to" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--device", "cpu"]) == 2
    assert "preset='tiny'" in capsys.readouterr().err


@pytest.mark.slow  # a benchmark run, a torch.compile or the base preset: seconds
def test_compare_dtypes_reports_each_dtype_against_its_own_peak(capsys, small_matmul_peak):
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    setup = BenchSetup(workload="uniform", device="cpu", iters=2, warmup=1, config_overrides=small)
    report = compare_dtypes(setup)
    rows = report["dtypes"]
    assert list(rows) == ["float32", "bfloat16"]
    for r in rows.values():
        assert r["mfu"] == pytest.approx(report["model_flops"] / r["seconds"] / r["matmul_peak_flops"])
    speed = rows["float32"]["seconds"] / rows["bfloat16"]["seconds"]
    assert rows["bfloat16"]["speed_vs_float32"] == pytest.approx(speed)
    cosine, bound = report["cosine_bfloat16_vs_float32"], TOLERANCES[torch.bfloat16]  # convert's bf16 bounds
    assert bound.min_cos <= cosine["min"] <= cosine["mean"] <= 1.0 + 1e-6 and cosine["mean"] >= bound.mean_cos
    text = format_dtype_report(report)
    assert "| bfloat16 |" in text and "per-token cosine" in text and report["auto_dtype"] in text
    args = build_parser().parse_args(["bench", "--compare-dtypes"])
    assert args.compare_dtypes and args.pipeline is None
