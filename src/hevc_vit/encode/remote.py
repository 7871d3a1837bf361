"""URLs and object stores for ``hevc-vit encode`` through fsspec (the ``data`` extra): ``s3://``, ``gs://``,
``hf://``, ``http(s)://``, ``file://``, ``memory://`` and any other protocol fsspec knows.

One code path for every URL: :func:`list_url` lists and globs, :func:`open_location` and :func:`read_location`
read, for a URL and a local path alike (a local path is read with ``open``, with no fsspec). A read or a listing
that fails for another reason than a missing file is tried again ``retries`` times (with a short pause that
doubles) before the error is returned to the caller, who records it as a failed row.
"""

from __future__ import annotations

import functools
import posixpath
import re
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

INSTALL_HINT = "pip install 'hevc-vit[data]'"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
GLOB_CHARS = frozenset("*?[")  # a path holding one of these is a pattern
# errors that another attempt cannot cure: the file is not there, may not be read, or the call was wrong
_FINAL_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,  # fsspec: the filesystem has no such operation (e.g. listing over plain HTTP)
)
RETRY_PAUSE = 0.25  # seconds before the first retry; doubled after each (tests set it to 0)

T = TypeVar("T")


def is_url(location: str) -> bool:
    """``location`` names a protocol (``s3://...``, ``file://...``, a chained ``tar://m::s3://...``)."""
    return bool(_URL.match(location))


def import_fsspec():
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"reading URLs needs fsspec, which is not installed; {INSTALL_HINT}") from None
    return fsspec


def url_filesystem(url: str):
    """``(filesystem, path)`` for ``url``: fsspec's filesystem of its protocol and the path it takes."""
    fsspec = import_fsspec()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # the protocol's own package (s3fs, gcsfs, aiohttp, ...) is missing
        raise ImportError(f"{url}: {e}") from None


def with_retries(call: Callable[[], T], retries: int, what: str) -> T:
    """``call()``, tried again up to ``retries`` times after an error another attempt may cure (a network or
    server error); the last error is raised as an ``OSError`` saying how many attempts were made."""
    pause = RETRY_PAUSE
    for attempt in range(retries + 1):
        try:
            return call()
        except _FINAL_ERRORS:
            raise
        except Exception as e:
            if attempt == retries:
                tries = f"after {retries + 1} attempts" if retries else "(no retries: --retries 0)"
                raise OSError(f"{what} failed {tries}: {describe_error(e)}") from e
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def describe_error(e: BaseException) -> str:
    """``"TypeName: message"`` (the message alone when it already starts with the type's name)."""
    message = str(e).strip() or type(e).__name__
    return message if message.startswith(type(e).__name__) else f"{type(e).__name__}: {message}"


def open_location(location: str) -> IO[bytes]:
    """A binary file object for a local path or a URL (seekable where the store allows ranges)."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = url_filesystem(location)
    return fs.open(path, "rb")


def read_location(location: str, retries: int, start: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a local path or a URL (``size`` bytes from ``start`` when given), with retries for URLs.
    Fewer bytes than ``size`` raise ``ValueError``: the file ends early (a truncated shard)."""

    def read() -> bytes:
        with open_location(location) as f:
            if start is not None:
                f.seek(start)
            return f.read() if size is None else f.read(size)

    data = with_retries(read, retries, f"reading {location}") if is_url(location) else read()
    if size is not None and len(data) < size:
        raise ValueError(f"the data ends after {len(data)} of {size} bytes: the file is truncated")
    return data


@functools.cache
def _file_suffixes() -> frozenset[str]:
    from .sources_tar import MEDIA_EXTENSIONS  # imported here: that module imports this one
    from .tables import TABLE_EXTENSIONS

    return frozenset({f".{e}" for e in MEDIA_EXTENSIONS} | set(TABLE_EXTENSIONS) | {".tar"})


def _names_a_file(path: str) -> bool:
    """A path ending in a media, table or tar extension names a file: it is read when its turn comes, not looked up
    while listing."""
    return posixpath.splitext(path)[1].lower() in _file_suffixes()


def list_url(url: str, retries: int) -> tuple[list[str], str]:
    """The files a URL names, sorted: a glob's matches, every file under a folder (names starting with ``.``
    skipped), or the URL itself. Returns ``(urls, reason)``; ``reason`` says why there are none."""
    fs, path = url_filesystem(url)
    if GLOB_CHARS & set(path):
        matches = with_retries(lambda: sorted(fs.glob(path)), retries, f"listing {url}")
        files = [fs.unstrip_protocol(m) for m in matches if not _hidden(m)]
        return files, "" if files else "no file matches this pattern"
    if _names_a_file(path) or (url.startswith(("http://", "https://")) and not url.endswith("/")):
        return [url], ""  # a file (or a web page): read when its turn comes, one request instead of two
    try:
        info: dict[str, Any] = with_retries(lambda: fs.info(path), retries, f"listing {url}")
    except FileNotFoundError:
        return [], "no such file or folder"
    if info.get("type") != "directory":
        return [url], ""
    found = with_retries(lambda: sorted(fs.find(path)), retries, f"listing {url}")
    root = path.rstrip("/")
    # the files as the folder's URL was given, followed by their paths under it
    files = [url.rstrip("/") + f[len(root) :] for f in found if f.startswith(root) and not _hidden(f[len(root) :])]
    return files, "" if files else "no files in this folder (names starting with '.' are skipped)"


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part)
