"""The towers called the way the current LLaVA-NeXT fork calls them.

``encode_images`` below does what the reference project's current LLaVA-NeXT fork (``llava_next/`` in
EvolvingLMMs-Lab/OneVision-Encoder, ``llava_arch.py``: ``encode_images`` and the image branch of
``prepare_inputs_labels_for_multimodal``; ``train.py``: ``build_patch_positions`` and the collator) does
with a tower: every sample's images concatenated on dim 0 (a list when sizes differ), ``grid_thw`` and the
per-sample ``patch_positions`` passed on every path, the result split back by frames per sample. Each call
form is checked on both towers against the standard model run directly the equivalent way.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hevc_vit import HEVCViTModel
from hevc_vit.llava.projector import build_projector
from hevc_vit.llava.towers import HEVCViTPackingVisionTower, HEVCViTVisionTower
from tests.helpers import FIXTURES, assert_close_rel

TOWER_DIR = FIXTURES / "llava_vit_packing_tiny"
TOWERS = (HEVCViTPackingVisionTower, HEVCViTVisionTower)
SELECT_LAYER = -2


def llava_args(**overrides) -> SimpleNamespace:
    values = dict(mm_vision_select_layer=SELECT_LAYER, mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu")
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def reference() -> HEVCViTModel:
    return HEVCViTModel.from_pretrained(TOWER_DIR)


@pytest.fixture(scope="module", params=TOWERS, ids=["packing", "standard"])
def tower(request):
    return request.param(TOWER_DIR, vision_tower_cfg=llava_args())


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def spread_positions(num_frames: int, total_frames: int, h: int, w: int) -> torch.Tensor:
    """``(1, num_frames·h·w, 3)`` int64 ``(t, h, w)`` per patch, the frames spread uniformly over
    ``total_frames`` (8 over 64: t = 0, 9, 18, ..., 63) — what the fork's ``build_patch_positions`` gives."""
    t = torch.linspace(0, total_frames - 1, num_frames).long()
    grid = torch.stack(torch.meshgrid(t, torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
    return grid.reshape(1, -1, 3)


def encode_images(tower, samples: list[torch.Tensor], grid_thw=None, patch_positions=None, spatial_merge=False):
    """The fork's client side: concatenate the samples' frames, call the tower, split per sample."""
    try:
        images = torch.cat(samples)
    except RuntimeError:  # sizes differ: the fork passes the list as it is
        images = samples
    if spatial_merge:
        features, h, w = tower(images, return_spatial_dims=True, patch_positions=patch_positions)
    else:
        features = tower(images, grid_thw=grid_thw, patch_positions=patch_positions)
    if isinstance(features, list):
        return features
    return list(torch.split(features, [s.shape[0] for s in samples]))


def reference_features(model: HEVCViTModel, pixel_values: torch.Tensor, positions=None) -> torch.Tensor:
    """``hidden_states[select_layer]`` of the standard model: ``(B, N, D)``."""
    with torch.no_grad():
        out = model(pixel_values, patch_positions=positions, output_hidden_states=True)
    return out.hidden_states[SELECT_LAYER]


def as_clip(frames: torch.Tensor) -> torch.Tensor:
    """``(T, C, H, W)`` frames -> ``(1, C, T, H, W)`` video."""
    return frames.transpose(0, 1).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# every call form of the current fork
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [None, [None]], ids=["None", "[None]"])
def test_single_images_without_positions(tower, reference, positions):
    samples = [pixels(1, 3, 28, 42, seed=i) for i in range(3)]
    grid = torch.tensor([[1, 2, 3]] * 3)
    with torch.no_grad():
        got = encode_images(tower, samples, grid_thw=grid, patch_positions=positions)
    expected = reference_features(reference, torch.cat(samples))
    assert_close_rel(torch.cat(got), expected, what="images")


def test_per_image_positions_from_the_collator(tower, reference):
    """One sample of three images (the collator builds positions for the first image only), then two
    one-image samples (one entry each): positions of ``h·w`` patches apply per image."""
    stack = pixels(3, 3, 28, 42, seed=1)
    expected = reference_features(reference, stack)
    with torch.no_grad():
        one_entry = encode_images(tower, [stack], patch_positions=[spread_positions(1, 1, 2, 3)])
        per_sample = encode_images(
            tower, [stack[:1], stack[1:2], stack[2:]], patch_positions=[spread_positions(1, 1, 2, 3)] * 3
        )
    assert_close_rel(one_entry[0], expected, what="one entry")
    assert_close_rel(torch.cat(per_sample), expected, what="per sample")


def test_eight_frames_over_a_64_frame_context_are_one_clip(tower, reference):
    frames = pixels(8, 3, 28, 28, seed=2)
    positions = spread_positions(8, 64, 2, 2)
    assert positions[0, ::4, 0].tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    with torch.no_grad():
        (got,) = encode_images(tower, [frames], grid_thw=torch.tensor([[1, 2, 2]] * 8), patch_positions=[positions])
    expected = reference_features(reference, as_clip(frames), positions).view(8, 4, -1)  # (T, h·w, D)
    assert got.shape == (8, 4, 64)
    assert_close_rel(got, expected, what="clip")
    # the check can fail: the same frames as eight separate images give other features
    separate = reference_features(reference, frames)
    assert (separate - expected).abs().max() > 1e-2


def test_a_batch_with_a_clip_sample_and_an_image_sample(tower, reference):
    clip, image = pixels(8, 3, 28, 28, seed=3), pixels(1, 3, 28, 28, seed=4)
    positions = [spread_positions(8, 64, 2, 2), spread_positions(1, 1, 2, 2)]
    with torch.no_grad():
        got_clip, got_image = encode_images(tower, [clip, image], patch_positions=positions)
    assert_close_rel(got_clip, reference_features(reference, as_clip(clip), positions[0]).view(8, 4, -1), what="clip")
    assert_close_rel(got_image, reference_features(reference, image), what="image")


@pytest.mark.parametrize("num_frames, clips", [(8, 1), (4, 2), (1, 8)])
def test_num_frames_groups_the_stack(tower, reference, num_frames, clips):
    frames = pixels(8, 3, 28, 42, seed=5)
    with torch.no_grad():
        got = tower(frames, num_frames=num_frames)
    parts = [reference_features(reference, as_clip(c)) for c in frames.split(num_frames)]  # positions 0..k-1
    expected = torch.cat(parts, dim=1).view(8, 6, -1)
    assert got.shape == (8, 6, 64) and len(parts) == clips
    assert_close_rel(got, expected, what=f"num_frames={num_frames}")


def test_grid_thw_rows_with_several_frames_group_the_stack(tower, reference):
    frames = pixels(8, 3, 28, 28, seed=6)
    with torch.no_grad():
        got = tower(frames, grid_thw=torch.tensor([[5, 2, 2], [3, 2, 2]]))
    expected = torch.cat(
        [reference_features(reference, as_clip(frames[:5])), reference_features(reference, as_clip(frames[5:]))], 1
    ).view(8, 4, -1)
    assert_close_rel(got, expected, what="grid_thw clips")


def test_eight_square_frames_are_images_unless_opted_in(reference):
    frames = pixels(8, 3, 28, 28, seed=7)
    as_images = reference_features(reference, frames)
    as_one_clip = reference_features(reference, as_clip(frames)).view(8, 4, -1)
    for cls in TOWERS:
        with torch.no_grad():
            default = cls(TOWER_DIR, llava_args())(frames)
            opted = cls(TOWER_DIR, llava_args(hevc_vit_stack_as_clip=8))
            assert_close_rel(default, as_images, what=f"{cls.__name__} default")
            assert_close_rel(opted(frames), as_one_clip, what=f"{cls.__name__} opt-in")
            # only a stack of exactly that many square frames
            assert_close_rel(opted(frames[:4]), as_images[:4], what=f"{cls.__name__} 4 frames")
            wide = pixels(8, 3, 28, 42, seed=8)
            assert_close_rel(opted(wide), reference_features(reference, wide), what=f"{cls.__name__} non-square")


def test_spatial_merge_call_form(tower, reference):
    frames = pixels(8, 3, 28, 28, seed=9)
    positions = [spread_positions(8, 64, 2, 2)]
    with torch.no_grad():
        features, h, w = tower(frames, return_spatial_dims=True, patch_positions=positions)
        assert (h, w) == (2, 2)
        projector = build_projector(
            SimpleNamespace(mm_projector_type="spatial_merge", mm_hidden_size=64, hidden_size=32)
        )
        tokens = projector(features, height=h, width=w)
    assert tokens.shape == (8, 1, 32)
    expected = reference_features(reference, as_clip(frames), positions[0]).view(8, 4, -1)
    assert_close_rel(features, expected, what="spatial_merge features")


def test_list_of_mixed_sizes_with_grid_and_positions(tower, reference):
    samples = [pixels(1, 3, 28, 42, seed=10), pixels(1, 3, 56, 28, seed=11), pixels(1, 3, 14, 14, seed=12)]
    grid = torch.tensor([[1, 2, 3], [1, 4, 2], [1, 1, 1]])
    positions = [spread_positions(1, 1, 2, 3), spread_positions(1, 1, 4, 2), spread_positions(1, 1, 1, 1)]
    with torch.no_grad():
        got = encode_images(tower, samples, grid_thw=grid, patch_positions=positions)
    assert [tuple(g.shape) for g in got] == [(1, 6, 64), (1, 8, 64), (1, 1, 64)]
    for i, (g, s) in enumerate(zip(got, samples)):
        assert_close_rel(g, reference_features(reference, s), what=f"element {i}")


def test_fork_constructor_keyword_and_builder_kwargs():
    tower = HEVCViTPackingVisionTower(str(TOWER_DIR), vision_tower_cfg=llava_args(), delay_load=True)
    assert not tower.is_loaded and tower.select_layer == SELECT_LAYER
    with pytest.raises(ValueError, match="pass the LLaVA config once"):
        HEVCViTPackingVisionTower(str(TOWER_DIR), llava_args(), vision_tower_cfg=llava_args())


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


STACK = pixels(3, 3, 28, 42, seed=13)  # 3 frames of 2x3 patches
BAD_CALLS = [
    (
        dict(patch_positions=[torch.zeros(1, 7, 3, dtype=torch.long)]),
        r"patch_positions cover \[7\] patches for images \(3, 3, 28, 42\) of 3 frames of 2x3 patches; expected one "
        r"entry of h·w = 6 .* or of B·h·w = 18",
    ),
    (
        dict(patch_positions=[torch.zeros(1, 6, 3, dtype=torch.long), torch.zeros(1, 6, 3, dtype=torch.long)]),
        r"patch_positions cover \[6, 6\] patches .* adding up to 18",
    ),
    (
        dict(patch_positions=[-torch.ones(1, 6, 3, dtype=torch.long)]),
        r"patch_positions\[0\] holds -1; expected non-negative",
    ),
    (dict(patch_positions=[torch.zeros(1, 6, 3)]), r"patch_positions\[0\] has dtype torch.float32; expected integer"),
    (
        dict(patch_positions=[torch.zeros(1, 6, 2, dtype=torch.long)]),
        r"patch_positions\[0\] has shape \(1, 6, 2\); expected \(1, M, 3\)",
    ),
    (
        dict(patch_positions=[None, torch.zeros(1, 6, 3, dtype=torch.long)]),
        r"patch_positions has None at \[0\] and tensors elsewhere",
    ),
    (
        dict(grid_thw=torch.tensor([[1, 3, 2]] * 3)),
        r"grid_thw \[\[1, 3, 2\], \[1, 3, 2\], \[1, 3, 2\]\] \(3 frames\) disagrees with the pixels: expected rows "
        r"\(t, h, w\) describing 3 frames: \[\[1, 2, 3\], \[1, 2, 3\], \[1, 2, 3\]\]",
    ),
    (dict(grid_thw=torch.tensor([[1, 2, 3]] * 2)), r"grid_thw .* \(2 frames\) disagrees with the pixels"),
    (dict(grid_thw=torch.tensor([[2, 2, 3], [1, 2, 3]]), num_frames=3), r"grid_thw .* disagrees"),
    (dict(num_frames=2), r"num_frames=2; images \(3, 3, 28, 42\) has 3 frames, expected a multiple of 2"),
    (dict(num_frames=0), r"num_frames=0; expected a positive int"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_calls_raise_value_error(tower, call, message):
    with pytest.raises(ValueError, match=message):
        tower(STACK, **call)
