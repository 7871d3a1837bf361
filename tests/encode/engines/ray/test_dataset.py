"""The dataset engine's plain functions, without Ray: the column naming each row, and a model call's results as
columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hevc_vit.encode.engines.ray.dataset import _row_names, feature_columns, load_rows
from hevc_vit.encode.options import EncodeOptions
from hevc_vit.encode.output.index import make_row


def test_row_names_come_from_path_or_id_or_the_named_column():
    assert _row_names({"id": np.array([1, 2]), "image": np.array([0, 0])}, None) == ["1", "2"]
    assert _row_names({"path": np.array([b"a.jpg"]), "id": np.array([5])}, None) == ["a.jpg"]  # path first
    assert _row_names({"name": np.array(["x"])}, "name") == ["x"]
    with pytest.raises(ValueError, match=r"path_column=None: the dataset has the columns \['image'\]"):
        _row_names({"image": np.array([0])}, None)
    with pytest.raises(ValueError, match="path_column='nope'"):
        _row_names({"id": np.array([0])}, "nope")


def test_load_rows_names_a_missing_image_column():
    with pytest.raises(ValueError, match=r"image_column='image' is not a column of the dataset; it has \['id', 'x'\]"):
        load_rows({"id": np.array([0]), "x": np.array([0])}, None, EncodeOptions())


def test_feature_columns_one_row_per_result():
    ok = make_row("a", status="ok", key="k", grid_thw=[1, 2, 2])
    failed = make_row("b", status="failed", error="broken")
    tensors = {"grid_thw": torch.tensor([1, 2, 2]), "pooled": torch.ones(4), "patches": torch.ones(4, 4)}
    results = [(ok, tensors, None), (failed, {}, None)]
    out = feature_columns(results, 4, EncodeOptions(storage_dtype="float16"), pool="head", pooled_only=False)
    assert list(out["status"]) == ["ok", "failed"] and list(out["error"]) == ["", "broken"]
    assert [json.loads(r)["path"] for r in out["index_row"]] == ["a", "b"]
    assert out["pooled"].dtype == np.float16 and np.isnan(out["pooled"][1]).all()  # a failed row: NaN
    assert out["patches"][0].shape == (4, 4) and out["patches"][1].shape == (0, 4)
    pooled_only = feature_columns(results, 4, EncodeOptions(), pool="mean", pooled_only=True)
    assert "patches" not in pooled_only and pooled_only["pooled"].dtype == np.float32
    assert "pooled" not in feature_columns(results, 4, EncodeOptions(), pool="none", pooled_only=False)
