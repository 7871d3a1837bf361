"""transformers' own LLaVA classes with this encoder as their vision tower (issue 24): forward and generate run,
the features they compute are this encoder's on the same pixels with the class's selection, the attention
implementation they are given reaches the tower, and "default" feature selection (which drops a real patch of
an encoder without CLS token) is warned about once."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from hevc_vit import HEVCViTModel, HEVCViTPackingModel, PackingPlan, attention, patchify
from hevc_vit.attention import eager_attention
from hevc_vit.layers import attention_inputs
from hevc_vit.rope import rope_cos_sin
from hevc_vit.runtime.transformers_kwargs import IGNORED_TOWER_KWARGS
from tests.helpers import assert_close_rel, tiny_config
from tests.helpers.hf_llava import (
    CLASSES,
    VIDEO_TOKEN,
    build,
    image_feature_counts,
    image_inputs,
    projector_inputs,
    prompt_ids,
    video_feature_count,
    video_inputs,
)

pytestmark = pytest.mark.usefixtures("quiet_transformers")
KINDS = list(CLASSES)


def _select(hidden: tuple[torch.Tensor, ...], layer, strategy: str) -> torch.Tensor:
    """The LLaVA classes' selection, written out: one layer or the concatenation of several, CLS-less for full."""
    chosen = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
    return chosen[:, 1:] if strategy == "default" else chosen


