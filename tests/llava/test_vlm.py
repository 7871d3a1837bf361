"""The native-resolution LLaVA model (hevc_vit.llava.vlm) against its parts run item by item, batched against
single, cached against uncached generation, saved against reloaded, bf16 against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import hevc_vit  # noqa: F401 — registers the Auto classes
from hevc_vit import HEVCViTPackingModel, grid_positions
from hevc_vit.llava.vlm_config import HEVCViTLlavaConfig, projected_grid_thw
from tests.helpers.tiny_vlm import TOWER, tiny_tokenizer, tiny_vlm

ATOL = 1e-5  # fp32, packed vs one item: the same maths in another order
RNG_SEED = 0
SUPPRESS = [3, 4]  # <image>, <video>: a random model may draw them; a prompt never continues with a placeholder


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(rng: np.random.Generator, t: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tower() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(TOWER).eval()


def _samples() -> list[dict]:
    """Two images, a video, a text-only sample and one image: each sample's own inputs."""
    rng = np.random.default_rng(RNG_SEED)
    return [
        {"text": "describe <image> and <image> .", "images": [_image(rng, 60, 90), _image(rng, 100, 40)]},
        {"text": "what is in the <video> ?", "videos": [_video(rng, 3, 50, 70)]},
        {"text": "what is a cat ?"},
        {"text": "<image> one two three", "images": [_image(rng, 45, 45)]},
    ]


def _batch(processor, samples, padding_side="right"):
    processor.tokenizer.padding_side = padding_side
    images = [im for s in samples for im in s.get("images", [])]
    videos = [v for s in samples for v in s.get("videos", [])]
    return processor(images=images or None, videos=videos or None, text=[s["text"] for s in samples])


# --------------------------------------------------------------------------------------------------
# features inside the model equal the parts run item by item
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "spatial_merge"])
def test_features_equal_tower_and_projector_on_each_item(tower, projector_type):
    model, processor = tiny_vlm(projector_type, video_pool_mode="average")
    batch = _batch(processor, _samples())
    grid = batch["image_grid_thw"]
    is_video = [False, False, True, False]
    with torch.no_grad():
        packed = model.model.get_vision_features(batch["pixel_values"], grid)  # (T, D)
        projected = model.model.get_image_features(batch["pixel_values"], grid, is_video=is_video)
        parts = torch.split(batch["pixel_values"], grid.prod(-1).tolist())
        at = 0
        for i, (pixels, row) in enumerate(zip(parts, grid)):
            alone = tower(pixels, grid_thw=row[None], output_hidden_states=True).hidden_states[-2]  # (N, D)
            torch.testing.assert_close(packed[at : at + len(alone)], alone, atol=ATOL, rtol=0)
            at += len(alone)
            tokens = model.model.multi_modal_projector(alone, row[None])  # (N', L)
            if is_video[i]:  # the fork's get_2dPool, frame by frame
                t, h, w = projected_grid_thw(row[None], projector_type)[0].tolist()
                frames = tokens.view(t, h, w, -1).permute(0, 3, 1, 2)
                tokens = torch.nn.functional.avg_pool2d(frames, 2).permute(0, 2, 3, 1).reshape(-1, tokens.shape[-1])
            torch.testing.assert_close(projected[i], tokens, atol=ATOL, rtol=0)
    assert at == len(packed)


@pytest.mark.parametrize("pool", [None, "bilinear"])
@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "spatial_merge"])
def test_placeholder_count_is_the_projector_output_length(projector_type, pool):
    model, processor = tiny_vlm(projector_type, video_pool_mode=pool)
    rng = np.random.default_rng(1)
    images = [_image(rng, int(rng.integers(14, 200)), int(rng.integers(14, 200))) for _ in range(10)]
    videos = [_video(rng, int(rng.integers(1, 5)), int(rng.integers(30, 120)), int(rng.integers(30, 120)))
              for _ in range(3)]  # fmt: skip
    text = [f"the <image> {'<video>' if i < 3 else ''} ." for i in range(10)]
    batch = processor(images=images, videos=videos, text=text)
    is_video = [False, True] * 3 + [False] * 7
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], is_video=is_video)
    ids = batch["input_ids"]
    expected = [len(f) for f in features]
    found = []
    for row in ids:
        run_ids = row[(row == 3) | (row == 4)]
        change = torch.nonzero(run_ids[1:] != run_ids[:-1])[:, 0] + 1  # an image and a video run: two runs per row
        found += [len(part) for part in torch.tensor_split(run_ids, change)]
    assert found == expected
    assert len(set(expected)) > 3  # the sizes differ


