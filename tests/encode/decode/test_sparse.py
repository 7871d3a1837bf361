"""``hevc-vit encode --codec-sparse``: a clip's changing patches only, at their true positions — the stored
features equal the standard model run on the dense clip with the same ``visible_indices``; the index row and
the shard say what was kept; ``--resume`` refuses other codec settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.cli import main
from hevc_vit.codec import CodecSparseConfig, select_patches
from hevc_vit.codec.decode import sampled_frames
from hevc_vit.encode import encode, iter_features, read_index
from hevc_vit.media.video import temporal_positions, video_patch_positions
from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import assert_close_rel, tiny_config
from tests.helpers.codec_clips import write_moving_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")
pytestmark = pytest.mark.video

PROCESSOR = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=64, max_video_tokens=256)
OPTIONS = dict(processor=PROCESSOR, workers=0, progress=False, log=lambda message: None, device="cpu")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    standard = HEVCViTModel(tiny_config()).eval()
    packing = HEVCViTPackingModel(standard.config).eval()
    packing.load_state_dict(standard.state_dict())
    return standard, packing


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("codec_data")
    write_moving_clip(root / "clip.mp4", frames=16, size=112)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(root / "a.png")
    return root


def _expected(standard, clip: Path, frames: int, budget: float, context: int | None):
    """The standard model on the dense clip, processed independently, with the selection's visible indices."""
    with av.open(str(clip)) as container:
        s = container.streams.video[0].codec_context
        width, height = s.width, s.height
    size = PROCESSOR.output_size(height, width, num_frames=max(1, round(budget * frames)))
    selection = select_patches(clip, 14, CodecSparseConfig(frames=frames, budget=budget, size=tuple(size)))
    rgb = {t: f.to_ndarray(format="rgb24") for t, f in sampled_frames(str(clip), selection.frame_ids.numpy(), "AUTO")}
    video = torch.stack([PROCESSOR.process(Image.fromarray(rgb[t]), tuple(size)) for t in sorted(rgb)], dim=1)
    t_positions = temporal_positions(selection.grid_thw[0], context)
    dense_positions = video_patch_positions(selection.grid_thw, t_positions)[None]
    with torch.no_grad():
        out = standard(video[None], visible_indices=selection.indices[None], patch_positions=dense_positions)
    return selection, out


@pytest.mark.parametrize("context", [None, 64])
def test_codec_sparse_features_equal_the_standard_model_with_visible_indices(models, data, tmp_path, context):
    standard, packing = models
    out = tmp_path / "out"
    result = encode(
        [data / "clip.mp4", data / "a.png"], out, model=packing, codec_sparse=True, frames=12, codec_budget=0.25,
        temporal_context=context, pool="head", **OPTIONS,
    )  # fmt: skip
    assert result.failed == 0
    selection, expected = _expected(standard, data / "clip.mp4", 12, 0.25, context)
    rows = {Path(row["path"]).name: (row, tensors) for row, tensors in iter_features(out)}
    row, tensors = rows["clip.mp4"]
    codec = row["codec"]
    assert codec["tokens"] == selection.num_tokens < codec["dense_tokens"] and codec["budget"] == 0.25
    assert row["grid_thw"] == list(selection.grid_thw) and row["frames"] == selection.frame_ids.tolist()
    assert torch.equal(tensors["positions"][:, 1:], selection.positions[:, 1:])  # (K, 3): which patches
    assert_close_rel(tensors["patches"], expected.last_hidden_state[0], what="patches")
    assert_close_rel(tensors["pooled"], expected.pooler_output[0], what="pooled")
    assert "codec" not in rows["a.png"][0] and "positions" not in rows["a.png"][1]  # images are dense


def test_resume_refuses_other_codec_settings_and_the_preview_is_drawn(models, data, tmp_path):
    _, packing = models
    out, previews = tmp_path / "out", tmp_path / "previews"
    encode([data / "clip.mp4"], out, model=packing, codec_sparse=True, codec_preview_dir=previews, **OPTIONS)
    assert [p.suffix for p in previews.iterdir()] == [".png"]
    with pytest.raises(ValueError, match="codec_budget"):
        encode([data / "clip.mp4"], out, model=packing, codec_sparse=True, codec_budget=0.5, resume=True, **OPTIONS)
    with pytest.raises(ValueError, match="codec_sparse"):
        encode([data / "clip.mp4"], out, model=packing, resume=True, **OPTIONS)
    with pytest.raises(ValueError, match="codec_preview_dir was given without codec_sparse"):
        encode([data / "clip.mp4"], tmp_path / "x", model=packing, codec_preview_dir=previews, **OPTIONS)


