"""Tables of paths on their own: the path column, the cheap layout and first value, one spec per row."""

from __future__ import annotations

import json
import os

import pytest

from hevc_vit.encode.readers.remote import Network
from hevc_vit.encode.readers.spec import RemoteFile
from hevc_vit.encode.readers.tables import (
    TableColumnError,
    check_columns,
    first_value,
    is_table,
    path_column,
    table_layout,
    table_specs,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = {
    "url": ["a.jpg", "https://host/b.jpg", "", None],
    "caption": ["x", "y", "z", "w"],
    "id": ["007", "8", "9", "10"],
}


def _write(path, kind: str):
    table = pa.table(ROWS)
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=2)
    elif kind == "jsonl":
        path.write_text("".join(_json(r) for r in table.to_pylist()))
    else:
        import pyarrow.csv as pc

        pc.write_csv(table, path, pc.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    return path


def _json(row) -> str:
    return json.dumps(row) + "\n"


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "jsonl"])
def test_table_specs_one_per_row_relative_paths_from_the_table_folder(tmp_path, kind):
    table = _write(tmp_path / f"t.{kind}", kind)
    assert is_table(str(table))
    specs = table_specs(str(table), None, ["caption", "id"], Network())
    assert [s.path for s in specs[:2]] == [os.path.join(tmp_path, "a.jpg"), "https://host/b.jpg"]
    assert specs[0].ref is None and specs[1].ref == RemoteFile("https://host/b.jpg")
    assert [s.extra for s in specs[:2]] == [{"caption": "x", "id": "007"}, {"caption": "y", "id": "8"}]  # text kept
    assert [s.error for s in specs[2:]] == ["row 2: the url column is empty", "row 3: the url column is empty"]
    assert specs[2].path == f"{table}#row2"


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_table_layout_and_first_value_read_what_the_whole_table_holds(tmp_path, kind):
    table = _write(tmp_path / f"t.{kind}", kind)
    columns, groups = table_layout(str(table), Network())
    assert set(columns) == set(ROWS)
    assert groups == ([2, 2] if kind == "parquet" else None)
    assert first_value(str(table), "caption", Network()) == "x"
    if kind == "parquet":  # a row group alone, numbered from the table's first row
        specs = table_specs(str(table), "url", [], Network(), row_group=1, first_row=2)
        assert [s.error.split(":")[0] for s in specs] == ["row 2", "row 3"]


def test_the_path_column_and_missing_columns_are_named():
    assert path_column("t.csv", ["image", "url"], None) == "url"  # path, url, image: the first present
    assert path_column("t.csv", ["image", "url"], "image") == "image"
    with pytest.raises(TableColumnError, match=r"path_column='file' is not a column; the table has \['a'\]"):
        path_column("t.csv", ["a"], "file")
    with pytest.raises(TableColumnError, match="no column path, url or image"):
        path_column("t.csv", ["a"], None)
    with pytest.raises(TableColumnError, match=r"keep_columns \['b'\] are not columns"):
        check_columns("t.csv", ["path", "a"], None, ["a", "b"])
