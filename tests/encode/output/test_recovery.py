"""What ``--resume`` makes of a folder on its own: finished inputs, a missing part, a part whose rows were cut
short, a stray part, a damaged part."""

from __future__ import annotations

import pytest
import torch

from hevc_vit.encode.output.index import (
    INDEX_NAME,
    DamagedFolderError,
    make_row,
    rank_index_name,
    read_index,
    rows_bytes,
)
from hevc_vit.encode.output.recovery import resume_state
from hevc_vit.encode.output.shards import save_shard
from hevc_vit.encode.readers.spec import InputSpec, WorkUnit


def _part(folder, name: str, keys: list[str]) -> str:
    tensors = {}
    for key in keys:
        tensors |= {f"{key}.patches": torch.zeros(1, 2), f"{key}.grid_thw": torch.tensor([[1, 1, 1]])}
    (folder / "shards").mkdir(exist_ok=True)
    save_shard(tensors, folder / "shards" / name, 0o644)
    return f"shards/{name}"


def _units(*paths: str) -> list[WorkUnit]:
    return [WorkUnit.item(InputSpec(p)) for p in paths]


def test_finished_inputs_are_done_and_the_folder_is_settled(tmp_path):
    whole = _part(tmp_path, "rank00000-00000.safetensors", ["00000000", "00000001"])
    torn = _part(tmp_path, "rank00000-00001.safetensors", ["00000002", "00000003"])  # one row was appended
    stray = _part(tmp_path, "rank00000-00002.safetensors", ["00000004"])  # published, no row at all
    rows = [
        make_row("a", status="ok", shard=whole, key="00000000"),
        make_row("b", status="ok", shard=whole, key="00000001"),
        make_row("c", status="ok", shard=torn, key="00000002"),
        make_row("gone", status="ok", shard="shards/rank00000-00009.safetensors", key="00000005"),
        make_row("d", status="failed", key="00000006", error="x"),
    ]
    (tmp_path / rank_index_name(0)).write_bytes(rows_bytes(rows))
    repairs: list[str] = []
    done, keys = resume_state(tmp_path, _units("a", "b", "c", "gone", "d"), set(), repairs)
    assert done == {"a", "b"}
    assert [row["path"] for row in read_index(tmp_path)] == ["a", "b", "gone", "d"]  # c: removed with its part
    assert not (tmp_path / rank_index_name(0)).exists()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["rank00000-00000.safetensors"]
    assert keys.key("c", unit=2) == "00000002"  # an input of a removed part keeps its key
    text = "\n".join(repairs)
    assert "missing, named by 1 ok row; their inputs are encoded again" in text
    assert "holds 1 inputs no index row names" in text and torn.split("/")[1] in text
    assert stray.split("/")[1] in text and "no index row names it" in text


def test_a_part_that_cannot_be_read_refuses_the_folder_unchanged(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rank00000-00000.safetensors").write_bytes(b"not a shard")
    rows = [make_row("a", status="ok", shard="shards/rank00000-00000.safetensors", key="00000000")]
    (tmp_path / INDEX_NAME).write_bytes(rows_bytes(rows))
    before = (tmp_path / INDEX_NAME).read_bytes()
    with pytest.raises(DamagedFolderError, match=r"--resume: .*rank00000-00000.safetensors cannot be read"):
        resume_state(tmp_path, _units("a"), set(), [])
    assert (tmp_path / INDEX_NAME).read_bytes() == before
    assert (tmp_path / "shards" / "rank00000-00000.safetensors").exists()


def test_a_failed_row_of_a_name_expanded_again_is_dropped(tmp_path):
    rows = [make_row("*.jpg", status="failed", error="no file matches"), make_row("x", status="failed", error="y")]
    (tmp_path / INDEX_NAME).write_bytes(rows_bytes(rows))
    done, _ = resume_state(tmp_path, _units("a.jpg"), {"*.jpg"}, [])
    assert done == set() and [row["path"] for row in read_index(tmp_path)] == ["x"]
