"""``hevc-vit convert`` from the reference's LLaVA-NeXT fork (``LlavaQwenForCausalLM``, vendored under
``tests/vendor/llava_next``) to the ``hevc_vit_llava`` format.

The fork model is built and saved by the fork's own code (``tests/helpers/fork_llava.py``) and run through its
own ``prepare_inputs_labels_for_multimodal``; the converted folder is compared with it: tensor by tensor, the
text model rebuilt by transformers from the converted ``text_config``, the tower + projector from the
converted vision weights, and — where ``HEVCViTLlavaForConditionalGeneration`` exists — the whole model's
logits on images of two sizes, an 8-frame clip with ``patch_positions`` and a text-only sample.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hevc_vit.convert.llava_fork as llava_fork
from hevc_vit.cli import main as cli_main
from hevc_vit.configuration import HEVCViTConfig, architecture_keys
from hevc_vit.convert.llava_fork import convert_llava_fork, map_fork_state
from hevc_vit.llava.projector import build_projector
from hevc_vit.modeling import HEVCViTPackingModel
from hevc_vit.packing import patchify_items
from tests.helpers.fork_llava import (
    IMAGE_TOKEN_ID,
    TOWER_DIR,
    VIDEO_TOKEN_ID,
    build_fork_model,
    converted_inputs,
    fork_logits,
    make_samples,
    save_fork_checkpoint,
)

pytestmark = pytest.mark.slow  # builds, saves and converts a fork model per projector (a few seconds each)
PROJECTORS = {"mlp2x_gelu": "bilinear", "spatial_merge": "average"}  # projector -> the fork's video pool mode
TOKEN_ARGS = ["--image-token-id", str(IMAGE_TOKEN_ID), "--video-token-id", str(VIDEO_TOKEN_ID)]
LOGITS_ATOL = 1e-5  # float32, same operations in the same order up to the packing of the tower's input


@pytest.fixture(scope="module", params=list(PROJECTORS))
def fork(request, tmp_path_factory):
    """``(projector, fork model, its saved folder, the folder converted through the Python API)``."""
    projector = request.param
    root = tmp_path_factory.mktemp(projector)
    model = build_fork_model(projector, PROJECTORS[projector])
    src = save_fork_checkpoint(model, root / "fork")
    dst = root / "converted"
    result = convert_llava_fork(
        src, dst, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, log=lambda s: None
    )
    assert result.report.passed
    return projector, model, src, dst


def fork_copy(src: Path, tmp_path: Path, **config_changes) -> Path:
    """A copy of the fork checkpoint ``src`` with its ``config.json`` changed (None removes a field)."""
    copy = tmp_path / "fork_copy"
    shutil.copytree(src, copy)
    config = json.loads((copy / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    return copy


# -- the folder, without the model class ------------------------------------------------------------------


def test_weights_are_the_forks_under_the_spec_names(fork):
    _, model, _, dst = fork
    written = load_file(dst / "model.safetensors")
    spec = {  # LLAVA_SPEC's table, written out independently of the converter's
        "model.vision_tower.vision_tower.": "model.vision_tower.",
        "model.mm_projector.": "model.multi_modal_projector.",
        "model.": "model.language_model.",
        "lm_head.": "lm_head.",
    }
    expected = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in spec if key.startswith(p))
        expected[spec[prefix] + key[len(prefix) :]] = value
    assert written.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(written[key], value), key


def test_config_maps_the_fork_settings(fork):
    projector, model, _, dst = fork
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "hevc_vit_llava"
    assert config["projector_type"] == projector and config["vision_feature_layer"] == -2
    assert (config["image_token_id"], config["video_token_id"]) == (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
    assert (config["video_pool_mode"], config["video_pool_stride"]) == (PROJECTORS[projector], 2)
    assert not any(k.startswith("mm_") for k in config["text_config"])
    text = transformers.AutoConfig.for_model(**config["text_config"])
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(text, name) == getattr(model.config, name), name
    tower = HEVCViTConfig.from_pretrained(TOWER_DIR)
    vision = HEVCViTConfig(**{k: v for k, v in config["vision_config"].items() if k != "model_type"})
    assert {k: getattr(vision, k) for k in architecture_keys()} == {k: getattr(tower, k) for k in architecture_keys()}


def test_text_model_rebuilt_by_transformers_gives_the_forks_text_only_logits(fork):
    """The converted text_config and language-model weights, as a plain transformers causal LM, reproduce the
    fork on a text-only sample (rope, norms, vocabulary survived the trip)."""
    projector, model, _, dst = fork
    config = json.loads((dst / "config.json").read_text())
    written = load_file(dst / "model.safetensors")
    text_model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config["text_config"]), attn_implementation="eager"
    )
    lm = {"model." + k[len("model.language_model.") :]: v for k, v in written.items() if "language_model" in k}
    text_model.load_state_dict({**lm, "lm_head.weight": written["lm_head.weight"]}, strict=True)
    sample = make_samples()[-1]
    assert not sample.has_placeholder
    with torch.no_grad():
        got = text_model.eval()(input_ids=sample.fork_input_ids()).logits
    want = fork_logits(model, sample)
    assert (got - want).abs().max().item() <= LOGITS_ATOL


def test_tower_and_projector_rebuilt_give_the_forks_image_features(fork):
    """HEVCViTPackingModel + build_projector from the converted folder give what the fork's encode_images
    gives (hidden_states[-2], then its own projector) for both image sizes."""
    projector, model, _, dst = fork
    config = json.loads((dst / "config.json").read_text())
    written = load_file(dst / "model.safetensors")
    vision = HEVCViTConfig(**{k: v for k, v in config["vision_config"].items() if k != "model_type"})
    tower = HEVCViTPackingModel(vision).eval()
    tower.load_state_dict({k[len("model.vision_tower.") :]: v for k, v in written.items() if "vision_tower" in k})
    proj = build_projector(
        {"mm_projector_type": projector, "mm_hidden_size": vision.hidden_size, "hidden_size": 64}
    ).eval()
    prefix = "model.multi_modal_projector."
    proj.load_state_dict({k[len(prefix) :]: v for k, v in written.items() if k.startswith(prefix)})
    for sample in make_samples()[:2]:
        with torch.no_grad():
            want = model.encode_images(sample.images[0], grid_thw=sample.grid_thw)[0]  # (tokens, L)
            patches, grid = patchify_items([sample.images[0][0]], 14, 3)
            hidden = tower(patches, grid, output_hidden_states=True).hidden_states[-2]  # (T, D)
            got = proj(hidden, grid)
        assert (got.reshape(want.shape) - want).abs().max().item() <= LOGITS_ATOL, sample.name


# -- the whole model (HEVCViTLlavaForConditionalGeneration) ---------------------------------------------------


@pytest.mark.parametrize("case", range(4), ids=["image_small", "image_large", "video", "text_only"])
def test_converted_model_logits_equal_the_forks(fork, case):
    vlm = pytest.importorskip("hevc_vit.llava.vlm", reason="HEVCViTLlavaForConditionalGeneration not merged yet")
    projector, model, _, dst = fork
    converted = vlm.HEVCViTLlavaForConditionalGeneration.from_pretrained(dst, attn_implementation="eager").eval()
    sample = make_samples()[case]
    want = fork_logits(model, sample)
    with torch.no_grad():
        got = converted(**converted_inputs(model, sample)).logits
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    print(f"{projector} {sample.name}: max abs logits diff {diff:.3e}")
    assert diff <= LOGITS_ATOL


# -- the command line and bad input ----------------------------------------------------------------------------


def test_cli_writes_the_same_folder_as_the_api(fork, tmp_path):
    _, _, src, dst = fork
    assert cli_main(["convert", str(src), str(tmp_path / "cli"), *TOKEN_ARGS]) == 0
    a, b = load_file(tmp_path / "cli" / "model.safetensors"), load_file(dst / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cli_config, api_config = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "cli", dst))
    assert cli_config == api_config
    assert cli_main(["convert", str(src), str(tmp_path / "cli"), *TOKEN_ARGS]) == 2  # DST exists: refused


def test_dtype_casts_every_floating_weight(fork, tmp_path):
    _, model, src, _ = fork
    assert cli_main(["convert", str(src), str(tmp_path / "bf16"), *TOKEN_ARGS, "--dtype", "bfloat16"]) == 0
    written = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    assert torch.equal(written["lm_head.weight"], model.lm_head.weight.to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "changes, args, message",
    [
        (dict(mm_patch_merge_type="spatial_unpad"), TOKEN_ARGS, r"mm_patch_merge_type='spatial_unpad' is not supp"),
        (dict(add_faster_video=True), TOKEN_ARGS, r"add_faster_video=True is not supported"),
        (dict(mm_resampler_type="perceiver"), TOKEN_ARGS, r"mm_resampler_type='perceiver' is not supported"),
        (dict(mm_spatial_pool_mode="nearest"), TOKEN_ARGS, r"mm_spatial_pool_mode='nearest'; expected one of"),
        (dict(mm_vision_tower="lmms-lab/onevision-tower"), TOKEN_ARGS, r"pass --vision-tower PATH"),
        ({}, [], r"image_token_id: SRC's config has no image_token_index .* pass --image-token-id"),
        ({}, ["--image-token-id", "5", "--video-token-id", "5"], r"both 5; expected two ids"),
        ({}, ["--image-token-id", "128", "--video-token-id", "5"], r"image_token_id=128; expected an int in \[0, "),
        ({}, [*TOKEN_ARGS, "--to", "standard"], r"--to apply to a vision tower SRC"),
    ],
)
def test_bad_input_is_refused_naming_it_and_writes_nothing(fork, tmp_path, capsys, changes, args, message):
    _, _, src, _ = fork
    bad = fork_copy(src, tmp_path, **changes)
    dst = tmp_path / "out" / "converted"
    assert cli_main(["convert", str(bad), str(dst), *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # not even the parent made for DST
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fork_copy"]


def test_tower_given_explicitly_when_mm_vision_tower_is_a_hub_name(fork, tmp_path):
    _, _, src, dst = fork
    bad = fork_copy(src, tmp_path, mm_vision_tower="lmms-lab/onevision-tower")
    out = tmp_path / "out"
    assert cli_main(["convert", str(bad), str(out), *TOKEN_ARGS, "--vision-tower", str(TOWER_DIR)]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(dst / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("prefix", ["model.vision_tower.", "model.language_model.layers.1.", "lm_head."])
def test_a_wrong_weight_fails_verification_and_leaves_no_dst(fork, tmp_path, monkeypatch, capsys, prefix):
    """A weight written wrong (one element changed) is caught before DST moves in: exit 1, nothing left."""
    _, _, src, _ = fork
    real_save = llava_fork.save_file

    def save_one_wrong(tensors, path, metadata=None):
        key = next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].dim() == 2)
        wrong = tensors[key].clone()
        wrong.view(-1)[0] += 1.0
        real_save({**tensors, key: wrong}, path, metadata=metadata)

    monkeypatch.setattr(llava_fork, "save_file", save_one_wrong)
    dst = tmp_path / "out"
    assert cli_main(["convert", str(src), str(dst), *TOKEN_ARGS]) == 1
    out = capsys.readouterr().out
    assert f"weight {prefix}" in out and "differs from SRC's" in out
    if prefix == "model.vision_tower.":
        assert "FAIL" in out.split("thresholds")[0]  # the tower's features differ too
    assert list(tmp_path.iterdir()) == []


def test_tower_options_are_refused_for_a_tower_src(tmp_path, capsys):
    assert cli_main(["convert", str(TOWER_DIR), str(tmp_path / "out"), "--image-token-id", "3"]) == 2
    assert "--image-token-id apply to a LLaVA fork SRC" in capsys.readouterr().err


def test_foreign_fork_weights_are_named():
    state = {"model.image_newline": torch.zeros(4), "lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"model.image_newline"):
        map_fork_state(state, {})
