"""Where this library meets transformers: the feature-extraction pipeline batched against single calls, one
processor file format read by transformers and by ``hevc-vit encode``, sizes refused up front, the seed's tower
helpers, ``flash_attention_2`` without flash-attn, and a quiet ``encode``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

from hevc_vit import HEVCViTConfig, HEVCViTImageProcessor, HEVCViTModel, HEVCViTPackingModel, attention, patchify
from hevc_vit.cli import main as cli_main
from hevc_vit.llava.towers import HEVCViTPackingVisionTower
from hevc_vit.processing.files import load_processor
from hevc_vit.processing.processors import FixedSizeProcessor, NativeResolutionProcessor
from tests.helpers import FIXTURES, assert_close_rel, cli_args, features_by_path, tiny_config, write_image

PACKING_DIR = FIXTURES / "llava_vit_packing_tiny"


# --------------------------------------------------------------------------------------------------
# the seed's tower helpers
# --------------------------------------------------------------------------------------------------


def test_seed_tower_helpers_equal_to_packing_input_and_patchify():
    from types import SimpleNamespace

    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = HEVCViTPackingVisionTower(str(PACKING_DIR), args)
    image = torch.randn(3, 28, 42)
    states, grid = tower._image_to_packing_input(image)  # (seq_len, patch_dim), (1, 3)
    expected, expected_grid = patchify(image[None], 14)
    assert states.shape == (2 * 3, 3 * 14 * 14) and torch.equal(states, expected)
    assert grid.tolist() == expected_grid.tolist() == [[1, 2, 3]]
    batch = torch.randn(3, 3, 42, 28)
    states, grid = tower._batch_images_to_packing_input(batch)  # (total_seq_len, patch_dim), (B, 3)
    patches, plan, _ = tower.to_packing_input(batch)
    assert torch.equal(states, patches) and torch.equal(states, patchify(batch, 14)[0])
    assert grid.tolist() == plan.grid_thw.tolist() == [[1, 3, 2]] * 3
    with pytest.raises(ValueError, match=r"image_tensor has shape \(1, 3, 28, 42\); expected one image"):
        tower._image_to_packing_input(image[None])
    with pytest.raises(ValueError, match=r"images has shape \(3, 28, 42\); expected a batch"):
        tower._batch_images_to_packing_input(image)


# --------------------------------------------------------------------------------------------------
# flash_attention_2 without the flash-attn package
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_flash_attn(monkeypatch):
    def missing():
        raise ImportError("No module named 'flash_attn'")

    monkeypatch.setattr(attention, "load_flash_attn_kernel", missing)
    attention.reset_backend_choice()
    yield
    attention.reset_backend_choice()


@pytest.mark.usefixtures("no_flash_attn", "quiet_transformers")
@pytest.mark.parametrize("folder", ["llava_vit_packing_tiny", "onevision_encoder_tiny", "saved"])
def test_flash_attention_2_without_flash_attn_raises_import_error_everywhere(folder, tmp_path):
    path = FIXTURES / folder if folder != "saved" else tmp_path
    if folder == "saved":
        HEVCViTModel(tiny_config()).save_pretrained(tmp_path)
    match = r"is not available: the flash-attn package is not installed"
    with pytest.raises(ImportError, match=match):
        AutoModel.from_pretrained(path, attn_implementation="flash_attention_2")
    for cls in (HEVCViTPackingModel, HEVCViTModel):
        with pytest.raises(ImportError, match=match):
            cls.from_pretrained(path, attn_implementation="flash_attention_2")
    config = AutoConfig.from_pretrained(path, attn_implementation="flash_attention_2")
    with pytest.raises(ImportError, match=match):
        AutoModel.from_pretrained(path, config=config)
    with pytest.raises(ImportError, match=match):
        AutoModel.from_config(config)
    model = AutoModel.from_pretrained(path)
    assert model.config.attention_backend == "auto"
    with pytest.raises(ImportError, match=match):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.usefixtures("no_flash_attn")
def test_flash_attention_2_in_config_kwargs_raises_import_error():
    with pytest.raises(ImportError, match=r"the flash-attn package is not installed"):
        HEVCViTPackingModel(tiny_config(attn_implementation="flash_attention_2"))


def test_auto_config_of_reference_folders_runs_our_config_init():
    """transformers 5 gives a config subclass without an __init__ a generated one: ours must run (it keeps the
    backend and checks the numbers)."""
    config = AutoConfig.from_pretrained(PACKING_DIR)
    assert config.attention_backend == "auto" and config.head_dim == 32
    with pytest.raises(ValueError, match=r"hidden_size=65 is not divisible by num_attention_heads=2"):
        type(config)(hidden_size=65, num_attention_heads=2)


# --------------------------------------------------------------------------------------------------
# a quiet encode
# --------------------------------------------------------------------------------------------------


def test_encode_quiet_prints_no_transformers_progress_bars(tmp_path, capfd):
    import transformers

    folder = tmp_path / "ckpt"
    HEVCViTPackingModel.from_pretrained(PACKING_DIR).save_pretrained(folder)
    write_image(tmp_path / "a.png", 60, 40, seed=1)
    capfd.readouterr()
    bars_before = transformers.utils.logging.is_progress_bar_enabled()
    assert cli_main(cli_args(tmp_path / "a.png", tmp_path / "out", folder)) == 0
    out, err = capfd.readouterr()
    assert "Loading weights" not in err and "it/s" not in err, err
    assert transformers.utils.logging.is_progress_bar_enabled() == bars_before  # put back as it was


# --------------------------------------------------------------------------------------------------
# the feature-extraction pipeline, batched against single calls
# --------------------------------------------------------------------------------------------------


def _pil_images() -> list[Image.Image]:
    """Six images: five sizes (so batches mix token counts) and one size twice (a batch of equal counts)."""
    rng = np.random.default_rng(5)
    sizes = [(60, 40), (100, 30), (56, 56), (41, 97), (56, 56), (200, 20)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A model folder of this library (model_type hevc_vit: AutoModel builds HEVCViTModel) with our processor."""
    folder = tmp_path_factory.mktemp("pipe")
    HEVCViTModel(tiny_config()).save_pretrained(folder)
    HEVCViTImageProcessor(min_tokens=4, max_tokens=64).save_pretrained(folder)
    return folder


