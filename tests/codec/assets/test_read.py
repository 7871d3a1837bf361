"""Assets back into the towers: mosaics + ``positions_thw`` encode to the features of the selection they came
from — on the packing model (:func:`encode_mosaics`) and on both LLaVA towers called the way the reference's
fork calls them (the canvases as frames, the positions as one clip's ``patch_positions``) — against
``HEVCViTModel`` on the dense prepared frames with ``visible_indices``."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hevc_vit import HEVCViTModel, HEVCViTPackingModel
from hevc_vit.codec import write_assets
from hevc_vit.codec.assets import AssetSettings, compute_assets, encode_mosaics, mosaic_pixels, read_asset_folder
from hevc_vit.codec.assets.video import decode_squares
from hevc_vit.codec.assets.writer import jpeg_bytes
from hevc_vit.llava.towers import HEVCViTPackingVisionTower, HEVCViTVisionTower
from hevc_vit.media.video import video_patch_positions
from tests.helpers import FIXTURES, assert_close_rel
from tests.helpers.codec_clips import write_moving_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clip

TOWER_DIR = FIXTURES / "llava_vit_packing_tiny"  # patch 14
SETTINGS = AssetSettings(frames=8, num_images=3, square_size=56, patch_size=14)  # a 4x4 grid, 48 rows


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """The clip's assets before JPEG, its prepared frames as one normalised clip, and the standard model."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_moving_clip(path, frames=10, size=64)
    assets = compute_assets(path, SETTINGS)
    squares, _ = decode_squares(str(path), assets.frame_ids, 56)
    video = mosaic_pixels(squares).transpose(0, 1)[None]  # (1, C, T, S, S): each frame normalised as a mosaic
    return path, assets, video


def dense_reference(model: HEVCViTModel, video: torch.Tensor, visible: np.ndarray):
    dense = video_patch_positions((video.shape[2], 4, 4), None)[None]  # (1, T·16, 3), t = 0..T-1
    with torch.no_grad():
        return model(
            video, visible_indices=torch.from_numpy(visible)[None], patch_positions=dense, output_hidden_states=True
        )


def test_encode_mosaics_equals_the_standard_model_on_the_selection(selection, one_thread):
    _, assets, video = selection
    standard = HEVCViTModel.from_pretrained(TOWER_DIR).eval()
    packing = HEVCViTPackingModel.from_pretrained(TOWER_DIR).eval()
    expected = dense_reference(standard, video, assets.visible)
    with torch.no_grad():
        last, pooled = encode_mosaics(packing, mosaic_pixels(assets.mosaics), assets.positions)
    assert last.shape == (48, 64)
    assert_close_rel(last, expected.last_hidden_state[0], what="last_hidden_state")
    assert_close_rel(pooled, expected.pooler_output, what="pooler_output")
    with pytest.raises(ValueError, match="expected one row per patch"):
        encode_mosaics(packing, mosaic_pixels(assets.mosaics[:2]), assets.positions)


@pytest.mark.parametrize("tower_class", [HEVCViTPackingVisionTower, HEVCViTVisionTower], ids=["packing", "standard"])
def test_the_llava_towers_take_mosaics_and_positions_as_one_clip(selection, tower_class, one_thread):
    _, assets, video = selection
    args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu")
    tower = tower_class(TOWER_DIR, vision_tower_cfg=args)
    expected = dense_reference(HEVCViTModel.from_pretrained(TOWER_DIR).eval(), video, assets.visible)
    positions = torch.from_numpy(assets.positions).long()[None]  # (1, K, 3): what train.py hands the fork
    with torch.no_grad():
        got = tower(mosaic_pixels(assets.mosaics), grid_thw=torch.tensor([[1, 4, 4]] * 3), patch_positions=[positions])
    assert_close_rel(got.reshape(48, -1), expected.hidden_states[-2][0], what="tower features")


def test_read_asset_folder_round_trips_a_written_folder(selection, tmp_path):
    path, assets, _ = selection
    report = write_assets([path], tmp_path / "out", SETTINGS)
    back = read_asset_folder(report.rows[0]["asset_dir"])
    assert np.array_equal(back.positions, assets.positions) and np.array_equal(back.visible, assets.visible)
    assert np.array_equal(back.frame_ids, assets.frame_ids) and back.meta["key"] == "clip"
    for i, canvas in enumerate(assets.mosaics):  # each file is the JPEG (quality 95) of the computed canvas
        assert np.array_equal(back.mosaics[i], np.asarray(Image.open(io.BytesIO(jpeg_bytes(canvas, 95)))))
    (tmp_path / "out" / "assets" / "clip" / "mosaic_002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="lacks mosaic_002.jpg"):
        read_asset_folder(tmp_path / "out" / "assets" / "clip")
