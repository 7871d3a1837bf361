"""The output folder of a run: which folder, whether this run may use it, what an earlier run left there.

Rank 0 chooses the folder and takes its lock (:func:`claim_out_dir`) before anything is checked or written
there, then, holding the lock, prepares it (:func:`prepare_folder`): the inputs expanded, the inputs an
earlier run finished (``--resume``, after checking that the folder is sound), an earlier run's outputs
removed (``--overwrite``), and the run's settings written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hevc_vit.encode.options import DEFAULT_OUT, EncodeOptions, recorded_options
from hevc_vit.encode.output.formats import owned_files
from hevc_vit.encode.output.index import (
    ENCODE_CONFIG_NAME,
    INDEX_NAME,
    LOCK_NAME,
    DamagedFolderError,
    rank_index_files,
)
from hevc_vit.encode.output.lock import FolderLock
from hevc_vit.processing.files import current_processor_record

# encode_config.json fields that change the features: a resumed run must match them
RESUME_FIELDS = ("weights", "architecture", *recorded_options("compare"))


# --------------------------------------------------------------------------------------------------
# choosing and claiming
# --------------------------------------------------------------------------------------------------


def _holds_files(path: Path) -> bool:
    """``path`` is a folder with something in it besides a run's lock file."""
    return path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir())


def choose_out_dir(
    out_dir: str | os.PathLike | None,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
    busy: frozenset[Path] = frozenset(),
) -> Path:
    """The output folder to claim: ``out_dir``, or with None the default folder or the next free numbered one
    (skipping ``busy`` ones, held by runs in progress). Whether it may be used is decided under its lock."""
    if out_dir is not None:
        path = Path(out_dir)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is a file; expected a folder (new or from an earlier run)")
        return path
    # No --out: the default folder, or the next free numbered one, so a second run never touches the first.
    base = Path(DEFAULT_OUT)
    if resume or overwrite:
        return base
    n, path = 1, base
    while path in busy or (path.exists() and (not path.is_dir() or _holds_files(path))):
        n += 1
        path = Path(f"{DEFAULT_OUT}-{n}")
    if n > 1:
        log(f"{base}/ holds an earlier run; writing to {path}/ (pass --out DIR to choose)")
    return path


def claim_out_dir(
    out_dir: str | os.PathLike | None, resume: bool, overwrite: bool, log: Callable[[str], None]
) -> FolderLock:
    """Rank 0: choose the output folder and take its lock before anything is checked or written there, then
    decide (under the lock) whether this run may use it. A second run on the same folder is refused with the
    holder's pid and host; without ``--out`` it moves on to the next numbered folder instead."""
    busy: set[Path] = set()
    while True:
        path = choose_out_dir(out_dir, resume, overwrite, log, frozenset(busy))
        try:
            with reporting_full_disk(path):  # no room even for the lock file's one line
                lock = FolderLock.acquire(path)
        except FileExistsError:
            if out_dir is not None or resume or overwrite:
                raise
            busy.add(path)
            continue
        if _holds_files(path) and not (resume or overwrite):
            lock.release()
            if out_dir is None:  # filled by a run that ended since we looked: take the next one
                busy.add(path)
                continue
            raise FileExistsError(
                f"--out {path} exists and is not empty; pass --resume to continue the run that "
                f"wrote it, --overwrite to replace its outputs, or choose another --out"
            )
        return lock


# --------------------------------------------------------------------------------------------------
# preparing
# --------------------------------------------------------------------------------------------------


def owned_outputs(out_dir: Path) -> list[Path]:
    """The files a run writes in ``out_dir`` (what ``--overwrite`` removes), by their exact names: the index
    files, ``encode_config.json`` and the parts of every output format (``shards/rankRRRRR-NNNNN.safetensors``,
    ``embeddings/….npy``, ``metadata/….parquet``, ``parts/….parquet``, and their temporary files). Nothing else
    is touched, e.g. a ``shards/ranking.safetensors`` of the user's."""
    paths = [out_dir / INDEX_NAME, out_dir / ENCODE_CONFIG_NAME, *rank_index_files(out_dir)]
    return [p for p in paths if p.exists()] + owned_files(out_dir)


# what a run made before an option existed did: its default, or what the option declares (``before``)
OPTION_DEFAULTS = {f.name: f.metadata.get("before", f.default) for f in dataclasses.fields(EncodeOptions)}


def check_resume_config(out_dir: Path, settings: dict[str, Any], say: Callable[[str], None]) -> None:
    """Refuse to resume a run made with other settings (``RESUME_FIELDS``), or whose settings are unreadable."""
    path = out_dir / ENCODE_CONFIG_NAME
    if not path.is_file():
        return
    earlier = _read_settings(path)
    if "weights" not in earlier:  # written before the weights were recorded: nothing to compare with
        say(f"note: {path} does not record the weights' checksum; --resume cannot check they are the same")
        earlier["weights"] = settings.get("weights")
    if "processor" in earlier:  # recorded under an older type name: the same processor
        earlier["processor"] = current_processor_record(earlier["processor"])
    for name, default in OPTION_DEFAULTS.items():  # options added since that run was made: what it did
        if name in RESUME_FIELDS and name not in earlier:
            earlier[name] = default
    differ = [k for k in RESUME_FIELDS if earlier.get(k) != settings.get(k)]
    if differ:
        details = "; ".join(f"{k}: earlier {earlier.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        raise ValueError(
            f"--resume: {out_dir} was encoded with other settings ({details}); resume with the same model and "
            f"options, or write to another --out"
        )


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        settings = json.loads(path.read_bytes())
        damage = "" if isinstance(settings, dict) else "not a JSON object"
    except ValueError as e:  # not JSON, or not UTF-8
        damage = f"not JSON ({e})"
    if damage:
        raise DamagedFolderError(
            f"--resume: {path} is damaged: {damage}; it records the settings of the run to continue, which cannot "
            f"be checked now. Restore the file, or start again with --overwrite (or write to another --out)"
        )
    return settings


# --------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------


class DiskFullError(OSError):
    """The output could not be written for want of space; the message is one line naming the folder."""

    def __str__(self) -> str:
        return str(self.strerror)


def full_disk_error(e: OSError, folder: Path) -> OSError:
    """``e`` itself, or for a full disk (``ENOSPC``, ``EDQUOT``) a :class:`DiskFullError` that names the
    folder, the space left there and what to do."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return e
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        e.errno,
        f"no space left on the device of {folder} ({free}) while writing the output; finished shards and "
        f"their index rows are kept: free some space, then rerun with --resume",
    )


@contextmanager
def reporting_full_disk(folder: Path) -> Iterator[None]:
    """Re-raise a full disk while writing into ``folder`` as :func:`full_disk_error`."""
    try:
        yield
    except OSError as e:
        error = full_disk_error(e, folder)
        if error is e:
            raise
        raise error from e


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 bytes``, ``1.5 MB``."""
    units = ("bytes", "KB", "MB", "GB", "TB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"
