"""The reference project's LLaVA-NeXT fork, run as it is: a tiny ``LlavaQwenForCausalLM`` saved the way the fork
saves it, and its forward on the inputs its ``train.py`` collator makes.

The fork's code is vendored byte for byte under ``tests/vendor/llava_next/`` (see its README). Two things are
set up from here, never by editing it:

* modules the fork imports but these tests never reach, whose own imports are unavailable (``einops`` for the
  perceiver resampler, transformers internals for the Qformer and the SigLIP2 tower), are stubbed in
  ``sys.modules`` by a placeholder that raises when used;
* the fork's ``build_vision_tower`` (``llava.model.llava_arch``'s name) is pointed at this library's
  :func:`hevc_vit.llava.towers.build_vision_tower`: the fork runs our tower unchanged, as its users do (its
  own ``OneVisionEncoderTower`` asks for ``flash_attention_2`` and has no ``return_spatial_dims``, which its
  ``spatial_merge`` path calls).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from hevc_vit.llava.towers import build_vision_tower
from hevc_vit.packing import patchify_items
from tests.helpers import FIXTURES

VENDOR = Path(__file__).resolve().parents[1] / "vendor" / "llava_next"
TOWER_DIR = FIXTURES / "llava_vit_packing_tiny"
TOWER_PREFIX = "model.vision_tower.vision_tower."
IMAGE_TOKEN_INDEX = -200  # the fork's placeholder (llava/constants.py), one per image or video in input_ids
TEXT_VOCAB = 120  # text ids of the samples; ids from here up are free for the converted model's placeholders
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 126, 127
_STUBS = {
    "llava.model.multimodal_encoder.siglip2_naflex": "SigLip2NaflexVisionTower",
    "llava.model.multimodal_resampler.perceiver": "PerceiverResampler",
    "llava.model.multimodal_resampler.qformer": "Qformer",
}


def _placeholder(module: str, name: str) -> type:
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{module}.{name} is not vendored (tests/vendor/llava_next/README.md)")

    return type(name, (), {"__init__": refuse})


def import_fork() -> types.ModuleType:
    """The fork's ``llava.model.language_model.llava_qwen`` module, its tower builder pointed at ours."""
    for module, name in _STUBS.items():
        if module not in sys.modules:
            stub = types.ModuleType(module)
            setattr(stub, name, _placeholder(module, name))
            sys.modules[module] = stub
    if str(VENDOR) not in sys.path:
        sys.path.insert(0, str(VENDOR))
    import llava.model.language_model.llava_qwen as llava_qwen  # the vendored fork
    import llava.model.llava_arch as arch  # the vendored fork (a test-only package on sys.path)

    arch.build_vision_tower = build_vision_tower
    return llava_qwen


def fork_config(projector_type: str, pool_mode: str = "bilinear", **overrides):
    """A tiny ``LlavaQwenConfig``: Qwen2 of width 64, our fixture tower, the fork's recipe settings."""
    llava_qwen = import_fork()
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        mm_vision_tower=str(TOWER_DIR),
        mm_hidden_size=64,
        mm_projector_type=projector_type,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_spatial_pool_mode=pool_mode,
        mm_spatial_pool_stride=2,
        image_aspect_ratio="square",
        use_mm_proj=True,
    )
    values.update(overrides)
    config = llava_qwen.LlavaQwenConfig(**values)
    config._attn_implementation = "eager"
    return config


def build_fork_model(projector_type: str, pool_mode: str = "bilinear", seed: int = 0, **overrides):
    """The fork's ``LlavaQwenForCausalLM``, random weights (seeded; the tower's re-drawn too, so a converter
    cannot pass by reading the fixture tower instead of the checkpoint), float32, eval mode."""
    llava_qwen = import_fork()
    torch.manual_seed(seed)
    model = llava_qwen.LlavaQwenForCausalLM(fork_config(projector_type, pool_mode, **overrides))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.dim() == 1 and "norm" in name else 0.0  # norm weights near 1, the rest near 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + scale)
    return model.float().eval()


