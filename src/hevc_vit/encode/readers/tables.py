"""Tables of paths or URLs as inputs: ``.parquet``, ``.csv``, ``.tsv`` and ``.jsonl`` files (pyarrow, the ``data``
extra), local or behind a URL, as img2dataset and clip-retrieval take them.

Each row is one input: the value of the path column (``--path-column``; by default the first of ``path``,
``url``, ``image`` that the table has), a local path (relative ones are taken from the table's folder) or a URL.
The columns named by ``--keep-columns`` are copied into the row's index entry. A table without the path column
or a kept column is a caller's error (:class:`TableColumnError`, a ``ValueError``, naming the columns it has);
a row whose path is empty is a failed row. The columns are checked before the run starts, from a parquet file's
footer or a csv/tsv file's header line; the rows are read by the rank that takes the table (:mod:`.units`): a
parquet file one row group at a time, each its own work unit.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Sequence
from typing import Any

from hevc_vit.encode.options.choices import INSTALL_HINT
from hevc_vit.encode.readers.remote import Network, open_location, with_retries
from hevc_vit.encode.readers.spec import InputSpec, RemoteFile, is_url, json_value
from hevc_vit.media.kinds import TABLE_EXTENSIONS

DEFAULT_PATH_COLUMNS = ("path", "url", "image")


class TableColumnError(ValueError):
    """A table lacks the column the options name (the path column or a kept column): the caller's mistake."""


def is_table(location: str) -> bool:
    return location.lower().endswith(TABLE_EXTENSIONS)


def _import_pyarrow(location: str) -> None:
    try:
        import pyarrow  # noqa: F401  (optional: the 'data' extra)
    except ImportError:
        raise ImportError(f"reading {location} needs pyarrow, which is not installed; {INSTALL_HINT}") from None


def read_table(location: str, network: Network, row_group: int | None = None):
    """The table at ``location`` as a ``pyarrow.Table`` (a URL is read as ``network`` says); with
    ``row_group``, that row group of a parquet file alone."""
    _import_pyarrow(location)

    def read():
        with open_location(location, network) as f:
            return _read(f, location.lower(), row_group)

    return with_retries(read, network.retries, f"reading {location}") if is_url(location) else read()


def table_layout(location: str, network: Network) -> tuple[list[str], list[int] | None]:
    """``(columns, row counts of the row groups)`` of the table at ``location``, read cheaply: a parquet
    file's footer, a csv/tsv file's header line; a jsonl file is read whole (its columns come from its rows).
    The row counts are None for a table that is not parquet."""
    _import_pyarrow(location)

    def read():
        lower = location.lower()
        with open_location(location, network) as f:
            if lower.endswith(".parquet"):
                import pyarrow.parquet as pq  # optional: the 'data' extra

                meta = pq.ParquetFile(f).metadata
                return meta.schema.to_arrow_schema().names, [
                    meta.row_group(g).num_rows for g in range(meta.num_row_groups)
                ]
            if lower.endswith(".jsonl"):
                return _read(f, lower, None).column_names, None
            return _csv_header(f, lower), None

    return with_retries(read, network.retries, f"reading {location}") if is_url(location) else read()


def first_value(location: str, column: str, network: Network) -> Any:
    """The value of ``column`` in the table's first row (None when it has no rows), read cheaply: a parquet
    file's first row group (that column alone), a csv/tsv file's first two lines; a jsonl file whole."""

    def read():
        lower = location.lower()
        with open_location(location, network) as f:
            if lower.endswith(".parquet"):
                import pyarrow.parquet as pq  # optional: the 'data' extra

                parquet = pq.ParquetFile(f)
                values = parquet.read_row_group(0, columns=[column]).column(0) if parquet.num_row_groups else []
            elif lower.endswith(".jsonl"):
                values = _read(f, lower, None).column(column)
            else:
                delimiter = "\t" if lower.endswith(".tsv") else ","
                head = [f.readline().decode("utf-8-sig"), f.readline().decode("utf-8")]
                rows = list(csv.reader(head, delimiter=delimiter))
                values = [dict(zip(rows[0], rows[1])).get(column)] if len(rows) > 1 else []
        return values[0] if len(values) else None

    value = with_retries(read, network.retries, f"reading {location}") if is_url(location) else read()
    return value.as_py() if hasattr(value, "as_py") else value


