"""One attention registry, one signature: ``attend(q, k, v, plan, scale, dropout_p=0.0) -> out``.

All tensors are packed ``(T, H, Dh)``; ``plan`` is the forward's :class:`~hevc_vit.packing.PackingPlan`.
Tokens attend to every token of their own item and to nothing else.

Backends:
    eager         the specification: plain math, a loop over items, softmax in float32.
    sdpa          ``F.scaled_dot_product_attention`` on items grouped by length (one batched call per
                  distinct length, no ``T × T`` mask); runs on every device and dtype.
    torch_varlen  PyTorch's own varlen FlashAttention, ``torch.nn.attention.varlen.varlen_attn``
                  (CUDA, fp16/bf16).
    flash_attn    ``flash_attn.flash_attn_varlen_func`` from the flash-attn package, when installed.
    auto          per call: flash_attn, else torch_varlen, on CUDA in fp16/bf16; sdpa otherwise.

Optional kernels are imported lazily, only here. Asking for a backend that is unknown raises
``ValueError``, one that is not available here raises ``ImportError``; both name the alternatives.

Test seam: the varlen backends find their kernels through ``load_torch_varlen_kernel`` /
``load_flash_attn_kernel``, check their inputs with ``check_varlen_inputs`` and availability with
``backend_unavailable_reason``; tests replace these module functions to run the dispatch code on the CPU
with the eager maths (and call ``reset_backend_choice()`` around it).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from hevc_vit.packing import PackingPlan

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "sdpa", "torch_varlen", "flash_attn")
_HALF = (torch.float16, torch.bfloat16)


class AttendFn(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PackingPlan, scale: float, dropout_p: float = 0.0
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------


def eager_attention(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The specification: for each item, ``softmax(q kᵀ · scale) v`` with the softmax in float32."""
    return eager_attention_with_weights(q, k, v, plan, scale, dropout_p)[0]


