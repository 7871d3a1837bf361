"""The suite's fixtures (the shared helpers are in ``tests/helpers``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from hevc_vit import HEVCViTPackingModel
from tests.helpers import FIXTURES, write_image

# The tests expect dtype "auto" to mean float32 on the CPU, which a CPU where bf16 measures faster would make
# bfloat16: pin it for the suite and the processes it starts (torchrun). tests/test_devices.py checks the rule
# itself, both ways.
os.environ.setdefault("HEVC_VIT_CPU_DTYPE", "float32")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The suite's models are tiny: their matmuls gain nothing from a second intra-op thread, and on a shared CPU
    they lose much to it (measured at load ~6 on 2 cores: tests/llava/test_towers.py and tests/test_model.py took
    45 s with 2 threads, 15 s with 1). ``HEVC_VIT_TEST_THREADS`` sets another count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("HEVC_VIT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny matmuls only contend on a shared CPU (measured 30x slower with 2
    threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_sidecar_warning():
    """Silence the warning about descriptive keys in the legacy fixture's side-car JSON."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not HEVC ViT hyper-parameters")
        yield


@pytest.fixture
def quiet_transformers():
    """transformers' loading reports (missing / unexpected keys, notes) off for a test: they are asserted on."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(70, 42), (100, 30), (56, 56), (41, 97), (30, 30), (90, 60)]):
        write_image(root / f"{i}.png", w, h, i)
    return root


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def small_matmul_peak(monkeypatch):
    """The benchmark's matmul peak measured on 256 x 256 products: the 2048 x 2048 default (10 products per dtype,
    before and after the timing) is most of a tiny benchmark's time on a CPU, and the report's arithmetic is the
    same whatever the size (the default size is what ``hevc-vit bench`` itself runs)."""
    import hevc_vit.bench as bench
    import hevc_vit.bench.dtypes as dtypes
    from hevc_vit.bench.measure import matmul_peak_flops

    def small(device, dtype=torch.bfloat16, n=None, iters=10):
        return matmul_peak_flops(device, dtype, n=256, iters=3)

    monkeypatch.setattr(bench, "matmul_peak_flops", small)
    monkeypatch.setattr(dtypes, "matmul_peak_flops", small)