def _csv_header(f, lower: str) -> list[str]:
    """The column names of a csv/tsv file: its first record, which may span lines (a quoted name holding a
    newline), as the csv module and pyarrow read it."""
    delimiter = "\t" if lower.endswith(".tsv") else ","
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    try:
        return next(csv.reader(text, delimiter=delimiter), [])
    finally:
        text.detach()  # f stays open: the caller reads it again


def _read(f, lower: str, row_group: int | None):
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq  # optional: the 'data' extra

        return pq.read_table(f) if row_group is None else pq.ParquetFile(f).read_row_group(row_group)
    if lower.endswith(".jsonl"):
        import pyarrow.json as pj  # optional: the 'data' extra

        return pj.read_json(f)
    import pyarrow.csv as pc  # optional: the 'data' extra

    delimiter = "\t" if lower.endswith(".tsv") else ","
    # every column as text: a column of ids like 000123 keeps its zeros, and a path stays a path
    names = _csv_header(f, lower)
    f.seek(0)
    convert = pc.ConvertOptions(column_types=dict.fromkeys(names, "string"))
    parse = pc.ParseOptions(delimiter=delimiter, newlines_in_values=True)  # a quoted caption may span lines
    return pc.read_csv(f, parse_options=parse, convert_options=convert)


def path_column(location: str, columns: Sequence[str], asked: str | None) -> str:
    """The column holding the paths: ``asked``, else the first of ``path``, ``url``, ``image`` present."""
    if asked is not None:
        if asked not in columns:
            raise TableColumnError(f"{location}: path_column={asked!r} is not a column; the table has {list(columns)}")
        return asked
    for name in DEFAULT_PATH_COLUMNS:
        if name in columns:
            return name
    raise TableColumnError(
        f"{location} has no column path, url or image to take the inputs from; the table has {list(columns)}: "
        f"name one with --path-column"
    )


def check_columns(location: str, columns: Sequence[str], asked_column: str | None, keep_columns: Sequence[str]) -> str:
    """The path column of a table with ``columns``; raises :class:`TableColumnError` for a missing path or kept
    column."""
    column = path_column(location, columns, asked_column)
    missing = [name for name in keep_columns if name not in columns]
    if missing:
        raise TableColumnError(f"{location}: keep_columns {missing} are not columns; the table has {list(columns)}")
    return column


def table_specs(
    location: str,
    asked_column: str | None,
    keep_columns: Sequence[str],
    network: Network,
    row_group: int | None = None,
    first_row: int = 0,
) -> list[InputSpec]:
    """One spec per row of the table at ``location`` (of its row group ``row_group``, whose first row is row
    ``first_row`` of the table). Raises ``ValueError`` for a missing path or kept column."""
    table = read_table(location, network, row_group)
    column = check_columns(location, table.column_names, asked_column, keep_columns)
    values = table.column(column).to_pylist()
    kept = {name: table.column(name).to_pylist() for name in keep_columns}
    folder = posixpath.dirname(location) if is_url(location) else os.path.dirname(location)
    specs = []
    for i, value in enumerate(values):
        extra = {name: json_value(kept[name][i]) for name in keep_columns}
        if not isinstance(value, str) or not value.strip():
            if value in (None, ""):
                what = "empty"
            elif isinstance(value, str):
                what = f"{value!r}, only whitespace, not a path or URL"
            else:
                what = f"a {type(value).__name__}, not a path or URL"
            row = first_row + i
            specs.append(InputSpec(f"{location}#row{row}", f"row {row}: the {column} column is {what}", extra=extra))
            continue
        path = _resolve(value.strip(), folder, is_url(location))
        specs.append(InputSpec(path, ref=RemoteFile(path) if is_url(path) else None, extra=extra))
    return specs


def _resolve(value: str, folder: str, table_is_url: bool) -> str:
    if is_url(value) or os.path.isabs(value) or not folder:
        return value
    return posixpath.join(folder, value) if table_is_url else os.path.join(folder, value)
