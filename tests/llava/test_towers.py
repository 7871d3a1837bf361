"""Tests of the LLaVA-NeXT vision towers (``hevc_vit.llava.towers``).

The packing tower is compared with the standard tower on the same checkpoint (batches as a whole, lists
item by item), with direct calls of the encoder (feature selection), and with the reference goldens in
``tests/fixtures`` (``select_layer=-2`` is index -2 of the golden ``hidden_states``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from hevc_vit import HEVCViTConfig, HEVCViTModel, HEVCViTPackingModel
from hevc_vit.llava.towers import (
    HEVCViTPackingVisionTower,
    HEVCViTVisionTower,
    build_vision_tower,
    select_layer_indices,
)
from tests.helpers import FIXTURES, assert_close_rel

PACKING_DIR = FIXTURES / "llava_vit_packing_tiny"  # has a preprocessor_config.json
STANDARD_DIR = FIXTURES / "onevision_encoder_tiny"  # has none
GOLDEN = FIXTURES / "golden_onevision_encoder_tiny.safetensors"

TOWERS = (HEVCViTVisionTower, HEVCViTPackingVisionTower)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, and ``max|actual - expected| <= RTOL[dtype] · max|expected|``."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert_close_rel(actual, expected, dtype=expected.dtype)


def make_args(**overrides) -> SimpleNamespace:
    args = dict(
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="patch_merger",
        unfreeze_mm_vision_tower=False,
        mm_tunable_parts=None,
    )
    args.update(overrides)
    return SimpleNamespace(**args)


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN)


@pytest.fixture(scope="module")
def packing_tower() -> HEVCViTPackingVisionTower:
    return HEVCViTPackingVisionTower(PACKING_DIR, make_args())


@pytest.fixture(scope="module")
def standard_tower() -> HEVCViTVisionTower:
    return HEVCViTVisionTower(PACKING_DIR, make_args())


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """A random tiny checkpoint with 11 layers (12 hidden states): deep enough for every select_feature."""
    config = HEVCViTConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=11,
        num_attention_heads=2,
        patch_size=14,
        image_size=56,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hevc_vit_deep")
    HEVCViTPackingModel(config).save_pretrained(folder)
    return folder


def mixed_items() -> list[torch.Tensor]:
    """Images of three sizes, an image stack and a video, in one list."""
    return [
        pixels(3, 56, 56, seed=1),  # image, 4x4 patches
        pixels(3, 28, 42, seed=2),  # image, 2x3
        pixels(2, 3, 42, 28, seed=3),  # stack of two 3x2 images
        pixels(3, 4, 28, 28, seed=4),  # video, 4 frames of 2x2
        pixels(3, 14, 28, seed=5),  # image, 1x2
    ]


# --------------------------------------------------------------------------------------------------
# the seed's example flow (base preset widths, patch 16)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a benchmark run, a torch.compile or the base preset: seconds
def test_seed_example_flow_base_preset(tmp_path):
    config = HEVCViTConfig.from_preset("base", num_hidden_layers=1, image_size=224)
    HEVCViTPackingModel(config).save_pretrained(tmp_path / "hevc_vit_packing_base")
    tower = build_vision_tower(make_args(mm_vision_tower=str(tmp_path / "hevc_vit_packing_base")))
    assert isinstance(tower, HEVCViTPackingVisionTower)
    D = tower.hidden_size
    assert D == 768

    images = pixels(4, 3, 224, 224)
    hidden_states, plan, _ = tower.to_packing_input(images)
    assert hidden_states.shape == (784, 768)
    assert plan.grid_thw.tolist() == [[1, 14, 14]] * 4
    with torch.no_grad():
        features = tower(images)
        assert features.shape == (4, 196, D)

        listed = tower([pixels(3, 224, 224, seed=1), pixels(3, 224, 224, seed=2), pixels(3, 448, 448, seed=3)])
    assert [tuple(f.shape) for f in listed] == [(196, D), (196, D), (784, D)]


# --------------------------------------------------------------------------------------------------
# packing tower == standard tower == reference goldens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["image_56x56", "image_28x42", "batch_2x42x28", "video_4x28x28"])
@pytest.mark.parametrize("tower_class", TOWERS)
@pytest.mark.parametrize("folder", [PACKING_DIR, STANDARD_DIR], ids=["packing_ckpt", "standard_ckpt"])
def test_select_layer_minus_2_matches_golden(golden, case, tower_class, folder):
    tower = tower_class(folder, make_args(mm_vision_select_layer=-2))
    with torch.no_grad():
        features = tower(golden[f"{case}.pixel_values"])
    assert_rel_close(features, golden[f"{case}.hidden_states"][-2])


def test_mixed_list_one_forward_matches_golden(golden, packing_tower):
    # `video_4x28x28_ctx64` is left out: it needs explicit patch_positions, which a tower never passes
    cases = ["image_56x56", "image_28x42", "batch_2x42x28", "video_4x28x28"]
    items = [golden[f"{c}.pixel_values"][0] for c in cases[:2]]
    items += [golden["batch_2x42x28.pixel_values"], golden["video_4x28x28.pixel_values"][0]]
    with torch.no_grad():
        features = packing_tower(items)
    for c, feature in zip(cases, features):
        expected = golden[f"{c}.hidden_states"][-2]  # (B, N, D)
        assert_rel_close(feature, expected if c.startswith("batch") else expected[0])


@pytest.mark.parametrize("shape", [(3, 3, 42, 28), (2, 3, 3, 28, 42)], ids=["images", "videos"])
def test_packing_equals_standard_on_batches(packing_tower, standard_tower, shape):
    x = pixels(*shape)
    with torch.no_grad():
        assert_rel_close(packing_tower(x), standard_tower(x))


def test_mixed_list_packing_equals_standard_item_by_item(packing_tower, standard_tower):
    items = mixed_items()
    with torch.no_grad():
        packed = packing_tower(items)
        one_by_one = standard_tower(items)
        by_hand = [standard_tower(item.unsqueeze(0) if item.dim() == 3 else item)[0] for item in items[:2]]
    assert [tuple(f.shape) for f in packed] == [(16, 64), (6, 64), (2, 6, 64), (16, 64), (2, 64)]
    for a, b in zip(packed, one_by_one):
        assert_rel_close(a, b)
    for a, b in zip(packed[:2], by_hand):  # a list item equals that image alone as a batch of one
        assert_rel_close(a, b)


def test_every_item_goes_through_one_forward(packing_tower):
    calls = []
    handle = packing_tower.vision_tower.register_forward_hook(lambda module, args, out: calls.append(out))
    try:
        with torch.no_grad():
            packing_tower(mixed_items())
    finally:
        handle.remove()
    assert len(calls) == 1
    assert calls[0].last_hidden_state.shape[0] == 16 + 6 + 2 * 6 + 16 + 2  # every patch of every item


@pytest.mark.parametrize("tower_class", TOWERS)
def test_features_come_back_in_the_input_dtype(tower_class):
    tower = tower_class(PACKING_DIR, make_args())
    x = pixels(2, 3, 28, 42)
    with torch.no_grad():
        reference = tower(x)  # float32 weights, float32 input
        as_double = tower(x.double())
        as_bf16 = tower([x[0].bfloat16(), x[1].bfloat16()])
    assert_rel_close(as_double, reference.double())
    assert [f.dtype for f in as_bf16] == [torch.bfloat16] * 2
    assert_rel_close(torch.stack(as_bf16), tower(x.bfloat16()).detach())
    assert all(f.device == tower.device for f in as_bf16)


def test_image_and_batch_conversions_agree(packing_tower):
    images = pixels(3, 3, 28, 42)
    batch_states, batch_plan, _ = packing_tower.to_packing_input(images)
    singles = [packing_tower.to_packing_input([image]) for image in images]
    assert all(plan.grid_thw.tolist() == [[1, 2, 3]] for _, plan, _ in singles)
    assert batch_plan.grid_thw.tolist() == [[1, 2, 3]] * 3
    assert torch.equal(batch_states, torch.cat([states for states, _, _ in singles]))
    assert batch_states.shape == (3 * 6, 3 * 14 * 14)


# --------------------------------------------------------------------------------------------------
# spatial dims
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower_class", TOWERS)
def test_return_spatial_dims(tower_class):
    tower = tower_class(PACKING_DIR, make_args())
    with torch.no_grad():
        features, h, w = tower(pixels(2, 3, 42, 28), return_spatial_dims=True)
        assert (features.shape, h, w) == ((2, 6, 64), 3, 2)

        _, h, w = tower([pixels(3, 28, 42), pixels(2, 3, 28, 42)], return_spatial_dims=True)
        assert (h, w) == (2, 3)  # one size: plain ints, as LLaVA's spatial_merge projector expects

        features, h, w = tower(mixed_items(), return_spatial_dims=True)
    # sizes differ: one (h, w) per list element, never the first item's size for all
    assert list(zip(h, w)) == [(4, 4), (2, 3), (3, 2), (2, 2), (1, 2)]
    for feature, hi, wi in zip(features, h, w):
        assert feature.shape[-2] % (hi * wi) == 0


# --------------------------------------------------------------------------------------------------
# feature selection and sizes
# --------------------------------------------------------------------------------------------------


# hidden_states indices each select_feature must take from 12 hidden states (11 layers) at select_layer -2,
# written out from the LLaVA-NeXT rules: slicefour takes range(12 // 4 - 2, 12, 12 // 4)
EXPECTED_LAYERS = {
    "patch": [-2],
    "cls_patch": [-2],
    "slicefour_patch": [1, 4, 7, 10],
    "slicefour_cls_patch": [1, 4, 7, 10],
    "slice_m25811_f6_patch": [-2, -5, -8, -11, 6],
    "slice_m25811_f6_cls_patch": [-2, -5, -8, -11, 6],
}


@pytest.mark.parametrize("select_feature", list(EXPECTED_LAYERS))
def test_every_select_feature_against_the_encoder(deep_dir, select_feature):
    tower = HEVCViTPackingVisionTower(deep_dir, make_args(mm_vision_select_feature=select_feature))
    assert tower.hidden_size == 64 * len(EXPECTED_LAYERS[select_feature])  # D times 1, 4 or 5
    model = HEVCViTModel.from_pretrained(deep_dir)
    x = pixels(2, 3, 28, 42)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        expected = torch.cat([hidden[i] for i in EXPECTED_LAYERS[select_feature]], dim=-1)
        features = tower(x)
        listed = tower([x[0], x[1]])
    assert features.shape == (2, 6, tower.hidden_size)
    assert_rel_close(features, expected)
    assert_rel_close(torch.stack(listed), expected)


def test_unknown_or_unfitting_select_feature_raises(deep_dir, packing_tower):
    with pytest.raises(ValueError, match=r"mm_vision_select_feature='bogus'; expected one of \['patch'"):
        HEVCViTPackingVisionTower(deep_dir, make_args(mm_vision_select_feature="bogus"), delay_load=True)
    tower = HEVCViTVisionTower(deep_dir, make_args(), delay_load=True)
    tower.select_feature = "patch_only"
    with pytest.raises(ValueError, match="mm_vision_select_feature='patch_only'"):
        tower.feature_select(SimpleNamespace(hidden_states=(torch.zeros(1),) * 12))
    # 3 layers: slicefour at select_layer -2 would start at index -1 and take 5 layers; only -1 fits
    with pytest.raises(ValueError, match=r"takes hidden_states \[-1, 0, 1, 2, 3\] of 4 .* fit here: \[-1\]"):
        HEVCViTPackingVisionTower(PACKING_DIR, make_args(mm_vision_select_feature="slicefour_patch"))
    with pytest.raises(ValueError, match=r"has only 4 \(num_hidden_layers=3\), expected at least 11"):
        HEVCViTPackingVisionTower(PACKING_DIR, make_args(mm_vision_select_feature="slice_m25811_f6_patch"))
    with pytest.raises(ValueError, match=r"mm_vision_select_layer=4; expected an index into the 4 hidden_states"):
        HEVCViTPackingVisionTower(PACKING_DIR, make_args(mm_vision_select_layer=4))
    assert select_layer_indices("slicefour_patch", -1, 4) == [0, 1, 2, 3]
    assert select_layer_indices("slicefour_patch", -2, 25) == [4, 10, 16, 22]  # LLaVA-NeXT, 24 layers


@pytest.mark.parametrize("projector, per_side, total", [("patch_merger", 4, 16), ("spatial_merge", 2, 4)])
@pytest.mark.parametrize("tower_class", TOWERS)
def test_size_properties(tower_class, projector, per_side, total):
    # the fixture is 56 px with 14 px patches: 4 patches per side
    tower = tower_class(PACKING_DIR, make_args(mm_projector_type=projector))
    assert (tower.num_patches_per_side, tower.num_patches, tower.image_size) == (per_side, total, 56)
    assert (tower.dtype, tower.device) == (torch.float32, torch.device("cpu"))
    assert tower.config is tower.vision_tower.config
    dummy = tower.dummy_feature
    assert (dummy.shape, dummy.dtype, int(dummy.count_nonzero())) == ((1, 64), torch.float32, 0)
    assert tower.hidden_size == 64


# --------------------------------------------------------------------------------------------------
# loading: delay_load, idempotence, freezing, image processor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower_class", TOWERS)
def test_delay_load_reads_only_the_config(tmp_path, tower_class):
    shutil.copy(PACKING_DIR / "config.json", tmp_path / "config.json")  # no weights in this folder
    tower = tower_class(
        tmp_path, make_args(mm_vision_select_feature="slicefour_patch", mm_vision_select_layer=-1), delay_load=True
    )
    assert not tower.is_loaded and tower.vision_tower is None
    assert tower.config.hidden_size == 64 and tower.hidden_size == 4 * 64
    assert (tower.num_patches, tower.dtype, tower.device) == (16, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="call load_model"):
        tower(pixels(1, 3, 28, 28))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        tower.load_model()


@pytest.mark.parametrize(
    "unfreeze, tunable_parts, loaded",
    [
        (False, None, False),
        (True, None, True),
        (False, "mm_vision_tower,mm_mlp_adapter,mm_language_model", True),
        (False, ["mm_vision_tower"], True),
        (False, "mm_mlp_adapter,mm_language_model", False),
    ],
)
def test_delay_load_unless_the_tower_is_trained(unfreeze, tunable_parts, loaded):
    args = make_args(unfreeze_mm_vision_tower=unfreeze, mm_tunable_parts=tunable_parts)
    tower = HEVCViTPackingVisionTower(PACKING_DIR, args, delay_load=True)
    assert tower.is_loaded is loaded
    assert (tower.vision_tower is not None) is loaded


@pytest.mark.parametrize("tower_class", TOWERS)
def test_load_model_is_idempotent_and_freezes(caplog, tower_class):
    tower = tower_class(PACKING_DIR, make_args(), delay_load=True)
    tower.load_model()
    model = tower.vision_tower
    assert isinstance(model, tower_class.model_class)
    assert not any(p.requires_grad for p in tower.parameters())
    model.requires_grad_(True)  # a second load must not re-read (and so re-freeze) the weights
    with caplog.at_level(logging.WARNING, logger="hevc_vit.llava.towers"):
        tower.load_model()
    assert tower.vision_tower is model
    assert all(p.requires_grad for p in tower.parameters())
    assert "already loaded" in caplog.text


def test_image_processor_from_folder_or_clip_default(tmp_path):
    from_folder = HEVCViTPackingVisionTower(PACKING_DIR, make_args()).image_processor
    saved = json.loads((PACKING_DIR / "preprocessor_config.json").read_text())
    assert from_folder.crop_size["height"] == saved["crop_size"]["height"]
    assert list(from_folder.image_mean) == saved["image_mean"]

    # a standard checkpoint without a processor file, at another image size: the CLIP default at that size
    config = json.loads((STANDARD_DIR / "config.json").read_text())
    config["image_size"] = 42
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(STANDARD_DIR / "model.safetensors", tmp_path / "model.safetensors")
    tower = HEVCViTVisionTower(tmp_path, make_args())
    default = tower.image_processor
    assert (default.crop_size["height"], default.crop_size["width"]) == (42, 42)
    assert list(default.image_mean) == list(OPENAI_CLIP_MEAN) and list(default.image_std) == list(OPENAI_CLIP_STD)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    batch = default(picture, return_tensors="pt")["pixel_values"]
    assert batch.shape == (1, 3, 42, 42)
    with torch.no_grad():
        assert tower(batch).shape == (1, 9, 64)


# --------------------------------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hevc_vit_packing_tiny", HEVCViTPackingVisionTower),
        ("llava_vit_packing_tiny", HEVCViTPackingVisionTower),
        ("HEVC_ViT_Packing_tiny", HEVCViTPackingVisionTower),
        ("hevc_vit_tiny", HEVCViTVisionTower),
        ("onevision_encoder_tiny", None),
    ],
)
@pytest.mark.parametrize("key", ["mm_vision_tower", "vision_tower"])
def test_builder_routing(tmp_path, name, expected, key):
    os.symlink(PACKING_DIR, tmp_path / name)
    cfg = make_args(**{key: str(tmp_path / name)})
    if expected is None:
        with pytest.raises(ValueError, match=r"unknown; expected a name containing one of: 'hevc_vit_packing' ->"):
            build_vision_tower(cfg, delay_load=True)
        return
    tower = build_vision_tower(cfg, delay_load=True)
    assert type(tower) is expected and not tower.is_loaded  # kwargs reach the tower
    assert tower.hidden_size == 64


def test_builder_prefers_mm_vision_tower_and_needs_a_name(tmp_path):
    os.symlink(PACKING_DIR, tmp_path / "hevc_vit_tiny")
    cfg = make_args(mm_vision_tower=str(tmp_path / "hevc_vit_tiny"), vision_tower="something_else")
    assert type(build_vision_tower(cfg, delay_load=True)) is HEVCViTVisionTower
    with pytest.raises(ValueError, match="neither mm_vision_tower nor vision_tower"):
        build_vision_tower(make_args())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


BAD_INPUTS = [
    ([], r"images is an empty list; expected at least one image \(3, H, W\)"),
    (torch.zeros(0, 3, 28, 28), r"images has shape \(0, 3, 28, 28\); expected at least one image"),
    (
        [torch.zeros(3, 28, 28), torch.zeros(4, 28, 28)],
        r"item 1 has shape \(4, 28, 28\); expected an image \(3, H, W\)",
    ),
    (torch.zeros(2, 4, 28, 28), r"images has shape \(2, 4, 28, 28\); expected a batch of images \(B, 3, H, W\)"),
    (
        [torch.zeros(3, 30, 28)],
        r"item 0 \(3, 30, 28\) is 30x28; both sides must be positive multiples of "
        r"patch_size=14 \(nearest: 28x28\)",
    ),
    (torch.zeros(2, 3, 28, 43), r"images \(2, 3, 28, 43\) is 28x43; .* \(nearest: 28x42\)"),
    (torch.zeros(3, 28, 28), r"images has shape \(3, 28, 28\); expected a batch"),
    ([torch.zeros(28, 28)], r"item 0 has shape \(28, 28\); expected an image"),
    ([torch.zeros(3, 28, 28, dtype=torch.uint8)], r"item 0 \(3, 28, 28\) has dtype torch.uint8; expected"),
    (
        [torch.zeros(3, 28, 28), torch.zeros(3, 14, 14, dtype=torch.float16)],
        r"item 1 \(3, 14, 14\) has dtype torch.float16; item 0 has torch.float32",
    ),
    (
        [torch.zeros(3, 28, 28), torch.zeros(3, 14, 14, device="meta")],
        r"item 1 \(3, 14, 14\) is on meta; item 0 is on cpu, expected every item on one device",
    ),
    ("image.png", r"images is a str; expected a tensor"),
]


@pytest.mark.parametrize("tower_class", TOWERS)
@pytest.mark.parametrize("images, message", BAD_INPUTS, ids=[f"bad{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_value_error(packing_tower, standard_tower, tower_class, images, message):
    tower = packing_tower if tower_class is HEVCViTPackingVisionTower else standard_tower
    with pytest.raises(ValueError, match=message):
        tower(images)


# --------------------------------------------------------------------------------------------------
# distributed safety: the dummy forward, no host syncs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower_class", TOWERS)
def test_dummy_forward_gives_every_parameter_a_gradient(tower_class):
    tower = tower_class(PACKING_DIR, make_args(mm_vision_select_layer=-2))
    frozen = tower.dummy_forward()
    assert frozen.shape == (1, 4, tower.hidden_size) and not frozen.requires_grad
    assert int(frozen.count_nonzero()) == 0

    tower.requires_grad_(True)  # as a trainer unfreezing the tower does
    out = tower.dummy_forward()
    assert int(out.count_nonzero()) == 0  # the loss does not change ...
    out.sum().backward()
    names = [name for name, p in tower.named_parameters() if p.grad is None]
    assert names == []  # ... yet every weight, even past select_layer and in the head, gets a gradient
    # without the anchor, layers past select_layer would get none: the check above can fail
    tower.zero_grad(set_to_none=True)
    tower(tower.dummy_input).sum().backward()
    assert any(p.grad is None for p in tower.parameters())


@pytest.mark.parametrize("tower_class", TOWERS)
def test_forward_runs_on_the_meta_device(tower_class):
    """Meta tensors have no data: any .item(), .tolist(), .cpu() or data-dependent branch on a device tensor
    inside the tower (or the model) raises here — the CPU stand-in for the CUDA sync check below."""
    tower = tower_class(PACKING_DIR, make_args())
    tower.to("meta")
    assert tower.device == torch.device("meta")
    features = tower(torch.empty(2, 3, 28, 42, device="meta"))
    assert (features.device.type, features.shape) == ("meta", (2, 6, 64))
    items = [torch.empty(3, 28, 42, device="meta"), torch.empty(3, 2, 28, 28, device="meta")]
    assert [tuple(f.shape) for f in tower(items)] == [(6, 64), (8, 64)]
    assert tower.dummy_forward().shape == (1, 4, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host-sync check and GPU placement)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 runs the varlen kernels under "auto"
def test_cuda_forward_has_no_host_sync_and_matches_standard(dtype):
    tower = HEVCViTPackingVisionTower(PACKING_DIR, make_args()).to("cuda", dtype)
    reference = HEVCViTVisionTower(PACKING_DIR, make_args()).to("cuda", dtype)
    items = [item.to("cuda", dtype) for item in mixed_items()]
    batch = pixels(3, 3, 42, 28).to("cuda", dtype)
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the tower raises
        try:
            packed = tower(items)
            batched = tower(batch)
            dummy = tower.dummy_forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        expected = reference(items)
        assert_rel_close(batched, reference(batch))
        # CPU input, CUDA tower: features on the tower's device, in the input's dtype
        on_gpu = tower(pixels(1, 3, 28, 28).double())
    for a, b in zip(packed, expected):
        assert a.device.type == "cuda"
        assert_rel_close(a, b)
    assert (dummy.shape, dummy.dtype) == ((1, 4, 64), dtype)
    assert (on_gpu.device.type, on_gpu.dtype) == ("cuda", torch.float64)
