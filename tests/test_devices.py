"""What dtype "auto" means: the one rule in hevc_vit.runtime.devices, driven both ways by stubbed CPU measurements
(hevc_vit.runtime.calibration), its cache per machine, and an explicit dtype always winning (encode and bench)."""

from __future__ import annotations

import json

import pytest
import torch

from hevc_vit.bench import BenchSetup, run_benchmark
from hevc_vit.cli import build_parser
from hevc_vit.cli.bench import setup_from_args
from hevc_vit.encode import encode
from hevc_vit.runtime import calibration
from hevc_vit.runtime.calibration import BF16_MIN_SPEEDUP, Calibration, cpu_dtype_calibration, measure_cpu_dtypes
from hevc_vit.runtime.devices import (
    CPU_DTYPE_VARIABLE,
    default_dtype,
    describe_dtype_choice,
    dtype_choice,
    resolve_dtype,
)

CPU = torch.device("cpu")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """``measured(fp32=..., bf16=..., cosine=...)``: the suite's pin is lifted, the cache lives in a temporary
    folder, and a CPU measurement answers with these rates (GFLOP/s); returns the list of measurements made."""
    monkeypatch.delenv(CPU_DTYPE_VARIABLE, raising=False)
    monkeypatch.setenv(calibration.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "_memo", {})
    calls: list[str] = []

    def pretend(fp32: float, bf16: float, cosine: float = 0.99999) -> list[str]:
        def measure(machine: str = "", shape=None) -> Calibration:
            calls.append(machine)
            return Calibration(machine, fp32, bf16, cosine, seconds=0.02)

        monkeypatch.setattr(calibration, "measure_cpu_dtypes", measure)
        return calls

    return pretend


def test_cpu_where_bf16_matmul_is_clearly_faster_takes_bfloat16(measured):
    measured(fp32=178.0, bf16=410.0)  # the AMD EPYC of issue 22: AVX-512-BF16, no AMX, bf16 2.3x
    dtype, reason = dtype_choice(CPU)
    assert dtype == default_dtype(CPU) == resolve_dtype("auto", CPU) == resolve_dtype(None, CPU) == torch.bfloat16
    assert reason == f"matmul measured: bf16 410 GFLOP/s vs fp32 178 (2.30x) >= {BF16_MIN_SPEEDUP}x"
    assert describe_dtype_choice(CPU) == f"auto dtype: bfloat16 ({reason})"


@pytest.mark.parametrize("fp32, bf16", [(330.0, 165.0), (100.0, 115.0)])  # round 2's CPU (0.5x); a marginal gain
def test_cpu_where_bf16_matmul_is_slower_or_barely_faster_takes_float32(measured, fp32, bf16):
    measured(fp32=fp32, bf16=bf16)
    dtype, reason = dtype_choice(CPU)
    assert dtype == resolve_dtype("auto", CPU) == torch.float32
    assert reason.endswith(f"< {BF16_MIN_SPEEDUP}x") and f"bf16 {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f}" in reason


def test_inaccurate_bf16_is_refused_however_fast(measured):
    measured(fp32=100.0, bf16=500.0, cosine=0.98)
    dtype, reason = dtype_choice(CPU)
    assert dtype == torch.float32 and "bf16 cosine 0.98000 < 0.999" in reason


