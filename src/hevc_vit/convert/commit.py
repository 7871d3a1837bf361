"""The journaled commit: a verified folder takes DST's place, and a commit killed anywhere is finished later.

A small journal beside DST (``.DST.commit``, locked for the life of the commit, one per DST) records both
folders before anything moves; the new folder then goes in (swapped with the old one in one atomic step
where the OS can, else the old one renamed aside first), the old one is deleted, and the journal removed.
A run killed at any point leaves the journal, and :func:`finish_interrupted_commit` (which every
conversion to DST calls first) takes the commit from there to its end.

Test seams: ``on_stage`` (called with each of :data:`COMMIT_STAGES`), and :func:`exchange_folders`, which
tests replace with ``lambda a, b: False`` to run the two-rename fallback other systems get.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hevc_vit.files import fsync_folder

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, the journal alone keeps a conversion safe
    fcntl = None

# journal: the journal is written, nothing moved; old_aside: the old DST renamed aside and the new folder
# not yet in place (only where the two cannot be swapped atomically); new_in_place: DST is the new folder,
# the old one still kept; old_removed: the old one deleted, the journal not yet; committed: done.
COMMIT_STAGES = ("journal", "old_aside", "new_in_place", "old_removed", "committed")
# how long a conversion waits for another one's commit to the same DST to finish (or for the lock of its own new
# journal, which another conversion that found it empty holds for a moment while it removes it)
COMMIT_WAIT_S = 30.0
_JOURNAL_KEYS = ("new", "new_id", "old_id", "aside", "host", "pid")


class InterruptedCommitError(OSError):
    """A commit journal beside DST that cannot be finished safely (its folders were changed by hand)."""


def no_stage(stage: str) -> None:
    """The default ``on_stage``: stages pass unobserved."""


# -- names beside DST ---------------------------------------------------------------------------------


def journal_path(dst: Path) -> Path:
    """``.DST.commit`` beside DST."""
    return dst.parent / f".{dst.name}.commit"


def temporary_prefix(dst: Path, kind: str) -> str:
    """``.DST.KIND-HOST-PID-``: the name start of this process's temporary folders of ``kind`` (``partial``:
    a conversion being written; ``replaced``: an old DST moved aside by a commit)."""
    return f".{dst.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def read_journal(journal: Path) -> dict | None:
    """The record of the journal at ``journal``; None when there is none, or it is empty or cut short."""
    try:
        with open(journal, encoding="utf-8") as f:
            return _parse_journal(f.read())
    except OSError:
        return None


def journal_names(dst: Path, folder: Path) -> bool:
    """Whether DST's journal records ``folder`` as the folder being committed."""
    record = read_journal(journal_path(dst))
    return record is not None and record.get("new") == folder.name


def _parse_journal(text: str) -> dict | None:
    """A journal's record; None when it is empty or cut short (its run died before anything moved: the
    record is complete and on disk before the first rename)."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) and all(k in record for k in _JOURNAL_KEYS) else None


def _folder_id(path: Path) -> int | None:
    """The inode number of the folder at ``path`` (not following a link): renames within DST's parent keep
    it, so it tells which folder sits where (``st_dev`` is left out: NFS clients number devices each their
    own way). None when there is no folder there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if stat.S_ISDIR(st.st_mode) else None


# -- locks and the atomic swap ------------------------------------------------------------------------


def _lock(fd: int, wait: bool) -> bool:
    """Take the advisory lock of an open file (it dies with the process); False when another holds it."""
    if fcntl is None:  # no advisory locks here: the journal alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _lock_new_journal(fd: int, journal: Path, wait_s: float) -> None:
    """Take the lock of the journal this run just created. Another conversion to DST that found it (empty) may
    hold it for a moment while it removes it; one holding it for over ``wait_s`` is stopped or stuck: a
    ``FileExistsError`` (nothing has moved)."""
    deadline = time.monotonic() + wait_s
    while not _lock(fd, wait=False):
        if time.monotonic() > deadline:
            raise FileExistsError(
                f"{journal}, just created by this conversion, has been locked by another process for over {wait_s:g} s "
                f"(a conversion to the same DST, stopped or stuck?); nothing was moved: end that process (`fuser "
                f"{journal}` names it), then convert again"
            )
        time.sleep(0.05)


