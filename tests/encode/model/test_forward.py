"""``GroupEncoder``: one forward of the packing model over a group of items, each item's row and tensors returned
(nothing written), equal to the packing model run on each item alone."""

from __future__ import annotations

import inspect

import pytest
import torch

from hevc_vit import HEVCViTPackingModel, patchify
from hevc_vit.encode.decode.item import LoadedItem
from hevc_vit.encode.model.forward import EncodedItem, GroupEncoder
from hevc_vit.packing import grid_positions
from tests.helpers import FIXTURES, assert_close_rel

SIZES = [(2, 3), (4, 4), (1, 5)]  # (h, w) in patches: items of 6, 16 and 5 tokens
P = 14


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny").eval()


def _items(sizes=SIZES, seed: int = 0) -> list[LoadedItem]:
    """Images of ``sizes`` patches as the loaders make them: float32 patches ``(N, C·p·p)``, the grid, positions."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for index, (h, w) in enumerate(sizes):
        image = torch.randn(1, 3, h * P, w * P, generator=generator)  # (1, C, H, W)
        patches, grid = patchify(image, P)  # (N, C·p·p), (1, 3)
        thw = tuple(grid[0].tolist())
        items.append(LoadedItem(index, f"img{index}.png", "image", patches, thw, grid_positions(grid)))
    return items


def _alone(model: HEVCViTPackingModel, item: LoadedItem) -> tuple[torch.Tensor, torch.Tensor]:
    """The packing model on one item: its patch features ``(N, D)`` and pooled vector ``(D,)``."""
    grid = torch.tensor([item.grid_thw])
    with torch.no_grad():
        out = model(item.patches, grid_thw=grid, patch_positions=item.positions)
    return out.last_hidden_state, out.pooler_output[0]


def _encoder(model, pool: str = "head", pooled_only: bool = False, normalize: bool = False, n: int = len(SIZES)):
    keys = [f"k{j:03d}" for j in range(n)]
    extras = [{"id": f"row-{j}"} for j in range(n)]
    return GroupEncoder(model, torch.device("cpu"), torch.float32, pool, pooled_only, keys, extras, normalize)


def test_knows_nothing_of_writers():
    parameters = inspect.signature(GroupEncoder).parameters
    assert "writer" not in parameters and "on_done" not in parameters


def test_group_results_equal_the_model_on_each_item_alone(model):
    items = _items()
    forward = _encoder(model)
    assert forward.run(items) == []  # a group's results come one group later (or from close)
    (results,) = forward.close()
    assert forward.close() == []
    assert [r.row["key"] for r in results] == ["k000", "k001", "k002"]
    for item, result in zip(items, results):
        assert isinstance(result, EncodedItem) and result.ok
        last, pooled = _alone(model, item)
        assert_close_rel(result.tensors["patches"], last, what=f"{item.path} patches")
        assert_close_rel(result.tensors["pooled"], pooled, what=f"{item.path} pooled")
        assert torch.equal(result.tensors["grid_thw"], torch.tensor(item.grid_thw))
        assert set(result.tensors) == {"grid_thw", "patches", "pooled"}
        row = result.row
        assert (row["path"], row["status"], row["kind"]) == (item.path, "ok", "image")
        assert row["shape"] == list(last.shape) and row["grid_thw"] == list(item.grid_thw)
        assert result.tokens == item.num_tokens and result.counts() == (1, 0, item.num_tokens)


def test_each_forward_is_one_list_returned_by_the_next_run(model):
    items = _items()
    forward = _encoder(model)
    assert forward.run(items[:2]) == []
    first = forward.run(items[2:])
    assert [[r.row["path"] for r in results] for results in first] == [["img0.png", "img1.png"]]
    assert [[r.row["path"] for r in results] for results in forward.close()] == [["img2.png"]]


def test_mean_pooling_normalised_and_pooled_only(model):
    items = _items()
    forward = _encoder(model, pool="mean", pooled_only=True, normalize=True)
    forward.run(items)
    (results,) = forward.close()
    for item, result in zip(items, results):
        last, _ = _alone(model, item)
        expected = torch.nn.functional.normalize(last.mean(0), dim=-1)  # (D,)
        assert set(result.tensors) == {"grid_thw", "pooled"}
        assert result.tensors["pooled"].dtype == torch.float32
        assert_close_rel(result.tensors["pooled"], expected, what=f"{item.path} pooled")
        assert result.row["shape"] == list(expected.shape)


def test_failures_are_rows_without_tensors(model):
    forward = _encoder(model)
    missing = LoadedItem(1, "gone.png", error="no such file")
    failed = forward.failed(missing)
    assert not failed.ok and failed.tensors == {} and failed.counts() == (0, 1, 0)
    assert failed.row["status"] == "failed" and failed.row["key"] == "k001" and failed.row["id"] == "row-1"
    assert "no such file" in failed.row["error"]
    (bad,) = _items(SIZES[:1])
    bad.patches = torch.full_like(bad.patches, float("nan"))  # NaN features are never returned as ok
    forward.run([bad])
    ((result,),) = forward.close()
    assert not result.ok and result.tokens == 0
    assert result.row["status"] == "failed" and "non-finite" in result.row["error"]
