"""The asset folder on disk: keys that could escape ``OUT/assets``, the "done" rule, atomic files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hevc_vit.codec.assets import AssetSettings, VideoAssets, asset_dir, is_done, write_asset_folder, writer
from tests.helpers.reference_codec_assets import _is_done

SETTINGS = AssetSettings(frames=4, num_images=2, square_size=32, patch_size=16)


def tiny_assets() -> VideoAssets:
    positions = np.array([[t, h, w] for t in (0, 1) for h in (0, 1) for w in (0, 1)], np.int32)
    mosaics = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    return VideoAssets(np.arange(4, dtype=np.int32), positions, np.arange(8), mosaics, np.zeros((4, 2, 2)), {})


@pytest.mark.parametrize("key", ["", " ", "a/b", "..", "a..b", "../up", "a\\b", "nul\x00", ".", "tab\there"])
def test_keys_that_could_write_elsewhere_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="key"):
        asset_dir(tmp_path, key)


def test_a_key_that_is_a_link_out_of_assets_is_refused(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "assets" / "sneaky")
    with pytest.raises(ValueError, match="outside"):
        asset_dir(tmp_path, "sneaky")
    assert asset_dir(tmp_path, "fine.key-1") == tmp_path / "assets" / "fine.key-1"


def test_done_means_every_file_and_the_same_settings(tmp_path):
    folder = asset_dir(tmp_path, "k")
    write_asset_folder(folder, tiny_assets(), SETTINGS, "/v/k.mp4", "k")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "frame_ids.npy",
        "meta.json",
        "mosaic_000.jpg",
        "mosaic_001.jpg",
        "positions_thw.npy",
        "visible_indices.npy",
    ]
    assert is_done(folder, SETTINGS) and _is_done(folder, SETTINGS.num_images)
    assert not is_done(folder, AssetSettings(frames=4, num_images=2, square_size=32, patch_size=16, jpeg_quality=90))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["video"] == "/v/k.mp4" and meta["key"] == "k" and meta["cfg"]["seq_len_frames"] == 4
    assert np.load(folder / "positions_thw.npy").dtype == np.int32
    (folder / "mosaic_001.jpg").unlink()
    assert not is_done(folder, SETTINGS) and not _is_done(folder, SETTINGS.num_images)


def test_a_rewrite_that_dies_leaves_a_folder_nobody_takes_for_done(tmp_path, monkeypatch):
    folder = asset_dir(tmp_path, "k")
    write_asset_folder(folder, tiny_assets(), SETTINGS, "/v/k.mp4", "k")
    real, calls = writer.write_atomic, []

    def dies_at_the_third_file(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(writer, "write_atomic", dies_at_the_third_file)
    with pytest.raises(OSError, match="No space"):
        write_asset_folder(folder, tiny_assets(), SETTINGS, "/v/k.mp4", "k")
    assert not is_done(folder, SETTINGS) and not _is_done(folder, SETTINGS.num_images)  # meta.json went first
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]  # no temporary file left behind
