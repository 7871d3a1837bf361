"""From a fork checkpoint to transformers in one command, then used the transformers way.

A fork checkpoint as its users hold it (``tests/helpers/fork_llava.py``: the fork's own ``LlavaQwenForCausalLM``
saved with its tokenizer — no ``<image>`` token — and a chat template, ``image_aspect_ratio="native"``) goes
through ``hevc-vit convert`` (the CLI, no id given); then ``AutoProcessor`` + ``AutoModelForImageTextToText``
open DST and are compared with the fork run by its own code: the prompt ids (the fork's
``tokenizer_image_token``), the pixels (the fork's ``process_images``), the logits and greedy ``generate``; and
``pipeline("image-text-to-text", model=DST)`` runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

from hevc_vit.cli import main as cli_main
from hevc_vit.convert.llava_processor import FORK_NATIVE_MAX_PIXELS, placeholder_ids
from hevc_vit.llava.vlm_processing import HEVCViTLlavaProcessor
from hevc_vit.packing import patchify_items
from tests.helpers.fork_llava import (
    FORK_CHAT_TEMPLATE,
    IMAGE_TOKEN_INDEX,
    TOWER_DIR,
    build_fork_model,
    fork_native_pixels,
    fork_prompt_ids,
    fork_tokenizer,
    save_fork_checkpoint,
    unpatchify_image,
)

PROMPT = "user : <image> describe the image . assistant :"
SIZES = [(100, 75), (150, 90)]  # (W, H): sides not multiples of the patch, so both processors resize
LOGITS_ATOL = 1e-5  # float32; the same operations as the fork's up to the packing of the tower's input
# the two processors resize with the same PIL filter to the same size; CLIP's normalisation runs in numpy and
# ours in torch, float32 either way: a few float32 roundings of values of magnitude ~2
PIXEL_ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(fork model, SRC, DST)``: the fork checkpoint with its tokenizer, converted by ``hevc-vit convert``."""
    root = tmp_path_factory.mktemp("e2e")
    model = build_fork_model("mlp2x_gelu", "bilinear", image_aspect_ratio="native")
    src = save_fork_checkpoint(model, root / "fork")
    fork_tokenizer().save_pretrained(src)
    dst = root / "converted"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    return model, src, dst


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _fork_ids(src) -> torch.Tensor:
    return fork_prompt_ids(PROMPT, transformers.AutoTokenizer.from_pretrained(src))


