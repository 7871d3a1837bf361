"""Video input: frame sampling, decoding the right frames, and temporal positions — the last pinned to the
reference implementation through the golden 4-frame clip spread over a 64-frame context."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hevc_vit import HEVCViTPackingModel, patchify
from hevc_vit.media.video import read_video, sample_frame_indices, temporal_positions, video_patch_positions
from tests.helpers import FIXTURES, GOLDEN, assert_close_rel
from tests.helpers.media import noisy_clip, write_clip

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

pytestmark = pytest.mark.video  # PyAV encodes and decodes the clips


def test_sample_frame_indices_are_uniform_and_in_range():
    assert sample_frame_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(100, 1) == [50]
    for total in (9, 30, 31, 1000):
        idx = sample_frame_indices(total, 7)
        assert len(idx) == 7 and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < total
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1
    with pytest.raises(ValueError, match="num_frames=0"):
        sample_frame_indices(10, 0)


def test_temporal_positions():
    assert temporal_positions(8) == list(range(8))
    assert temporal_positions(8, 64) == [0, 9, 18, 27, 36, 45, 54, 63]
    assert temporal_positions(4, 64) == [0, 21, 42, 63]
    assert temporal_positions(1, 64) == [0]
    with pytest.raises(ValueError, match="temporal_context=4 is smaller than the 8"):
        temporal_positions(8, 4)


def test_read_video_decodes_the_sampled_frames(tmp_path):
    path = write_clip(tmp_path / "clip.mp4", 20)
    video = read_video(path, 5)
    assert video.total_frames == 20
    assert video.indices == sample_frame_indices(20, 5) == [2, 6, 10, 14, 18]
    levels = [float(np.asarray(f).mean()) for f in video.frames]
    assert all(abs(level - 8 * i) < 3 for level, i in zip(levels, video.indices)), levels
    assert all(f.mode == "RGB" and f.size == (48, 32) for f in video.frames)


def test_read_video_rejects_a_file_without_video(tmp_path):
    bad = tmp_path / "fake.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    with pytest.raises(av.error.FFmpegError, match="Invalid data"):
        read_video(bad, 4)


def test_positions_spread_over_a_context_match_the_reference():
    """The golden clip with t = 0, 21, 42, 63 (4 frames over 64), built by ``video_patch_positions``."""
    golden = load_file(str(GOLDEN))
    model = HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")
    pixels = golden["video_4x28x28_ctx64.pixel_values"]  # (1, C, T, H, W)
    patches, grid = patchify(pixels, 14)
    positions = video_patch_positions(tuple(grid[0].tolist()), temporal_positions(4, 64))
    assert torch.equal(positions, golden["video_4x28x28_ctx64.patch_positions"][0].long())
    with torch.no_grad():
        out = model(patches, grid_thw=grid, patch_positions=positions)
    assert_close_rel(out.last_hidden_state, golden["video_4x28x28_ctx64.last_hidden_state"][0], what="ctx64 tokens")
    assert_close_rel(out.pooler_output, golden["video_4x28x28_ctx64.pooler_output"], what="ctx64 pooled")


def test_a_truncated_video_is_refused_not_read_as_a_shorter_clip(tmp_path):
    whole = noisy_clip(tmp_path / "whole.mp4", 40)
    assert read_video(whole, 8).indices == [2, 7, 12, 17, 22, 27, 32, 37]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])  # states 40 frames, about 10 decode
    with pytest.raises(ValueError, match="truncated or damaged: its stream states 40 frames, but only"):
        read_video(cut, 8)
