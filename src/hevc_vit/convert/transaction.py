"""A conversion's work on disk: a temporary folder beside DST that is committed as DST or removed.

:func:`transaction` holds SIGINT / SIGTERM / SIGHUP as :class:`ConversionInterrupted` (so clean-up runs,
and never in the middle of the final renames), finishes a commit an earlier run left half-done, and
refuses an existing DST without ``force``. Its :class:`Transaction` makes the temporary folder (removing
those of killed conversions), commits it (:func:`~hevc_vit.convert.commit.commit_folder`) and, whatever
happens, removes it and any parent folders made for DST that nothing ended up in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hevc_vit.convert.commit import (
    COMMIT_STAGES,
    commit_folder,
    finish_interrupted_commit,
    finish_own_commit,
    journal_names,
    journal_path,
    read_journal,
    temporary_prefix,
)

# The stages a conversion passes, in order; ``convert_checkpoint(on_stage=...)`` is called with each (tests
# interrupt or kill a conversion there). write: model.safetensors written, config.json not yet; verify:
# the folder is written, not yet verified; commit: verified, nothing committed; then the commit's own
# (see hevc_vit.convert.commit.COMMIT_STAGES).
STAGES = ("write", "verify", "commit", *COMMIT_STAGES)


class ConversionInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a conversion; it was stopped and cleaned up."""

    def __init__(self, signum: int):
        self.signum = signum
        self.dst_complete = False  # True when the signal came during the final renames and DST is complete
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _SignalGuard:
    """Turns SIGINT / SIGTERM / SIGHUP into :class:`ConversionInterrupted` (so clean-up runs), and holds
    them back during the final renames. Installs nothing outside the main thread or for ignored signals."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = False
        self.held: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.holding:
            self.held = signum
            return
        raise ConversionInterrupted(signum)

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @contextmanager
    def hold(self, reraise: bool = True) -> Iterator[None]:
        """Signals arriving inside are acted on when it ends (when ``reraise``), never in the middle."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            held, self.held = self.held, None
            if held is not None and reraise:
                raise ConversionInterrupted(held)


def check_paths(src: Path, dst: Path) -> None:
    """SRC exists, and neither of SRC and DST is inside the other."""
    if not src.exists():
        raise FileNotFoundError(f"SRC {src} does not exist")
    s, d = src.resolve(), dst.resolve()
    if s == d or s.is_relative_to(d) or d.is_relative_to(s):
        raise ValueError(f"DST {dst} overlaps SRC {src}; choose a DST outside SRC (SRC is never modified)")


def check_dst(dst: Path, force: bool) -> None:
    """DST is new, or (``force``) a folder that may be replaced."""
    if os.path.lexists(dst):
        if not dst.is_dir() or dst.is_symlink():
            raise FileExistsError(f"DST {dst} exists and is not a folder; refusing to replace it")
        if not force:
            raise FileExistsError(
                f"DST {dst} already exists; pass --force to replace it (it is replaced only by a verified result)"
            )


def remove_stale(dst: Path, log: Callable[[str], None]) -> None:
    """Remove temporary folders of earlier conversions to ``dst`` killed on this host (their process is gone),
    except those a commit journal names (they are the commit's; see ``finish_interrupted_commit``)."""
    record = read_journal(journal_path(dst)) or {}
    journaled = {record.get("new"), record.get("aside")}
    for kind in ("partial", "replaced"):
        mine = f".{dst.name}.{kind}-{socket.gethostname()}-"
        for path in dst.parent.glob(f".{dst.name}.{kind}-*"):
            if path.name.startswith(mine) and path.is_dir() and path.name not in journaled:
                _remove_if_dead(path, path.name[len(mine) :].split("-")[0], log)


def _remove_if_dead(path: Path, pid_text: str, log: Callable[[str], None]) -> None:
    """Remove ``path``, a temporary folder of process ``pid_text`` on this host, when that process is gone."""
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return
    try:
        os.kill(int(pid_text), 0)
        return  # that conversion is still running
    except ProcessLookupError:
        pass
    except PermissionError:
        return
    shutil.rmtree(path, ignore_errors=True)
    log(f"removed {path}, left by an interrupted conversion (process {pid_text})")


class Transaction:
    """The temporary folder of one conversion to ``dst`` (see :func:`transaction`)."""

    def __init__(
        self,
        dst: Path,
        force: bool,
        guard: _SignalGuard,
        log: Callable[[str], None],
        on_stage: Callable[[str], None],
    ):
        self.dst, self.force, self.log, self.on_stage = dst, force, log, on_stage
        self.guard = guard
        self.folder: Path | None = None
        self.committed = False
        self._created: list[Path] = []  # parent folders made for DST, deepest first

    def make_folder(self) -> Path:
        """Make DST's parent folders and a new temporary folder beside DST (``.DST.partial-HOST-PID-...``),
        after removing those of conversions to DST that were killed."""
        parent = self.dst.parent
        self._created = [d for d in (parent, *parent.parents) if not d.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.dst, self.log)
        self.folder = Path(tempfile.mkdtemp(prefix=temporary_prefix(self.dst, "partial"), dir=parent))
        return self.folder

    def commit(self) -> None:
        """Move the verified folder into place as DST (signals held until DST is complete). An error inside
        the commit finishes it at once where it can; :attr:`ConversionInterrupted.dst_complete` tells."""
        self.on_stage("commit")
        try:
            with self.guard.hold():
                commit_folder(self.folder, self.dst, self.force, self.on_stage)
                self.committed = True
        except BaseException as e:
            if not self.committed:  # an error inside the commit left its journal: finish it now
                with self.guard.hold(reraise=False):
                    self.committed = finish_own_commit(self.dst, self.folder, self.log)
            if isinstance(e, ConversionInterrupted):
                e.dst_complete = self.committed  # a signal held back during the renames, acted on after them
            raise

    def clean_up(self) -> None:
        """Remove the temporary folder (unless a commit journal names it) and, when nothing was committed,
        the parent folders made for DST that are empty."""
        folder = self.folder
        if folder is not None and folder.exists() and not journal_names(self.dst, folder):
            shutil.rmtree(folder, ignore_errors=True)
        if not self.committed:
            for d in self._created:
                try:
                    d.rmdir()
                except OSError:
                    break


@contextmanager
def transaction(
    dst: Path, force: bool, log: Callable[[str], None], on_stage: Callable[[str], None]
) -> Iterator[Transaction]:
    """Signals held as :class:`ConversionInterrupted` for the whole block; a commit to ``dst`` an earlier
    run left half-done finished first; an existing DST refused without ``force``. On leaving, the
    :class:`Transaction`'s temporary folder is cleaned up, whatever happened."""
    with _SignalGuard() as guard:
        if dst.parent.is_dir():
            with guard.hold():
                finish_interrupted_commit(dst, log)
        check_dst(dst, force)
        tx = Transaction(dst, force, guard, log, on_stage)
        try:
            yield tx
        finally:
            with guard.hold(reraise=False):
                tx.clean_up()
