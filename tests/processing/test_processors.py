"""Image processors: the fixed-size one against transformers' CLIPImageProcessor, the native-resolution one
against its stated properties (patch multiples, token bounds, aspect ratio), and both saved vs reloaded."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from hevc_vit.processing.files import load_processor, processor_from_dict
from hevc_vit.processing.processors import CLIP_MEAN, CLIP_STD, FixedSizeProcessor, NativeResolutionProcessor
from tests.helpers import FIXTURES


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random image (resampling differences show up on smooth content and on noise alike)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(-20, 21, size=(height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(image).astype(int) + noise, 0, 255).astype(np.uint8))
    return image.convert(mode)


def _clip_class():
    """transformers' PIL-based CLIPImageProcessor: ``CLIPImageProcessorPil`` in transformers 5 (where the
    plain name is the torchvision backend when torchvision is installed), ``CLIPImageProcessor`` before."""
    with warnings.catch_warnings():  # transformers 5 says once that it falls back to PIL without torchvision
        warnings.simplefilter("ignore")
        try:
            from transformers import CLIPImageProcessorPil as cls
        except ImportError:
            from transformers import CLIPImageProcessor as cls
    return cls


def _transformers_clip(**kwargs):
    return _clip_class()(**kwargs)


def _reference(processor, image: Image.Image) -> np.ndarray:
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize(
    "size, mode",
    [
        ((200, 130), "RGB"),
        ((97, 151), "RGB"),
        ((56, 56), "RGB"),
        ((30, 20), "RGB"),
        ((123, 77), "L"),
        ((64, 300), "RGB"),
    ],
)
def test_fixed_size_processor_matches_transformers_clip(size, mode):
    image = _photo(*size, mode=mode)
    ours = FixedSizeProcessor(shortest_edge=56, crop_size=56)(image).numpy()
    theirs = _reference(_transformers_clip(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}), image)
    assert ours.shape == theirs.shape == (3, 56, 56)
    assert np.abs(ours - theirs).max() <= 1e-6


def test_fixed_size_processor_pads_like_transformers_when_the_crop_is_larger():
    image = _photo(50, 35)
    ours = FixedSizeProcessor(shortest_edge=28, crop_size=(42, 56))(image).numpy()
    theirs = _reference(_transformers_clip(size={"shortest_edge": 28}, crop_size={"height": 42, "width": 56}), image)
    assert ours.shape == theirs.shape == (3, 42, 56)
    assert np.abs(ours - theirs).max() <= 1e-6


def test_fixture_preprocessor_config_loads_and_matches_transformers(tmp_path):
    folder = FIXTURES / "llava_vit_packing_tiny"
    ours = load_processor(folder)
    assert isinstance(ours, FixedSizeProcessor) and ours.crop_size == (56, 56) and ours.shortest_edge == 56
    theirs = _clip_class().from_pretrained(folder)
    image = _photo(90, 61, seed=3)
    assert np.abs(ours(image).numpy() - _reference(theirs, image)).max() <= 1e-6

    # what we save, transformers loads, and it processes the same way
    ours.save_pretrained(tmp_path)
    reloaded_theirs = _clip_class().from_pretrained(tmp_path)
    assert np.abs(ours(image).numpy() - _reference(reloaded_theirs, image)).max() <= 1e-6
    assert load_processor(tmp_path) == ours


def _aspect_within_one_patch(h: int, w: int, H: int, W: int, p: int) -> bool:
    """Is there one scale s with |h - s·H/p| <= 1 and |w - s·W/p| <= 1?"""
    lo = max((h - 1) * p / H, (w - 1) * p / W)
    hi = min((h + 1) * p / H, (w + 1) * p / W)
    return lo <= hi + 1e-12


SIZES = [
    (1, 1),
    (14, 14),
    (13, 15),
    (224, 224),
    (640, 480),
    (480, 640),
    (4000, 3000),
    (1920, 1080),
    (97, 1033),
    (33, 400),
    (3000, 20),
    (2, 5000),
    (5000, 2),
]
SIZES += [tuple(int(v) for v in np.random.default_rng(7).integers(1, 3000, size=2)) for _ in range(40)]


@pytest.mark.parametrize("bounds", [(256, 4096), (16, 64), (4, 4), (1, 10_000)])
def test_native_processor_sides_bounds_and_aspect(bounds):
    lo, hi = bounds
    p = 14
    proc = NativeResolutionProcessor(patch_size=p, min_tokens=lo, max_tokens=hi)
    for W, H in SIZES:
        h, w = proc.grid_size(H, W)
        out_h, out_w = proc.output_size(H, W)
        assert (out_h, out_w) == (h * p, w * p), (W, H)
        assert lo <= h * w <= hi, f"{W}x{H} -> {w}x{h} patches = {h * w}, bounds [{lo}, {hi}]"
        short_side_fits = min(H / p, W / p) * math.sqrt(hi / (H / p * W / p)) >= 1
        if short_side_fits:
            assert _aspect_within_one_patch(h, w, H, W, p), f"{W}x{H} -> {w}x{h} patches"


def test_native_processor_keeps_sizes_inside_the_bounds_and_rounds_to_patches():
    proc = NativeResolutionProcessor(patch_size=14, min_tokens=16, max_tokens=1024)
    assert proc.output_size(280, 420) == (280, 420)  # 20 x 30 patches: already fine
    assert proc.output_size(285, 410) == (280, 406)  # nearest multiples of 14
    image = proc(_photo(410, 285))
    assert tuple(image.shape) == (3, 280, 406)


def test_native_processor_video_frames_share_a_size_within_the_clip_budget():
    proc = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=400, max_video_tokens=256)
    frames = [_photo(300, 200, seed=i) for i in range(8)]
    clip = proc(frames)  # (C, T, H, W)
    assert clip.shape[:2] == (3, 8)
    h, w = clip.shape[2] // 14, clip.shape[3] // 14
    assert 8 * h * w <= 256 and h * w >= 4
    assert proc.token_bounds(8) == (4, 32)
    with pytest.raises(ValueError, match="frame 1 is 10x10"):
        proc([_photo(20, 10), _photo(10, 10)])


def test_processors_normalise_with_clip_mean_and_std():
    colour = (200, 100, 50)
    image = Image.new("RGB", (30, 44), colour)
    for proc in (NativeResolutionProcessor(patch_size=14, min_tokens=1, max_tokens=64), FixedSizeProcessor(28, 28)):
        x = proc(image)
        expected = [(c / 255 - m) / s for c, m, s in zip(colour, CLIP_MEAN, CLIP_STD)]
        for ch in range(3):
            assert abs(float(x[ch].mean()) - expected[ch]) < 1e-5
            assert float(x[ch].std()) < 1e-5


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    x = FixedSizeProcessor(28, 28, do_normalize=False)(image)
    assert float(x.min()) == 1.0


def test_native_processor_saved_and_reloaded(tmp_path):
    proc = NativeResolutionProcessor(
        patch_size=16, min_tokens=8, max_tokens=99, max_video_tokens=300, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    path = proc.save_pretrained(tmp_path)
    assert json.loads(path.read_text())["image_processor_type"] == "HEVCViTImageProcessor"  # transformers reads it too
    again = load_processor(tmp_path)
    assert again == proc and again.to_dict() == proc.to_dict()
    image = _photo(123, 45)
    assert (again(image) - proc(image)).abs().max() == 0


def test_processor_errors_name_the_value():
    with pytest.raises(ValueError, match="image_processor_type='Nope'"):
        processor_from_dict({"image_processor_type": "Nope"})
    with pytest.raises(ValueError, match="min_tokens=10 > max_tokens=5"):
        NativeResolutionProcessor(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="patch_size=0"):
        NativeResolutionProcessor(patch_size=0)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        load_processor("/nonexistent/folder")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_std", [0.5, float("nan"), 0.5], "image_std=.*finite"),
        ("image_std", [0.5, 0.0, 0.5], "image_std=.*positive"),
        ("image_mean", [float("inf"), 0.5, 0.5], "image_mean=.*finite"),
        ("image_mean", ["0.5", 0.5, 0.5], "image_mean=.*finite"),
        ("rescale_factor", float("nan"), "rescale_factor=nan"),
        ("rescale_factor", 0, "rescale_factor=0"),
        ("resample", 99, "resample=99.*BICUBIC"),
        ("do_normalize", "no", "do_normalize='no'"),
    ],
)
def test_processor_configs_with_non_finite_or_unknown_values_are_refused(tmp_path, field, value, message):
    """NaN in a preprocessor_config.json (Python's json reads NaN) would make every feature NaN."""
    config = {**NativeResolutionProcessor(patch_size=14).to_dict(), field: value}
    with pytest.raises(ValueError, match=message):
        processor_from_dict(config)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))  # writes NaN as the bare word NaN
    with pytest.raises(ValueError, match=message):
        load_processor(tmp_path)


def test_16_bit_images_are_scaled_to_8_bit_not_clipped(tmp_path):
    """A 16-bit PNG opens as mode I;16 (0..65535); PIL's convert("RGB") clips it at 255, which makes it white."""
    levels = np.linspace(0, 255, 28 * 28).astype(np.uint8).reshape(28, 28)
    Image.fromarray(levels.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 8-bit level v -> 16-bit v * 257
    with Image.open(tmp_path / "deep.png") as deep:
        assert deep.mode in ("I;16", "I")
        processor = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=4)
        got = processor(deep)
        assert np.array_equal(got.numpy(), processor(Image.fromarray(levels, mode="L")).numpy())
        got_i = processor(deep.convert("I"))  # the mode older Pillow versions give 16-bit PNGs
        assert np.array_equal(got_i.numpy(), got.numpy())
