"""The dataset engine's plain functions, without Ray: the column naming each row, and a model call's results as
columns."""

from __future__ import annotations

import numpy as np
import pytest

from hevc_vit.encode.engines.ray.dataset import _row_names, load_rows
from hevc_vit.encode.options import EncodeOptions


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