def test_the_command_line_flags(models, data, tmp_path):
    _, packing = models
    ckpt = tmp_path / "ckpt"
    packing.save_pretrained(ckpt)
    PROCESSOR.save_pretrained(ckpt)
    args = ["encode", str(data / "clip.mp4"), "--model", str(ckpt), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main([*args, "--codec-sparse", "--codec-budget", "40", "--frames", "8", "--quiet"]) == 0
    (row,) = read_index(tmp_path / "out")
    assert row["codec"]["tokens"] == 40 and row["codec"]["budget"] == 40 and len(row["frames"]) == 8
    with pytest.raises(SystemExit) as refused:  # argparse refuses it while parsing: named on stderr, nothing written
        main([*args, "--codec-sparse", "--codec-budget", "1.5"])
    assert refused.value.code == 2


def test_a_tower_encodes_a_selection_laid_out_as_the_reference_llava_pipeline_does(models, data):
    """Kept patches pasted into canvas frames plus their true positions: the tower encodes them as one clip,
    equal to the standard model on the dense clip with the selection's visible indices."""
    from hevc_vit.codec import gather_selected_patches, selection_as_frames
    from hevc_vit.llava.towers import HEVCViTPackingVisionTower, HEVCViTVisionTower

    standard, packing = models
    clip = data / "clip.mp4"
    size = (56, 56)
    selection = select_patches(clip, 14, CodecSparseConfig(frames=8, budget_frames=2, size=size))
    patches, _ = gather_selected_patches(clip, selection, lambda rgb: PROCESSOR.process(Image.fromarray(rgb), size))
    frames, positions = selection_as_frames(patches, selection, temporal_positions(8, 64))
    assert frames.shape == (2, 3, 56, 56) and positions.shape == (1, 32, 3)
    rgb = {t: f.to_ndarray(format="rgb24") for t, f in sampled_frames(str(clip), selection.frame_ids.numpy(), "AUTO")}
    video = torch.stack([PROCESSOR.process(Image.fromarray(rgb[t]), size) for t in sorted(rgb)], dim=1)[None]
    dense = video_patch_positions(selection.grid_thw, temporal_positions(8, 64))[None]
    with torch.no_grad():
        expected = standard(
            video, visible_indices=selection.indices[None], patch_positions=dense, output_hidden_states=True
        )
        for tower in (HEVCViTPackingVisionTower.from_model(packing, {"mm_vision_select_layer": -2}),
                      HEVCViTVisionTower.from_model(standard, {"mm_vision_select_layer": -2})):  # fmt: skip
            features = tower(frames, patch_positions=[positions])  # (B, h·w, D), frame by frame
            assert_close_rel(features.reshape(-1, 64), expected.hidden_states[-2][0], what=type(tower).__name__)


def test_codec_sparse_reads_a_clip_inside_a_tar_like_the_loose_clip(models, data, tmp_path):
    """A clip in a webdataset shard is decoded from a temporary file: same selection, same features."""
    import tarfile

    _, packing = models
    shard = tmp_path / "clips.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(data / "clip.mp4", arcname="000.mp4")
    sparse = dict(model=packing, codec_sparse=True, frames=12, **OPTIONS)
    encode([data / "clip.mp4"], tmp_path / "loose", **sparse)
    encode([shard], tmp_path / "tar", **sparse)
    (a_row, a), (b_row, b) = next(iter_features(tmp_path / "loose")), next(iter_features(tmp_path / "tar"))
    assert b_row["codec"]["tokens"] == a_row["codec"]["tokens"] and b_row["id"] == "000"
    assert torch.equal(a["positions"], b["positions"]) and torch.equal(a["patches"], b["patches"])


@pytest.mark.parametrize("context", [None, 64])
def test_codec_assets_folders_encode_to_the_features_of_their_mosaics_at_their_positions(
    models, data, tmp_path, context
):
    """``encode`` on a codec-assets folder (or on the run's output folder) cuts the mosaics into patches in row
    order at ``positions_thw``: equal to ``encode_mosaics`` on the standard model with the same decoded JPEGs; the
    JPEG's cost against the mosaics before JPEG is measured (docs/codec-assets.md)."""
    from hevc_vit.codec import write_assets
    from hevc_vit.codec.assets import AssetSettings, compute_assets, encode_mosaics, mosaic_pixels, read_asset_folder

    standard, packing = models
    settings = AssetSettings(frames=8, num_images=3, square_size=56, patch_size=14)  # a 4x4 grid, 48 rows
    assets = tmp_path / "assets"
    assert not write_assets([data / "clip.mp4"], assets, settings, preview=True).failed
    folder = assets / "assets" / "clip"
    out = tmp_path / "out"
    result = encode([folder], out, model=packing, temporal_context=context, pool="head", **OPTIONS)
    assert result.failed == 0
    ((row, tensors),) = list(iter_features(out))
    read = read_asset_folder(folder)
    positions = torch.from_numpy(read.positions)
    positions[:, 0] = torch.tensor(temporal_positions(8, context))[positions[:, 0]]
    mean, std = PROCESSOR.normalization[:2]
    with torch.no_grad():
        expected, pooled = encode_mosaics(standard, mosaic_pixels(read.mosaics, mean, std), positions)
        before_jpeg, _ = encode_mosaics(
            standard, mosaic_pixels(compute_assets(data / "clip.mp4", settings).mosaics, mean, std), positions
        )
    assert row["grid_thw"] == [8, 4, 4] and row["codec"]["tokens"] == 48 and row["frames"] == read.frame_ids.tolist()
    assert torch.equal(tensors["positions"], positions)
    assert_close_rel(tensors["patches"], expected, what="patches")
    assert_close_rel(tensors["pooled"], pooled[0], what="pooled")
    jpeg = ((tensors["patches"] - before_jpeg).norm() / before_jpeg.norm()).item()
    pixels = np.abs(read.mosaics.astype(int) - compute_assets(data / "clip.mp4", settings).mosaics).mean()
    print(f"JPEG q95: mean |pixel difference| {pixels:.2f} levels, features moved by {jpeg:.4f} (relative L2)")
    assert jpeg > 0  # JPEG is lossy: the folder's canvases are the decoded files, not the mosaics before JPEG
    whole = tmp_path / "whole"  # the run's output folder: its asset folders only, not its index or previews
    assert encode([assets], whole, model=packing, temporal_context=context, **OPTIONS).failed == 0
    ((whole_row, whole_tensors),) = list(iter_features(whole))
    assert whole_row["path"] == str(folder) and torch.equal(whole_tensors["patches"], tensors["patches"])
    other = tmp_path / "p16"
    write_assets([data / "clip.mp4"], other, AssetSettings(frames=8, num_images=2, square_size=64, patch_size=16))
    assert encode([other], tmp_path / "bad", model=packing, **OPTIONS).failed == 1
    (bad,) = read_index(tmp_path / "bad")
    assert "patch_size=16; the model's patch size is 14" in bad["error"]


def test_png_codec_assets_encode_to_the_features_of_the_selection_they_came_from(models, data, tmp_path):
    """Lossless mosaics (``mosaic_format="png"``): ``encode`` on the asset folder equals the standard model run
    on the selection itself — the prepared dense squares of ``compute_assets`` with its ``visible_indices`` and
    dense positions, no mosaic in between — to fp32 rounding. (``encode --codec-sparse`` selects at the
    processor's size, not on the 576-px-style squares, so it is not the comparison here.)"""
    from hevc_vit.codec import write_assets
    from hevc_vit.codec.assets import AssetSettings, compute_assets, mosaic_pixels, read_asset_folder

    standard, packing = models
    settings = AssetSettings(frames=8, num_images=3, square_size=56, patch_size=14, mosaic_format="png")
    assert not write_assets([data / "clip.mp4"], tmp_path / "assets", settings).failed
    folder = tmp_path / "assets" / "assets" / "clip"
    assert sorted(p.name for p in folder.glob("mosaic_*")) == ["mosaic_000.png", "mosaic_001.png", "mosaic_002.png"]
    out = tmp_path / "out"
    assert encode([folder], out, model=packing, pool="head", **OPTIONS).failed == 0
    ((row, tensors),) = list(iter_features(out))
    assets = compute_assets(data / "clip.mp4", settings, keep_squares=True)
    assert np.array_equal(read_asset_folder(folder).mosaics, assets.mosaics)  # PNG: the canvases exactly
    mean, std = PROCESSOR.normalization[:2]
    video = mosaic_pixels(assets.squares, mean, std).permute(1, 0, 2, 3)[None]  # (1, C, T, S, S)
    dense = video_patch_positions((8, 4, 4), temporal_positions(8, None))[None]  # (1, T·g·g, 3)
    visible = torch.from_numpy(assets.visible)[None]  # (1, K)
    with torch.no_grad():
        expected = standard(video, visible_indices=visible, patch_positions=dense)
    assert torch.equal(tensors["positions"], torch.from_numpy(assets.positions.astype(np.int64)))
    assert_close_rel(tensors["patches"], expected.last_hidden_state[0], what="patches")
    assert_close_rel(tensors["pooled"], expected.pooler_output[0], what="pooled")
