"""LLaVA checkpoints keep their tower weights.

A LLaVA checkpoint stores the tower at ``model.vision_tower.vision_tower.<names>`` with the names of the
tower that saved it (the reference standard names, or the packing names, which are ours). Loaded into a
LLaVA-like model whose tower is ours (``tests/llava_like.py``), through ``load_state_dict`` and through
transformers' ``from_pretrained``, the trained tower weights must come back exactly — or, where the
installed transformers cannot convert them (4.x ``from_pretrained`` with standard names), the load must
fail naming the keys. The features are compared with the standard model loaded from a reference-format
folder holding the same trained weights (the path pinned to the reference goldens).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hevc_vit import HEVCViTModel
from hevc_vit.checkpoints.names import convert_from_native
from hevc_vit.llava.towers import HEVCViTPackingVisionTower, HEVCViTVisionTower
from tests.helpers import FIXTURES, assert_close_rel
from tests.helpers.llava_like import TOWER_PREFIX, TinyLlavaConfig, TinyLlavaForCausalLM

pytestmark = pytest.mark.usefixtures("quiet_transformers")
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
STANDARD_SRC = FIXTURES / "onevision_encoder_tiny"

# tower folder names route the builder: "hevc_vit_packing" -> packing tower, "hevc_vit" -> standard tower
TOWER_NAMES = {"packing": "hevc_vit_packing_tiny", "standard": "hevc_vit_tiny"}
# frozen (loaded at construction) and trained (delay_load, but unfreeze_mm_vision_tower loads it anyway)
TOWER_STATES = {"frozen": dict(delay_load=False), "trained": dict(delay_load=True, unfreeze_mm_vision_tower=True)}


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("towers")
    return {kind: Path(shutil.copytree(STANDARD_SRC, root / name)) for kind, name in TOWER_NAMES.items()}


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """The tower's weights after "training": every tensor moved away from the tower folder's."""
    state = HEVCViTModel.from_pretrained(STANDARD_SRC).state_dict()
    g = torch.Generator().manual_seed(1)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, trained) -> Path:
    """A reference-format (standard names, ``model_type: onevision_encoder``) folder with the trained weights."""
    folder = tmp_path_factory.mktemp("reference_trained")
    shutil.copy(STANDARD_SRC / "config.json", folder / "config.json")
    save_file(
        {k: v.contiguous() for k, v in convert_from_native(trained, "standard").items()}, folder / "model.safetensors"
    )
    return folder


def llava_config(tower: Path, **overrides) -> TinyLlavaConfig:
    return TinyLlavaConfig(mm_vision_tower=str(tower), **overrides)


def llava_state(config: TinyLlavaConfig, tower_weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A LLaVA checkpoint's state: the model's own tensors, with ``tower_weights`` at the tower's place
    (None: a checkpoint saved without the tower)."""
    state = {
        k: v.clone() for k, v in TinyLlavaForCausalLM(config).state_dict().items() if not k.startswith(TOWER_PREFIX)
    }
    if tower_weights is not None:
        state.update({TOWER_PREFIX + k: v.contiguous() for k, v in tower_weights.items()})
    return state