def eager_attention_with_weights(
    q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`eager_attention` and its attention weights: one ``(H, N, N)`` tensor per item in ``q``'s dtype,
    the probabilities that multiply ``v`` (after dropout, as transformers' eager attention returns them)."""
    outs, weights = [], []
    for qi, ki, vi in zip(*(t.split(plan.seqlens) for t in (q, k, v))):
        qi, ki, vi = (t.transpose(0, 1) for t in (qi, ki, vi))  # (H, N, Dh)
        scores = torch.matmul(qi.float(), ki.float().transpose(-1, -2)) * scale  # (H, N, N)
        probs = scores.softmax(dim=-1)
        if dropout_p:
            probs = F.dropout(probs, p=dropout_p)
        outs.append(torch.matmul(probs, vi.float()).transpose(0, 1).to(q.dtype))  # (N, H, Dh)
        weights.append(probs.to(q.dtype))  # (H, N, N)
    return torch.cat(outs), weights


def recording_attention(backend: str) -> tuple[AttendFn, list[list[torch.Tensor]]]:
    """What ``output_attentions=True`` runs: the eager backend, appending each call's per-item weights (one call
    per layer) to the list returned with it. The other backends never form the weights, so on a model set to one
    of them this call falls back to eager (as transformers' own SDPA models do) and says so once, naming the
    switch; returning None instead would hide that nothing was computed."""
    if backend != "eager":
        _warn_eager_fallback(backend)
    store: list[list[torch.Tensor]] = []

    def attend(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
        out, weights = eager_attention_with_weights(q, k, v, plan, scale, dropout_p)
        store.append(weights)
        return out

    return attend, store


@functools.cache
def _warn_eager_fallback(backend: str) -> None:
    logger.warning(
        "output_attentions=True: attention backend %r does not compute attention weights, so this call runs the "
        "'eager' backend (slower, more memory). To run eager always: model.set_attn_implementation('eager') or "
        "attn_implementation='eager' at from_pretrained (as a LLaVA vision tower: "
        "attn_implementation={'vision_config': 'eager', 'text_config': ...})",
        backend,
    )


def stack_attention_weights(store: list[list[torch.Tensor]]) -> tuple:
    """Per layer, :func:`recording_attention`'s per-item ``(H, N, N)`` weights as transformers shapes them,
    ``(n, H, N, N)``; a tuple of the per-item tensors where the items' token counts differ."""
    same = all(len({w.shape for w in layer}) == 1 for layer in store)
    return tuple(torch.stack(layer) if same else tuple(layer) for layer in store)


def sdpa_attention(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """``scaled_dot_product_attention`` once per distinct item length, items of that length batched."""
    H, Dh = q.shape[1:]
    groups = plan.length_groups
    out = None if len(groups) == 1 else q.new_empty(q.shape)
    for length, count, tokens in groups:
        if isinstance(tokens, slice):
            qg, kg, vg = q[tokens], k[tokens], v[tokens]
        else:
            qg, kg, vg = (t.index_select(0, tokens) for t in (q, k, v))
        qg, kg, vg = (t.reshape(count, length, H, Dh).transpose(1, 2) for t in (qg, kg, vg))  # (n, H, N, Dh)
        if q.device.type == "cpu" and qg.stride(-2) != Dh:  # PyTorch's CPU flash kernel runs ~10 % faster when
            qg, kg, vg = qg.contiguous(), kg.contiguous(), vg.contiguous()  # each head's rows are adjacent
        og = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout_p, scale=scale)  # (n, H, N, Dh)
        og = og.transpose(1, 2)  # (n, N, H, Dh)
        if out is None:
            return og.reshape(count * length, H, Dh)  # (n·N, H, Dh)
        if isinstance(tokens, slice):
            out[tokens].view(count, length, H, Dh).copy_(og)  # one copy, straight into place
        else:
            out.index_copy_(0, tokens, og.reshape(count * length, H, Dh))
    return out


def check_varlen_inputs(name: str, q: torch.Tensor, dropout_p: float) -> None:
    if not q.is_cuda or q.dtype not in _HALF:
        raise ValueError(
            f"attention backend {name!r} got {q.dtype} tensors on {q.device}; it needs float16/bfloat16 on CUDA "
            f"(use 'sdpa' or 'eager' elsewhere, or 'auto' to choose per call)"
        )
    if dropout_p:
        raise ValueError(f"attention backend {name!r} does not apply attention dropout (dropout_p={dropout_p})")


def torch_varlen_attention(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's varlen FlashAttention over the plan's ``cu_seqlens`` (CUDA, fp16/bf16)."""
    check_varlen_inputs("torch_varlen", q, dropout_p)
    varlen_attn, takes_scale = load_torch_varlen_kernel()
    if not takes_scale:  # older releases always scale by Dh ** -0.5
        q = q * (scale * q.shape[-1] ** 0.5)
    kwargs = {"scale": scale} if takes_scale else {}
    cu, n = plan.cu_seqlens, plan.max_seqlen
    return varlen_attn(q, k, v, cu, cu, n, n, **kwargs)


def flash_attn_attention(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The flash-attn package's ``flash_attn_varlen_func`` (CUDA, fp16/bf16)."""
    check_varlen_inputs("flash_attn", q, 0.0)  # flash-attn applies dropout itself
    fn = load_flash_attn_kernel()
    cu, n = plan.cu_seqlens, plan.max_seqlen
    return fn(q, k, v, cu, cu, n, n, dropout_p=dropout_p, softmax_scale=scale, causal=False)


def auto_attention(q, k, v, plan: PackingPlan, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The best backend for these tensors, chosen per call from what is installed."""
    name = choose_backend(q.device, q.dtype, dropout_p)
    return _IMPLEMENTATIONS[name](q, k, v, plan, scale, dropout_p)


_IMPLEMENTATIONS: dict[str, AttendFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "torch_varlen": torch_varlen_attention,
    "flash_attn": flash_attn_attention,
    "auto": auto_attention,
}


# --------------------------------------------------------------------------------------------------
# lazy kernels and availability
# --------------------------------------------------------------------------------------------------


@functools.cache
def load_torch_varlen_kernel() -> tuple[Callable, bool]:
    module = importlib.import_module("torch.nn.attention.varlen")
    fn = module.varlen_attn
    return fn, "scale" in inspect.signature(fn).parameters


@functools.cache
def load_flash_attn_kernel() -> Callable:
    return importlib.import_module("flash_attn").flash_attn_varlen_func


def _importable(fn: Callable) -> bool:
    try:
        fn()
        return True
    except (ImportError, AttributeError, OSError, RuntimeError):
        return False


def backend_unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run in this environment, or None when it can."""
    if name == "torch_varlen":
        if not _importable(load_torch_varlen_kernel):
            return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.9 needed)"
        if not torch.cuda.is_available():
            return "it needs a CUDA device and none is available"
    if name == "flash_attn":
        if not _importable(load_flash_attn_kernel):
            return "the flash-attn package is not installed (pip install flash-attn)"
        if not torch.cuda.is_available():
            return "it needs a CUDA device and none is available"
    return None


def available_backends() -> list[str]:
    """Backend names that can run here, in registry order."""
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


# transformers' attn_implementation names -> the backend that runs them here
TRANSFORMERS_NAMES = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash_attn"}
_TO_TRANSFORMERS = {backend: name for name, backend in TRANSFORMERS_NAMES.items()}


def backend_name(name: str) -> str:
    """Our backend for one of our names or one of transformers' (``flash_attention_2`` -> ``flash_attn``);
    raises ``ValueError`` naming both lists for anything else."""
    backend = TRANSFORMERS_NAMES.get(name, name) if isinstance(name, str) else name
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={name!r} is unknown; expected one of {list(BACKENDS)} or transformers' "
            f"{list(TRANSFORMERS_NAMES)} (available here: {available_backends()})"
        )
    return backend


class ChosenName(str):
    """A backend name this library wrote into ``config._attn_implementation`` (it says what runs). Any other
    string found there was written by transformers — a caller's ``attn_implementation=`` (one name, or a
    ``{"vision_config": ...}`` dict resolved by transformers), or a parent model's ``set_attn_implementation`` —
    and is a request the model follows."""


def transformers_name(backend: str) -> ChosenName:
    """The name transformers gives a backend (``flash_attn`` -> ``flash_attention_2``); ours where it has none."""
    return ChosenName(_TO_TRANSFORMERS.get(backend, backend))


def requested_backend(written: object) -> str | None:
    """The attention request in a config's ``_attn_implementation`` (see :class:`ChosenName`), or None."""
    return written if isinstance(written, str) and not isinstance(written, ChosenName) else None


def check_backend_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is neither ours nor one of transformers'."""
    backend_name(name)


def get_attention(name: str) -> AttendFn:
    """The attention function for ``name`` (ours or transformers'); raises if unknown or not available here."""
    backend = backend_name(name)
    reason = backend_unavailable_reason(backend)
    if reason is not None:
        raise ImportError(
            f"attn_implementation={name!r} is not available: {reason}; available here: {available_backends()}"
        )
    return _IMPLEMENTATIONS[backend]


def reset_backend_choice() -> None:
    """Forget what ``auto`` chose per device and dtype (after the kernels' availability changed)."""
    _choose_backend.cache_clear()


def choose_backend(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0) -> str:
    """What ``auto`` runs for tensors of this device and dtype (said once per choice in the log)."""
    return _choose_backend(device.type, dtype, dropout_p > 0)


@functools.cache
def _choose_backend(device_type: str, dtype: torch.dtype, dropout: bool) -> str:
    name = "sdpa"
    if device_type == "cuda" and dtype in _HALF:
        if not dropout and backend_unavailable_reason("torch_varlen") is None:
            name = "torch_varlen"
        if backend_unavailable_reason("flash_attn") is None:
            name = "flash_attn"
    logger.info("attn_implementation='auto' runs %r for %s tensors on %s", name, dtype, device_type)
    return name
