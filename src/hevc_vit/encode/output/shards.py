"""Features on disk: safetensors shards written whole or not at all, and read back per row.

A shard holds, per encoded item with key ``K``: ``K.patches`` ``(N, D)`` patch features, ``K.pooled``
``(D,)`` and ``K.grid_thw`` ``(3,)`` int64 — the tensors the run was asked for. A shard is written to a
temporary file, synced, and published under a name that must not exist (never over another file); only
then are its rows appended to the rank's index file: the rows commit it. A write that fails (a full disk)
leaves neither a temporary file, nor a partial row, nor a part without its rows behind; what a killed run
leaves between the two steps is settled by ``--resume`` (:mod:`.recovery`).

Test seam: :func:`save_shard` (the bytes of every shard) is looked up when called, so a test may replace it
to simulate a full disk; :mod:`.index` has the seams of the index files.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch  # save_file looked up when called: a test seam (a race with another writer)
import torch
from safetensors import SafetensorError, safe_open

from hevc_vit.encode.output import index as index_files
from hevc_vit.encode.output.formats import existing_numbers, part_files, part_keys, part_name, write_part
from hevc_vit.encode.output.index import SHARD_DIR, rank_index_name, read_index
from hevc_vit.files import publish_new, temporary_sibling


def save_shard(tensors: dict[str, torch.Tensor], path: Path, mode: int) -> None:
    """Write ``tensors`` as the safetensors file ``path`` with permissions ``mode``, synced to disk. An I/O error
    of safetensors' writer (a ``SafetensorError`` naming the OS error) is raised as that ``OSError``."""
    try:
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        number = re.search(r"\(os error (\d+)\)", str(e))
        if number is None:
            raise
        code = int(number.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e
    with open(path, "rb+") as f:
        os.fchmod(f.fileno(), mode)
        os.fsync(f.fileno())


def _file_mode() -> int:
    """The mode a new file gets under the process's umask, read without changing it where Linux shows it
    (``os.umask`` sets it, which would race with threads creating files); elsewhere set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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

    Shards go to ``shards/rankRRRRR-NNNNN.safetensors``; numbering continues after the shards already in the
    folder, so a resumed run never replaces a file. Failed items' rows are appended at once.
    ``shard_bytes=0``: one shard per ``end_forward()`` (per forward of the model).

    With ``background=True`` a shard is written by one helper thread while the caller goes on (at most one
    shard in flight; a write error is raised by the next ``flush`` or by ``close``).
    """

    def __init__(
        self,
        out_dir: Path,
        rank: int,
        shard_bytes: int,
        background: bool = False,
        output_format: str = "safetensors",
        storage_dtype: torch.dtype | None = None,
    ):
        """output_format: ``safetensors``, or a format of :mod:`.formats` (parts instead of shards);
        storage_dtype: the dtype floating features are stored in (None: as they come)."""
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.shard_bytes = shard_bytes
        self.output_format, self.storage_dtype = output_format, storage_dtype
        if output_format == "safetensors":  # the parts of other formats make their own folders
            (self.out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._next = 1 + max(self._existing_numbers(), default=-1)
        self._tensors: dict[str, torch.Tensor] = {}
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        index_path = self.out_dir / rank_index_name(rank)
        _drop_torn_tail(index_path)
        self._index_fd: int | None = os.open(index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._lock = threading.Lock()  # the index file is appended from the caller and the helper thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if background else None
        self._in_flight: Future | None = None
        self.shards_written = 0
        self._mode = _file_mode()  # safetensors creates 0600 files; a shard gets the usual mode

    def _existing_numbers(self) -> list[int]:
        return existing_numbers(self.out_dir, self.rank)  # every format's folder: a number is never reused

    def add(self, row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Queue one encoded item: ``row`` (its ``shard`` is filled in on write) and its named tensors."""
        for name, tensor in tensors.items():
            if self.storage_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.storage_dtype)
            self._tensors[f"{row['key']}.{name}"] = tensor.contiguous()
            self._bytes += tensor.numel() * tensor.element_size()
        self._rows.append(row)
        if self.shard_bytes and self._bytes >= self.shard_bytes:
            self.flush()

    def end_forward(self) -> None:
        """The items of one forward are all added: with ``shard_bytes=0`` they become one shard."""
        if not self.shard_bytes:
            self.flush()

    def add_failure(self, row: dict[str, Any]) -> None:
        self._append([row])

    def flush(self) -> None:
        """Write the queued items as one shard (if any), then their rows."""
        self._wait()
        if not self._rows:
            return
        name = part_name(self.output_format, self.rank, self._next)
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
        final = self.out_dir / name
        tmp = temporary_sibling(final)
        try:
            if self.output_format == "safetensors":
                save_shard(tensors, tmp, self._mode)
                publish_new(tmp, final)
            else:  # an npy-parquet or parquet part: its files are written whole or not at all
                write_part(self.output_format, self.out_dir, name, tensors, rows, self._mode)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise FileExistsError(
                f"{final} appeared while this run was writing it; another process is writing to {self.out_dir}"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)  # a shard is whole or absent
            raise
        for row in rows:
            row["shard"] = name
        try:
            self._append(rows)  # the rows commit the part
        except BaseException:
            for path in part_files(self.out_dir, name):  # not committed: its inputs are redone by --resume
                path.unlink(missing_ok=True)
            raise
        self.shards_written += 1

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # raises the helper thread's error, if any

    def _append(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            size = os.fstat(self._index_fd).st_size
            try:
                index_files.append_rows(self._index_fd, rows)
            except BaseException:
                os.ftruncate(self._index_fd, size)  # no partial row: the file is as it was
                raise

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
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None


# --------------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------------


class MissingFeaturesError(KeyError):
    """An ``ok`` row whose tensors are not in its shard: the output folder is damaged."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def shard_keys(path: Path) -> set[str]:
    """The tensor names in the shard at ``path`` (its header only; for a parquet part, as a shard would name
    them); raises what reading it raises."""
    if path.suffix == ".parquet":
        return part_keys(path)
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def holds_features(names: set[str] | list[str], key: str) -> bool:
    """The shard tensor ``names`` hold an item's features under ``key``: ``grid_thw`` and patches or pooled."""
    return f"{key}.grid_thw" in names and (f"{key}.patches" in names or f"{key}.pooled" in names)


def load_features(out_dir: str | os.PathLike, row: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one encoded row: ``patches``, ``pooled`` and ``grid_thw`` (those the run saved)."""
    if row.get("status") != "ok":
        raise ValueError(f"row for {row.get('path')!r} has status {row.get('status')!r}: {row.get('error')}")
    shard = Path(out_dir) / row["shard"]
    _check_safetensors(shard)
    with safe_open(shard, framework="pt") as f:
        return _tensors_of(f, row, shard, list(f.keys()))


def iter_features(out_dir: str | os.PathLike) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """``(row, tensors)`` for every encoded row of the index, in input order, each shard opened once."""
    rows = [row for row in read_index(out_dir) if row.get("status") == "ok"]
    by_shard: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_shard.setdefault(row["shard"], []).append(i)
    loaded: dict[int, dict[str, torch.Tensor]] = {}
    for shard, members in by_shard.items():
        _check_safetensors(Path(out_dir) / shard)
        with safe_open(Path(out_dir) / shard, framework="pt") as f:
            names = list(f.keys())
            for i in members:
                loaded[i] = _tensors_of(f, rows[i], Path(out_dir) / shard, names)
    for i, row in enumerate(rows):
        yield row, loaded[i]


def _tensors_of(f, row: dict[str, Any], shard: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``row`` in the open shard ``f``; raises ``MissingFeaturesError`` (a ``KeyError``) when the
    shard does not hold them: an ``ok`` row never reads back as nothing."""
    prefix = row["key"] + "."
    out = {n[len(prefix) :]: f.get_tensor(n) for n in names if n.startswith(prefix)}
    if not holds_features(names, row["key"]):
        raise MissingFeaturesError(
            f"row for {row.get('path')!r} says its features are under key {row['key']!r} in {shard}, but that shard "
            f"holds {sorted(out) or 'no tensors'} for the key (expected grid_thw and patches or pooled); "
            f"the folder is damaged: re-encode this input (--resume redoes inputs whose row is removed)"
        )
    return out


def _check_safetensors(shard: Path) -> None:
    if shard.suffix == ".parquet":
        raise ValueError(
            f"{shard} is a part of an npy-parquet or parquet run (--output-format); read it with pyarrow "
            f"(pyarrow.parquet.read_table) and its embeddings/*.npy with numpy.load, not as safetensors shards"
        )
