"""The loader's fast paths against their specifications: patches straight from the processor against patchify of
its float image, the table lookup against the float64 arithmetic, the new loader against the old one, and the
JPEG draft decode against the full decode (within the bound measured by ``hevc-vit bench --pipeline``). Speed
is measured by that benchmark, never here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit.bench.pipeline import (
    PipelineSetup,
    draft_deviation,
    format_pipeline_report,
    load_baseline,
    make_synthetic_set,
    run_pipeline_benchmark,
)
from hevc_vit.cli import build_parser
from hevc_vit.encode import encode
from hevc_vit.encode.decode.item import LoadedItem, LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.encode.model.forward import model_input
from hevc_vit.packing import patchify
from hevc_vit.processing.pixels import Normalizer, normalize_patches, normalize_reference
from hevc_vit.processing.processors import CLIP_MEAN, CLIP_STD, FixedSizeProcessor, NativeResolutionProcessor

# The draft decode's deviation from a full decode, measured: on bench --pipeline's synthetic set (textured JPEGs of
# 256..4000 px, 8 changed) |8-bit difference| mean 1.8, p99 7, max 21, feature cosine min 0.987, mean 0.9983
# (small preset, random weights); on this file's three images mean 1.0, p99 3, max 9, cosine min 0.9994, mean
# 0.9998 (the tiny fixture). The bounds are the larger measurement with room.
DRAFT_BOUND = {"mean": 2.5, "p99": 10, "max": 40, "cos_mean": 0.995, "cos_min": 0.95}


def _textured(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
    x = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    return Image.fromarray(np.clip(x + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, path=None):
    target = path or io.BytesIO()
    image.save(target, "JPEG", quality=90)
    return path or Image.open(target)


PROCESSORS = {
    "native": NativeResolutionProcessor(patch_size=14, min_tokens=16, max_tokens=64),
    "native_p16": NativeResolutionProcessor(patch_size=16, min_tokens=4, max_tokens=48),
    "native_odd_p": NativeResolutionProcessor(patch_size=7, min_tokens=16, max_tokens=64),
    "clip": FixedSizeProcessor(shortest_edge=56, crop_size=56),
    "clip_pads": FixedSizeProcessor(shortest_edge=40, crop_size=56, do_resize=False),
}


@pytest.mark.parametrize("name", PROCESSORS)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "P", "CMYK"])
def test_patches_from_the_processor_equal_patchify_of_its_image(name, mode):
    processor = PROCESSORS[name]
    p = getattr(processor, "patch_size", 14)
    image = _textured(90, 61, seed=3).convert(mode if mode != "I;16" else "L")
    image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257) if mode == "I;16" else image  # 16-bit
    patches, grid = processor.patchify(image, p)
    expected, expected_grid = patchify(processor(image)[None], p)
    assert patches.dtype == torch.float32 and torch.equal(patches, expected)
    assert tuple(expected_grid[0].tolist()) == grid
    frames = [_textured(90, 61, seed=s) for s in range(3)]  # a clip: frames in order, one size
    patches, grid = processor.patchify(frames, p)
    assert torch.equal(patches, patchify(processor(frames)[None], p)[0]) and grid[0] == 3


@pytest.mark.parametrize("channels, convert", [(3, True), (1, False)])
def test_patches_of_samples_that_are_not_8_bit(channels, convert):
    """Mode F (32-bit floats in [0, 1]; scaled to 8 bits by to_8bit), with and without RGB conversion: patchify
    gives the patches of the processed image."""
    processor = NativeResolutionProcessor(
        patch_size=14, min_tokens=4, max_tokens=16, image_mean=[0.5] * channels, image_std=[0.25] * channels,
        do_convert_rgb=convert,
    )  # fmt: skip
    image = Image.fromarray(np.random.default_rng(0).random((42, 56), dtype=np.float32))  # mode F
    patches, _ = processor.patchify(image, 14)
    assert torch.equal(patches, patchify(processor(image)[None], 14)[0])


def test_table_lookup_reproduces_the_float64_arithmetic_bit_for_bit():
    frames = np.random.default_rng(0).integers(0, 256, (2, 28, 42, 3), dtype=np.uint8)
    frames.reshape(-1, 3)[:256] = np.arange(256)[:, None]  # every value in every channel
    for rescale in (1 / 255, 0.00392156862745098, 1 / 256):
        settings = (list(CLIP_MEAN), list(CLIP_STD), rescale, True, True)
        normalizer, expected = Normalizer(*settings), normalize_reference(frames, *settings)
        assert np.array_equal(normalizer(frames), expected)
        for p in (14, 7):  # two samples per lookup (even p), one (odd p)
            reference = patchify(torch.from_numpy(expected).permute(3, 0, 1, 2)[None], p)[0]  # (1, C, T, H, W) in
            assert np.array_equal(normalizer.patches(frames, p), reference.numpy())


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize(
    "rescale, do_rescale, do_normalize",
    [(1 / 255, True, True), (1 / 256, True, True), (1 / 255, False, True), (1 / 255, True, False)],
)
def test_normalising_8_bit_patches_where_they_are_used_equals_the_float64_arithmetic(
    channels, rescale, do_rescale, do_normalize
):
    """The loader's uint8 patches, normalised by torch (as on the model's device), against the specification: every
    value of every channel, bit for bit, and the same layout as the float patches."""
    frames = np.random.default_rng(1).integers(0, 256, (2, 448, 434, channels), dtype=np.uint8)  # CPU: in chunks
    frames.reshape(-1, channels)[:256] = np.arange(256)[:, None]
    settings = ([0.48, 0.46, 0.41][:channels], [0.27, 0.26, 0.28][:channels], rescale, do_rescale, do_normalize)
    normalizer = Normalizer(*settings)
    for p in (14, 7):
        samples = normalizer.patches(frames, p, normalize=False)
        assert samples.dtype == np.uint8 and samples.shape == (2 * (448 // p) * (434 // p), channels * p * p)
        expected = normalizer.patches(frames, p)  # the table lookup, itself tested against the float64 arithmetic
        assert torch.equal(normalize_patches(torch.from_numpy(samples), *settings), torch.from_numpy(expected))
    for device in ("cpu", "meta"):  # no rows: one empty chunk, also where chunks are the whole tensor
        empty = normalize_patches(torch.zeros(0, channels * 49, dtype=torch.uint8, device=device), *settings)
        assert empty.shape == (0, channels * 49) and empty.dtype == torch.float32


def test_patches_for_the_model_equal_the_float_patches_in_any_mix(tmp_path):
    """A forward's input from 8-bit items (normalised after the move) equals the concatenated float patches, also
    when one item carries float patches (a codec-sparse clip does) or another normalisation."""
    processor = PROCESSORS["native"]
    paths = [_jpeg(_textured(w, h, i), tmp_path / f"{i}.jpg") for i, (w, h) in enumerate([(200, 150), (90, 120)])]
    items = [load_item(i, str(path), LoadOptions(processor, 14)) for i, path in enumerate(paths)]
    expected = torch.cat([processor.patchify(Image.open(path), 14, draft=True)[0] for path in paths])
    assert all(it.patches.dtype == torch.uint8 for it in items)
    assert torch.equal(model_input(items, torch.device("cpu"), torch.float32), expected)
    float_item = LoadedItem(2, "x", "video", items[1].float_patches(), items[1].grid_thw, items[1].positions)
    assert torch.equal(model_input([items[0], float_item], torch.device("cpu"), torch.float32), expected)
    other = ([0.5] * 3, [0.5] * 3, 1 / 255, True, True)
    shifted = LoadedItem(3, "y", "image", items[1].patches, items[1].grid_thw, items[1].positions, normalization=other)
    assert not torch.equal(shifted.float_patches(), items[1].float_patches())
    mixed = model_input([items[0], shifted], torch.device("cpu"), torch.bfloat16)
    assert torch.equal(mixed, torch.cat([items[0].float_patches(), shifted.float_patches()]).bfloat16())


def test_new_loader_equals_the_old_one_on_full_decodes(tmp_path):
    processor = PROCESSORS["native"]
    for i, (w, h) in enumerate([(400, 300), (64, 90), (1000, 500)]):
        _jpeg(_textured(w, h, i), tmp_path / f"{i}.jpg")
    _textured(300, 200, 9).save(tmp_path / "png.png")
    options = LoadOptions(processor, 14, jpeg_draft=False)
    for path in sorted(tmp_path.iterdir()):
        new, old = load_item(0, str(path), options), load_baseline(0, path, options)
        assert new.patches.dtype == torch.uint8 and new.normalization == processor.normalization
        assert torch.equal(new.float_patches(), old.patches) and new.grid_thw == old.grid_thw
        assert torch.equal(new.positions, old.positions)


def test_draft_decode_applies_to_large_jpegs_only(tmp_path):
    processor = PROCESSORS["native"]  # at most 64 patches of 14: a target of about 112 x 112
    large, small = _textured(600, 450, 1), _textured(150, 110, 2)
    cases = {"large.jpg": (_jpeg, large), "small.jpg": (_jpeg, small), "large.png": (Image.Image.save, large)}
    for name, (save, image) in cases.items():
        save(image, tmp_path / name)
    items = {
        (name, draft): load_item(0, str(tmp_path / name), LoadOptions(processor, 14, jpeg_draft=draft))
        for name in cases
        for draft in (False, True)
    }
    for name in cases:
        full, drafted = items[name, False], items[name, True]
        assert drafted.info["size"] == full.info["size"] == list(cases[name][1].size)  # the stored size
        assert drafted.grid_thw == full.grid_thw
        assert torch.equal(drafted.float_patches(), full.float_patches()) == (name != "large.jpg")
    opened = Image.open(tmp_path / "large.jpg")
    processor.pixels(opened, processor.output_size(450, 600), draft=True)
    assert opened.size == (150, 113)  # decoded at 1/4 scale: the smallest at least the 112 x 84 target


def test_draft_decode_stays_within_the_measured_bound(tmp_path, model):
    paths = [_jpeg(_textured(w, h, i), tmp_path / f"{i}.jpg") for i, (w, h) in enumerate([(600, 450), (500, 700)])]
    paths.append(_jpeg(_textured(1000, 1000, 5), tmp_path / "big.jpg"))
    processor = NativeResolutionProcessor(patch_size=14, min_tokens=16, max_tokens=256)
    report = draft_deviation(paths, LoadOptions(processor, 14), model)
    assert report["images_changed"] == 3
    levels, cosine = report["draft"]["pixel_levels"], report["draft"]["feature_cosine"]
    assert levels["mean"] <= DRAFT_BOUND["mean"] and levels["p99"] <= DRAFT_BOUND["p99"]
    assert levels["max"] <= DRAFT_BOUND["max"]
    assert cosine["mean"] >= DRAFT_BOUND["cos_mean"] and cosine["min"] >= DRAFT_BOUND["cos_min"]
    assert report["resaved_q95"]["feature_cosine"]["tokens"] == cosine["tokens"]  # the scale, on the same tokens


def test_encode_records_jpeg_draft_and_resume_refuses_a_change(tmp_path, model):
    _jpeg(_textured(400, 300, 0), tmp_path / "a.jpg")
    options = dict(model=model, workers=0, min_image_tokens=4, max_image_tokens=16, progress=False, log=lambda s: None)
    encode([tmp_path / "a.jpg"], tmp_path / "out", **options)
    assert json.loads((tmp_path / "out" / "encode_config.json").read_text())["jpeg_draft"] is True
    with pytest.raises(ValueError, match="jpeg_draft: earlier True, now False"):
        encode([tmp_path / "a.jpg"], tmp_path / "out", resume=True, jpeg_draft=False, **options)
    args = build_parser().parse_args(["encode", "x", "--jpeg-draft", "off"])
    assert args.jpeg_draft is False


def test_resume_of_a_folder_made_before_jpeg_draft_compares_with_full_decoding(tmp_path, model):
    """A folder whose encode_config.json predates the option was decoded in full: resuming it with the draft
    (today's default) would mix two decodings, so it is refused; with jpeg_draft off it resumes."""
    _jpeg(_textured(400, 300, 0), tmp_path / "a.jpg")
    _jpeg(_textured(300, 200, 1), tmp_path / "b.jpg")
    options = dict(model=model, workers=0, min_image_tokens=4, max_image_tokens=16, progress=False, log=lambda s: None)
    out = tmp_path / "out"
    encode([tmp_path / "a.jpg"], out, jpeg_draft=False, **options)
    config = json.loads((out / "encode_config.json").read_text())
    del config["jpeg_draft"]  # as an earlier release wrote it
    (out / "encode_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="jpeg_draft: earlier False, now True"):
        encode([tmp_path / "a.jpg", tmp_path / "b.jpg"], out, resume=True, **options)
    result = encode([tmp_path / "a.jpg", tmp_path / "b.jpg"], out, resume=True, jpeg_draft=False, **options)
    assert (result.skipped, result.encoded) == (1, 1)


@pytest.mark.video  # decodes a clip with PyAV
def test_pipeline_benchmark_report_is_consistent(tmp_path):
    pytest.importorskip("av")
    small = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128)
    paths = make_synthetic_set(tmp_path / "set", images=3, clips=1)
    assert [p.suffix for p in paths] == [".jpg"] * 3 + [".mp4"]
    assert [p.read_bytes() for p in make_synthetic_set(tmp_path / "again", images=3, clips=0)] == [
        p.read_bytes() for p in paths[:3]
    ]  # deterministic
    setup = PipelineSetup(str(tmp_path / "set"), iters=1, config_overrides=small)
    report = run_pipeline_benchmark(setup)
    tokens = {
        kind: sum(f["tokens"] for f in report["files"] if kind in ("all", f["kind"]))
        for kind in ("image", "video", "all")
    }
    for name, rows in report["variants"].items():
        for kind, r in rows.items():
            assert r["tokens_per_s"] == pytest.approx(tokens[kind] / r["seconds"])
            if name == "baseline":
                assert r["speedup_vs_baseline"] == pytest.approx(1.0)
    assert report["draft_deviation"]["images_changed"] >= 1  # the 4000 px image at least
    text = format_pipeline_report(report)
    assert "| draft | all |" in text and "saved again as JPEG q95" in text
    args = build_parser().parse_args(["bench", "--pipeline"])
    assert args.pipeline == "" and build_parser().parse_args(["bench", "--pipeline", "dir"]).pipeline == "dir"