def _as_tensor(feature) -> torch.Tensor:
    return feature if isinstance(feature, torch.Tensor) else torch.tensor(feature)


# every batch size, return_tensors and pool for the packing folder (slow: 16 batched runs); a few for either folder
# in the fast core (the same code path: "packing-few" is the fast sibling of "packing-all")
FEW_CASES = [(1, True, False), (3, False, False), (2, False, True), (8, True, True)]
PIPELINE_CASES = {
    "packing-all": [(b, t, p) for b in (1, 2, 3, 8) for t in (True, False) for p in (False, True)],
    "packing-few": FEW_CASES,
    "standard": FEW_CASES,
}


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize(
    "model_cls, cases",
    [
        pytest.param(HEVCViTPackingModel, "packing-all", marks=pytest.mark.slow, id="HEVCViTPackingModel-all"),
        pytest.param(HEVCViTPackingModel, "packing-few", id="HEVCViTPackingModel"),
        pytest.param(HEVCViTModel, "standard", id="HEVCViTModel"),
    ],
)
def test_pipeline_batches_equal_single_calls(pipeline_folder, tmp_path, model_cls, cases):
    """Every batch size gives each image what one call per image gives, and that is the model on that image alone
    (packed with others vs alone: the same operations per image; the matmuls' row counts differ, so float32
    rounding may too — the tolerance table's float32 entry)."""
    folder = pipeline_folder
    if model_cls is HEVCViTPackingModel:  # a packing folder (model_type llava_vit_packing): AutoModel's packing model
        folder = tmp_path / "packing"
        shutil.copytree(PACKING_DIR, folder)
        HEVCViTImageProcessor.from_pretrained(pipeline_folder).save_pretrained(folder)
    images = _pil_images()
    extractor = pipeline("image-feature-extraction", model=str(folder))
    assert isinstance(extractor.model, model_cls)
    processor, model = extractor.image_processor, extractor.model
    for pool in (False, True):
        alone = []
        for image in images:
            with torch.no_grad():
                out = model(**processor(image))
            alone.append(out.pooler_output if pool else out.last_hidden_state)  # (1, D) / (1, N, D)
        single = [_as_tensor(extractor(image, return_tensors=True, pool=pool)) for image in images]
        for i, (got, want) in enumerate(zip(single, alone)):
            assert got.shape == want.shape, (i, got.shape, want.shape)
            assert_close_rel(got, want, what=f"single call, image {i}")
        for batch_size, return_tensors, _ in [case for case in PIPELINE_CASES[cases] if case[2] == pool]:
            batched = extractor(images, batch_size=batch_size, return_tensors=return_tensors, pool=pool)
            assert len(batched) == len(images)
            for i, (got, want) in enumerate(zip(batched, single)):
                assert isinstance(got, torch.Tensor) == return_tensors
                got = _as_tensor(got).to(want.dtype)
                what = f"batch_size={batch_size} return_tensors={return_tensors} pool={pool} image {i}"
                assert got.shape == want.shape, (what, got.shape, want.shape)
                assert_close_rel(got, want, what=what)


