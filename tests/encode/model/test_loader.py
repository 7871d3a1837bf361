"""Loading the model and building the processor of a run, on their own: a model object reused with its weights,
the weights' identity, the processor the options ask for, the largest item."""

from __future__ import annotations

import pytest
import torch

from hevc_vit import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.encode.model.loader import build_processor, largest_item, load_model, weights_identity
from hevc_vit.processing.processors import FixedSizeProcessor, NativeResolutionProcessor
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def standard():
    torch.manual_seed(0)
    return HEVCViTModel(tiny_config()).eval()


def test_a_standard_model_object_is_reused_as_a_packing_model_with_its_weights(standard):
    packing, name, random_weights = load_model(standard, torch.device("cpu"), torch.float32)
    assert isinstance(packing, HEVCViTPackingModel) and not random_weights
    assert name == "<HEVCViTPackingModel object>"
    assert weights_identity(packing) == weights_identity(standard)  # the same names, dtypes, shapes and bytes
    with pytest.raises(ValueError, match="model is a Linear; expected an HEVCViTPackingModel or HEVCViTModel"):
        load_model(torch.nn.Linear(2, 2), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"model='no/such/thing' is neither a preset"):
        load_model("no/such/thing", torch.device("cpu"), torch.float32)


def test_weights_identity_sees_one_changed_value_and_the_dtype():
    model = torch.nn.Linear(3, 2)
    before = weights_identity(model)
    assert before.startswith("sha256:") and weights_identity(model) == before
    with torch.no_grad():
        model.weight[1, 2] += 1e-3
    assert weights_identity(model) != before
    assert weights_identity(model.half()) != weights_identity(model.float())


def test_build_processor_takes_bounds_and_refuses_a_mismatch():
    config = tiny_config()  # patch 14
    native = build_processor("native", config, min_image_tokens=4, max_image_tokens=32)
    assert isinstance(native, NativeResolutionProcessor) and native.patch_size == 14
    assert (native.min_tokens, native.max_tokens) == (4, 32)
    given = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48)
    assert build_processor(given, config) is given
    assert build_processor(given, config, max_image_tokens=16).max_tokens == 16
    with pytest.raises(ValueError, match="patch_size=16 differs from the model's patch_size=14"):
        build_processor(NativeResolutionProcessor(patch_size=16), config)
    clip = build_processor("clip", config)
    assert isinstance(clip, FixedSizeProcessor)
    with pytest.raises(ValueError, match=r"\['max_tokens'\] only apply to the native processor"):
        build_processor(clip, config, max_image_tokens=16)


def test_largest_item_is_an_image_or_a_clip_at_most():
    processor = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)
    assert largest_item(processor, frames=1, patch_size=14) == 48  # an image
    frames = processor.frames_that_fit(8)
    per_frame = processor.token_bounds(frames)[1]
    assert largest_item(processor, frames=8, patch_size=14) == max(48, frames * per_frame)
    assert frames * per_frame <= 96  # a clip fits max_video_tokens
