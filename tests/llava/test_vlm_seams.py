"""The native-resolution LLaVA model where transformers' machinery meets it: the pipeline batching chats against
each chat alone, the processor's batch against its single calls, chat templates reading images from PIL images,
paths and URLs, save / load in both processor layouts, dtype and device_map at from_pretrained."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.testing_utils import CaptureLogger

import hevc_vit  # noqa: F401 — registers the Auto classes
from tests.helpers.tiny_vlm import tiny_vlm

SUPPRESS = [3, 4]  # <image>, <video>: a random model may draw them; a prompt never continues with a placeholder
# a word-level chat template: every word of it is in the tiny vocabulary
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} :{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>"
    "{% elif c['type'] == 'video' %} <video>{% else %} {{ c['text'] }}{% endif %}{% endfor %} .{% endfor %}"
    "{% if add_generation_prompt %} yes :{% endif %}"
)
DTYPE_KEY = "dtype" if transformers.__version__ >= "5" else "torch_dtype"


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _chat(content: list[dict], text: str = "describe") -> list[dict]:
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def _vlm(**overrides):
    model, processor = tiny_vlm("mlp2x_gelu", **overrides)
    processor.chat_template = CHAT_TEMPLATE
    return model, processor


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder of PNGs served on 127.0.0.1 by a thread of this process; yields ``(folder, base_url)``."""
    folder = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # loopback only, a free port
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------
# batched == single: the pipeline and the processor
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pipeline_batch_of_chats_equals_each_chat_alone(padding_side):
    if padding_side == "right" and transformers.__version__ < "5":
        pytest.skip("transformers 4's pipeline batches with the tokenizer's right padding, which no decoder-only "
                    "generate supports (5 turns it left): set padding_side='left' there")  # fmt: skip
    model, processor = _vlm()
    processor.tokenizer.padding_side = padding_side  # the pipeline turns right into left for a decoder-only model
    frames = [_image(10 + k, 42, 56) for k in range(3)]
    chats = [
        _chat([{"type": "image", "image": _image(1, 56, 70)}]),
        _chat([{"type": "image", "image": _image(2, 100, 40)}, {"type": "image", "image": _image(3, 45, 45)}], "what"),
        _chat([{"type": "video", "video": frames}], "one"),
    ]
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    settings = dict(generate_kwargs={"max_new_tokens": 4, "do_sample": False, "suppress_tokens": SUPPRESS})

    def reply(out):  # transformers 4 and 5 nest a batched answer differently
        return (out[0] if isinstance(out, list) else out)["generated_text"][-1]["content"]

    batched = [reply(out) for out in pipe(text=chats, batch_size=2, **settings)]
    alone = [reply(pipe(text=chat, **settings)) for chat in chats]
    assert batched == alone
    assert all(len(processor.tokenizer.tokenize(r)) == 4 for r in alone)  # 4 new words each: nothing stopped early


@pytest.mark.slow
def test_pipeline_batches_text_only_chats_with_image_chats():
    """A chat without images and one with them in one batch: transformers' collator needs the same keys in
    every sample, so a text-only sample carries ``(0, C·p·p)`` pixels and a ``(0, 3)`` grid, which concatenate."""
    model, processor = _vlm()
    chats = [
        _chat([{"type": "image", "image": _image(1, 56, 70)}]),
        _chat([], "what is a cat"),
        _chat([], "one two"),
        _chat([{"type": "image", "image": _image(2, 100, 40)}, {"type": "image", "image": _image(3, 45, 45)}], "what"),
    ]
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    processor.tokenizer.padding_side = "left"
    settings = dict(generate_kwargs={"max_new_tokens": 3, "do_sample": False, "suppress_tokens": SUPPRESS})

    def reply(out):
        return (out[0] if isinstance(out, list) else out)["generated_text"][-1]["content"]

    batched = [reply(out) for out in pipe(text=chats, batch_size=2, **settings)]
    assert batched == [reply(pipe(text=chat, **settings)) for chat in chats]


