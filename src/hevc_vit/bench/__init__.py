"""``hevc-vit bench``: packing against the per-item loop and the padded batch, side by side, in one run.

Three ways to encode the same items with the same weights:
    packing        the packing tower: every item packed into one sequence, one forward.
    per_item_loop  the standard model called once per item (how LLaVA-style towers handle lists).
    padded         the standard layers on one batch padded to the largest item, with a key mask.

All three run the same layers, so they are first checked to give the same features; then each is timed
(median of ``iters`` runs after warm-up), its peak memory taken, and its model FLOPs utilisation computed
against the dense matmul peak of the device in the run's dtype, measured in the same run (before and after
the timing; the higher counts). :mod:`.bench_dtypes` runs packing in float32 and bfloat16 side by side, and
:mod:`.bench_pipeline` times the input pipeline.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hevc_vit.bench.measure import matmul_peak_flops, peak_memory, per_token_cosine, time_median
from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.llava.towers import HEVCViTPackingVisionTower
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.packing import PackingPlan, grid_positions, patchify_items, unpack
from hevc_vit.runtime.devices import describe_dtype_choice, resolve_device, resolve_dtype

METHODS = ("packing", "per_item_loop", "padded")
WORKLOADS = ("mixed", "varied", "uniform")
# varied: 7 images of different aspect ratios and an 8-frame clip, as (t, h, w) in patches so that every patch size
# gets the same 11,965 tokens (at patch 16: 96×160, 224², 336×448, 448×672, 576×768, 640×1072, 1008² and 8 × 224²)
VARIED_GRIDS = ((1, 6, 10), (1, 14, 14), (1, 21, 28), (1, 28, 42), (1, 36, 48), (1, 40, 67), (1, 63, 63), (8, 14, 14))


# --------------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------------


def make_workload(
    name: str, repeat: int = 1, channels: int = 3, seed: int = 0, patch_size: int = 16
) -> list[torch.Tensor]:
    """Random pixels for a named workload, on the CPU, float32.

    mixed:   images 224, 336, 448 and 1008 pixels square and two 8-frame 224 videos ``(C, T, H, W)``,
             the set repeated ``repeat`` times (every side is a multiple of both 14 and 16).
    varied:  :data:`VARIED_GRIDS` — 7 images from 6 x 10 to 63 x 63 patches of ``patch_size`` pixels (non-square
             ones included) and an 8-frame clip, 11,965 tokens per repeat whatever the patch size.
    uniform: ``8 · repeat`` images of 448 x 448.
    """
    if name not in WORKLOADS:
        raise ValueError(f"workload={name!r}; expected one of {WORKLOADS}")
    if repeat < 1:
        raise ValueError(f"repeat={repeat}; expected >= 1")
    g = torch.Generator().manual_seed(seed)
    if name == "uniform":
        return [torch.randn(channels, 448, 448, generator=g) for _ in range(8 * repeat)]
    if name == "varied":
        sides = [(t, h * patch_size, w * patch_size) for t, h, w in VARIED_GRIDS] * repeat
        return [torch.randn(channels, *((t,) if t > 1 else ()), h, w, generator=g) for t, h, w in sides]
    items = []
    for _ in range(repeat):
        items += [torch.randn(channels, s, s, generator=g) for s in (224, 336, 448, 1008)]
        items += [torch.randn(channels, 8, 224, 224, generator=g) for _ in range(2)]
    return items


def model_flops(config: HEVCViTConfig, seqlens: list[int]) -> float:
    """Forward FLOPs (2 per multiply-add) of the useful work on items of these token counts."""
    D, M, L, P = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.patch_dim
    T = sum(seqlens)
    per_token = 2 * P * D + L * 2 * D * (4 * D + 2 * M)  # patch embed; qkv + proj + MLP per layer
    if config.use_head:
        per_token += 2 * 2 * D * D  # the head's k and v projections
    attention = L * 4 * D * sum(n * n for n in seqlens)  # q·kᵀ and p·v, all heads
    return float(T * per_token + attention)


# --------------------------------------------------------------------------------------------------
# the three methods
# --------------------------------------------------------------------------------------------------


def packing_input(tower: HEVCViTPackingVisionTower, items: list[torch.Tensor]) -> tuple[torch.Tensor, PackingPlan]:
    """The packing tower's input conversion: items -> packed patches and the plan."""
    patches, plan, _ = tower.to_packing_input(items)
    return patches, plan


