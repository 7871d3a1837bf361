"""Shards on their own: the writer's files and rows, read back tensor for tensor; a row whose shard lacks its
features."""

from __future__ import annotations

import pytest
import torch

from hevc_vit.encode.output.index import failed_row, make_row, merge_index, read_jsonl
from hevc_vit.encode.output.shards import (
    MissingFeaturesError,
    ShardWriter,
    holds_features,
    iter_features,
    load_features,
    save_shard,
    shard_keys,
)


def _item(key: str, n: int) -> tuple[dict, dict[str, torch.Tensor]]:
    row = make_row(f"{key}.jpg", status="ok", key=key)
    return row, {"patches": torch.randn(n, 4), "grid_thw": torch.tensor([[1, 1, n]])}


@pytest.mark.parametrize("background", [False, True])
def test_the_writer_writes_one_shard_per_forward_and_reads_back(tmp_path, background):
    writer = ShardWriter(tmp_path, rank=0, shard_bytes=0, background=background, storage_dtype=torch.float16)
    items = [_item(f"0000000{i}", i + 1) for i in range(3)]
    for row, tensors in items[:2]:
        writer.add(dict(row), tensors)
    writer.end_forward()
    writer.add_failure(failed_row("bad.jpg", "00000009", "cannot decode"))
    writer.add(dict(items[2][0]), items[2][1])
    writer.close()
    assert writer.shards_written == 2
    rows = read_jsonl(tmp_path / "index.rank00000.jsonl")
    shards = {row["path"]: row["shard"] for row in rows}  # in the background a failure's row may come first
    first, second = "shards/rank00000-00000.safetensors", "shards/rank00000-00001.safetensors"
    assert shards == {"00000000.jpg": first, "00000001.jpg": first, "bad.jpg": "", "00000002.jpg": second}
    assert shard_keys(tmp_path / first) == {
        "00000000.patches",
        "00000000.grid_thw",
        "00000001.patches",
        "00000001.grid_thw",
    }
    merge_index(tmp_path, ["00000000.jpg", "00000001.jpg", "bad.jpg", "00000002.jpg"])
    got = list(iter_features(tmp_path))
    assert [row["path"] for row, _ in got] == ["00000000.jpg", "00000001.jpg", "00000002.jpg"]
    for (_, tensors), (_, want) in zip(got, items):
        assert tensors["patches"].dtype == torch.float16  # stored as asked
        assert torch.equal(tensors["patches"], want["patches"].half())
        assert torch.equal(tensors["grid_thw"], want["grid_thw"])  # integers keep their dtype
    assert torch.equal(load_features(tmp_path, got[1][0])["patches"], items[1][1]["patches"].half())


def test_a_new_writer_numbers_after_the_shards_there(tmp_path):
    ShardWriter(tmp_path, 0, 0).close()
    (tmp_path / "shards" / "rank00000-00004.safetensors").write_bytes(b"")
    writer = ShardWriter(tmp_path, 0, 0)
    writer.add(*_item("00000000", 1))
    writer.close()
    assert (tmp_path / "shards" / "rank00000-00005.safetensors").is_file()


def test_a_row_whose_shard_lacks_its_features_or_failed_is_refused(tmp_path):
    (tmp_path / "shards").mkdir()
    save_shard({"k.grid_thw": torch.tensor([[1, 1, 1]])}, tmp_path / "shards" / "s.safetensors", 0o644)
    row = make_row("a.jpg", status="ok", key="k", shard="shards/s.safetensors")
    with pytest.raises(MissingFeaturesError, match=r"holds \['grid_thw'\] for the key") as e:
        load_features(tmp_path, row)
    assert isinstance(e.value, KeyError) and not str(e.value).startswith("'")
    with pytest.raises(ValueError, match="row for 'a.jpg' has status 'failed': broken"):
        load_features(tmp_path, failed_row("a.jpg", "k", "broken"))
    assert holds_features({"k.grid_thw", "k.pooled"}, "k") and not holds_features({"k.patches"}, "k")
