"""Inputs a user may hand the native-resolution LLaVA processor and model (hevc_vit.llava.vlm*), found by an audit
from outside: each either gives the result of a simpler equivalent input (compared, not assumed) or a ValueError
naming the value and what was expected — never a silent mismatch."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.helpers.hf_llava import IMAGE_TOKEN, build
from tests.helpers.tiny_vlm import tiny_vlm

ATOL = 1e-5  # fp32: the same maths, rows in another order or batch
SUPPRESS = [3, 4]  # <image>, <video>: a random model may draw them; a prompt never continues with a placeholder


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


def _image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# processor
# --------------------------------------------------------------------------------------------------


def test_a_path_string_is_one_image_named_not_iterated_letter_by_letter(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match=r"image 0 is a str; expected a PIL image"):
        processor(images="cat.png", text="<image> a")


def test_bfloat16_tensor_image_equals_its_float32_values(vlm):
    _, processor = vlm
    image = torch.rand(3, 30, 40).bfloat16()
    half = processor(images=image, text="<image> a")
    full = processor(images=image.float(), text="<image> a")
    torch.testing.assert_close(half["pixel_values"], full["pixel_values"], atol=0, rtol=0)


def test_per_sample_image_lists_follow_their_samples(vlm):
    _, processor = vlm
    a, b = _image(0, 30, 40), _image(1, 50, 30)
    texts = ["<image> a cat", "the dog", "<image> and <image>"]
    nested = processor(images=[[a], [], [b, a]], text=texts)
    flat = processor(images=[a, b, a], text=texts)
    for name in ("pixel_values", "image_grid_thw", "input_ids"):
        assert torch.equal(nested[name], flat[name]), name
    with pytest.raises(ValueError, match=r"images\[0\] holds 0 images and text\[0\] 1 <image>"):
        processor(images=[[], [a]], text=["<image> a", "a cat"])  # the image is on the other sample


def test_per_sample_video_lists_follow_their_samples(vlm):
    _, processor = vlm
    a, b = _image(11, 30, 40), _image(12, 30, 40)
    nested = processor(videos=[[[a, b]], []], text=["<video> a", "a cat"])
    flat = processor(videos=[[a, b]], text=["<video> a", "a cat"])
    for name in ("pixel_values", "image_grid_thw", "input_ids"):
        assert torch.equal(nested[name], flat[name]), name
    with pytest.raises(ValueError, match=r"videos\[0\] holds 0 videos and text\[0\] 1 <video>"):
        processor(videos=[[], [[a, b]]], text=["<video> a", "a cat"])


def test_patch_merger_items_of_odd_patch_counts_are_sized_to_merge():
    """patch_merger groups 4 tokens: the processor sizes items on 2 x 2 blocks (a 30x40 image was 2 x 3 patches,
    refused); batched logits equal each sample's alone."""
    model, processor = tiny_vlm("patch_merger")
    samples = [("<image> a cat", [_image(13, 30, 40)]), ("the <image> dog", [_image(14, 70, 70)])]
    batch = processor(images=[im for _, ims in samples for im in ims], text=[t for t, _ in samples])
    assert (batch["image_grid_thw"][:, 1:] % 2 == 0).all()
    with torch.no_grad():
        batched = model(**batch).logits
        for i, (text, images) in enumerate(samples):
            alone = model(**processor(images=images, text=text)).logits[0]
            keep = batch["attention_mask"][i].bool()
            torch.testing.assert_close(batched[i][keep], alone, atol=ATOL, rtol=0)