def test_processor_inputs_give_per_image_outputs_and_packed_names_stay_packed(pipeline_folder):
    model = HEVCViTPackingModel.from_pretrained(pipeline_folder)
    processor = HEVCViTImageProcessor.from_pretrained(pipeline_folder)
    images = _pil_images()
    inputs = processor(images)
    with torch.no_grad():
        per_image = model(**inputs, output_hidden_states=True)
        packed = model(inputs["pixel_values"], inputs["image_grid_thw"], output_hidden_states=True)
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    for got, want in zip(per_image.last_hidden_state.unbind(), packed.last_hidden_state.split(sizes)):
        assert torch.equal(got, want)  # one forward: the same tensor, only split
    for layer, layer_packed in zip(per_image.hidden_states, packed.hidden_states):
        assert [t.shape[0] for t in layer.unbind()] == sizes
        assert torch.equal(torch.cat(layer.unbind()), layer_packed)
    same = processor([images[2], images[4]])  # equal token counts: a dense (n, N, D) batch
    with torch.no_grad():
        dense = model(**same).last_hidden_state
    assert not dense.is_nested and dense.shape == (2, sizes[2], 64)


# --------------------------------------------------------------------------------------------------
# one processor file, read by transformers and by hevc-vit encode
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encode_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc_images")
    return [write_image(root / f"{i}.png", w, h, seed=i) for i, (w, h) in enumerate([(70, 42), (100, 30), (56, 56)])]


def _encode(images, out, folder, *extra, native: bool = True) -> dict[str, torch.Tensor]:
    args = cli_args(images, out, folder, *extra)
    if not native:  # no token bounds (cli_args gives them): they apply to the native processor only
        args = ["encode", *map(str, images), "--out", str(out), "--model", str(folder), "--workers", "0", "-q", *extra]
    assert cli_main(args) == 0
    return {path: tensors["patches"].float() for path, tensors in features_by_path(out).items()}


def _pipeline_features(folder, images) -> dict[str, torch.Tensor]:
    extractor = pipeline("image-feature-extraction", model=str(folder))
    features = extractor([Image.open(path) for path in images], batch_size=2, return_tensors=True)
    return {str(path): feature[0] for path, feature in zip(images, features)}  # (N, D) each


