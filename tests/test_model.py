"""The two models against each other and against themselves: packed vs one at a time, batch vs items,
sparse vs explicit, saved vs reloaded, checkpointed vs plain, and their input checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from hevc_vit import HEVCViTConfig, HEVCViTModel, HEVCViTPackingModel, PackingPlan, patchify, patchify_items, unpack
from tests.helpers import FIXTURES, assert_close_rel, tiny_config


def _pair(**overrides) -> tuple[HEVCViTModel, HEVCViTPackingModel]:
    """A standard and a packing model holding the same random weights."""
    config = tiny_config(**overrides)
    standard = HEVCViTModel(config).eval()
    packing = HEVCViTPackingModel(config).eval()
    packing.load_state_dict(standard.state_dict())
    return standard, packing


MIXED_ITEMS = [
    torch.randn(3, 28, 42),  # image, non-square
    torch.randn(3, 4, 28, 28),  # video (C, T, H, W)
    torch.randn(3, 56, 56),
    torch.randn(3, 28, 42),  # same size as the first, not next to it
    torch.randn(3, 14, 14),  # a single patch
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_packed_mixed_list_equals_standard_model_item_by_item(backend):
    standard, packing = _pair(attn_implementation=backend)
    patches, grid_thw = patchify_items(MIXED_ITEMS, 14)
    with torch.no_grad():
        out = packing(patches, grid_thw)
        per_item = unpack(out.last_hidden_state, PackingPlan.from_grid_thw(grid_thw))
        for i, (item, features) in enumerate(zip(MIXED_ITEMS, per_item)):
            alone = standard(item[None])
            assert_close_rel(features, alone.last_hidden_state[0], what=f"item {i} tokens")
            assert_close_rel(out.pooler_output[i], alone.pooler_output[0], what=f"item {i} pooled")


def test_batch_equals_items_one_by_one():
    standard, _ = _pair()
    batch = torch.randn(3, 3, 42, 28)
    with torch.no_grad():
        together = standard(batch, output_hidden_states=True)
        for b in range(3):
            alone = standard(batch[b : b + 1], output_hidden_states=True)
            assert_close_rel(together.last_hidden_state[b], alone.last_hidden_state[0])
            assert_close_rel(together.pooler_output[b], alone.pooler_output[0])
            for h_all, h_one in zip(together.hidden_states, alone.hidden_states):
                assert_close_rel(h_all[b], h_one[0])


def test_standard_model_is_an_adapter_of_the_packing_model():
    standard, packing = _pair()
    video = torch.randn(2, 3, 3, 28, 42)
    with torch.no_grad():
        a = standard(video, output_hidden_states=True)
        patches, grid_thw = patchify(video, 14)
        b = packing(patches, grid_thw, output_hidden_states=True)
    assert a.last_hidden_state.shape == (2, 3 * 2 * 3, 64)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    torch.testing.assert_close(a.last_hidden_state.reshape(-1, 64), b.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=0)


def test_default_positions_equal_explicit_grid_positions():
    standard, packing = _pair()
    video = torch.randn(1, 3, 2, 28, 28)
    t, h, w = torch.meshgrid(torch.arange(2), torch.arange(2), torch.arange(2), indexing="ij")
    explicit = torch.stack([t, h, w], -1).reshape(1, 8, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            standard(video).last_hidden_state, standard(video, patch_positions=explicit).last_hidden_state
        )
        spread = explicit.clone()
        spread[..., 0] *= 63  # frames 0 and 63 of a 64-frame context
        assert not torch.allclose(
            standard(video).last_hidden_state, standard(video, patch_positions=spread).last_hidden_state
        )


def test_visible_indices_equal_packing_with_explicit_positions():
    standard, packing = _pair()
    video = torch.randn(2, 3, 4, 28, 28)  # 16 patches per item
    visible = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11]])
    with torch.no_grad():
        sparse = standard(video, visible_indices=visible)
        patches, grid_thw = patchify(video, 14)
        positions = PackingPlan.from_grid_thw(grid_thw).positions.view(2, 16, 3)
        keep = torch.cat([visible[0], visible[1] + 16])
        plan = PackingPlan.from_seqlens([6, 6], positions.reshape(-1, 3)[keep])
        packed = packing(patches[keep], plan=plan)
        everything = standard(video, visible_indices=torch.arange(16).expand(2, 16))
        full = standard(video)
    assert sparse.last_hidden_state.shape == (2, 6, 64)
    assert_close_rel(sparse.last_hidden_state.reshape(-1, 64), packed.last_hidden_state)
    assert_close_rel(sparse.pooler_output, packed.pooler_output)
    torch.testing.assert_close(everything.last_hidden_state, full.last_hidden_state)


def test_rms_norm_and_no_head():
    standard, packing = _pair(layer_norm_type="rms_norm", use_head=False)
    assert isinstance(standard.layernorm_pre, torch.nn.RMSNorm) and standard.head is None
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = standard(x)
        patches, grid_thw = patchify(x, 14)
        torch.testing.assert_close(out.last_hidden_state[0], packing(patches, grid_thw).last_hidden_state)
    assert out.pooler_output is None


def test_cpu_token_chunks_give_the_same_outputs_and_gradients(monkeypatch):
    """Long sequences on the CPU run the dense halves of each block in token chunks (see layers.py)."""
    import hevc_vit.layers as layers

    _, packing = _pair()
    patches, grid_thw = patchify_items([torch.randn(3, 252, 140), torch.randn(3, 2, 112, 98)], 14)  # 180 + 112
    results = []
    for chunk_bytes in (2**30, 1):  # never chunked; chunks of the 256-token minimum
        monkeypatch.setattr(layers, "CPU_CHUNK_BYTES", chunk_bytes)
        packing.zero_grad()
        out = packing(patches, grid_thw, output_hidden_states=True)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        results.append((out.last_hidden_state.detach(), [p.grad.clone() for p in packing.parameters()]))
    assert layers.cpu_chunk_tokens(patches[:, :64], 128) == 256  # the second pass did chunk
    (whole, grads_whole), (chunked, grads_chunked) = results
    assert_close_rel(chunked, whole)
    for a, b in zip(grads_chunked, grads_whole):
        assert_close_rel(a, b)


def test_head_norm_eps_defaults_to_layer_norm_eps():
    assert HEVCViTModel(tiny_config(layer_norm_eps=1e-5)).head.norm.eps == 1e-5
    model = HEVCViTModel(tiny_config(layer_norm_eps=1e-5, head_norm_eps=1e-3))
    assert model.head.norm.eps == 1e-3 and model.layernorm_pre.eps == 1e-5


def test_input_dtype_follows_the_model():
    standard, _ = _pair()
    x = torch.randn(1, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert standard(x).last_hidden_state.dtype == torch.float32
        standard.to(torch.bfloat16)
        assert standard(x).last_hidden_state.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------------


def test_from_pretrained_reproduces_the_saved_model_and_round_trips_exactly(tmp_path):
    standard, _ = _pair()
    x = torch.randn(2, 3, 28, 42)
    standard.save_pretrained(tmp_path / "a")
    reloaded = HEVCViTModel.from_pretrained(tmp_path / "a")
    as_packing = HEVCViTPackingModel.from_pretrained(tmp_path / "a")
    # the weights come back bit for bit (the promise); outputs of two models whose weights live in different
    # memory (mmapped safetensors, other alignment) may differ by float32 rounding in the matmuls' summation order
    _assert_same_weights(reloaded, standard)
    _assert_same_weights(as_packing, standard)
    with torch.no_grad():
        assert_close_rel(reloaded(x).last_hidden_state, standard(x).last_hidden_state)
        patches, grid_thw = patchify(x, 14)
        assert_close_rel(as_packing(patches, grid_thw).last_hidden_state, standard(x).last_hidden_state.reshape(-1, 64))
    reloaded.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config_a = json.loads((tmp_path / "a" / "config.json").read_text())
    config_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config_a == config_b
    assert config_a["model_type"] == "hevc_vit"


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_auto_classes_load_without_remote_code(tmp_path):
    standard, _ = _pair()
    standard.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, HEVCViTConfig)
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, HEVCViTModel)
    _assert_same_weights(model, standard)  # bit for bit; the outputs within float32 rounding (see above)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert_close_rel(model(x).pooler_output, standard(x).pooler_output)


@pytest.mark.parametrize(
    "folder, model_cls", [("onevision_encoder_tiny", HEVCViTModel), ("llava_vit_packing_tiny", HEVCViTPackingModel)]
)
def test_auto_model_opens_reference_folders_without_remote_code(folder, model_cls):
    auto = AutoModel.from_pretrained(FIXTURES / folder)
    direct = model_cls.from_pretrained(FIXTURES / folder)
    assert isinstance(auto, model_cls) and isinstance(auto.config, HEVCViTConfig)
    pixels = torch.randn(1, 3, 28, 42)
    args = patchify(pixels, 14) if model_cls is HEVCViTPackingModel else (pixels,)
    _assert_same_weights(auto, direct)
    with torch.no_grad():
        a, b = auto(*args), direct(*args)
    assert_close_rel(a.pooler_output, b.pooler_output)


def test_from_pretrained_options(tmp_path):
    standard, _ = _pair()
    standard.save_pretrained(tmp_path)
    model = HEVCViTPackingModel.from_pretrained(tmp_path, attn_implementation="eager", dtype="bfloat16")
    assert model.attn_implementation == "eager" and model.config.attention_backend == "eager"
    assert model.patch_embed.proj.weight.dtype == torch.bfloat16
    assert not model.training
    with pytest.raises(TypeError, match="unexpected keyword argument.*not_an_option"):
        HEVCViTModel.from_pretrained(tmp_path, not_an_option=1)
    with pytest.raises(ValueError, match="dtype='float33'"):
        HEVCViTModel.from_pretrained(tmp_path, dtype="float33")


def test_both_fixture_formats_load_the_same_weights():
    a = HEVCViTModel.from_pretrained(FIXTURES / "onevision_encoder_tiny").state_dict()
    b = HEVCViTModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_wrong_architecture_is_reported_by_name(tmp_path):
    standard, _ = _pair()
    standard.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"encoder.layers.0.mlp.fc1.weight: expected \(96, 64\), found \(128, 64\)"):
        HEVCViTModel.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# attention backends, gradient checkpointing
# --------------------------------------------------------------------------------------------------


def test_unknown_and_unavailable_backends_are_named():
    with pytest.raises(
        ValueError, match=r"attn_implementation='flash' is unknown; expected one of .*available here: \["
    ):
        tiny_config(attn_implementation="flash")
    model = HEVCViTModel(tiny_config())
    with pytest.raises(ValueError, match="is unknown"):
        model.set_attn_implementation("nope")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(
            ImportError, match=r"'flash_attn' is not available: .*available here: \['auto', 'eager', 'sdpa'"
        ):
            HEVCViTModel(tiny_config(attn_implementation="flash_attn"))
    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match=r"'torch_varlen' is not available: .*CUDA"):
            model.set_attn_implementation("torch_varlen")


# the call transformers keeps in v6 (5.24+), and the old one wherever transformers still has it
CHECKPOINTING_CALLS = [
    name for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable") if hasattr(HEVCViTModel, name)
]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("enable", CHECKPOINTING_CALLS)
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(enable):
    standard, _ = _pair()
    x = torch.randn(2, 3, 28, 42)
    twin = HEVCViTModel(standard.config)
    twin.load_state_dict(standard.state_dict())
    getattr(twin, enable)()
    assert twin.encoder.gradient_checkpointing
    results = []
    for model in (standard, twin):
        model.train()
        out = model(x)
        loss = out.last_hidden_state.square().mean() + out.pooler_output.sum()
        loss.backward()
        results.append((out.last_hidden_state.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden_states, grid_thw, kwargs, message",
    [
        (torch.randn(4, 588, 1), [[1, 2, 2]], {}, r"hidden_states has shape \(4, 588, 1\); expected 2-D"),
        (torch.randn(4, 500), [[1, 2, 2]], {}, r"patch width 500; expected C·p·p = 3·14·14 = 588"),
        (torch.randn(4, 588), [[1, 2, 3]], {}, r"grid_thw describes 6 patches .*; hidden_states has 4"),
        (torch.randn(4, 588), [[1, 2]], {}, r"grid_thw has shape \(1, 2\)"),
        (torch.randn(4, 588), [[1, 0, 2]], {}, r"every entry must be a positive integer"),
        (torch.randn(4, 588), [[1, 2.0, 2]], {}, r"expected integers"),
        (torch.randn(4, 588), None, {}, r"grid_thw is None"),
        (
            torch.randn(4, 588),
            [[1, 2, 2]],
            {"patch_positions": torch.zeros(3, 3, dtype=torch.long)},
            r"expected \(4, 3\)",
        ),
    ],
)
def test_packing_model_rejects_bad_input(hidden_states, grid_thw, kwargs, message):
    _, packing = _pair()
    with pytest.raises(ValueError, match=message):
        packing(hidden_states, grid_thw, **kwargs)


@pytest.mark.parametrize(
    "pixel_values, kwargs, message",
    [
        (
            torch.randn(1, 3, 28, 30),
            {},
            r"is 28x30; both sides must be positive multiples of patch_size=14 \(nearest: 28x28\)",
        ),
        (torch.randn(1, 4, 28, 28), {}, r"4 channels; the config expects num_channels=3"),
        (torch.randn(3, 28, 28), {}, r"expected \(B, C, H, W\) images or \(B, C, T, H, W\) videos"),
        (
            torch.randn(1, 3, 28, 28),
            {"patch_positions": torch.zeros(1, 3, 3, dtype=torch.long)},
            r"expected \(1, 4, 3\)",
        ),
        (
            torch.randn(1, 3, 28, 28),
            {"visible_indices": torch.tensor([[0, 4]])},
            r"visible_indices holds 4; expected indices in \[0, 4\)",
        ),
        (torch.randn(1, 3, 28, 28), {"visible_indices": torch.tensor([[-1, 2]])}, r"visible_indices holds -1"),
        (
            torch.randn(1, 3, 28, 28),
            {"visible_indices": torch.tensor([0, 2])},
            r"visible_indices has shape \(2,\); expected \(1, K\)",
        ),
        (torch.randn(1, 3, 28, 28), {"visible_indices": torch.tensor([[0.0, 2.0]])}, r"dtype torch.float32"),
    ],
)
def test_standard_model_rejects_bad_input(pixel_values, kwargs, message):
    standard, _ = _pair()
    with pytest.raises(ValueError, match=message):
        standard(pixel_values, **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=96, num_attention_heads=2), r"head_dim=48 .* must be a multiple of 32"),
        (dict(hidden_size=64, num_attention_heads=3), r"not divisible by num_attention_heads=3"),
        (dict(layer_norm_type="batch_norm"), r"layer_norm_type='batch_norm'"),
        (dict(hidden_act="swoosh"), r"hidden_act='swoosh'"),
        (dict(temporal_patch_size=2), r"temporal_patch_size=2; only 1 is supported"),
        (dict(patch_size=0), r"patch_size=0; expected a positive integer"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_presets():
    config = HEVCViTConfig.from_preset("large")
    assert (config.patch_size, config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (
        14,
        1024,
        16,
        24,
    )
    assert config.intermediate_size == 4096 and config.matching_preset() == "large"
    assert HEVCViTConfig.from_preset("small").head_dim == 64
    with pytest.raises(
        ValueError, match=r"preset='tiny'; expected one of \['base', 'giant', 'huge', 'large', 'small'\]"
    ):
        HEVCViTConfig.from_preset("tiny")
