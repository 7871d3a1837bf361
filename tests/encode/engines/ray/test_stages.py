"""The stages of the Ray engine as plain functions, without Ray: pickled columns, the decode stage on a batch,
block numbers and written blocks, the fault seams that do nothing unless asked."""

from __future__ import annotations

import json
import os
import pickle
import time

import numpy as np
import torch
from PIL import Image

from hevc_vit.encode.decode.item import LoadOptions
from hevc_vit.encode.decode.load import load_item
from hevc_vit.encode.engines.ray.stages import (
    _located,
    block_number,
    block_written,
    fail_once,
    feature_columns,
    hold,
    load_specs,
    passed_through,
    pickled,
)
from hevc_vit.encode.model.forward import EncodedItem
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.index import make_row, rank_index_name, rows_bytes
from hevc_vit.encode.readers.spec import InputSpec, RemoteFile
from hevc_vit.processing.processors import NativeResolutionProcessor


def test_pickled_columns_and_passed_through():
    values = [{"a": 1}, InputSpec("x.jpg"), None]
    column = pickled(values)
    assert column.dtype == object and [pickle.loads(b) for b in column] == values
    batch = {"spec": column, "key": np.arange(3), "id": np.array(["a", "b", "c"])}
    assert list(passed_through(batch, "spec", "id")) == ["key"]


def test_the_decode_stage_loads_each_spec_from_the_drivers_folder(tmp_path):
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(tmp_path / "a.png")
    specs = [InputSpec("a.png"), InputSpec("bad.jpg", error="no such file")]
    batch = {"spec": pickled(specs), "key": np.array(["00000000", "00000001"])}
    load = LoadOptions(NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48), 14)
    out = load_specs(batch, load, cwd=str(tmp_path))
    items = [pickle.loads(blob) for blob in out["item"]]
    assert [(i.index, i.path, i.error) for i in items] == [(0, "a.png", ""), (1, "bad.jpg", "no such file")]
    want = load_item(0, str(tmp_path / "a.png"), load)  # a relative path is read from cwd and keeps its name
    assert np.array_equal(items[0].patches.numpy(), want.patches.numpy()) and items[0].grid_thw == want.grid_thw
    assert list(out) == ["key", "item"]


def test_located_only_moves_a_relative_local_path():
    assert _located(InputSpec("a.jpg"), "/run").path == os.path.join("/run", "a.jpg")
    assert _located(InputSpec("/abs/a.jpg"), "/run").path == "/abs/a.jpg"
    remote = InputSpec("s3://b/a.jpg", ref=RemoteFile("s3://b/a.jpg"))
    assert _located(remote, "/run") is remote


def test_block_numbers_and_written_blocks(tmp_path):
    assert block_number(np.array([7, 3, 9])) == 3
    rows = [{"path": "a"}, {"path": "b"}]
    assert not block_written(tmp_path, 3, rows)
    (tmp_path / rank_index_name(3)).write_bytes(rows_bytes(rows[:1]))
    assert not block_written(tmp_path, 3, rows)  # only partly: the block is done again
    (tmp_path / rank_index_name(3)).write_bytes(rows_bytes(rows))
    assert block_written(tmp_path, 3, rows)


def test_the_fault_seams_do_nothing_unless_they_name_the_stage(tmp_path):
    fault = tmp_path / "fault"
    start = time.monotonic()
    hold(None, "decode")
    fail_once(None, "decode")
    fault.write_text("hold model")
    hold(str(fault), "decode")  # names another stage
    fault.write_text("model")
    fail_once(str(fault), "decode")
    assert fault.read_text() == "model" and time.monotonic() - start < 1  # untouched, and no wait


def test_feature_columns_one_row_per_result():
    ok = make_row("a", status="ok", key="k", grid_thw=[1, 2, 2])
    failed = make_row("b", status="failed", error="broken")
    tensors = {"grid_thw": torch.tensor([1, 2, 2]), "pooled": torch.ones(4), "patches": torch.ones(4, 4)}
    results = [EncodedItem(ok, tensors, 4), EncodedItem(failed)]
    out = feature_columns(results, 4, EncodeOptions(storage_dtype="float16"), pool="head", pooled_only=False)
    assert list(out["status"]) == ["ok", "failed"] and list(out["error"]) == ["", "broken"]
    assert [json.loads(r)["path"] for r in out["index_row"]] == ["a", "b"]
    assert out["pooled"].dtype == np.float16 and np.isnan(out["pooled"][1]).all()  # a failed row: NaN
    assert out["patches"][0].shape == (4, 4) and out["patches"][1].shape == (0, 4)
    pooled_only = feature_columns(results, 4, EncodeOptions(), pool="mean", pooled_only=True)
    assert "patches" not in pooled_only and pooled_only["pooled"].dtype == np.float32
    assert "pooled" not in feature_columns(results, 4, EncodeOptions(), pool="none", pooled_only=False)