def test_the_measurement_runs_once_per_machine_and_the_next_process_reads_the_cache(measured, monkeypatch):
    calls = measured(fp32=178.0, bf16=410.0)
    assert dtype_choice(CPU)[0] == dtype_choice(CPU)[0] == torch.bfloat16
    assert len(calls) == 1  # the second call is answered from this process's memory
    monkeypatch.setattr(calibration, "_memo", {})  # as a new process starts
    dtype, reason = dtype_choice(CPU)
    assert dtype == torch.bfloat16 and "(cached)" in reason and len(calls) == 1
    stored = json.loads(calibration.cache_path().read_text())
    assert list(stored) == [calibration.machine_key()] and stored[calibration.machine_key()]["bf16_gflops"] == 410.0
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another thread count: another machine
    assert dtype_choice(CPU)[0] == torch.bfloat16 and len(calls) == 2
    assert len(json.loads(calibration.cache_path().read_text())) == 2  # both kept


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"fp32_gflops": 1}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(measured, monkeypatch, content):
    calls = measured(fp32=330.0, bf16=165.0)
    path = calibration.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("KEY", calibration.machine_key()))
    assert dtype_choice(CPU)[0] == torch.float32 and len(calls) == 1
    assert calibration.machine_key() in json.loads(path.read_text())


def test_an_unwritable_cache_only_goes_unkept(measured, monkeypatch, tmp_path):
    calls = measured(fp32=178.0, bf16=410.0)
    (tmp_path / "file").write_text("a file where the cache folder should be")
    monkeypatch.setenv(calibration.CACHE_VARIABLE, str(tmp_path / "file" / "cache"))
    assert cpu_dtype_calibration().choice()[0] == torch.bfloat16 and len(calls) == 1


def test_the_real_measurement_compares_the_two_dtypes_on_the_same_product():
    result = measure_cpu_dtypes("this machine", shape=(32, 64, 64))
    assert result.fp32_gflops > 0 and result.bf16_gflops > 0 and result.machine == "this machine"
    assert 0.999 < result.bf16_cosine <= 1.0 + 1e-6  # bf16 rounding of 64-term dot products


def test_environment_variable_replaces_the_rule_on_cpus_only(measured, monkeypatch):
    calls = measured(fp32=178.0, bf16=410.0)
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")
    assert dtype_choice(CPU) == (torch.bfloat16, f"set by {CPU_DTYPE_VARIABLE}")
    assert dtype_choice(torch.device("cuda", 0))[0] == torch.bfloat16  # GPUs: never read
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "fp8")
    with pytest.raises(ValueError, match=f"{CPU_DTYPE_VARIABLE}='fp8'; expected one of"):
        dtype_choice(CPU)
    assert calls == []  # nothing measured where the variable decides


def test_explicit_float32_wins_on_a_cpu_where_bf16_is_faster(measured, model, images, tmp_path):
    measured(fp32=178.0, bf16=410.0)
    assert resolve_dtype("float32", CPU) == torch.float32
    notes: list[str] = []
    options = dict(model=model, workers=0, min_image_tokens=4, max_image_tokens=16, progress=False)
    forced = encode([images], tmp_path / "forced", dtype="float32", log=notes.append, **options)
    assert forced.encoded == 6 and not any(n.startswith("auto dtype") for n in notes)
    automatic = encode([images], tmp_path / "auto", log=notes.append, **options)
    assert automatic.encoded == 6
    assert [n for n in notes if n.startswith("auto dtype")] == [describe_dtype_choice(CPU)]  # said once
    stored = {run: (tmp_path / run / "encode_config.json").read_text() for run in ("forced", "auto")}
    assert '"dtype": "float32"' in stored["forced"] and '"dtype": "bfloat16"' in stored["auto"]


@pytest.mark.slow  # a benchmark run, a torch.compile or the base preset: seconds
def test_bench_reports_its_choice_and_takes_an_explicit_dtype(measured, small_matmul_peak):
    measured(fp32=330.0, bf16=165.0)
    args = build_parser().parse_args(["bench", "--dtype", "float32", "--device", "cpu"])
    assert setup_from_args(args).dtype == "float32"
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    setup = BenchSetup(workload="uniform", device="cpu", iters=1, warmup=1, config_overrides=small)
    report = run_benchmark(setup)
    assert report["dtype"] == "float32" and report["dtype_choice"] == describe_dtype_choice(CPU)
    assert report["matmul_peak_flops"] > 0 and all(r["mfu"] > 0 for r in report["methods"].values())