def save_llava(folder: Path, config: TinyLlavaConfig, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def tower_state(model: TinyLlavaForCausalLM) -> dict[str, torch.Tensor]:
    return {k[len(TOWER_PREFIX) :]: v for k, v in model.state_dict().items() if k.startswith(TOWER_PREFIX)}


def assert_tower_is(model: TinyLlavaForCausalLM, expected: dict[str, torch.Tensor]) -> None:
    got = tower_state(model)
    assert sorted(got) == sorted(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert different == [], f"{len(different)} tower tensors differ, e.g. {different[:4]}"


def assert_features_match_reference(model: TinyLlavaForCausalLM, reference_dir: Path) -> None:
    images = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(2))
    reference = HEVCViTVisionTower(reference_dir, {"mm_vision_select_layer": -2})
    with torch.no_grad():
        assert_close_rel(model.model.vision_tower(images), reference(images), what="tower features")


def names(trained: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    return convert_from_native(trained, "standard") if fmt == "standard" else dict(trained)


# --------------------------------------------------------------------------------------------------
# torch load_state_dict: converts under every transformers release
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["standard", "ours"])
@pytest.mark.parametrize("kind", list(TOWER_NAMES))
def test_load_state_dict_restores_the_tower(towers, trained, reference_dir, kind, fmt):
    config = llava_config(towers[kind])
    state = llava_state(config, names(trained, fmt))
    model = TinyLlavaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    assert_tower_is(model, trained)
    assert_features_match_reference(model, reference_dir)


def test_load_state_dict_into_a_delay_loaded_tower_loads_it_first(towers, trained):
    config = llava_config(towers["packing"], delay_load=True)
    model = TinyLlavaForCausalLM(config)
    assert not model.model.vision_tower.is_loaded  # no weights: tower keys would have nowhere to go
    model.load_state_dict(llava_state(llava_config(towers["packing"]), convert_from_native(trained, "standard")))
    assert model.model.vision_tower.is_loaded
    assert_tower_is(model, trained)


def test_unknown_tower_keys_raise_even_without_strict(towers, trained):
    config = llava_config(towers["packing"])
    state = llava_state(config, trained)
    state[TOWER_PREFIX + "encoder.layers.0.self_attn.qkv_proj.weight"] = state.pop(
        TOWER_PREFIX + "encoder.layers.0.self_attn.qkv.weight"
    )
    model = TinyLlavaForCausalLM(config)
    with pytest.raises(
        ValueError, match=r"1 weights under 'model.vision_tower.vision_tower.' fit no tensor .*qkv_proj"
    ):
        model.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------
# transformers from_pretrained of the whole model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_name", list(TOWER_STATES))
@pytest.mark.parametrize("fmt", ["standard", "ours"])
@pytest.mark.parametrize("kind", list(TOWER_NAMES))
def test_from_pretrained_restores_the_tower_or_refuses(tmp_path, towers, trained, reference_dir, kind, fmt, state_name):
    config = llava_config(towers[kind], **TOWER_STATES[state_name])
    folder = save_llava(tmp_path / "llava", config, llava_state(config, names(trained, fmt)))
    if fmt == "standard" and not TRANSFORMERS_5:
        # transformers 4.x cannot fuse q/k/v inside from_pretrained: a loud error, never a silent re-init
        with pytest.raises(ValueError, match=r"filled 38 of its 51 weights .* not 13: \['encoder.layers.0.self_attn"):
            TinyLlavaForCausalLM.from_pretrained(folder)
        return
    model = TinyLlavaForCausalLM.from_pretrained(folder)
    tower = model.model.vision_tower
    assert isinstance(tower, HEVCViTPackingVisionTower if kind == "packing" else HEVCViTVisionTower)
    assert tower.is_loaded
    assert_tower_is(model, trained)
    assert_features_match_reference(model, reference_dir)


def test_checkpoint_without_tower_weights_keeps_the_towers_own(tmp_path, towers):
    """A checkpoint saved without the (frozen) tower: the tower keeps the weights of its own folder, which
    a model built on the meta device would otherwise get uninitialised or re-initialised."""
    config = llava_config(towers["packing"])
    folder = save_llava(tmp_path / "llava", config, llava_state(config, None))
    model = TinyLlavaForCausalLM.from_pretrained(folder)
    assert_tower_is(model, HEVCViTModel.from_pretrained(towers["packing"]).state_dict())


def test_building_the_model_keeps_the_tower_weights(towers):
    """The outer model's post_init initialises its own weights, never the tower's loaded ones."""
    model = TinyLlavaForCausalLM(llava_config(towers["standard"]))
    assert_tower_is(model, HEVCViTModel.from_pretrained(towers["standard"]).state_dict())


def test_save_pretrained_keeps_our_names_and_reloads(tmp_path, towers, trained):
    config = llava_config(towers["packing"])
    model = TinyLlavaForCausalLM(config)
    model.load_state_dict(llava_state(config, convert_from_native(trained, "standard")))
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    tower_keys = sorted(k[len(TOWER_PREFIX) :] for k in saved if k.startswith(TOWER_PREFIX))
    assert tower_keys == sorted(trained)  # our names: loadable under every transformers release
    assert_tower_is(TinyLlavaForCausalLM.from_pretrained(tmp_path / "saved"), trained)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tower_follows_the_dtype_the_model_is_loaded_in(tmp_path, towers, trained, dtype):
    config = llava_config(towers["packing"])
    folder = save_llava(tmp_path / "llava", config, llava_state(config, trained))
    key = "dtype" if TRANSFORMERS_5 else "torch_dtype"
    model = TinyLlavaForCausalLM.from_pretrained(folder, **{key: dtype})
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert_tower_is(model, {k: v.to(dtype) for k, v in trained.items()})