def save_fork_checkpoint(model, folder: Path) -> Path:
    """``save_pretrained`` as the fork's trainer saves: ``config.json`` (``model_type: llava_qwen``, the
    ``mm_*`` fields) and safetensors weights, the tower at ``model.vision_tower.vision_tower.*``."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


# -- the inputs ----------------------------------------------------------------------------------------


@dataclass
class ForkSample:
    """One single-sample batch as the fork's collator passes it, and what the converted model needs to know.

    images: the ``images`` list (one ``(n, C, H, W)`` tensor; a video is its ``(T, C, H, W)`` frames);
    modalities: ``"image"`` / ``"video"`` per entry; grid_thw: ``(n, 3)`` rows per frame;
    patch_positions: per-sample list of ``(1, M, 3)`` or None; ids_before / ids_after: text around the one
    placeholder (``has_placeholder=False``: a text-only sample, its image a dummy the fork still encodes).
    """

    name: str
    images: list[torch.Tensor]
    modalities: list[str]
    grid_thw: torch.Tensor
    ids_before: torch.Tensor
    ids_after: torch.Tensor
    patch_positions: list[torch.Tensor] | None = None
    has_placeholder: bool = True
    extra: dict = field(default_factory=dict)

    def fork_input_ids(self) -> torch.Tensor:
        """``(1, L)``: the text with the fork's one ``-200`` placeholder."""
        mid = torch.tensor([IMAGE_TOKEN_INDEX]) if self.has_placeholder else torch.tensor([], dtype=torch.long)
        return torch.cat([self.ids_before, mid, self.ids_after])[None]


