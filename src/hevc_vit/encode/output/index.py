"""The output folder of ``hevc-vit encode``: its layout, and its index of one JSON row per input.

Layout of ``DIR``::

    index.jsonl                     one row per input, in input order (written last, atomically)
    encode_config.json              model, processor and options of the run (checked by --resume)
    shards/rank00000-00000.safetensors
    index.rank00000.jsonl           rows of one rank while a run is in progress (merged, then removed)
    .encode.lock                    held (flock) by the run that owns the folder, removed when it ends

A row names its shard only after that shard is complete on disk (:mod:`.shards`), so the index never points
at a missing or partial file. Rows are appended whole or not at all: a row cut short by a killed run can
only be the last line of a rank file, and is dropped on reading.

Test seams: :func:`append_rows` (every append to a rank's index file) and :func:`write_index` (the merged
index) are looked up when called, so a test may replace them to simulate a full disk.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hevc_vit.encode.options.choices import ITEM_FIELDS, ROW_FIELDS  # noqa: F401  (public here before)
from hevc_vit.encode.readers.spec import KeyBook, item_key, json_value  # noqa: F401  (public here before)
from hevc_vit.files import write_atomic

INDEX_NAME = "index.jsonl"
ENCODE_CONFIG_NAME = "encode_config.json"
SHARD_DIR = "shards"
LOCK_NAME = ".encode.lock"
RANK_INDEX_NAME = re.compile(r"^index\.rank(\d+)\.jsonl$")
# exactly the names a run writes in shards/ (a finished shard, or its temporary file): nothing else is touched
SHARD_NAME = re.compile(r"^rank(\d{5,})-(\d{5,})\.safetensors(\.tmp\d+)?$")


class DamagedFolderError(ValueError):
    """The output folder holds a file that cannot be read as this library wrote it; the message names the
    file (and line) and what to do."""


def shard_name(rank: int, number: int) -> str:
    """``shards/rankRRRRR-NNNNN.safetensors``, relative to the output folder."""
    return f"{SHARD_DIR}/rank{rank:05d}-{number:05d}.safetensors"


def rank_index_name(rank: int) -> str:
    return f"index.rank{rank:05d}.jsonl"


def make_row(
    path: str,
    *,
    status: str,
    error: str = "",
    shard: str = "",
    key: str = "",
    shape=None,
    grid_thw=None,
    **extra: Any,
) -> dict[str, Any]:
    """An index row: ``path``, ``shard`` (relative to DIR), ``key``, ``shape``, ``grid_thw``, ``status``
    (``ok`` or ``failed``), ``error`` (empty when the item encoded), then any extra fields."""
    row = {"path": path, "shard": shard, "key": key, "shape": shape, "grid_thw": grid_thw, "status": status}
    row["error"] = error
    row.update(extra)
    return row


def failed_row(path: str, key: str, error: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row of an input that failed; ``key``: its shard key; ``extra``: its fields from the source (``id``,
    kept columns)."""
    return make_row(path, status="failed", error=error, key=key, **(extra or {}))


def row_json(row: dict[str, Any]) -> str:
    """One index row as one line of strict JSON (see :func:`json_value`; never ``NaN``)."""
    return json.dumps(json_value(row), allow_nan=False)


def rows_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(row_json(row) + "\n" for row in rows).encode("utf-8")


def write_index(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write the merged index (all or nothing: a temporary file, then a rename)."""
    write_atomic(path, rows_bytes(rows))


def append_rows(fd: int, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to the open rank index file ``fd`` (opened ``O_APPEND``) and sync them. On an error
    the caller cuts the file back to its size before the call, so no partial row stays."""
    view = memoryview(rows_bytes(rows))
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def read_jsonl(path: Path, on_torn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file. A torn last line (a run killed mid-write) is dropped and reported to
    ``on_torn``; any other line that is not a JSON object raises :class:`DamagedFolderError` naming the file
    and line, and what to do."""
    rows = []
    lines = path.read_bytes().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:  # not JSON, or not UTF-8
            if n == len(lines):
                if on_torn is not None:
                    on_torn(f"{path}:{n}: dropped a last line cut short by an interrupted run; its input is redone")
                break
            raise DamagedFolderError(_damaged_line(path, n, f"is not a JSON row ({e})")) from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise DamagedFolderError(_damaged_line(path, n, "is not an index row (a JSON object with a 'path')"))
        rows.append(row)
    return rows


def _damaged_line(path: Path, line: int, what: str) -> str:
    return (
        f"{path}:{line} {what}: the output folder is damaged. Delete that line (--resume then encodes its input "
        f"again), or start again with --overwrite"
    )


def rank_index_files(out_dir: Path) -> list[Path]:
    """The per-rank index files in ``out_dir`` (left by a run in progress or interrupted), by rank."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := RANK_INDEX_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def read_rows(out_dir: Path, on_torn: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """The latest row per input path: the merged index, then the rank files (newer) on top."""
    rows: dict[str, dict[str, Any]] = {}
    files = ([out_dir / INDEX_NAME] if (out_dir / INDEX_NAME).is_file() else []) + rank_index_files(out_dir)
    for path in files:
        for row in read_jsonl(path, on_torn):
            rows[row["path"]] = row
    return rows


def read_index(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``DIR/index.jsonl``, in input order."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the index of a finished hevc-vit encode run")
    return read_jsonl(path)


def merge_index(out_dir: Path, paths: list[str], complete: bool = True) -> list[dict[str, Any]]:
    """Rank 0 after every rank finished: one row per input (``paths[i]``), in input order, from the rank files
    and an earlier index (every input has a row there: failures too); rows of an earlier run's inputs that this
    run was not given are kept at the end. Writes ``index.jsonl``, then removes the rank files.
    ``complete=False`` (a run stopped by an error or a signal): inputs without a row are left out."""
    latest = read_rows(out_dir)
    rows, missing = [], []
    for path in paths:
        if path in latest:
            rows.append(latest.pop(path))
        else:
            missing.append(path)
    if missing and complete:
        raise RuntimeError(f"{len(missing)} inputs have no index row after every rank finished, e.g. {missing[:3]}")
    rows.extend(latest.values())
    write_index(out_dir / INDEX_NAME, rows)
    for rank_file in rank_index_files(out_dir):
        rank_file.unlink()
    return rows