def run_packing(tower: HEVCViTPackingVisionTower, items: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The packing tower on the list (one forward for all items), returning like the other methods the
    final ``last_hidden_state`` per item and the pooled vectors (the tower's own features are its
    ``select_layer`` entry, which it computes on the way)."""
    _, layout, outputs = tower.forward_with_outputs(items)
    return unpack(outputs.last_hidden_state, layout.tokens), outputs.pooler_output


def run_per_item_loop(model: HEVCViTModel, items: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The standard model once per item, keeping ``hidden_states`` as a LLaVA tower asks (like the packing
    tower does)."""
    features, pooled = [], []
    for item in items:
        out = model(item.unsqueeze(0), output_hidden_states=True)
        features.append(out.last_hidden_state[0])
        pooled.append(out.pooler_output)
    return features, torch.cat(pooled) if pooled[0] is not None else None


def run_padded(model: HEVCViTModel, items: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All items padded to the longest, one batch, attention masked to each item's real tokens."""
    config = model.config
    patches, grid_thw = patchify_items(items, config.patch_size, config.num_channels)
    device = patches.device
    seqlens = grid_thw.prod(-1).tolist()
    B, N = len(seqlens), max(seqlens)
    rows = torch.cat([torch.arange(n) + b * N for b, n in enumerate(seqlens)]).to(device)  # real rows
    padded = patches.new_zeros(B * N, patches.shape[1]).index_copy_(0, rows, patches)  # (B·N, C·p·p)
    positions = torch.zeros(B * N, 3, dtype=torch.int64, device=device)
    positions.index_copy_(0, rows, grid_positions(grid_thw).to(device))
    valid = torch.zeros(B * N, dtype=torch.bool, device=device).index_fill_(0, rows, True).view(B, 1, 1, N)
    # Segments for the pooling head: each item's real tokens, then its padding (pooled, then dropped).
    segments, real = [], []
    for n in seqlens:
        real.append(len(segments))
        segments.append(n)
        if N > n:
            segments.append(N - n)
    plan = PackingPlan.from_seqlens(segments, positions, device=device)

    def masked_attention(q, k, v, plan, scale, dropout_p=0.0):
        H, Dh = q.shape[1:]
        q, k, v = (t.reshape(B, N, H, Dh).transpose(1, 2) for t in (q, k, v))  # (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=scale)  # (B, H, N, Dh)
        return out.transpose(1, 2).reshape(B * N, H, Dh)

    last, pooled, _ = model.encode_packed(padded, plan, output_hidden_states=True, attend=masked_attention)
    last = last.view(B, N, -1)  # (B, N, D)
    features = [last[b, :n] for b, n in enumerate(seqlens)]
    return features, pooled[torch.tensor(real, device=device)] if pooled is not None else None


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


def _max_rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = torch.cat(a).float(), torch.cat(b).float()
    return ((x - y).abs().max() / y.abs().max()).item()


# the counts of a benchmark and their ranges (the upper bounds keep a typo from running for days)
BENCH_COUNTS = (("repeat", 1, 1000), ("iters", 1, 10000), ("warmup", 0, 10000))


@dataclass
class BenchSetup:
    """What :func:`run_benchmark` measures (the ``hevc-vit bench`` options)."""

    preset: str | None = "small"
    model_path: str | None = None
    workload: str = "mixed"
    device: str | None = None  # None: this rank's GPU when there is one, else the CPU
    dtype: str | None = None  # None: "auto", devices.dtype_choice (bf16 on GPUs; on CPUs, what a measurement picks)
    attn_implementation: str = "auto"
    repeat: int = 1
    iters: int = 5
    warmup: int = 2
    compile: bool = False
    accuracy: bool | None = None  # None: when dtype is not float32
    config_overrides: dict | None = None  # e.g. fewer layers, for tests

    def __post_init__(self) -> None:
        for name, low, high in BENCH_COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r}; expected an integer from {low} to {high}")


def _load_models(setup: BenchSetup, device: torch.device, dtype: torch.dtype):
    if setup.model_path:
        packing = HEVCViTPackingModel.from_pretrained(setup.model_path, attn_implementation=setup.attn_implementation)
    else:
        torch.manual_seed(0)
        overrides = dict(setup.config_overrides or {}, attn_implementation=setup.attn_implementation)
        config = HEVCViTConfig.from_preset(setup.preset, **overrides)
        packing = HEVCViTPackingModel(config)
    standard = HEVCViTModel(packing.config)
    standard.load_state_dict(packing.state_dict())
    fp32_state = {k: v.clone() for k, v in packing.state_dict().items()}
    packing.to(device, dtype).eval()
    standard.to(device, dtype).eval()
    return packing, standard, fp32_state


def run_benchmark(setup: BenchSetup, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole comparison and return the JSON-ready report (see module docstring)."""
    device = resolve_device(setup.device)
    dtype = resolve_dtype(setup.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    log(dtype_reason := _dtype_reason(setup.dtype, device, dtype_name))
    packing, standard, fp32_state = _load_models(setup, device, dtype)
    config = packing.config
    if setup.compile:
        packing.compile_blocks()
        standard.compile_blocks()
    tower = HEVCViTPackingVisionTower.from_model(packing, {"mm_vision_select_layer": -1})
    items = [
        x.to(device, dtype)
        for x in make_workload(setup.workload, setup.repeat, config.num_channels, patch_size=config.patch_size)
    ]
    seqlens = list(packing_input(tower, items)[1].seqlens)
    tokens = sum(seqlens)
    log(f"{len(items)} items, {tokens} tokens, {config.matching_preset() or 'custom'} model, {dtype_name} on {device}")

    methods: dict[str, Callable[[], tuple]] = {
        "packing": lambda: run_packing(tower, items),
        "per_item_loop": lambda: run_per_item_loop(standard, items),
        "padded": lambda: run_padded(standard, items),
    }
    outputs = {}
    with torch.inference_mode():
        for name, fn in methods.items():
            for _ in range(max(setup.warmup, 1)):
                outputs[name] = fn()
        agreement = {
            name: _max_rel_diff(outputs[name][0], outputs["packing"][0]) for name in ("per_item_loop", "padded")
        }
        peaks, flops = [matmul_peak_flops(device, dtype)], model_flops(config, seqlens)
        results = _time_methods(methods, device, setup.iters, tokens, log)
        peaks.append(matmul_peak_flops(device, dtype))  # before and after the timing: the higher counts
        results = {name: {**r, "mfu": flops / r["seconds"] / max(peaks)} for name, r in results.items()}
        conversion = _conversion_seconds(tower, items, device, setup.iters)
        accuracy = None
        if setup.accuracy if setup.accuracy is not None else dtype != torch.float32:
            accuracy = _accuracy(config, fp32_state, items, device, outputs)
    return {
        "methods": results,
        "ratios": _ratios(results),
        "conversion_share": conversion / results["packing"]["seconds"],
        "agreement_max_rel_diff_vs_packing": agreement,
        "accuracy_vs_fp32": accuracy,
        "model_flops": flops,
        "matmul_peak_flops": max(peaks),
        "matmul_peak_flops_before_after": peaks,
        "workload": {"name": setup.workload, "repeat": setup.repeat, "items": len(items), "tokens": tokens},
        "model": {"preset": config.matching_preset(), "path": setup.model_path, **_model_size(config)},
        "backend": setup.attn_implementation,
        "compiled": setup.compile,
        "dtype": dtype_name,
        "dtype_choice": dtype_reason,
        "device": str(device),
        "machine": _machine(device),
        "torch": torch.__version__,
        "iters": setup.iters,
        "date": time.strftime("%Y-%m-%d"),
    }


def _dtype_reason(asked: str | None, device: torch.device, dtype_name: str) -> str:
    return describe_dtype_choice(device) if asked in (None, "auto") else f"dtype: {dtype_name} (asked for)"


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    packing, loop, padded = results["packing"], results["per_item_loop"], results["padded"]
    return {
        "packing_vs_loop": loop["seconds"] / packing["seconds"],
        "packing_vs_padded": padded["seconds"] / packing["seconds"],
        "packing_mem_vs_padded": packing["peak_mem_bytes"] / max(padded["peak_mem_bytes"], 1),
    }


def _model_size(config: HEVCViTConfig) -> dict[str, int]:
    return {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers, "patch_size": config.patch_size}


def _time_methods(
    methods: dict[str, Callable[[], Any]],
    device: torch.device,
    iters: int,
    tokens: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Seconds (median of ``iters`` rounds), tokens/s and peak memory of each method.

    Round-robin timing, the order rotated every round: on a shared machine a slow spell then hits every
    method alike, and no method always runs right after the same other one (on the CPU the padded batch
    leaves the allocator in a state that costs whoever comes next)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(iters):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            times[name].append(time_median(methods[name], device, 1))
    results: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        seconds = statistics.median(times[name])
        memory = peak_memory(fn, device)
        results[name] = {
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_mem_bytes": memory,
        }
        log(f"{name:>14}: {seconds * 1e3:9.1f} ms  {tokens / seconds:12.0f} tokens/s  {memory / 2**20:9.1f} MiB")
    return results


def _conversion_seconds(tower: HEVCViTPackingVisionTower, items, device, iters) -> float:
    """Time of the packing tower's input conversion (patchify + plan) plus output conversion (split)."""
    patches, plan = packing_input(tower, items)
    features = torch.empty(plan.total_tokens, tower.hidden_size, device=device)
    into = time_median(lambda: packing_input(tower, items), device, iters)
    out = time_median(lambda: unpack(features, plan), device, iters)
    return into + out


def _accuracy(config, fp32_state, items, device, outputs) -> dict[str, dict[str, float]]:
    """Per-token cosine of the low-precision outputs against an fp32 run of the standard model, per item."""
    reference = HEVCViTModel(config)
    reference.load_state_dict(fp32_state)
    reference.to(device, torch.float32).eval()
    ref_features, _ = run_per_item_loop(reference, [x.float() for x in items])
    return {
        "packing": per_token_cosine(outputs["packing"][0], ref_features),
        "per_item_loop": per_token_cosine(outputs["per_item_loop"][0], ref_features),
    }


def _machine(device: torch.device) -> str:
    cores = f"{os.cpu_count()} CPU cores"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {platform.machine()}, {cores}"
    return f"{platform.processor() or platform.machine()}, {cores}, {torch.get_num_threads()} torch threads"
