"""What dtype "auto" means: the one rule in hevc_vit.devices, with torch's CPU capability checks replaced both ways,
and an explicit dtype always winning (encode and bench)."""

from __future__ import annotations

import pytest
import torch

from hevc_vit.bench import BenchSetup, run_benchmark
from hevc_vit.cli import build_parser
from hevc_vit.cli.bench import setup_from_args
from hevc_vit.devices import CPU_DTYPE_VARIABLE, default_dtype, describe_dtype_choice, dtype_choice, resolve_dtype
from hevc_vit.encode import encode

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with(monkeypatch):
    """``cpu_with(amx=..., avx512_bf16=...)``: torch's capability checks answer so, the suite's pin is lifted."""

    def pretend(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.delenv(CPU_DTYPE_VARIABLE, raising=False)
        answers = {"_is_amx_tile_supported": amx, "_is_avx512_bf16_supported": avx512_bf16}
        for name, answer in answers.items():
            monkeypatch.setattr(torch.cpu, name, lambda answer=answer: answer, raising=False)

    return pretend


def test_cpu_with_amx_takes_bfloat16(cpu_with):
    cpu_with(amx=True, avx512_bf16=True)
    dtype, reason = dtype_choice(CPU)
    assert dtype == default_dtype(CPU) == resolve_dtype("auto", CPU) == resolve_dtype(None, CPU) == torch.bfloat16
    assert "AMX" in reason and describe_dtype_choice(CPU).startswith("auto dtype: bfloat16 (")


@pytest.mark.parametrize("avx512_bf16", [True, False])
def test_cpu_without_amx_takes_float32(cpu_with, avx512_bf16):
    cpu_with(amx=False, avx512_bf16=avx512_bf16)
    dtype, reason = dtype_choice(CPU)
    assert dtype == resolve_dtype("auto", CPU) == torch.float32
    assert "no AMX" in reason if avx512_bf16 else "without AMX" in reason
    assert "bf16 matmul is slower" in reason


def test_missing_or_failing_capability_checks_count_as_absent(monkeypatch):
    monkeypatch.delenv(CPU_DTYPE_VARIABLE, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert dtype_choice(CPU) == (torch.float32, "CPU without AMX: bf16 matmul is slower than fp32 here")


def test_environment_variable_replaces_the_rule_on_cpus_only(cpu_with, monkeypatch):
    cpu_with(amx=False, avx512_bf16=False)
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "bfloat16")
    assert dtype_choice(CPU) == (torch.bfloat16, f"set by {CPU_DTYPE_VARIABLE}")
    assert dtype_choice(torch.device("cuda", 0))[0] == torch.bfloat16  # GPUs: never read
    monkeypatch.setenv(CPU_DTYPE_VARIABLE, "fp8")
    with pytest.raises(ValueError, match=f"{CPU_DTYPE_VARIABLE}='fp8'; expected one of"):
        dtype_choice(CPU)


def test_explicit_float32_wins_on_a_cpu_with_amx(cpu_with, model, images, tmp_path):
    cpu_with(amx=True, avx512_bf16=True)
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


def test_bench_reports_its_choice_and_takes_an_explicit_dtype(cpu_with):
    cpu_with(amx=False, avx512_bf16=True)
    args = build_parser().parse_args(["bench", "--dtype", "float32", "--device", "cpu"])
    assert setup_from_args(args).dtype == "float32"
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    setup = BenchSetup(workload="uniform", device="cpu", iters=1, warmup=1, config_overrides=small)
    report = run_benchmark(setup)
    assert report["dtype"] == "float32" and report["dtype_choice"] == describe_dtype_choice(CPU)
    assert report["matmul_peak_flops"] > 0 and all(r["mfu"] > 0 for r in report["methods"].values())
