"""The output folder of ``hevc-vit encode``: safetensors shards written atomically, the JSON Lines index,
and reading features back.

Layout of ``DIR``::

    index.jsonl                     one row per input, in input order (written last, atomically)
    encode_config.json              model, processor and options of the run (checked by --resume)
    shards/rank00000-00000.safetensors
    index.rank00000.jsonl           rows of one rank while a run is in progress (merged, then removed)
    .encode.lock                    held (flock) by the run that owns the folder, removed when it ends

A shard holds, per encoded item with key ``K``: ``K.patches`` ``(N, D)`` patch features, ``K.pooled``
``(D,)`` and ``K.grid_thw`` ``(3,)`` int64 — the tensors the run was asked for. A row names its shard only
after that shard is complete on disk, so the index never points at a missing or partial file, and a shard
is never written over an existing file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

INDEX_NAME = "index.jsonl"
CONFIG_NAME = "encode_config.json"
SHARD_DIR = "shards"
ROW_FIELDS = ("path", "shard", "key", "shape", "grid_thw", "status", "error")
LOCK_NAME = ".encode.lock"
_RANK_INDEX = re.compile(r"^index\.rank(\d+)\.jsonl$")
# exactly the names a run writes in shards/ (a finished shard, or its temporary file): nothing else is touched
SHARD_NAME = re.compile(r"^rank(\d{5,})-(\d{5,})\.safetensors(\.tmp\d+)?$")


def shard_name(rank: int, number: int) -> str:
    """``shards/rankRRRRR-NNNNN.safetensors``, relative to the output folder."""
    return f"{SHARD_DIR}/rank{rank:05d}-{number:05d}.safetensors"


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
    shard = Path(out_dir) / row["shard"]
    with safe_open(shard, framework="pt") as f:
        return _tensors_of(f, row, shard, list(f.keys()))


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
                loaded[i] = _tensors_of(f, rows[i], Path(out_dir) / shard, names)
    for i, row in enumerate(rows):
        yield row, loaded[i]


class MissingFeaturesError(KeyError):
    """An ``ok`` row whose tensors are not in its shard: the output folder is damaged."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _tensors_of(f, row: dict[str, Any], shard: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``row`` in the open shard ``f``; raises ``MissingFeaturesError`` (a ``KeyError``) when the
    shard does not hold them: an ``ok`` row never reads back as nothing."""
    prefix = row["key"] + "."
    out = {n[len(prefix):]: f.get_tensor(n) for n in names if n.startswith(prefix)}
    if "grid_thw" not in out or not ({"patches", "pooled"} & out.keys()):
        raise MissingFeaturesError(
            f"row for {row.get('path')!r} says its features are under key {row['key']!r} in {shard}, but that shard "
            f"holds {sorted(out) or 'no tensors'} for the key (expected grid_thw and patches or pooled); "
            f"the folder is damaged: re-encode this input (--resume redoes inputs whose row is removed)"
        )
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished file ``tmp`` the name ``final``, which must not exist: a hard link fails on an
    existing name, where ``os.replace`` would silently destroy another run's shard."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        tmp.unlink()
        raise FileExistsError(
            f"{final} appeared while this run was writing it; another process is writing to {final.parent.parent}"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links on this filesystem: reserve the name (O_EXCL), then rename onto our own placeholder
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(tmp, final)
    else:
        tmp.unlink()
    _fsync_folder(final.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a new name in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it, which would
    race with threads creating files); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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

    A shard goes to ``shards/rankRRRRR-NNNNN.safetensors`` through a temporary file and a hard link that fails
    if the name exists (never a rename over another file); only then are its rows appended (and synced) to
    the rank's index file. Numbering continues after the shards already in the folder, so a resumed run never
    replaces a file. Failed items' rows are appended at once. ``shard_bytes=0``: one shard per
    ``end_forward()`` (per forward of the model).

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
        self._mode = 0o666 & ~_umask()  # safetensors creates 0600 files; a shard gets the usual mode

    def _existing_numbers(self) -> list[int]:
        found = (SHARD_NAME.match(p.name) for p in (self.out_dir / SHARD_DIR).iterdir())
        return [int(m.group(2)) for m in found if m and int(m.group(1)) == self.rank]

    def add(self, row: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Queue one encoded item: ``row`` (its ``shard`` is filled in on write) and its named tensors."""
        for name, tensor in tensors.items():
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
        name = shard_name(self.rank, self._next)
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
            os.fchmod(f.fileno(), self._mode)
            os.fsync(f.fileno())
        _publish(tmp, final)
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


class FolderLock:
    """Exclusive ownership of an output folder for the life of one run.

    An ``flock`` on ``DIR/.encode.lock``: the kernel drops it when the process ends, however it ends (kill -9
    included), so a crashed run never leaves a stale lock. The holder writes its pid, host and start time
    into the file, so a refused run can say who holds the folder. Under ``torchrun`` rank 0 holds the lock for
    the whole run (the ranks of one run share the folder; each writes only its own ``rankRRRRR`` files).
    """

    def __init__(self, folder: Path, fd: int, created: list[Path]):
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd: int | None = fd
        self._created = created  # the folders acquire made, the deepest first

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "FolderLock":
        """Take the lock, creating ``folder`` if needed; ``FileExistsError`` naming the holder if it is taken."""
        import fcntl

        folder = Path(folder)
        whole = folder.absolute()
        created = [p for p in (whole, *whole.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FileExistsError(
                    f"--out {folder} is in use by another hevc-vit encode run ({holder}); two runs must not share "
                    f"an output folder: wait for it to finish, or choose another --out"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it finishes: if it did so after we opened it, we hold a
            # lock on a file nobody else will see. Lock the file that is at the path now.
            try:
                now = os.stat(path)
                mine = os.fstat(fd)
                if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
        return cls(folder, fd, created)

    def release(self) -> None:
        """Remove the lock file and drop the lock; folders ``acquire`` created that nothing else filled are
        removed, so a run refused or failed before writing leaves nothing behind."""
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding the lock (see acquire)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        for folder in self._created:
            try:
                folder.rmdir()  # only succeeds when empty
            except OSError:
                break

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int, wait: float = 1.0) -> str:
    """Who holds the lock, from the lock file; the holder writes it right after locking, so a run that
    lost the race by microseconds waits up to ``wait`` seconds for the record."""
    deadline = time.monotonic() + wait
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "holder not yet recorded"
            time.sleep(0.02)