def spread_positions(num_frames: int, total_frames: int, h: int, w: int) -> torch.Tensor:
    """``(1, num_frames·h·w, 3)`` ``(t, h, w)`` per patch, frames spread over ``total_frames`` (the fork's
    ``build_patch_positions``: 8 frames over a 64-frame context)."""
    t = torch.linspace(0, total_frames - 1, num_frames).long()
    grid = torch.stack(torch.meshgrid(t, torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    return grid.reshape(1, -1, 3)


def make_samples(seed: int = 0) -> list[ForkSample]:
    """Four single-sample batches: images of two sizes, an 8-frame clip over a 64-frame context, text only.

    The clip's frames are the tower's ``image_size`` (4x4 patches), as the fork's recipe processes them: its
    ``get_2dPool`` views every video item's features as a square of the tower's ``num_patches_per_side``
    (halved by our tower for ``spatial_merge``), a view that silently mixes features of frames of other sizes.
    """
    g = torch.Generator().manual_seed(seed)
    p, s, frames = 14, 4, 8  # the fixture tower: patch 14, image_size 56 (4 patches a side)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, TEXT_VOCAB, (n,), generator=g)

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def sample(name: str, images: torch.Tensor, modality: str, positions: torch.Tensor | None, **kw) -> ForkSample:
        n, _, H, W = images.shape
        grid = torch.tensor([[1, H // p, W // p]] * n)
        pos = None if positions is None else [positions]
        return ForkSample(name, [images], [modality], grid, text(5), text(4), patch_positions=pos, **kw)

    return [
        sample("image_56x56", pixels(1, 3, 4 * p, 4 * p), "image", spread_positions(1, 1, 4, 4)),
        sample("image_84x112", pixels(1, 3, 6 * p, 8 * p), "image", spread_positions(1, 1, 6, 8)),
        sample(
            f"video_8x{s * p}x{s * p}", pixels(frames, 3, s * p, s * p), "video", spread_positions(frames, 64, s, s)
        ),
        sample("text_only", pixels(1, 3, 4 * p, 4 * p), "image", None, has_placeholder=False),
    ]


def fork_logits(model, sample: ForkSample) -> torch.Tensor:
    """``(1, L', V)`` logits of the fork's own forward (``prepare_inputs_labels_for_multimodal``)."""
    with torch.no_grad():
        out = model(
            input_ids=sample.fork_input_ids(),
            images=sample.images,
            modalities=sample.modalities,
            grid_thw=sample.grid_thw,
            patch_positions=sample.patch_positions,
        )
    return out.logits


def fork_feature_count(model, sample: ForkSample) -> int:
    """How many embeddings the fork puts in place of the sample's placeholder (0 for text only)."""
    with torch.no_grad():
        _, _, _, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
            sample.fork_input_ids(), None, None, None, None, sample.images, sample.modalities,
            grid_thw=sample.grid_thw, patch_positions=sample.patch_positions,
        )  # fmt: skip
    return embeds.shape[1] - (sample.fork_input_ids().shape[1] - int(sample.has_placeholder))


def converted_inputs(model, sample: ForkSample) -> dict[str, torch.Tensor]:
    """The same sample for the converted model (LLAVA_SPEC): the placeholder expanded to one image/video token
    per feature, the pixels packed ``(T, C·p·p)`` with ``image_grid_thw`` per item and ``patch_positions``
    ``(T, 3)`` — the clip one item ``(8, h, w)``."""
    frames = sample.images[0]
    item = frames.transpose(0, 1) if sample.modalities[0] == "video" else frames[0]  # (C, T, H, W) / (C, H, W)
    pixel_values, grid = patchify_items([item], 14, 3)
    token = VIDEO_TOKEN_ID if sample.modalities[0] == "video" else IMAGE_TOKEN_ID
    run = torch.full((fork_feature_count(model, sample),), token) if sample.has_placeholder else torch.tensor([])
    ids = torch.cat([sample.ids_before, run.long(), sample.ids_after])[None]
    inputs = dict(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid)
    if sample.patch_positions is not None and sample.modalities[0] == "video":
        inputs["patch_positions"] = sample.patch_positions[0][0]  # (T, 3)
    return inputs


# -- a fork checkpoint as its users hold it: with its tokenizer (no <image> token) and native-resolution images ----

FORK_WORDS = ["<pad>", "<unk>", "<eos>", "user", "assistant", ":", "describe", "the", "image", "."]
# a chat template as the fork's Qwen checkpoints carry one: an image part is written "<image>" (what
# tokenizer_image_token splits the prompt on)
FORK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def fork_tokenizer():
    """A word-level tokenizer of :data:`TEXT_VOCAB` ids (the words above, then ``w0``, ``w1``, ...), pad/unk/eos
    0-2, no ``<image>`` / ``<video>`` token (as the fork's Qwen tokenizer), and a chat template."""
    words = FORK_WORDS + [f"w{i}" for i in range(TEXT_VOCAB - len(FORK_WORDS))]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens(FORK_WORDS[:3])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")  # fmt: skip
    tokenizer.chat_template = FORK_CHAT_TEMPLATE
    return tokenizer


def fork_native_pixels(model, image) -> tuple[torch.Tensor, torch.Tensor]:
    """The fork's own image path for ``image_aspect_ratio="native"`` (``mm_utils.process_images``, the tower's
    ``CLIPImageProcessor``): ``(1, C, H, W)`` pixels and ``grid_thw (1, 3)``."""
    import_fork()
    from llava.mm_utils import process_images  # the vendored fork (a test-only package on sys.path)

    out = process_images([image], CLIPImageProcessor.from_pretrained(TOWER_DIR), model.config)
    return out["image_patchs"][0], torch.tensor(out["grid_thw"])


def fork_prompt_ids(prompt: str, tokenizer) -> torch.Tensor:
    """``(1, L)`` ids of the fork's ``tokenizer_image_token``: the prompt split on ``<image>``, one -200 between."""
    import_fork()
    from llava.mm_utils import tokenizer_image_token  # the vendored fork (a test-only package on sys.path)

    return tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]


def unpatchify_image(pixel_values: torch.Tensor, grid_thw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """One image's packed patches ``(h·w, C·p·p)`` back to ``(1, C, H, W)`` (the inverse of ``patchify``)."""
    _, h, w = grid_thw.reshape(3).tolist()
    p = patch_size
    x = pixel_values.view(h, w, -1, p, p)  # (h, w, C, p, p)
    return x.permute(2, 0, 3, 1, 4).reshape(1, -1, h * p, w * p)  # (1, C, H, W)
