"""Hostile input gets a ``ValueError`` that names the value and what was expected, before anything big is
built: nonsense ``config.json`` values, configs that do not match their weights, pixels that are not
floating point or have no data, ``grid_thw`` that overflows, an empty batch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import hevc_vit.checkpoints.architecture as architecture_mod
import hevc_vit.checkpoints.io as checkpoint_io
import hevc_vit.modeling as modeling_mod
import hevc_vit.packing as packing_mod
from hevc_vit import HEVCViTConfig, HEVCViTModel, HEVCViTPackingModel, PackingPlan, patchify, patchify_items
from hevc_vit.checkpoints import load_checkpoint
from hevc_vit.cli import main as cli_main
from tests.helpers import FIXTURES, tiny_config

PACKING = FIXTURES / "llava_vit_packing_tiny"
LEGACY_PT = FIXTURES / "llava_vit_source_tiny.pt"
LEGACY_JSON = FIXTURES / "llava_vit_source_tiny.json"

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_sidecar_warning")


@pytest.fixture
def no_model_is_built(monkeypatch):
    """Fail the test if any model (standard or packing, on any device) is constructed."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(modeling_mod.HEVCViTCore, "__init__", refuse)


def folder_with_config(tmp_path: Path, edit) -> Path:
    """A copy of the packing fixture whose config.json ``edit`` changed (a dict -> the new contents)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(PACKING, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    return folder


# -- nonsense config values -------------------------------------------------------------------------

NONSENSE = [
    ({"num_attention_heads": 0}, r"num_attention_heads=0; expected a positive integer"),
    ({"num_attention_heads": -2}, r"num_attention_heads=-2; expected a positive integer"),
    ({"layer_norm_eps": "1e-6"}, r"layer_norm_eps='1e-6'; expected a positive finite number"),
    ({"layer_norm_eps": float("nan")}, r"layer_norm_eps=nan; expected a positive finite number"),
    ({"hidden_size": 10**9}, r"hidden_size=1000000000; expected a positive integer \(at most 65,536\)"),
    ({"hidden_size": None}, r"hidden_size=None; expected a positive integer"),
    ({"num_attention_heads": [2]}, r"num_attention_heads=\[2\]; expected a positive integer"),
    ({"intermediate_size": {"a": 1}}, r"intermediate_size=\{'a': 1\}; expected a positive integer"),
    ({"use_head": "no"}, r"use_head='no'; expected true or false"),
    ({"num_hidden_layers": 10**6}, r"num_hidden_layers=1000000; expected a positive integer \(at most 1,024\)"),
    ({"patch_size": -14}, r"patch_size=-14; expected a positive integer"),
    ({"image_size": 2.5}, r"image_size=2.5; expected a positive integer"),
    ({"hidden_size": 96, "num_attention_heads": 2}, r"head_dim=48 .* must be a multiple of 32"),
    ({"rope_theta": "big"}, r"rope_theta='big'; expected a positive finite number"),
    ({"hidden_act": ["gelu"]}, r"hidden_act=\['gelu'\]; expected a name in transformers' ACT2FN"),
    ({"layer_norm_type": None}, r"layer_norm_type=None; expected one of"),
    ({"head_norm_eps": -1}, r"head_norm_eps=-1; expected None or a positive finite number"),
    (
        {"hidden_size": 32768, "num_attention_heads": 256, "intermediate_size": 131072, "num_hidden_layers": 512},
        r"hidden_size=32768, intermediate_size=131072, num_hidden_layers=512 give [\d,]+ parameters .*expected at most",
    ),
]


@pytest.mark.parametrize("values, message", NONSENSE, ids=[", ".join(v) for v, _ in NONSENSE])
def test_nonsense_config_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        HEVCViTConfig(**{**tiny_config().to_dict(), **values})


@pytest.mark.parametrize("values, message", NONSENSE, ids=[", ".join(v) for v, _ in NONSENSE])
def test_nonsense_config_json_is_refused_before_a_model_is_built(tmp_path, capsys, no_model_is_built, values, message):
    folder = folder_with_config(tmp_path, lambda c: {**c, **values})
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        HEVCViTPackingModel.from_pretrained(folder)
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert cli_main(["info", str(folder)]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("contents, kind", [("[1, 2]", "array"), ("null", "null"), ('"hevc"', "string")])
def test_config_json_that_is_not_an_object_is_named(tmp_path, capsys, no_model_is_built, contents, kind):
    folder = tmp_path / "ckpt"
    shutil.copytree(PACKING, folder)
    (folder / "config.json").write_text(contents)
    with pytest.raises(ValueError, match=rf"config\.json holds a JSON {kind}; expected an object of hyper-parameters"):
        load_checkpoint(folder)
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 2
    assert f"holds a JSON {kind}; expected an object" in capsys.readouterr().err


def test_a_legacy_side_car_with_values_of_the_wrong_type_is_named(tmp_path, no_model_is_built):
    shutil.copyfile(LEGACY_PT, tmp_path / "model.pt")
    arch = json.loads(LEGACY_JSON.read_text())
    (tmp_path / "model.json").write_text(json.dumps({**arch, "hidden_size": "64"}))
    with pytest.raises(ValueError, match=r"model\.json: hidden_size='64'; expected a positive integer"):
        load_checkpoint(tmp_path / "model.pt")


# -- the config against its weights, before a model is built ------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"hidden_size": 128, "num_attention_heads": 4}, r"hidden_size=128 but patch_embed\.proj\.weight \(64, 3,"),
        ({"num_hidden_layers": 1000}, r"num_hidden_layers=1000 but the last layer's .* gives num_hidden_layers=3"),
        ({"intermediate_size": 4096}, r"intermediate_size=4096 but encoder\.layers\.0\.mlp\.fc1\.weight \(128, 64\)"),
        ({"use_head": False}, r"use_head=False but head\.probe present gives use_head=True"),
        ({"layer_norm_type": "rms_norm"}, r"layer_norm_type='rms_norm' but layernorm_pre\.weight \(64,\) with a bias"),
    ],
)
def test_a_config_that_does_not_fit_its_weights_is_named_and_no_model_is_built(
    tmp_path, monkeypatch, no_model_is_built, values, message
):
    folder = folder_with_config(tmp_path, lambda c: {**c, **values})

    def no_tensors(path):
        raise AssertionError("tensors were read before the config was checked against the headers")

    monkeypatch.setattr(checkpoint_io, "read_safetensors", no_tensors)  # where folders are read
    mismatch = r"shape mismatch: the architecture from .*config\.json does not fit .*"
    with pytest.raises(ValueError, match=mismatch + message):
        HEVCViTModel.from_pretrained(folder)


def test_the_weights_check_names_every_tensor_that_does_not_fit():
    config, state, fmt = load_checkpoint(PACKING)
    state = dict(state)
    state["encoder.layers.2.mlp.fc1.weight"] = torch.zeros(100, 64)  # layer 0 still gives 128
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.fc1\.weight: expected \(128, 64\), found \(100, 64\)"):
        architecture_mod.check_weights_fit(config, state, fmt, PACKING, "config.json")


@pytest.mark.parametrize("values", [{}, {"use_head": False, "layer_norm_type": "rms_norm", "num_channels": 4}])
def test_expected_shapes_are_the_models_own(values):
    config = tiny_config(**values)
    with torch.device("meta"):
        model = HEVCViTModel(config)
    assert architecture_mod.expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -- pixels that are not floating point or have no data ----------------------------------------------

FLOAT = r"expected a floating-point tensor"
BAD_DTYPES = [
    (torch.uint8, r"has dtype torch\.uint8; " + FLOAT + r" .*integer pixels need"),
    (torch.int64, r"has dtype torch\.int64; " + FLOAT),
    (torch.bool, r"has dtype torch\.bool; " + FLOAT),
    (torch.complex64, r"has dtype torch\.complex64; " + FLOAT),
]


@pytest.mark.parametrize("dtype, message", BAD_DTYPES, ids=[str(d) for d, _ in BAD_DTYPES])
def test_pixel_tensors_that_are_not_floating_point_are_named(dtype, message):
    with pytest.raises(ValueError, match=r"pixel_values " + message):
        patchify(torch.zeros(1, 3, 28, 28, dtype=dtype), 14)
    with pytest.raises(ValueError, match=r"item 1 \(3, 28, 42\) " + message):
        patchify_items([torch.randn(3, 28, 28), torch.zeros(3, 28, 42, dtype=dtype)], 14)
    config = tiny_config()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"pixel_values " + message):
            HEVCViTModel(config)(torch.zeros(1, 3, 28, 28, dtype=dtype))
        with pytest.raises(ValueError, match=r"hidden_states " + message):
            HEVCViTPackingModel(config)(torch.zeros(4, config.patch_dim, dtype=dtype), [[1, 2, 2]])


def test_meta_tensors_go_only_through_a_model_on_the_meta_device():
    config = tiny_config()
    # cutting meta pixels into patches is shape arithmetic (a model on the meta device relies on it)
    patches, grid = patchify(torch.empty(2, 3, 28, 42, device="meta"), 14)
    assert patches.is_meta and tuple(patches.shape) == (12, config.patch_dim) and grid.tolist() == [[1, 2, 3]] * 2
    meta = r" is on meta but the model's weights are on cpu; expected both to hold data"
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"pixel_values" + meta):
            HEVCViTModel(config)(torch.empty(1, 3, 28, 28, device="meta"))
        with pytest.raises(ValueError, match=r"hidden_states" + meta):
            HEVCViTPackingModel(config)(torch.empty(4, config.patch_dim, device="meta"), [[1, 2, 2]])
        with torch.device("meta"):
            on_meta = HEVCViTPackingModel(config)
        with pytest.raises(ValueError, match=r"hidden_states is on cpu but the model's weights are on meta"):
            on_meta(torch.randn(4, config.patch_dim), [[1, 2, 2]])
        assert on_meta(torch.empty(4, config.patch_dim, device="meta"), [[1, 2, 2]]).last_hidden_state.is_meta


def test_an_empty_batch_is_named():
    model = HEVCViTModel(tiny_config())
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"pixel_values has shape \(0, 3, 28, 28\); expected at least one item"):
            model(torch.randn(0, 3, 28, 28))
        with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 0, 28, 28\); expected .*T >= 1"):
            model(torch.randn(1, 3, 0, 28, 28))


# -- grid_thw that overflows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid_thw, message",
    [
        ([[1, 2**20, 2**20]], r"row 0 is \[1, 1048576, 1048576\] \(1,099,511,627,776 patches\).*at most 2,147,483,647"),
        (torch.tensor([[1, 2**20, 2**20]]), r"row 0 is \[1, 1048576, 1048576\]"),
        ([[2**62, 2**62, 2**62]], r"row 0 is \[4611686018427387904, .*expected at most"),  # beyond int64 as a product
        ([[2**70, 1, 1]], r"row 0 is \[1180591620717411303424, 1, 1\]"),  # beyond int64 as an entry
        (torch.tensor([[2**31, 2**31, 4]]), r"row 0 is \[2147483648, 2147483648, 4\]"),  # wraps to 0 in int64
        ([[1, 2**15, 2**15]] * 3, r"row 1 is \[1, 32768, 32768\] .* the items up to it hold 2,147,483,648"),
        (torch.zeros(2, 3, dtype=torch.long, device="meta"), r"grid_thw is on the meta device"),
        (7, r"grid_thw is a int; expected an \(n, 3\) integer tensor"),
    ],
    ids=["2^40_patches", "2^40_tensor", "int64_product", "int64_entry", "wrapping_tensor", "sum", "meta", "int"],
)
def test_grid_thw_that_overflows_is_named_before_anything_is_allocated(monkeypatch, grid_thw, message):
    def no_positions(grid):
        raise AssertionError("positions were built")

    monkeypatch.setattr(packing_mod, "grid_positions", no_positions)
    with pytest.raises(ValueError, match=message):
        PackingPlan.from_grid_thw(grid_thw)


def test_grid_thw_beyond_the_packed_patches_is_named_before_positions_are_built(monkeypatch):
    model = HEVCViTPackingModel(tiny_config())

    def no_positions(grid):
        raise AssertionError("positions were built")

    monkeypatch.setattr(packing_mod, "grid_positions", no_positions)
    describes = r"grid_thw describes 1073741824 patches .*; hidden_states has 4"
    with torch.no_grad(), pytest.raises(ValueError, match=describes):
        model(torch.randn(4, model.config.patch_dim), [[1, 2**15, 2**15]])
