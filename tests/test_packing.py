"""The pure packing functions: patch layout, positions, the plan, unpacking, and their input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hevc_vit import PackingPlan, grid_positions, patchify, patchify_items, unpack, unpack_batch


def test_patch_layout_is_the_conv2d_weight_layout():
    """patches @ W.flatten(1).T equals the strided Conv2d, and patches come t, then h, then w."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 28, 42)
    weight = torch.randn(8, 3, 14, 14)
    patches, grid_thw = patchify(x, 14)
    conv = F.conv2d(x, weight, stride=14)  # (B, 8, 2, 3)
    expected = conv.flatten(2).transpose(1, 2).reshape(-1, 8)  # (B·h·w, 8), row-major
    torch.testing.assert_close(patches @ weight.flatten(1).T, expected, rtol=1e-5, atol=1e-4)
    assert grid_thw.tolist() == [[1, 2, 3], [1, 2, 3]]
    assert grid_thw.device.type == "cpu" and grid_thw.dtype == torch.int64


def test_video_patches_are_frame_major():
    video = torch.randn(1, 3, 4, 28, 28)  # (B, C, T, H, W)
    patches, grid_thw = patchify(video, 14)
    assert grid_thw.tolist() == [[4, 2, 2]]
    per_frame = [patchify(video[:, :, t], 14)[0] for t in range(4)]
    torch.testing.assert_close(patches, torch.cat(per_frame), rtol=0, atol=0)


def test_patchify_items_mixes_images_stacks_and_videos():
    image = torch.randn(3, 28, 42)
    stack = torch.randn(2, 3, 28, 28)
    video = torch.randn(3, 5, 14, 28)
    patches, grid_thw = patchify_items([image, stack, video, image], 14)
    assert grid_thw.tolist() == [[1, 2, 3], [1, 2, 2], [1, 2, 2], [5, 1, 2], [1, 2, 3]]
    expected = torch.cat(
        [
            patchify(image[None], 14)[0],
            patchify(stack, 14)[0],
            patchify(video[None], 14)[0],
            patchify(image[None], 14)[0],
        ]
    )
    torch.testing.assert_close(patches, expected, rtol=0, atol=0)


def test_grid_positions():
    pos = grid_positions(torch.tensor([[2, 1, 3], [1, 2, 1]]))
    assert pos.tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 0, 2], [1, 0, 0], [1, 0, 1], [1, 0, 2],
        [0, 0, 0], [0, 1, 0],
    ]  # fmt: skip


def test_plan_from_grid_thw_forms_agree():
    as_list = PackingPlan.from_grid_thw([[1, 2, 3], [2, 2, 2]])
    as_tensor = PackingPlan.from_grid_thw(torch.tensor([[1, 2, 3], [2, 2, 2]], dtype=torch.int32))
    for plan in (as_list, as_tensor):
        assert plan.seqlens == (6, 8)
        assert plan.max_seqlen == 8 and isinstance(plan.max_seqlen, int)
        assert plan.cu_seqlens.dtype == torch.int32 and plan.cu_seqlens.tolist() == [0, 6, 14]
        assert plan.positions.shape == (14, 3)
        assert plan.segment_ids.tolist() == [0] * 6 + [1] * 8
    torch.testing.assert_close(as_list.positions, as_tensor.positions)


def test_length_groups_slice_when_contiguous_index_otherwise():
    plan = PackingPlan.from_grid_thw([[1, 1, 2], [1, 1, 2], [1, 1, 3]])
    (l0, c0, t0), (l1, c1, t1) = plan.length_groups
    assert (l0, c0, t0) == (2, 2, slice(0, 4)) and (l1, c1, t1) == (3, 1, slice(4, 7))
    plan = PackingPlan.from_grid_thw([[1, 1, 2], [1, 1, 3], [1, 1, 2]])
    (l0, c0, t0), _ = plan.length_groups
    assert (l0, c0) == (2, 2) and t0.tolist() == [0, 1, 5, 6]


def test_unpack_round_trip():
    plan = PackingPlan.from_grid_thw([[1, 2, 3], [1, 1, 1], [2, 1, 2]])
    x = torch.randn(plan.total_tokens, 5)
    parts = unpack(x, plan)
    assert [p.shape[0] for p in parts] == [6, 1, 4]
    torch.testing.assert_close(torch.cat(parts), x)
    same = PackingPlan.from_grid_thw([[1, 2, 3], [1, 3, 2]])
    assert unpack_batch(torch.randn(12, 5), same).shape == (2, 6, 5)
    with pytest.raises(ValueError, match="equal counts"):
        unpack_batch(x, plan)
    with pytest.raises(ValueError, match="x has 10 tokens; the plan's items hold 11"):
        unpack(torch.randn(10, 5), plan)


@pytest.mark.parametrize(
    "grid_thw, message",
    [
        ([[1, 2]], r"shape \(1, 2\); expected \(n, 3\)"),
        (torch.zeros(0, 3, dtype=torch.long), r"shape \(0, 3\)"),
        ([[1, 0, 2]], r"row 0 is \[1, 0, 2\]; every entry must be a positive integer"),
        ([[1, 2, 2], [1, -1, 2]], r"row 1 is \[1, -1, 2\]"),
        ([[1, 2.5, 2]], r"row 0 is \[1, 2.5, 2\]; expected integers"),
        (torch.tensor([[1.0, 2.0, 2.0]]), r"dtype torch.float32; expected an integer tensor"),
        ([], r"grid_thw is empty"),
    ],
)
def test_bad_grid_thw(grid_thw, message):
    with pytest.raises(ValueError, match=message):
        PackingPlan.from_grid_thw(grid_thw)


def test_bad_patch_positions():
    with pytest.raises(ValueError, match=r"patch_positions has shape \(5, 3\); expected \(6, 3\)"):
        PackingPlan.from_grid_thw([[1, 2, 3]], patch_positions=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"patch_positions has shape \(6, 2\)"):
        PackingPlan.from_grid_thw([[1, 2, 3]], patch_positions=torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dtype torch.float32"):
        PackingPlan.from_grid_thw([[1, 2, 3]], patch_positions=torch.zeros(6, 3))


def test_bad_pixels():
    with pytest.raises(
        ValueError,
        match=r"pixel_values is 30x42; both sides must be positive multiples of patch_size=14 \(nearest: 28x42\)",
    ):
        patchify(torch.randn(1, 3, 30, 42), 14)
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\) images or \(B, C, T, H, W\) videos"):
        patchify(torch.randn(3, 28), 14)
    with pytest.raises(ValueError, match=r"item 1 has shape \(28, 28\)"):
        patchify_items([torch.randn(3, 28, 28), torch.randn(28, 28)], 14)
    with pytest.raises(ValueError, match=r"item 0 \(3, 28, 20\) is 28x20.*nearest: 28x14"):
        patchify_items([torch.randn(3, 28, 20)], 14)
    with pytest.raises(ValueError, match="items is empty"):
        patchify_items([], 14)
