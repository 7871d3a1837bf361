"""Verification of a written checkpoint against SRC: generated inputs, one tolerance table keyed by the
written dtype, the per-case comparison and the report the CLI prints.

Legend: ``n`` items, ``B`` batch, ``D`` width, ``p`` patch; ``rows`` token rows of all items together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hevc_vit.configuration import HEVCViTConfig
from hevc_vit.convert.write import ARCH_KEYS
from hevc_vit.modeling import HEVCViTModel, HEVCViTPackingModel, HEVCViTPreTrainedModel, load_state_dict_checked
from hevc_vit.packing import as_batch, patchify_items


@dataclass(frozen=True)
class Tolerance:
    """PASS when ``max|dst - src| <= max_abs · max(1, max|src|)`` and the per-token cosines reach
    ``min_cos`` (worst token) and ``mean_cos`` (average). SRC runs in float32, DST in its stored dtype."""

    max_abs: float
    min_cos: float
    mean_cos: float


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(max_abs=1e-4, min_cos=0.99999, mean_cos=0.999999),
    torch.float16: Tolerance(max_abs=2e-2, min_cos=0.995, mean_cos=0.999),
    torch.bfloat16: Tolerance(max_abs=1e-1, min_cos=0.98, mean_cos=0.995),
}


@dataclass
class CaseResult:
    """One verification case: token rows compared (last_hidden_state rows and pooled vectors)."""

    name: str
    items: int
    tokens: int
    max_abs: float
    ref_max: float
    min_cos: float
    mean_cos: float
    passed: bool


@dataclass
class VerificationReport:
    dtype_name: str
    tolerance: Tolerance
    cases: list[CaseResult] = field(default_factory=list)
    config_mismatches: list[str] = field(default_factory=list)  # hyper-parameters that did not survive the trip

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases) and not self.config_mismatches

    def table(self) -> str:
        """The per-case table the CLI prints."""
        t = self.tolerance
        head = (
            f"{'case':<26}{'items':>6}{'tokens':>8}{'max abs diff':>14}{'max |src|':>11}"
            f"{'min cos':>12}{'mean cos':>12}  result"
        )
        lines = [head, "-" * len(head)]
        for c in self.cases:
            lines.append(
                f"{c.name:<26}{c.items:>6}{c.tokens:>8}{c.max_abs:>14.3e}{c.ref_max:>11.3f}"
                f"{c.min_cos:>12.8f}{c.mean_cos:>12.8f}  {'PASS' if c.passed else 'FAIL'}"
            )
        lines.append(
            f"thresholds for {self.dtype_name}: max abs diff <= {t.max_abs:g} x max(1, max|src|), "
            f"min cos >= {t.min_cos}, mean cos >= {t.mean_cos}"
        )
        if self.config_mismatches:
            differ = "; ".join(self.config_mismatches)
            lines.append(f"config.json: FAIL, reloaded hyper-parameters differ from SRC: {differ}")
        else:
            lines.append("config.json: PASS, reloaded hyper-parameters equal SRC's")
        return "\n".join(lines)


class VerificationFailed(RuntimeError):
    """The written checkpoint did not reproduce SRC; DST was not created (or was left as it was)."""

    def __init__(self, report: VerificationReport):
        failed = [c.name for c in report.cases if not c.passed] + (["config.json"] if report.config_mismatches else [])
        super().__init__(f"verification failed for {failed} (thresholds for {report.dtype_name})")
        self.report = report


def compare_outputs(
    name: str, items: int, reference: list[torch.Tensor], actual: list[torch.Tensor], tolerance: Tolerance
) -> CaseResult:
    """Compare matching ``(rows, D)`` tensors (token features, pooled vectors) row by row."""
    ref = torch.cat([r.detach().double().reshape(-1, r.shape[-1]) for r in reference]).cpu()  # (rows, D)
    out = torch.cat([a.detach().double().reshape(-1, a.shape[-1]) for a in actual]).cpu()  # (rows, D)
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: outputs have shape {tuple(out.shape)}, the reference {tuple(ref.shape)}")
    max_abs = (out - ref).abs().max().item()
    ref_max = ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12)  # (rows,)
    min_cos, mean_cos = cos.min().item(), cos.mean().item()
    finite = math.isfinite(max_abs) and math.isfinite(min_cos)
    passed = (
        finite
        and max_abs <= tolerance.max_abs * max(1.0, ref_max)
        and min_cos >= tolerance.min_cos
        and mean_cos >= tolerance.mean_cos
    )
    tokens = reference[0].reshape(-1, reference[0].shape[-1]).shape[0]  # the features; pooled vectors follow
    return CaseResult(name, items, int(tokens), max_abs, ref_max, min_cos, mean_cos, passed)


# -- inputs -------------------------------------------------------------------------------------------


@dataclass
class VerificationCase:
    """``batch`` for the standard model (``(B, C, H, W)`` / ``(B, C, T, H, W)``), or ``items`` packed into
    one sequence for the packing model (the reference runs them one at a time)."""

    name: str
    batch: torch.Tensor | None = None
    items: list[torch.Tensor] | None = None

    @property
    def num_items(self) -> int:
        return self.batch.shape[0] if self.batch is not None else len(self.items)


def make_verification_cases(config: HEVCViTConfig, seed: int = 0) -> list[VerificationCase]:
    """Deterministic random inputs sized from the config: a square image at the processor size (capped at
    16x16 patches), a batch of two at another size, a non-square image, a non-square video and a mixed
    packed batch (tall image, video, square image, a single patch)."""
    g = torch.Generator().manual_seed(seed)
    C, p = config.num_channels, config.patch_size
    n1 = min(max(config.image_size // p, 2), 16)
    n2 = n1 // 2 if n1 // 2 >= 2 else n1 + 2

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    s1, s2 = n1 * p, n2 * p
    frames = 4 if C != 4 else 5  # a video item (C, T, H, W) with T == C would read as an image stack
    return [
        VerificationCase(f"image_{s1}x{s1}", batch=pixels(1, C, s1, s1)),
        VerificationCase(f"batch_2x{s2}x{s2}", batch=pixels(2, C, s2, s2)),
        VerificationCase(f"image_{3 * p}x{5 * p}", batch=pixels(1, C, 3 * p, 5 * p)),
        VerificationCase(f"video_4x{2 * p}x{3 * p}", batch=pixels(1, C, 4, 2 * p, 3 * p)),
        VerificationCase(
            "packed_mixed",
            items=[pixels(C, 5 * p, 2 * p), pixels(C, frames, 2 * p, 2 * p), pixels(C, s2, s2), pixels(C, p, p)],
        ),
    ]


# -- running SRC and DST --------------------------------------------------------------------------------


def build_model(cls: type, config: HEVCViTConfig, state: dict[str, torch.Tensor]) -> HEVCViTPreTrainedModel:
    """A model of class ``cls`` holding ``state`` (native names, loaded strictly, tensors shared)."""
    with torch.device("meta"):
        model = cls(config)
    load_state_dict_checked(model, state, strict=True, assign=True)
    return model.eval()


def model_outputs(
    model: HEVCViTPreTrainedModel, case: VerificationCase, packed: bool, device: torch.device
) -> list[torch.Tensor]:
    """``[last (rows, D), pooled (n, D)]`` of one case, float32 on the CPU. ``packed``: one packed forward of
    all items through a packing model; otherwise the standard model, one item at a time for ``items``."""
    with torch.no_grad():
        if case.batch is not None:
            out = model(case.batch.to(device))
            lasts, pooled = [out.last_hidden_state], [out.pooler_output]
        elif packed:
            patches, grid = patchify_items(case.items, model.config.patch_size, model.config.num_channels)
            out = model(patches.to(device), grid)
            lasts, pooled = [out.last_hidden_state], [out.pooler_output]
        else:
            lasts, pooled = [], []
            for item in case.items:
                batch = as_batch(item, model.config.num_channels)  # (1, C, H, W) or (1, C, T, H, W)
                out = model(batch.to(device))
                lasts.append(out.last_hidden_state[0])
                pooled.append(out.pooler_output)
    last = torch.cat([x.reshape(-1, x.shape[-1]) for x in lasts]).float().cpu()  # (rows, D)
    result = [last]
    if pooled[0] is not None:
        result.append(torch.cat(pooled).float().cpu())  # (n, D)
    return result


def reference_outputs(
    config: HEVCViTConfig, native: dict[str, torch.Tensor], cases: list[VerificationCase], device: torch.device
) -> dict[str, list[torch.Tensor]]:
    """SRC's outputs on every case: its weights (native names) in float32, strictly loaded into the standard
    model — a wrong preset or key table fails here."""
    native32 = {k: v.float() if v.is_floating_point() else v for k, v in native.items()}
    reference = build_model(HEVCViTModel, config, native32).to(device)
    return {c.name: model_outputs(reference, c, packed=False, device=device) for c in cases}


def verify_folder(
    folder: Path,
    config: HEVCViTConfig,
    cases: list[VerificationCase],
    expected: dict[str, list[torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device,
) -> VerificationReport:
    """Reload ``folder`` with ``from_pretrained`` (standard model for batches, packing model for the packed
    case, one at a time) and compare every case with SRC's outputs, and the reloaded config with SRC's."""
    tolerance = TOLERANCES[dtype]
    report = VerificationReport(str(dtype).removeprefix("torch."), tolerance)
    actual: dict[str, list[torch.Tensor]] = {}
    for cls, packed in ((HEVCViTModel, False), (HEVCViTPackingModel, True)):
        mine = [c for c in cases if (c.items is not None) == packed]
        if not mine:
            continue
        model = cls.from_pretrained(folder, dtype="auto", attn_implementation="eager", device_map=device)
        loaded_dtype = model.patch_embed.proj.weight.dtype
        if loaded_dtype != dtype:
            raise AssertionError(f"{folder} reloaded as {loaded_dtype}; it was written as {dtype}")
        for case in mine:
            actual[case.name] = model_outputs(model, case, packed=packed, device=device)
        for key in ARCH_KEYS:
            want, got = getattr(config, key, None), getattr(model.config, key, None)
            if want != got and f"{key}: SRC {want!r}, DST {got!r}" not in report.config_mismatches:
                report.config_mismatches.append(f"{key}: SRC {want!r}, DST {got!r}")
        del model
    for case in cases:
        report.cases.append(
            compare_outputs(case.name, case.num_items, expected[case.name], actual[case.name], tolerance)
        )
    return report
