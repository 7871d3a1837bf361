"""The index on its own: rows, strict JSON values, keys that never clash, torn and damaged lines, the merge."""

from __future__ import annotations

import datetime
import json
import math
from decimal import Decimal

import numpy as np
import pytest

from hevc_vit.encode.output.index import (
    INDEX_NAME,
    DamagedFolderError,
    KeyBook,
    failed_row,
    item_key,
    json_value,
    make_row,
    merge_index,
    rank_index_files,
    rank_index_name,
    read_index,
    read_jsonl,
    row_json,
    rows_bytes,
    shard_name,
)


def test_names_and_keys():
    assert shard_name(3, 12) == "shards/rank00003-00012.safetensors"
    assert rank_index_name(2) == "index.rank00002.jsonl"
    assert item_key(5) == "00000005" and item_key(5, 7) == "00000005-00000007"
    row = failed_row("a.jpg", "00000001", "broken", {"id": "1"})
    assert row == make_row("a.jpg", status="failed", error="broken", key="00000001", id="1")
    assert list(row)[:7] == ["path", "shard", "key", "shape", "grid_thw", "status", "error"]


def test_json_value_writes_strict_json_that_reads_back():
    value = {
        "nan": math.nan,
        "inf": -math.inf,
        "np": np.float32(1.5),
        "arr": np.arange(3),
        "day": datetime.date(2024, 1, 2),
        "dec": Decimal("1.10"),
        "raw": b"abc",
        "set": {3, 1},
        1: (True, None),
    }
    line = row_json(value)
    assert json.loads(line) == {
        "nan": None,
        "inf": None,
        "np": 1.5,
        "arr": [0, 1, 2],
        "day": "2024-01-02",
        "dec": "1.10",
        "raw": "<3 bytes>",
        "set": [1, 3],
        "1": [True, None],
    }
    assert "NaN" not in line and json_value("text") == "text"


def test_a_key_book_keeps_earlier_keys_and_never_reuses_one():
    rows = [{"path": "a", "key": "00000000"}, {"path": "b", "key": "00000007-00000001"}, {"path": "c", "key": ""}]
    book = KeyBook.of(rows, units=3)
    assert book.base == 8  # past unit 7, the highest in the folder
    assert book.key("a", unit=5) == "00000000"  # an input with a row keeps its key
    assert book.key("new", unit=1) == "00000001"  # its natural key is free
    assert book.key("other", unit=0) == "00000008"  # 00000000 is held: moved past every unit number
    assert book.key("in-tar", unit=7, item=1) == "00000015-00000001"


def test_read_jsonl_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "index.rank00000.jsonl"
    path.write_bytes(rows_bytes([{"path": "a"}, {"path": "b"}]) + b'{"path": "c", "sha')
    torn = []
    assert read_jsonl(path, torn.append) == [{"path": "a"}, {"path": "b"}]
    assert torn and f"{path}:3" in torn[0]
    path.write_bytes(b'{"path": "a"}\nnot json\n{"path": "b"}\n')
    with pytest.raises(DamagedFolderError, match=f"{path}:2 is not a JSON row"):
        read_jsonl(path)
    path.write_bytes(b'[1, 2]\n{"path": "b"}\n')
    with pytest.raises(DamagedFolderError, match="is not an index row"):
        read_jsonl(path)


def test_merge_index_puts_rows_in_input_order_and_removes_the_rank_files(tmp_path):
    (tmp_path / INDEX_NAME).write_bytes(rows_bytes([{"path": "old", "status": "ok"}, {"path": "b", "v": 1}]))
    (tmp_path / rank_index_name(1)).write_bytes(rows_bytes([{"path": "b", "v": 2}]))
    (tmp_path / rank_index_name(0)).write_bytes(rows_bytes([{"path": "a"}]))
    assert [p.name for p in rank_index_files(tmp_path)] == ["index.rank00000.jsonl", "index.rank00001.jsonl"]
    rows = merge_index(tmp_path, ["a", "b"])
    assert rows == [{"path": "a"}, {"path": "b", "v": 2}, {"path": "old", "status": "ok"}]  # newer row wins
    assert read_index(tmp_path) == rows and rank_index_files(tmp_path) == []
    with pytest.raises(RuntimeError, match="1 inputs have no index row"):
        merge_index(tmp_path, ["a", "missing"])
    assert [r["path"] for r in merge_index(tmp_path, ["a", "missing"], complete=False)] == ["a", "b", "old"]
    with pytest.raises(FileNotFoundError, match="expected the index of a finished"):
        read_index(tmp_path / "nowhere")