# --------------------------------------------------------------------------------------------------
# batch vs single, cache vs no cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_mixed_batch_gives_each_sample_its_own_logits(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the same comparison on the GPU's kernels")
    model, processor = tiny_vlm("spatial_merge", video_pool_mode="average")
    model.to(device)
    samples = _samples()
    batch = _batch(processor, samples).to(device)
    with torch.no_grad():
        logits = model(**batch).logits
        for i, sample in enumerate(samples):
            alone = _batch(processor, [sample]).to(device)
            single = model(**alone).logits[0]
            n = int(batch["attention_mask"][i].sum())  # right padding: the sample's tokens come first
            assert n == single.shape[0]
            torch.testing.assert_close(logits[i, :n], single, atol=1e-4, rtol=1e-4)


def test_generate_left_padded_batch_with_and_without_cache():
    model, processor = tiny_vlm("mlp2x_gelu")
    samples = _samples()
    batch = _batch(processor, samples, padding_side="left")
    kwargs = dict(max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS)
    cached = model.generate(**batch, use_cache=True, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    width = batch["input_ids"].shape[1]
    for i, sample in enumerate(samples):
        alone = _batch(processor, [sample], padding_side="left")
        single = model.generate(**alone, **kwargs)
        assert torch.equal(cached[i, width:], single[0, alone["input_ids"].shape[1] :])


# --------------------------------------------------------------------------------------------------
# the zero-image convention, errors
# --------------------------------------------------------------------------------------------------


def test_pixels_without_placeholders_run_the_tower_with_zero_gradient():
    model, processor = tiny_vlm("spatial_merge")
    rng = np.random.default_rng(2)
    with_image = processor(images=[_image(rng, 56, 84)], text=["<image> what is"])
    text_only = processor(text=["what is a cat ?"])
    inputs = dict(text_only, pixel_values=with_image["pixel_values"], image_grid_thw=with_image["image_grid_thw"])
    out = model(**inputs, labels=text_only["input_ids"])
    with torch.no_grad():
        reference = model(**text_only).logits
    assert torch.equal(out.logits, reference)
    out.loss.backward()
    vision = list(model.model.vision_tower.named_parameters()) + list(
        model.model.multi_modal_projector.named_parameters()
    )
    zero_grads = {name: p.grad for name, p in vision}
    model.zero_grad(set_to_none=True)
    model(**with_image, labels=with_image["input_ids"]).loss.backward()
    used = [name for name, p in vision if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(used) > 10
    for name in used:  # every weight an image trains is in the text-only graph too, with a zero gradient
        assert zero_grads[name] is not None and torch.count_nonzero(zero_grads[name]) == 0, name


def test_errors_name_the_counts():
    model, processor = tiny_vlm()
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match=r"2 <image> placeholders and images has 1"):
        processor(images=[_image(rng, 40, 40)], text=["<image> <image>"])
    batch = processor(images=[_image(rng, 40, 40)], text=["<image> the"])
    ids = batch["input_ids"].clone()
    ids[0, 0] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=r"item 0 \(image.*takes \d+ <image> placeholder tokens; found a run of"):
        model(**dict(batch, input_ids=ids))
    with pytest.raises(ValueError, match="placeholders but pixel_values is None"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="projector_type='nope'"):
        HEVCViTLlavaConfig(projector_type="nope")


