"""The output folder of ``hevc-vit encode``: safetensors shards written atomically, the JSON Lines index,
and reading features back.

Layout of ``DIR``::

    index.jsonl                     one row per input, in input order (written last, atomically)
    encode_config.json              model, processor and options of the run (checked by --resume)
    shards/rank00000-00000.safetensors
    index.rank00000.jsonl           rows of one rank while a run is in progress (merged, then removed)

A shard holds, per encoded item with key ``K``: ``K.patches`` ``(N, D)`` patch features, ``K.pooled``
``(D,)`` and ``K.grid_thw`` ``(3,)`` int64 — the tensors the run was asked for. A row names its shard only
after that shard is complete on disk, so the index never points at a missing or partial file.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

INDEX_NAME = "index.jsonl"
CONFIG_NAME = "encode_config.json"
SHARD_DIR = "shards"
ROW_FIELDS = ("path", "shard", "key", "shape", "grid_thw", "status", "error")
_RANK_INDEX = re.compile(r"^index\.rank(\d+)\.jsonl$")


def rank_index_name(rank: int) -> str:
    return f"index.rank{rank:05d}.jsonl"


def make_row(path: str, *, status: str, error: str = "", shard: str = "", key: str = "", shape=None,
             grid_thw=None, **extra: Any) -> dict[str, Any]:
    """An index row: ``path``, ``shard`` (relative to DIR), ``key``, ``shape``, ``grid_thw``, ``status``
    (``ok`` or ``failed``), ``error`` (empty when the item encoded), then any extra fields."""
    row = {"path": path, "shard": shard, "key": key, "shape": shape, "grid_thw": grid_thw, "status": status,
           "error": error}
    row.update(extra)
    return row


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see all or nothing."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def write_index(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; a torn last line (a run killed mid-write) is ignored, any other bad line
    raises ``ValueError`` naming the file and line."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n} is not a JSON row: {e}") from None
    return rows


def rank_index_files(out_dir: Path) -> list[Path]:
    """The per-rank index files in ``out_dir`` (left by a run in progress or interrupted), by rank."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _RANK_INDEX.match(p.name))]
    return [p for _, p in sorted(found)]


def read_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest row per input path: the merged index, then the rank files (newer) on top."""
    rows: dict[str, dict[str, Any]] = {}
    files = ([out_dir / INDEX_NAME] if (out_dir / INDEX_NAME).is_file() else []) + rank_index_files(out_dir)
    for path in files:
        for row in read_jsonl(path):
            rows[row["path"]] = row
    return rows


def read_index(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``DIR/index.jsonl``, in input order."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the index of a finished hevc-vit encode run")
    return read_jsonl(path)


def load_features(out_dir: str | os.PathLike, row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one encoded row: ``patches``, ``pooled`` and ``grid_thw`` (those the run saved)."""
    from safetensors import safe_open

    if row.get("status") != "ok":
        raise ValueError(f"row for {row.get('path')!r} has status {row.get('status')!r}: {row.get('error')}")
    out = {}
    with safe_open(Path(out_dir) / row["shard"], framework="pt") as f:
        prefix = row["key"] + "."
        for name in f.keys():
            if name.startswith(prefix):
                out[name[len(prefix):]] = f.get_tensor(name)
    return out


def iter_features(out_dir: str | os.PathLike) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """``(row, tensors)`` for every encoded row of the index, in input order, each shard opened once."""
    from safetensors import safe_open

    rows = [row for row in read_index(out_dir) if row.get("status") == "ok"]
    by_shard: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_shard.setdefault(row["shard"], []).append(i)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    for shard, members in by_shard.items():
        with safe_open(Path(out_dir) / shard, framework="pt") as f:
            names = list(f.keys())
            for i in members:
                prefix = rows[i]["key"] + "."
                loaded[i] = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
    for i, row in enumerate(rows):
        yield row, loaded[i]


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a killed run (every row is written whole, ending in a newline),
    so rows appended now start on a line of their own. Its input had no complete row and is redone."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class ShardWriter:
    """Collects per-item tensors and writes them as safetensors shards of about ``shard_bytes`` each.

    A shard goes to ``shards/rankRRRRR-NNNNN.safetensors`` through a temporary file and a rename; only then
    are its rows appended (and synced) to the rank's index file. Numbering continues after the shards
    already in the folder, so a resumed run never replaces a file. Failed items' rows are appended at once.

    With ``background=True`` a shard is written by one helper thread while the caller goes on (at most one
    shard in flight; a write error is raised by the next ``flush`` or by ``close``).
    """

    def __init__(self, out_dir: Path, rank: int, shard_bytes: int, background: bool = False):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.shard_bytes = shard_bytes
        (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._next = 1 + max(self._existing_numbers(), default=-1)
        self._tensors: dict[str, torch.Tensor] = {}
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        index_path = self.out_dir / rank_index_name(rank)
        _drop_torn_tail(index_path)
        self._index = open(index_path, "a", encoding="utf-8")
        self._lock = threading.Lock()  # the index file is appended from the caller and the helper thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if background else None
        self._in_flight: Future | None = None
        self.shards_written = 0

    def _existing_numbers(self) -> list[int]:
        pattern = re.compile(rf"^rank{self.rank:05d}-(\d+)\.safetensors")
        return [int(m.group(1)) for p in (self.out_dir / SHARD_DIR).iterdir() if (m := pattern.match(p.name))]

    def add(self, row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Queue one encoded item: ``row`` (its ``shard`` is filled in on write) and its named tensors."""
        for name, tensor in tensors.items():
            self._tensors[f"{row['key']}.{name}"] = tensor.contiguous()
            self._bytes += tensor.numel() * tensor.element_size()
        self._rows.append(row)
        if self._bytes >= self.shard_bytes:
            self.flush()

    def add_failure(self, row: dict[str, Any]) -> None:
        self._append([row])

    def flush(self) -> None:
        """Write the queued items as one shard (if any), then their rows."""
        self._wait()
        if not self._rows:
            return
        name = f"{SHARD_DIR}/rank{self.rank:05d}-{self._next:05d}.safetensors"
        final = self.out_dir / name
        if final.exists():  # numbering starts after existing shards; this means another writer shares the rank
            raise FileExistsError(f"{final} exists; two runs may be writing to {self.out_dir} with the same rank")
        job = (self._tensors, self._rows, name)
        self._tensors, self._rows, self._bytes = {}, [], 0
        self._next += 1
        if self._pool is None:
            self._write(*job)
        else:
            self._in_flight = self._pool.submit(self._write, *job)

    def _write(self, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]], name: str) -> None:
        from safetensors.torch import save_file

        final = self.out_dir / name
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for row in rows:
            row["shard"] = name
        self._append(rows)
        self.shards_written += 1

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # raises the helper thread's error, if any

    def _append(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._index.write("".join(json.dumps(row) + "\n" for row in rows))
            self._index.flush()
            os.fsync(self._index.fileno())

    def close(self) -> None:
        """Write what is queued, wait for the shard in flight, and close the rank's index file."""
        try:
            self.flush()
            self._wait()
        finally:
            self._shutdown()

    def abandon(self) -> None:
        """Close without writing queued items (after an error): their inputs are redone by ``--resume``.
        A shard already in flight is completed, so nothing half-written is left behind."""
        self._tensors, self._rows, self._bytes = {}, [], 0
        try:
            self._wait()
        except Exception:  # the run is already failing with the error that matters
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if not self._index.closed:
            self._index.close()
