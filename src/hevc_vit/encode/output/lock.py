"""Exclusive ownership of an ``hevc-vit encode`` output folder (``DIR/.encode.lock``)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hevc_vit.encode.output.index import LOCK_NAME


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
    def acquire(cls, folder: str | os.PathLike) -> FolderLock:
        """Take the lock, creating ``folder`` if needed; ``FileExistsError`` naming the holder if it is taken."""
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
        lock = cls(folder, fd, created)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
        except BaseException:  # a full disk: let go, or this process would refuse its own later runs on the folder
            lock.release()
            raise
        return lock

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

    def __enter__(self) -> FolderLock:
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