# --------------------------------------------------------------------------------------------------
# transformers' machinery: save / load, Auto classes, device_map, dtype, pipeline, checkpointing
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip_through_the_auto_classes(tmp_path):
    model, processor = tiny_vlm("spatial_merge", video_pool_mode="max")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batch = _batch(processor, _samples())
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and type(reloaded_processor) is type(processor)
    assert loaded.config.video_pool_mode == "max" and reloaded_processor.video_pool_mode == "max"
    again = _batch(reloaded_processor, _samples())
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
        mapped = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto").eval()
        torch.testing.assert_close(mapped(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    names = set(dict(model.state_dict()))
    assert {"lm_head.weight", "model.multi_modal_projector.mlp.0.weight", "model.vision_tower.patch_embed.proj.weight",
            "model.language_model.embed_tokens.weight"} <= names  # fmt: skip


def test_bf16_forward_is_close_to_fp32(tmp_path):
    model, processor = tiny_vlm("mlp2x_gelu")
    model.save_pretrained(tmp_path)
    batch = _batch(processor, _samples())
    dtype_key = "dtype" if transformers.__version__ >= "5" else "torch_dtype"
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, **{dtype_key: torch.bfloat16}).eval()
    assert half.model.vision_tower.patch_embed.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        full = model(**batch).logits
        low = half(**batch).logits
    assert low.dtype == torch.bfloat16
    scale = full.abs().max()
    # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings deep in a tiny model
    torch.testing.assert_close(low.float(), full, atol=float(0.05 * scale), rtol=0.05)


def test_pipeline_image_text_to_text():
    model, processor = tiny_vlm("mlp2x_gelu")
    rng = np.random.default_rng(4)
    image = Image.fromarray(_image(rng, 56, 70))
    text = "<image> describe the image"
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(images=image, text=text, max_new_tokens=3, generate_kwargs={"suppress_tokens": SUPPRESS})
    inputs = processor(images=[image], text=[text])
    direct = model.generate(**inputs, max_new_tokens=3, suppress_tokens=SUPPRESS)[0, inputs["input_ids"].shape[1] :]
    new = processor.tokenizer.decode(direct, skip_special_tokens=True)
    assert len(direct) == 3 and out[0]["generated_text"] == f"{text} {new}"


def test_gradient_checkpointing_gives_the_same_gradients():
    model, processor = tiny_vlm("spatial_merge")
    batch = _batch(processor, _samples())
    model.train()
    model.model.vision_tower.requires_grad_(True)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.vision_tower.encoder.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_tokenizer_keeps_placeholders_whole():
    tokenizer = tiny_tokenizer()
    assert tokenizer("<image><video> the")["input_ids"] == [3, 4, 6]


def test_patch_positions_reach_the_tower(tower):
    model, processor = tiny_vlm("mlp2x_gelu")
    rng = np.random.default_rng(5)
    image, video = _image(rng, 40, 60), _video(rng, 3, 42, 56)
    plain = processor(images=[image], videos=[video], text=["<video> and <image>"])
    grid = plain["image_grid_thw"]  # the video first: items follow their placeholders
    spread = grid_positions(grid[:1]) * torch.tensor([20, 1, 1])  # 3 frames spread over a 60-frame context
    positions = [spread, grid_positions(grid[1:])]
    batch = processor(images=[image], videos=[video], text=["<video> and <image>"], patch_positions=positions)
    assert torch.equal(batch["patch_positions"], torch.cat(positions))
    with torch.no_grad():
        packed = model.model.get_vision_features(batch["pixel_values"], grid, batch["patch_positions"])
        n = int(grid[0].prod())
        alone = tower(batch["pixel_values"][:n], grid_thw=grid[:1], patch_positions=spread, output_hidden_states=True)
        torch.testing.assert_close(packed[:n], alone.hidden_states[-2], atol=ATOL, rtol=0)
        moved = model(**batch).logits
        default = model(**plain).logits
    assert not torch.allclose(moved, default, atol=1e-3)  # the positions change the video's features


def test_inputs_embeds_and_tied_weights(tmp_path):
    model, processor = tiny_vlm("mlp2x_gelu", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    batch = _batch(processor, _samples()[:1])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        by_ids = model(**batch).logits
        vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "attention_mask")}
        by_embeds = model(inputs_embeds=embeds, **vision).logits
    assert torch.equal(by_ids, by_embeds)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, by_ids)
