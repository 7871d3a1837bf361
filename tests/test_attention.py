"""Every attention backend against the eager specification, and the registry's dispatch rules.

The CUDA-only backends (torch_varlen, flash_attn) are exercised on the CPU with their kernel replaced
by the eager math, which checks the arguments they pass (int32 cu_seqlens, a Python-int max_seqlen,
the scale); their numerics are checked on a GPU by ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import pytest
import torch

import hevc_vit.attention as attention
from hevc_vit import HEVCViTPackingModel, PackingPlan, patchify_items
from hevc_vit.attention import eager_attention, get_attention, sdpa_attention
from tests.helpers import assert_close_rel, tiny_config

# lengths 6, 4, 6, 1, 4, 9: repeated lengths that are not back to back exercise the gathered sdpa path
GRID = [[1, 2, 3], [1, 2, 2], [2, 1, 3], [1, 1, 1], [1, 2, 2], [1, 3, 3]]


def _qkv(T: int, H: int = 2, Dh: int = 32, dtype=torch.float32):
    return [torch.randn(T, H, Dh, dtype=dtype) for _ in range(3)]


def _reference(q, k, v, plan, scale):
    """Block-diagonal masked attention over the whole sequence: an independent formulation."""
    seg = plan.segment_ids
    mask = seg[:, None] == seg[None, :]  # (T, T)
    scores = torch.einsum("thd,shd->hts", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("fn", [eager_attention, sdpa_attention], ids=["eager", "sdpa"])
def test_backends_match_masked_attention(fn):
    plan = PackingPlan.from_grid_thw(GRID)
    q, k, v = _qkv(plan.total_tokens)
    assert_close_rel(fn(q, k, v, plan, 0.2), _reference(q, k, v, plan, 0.2))


def test_sdpa_on_one_contiguous_group_has_no_gather():
    plan = PackingPlan.from_grid_thw([[1, 2, 2]] * 3)
    ((length, count, tokens),) = plan.length_groups
    assert tokens == slice(0, 12)
    q, k, v = _qkv(12)
    assert_close_rel(sdpa_attention(q, k, v, plan, 0.3), eager_attention(q, k, v, plan, 0.3))


def _fake_varlen(calls):
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(dict(cu=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k, kwargs=kwargs))
        assert cu_q.dtype == torch.int32 and isinstance(max_q, int) and cu_q is cu_k and max_q == max_k
        seqlens = (cu_q[1:] - cu_q[:-1]).tolist()
        scale = kwargs.get("scale", kwargs.get("softmax_scale"))
        plan = PackingPlan.from_seqlens(seqlens, torch.zeros(sum(seqlens), 3, dtype=torch.long))
        return eager_attention(q, k, v, plan, scale)

    return kernel


@pytest.fixture
def fake_cuda_kernels(monkeypatch):
    """Pretend CUDA kernels exist and accept CPU tensors, so the dispatch code runs here."""
    calls: list[dict] = []
    monkeypatch.setattr(attention, "load_torch_varlen_kernel", lambda: (_fake_varlen(calls), True))
    monkeypatch.setattr(attention, "load_flash_attn_kernel", lambda: _fake_varlen(calls))
    monkeypatch.setattr(attention, "check_varlen_inputs", lambda name, q, dropout_p: None)
    monkeypatch.setattr(attention, "backend_unavailable_reason", lambda name: None)
    attention.reset_backend_choice()
    yield calls
    attention.reset_backend_choice()


@pytest.mark.parametrize("name", ["torch_varlen", "flash_attn"])
def test_varlen_backends_pass_the_plan_to_their_kernel(fake_cuda_kernels, name):
    plan = PackingPlan.from_grid_thw(GRID)
    q, k, v = _qkv(plan.total_tokens)
    out = get_attention(name)(q, k, v, plan, 0.25)
    assert_close_rel(out, eager_attention(q, k, v, plan, 0.25))
    (call,) = fake_cuda_kernels
    assert call["cu"].tolist() == [0, 6, 10, 16, 17, 21, 30] and call["max_q"] == 9


def test_torch_varlen_without_scale_argument_prescales_q(monkeypatch):
    calls = []
    fake = _fake_varlen(calls)

    def old_kernel(q, k, v, cu_q, cu_k, max_q, max_k):  # releases before 2.10: scale is always Dh ** -0.5
        return fake(q, k, v, cu_q, cu_k, max_q, max_k, scale=q.shape[-1] ** -0.5)

    monkeypatch.setattr(attention, "load_torch_varlen_kernel", lambda: (old_kernel, False))
    monkeypatch.setattr(attention, "check_varlen_inputs", lambda name, q, dropout_p: None)
    plan = PackingPlan.from_grid_thw(GRID)
    q, k, v = _qkv(plan.total_tokens)
    out = attention.torch_varlen_attention(q, k, v, plan, 0.1)
    assert_close_rel(out, eager_attention(q, k, v, plan, 0.1))


def test_auto_prefers_flash_attn_then_torch_varlen_on_cuda_half(fake_cuda_kernels, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention.choose_backend(cuda, torch.bfloat16) == "flash_attn"
    assert attention.choose_backend(cuda, torch.float32) == "sdpa"
    assert attention.choose_backend(cpu, torch.bfloat16) == "sdpa"
    attention.reset_backend_choice()
    monkeypatch.setattr(
        attention, "backend_unavailable_reason", lambda name: "missing" if name == "flash_attn" else None
    )
    assert attention.choose_backend(cuda, torch.float16) == "torch_varlen"
    assert attention.choose_backend(cuda, torch.float16, dropout_p=0.1) == "sdpa"


def test_varlen_backends_refuse_cpu_fp32_with_the_alternatives():
    plan = PackingPlan.from_grid_thw([[1, 2, 2]])
    q, k, v = _qkv(4)
    for fn in (attention.torch_varlen_attention, attention.flash_attn_attention):
        with pytest.raises(
            ValueError, match=r"got torch.float32 tensors on cpu; it needs float16/bfloat16 on CUDA \(use 'sdpa'"
        ):
            fn(q, k, v, plan, 0.2)


@pytest.mark.parametrize("name", ["sdpa", "auto", "torch_varlen", "flash_attn"])
def test_whole_model_backends_agree_with_eager(fake_cuda_kernels, name):
    items = [torch.randn(3, 28, 42), torch.randn(3, 3, 28, 28), torch.randn(3, 42, 42), torch.randn(3, 28, 42)]
    patches, grid_thw = patchify_items(items, 14)
    eager = HEVCViTPackingModel(tiny_config(attn_implementation="eager")).eval()
    other = HEVCViTPackingModel(tiny_config(attn_implementation=name)).eval()
    other.load_state_dict(eager.state_dict())
    with torch.no_grad():
        a, b = eager(patches, grid_thw), other(patches, grid_thw)
    assert_close_rel(b.last_hidden_state, a.last_hidden_state)
    assert_close_rel(b.pooler_output, a.pooler_output)


class _NoHostSync:
    """Make every tensor -> host conversion raise while active (a CPU stand-in for CUDA's sync check)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def method(self, *args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name}() called inside the forward")

            return method

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("name", ["sdpa", "torch_varlen"])
def test_forward_with_a_prebuilt_plan_never_reads_tensors_on_the_host(fake_cuda_kernels, monkeypatch, name):
    model = HEVCViTPackingModel(tiny_config(attn_implementation=name)).eval()
    patches, grid_thw = patchify_items([torch.randn(3, 28, 42), torch.randn(3, 2, 28, 28), torch.randn(3, 28, 42)], 14)
    plan = PackingPlan.from_grid_thw(grid_thw)
    plan.length_groups, plan.segment_ids  # noqa: B018 — built on the host before the guarded forward
    if name == "torch_varlen":  # the fake kernel itself reads cu_seqlens; give it a sync-free stand-in
        monkeypatch.setattr(attention, "load_torch_varlen_kernel", lambda: (lambda q, k, v, *a, **kw: q.clone(), True))
    with torch.no_grad(), _NoHostSync():
        out = model(patches, plan=plan, output_hidden_states=True)
    assert out.last_hidden_state.shape == (patches.shape[0], 64)


def test_the_host_sync_guard_catches_reads():
    x = torch.ones(2)
    for read in (lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.any()), lambda: x.cpu()):
        with _NoHostSync(), pytest.raises(AssertionError, match="host sync"):
            read()