def _is_open_as(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not removed or replaced since)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def exchange_folders(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    the file system cannot, and nothing moved. (A test seam: see the module docstring.)"""
    fn = _renameat2()
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# -- finishing a commit ---------------------------------------------------------------------------------


def _open_journal(dst: Path, wait_s: float) -> int | None:
    """A descriptor holding the lock of DST's journal, or None when there is no journal. A journal whose
    lock is held belongs to a live conversion committing right now: wait up to ``wait_s`` for it."""
    journal = journal_path(dst)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(journal, os.O_RDWR)
        except FileNotFoundError:
            return None
        if _lock(fd, wait=False):
            if _is_open_as(fd, journal):
                return fd
            os.close(fd)  # finished (and removed) while we waited for it: look again
            continue
        os.close(fd)
        if time.monotonic() > deadline:
            record = read_journal(journal) or {}
            raise FileExistsError(
                f"another conversion (process {record.get('pid', '?')} on {record.get('host', '?')}) has been "
                f"committing to DST {dst} for over {wait_s:g} s ({journal} is locked); try again when it has finished"
            )
        time.sleep(0.05)


def finish_interrupted_commit(
    dst: str | os.PathLike, log: Callable[[str], None] = print, wait_s: float = COMMIT_WAIT_S
) -> bool:
    """Finish the commit of a conversion to ``dst`` that was killed (or failed) while replacing DST.

    Its journal (``.DST.commit``) names the verified new folder and the old one. Whatever instant the run
    stopped at, the new folder is put in place as DST and only then is the old one deleted; a journal cut
    short (the run died before anything moved) is removed. Every conversion to ``dst`` calls this first.
    Returns True when there was a journal. Raises ``FileExistsError`` while a live conversion holds it
    (after ``wait_s``), :class:`InterruptedCommitError` when its folders were changed by hand.
    """
    dst = Path(dst)
    journal = journal_path(dst)
    fd = _open_journal(dst, wait_s)
    if fd is None:
        return False
    try:
        with os.fdopen(os.dup(fd), encoding="utf-8") as f:
            record = _parse_journal(f.read())
        if record is not None:
            _finish_commit(dst, record, no_stage)
        os.unlink(journal)
        fsync_folder(dst.parent)
    finally:
        os.close(fd)
    if record is None:
        log(f"removed {journal.name}, left by a conversion killed before its commit began")
    else:
        log(
            f"finished the commit of an interrupted conversion (process {record['pid']} on {record['host']}): "
            f"{dst} is its verified result"
        )
    return True


def _finish_commit(dst: Path, record: dict, on_stage: Callable[[str], None]) -> None:
    """Take a journaled commit from wherever it stopped to its end: the new folder at DST, then the old one
    deleted. Each step looks at which folder (by identity) sits where, so a run killed anywhere in here is
    finished the same way by the next; neither verified folder is deleted before the other is in place."""
    parent = dst.parent
    new, aside = parent / record["new"], parent / record["aside"]
    new_id, old_id = record["new_id"], record["old_id"]
    if _folder_id(dst) != new_id:
        _put_new_in_place(dst, new, aside, new_id, old_id, on_stage)
    if old_id is not None:
        for path in (aside, new):  # the old folder, wherever the swap left it
            if _folder_id(path) == old_id:
                shutil.rmtree(path, ignore_errors=True)
        fsync_folder(parent)
    on_stage("old_removed")


def _put_new_in_place(
    dst: Path, new: Path, aside: Path, new_id: int, old_id: int | None, on_stage: Callable[[str], None]
) -> None:
    """The new folder (at ``new``) becomes DST; an old DST goes to ``aside`` (or where ``new`` was)."""
    journal = journal_path(dst)
    if _folder_id(new) != new_id:
        raise InterruptedCommitError(
            f"{journal} records a commit of {new} to {dst}, but that folder is neither at {new} "
            f"nor at {dst}; everything was left as it is: choose what DST should be, then delete the journal"
        )
    if os.path.lexists(dst):
        if old_id is None or _folder_id(dst) != old_id:
            raise InterruptedCommitError(
                f"{dst} was changed after the commit recorded in {journal} began; everything was "
                f"left as it is (the verified new folder is {new}): choose what DST should be, then delete "
                f"the journal"
            )
        if not exchange_folders(new, dst):  # one atomic swap where the OS can: DST is never missing
            os.rename(dst, aside)
            fsync_folder(dst.parent)
            on_stage("old_aside")
            os.rename(new, dst)
    else:
        os.rename(new, dst)
    fsync_folder(dst.parent)
    on_stage("new_in_place")


# -- committing -------------------------------------------------------------------------------------------


def commit_folder(folder: Path, dst: Path, force: bool, on_stage: Callable[[str], None] = no_stage) -> None:
    """Move the verified ``folder`` (beside DST) into place as DST, replacing an existing DST (``force``).

    First the journal records both folders and is flushed to disk; then the new folder goes in, the old
    one is deleted, and the journal removed. An error or a kill at any point leaves the journal:
    :func:`finish_interrupted_commit` finishes the commit from there. ``on_stage`` is called with each of
    :data:`COMMIT_STAGES` reached. Raises ``FileExistsError`` (nothing moved) when DST appeared meanwhile
    and ``force`` is False, or is not a folder.
    """
    journal = journal_path(dst)
    while True:
        if journal.exists():  # another conversion's commit to DST, killed or still running: finish it first
            finish_interrupted_commit(dst, log=lambda _: None)
        try:
            fd = os.open(journal, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            continue
        try:
            _lock_new_journal(fd, journal, COMMIT_WAIT_S)
            if not _is_open_as(fd, journal):
                continue  # found empty and unlocked by a run looking for stale journals, and removed: again
            _commit_under_lock(fd, folder, dst, force, on_stage)
            break
        finally:
            os.close(fd)
    on_stage("committed")


def _commit_under_lock(fd: int, folder: Path, dst: Path, force: bool, on_stage: Callable[[str], None]) -> None:
    journal = journal_path(dst)
    try:
        record = _journal_record(folder, dst, force)
    except FileExistsError:  # refused before anything moved: the journal goes with the refusal
        os.unlink(journal)
        raise
    os.write(fd, json.dumps(record, indent=1).encode() + b"\n")
    os.fsync(fd)
    fsync_folder(dst.parent)
    on_stage("journal")
    _finish_commit(dst, record, on_stage)
    os.unlink(journal)
    fsync_folder(dst.parent)


def _journal_record(folder: Path, dst: Path, force: bool) -> dict:
    """What the journal of committing ``folder`` to ``dst`` records, checked under its lock: both folders by
    name and identity, where the old one goes aside, and who commits."""
    if os.path.lexists(dst):
        if not force:
            raise FileExistsError(f"DST {dst} appeared during the conversion; pass --force to replace it")
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"DST {dst} appeared during the conversion and is not a folder")
    return {
        "dst": dst.name,
        "new": folder.name,
        "new_id": _folder_id(folder),
        "old_id": _folder_id(dst),
        "aside": f"{temporary_prefix(dst, 'replaced')}{secrets.token_hex(4)}",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def finish_own_commit(dst: Path, folder: Path, log: Callable[[str], None]) -> bool:
    """After an error inside this run's commit of ``folder``: finish it as the next run would. True when DST
    is now the new folder; when it cannot be finished here, the journal stays for the next run."""
    if not journal_names(dst, folder):
        return False  # refused before the journal was written: nothing moved
    try:
        return finish_interrupted_commit(dst, log)
    except Exception as e:
        log(f"could not finish the commit now ({e}); the next conversion to {dst} will")
        return False
