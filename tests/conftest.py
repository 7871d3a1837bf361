"""Shared test helpers: fixture paths, tiny configs, and one tolerance table keyed by dtype."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from hevc_vit import HEVCViTConfig

# the reference fixtures, carried by the repo (tests/fixtures/README.md says what each file is); read-only
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_FOLDERS = ("onevision_encoder_tiny", "llava_vit_packing_tiny")
GOLDEN = FIXTURES / "golden_onevision_encoder_tiny.safetensors"

# max |a - b| relative to max |reference| for comparisons between two implementations
RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = ""):
    """``max|actual - expected| <= RTOL[dtype] * max|expected|``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max abs diff {err:.3e} > {RTOL[dtype]:.0e} x {scale:.3e}"


def tiny_config(**overrides) -> HEVCViTConfig:
    """A small random architecture: hidden 64, 2 heads (head_dim 32), 2 layers, patch 14."""
    values = dict(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=2, intermediate_size=128, patch_size=14, image_size=56
    )
    values.update(overrides)
    return HEVCViTConfig(**values)


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