def _standalone_tower(model) -> HEVCViTModel:
    """This library's encoder built on its own, holding the LLaVA model's tower weights."""
    tower = HEVCViTModel(model.config.vision_config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    return tower


def _tower_pixels(kind: str, inputs: dict[str, torch.Tensor], model) -> torch.Tensor:
    """The pixels the class feeds its tower: Llava the images; the anyres classes each image's used tiles."""
    if kind == "llava":
        return inputs["pixel_values"]
    pinpoints, size = model.config.image_grid_pinpoints, model.config.vision_config.image_size
    counts = [image_size_to_num_patches(s, pinpoints, size) for s in inputs["image_sizes"]]  # the class's own rule
    return torch.cat([pv[:n] for pv, n in zip(inputs["pixel_values"], counts)])


# --------------------------------------------------------------------------------------------------
# forward, generate and the features
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_greedy_generate_run_and_agree(kind):
    model = build(kind)
    inputs = image_inputs(kind)
    ids = prompt_ids(image_feature_counts(model, inputs))
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits
        generated = model.generate(input_ids=ids, **inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (ids.shape[0], ids.shape[1], 64)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 3)
    # the first generated token is the forward's greedy choice: generate ran the same vision path
    assert torch.equal(generated[:, ids.shape[1]], logits[:, -1].argmax(-1))


@pytest.mark.parametrize(
    "kind, layer, strategy",
    [("llava", -2, "full"), ("llava", 0, "full"), ("llava", [-1, 0], "full"), ("llava", -1, "default"),
     ("llava_next", -2, "full"), ("llava_next", [-3, -1], "full"), ("llava_onevision", -1, "full")],
)  # fmt: skip
def test_class_features_are_this_encoders_with_the_selection(kind, layer, strategy):
    """What reaches the projector equals this library's encoder, run on its own on the same pixels, with the
    class's layer selection (an int, index 0 included, or a list) and CLS strategy applied here."""
    model = build(kind, strategy=strategy, layer=layer)
    inputs = image_inputs(kind)
    seen, handle = projector_inputs(model)
    image_feature_counts(model, inputs)
    handle.remove()
    with torch.no_grad():
        out = _standalone_tower(model)(_tower_pixels(kind, inputs, model), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert_close_rel(seen[0], _select(out.hidden_states, layer, strategy), what=f"{kind} features")


def test_onevision_video_forward_generate_and_features():
    model = build("llava_onevision")
    inputs = video_inputs()
    seen, handle = projector_inputs(model)
    count = video_feature_count(model, inputs)
    handle.remove()
    frames = inputs["pixel_values_videos"].flatten(0, 1)  # (B·F, C, H, W): the class runs frames as images
    with torch.no_grad():
        out = _standalone_tower(model)(frames, output_hidden_states=True)
    assert_close_rel(seen[0], _select(out.hidden_states, model.config.vision_feature_layer, "full"), what="video")
    ids = prompt_ids([count], token=VIDEO_TOKEN)
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits
        generated = model.generate(input_ids=ids, **inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(generated[:, ids.shape[1]], logits[:, -1].argmax(-1))


# --------------------------------------------------------------------------------------------------
# attn_implementation reaches the tower
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", ["eager", {"text_config": "sdpa", "vision_config": "eager"}])
def test_attn_implementation_reaches_the_tower(request_, tmp_path):
    default = build("llava")
    assert default.model.vision_tower.config.attention_backend == "auto"  # no request: the tower's own choice
    built = build("llava", attn_implementation=request_)
    default.save_pretrained(tmp_path / "m")
    loaded = CLASSES["llava"][0].from_pretrained(tmp_path / "m", attn_implementation=request_)
    for model in (built, loaded):
        tower = model.model.vision_tower
        assert tower.config.attention_backend == "eager" and tower._attend is eager_attention
        assert tower.config._attn_implementation == "eager"
    # the eager tower computes what the default one does, within what fp32 allows
    inputs = image_inputs("llava")
    with torch.no_grad():
        expected = default.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        got = loaded.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    for a, b in zip(got, expected):
        assert_close_rel(a, b)


def test_a_config_reused_keeps_its_backend():
    """The model writes what runs into config._attn_implementation; a second model on that config is no request."""
    config = tiny_config()
    HEVCViTModel(config)
    again = HEVCViTModel(config)
    assert again.config.attention_backend == "auto"


def test_a_parent_switching_the_towers_attention_later_is_followed():
    """transformers' set_attn_implementation on the parent writes the tower's config; its next forward follows."""
    model = build("llava")
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    inputs = image_inputs("llava")
    with torch.no_grad():
        model.model.vision_tower(inputs["pixel_values"])
    tower = model.model.vision_tower
    assert tower.config.attention_backend == "eager" and tower._attend is eager_attention


# --------------------------------------------------------------------------------------------------
# output_attentions, keyword arguments, hidden states
# --------------------------------------------------------------------------------------------------


def test_output_attentions_eager_shapes_and_values():
    torch.manual_seed(0)
    model = HEVCViTModel(tiny_config(attn_implementation="eager")).eval()
    pixels = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        out = model(pixels, output_attentions=True, output_hidden_states=True)
        alone = model(pixels[1:], output_attentions=True)
    B, H, N = 2, model.config.num_attention_heads, 2 * 3
    assert len(out.attentions) == model.config.num_hidden_layers
    assert all(a.shape == (B, H, N, N) for a in out.attentions)
    # batched against one at a time
    for a, b in zip(out.attentions, alone.attentions):
        assert_close_rel(a[1:], b)
    # layer 0 against softmax(q kᵀ · scale) written out from its inputs
    layer = model.encoder.layers[0]
    x = out.hidden_states[0].reshape(B * N, -1)
    _, grid = patchify(pixels, 14)
    plan = PackingPlan.from_grid_thw(grid)
    cos, sin = rope_cos_sin(plan.positions, model.config.head_dim, model.config.rope_theta)
    q, k, _ = attention_inputs(layer, x, cos, sin)
    q, k = (t.view(B, N, H, -1).transpose(1, 2) for t in (q, k))  # (B, H, N, Dh)
    expected = (q @ k.transpose(-1, -2) * layer.self_attn.scale).softmax(-1)
    assert_close_rel(out.attentions[0], expected)
    # the packing model gives the same, per item
    packing = HEVCViTPackingModel(model.config).eval()
    packing.load_state_dict(model.state_dict())
    with torch.no_grad():
        packed = packing(*patchify(pixels, 14), output_attentions=True)
    assert_close_rel(packed.attentions[-1], out.attentions[-1])


def test_packing_attentions_of_items_of_different_sizes_are_each_items_own():
    torch.manual_seed(0)
    model = HEVCViTPackingModel(tiny_config(attn_implementation="eager")).eval()
    small, wide = torch.randn(1, 3, 28, 28), torch.randn(1, 3, 28, 56)
    patches = torch.cat([patchify(small, 14)[0], patchify(wide, 14)[0]])
    with torch.no_grad():
        packed = model(patches, [[1, 2, 2], [1, 2, 4]], output_attentions=True)
        alone = [model(*patchify(x, 14), output_attentions=True) for x in (small, wide)]
    for layer, weights in enumerate(packed.attentions):
        assert isinstance(weights, tuple) and [w.shape for w in weights] == [(2, 4, 4), (2, 8, 8)]
        for w, single in zip(weights, alone):
            assert_close_rel(w, single.attentions[layer][0])


def test_output_attentions_on_a_fused_backend_runs_eager_for_that_call_and_says_so(caplog):
    torch.manual_seed(0)
    fused = HEVCViTModel(tiny_config(attn_implementation="sdpa")).eval()
    eager = HEVCViTModel(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(fused.state_dict())
    pixels = torch.randn(1, 3, 28, 42)
    attention._warn_eager_fallback.cache_clear()  # once per process and backend: an earlier test may have said it
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hevc_vit"):
        got = fused(pixels, output_attentions=True)
        want = eager(pixels, output_attentions=True)
        fused(pixels, output_attentions=True)
    assert fused.config.attention_backend == "sdpa"  # the model keeps its backend; only the call ran eager
    assert len(got.attentions) == len(want.attentions) == fused.config.num_hidden_layers
    for g, w in zip(got.attentions, want.attentions):
        assert torch.equal(g, w)
    assert_close_rel(got.last_hidden_state, fused(pixels).last_hidden_state)
    said = [r.getMessage() for r in caplog.records if "does not compute attention weights" in r.getMessage()]
    assert len(said) == 1 and "'sdpa'" in said[0] and "set_attn_implementation('eager')" in said[0]


def test_llava_output_attentions_with_an_eager_tower_runs():
    model = build("llava", attn_implementation={"text_config": "eager", "vision_config": "eager"})
    inputs = image_inputs("llava")
    ids = prompt_ids(image_feature_counts(model, inputs))
    with torch.no_grad():
        out = model(input_ids=ids, **inputs, output_attentions=True)
    assert out.logits.shape[:2] == ids.shape


def test_transformers_tower_kwargs_are_accepted_and_others_ignored_with_one_warning(caplog):
    torch.manual_seed(0)
    model = HEVCViTModel(tiny_config()).eval()
    pixels = torch.randn(1, 3, 28, 28)
    passed = dict.fromkeys(IGNORED_TOWER_KWARGS, None) | {"vision_aspect_ratio": "anyres_max_9", "use_cache": True}
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hevc_vit"):
        assert torch.equal(model(pixels, **passed).last_hidden_state, model(pixels).last_hidden_state)
        assert not caplog.records  # transformers' own tower arguments: silent
        # a name a newer transformers may pass (or a typo): the same result, named once in a warning
        for _ in range(2):
            assert torch.equal(model(pixels, bogus_new_kwarg=1).last_hidden_state, model(pixels).last_hidden_state)
        packing = HEVCViTPackingModel(tiny_config()).eval()
        packing(*patchify(pixels, 14), bogus_new_kwarg=1)
    named = [r.getMessage() for r in caplog.records if "bogus_new_kwarg" in r.getMessage()]
    assert len(named) == 2  # once per forward that got it
    assert named[0].startswith("HEVCViTModel.forward() ignores the keyword arguments ['bogus_new_kwarg']")
    assert named[1].startswith("HEVCViTPackingModel.forward() ignores")


@pytest.mark.parametrize("selection", [0, -2, [0, -1], True])
def test_output_hidden_states_as_a_selection_returns_all(selection):
    torch.manual_seed(0)
    model = HEVCViTModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 28, 28), output_hidden_states=selection)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


# --------------------------------------------------------------------------------------------------
# vision_feature_select_strategy="default"
# --------------------------------------------------------------------------------------------------


def _strategy_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "vision_feature_select_strategy='full'" in r.getMessage()]


def test_default_feature_select_warns_once_naming_the_fix(caplog):
    with caplog.at_level(logging.WARNING, logger="hevc_vit"):
        model = build("llava", strategy="default")
        assert len(_strategy_warnings(caplog)) == 1
        inputs = image_inputs("llava")
        ids = prompt_ids(image_feature_counts(model, inputs))
        assert ids.eq(60).sum(1).tolist() == [15, 15]  # 16 patches, one dropped: the warning's point
        with torch.no_grad():
            model(input_ids=ids, **inputs)
            model(input_ids=ids, **inputs)
        assert len(_strategy_warnings(caplog)) == 1  # at construction, not per forward
        message = _strategy_warnings(caplog)[0].getMessage()
        assert "HEVCViTModel" in message and "LlavaConfig" in message


def test_full_feature_select_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="hevc_vit"):
        build("llava", strategy="full")
        build("llava_onevision", strategy="full")
    assert _strategy_warnings(caplog) == []


@pytest.mark.parametrize("kind", KINDS[1:])
def test_default_feature_select_warns_once_for_the_anyres_classes(kind, caplog):
    with caplog.at_level(logging.WARNING, logger="hevc_vit"):
        build(kind, strategy="default")
    assert len(_strategy_warnings(caplog)) == 1


def test_default_feature_select_warns_once_when_loaded(caplog, tmp_path):
    build("llava", strategy="default").save_pretrained(tmp_path / "m")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hevc_vit"):
        CLASSES["llava"][0].from_pretrained(tmp_path / "m")
    assert len(_strategy_warnings(caplog)) == 1