def test_a_placeholder_the_tokenizer_does_not_know_is_refused_not_expanded_into_unk(vlm):
    """A tokenizer without ``<image>`` encodes it as one id, its unknown word's: a processor built on it would expand
    every image into ``<unk>`` runs, which the model never takes for images."""
    _, processor = vlm
    tokenizer = processor.tokenizer
    assert tokenizer.encode("<image>", add_special_tokens=False) == [processor.image_token_id]  # known: accepted
    with pytest.raises(ValueError, match=r"encodes 'PICTURE' as \[1\] \(its unknown token\).*add_special_tokens"):
        type(processor)(processor.image_processor, tokenizer, image_token="PICTURE")
    assert tokenizer.encode("PICTURE", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_empty_text_list_is_named(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match=r"text is \[\]; expected a string or a non-empty list"):
        processor(text=[])


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_that_cuts_a_placeholder_run_raises(vlm, side):
    _, processor = vlm
    processor.tokenizer.truncation_side = side
    try:
        image = _image(2, 60, 60)  # 16 patches: 16 placeholder tokens
        with pytest.raises(
            ValueError, match=r"text\[0\] holds [58] placeholder tokens after tokenization; its items take 16"
        ):
            processor(images=image, text="<image> d e f", truncation=True, max_length=8)
        # a cut that leaves the run whole is the untruncated input, shortened
        whole = processor(images=image, text="<image> d e f")
        text_side = "d e f <image>" if side == "left" else "<image> d e f"
        cut = processor(images=image, text=text_side, truncation=True, max_length=17)
        assert torch.equal(cut["pixel_values"], whole["pixel_values"])
        assert cut["input_ids"].shape[1] == 17 and int((cut["input_ids"] == 3).sum()) == 16
    finally:
        processor.tokenizer.truncation_side = "right"


def test_patch_positions_must_be_integer_rows_of_three(vlm):
    _, processor = vlm
    image = _image(3, 30, 40)
    n = int(processor(images=image, text="<image>")["pixel_values"].shape[0])  # 6 patches
    positions = torch.stack([torch.zeros(n), torch.arange(n) // 3, torch.arange(n) % 3], -1).long()  # (n, 3)
    as_numpy = processor(images=image, text="<image>", patch_positions=positions.numpy())
    assert torch.equal(as_numpy["patch_positions"], positions)
    with pytest.raises(ValueError, match=r"patch_positions has dtype torch.float32; expected integers"):
        processor(images=image, text="<image>", patch_positions=positions.float())
    with pytest.raises(ValueError, match=r"patch_positions has shape \(9, 2\); expected \(N, 3\)"):
        processor(images=image, text="<image>", patch_positions=positions.reshape(9, 2))  # n * 3 values
    with pytest.raises(ValueError, match=r"patch_positions\[0\] has shape \(6, 2\); expected \(N, 3\)"):
        processor(images=image, text="<image>", patch_positions=[positions[:, :2]])


def test_video_frames_of_other_sizes_name_the_video(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match=r"video 0: frame 1 is 20x50; frame 0 is 40x30"):
        processor(videos=[[_image(4, 30, 40), _image(5, 50, 20)]], text="<video>")


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


def test_a_placeholder_run_split_by_text_raises(vlm):
    model, processor = vlm
    batch = processor(images=_image(6, 30, 40), text="<image> a cat")  # a run of 6
    ids = batch["input_ids"]
    split = torch.cat([ids[:, :3], torch.tensor([[5]]), ids[:, 3:]], 1)  # 3 placeholders, a word, 3 placeholders
    inputs = dict(batch, input_ids=split, attention_mask=torch.ones_like(split))
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"takes 6 <image> .* found a run of 3 consecutive ones in row 0"),
    ):
        model(**inputs)


def test_pixels_whose_placeholders_are_not_the_configs_warn_once_and_equal_text_only(caplog):
    """A processor whose tokenizer ids differ from the config's: the images are dropped (the fork's text-only
    convention, kept) but no longer without a word."""
    model, processor = tiny_vlm(image_token_id=40, video_token_id=41)  # the tokenizer's are 3 and 4
    batch = processor(images=_image(7, 30, 40), text="<image> a cat")
    text_only = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hevc_vit.llava.vlm"):
        got = model(**batch).logits
        model(**batch)
        want = model(**text_only).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    said = [r.getMessage() for r in caplog.records if "no placeholder" in r.getMessage()]
    assert len(said) == 1 and "image_token_id=40, video_token_id=41" in said[0], said


def _mixed_batch(processor):
    processor.tokenizer.padding_side = "left"
    video = np.random.default_rng(8).integers(0, 256, (2, 30, 30, 3), dtype=np.uint8)
    samples = [
        ("<image> a cat", [_image(9, 30, 40)], None),
        ("what is a cat ?", None, None),  # no item: the expansion must skip it
        ("what is the <video> and <image> ?", [_image(10, 50, 30)], [video]),
    ]
    images = [im for _, ims, _ in samples for im in ims or []]
    videos = [v for _, _, vs in samples for v in vs or []]
    return samples, processor(images=images, videos=videos, text=[t for t, _, _ in samples])


def test_expanded_generation_inputs_give_each_sample_its_own_items(vlm):
    """transformers repeats dim 0 for beams / num_return_sequences; packed items are not samples."""
    model, processor = vlm
    _, batch = _mixed_batch(processor)
    inputs = dict(batch)
    ids, kwargs = model._expand_inputs_for_generation(expand_size=3, input_ids=inputs.pop("input_ids"), **inputs)
    with torch.no_grad():
        expanded = model(input_ids=ids, **kwargs).logits
        once = model(**batch).logits
    torch.testing.assert_close(expanded, once.repeat_interleave(3, 0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}])
def test_beam_search_on_pixels_equals_beam_search_on_merged_embeddings(vlm, settings):
    """The oracle is the batch's own embeddings with the images merged in (transformers expands those rows
    itself): batched-against-alone would not do, an item misplaced by the expansion is misplaced alike alone."""
    model, processor = vlm
    _, batch = _mixed_batch(processor)
    kwargs = dict(max_new_tokens=3, suppress_tokens=SUPPRESS, pad_token_id=0, return_dict_in_generate=True,
                  output_scores=True, **settings)  # fmt: skip
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])  # (B, S, L)
        embeds = model.model.merge_vision(embeds, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    on_pixels = model.generate(**batch, **kwargs)
    on_embeds = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **kwargs)
    assert torch.equal(on_pixels.sequences[:, -3:], on_embeds.sequences[:, -3:])
    torch.testing.assert_close(on_pixels.sequences_scores, on_embeds.sequences_scores, atol=1e-5, rtol=0)


def test_transformers_llava_with_image_sizes_raises_naming_them():
    model = build("llava")
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [2]])
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels)  # one size, no image_sizes: the CLIP path works
        with pytest.raises(ValueError, match=r"image_sizes=\[\[56, 56\]\].*expected no image_sizes"):
            model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[56, 56]]))
