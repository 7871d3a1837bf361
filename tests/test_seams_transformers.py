"""Where this library meets transformers: the feature-extraction pipeline batched against single calls, one
processor file format read by transformers and by ``hevc-vit encode``, sizes refused up front, the seed's tower
helpers, ``flash_attention_2`` without flash-attn, and a quiet ``encode``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

from hevc_vit import HEVCViTConfig, HEVCViTImageProcessor, HEVCViTModel, HEVCViTPackingModel, attention, patchify
from hevc_vit.cli import main as cli_main
from hevc_vit.towers import HEVCViTPackingVisionTower

from .conftest import FIXTURES, assert_close_rel, cli_args, tiny_config, write_image

PACKING_DIR = FIXTURES / "llava_vit_packing_tiny"


# --------------------------------------------------------------------------------------------------
# the seed's tower helpers
# --------------------------------------------------------------------------------------------------


def test_seed_tower_helpers_equal_to_packing_input_and_patchify():
    from types import SimpleNamespace

    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = HEVCViTPackingVisionTower(str(PACKING_DIR), args)
    image = torch.randn(3, 28, 42)
    states, grid = tower._image_to_packing_input(image)  # (seq_len, patch_dim), (1, 3)
    expected, expected_grid = patchify(image[None], 14)
    assert states.shape == (2 * 3, 3 * 14 * 14) and torch.equal(states, expected)
    assert grid.tolist() == expected_grid.tolist() == [[1, 2, 3]]
    batch = torch.randn(3, 3, 42, 28)
    states, grid = tower._batch_images_to_packing_input(batch)  # (total_seq_len, patch_dim), (B, 3)
    patches, plan, _ = tower.to_packing_input(batch)
    assert torch.equal(states, patches) and torch.equal(states, patchify(batch, 14)[0])
    assert grid.tolist() == plan.grid_thw.tolist() == [[1, 3, 2]] * 3
    with pytest.raises(ValueError, match=r"image_tensor has shape \(1, 3, 28, 42\); expected one image"):
        tower._image_to_packing_input(image[None])
    with pytest.raises(ValueError, match=r"images has shape \(3, 28, 42\); expected a batch"):
        tower._batch_images_to_packing_input(image)


# --------------------------------------------------------------------------------------------------
# flash_attention_2 without the flash-attn package
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_flash_attn(monkeypatch):
    def missing():
        raise ImportError("No module named 'flash_attn'")

    monkeypatch.setattr(attention, "load_flash_attn_kernel", missing)
    attention.reset_backend_choice()
    yield
    attention.reset_backend_choice()


@pytest.mark.usefixtures("no_flash_attn", "quiet_transformers")
@pytest.mark.parametrize("folder", ["llava_vit_packing_tiny", "onevision_encoder_tiny", "saved"])
def test_flash_attention_2_without_flash_attn_raises_import_error_everywhere(folder, tmp_path):
    path = FIXTURES / folder if folder != "saved" else tmp_path
    if folder == "saved":
        HEVCViTModel(tiny_config()).save_pretrained(tmp_path)
    match = r"is not available: the flash-attn package is not installed"
    with pytest.raises(ImportError, match=match):
        AutoModel.from_pretrained(path, attn_implementation="flash_attention_2")
    for cls in (HEVCViTPackingModel, HEVCViTModel):
        with pytest.raises(ImportError, match=match):
            cls.from_pretrained(path, attn_implementation="flash_attention_2")
    config = AutoConfig.from_pretrained(path, attn_implementation="flash_attention_2")
    with pytest.raises(ImportError, match=match):
        AutoModel.from_pretrained(path, config=config)
    with pytest.raises(ImportError, match=match):
        AutoModel.from_config(config)
    model = AutoModel.from_pretrained(path)
    assert model.config.attention_backend == "auto"
    with pytest.raises(ImportError, match=match):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.usefixtures("no_flash_attn")
def test_flash_attention_2_in_config_kwargs_raises_import_error():
    with pytest.raises(ImportError, match=r"the flash-attn package is not installed"):
        HEVCViTPackingModel(tiny_config(attn_implementation="flash_attention_2"))


def test_auto_config_of_reference_folders_runs_our_config_init():
    """transformers 5 gives a config subclass without an __init__ a generated one: ours must run (it keeps the
    backend and checks the numbers)."""
    config = AutoConfig.from_pretrained(PACKING_DIR)
    assert config.attention_backend == "auto" and config.head_dim == 32
    with pytest.raises(ValueError, match=r"hidden_size=65 is not divisible by num_attention_heads=2"):
        type(config)(hidden_size=65, num_attention_heads=2)


# --------------------------------------------------------------------------------------------------
# a quiet encode
# --------------------------------------------------------------------------------------------------


def test_encode_quiet_prints_no_transformers_progress_bars(tmp_path, capfd):
    import transformers

    folder = tmp_path / "ckpt"
    HEVCViTPackingModel.from_pretrained(PACKING_DIR).save_pretrained(folder)
    write_image(tmp_path / "a.png", 60, 40, seed=1)
    capfd.readouterr()
    bars_before = transformers.utils.logging.is_progress_bar_enabled()
    assert cli_main(cli_args(tmp_path / "a.png", tmp_path / "out", folder)) == 0
    out, err = capfd.readouterr()
    assert "Loading weights" not in err and "it/s" not in err, err
    assert transformers.utils.logging.is_progress_bar_enabled() == bars_before  # put back as it was
