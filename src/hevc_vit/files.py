"""File names and atomic writes, in one place.

Readers of anything this library writes see all of a file or none of it: content goes to a temporary
file beside the target, is flushed and synced, and only then takes the target's name (a rename, or a
hard link where an existing name must never be replaced), and the folder's new entry is synced too.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

# Hugging Face checkpoint folders
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PREPROCESSOR_NAME = "preprocessor_config.json"


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` for this process's temporary copy of it."""
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def fsync_folder(folder: Path) -> None:
    """Make new names in ``folder`` durable (a no-op where folders cannot be opened)."""
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


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (replacing what is there) so that readers see all or nothing."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted JSON with a final newline; NaN or inf in it is a ``ValueError`` (they are
    not JSON: other languages' parsers reject the file)."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json_bytes(obj))


def publish_new(tmp: Path, final: Path) -> None:
    """Give the finished file ``tmp`` the name ``final``, which must not exist: a hard link fails on an existing
    name (``FileExistsError``, ``tmp`` removed), where ``os.replace`` would silently destroy another file.
    Where hard links are not supported, the name is reserved first (``O_EXCL``)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        tmp.unlink()
        raise FileExistsError(f"{final} already exists; it is never replaced") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # reserve, then rename onto it
        os.replace(tmp, final)
    else:
        tmp.unlink()
    fsync_folder(final.parent)
