"""What both engines share (``engines.pipeline``): the tally, the loaders' options, the listing of a rank's share,
and items packed to the token budget and encoded group by group."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from PIL import Image

from hevc_vit import HEVCViTPackingModel, patchify
from hevc_vit.codec.config import CodecSparseConfig
from hevc_vit.encode.decode.item import LoadedItem
from hevc_vit.encode.engines.pipeline import (
    Tally,
    encode_groups,
    list_run_share,
    load_options,
    memory_sources,
    prepare_folder,
    shows_progress,
)
from hevc_vit.encode.model.forward import GroupEncoder
from hevc_vit.encode.model.loader import Encoder
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.readers.expand import SourceOptions
from hevc_vit.encode.readers.memory import MemorySource, collect_memory
from hevc_vit.packing import grid_positions
from tests.helpers import FIXTURES, write_image
from tests.helpers.encode import PROC


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny").eval()


def test_tally_counts_items_and_tokens(capsys):
    tally = Tally(total=3, show=True, desc="encode")  # shown: on pytest's captured stderr
    tally.item_loaded()
    tally.add(1, 0, 12)
    tally.add(0, 1, 0)
    tally.item_loaded()
    tally.add(1, 0, 5)
    assert tally.counts() == (2, 1, 17) and tally.loaded == 2
    assert tally.bar.n == 3  # the bar counts items done, encoded or failed
    tally.close()
    assert "3/3" in capsys.readouterr().err


def test_progress_shown_when_asked_else_on_a_terminal(monkeypatch):
    assert shows_progress(EncodeOptions(progress=True)) and not shows_progress(EncodeOptions(progress=False))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert not shows_progress(EncodeOptions())


def test_load_options_follow_the_run_options(model):
    encoder = Encoder(model, "tiny", PROC, "head")
    options = EncodeOptions(frames=6, codec_sparse=True, codec_budget=0.5, jpeg_draft=False, retries=2)
    memory, keys = ["an object"], ["k0", "k1"]
    load = load_options(options, encoder, memory, keys)
    assert load.processor is PROC and load.patch_size == model.config.patch_size
    assert load.num_channels == model.config.num_channels and load.frames == 6
    assert load.codec == CodecSparseConfig(frames=6, budget=0.5)
    assert load.memory is memory and load.keys is keys and load.jpeg_draft is False
    assert load.network.retries == 2
    assert load_options(EncodeOptions(), encoder, [], []).codec is None


def test_memory_sources_by_number():
    inputs, memory = collect_memory(["a.png", Image.new("RGB", (8, 8)), "b.png"], "image", [])
    sources = memory_sources(inputs)
    assert list(sources) == [0] and isinstance(sources[0], MemorySource) and len(memory) == 1
    assert memory_sources(None) == {}


def test_ranks_list_disjoint_shares_of_every_input(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [write_image(folder / f"{i}.png", 20 + i, 20, i) for i in range(5)]
    options = EncodeOptions()
    plan = prepare_folder(
        [str(p) for p in paths], tmp_path / "out", False, False, {}, lambda m: None, SourceOptions.of(options)
    )
    whole = list_run_share(plan, 0, 1, options, {})
    shares = [list_run_share(plan, rank, 2, options, {}) for rank in range(2)]
    listed = [spec.path for share in shares for spec in share.specs]
    assert sorted(listed) == sorted(spec.path for spec in whole.specs) == sorted(str(p) for p in paths)
    assert all(share.specs for share in shares)  # both ranks have work
    assert sorted(key for share in shares for key in share.keys) == sorted(whole.keys)


def _item(index: int, h: int, w: int) -> LoadedItem:
    image = torch.randn(1, 3, h * 14, w * 14)  # (1, C, H, W)
    patches, grid = patchify(image, 14)  # (N, C·p·p), (1, 3)
    return LoadedItem(index, f"{index}.png", "image", patches, tuple(grid[0].tolist()), grid_positions(grid))


def test_encode_groups_keeps_the_budget_and_every_item_once(model):
    sizes = [(2, 3), (4, 4), None, (1, 5), (3, 3), (5, 4)]  # None: an item that failed to load
    items = [_item(j, *hw) if hw else LoadedItem(j, f"{j}.png", error="unreadable") for j, hw in enumerate(sizes)]
    keys = [f"k{j}" for j in range(len(items))]
    forward = GroupEncoder(model, torch.device("cpu"), torch.float32, "head", False, keys)
    loaded, budget = [], 20
    forwards = list(encode_groups(iter(items), forward, budget, lambda: loaded.append(1)))
    assert len(loaded) == len(items)
    keys_out = [r.row["key"] for results in forwards for r in results]
    assert sorted(keys_out) == sorted(keys)  # every item once
    assert [r.row["key"] for results in forwards for r in results if not r.ok] == ["k2"]
    failed_at = next(i for i, results in enumerate(forwards) if not results[0].ok)
    assert len(forwards[failed_at]) == 1  # a failed item comes at once, alone
    for results in forwards:
        tokens = sum(r.tokens for r in results)
        assert tokens <= budget or len(results) == 1, [r.row["key"] for r in results]
    assert len(forwards) > 2  # the budget splits the items into several forwards