def _assert_same_features(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two routes to the same features: the same pixels (8-bit, the same resize) through the same weights, one
    packed with other images and one alone — float32 rounding apart (the tolerance table)."""
    assert a.keys() == b.keys()
    for path in a:
        assert_close_rel(a[path], b[path], what=path)


def _weights_folder(path, processor=None):
    shutil.copytree(PACKING_DIR, path)
    (path / "preprocessor_config.json").unlink()
    if processor is not None:
        processor.save_pretrained(path)
    return path


@pytest.mark.usefixtures("quiet_transformers")
def test_folder_saved_by_hevc_vit_image_processor_encodes_like_the_default(tmp_path, encode_images):
    bare = _weights_folder(tmp_path / "bare")
    saved = _weights_folder(tmp_path / "saved", HEVCViTImageProcessor(min_tokens=4, max_tokens=48))
    default = _encode(encode_images, tmp_path / "a", bare)
    with_file = _encode(encode_images, tmp_path / "b", saved)
    assert default.keys() == with_file.keys()
    assert all(torch.equal(default[k], with_file[k]) for k in default)  # same settings, same run
    # settings in the file are used: other normalisation, read by encode as by the pipeline
    custom = HEVCViTImageProcessor(min_tokens=4, max_tokens=48, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    other = _weights_folder(tmp_path / "other", custom)
    encoded = _encode(encode_images, tmp_path / "c", other)
    _assert_same_features(encoded, _pipeline_features(other, encode_images))
    assert not torch.allclose(encoded[str(encode_images[0])], default[str(encode_images[0])])


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize("type_name", ["HEVCViTImageProcessor", "HEVCViTNativeImageProcessor"])
def test_folder_saved_by_encodes_processor_opens_with_auto_image_processor_and_pipeline(
    tmp_path, encode_images, type_name
):
    """encode's native processor saves the transformers format; round 2's type name still opens with both."""
    native = NativeResolutionProcessor(min_tokens=4, max_tokens=48, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    folder = _weights_folder(tmp_path / "m", native)
    file = folder / "preprocessor_config.json"
    config = json.loads(file.read_text())
    assert config["image_processor_type"] == "HEVCViTImageProcessor"
    file.write_text(json.dumps({**config, "image_processor_type": type_name}))
    loaded = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(loaded, HEVCViTImageProcessor) and loaded.native_processor() == native
    assert load_processor(folder) == native
    _assert_same_features(_encode(encode_images, tmp_path / "out", folder), _pipeline_features(folder, encode_images))
    loaded.save_pretrained(tmp_path / "again")  # saved again: the one type name
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())["image_processor_type"] == (
        "HEVCViTImageProcessor"
    )


@pytest.mark.usefixtures("quiet_transformers")
@pytest.mark.parametrize("to", ["packing", "standard"])
def test_convert_output_and_fixture_processor_read_by_both(tmp_path, encode_images, to):
    """A CLIP-style preprocessor_config.json (the fixture's; what convert writes): transformers' CLIPImageProcessor
    and encode's fixed-size processor read it, and the pipeline and ``encode --processor clip`` agree."""
    from hevc_vit.convert import convert_checkpoint

    # the fixture's own folder is the same check in either case: once, with "packing"
    for folder in (PACKING_DIR, tmp_path / "converted") if to == "packing" else (tmp_path / "converted",):
        if folder != PACKING_DIR:
            convert_checkpoint(PACKING_DIR, folder, to=to, log=lambda message: None)
        assert type(AutoImageProcessor.from_pretrained(folder)).__name__.startswith("CLIPImageProcessor")
        assert isinstance(load_processor(folder), FixedSizeProcessor)
        encoded = _encode(encode_images, tmp_path / f"out_{folder.name}", folder, "--processor", "clip", native=False)
        _assert_same_features(encoded, _pipeline_features(folder, encode_images))


# --------------------------------------------------------------------------------------------------
# runaway sizes refused up front
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(min_tokens=10**9, max_tokens=10**9),
            r"min_tokens=1000000000; expected a positive integer in \[1, 65,536\]",
        ),
        (dict(min_tokens=4, max_tokens=2 * 10**6), r"max_tokens=2000000; expected a positive integer in \[1, 65,536\]"),
        (dict(max_video_tokens=10**7), r"max_video_tokens=10000000; expected a positive integer in \[1, 1,048,576\]"),
        (dict(patch_size=10**5), r"patch_size=100000; expected a positive integer in \[1, 1,024\]"),
        (dict(patch_size=512, max_tokens=4096), r"max_tokens=4096 with patch_size=512; expected max_tokens <= 512"),
        (dict(max_tokens=64.0), r"max_tokens=64.0; expected a positive integer"),
        (dict(max_tokens=True), r"max_tokens=True; expected a positive integer"),
        (dict(min_tokens="4"), r"min_tokens='4'; expected a positive integer"),
        (dict(min_tokens=-1), r"min_tokens=-1; expected a positive integer"),
    ],
)
def test_native_processors_refuse_runaway_sizes_at_construction(kwargs, message):
    for make in (NativeResolutionProcessor, HEVCViTImageProcessor):
        with pytest.raises(ValueError, match=message):
            make(**kwargs)


