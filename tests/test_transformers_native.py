"""transformers' own rails: its loader (transformers 5), its attention names and flags, its dtype default,
its checkpointing call — the same outputs as this library's loader and the reference goldens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, pipeline

from hevc_vit import HEVCViTImageProcessor, HEVCViTModel, HEVCViTPackingModel, patchify, patchify_items
from hevc_vit.checkpoints import load_checkpoint
from tests.helpers import FIXTURES, tiny_config

pytestmark = pytest.mark.usefixtures("quiet_transformers")
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
FOLDERS = ["onevision_encoder_tiny", "llava_vit_packing_tiny"]  # standard names (converted) and packing names


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


# --------------------------------------------------------------------------------------------------
# the image processor, AutoImageProcessor and the feature-extraction pipeline
# --------------------------------------------------------------------------------------------------


def _images():
    g = torch.Generator().manual_seed(3)
    pil = Image.fromarray(torch.randint(0, 256, (60, 90, 3), generator=g, dtype=torch.uint8).numpy())
    wide = Image.fromarray(torch.randint(0, 256, (30, 200, 3), generator=g, dtype=torch.uint8).numpy())
    return pil, wide


@pytest.fixture
def packing_folder(tmp_path):
    HEVCViTPackingModel(tiny_config()).save_pretrained(tmp_path / "m")
    HEVCViTImageProcessor(min_tokens=4, max_tokens=64).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_image_processor_packs_native_sizes_like_the_encode_processor():
    pil, wide = _images()
    processor = HEVCViTImageProcessor(min_tokens=4, max_tokens=64)
    out = processor([pil, wide], return_tensors="pt")
    native = processor.native_processor()
    expected_patches, expected_grid = patchify_items([native(pil), native(wide)], 14)
    assert torch.equal(out["image_grid_thw"], expected_grid) and torch.equal(out["pixel_values"], expected_patches)
    assert out["image_grid_thw"][:, 0].tolist() == [1, 1]  # one (1, h, w) row per image
    # numpy (H, W, C) uint8, numpy (C, H, W) floats in [0, 1] and torch (C, H, W) uint8 give the same patches
    array = np.array(pil)
    for other in (array, array.transpose(2, 0, 1).astype(np.float32) / 255, torch.from_numpy(array).permute(2, 0, 1)):
        assert torch.equal(processor(other)["pixel_values"], processor(pil)["pixel_values"])
    assert isinstance(processor(pil, return_tensors="np")["pixel_values"], np.ndarray)


def test_image_processor_round_trip_and_auto_image_processor(packing_folder):
    loaded = AutoImageProcessor.from_pretrained(packing_folder)
    assert isinstance(loaded, HEVCViTImageProcessor)
    assert (loaded.min_tokens, loaded.max_tokens, loaded.patch_size) == (4, 64, 14)
    pil, _ = _images()
    assert torch.equal(
        loaded(pil)["pixel_values"], HEVCViTImageProcessor(min_tokens=4, max_tokens=64)(pil)["pixel_values"]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_tokens=0), r"min_tokens=0; expected a positive integer"),
        (dict(image_std=[0.2, 0.0, 0.2]), r"image_std=\[0.2, 0.0, 0.2\]; expected positive values"),
    ],
)
def test_image_processor_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HEVCViTImageProcessor(**kwargs)


def test_image_processor_bad_images_are_named():
    processor = HEVCViTImageProcessor()
    with pytest.raises(ValueError, match=r"image 1 is a str; expected a PIL image"):
        processor([_images()[0], "x.png"])
    with pytest.raises(ValueError, match=r"image 0 holds values in \[2, 2\]; expected floats in \[0, 1\]"):
        processor(np.full((20, 20, 3), 2.0, np.float32))


def test_feature_extraction_pipeline_runs_every_image_at_its_own_size(packing_folder):
    pil, wide = _images()
    extractor = pipeline("image-feature-extraction", model=str(packing_folder))
    features = extractor([pil, wide], return_tensors=True)
    processor = AutoImageProcessor.from_pretrained(packing_folder)
    model = HEVCViTPackingModel.from_pretrained(packing_folder)
    for image, got in zip((pil, wide), features):
        inputs = processor(image)
        (h, w) = inputs["image_grid_thw"][0, 1:].tolist()
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
        assert got.shape[-2:] == (h * w, 64)  # native size, no fixed crop
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