@pytest.mark.slow
def test_auto_processor_opens_the_processor_convert_wrote(converted):
    _, _, dst = converted
    processor = AutoProcessor.from_pretrained(dst)
    config = json.loads((dst / "config.json").read_text())
    assert type(processor) is HEVCViTLlavaProcessor
    # the fork's tokenizer has no <image> / <video>: convert added them as its next two ids
    assert (config["image_token_id"], config["video_token_id"]) == (len(fork_tokenizer()), len(fork_tokenizer()) + 1)
    assert (processor.image_token_id, processor.video_token_id) == (config["image_token_id"], config["video_token_id"])
    assert (processor.projector_type, processor.video_pool_mode) == ("mlp2x_gelu", "bilinear")
    tower = json.loads((TOWER_DIR / "preprocessor_config.json").read_text())
    ip = processor.image_processor
    assert (ip.patch_size, ip.min_tokens, ip.max_tokens) == (14, 1, FORK_NATIVE_MAX_PIXELS // 14**2)
    assert (ip.image_mean, ip.image_std, ip.resample) == (tower["image_mean"], tower["image_std"], tower["resample"])
    assert processor.chat_template == FORK_CHAT_TEMPLATE
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.split() == PROMPT.split()


@pytest.mark.slow
def test_prompt_ids_are_the_forks_with_each_placeholder_expanded(converted):
    model, src, dst = converted
    processor = AutoProcessor.from_pretrained(dst)
    inputs = processor(text=PROMPT, images=[_image(SIZES[0], 0)])
    ids = inputs["input_ids"][0]
    run = ids == processor.image_token_id
    assert int(run.sum()) == int(inputs["image_grid_thw"].prod(-1).sum())  # mlp2x_gelu: one token per patch
    first = int(run.nonzero()[0, 0])
    collapsed = torch.cat([ids[:first], torch.tensor([IMAGE_TOKEN_INDEX]), ids[first:][~run[first:]]])
    assert torch.equal(collapsed, _fork_ids(src)[0])


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_processors_agree_on_the_pixels(converted, size):
    """Ours (native resolution, the tower's normalisation) against the fork's ``process_images`` with
    ``image_aspect_ratio="native"`` on the tower's ``CLIPImageProcessor``: the same size, the same values."""
    model, _, dst = converted
    image = _image(size, 1)
    ours = AutoProcessor.from_pretrained(dst)(text=PROMPT, images=[image])
    pixels, grid = fork_native_pixels(model, image)
    assert torch.equal(ours["image_grid_thw"], grid)
    theirs, _ = patchify_items([pixels[0]], 14, 3)
    diff = (ours["pixel_values"] - theirs).abs().max().item()
    print(f"{size}: max abs pixel diff {diff:.3e}")
    assert diff <= PIXEL_ATOL


def _fork_inputs(model, src, inputs) -> dict:
    """The fork's inputs for the same prompt and the exact pixels our processor made."""
    grid = inputs["image_grid_thw"]
    pixels = unpatchify_image(inputs["pixel_values"], grid, 14)  # (1, C, H, W)
    assert torch.equal(patchify_items([pixels[0]], 14, 3)[0], inputs["pixel_values"])
    return dict(images=[pixels], modalities=["image"], grid_thw=grid, ids=_fork_ids(src))


@pytest.mark.slow
def test_forward_logits_equal_the_forks(converted):
    model, src, dst = converted
    processor = AutoProcessor.from_pretrained(dst)
    vlm = AutoModelForImageTextToText.from_pretrained(dst, attn_implementation="eager").eval()
    inputs = processor(text=PROMPT, images=[_image(SIZES[1], 2)])
    fork = _fork_inputs(model, src, inputs)
    with torch.no_grad():
        want = model(input_ids=fork.pop("ids"), **fork).logits
        got = vlm(**inputs).logits
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    print(f"max abs logits diff {diff:.3e}")
    assert diff <= LOGITS_ATOL


def _fork_greedy(model, fork: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by the fork's own forward, the whole prompt re-encoded every step (no cache): what its
    ``generate`` computes, on every transformers version (its ``generate`` passes transformers 5's ``cache``
    to a ``forward`` that does not take it)."""
    ids, new = fork.pop("ids"), []
    for _ in range(steps):
        logits = model(input_ids=ids, **fork).logits[:, -1]  # (1, V)
        new.append(logits.argmax(-1, keepdim=True))
        ids = torch.cat([ids, new[-1]], dim=1)
    return torch.cat(new, dim=1)  # (1, steps)


@pytest.mark.slow
def test_greedy_generate_equals_the_forks(converted):
    model, src, dst = converted
    processor = AutoProcessor.from_pretrained(dst)
    vlm = AutoModelForImageTextToText.from_pretrained(dst, attn_implementation="eager").eval()
    inputs = processor(text=PROMPT, images=[_image(SIZES[0], 3)])
    fork = _fork_inputs(model, src, inputs)
    steps = 4
    with torch.no_grad():
        got = vlm.generate(**inputs, max_new_tokens=steps, do_sample=False)
        want = _fork_greedy(model, dict(fork), steps)
        if transformers.__version__ < "5":  # the fork's generate runs here (inputs_embeds in: new tokens out)
            ids = fork.pop("ids")
            generated = model.generate(ids, **fork, max_new_tokens=steps, do_sample=False)
            assert torch.equal(generated, want), (generated, want)
    assert torch.equal(got[:, inputs["input_ids"].shape[1] :], want), (got, want)


@pytest.mark.slow
def test_pipeline_from_the_folder(converted):
    model, src, dst = converted
    image = _image(SIZES[0], 4)
    pipe = transformers.pipeline("image-text-to-text", model=str(dst))
    out = pipe(images=image, text=PROMPT, max_new_tokens=3, generate_kwargs={"do_sample": False})
    processor = AutoProcessor.from_pretrained(dst)
    inputs = processor(text=PROMPT, images=[image])
    direct = pipe.model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    new = processor.tokenizer.decode(direct, skip_special_tokens=True)
    assert out[0]["generated_text"].split() == (PROMPT + " " + new).split()


# -- which ids <image> / <video> take ------------------------------------------------------------------------


def test_ids_are_the_tokenizers_when_it_has_the_placeholders():
    tokenizer = fork_tokenizer()
    tokenizer.add_tokens(["<image>", "<video>"], special_tokens=True)
    image, video = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert placeholder_ids(tokenizer, {"vocab_size": 128}, log=lambda s: None) == (image, video)
    assert placeholder_ids(tokenizer, {"vocab_size": 128, "image_token_index": image}, log=print) == (image, video)
    with pytest.raises(ValueError, match=rf"image_token_id=5; the tokenizer's <image> is id {image}: expected"):
        placeholder_ids(tokenizer, {"vocab_size": 128}, image_token_id=5)


def test_missing_placeholders_are_added_as_the_next_ids_inside_the_vocabulary():
    tokenizer = fork_tokenizer()
    n = len(tokenizer)
    assert placeholder_ids(tokenizer, {"vocab_size": n + 2}, log=lambda s: None) == (n, n + 1)
    assert tokenizer.encode("w1 <image> <video>", add_special_tokens=False)[1:] == [n, n + 1]
    with pytest.raises(ValueError, match=rf"video_token_id=3; the tokenizer has no <video> .* next id, {n + 1}"):
        placeholder_ids(fork_tokenizer(), {"vocab_size": n + 2}, video_token_id=3, log=lambda s: None)
    with pytest.raises(ValueError, match=rf"next id, {n + 1}, but the text model's vocab_size is {n + 1}"):
        placeholder_ids(fork_tokenizer(), {"vocab_size": n + 1}, log=lambda s: None)
    assert placeholder_ids(None, {"vocab_size": 3}, 7, 8) == (7, 8)  # no tokenizer: as given


def test_an_unknown_word_is_no_placeholder_token():
    """A tokenizer that reads ``<image>`` as one unknown word (one id: ``<unk>``'s) has no ``<image>`` token."""
    backend = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer.encode("<image>", add_special_tokens=False) == [0]
    assert placeholder_ids(tokenizer, {"vocab_size": 8}, log=lambda s: None) == (2, 3)