def test_native_processor_sizes_from_numpy_are_plain_ints():
    processor = NativeResolutionProcessor(min_tokens=np.int64(4), max_tokens=np.int32(48))
    assert type(processor.max_tokens) is int and json.dumps(processor.to_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shortest_edge=10**9), r"shortest_edge=1000000000; expected integers in \[1, 16,384\]"),
        (
            dict(shortest_edge=56, crop_size=(10**6, 56)),
            r"crop_size=\(1000000, 56\); expected integers in \[1, 16,384\]",
        ),
        (dict(shortest_edge=56, crop_size=(16384, 16384)), r"crop_size=\(16384, 16384\) holds 268,435,456 pixels"),
        (dict(shortest_edge=56, crop_size=()), r"crop_size=\(\); expected integers"),
        (dict(shortest_edge=True), r"shortest_edge=True; expected integers"),
    ],
)
def test_fixed_size_processor_refuses_runaway_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FixedSizeProcessor(**kwargs)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(mm_hidden_size=10**9, hidden_size=64),
            r"mm_hidden_size=1000000000; the linear projector needs an int in",
        ),
        (dict(mm_projector_type="mlp2x_gelu", mm_hidden_size=64, hidden_size=10**6), r"hidden_size=1000000; the mlp2x"),
        (dict(mm_projector_type="mlp100000x_gelu", mm_hidden_size=64, hidden_size=64), r"k in \[1, 64\]"),
        (
            dict(mm_projector_type="spatial_merge", mm_hidden_size=65536, hidden_size=64),
            r"expected at most 1,000,000,000",
        ),
        (
            dict(mm_projector_type="mlp64x_gelu", mm_hidden_size=64, hidden_size=65536),
            r"expected at most 1,000,000,000",
        ),
        (dict(mm_hidden_size=64.0, hidden_size=64), r"mm_hidden_size=64.0; the linear projector needs an int"),
    ],
)
def test_projector_builder_refuses_runaway_sizes(config, message):
    from hevc_vit.llava.projector import build_projector

    with pytest.raises(ValueError, match=message):
        build_projector(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=10**9), r"hidden_size=1000000000; expected a positive integer \(at most 65,536\)"),
        (dict(patch_size=10**6), r"patch_size=1000000; expected a positive integer \(at most 1,024\)"),
        (dict(num_hidden_layers=10**5), r"num_hidden_layers=100000; expected a positive integer"),
    ],
)
def test_tower_configs_refuse_runaway_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        HEVCViTConfig(**{**dict(hidden_size=64, num_attention_heads=2, intermediate_size=128), **overrides})


@pytest.mark.usefixtures("quiet_transformers")
def test_resume_of_a_run_recorded_with_the_old_processor_type_name(tmp_path, encode_images):
    folder = _weights_folder(tmp_path / "m")
    first = _encode(encode_images[:2], tmp_path / "out", folder)
    config_file = tmp_path / "out" / "encode_config.json"
    settings = json.loads(config_file.read_text())
    assert settings["processor"]["image_processor_type"] == "HEVCViTImageProcessor"
    settings["processor"]["image_processor_type"] = "HEVCViTNativeImageProcessor"  # as round 2 recorded it
    config_file.write_text(json.dumps(settings))
    resumed = _encode(encode_images, tmp_path / "out", folder, "--resume")
    assert all(torch.equal(resumed[k], first[k]) for k in first) and len(resumed) == 3