def test_text_only_inputs_with_empty_pixels_equal_text_only_inputs():
    model, processor = _vlm()
    out = processor(text=["what is a cat", "one two three"])
    assert out["pixel_values"].shape == (0, 3 * 14 * 14) and out["image_grid_thw"].shape == (0, 3)
    bare = {k: v for k, v in out.items() if k not in ("pixel_values", "image_grid_thw")}
    greedy = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**out).logits, model(**bare).logits, atol=0, rtol=0)
    assert torch.equal(model.generate(**out, **greedy), model.generate(**bare, **greedy))
    with pytest.raises(ValueError, match="placeholders but pixel_values"):  # the items are missing, not empty
        model(
            **processor(text="<image> a", images=_image(1, 56, 70))
            | {k: out[k] for k in ("pixel_values", "image_grid_thw")}
        )


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_processor_batch_gives_each_sample_its_single_logits_and_greedy_tokens(padding_side):
    model, processor = _vlm()
    processor.tokenizer.padding_side = padding_side
    texts = ["<image> describe the image", "what is <image> and <image> ?", "a cat"]
    images = [[_image(1, 56, 70)], [_image(2, 100, 40), _image(3, 45, 45)], []]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token, as generate does
    greedy = dict(max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with torch.no_grad():
        logits = model(**batch, position_ids=positions).logits
        generated = model.generate(**batch, **greedy) if padding_side == "left" else None
    width = batch["input_ids"].shape[1]
    for b, (text, items) in enumerate(zip(texts, images)):
        alone = processor(text=text, images=items or None, return_tensors="pt")
        with torch.no_grad():
            single = model(**alone).logits[0]
        real = mask[b].bool()
        assert int(real.sum()) == single.shape[0]
        torch.testing.assert_close(logits[b][real], single, atol=1e-4, rtol=1e-4)  # fp32, same maths padded
        if generated is not None:
            once = model.generate(**alone, **greedy)[0, alone["input_ids"].shape[1] :]
            assert torch.equal(generated[b, width:], once)


def test_one_text_needs_no_pad_token():
    """A tokenizer without a pad token (most causal LMs') pads no single text: the processor and the pipeline's
    single call work and equal the padded tokenizer's; a batch still needs one, as transformers says."""
    model, processor = _vlm()
    image, text = _image(1, 56, 70), "<image> describe the image"
    padded = processor(images=[image], text=text)
    n = padded["input_ids"].shape[1]
    widths = [len(processor(images=[image], text=text, pad_to_multiple_of=m)["input_ids"][0]) for m in (8, 16)]
    assert widths == [m * -(-n // m) for m in (8, 16)] and n % 8  # asked for, one text is still padded
    processor.tokenizer.pad_token = None
    bare = processor(images=[image], text=text)
    for key in padded:
        assert torch.equal(bare[key], padded[key]), key
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(images=image, text=text, generate_kwargs={"max_new_tokens": 2, "suppress_tokens": SUPPRESS})
    direct = model.generate(**bare, max_new_tokens=2, suppress_tokens=SUPPRESS)[0, bare["input_ids"].shape[1] :]
    assert out[0]["generated_text"] == f"{text} {processor.tokenizer.decode(direct, skip_special_tokens=True)}"
    with pytest.raises(ValueError, match="padding token"):
        processor(images=[image, image], text=[text, text + " ."])


# --------------------------------------------------------------------------------------------------
# chat templates: images as PIL images, paths, URLs; videos as frames
# --------------------------------------------------------------------------------------------------


def test_chat_template_reads_images_given_as_pil_path_or_url(served):
    _, processor = _vlm()
    folder, base = served
    image = _image(1, 56, 70)
    image.save(folder / "cat.png")  # PNG: lossless, so every route gives the same pixels
    shutil.copy(folder / "cat.png", folder / "copy.png")
    expected = processor(images=[image], text="user : <image> describe . yes :")
    entries = {
        "pil": {"image": image},
        "path": {"path": str(folder / "cat.png")},
        "image as path": {"image": str(folder / "copy.png")},
        "url": {"url": f"{base}/cat.png"},
        "image as url": {"image": f"{base}/copy.png"},
    }
    for name, entry in entries.items():
        out = processor.apply_chat_template(
            _chat([{"type": "image", **entry}]), tokenize=True, return_dict=True, add_generation_prompt=True
        )
        assert set(out) == set(expected), name
        for key in expected:
            assert torch.equal(torch.as_tensor(out[key]), expected[key]), (name, key)
    with pytest.raises(ValueError, match=r"image 0 is a str; .* could not be read"):
        processor(images=f"{base}/missing.png", text="<image> a", timeout=10)


def test_chat_template_video_frames_equal_the_processor_call():
    _, processor = _vlm()
    frames = [_image(10 + k, 42, 56) for k in range(3)]
    out = processor.apply_chat_template(
        _chat([{"type": "video", "video": frames}]), tokenize=True, return_dict=True, add_generation_prompt=True
    )
    expected = processor(videos=[frames], text="user : <video> describe . yes :")
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(torch.as_tensor(out[key]), expected[key]), key


def test_a_video_given_as_a_path_is_named_not_iterated():
    _, processor = _vlm()
    with pytest.raises(ValueError, match=r"a video is the str 'clip.mp4'; expected its frames"):
        processor(videos="clip.mp4", text="<video> a")
    with pytest.raises(ValueError, match=r"a video is the str 'clip.mp4'"):
        processor(videos=["clip.mp4"], text="<video> a")


# --------------------------------------------------------------------------------------------------
# save / load: both processor layouts, the Auto classes, dtype and device_map
# --------------------------------------------------------------------------------------------------


def _split_layout(folder) -> None:
    """transformers 5 nests the image processor in processor_config.json; 4 writes it to preprocessor_config.json."""
    config = json.loads((folder / "processor_config.json").read_text())
    image = config.pop("image_processor", None)
    if image is not None:
        image["processor_class"] = config["processor_class"]
        (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
        (folder / "processor_config.json").write_text(json.dumps(config, indent=2))


def _nested_layout(folder) -> None:
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.exists():
        config = json.loads((folder / "processor_config.json").read_text())
        image = json.loads(preprocessor.read_text())
        image.pop("processor_class", None)
        config["image_processor"] = image
        preprocessor.unlink()
        (folder / "processor_config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [_split_layout, _nested_layout], ids=["split", "nested"])
def test_processor_settings_and_model_survive_both_layouts(tmp_path, layout):
    model, processor = tiny_vlm("spatial_merge", video_pool_mode="average", video_pool_stride=2)
    processor.chat_template = CHAT_TEMPLATE
    processor.image_processor.min_tokens, processor.image_processor.max_tokens = 8, 32  # not the defaults
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    layout(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    loaded.tokenizer.padding_side = processor.tokenizer.padding_side  # an attribute set after init is not saved
    assert type(loaded) is type(processor) and loaded.chat_template == CHAT_TEMPLATE
    settings = ("projector_type", "video_pool_mode", "video_pool_stride", "image_token", "video_token")
    assert {k: getattr(loaded, k) for k in settings} == {k: getattr(processor, k) for k in settings}
    bounds = ("patch_size", "min_tokens", "max_tokens", "max_video_tokens")
    ip, lp = processor.image_processor, loaded.image_processor
    assert {k: getattr(lp, k) for k in bounds} == {k: getattr(ip, k) for k in bounds}
    texts = ["<image> a", "<image> <image> b"]
    images = [_image(1, 56, 70), _image(2, 100, 40), _image(3, 300, 200)]  # the last is cut to max_tokens
    before, after = processor(images=images, text=texts), loaded(images=images, text=texts)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    classes = [AutoModelForImageTextToText]
    if hasattr(transformers, "AutoModelForVision2Seq"):  # gone in transformers 5
        classes.append(transformers.AutoModelForVision2Seq)
    with torch.no_grad():
        expected = model(**before).logits
        for cls in classes:
            reloaded = cls.from_pretrained(tmp_path).eval()
            assert type(reloaded) is type(model)
            torch.testing.assert_close(reloaded(**after).logits, expected, atol=0, rtol=0)


def test_reloading_the_processor_warns_nothing(tmp_path):
    """transformers 5 warns at every ``from_pretrained`` of a processor that names its parts' classes (4 needs
    the names); a user sees that line on each load."""
    _, processor = _vlm()
    processor.save_pretrained(tmp_path)
    logging.Logger.warning_once.cache_clear()  # transformers says it once per process: say it here if at all
    with CaptureLogger(transformers.utils.logging.get_logger("transformers.processing_utils")) as captured:
        AutoProcessor.from_pretrained(tmp_path)
    assert "deprecated" not in captured.out


@pytest.mark.slow
def test_bfloat16_checkpoint_loads_as_bfloat16_with_auto_dtype_on_cpu_map(tmp_path):
    model, processor = _vlm()
    model.save_pretrained(tmp_path / "fp32")
    half = AutoModelForImageTextToText.from_pretrained(tmp_path / "fp32", **{DTYPE_KEY: torch.bfloat16}).eval()
    half.save_pretrained(tmp_path / "bf16")
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", device_map="cpu", **{DTYPE_KEY: "auto"})
    assert auto.dtype == torch.bfloat16 and auto.model.vision_tower.patch_embed.proj.weight.dtype == torch.bfloat16
    batch = processor(images=[_image(1, 56, 70)], text="<image> describe the image")
    assert batch["pixel_values"].dtype == torch.float32  # the processor's, whatever the model's dtype
    with torch.no_grad():
        torch.testing.assert_close(auto.eval()(**batch).logits, half(**batch).logits, atol=0, rtol=0)
