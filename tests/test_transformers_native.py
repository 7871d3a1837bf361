"""transformers' own rails: its loader (transformers 5), its attention names and flags, its dtype default,
its checkpointing call — the same outputs as this library's loader and the reference goldens."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModel

from hevc_vit import HEVCViTModel, HEVCViTPackingModel, patchify
from hevc_vit.checkpoints import load_checkpoint

from .conftest import FIXTURES, tiny_config

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
FOLDERS = ["onevision_encoder_tiny", "llava_vit_packing_tiny"]  # standard names (converted) and packing names


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture
def bf16_folder(tmp_path):
    HEVCViTModel(tiny_config()).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16"


@pytest.mark.parametrize("folder", FOLDERS)
def test_loaded_weights_equal_this_librarys_reader(folder):
    """Whichever loader runs (transformers' under 5.x, ours under 4.x), the weights are the checkpoint's."""
    model = HEVCViTModel.from_pretrained(FIXTURES / folder)
    expected = load_checkpoint(FIXTURES / folder).state_dict
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in expected)


@pytest.mark.parametrize("folder", FOLDERS)
def test_auto_model_with_device_map_auto_and_dtype_auto(folder):
    golden = load_file(FIXTURES / "golden_onevision_encoder_tiny.safetensors")
    model = AutoModel.from_pretrained(FIXTURES / folder, device_map="auto", dtype="auto")
    assert model.device.type in ("cpu", "cuda") and model.dtype == torch.float32
    pixels = golden["image_28x42.pixel_values"].to(model.device)
    args = patchify(pixels, 14) if isinstance(model, HEVCViTPackingModel) else (pixels,)
    with torch.no_grad():
        last = model(*args).last_hidden_state.cpu()
    expected = golden["image_28x42.last_hidden_state"]
    assert (last.view_as(expected) - expected).abs().max().item() <= 6e-6


def test_output_loading_info():
    model, info = HEVCViTModel.from_pretrained(FIXTURES / "onevision_encoder_tiny", output_loading_info=True)
    assert isinstance(model, HEVCViTModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_dtype_default_follows_transformers(bf16_folder):
    """transformers 5 keeps the stored dtype by default, transformers 4 loads float32; dtype= overrides both."""
    model = HEVCViTModel.from_pretrained(bf16_folder)
    assert model.dtype == (torch.bfloat16 if TRANSFORMERS_5 else torch.float32)
    assert HEVCViTModel.from_pretrained(bf16_folder, dtype="auto").dtype == torch.bfloat16
    assert HEVCViTModel.from_pretrained(bf16_folder, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("name, backend", [("sdpa", "sdpa"), ("eager", "eager")])
def test_transformers_attention_names(name, backend):
    model = HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny", attn_implementation=name)
    assert model.attn_implementation == backend and model.config._attn_implementation == name
    model.set_attn_implementation("auto")  # on the CPU auto runs sdpa, and the config says so
    assert model.config.attention_backend == "auto" and model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without flash-attn and CUDA")
def test_flash_attention_2_without_the_package_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"attn_implementation='flash_attention_2' is not available: .*flash-attn"):
        HEVCViTModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match=r"attn_implementation='flex' is unknown; expected one of .* transformers'"):
        HEVCViTModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny", attn_implementation="flex")


def test_support_flags_are_truthful():
    assert HEVCViTModel._supports_sdpa and HEVCViTModel._supports_flash_attn
    model = HEVCViTModel(tiny_config(attn_implementation="sdpa"))
    assert model.config._attn_implementation == "sdpa"
    again = HEVCViTModel(tiny_config(attn_implementation="torch_varlen")) if torch.cuda.is_available() else None
    if again is not None:
        assert again.config._attn_implementation == "torch_varlen"
