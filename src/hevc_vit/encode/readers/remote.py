"""URLs and object stores for ``hevc-vit encode`` through fsspec (the ``data`` extra): ``s3://``, ``gs://``,
``hf://``, ``http(s)://``, ``file://``, ``memory://`` and any other protocol fsspec knows.

One code path for every URL: :func:`list_url` lists and globs, :func:`open_location` and :func:`read_location`
read, for a URL and a local path alike (a local path is read with ``open``, with no fsspec). How URLs are read is
one :class:`Network`: every connection and every read of an ``http(s)://`` or ``s3://`` URL waits at most
``timeout`` seconds, and a read or a listing that fails for a reason another attempt may cure (a timeout, a
connection refused or reset, an HTTP 5xx, 408 or 429 answer) is tried again ``retries`` times, after a pause that
doubles (an HTTP ``Retry-After`` is honoured, up to ``MAX_RETRY_AFTER``), before the error is returned to the
caller, who records it as a failed row. What another attempt cannot cure is not retried: a missing file (HTTP
404/410), a refusal (401/403), a missing package (``ImportError``).
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from hevc_vit.encode.options.choices import DEFAULT_TIMEOUT, INSTALL_HINT
from hevc_vit.encode.readers.spec import describe_error, is_url
from hevc_vit.media.kinds import FILE_SUFFIXES

GLOB_CHARS = frozenset("*?[")  # a path holding one of these is a pattern
# errors that another attempt cannot cure: the file is not there, may not be read, or the call was wrong
_FINAL_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    NotImplementedError,  # fsspec: the filesystem has no such operation (AbstractFileSystem.ls: no listing)
    ImportError,  # a protocol's package is missing: no attempt installs it
)
_TRANSIENT_ERRORS = (TimeoutError, ConnectionError)  # anywhere in an error's causes: another attempt may cure it
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # HTTP answers worth another attempt (and any 5xx)
RETRY_PAUSE = 0.25  # seconds before the first retry; doubled after each (tests set it to 0)
MAX_RETRY_AFTER = 60.0  # seconds: the longest HTTP Retry-After honoured

T = TypeVar("T")


@dataclass(frozen=True)
class Network:
    """How URLs are read. retries: attempts after a failure another attempt may cure. timeout: seconds that
    connecting, and each read (the wait for the next bytes, not the whole download), may take for ``http(s)://``
    and ``s3://`` URLs; other protocols keep their library's own."""

    retries: int = 2
    timeout: float = DEFAULT_TIMEOUT


def import_fsspec():
    try:
        import fsspec  # optional: the 'data' extra
    except ImportError:
        raise ImportError(f"reading URLs needs fsspec, which is not installed; {INSTALL_HINT}") from None
    return fsspec


def url_protocols(url: str) -> list[str]:
    """The protocols of a URL, outermost first (``tar://m::s3://b/s.tar`` -> ``["tar", "s3"]``)."""
    fsspec = import_fsspec()
    protocols = []
    for bit in url.split("::"):
        protocol = fsspec.core.split_protocol(bit)[0]
        if protocol is not None:
            protocols.append(protocol)
    return protocols


def check_url_packages(locations: Iterable[Any]) -> None:
    """Raise one ``ImportError`` naming every package that reading the URLs among ``locations`` needs and
    this environment lacks (fsspec itself, aiohttp and requests for ``http://``, s3fs for ``s3://``, ...), before
    any work."""
    _require_packages([str(loc) for loc in locations if isinstance(loc, str) and is_url(loc)])


def _require_packages(urls: list[str]) -> None:
    if not urls:
        return
    fsspec = import_fsspec()
    missing: dict[str, list[str]] = {}  # what is missing -> the protocols that need it, with an example
    seen: set[str] = set()
    for url in urls:
        for protocol in url_protocols(url):
            if protocol in seen:
                continue
            seen.add(protocol)
            try:
                fsspec.get_filesystem_class(protocol)
            except ImportError as e:
                missing.setdefault(str(e), []).append(f"{protocol}:// (such as {url})")
            except ValueError:
                pass  # an unknown protocol: the URL gets a failed row saying so
    if missing:
        what = "; ".join(f"reading {' and '.join(protocols)} needs: {error}" for error, protocols in missing.items())
        raise ImportError(f"{what}; {INSTALL_HINT} (or the protocol's own package)")


def _storage_options(protocols: Iterable[str], timeout: float) -> dict[str, dict[str, Any]]:
    """fsspec's keyword arguments, by protocol, that bound each connection and read by ``timeout``."""
    options: dict[str, dict[str, Any]] = {}
    for protocol in protocols:
        if protocol in ("http", "https"):
            import aiohttp  # optional: the 'data' extra

            bounds = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
            options[protocol] = {"client_kwargs": {"timeout": bounds}}
        elif protocol in ("s3", "s3a"):
            options[protocol] = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    return options


def url_filesystem(url: str, network: Network):
    """``(filesystem, path)`` for ``url``: fsspec's filesystem of its protocol (its connections and reads bounded
    by ``network.timeout``) and the path it takes."""
    _require_packages([url])
    fsspec = import_fsspec()
    try:
        # by protocol: fsspec gives each filesystem of a chain (tar://m::https://...) its own
        return fsspec.core.url_to_fs(url, **_storage_options(url_protocols(url), network.timeout))
    except ImportError as e:  # the protocol's own package (s3fs, gcsfs, aiohttp, ...) is missing
        raise ImportError(f"{url}: {e}; {INSTALL_HINT}") from None


def with_retries(call: Callable[[], T], retries: int, what: str) -> T:
    """``call()``, tried again up to ``retries`` times after an error another attempt may cure (a timeout, a
    connection error, an HTTP 5xx/408/429 answer; see :func:`is_final`), after a pause that doubles each time (or
    the server's ``Retry-After``); the last error is raised as an ``OSError`` saying how many attempts were made
    and why the last failed. An error no attempt can cure is raised at once, as it is."""
    pause = RETRY_PAUSE
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:
            if is_final(e):
                raise
            if attempt == retries:
                tries = f"after {retries + 1} attempts" if retries else "(no retries: --retries 0)"
                raise OSError(f"{what} failed {tries}: {describe_network_error(e)}") from e
            time.sleep(max(pause, _retry_after(e)))
            pause *= 2
    raise AssertionError("unreachable")


def _causes(e: BaseException) -> list[BaseException]:
    """``e`` and the errors it was raised from, outermost first (fsspec's HTTP ``info`` reports every failure
    as a ``FileNotFoundError`` raised from the real one)."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain


def _own_status(e: BaseException) -> int | None:
    """The HTTP status ``e`` itself carries (aiohttp's ``status``, requests' ``response.status_code``), if any."""
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError
    status = status if isinstance(status, int) else getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def http_status(e: BaseException) -> int | None:
    """The HTTP status of the answer that caused ``e`` (aiohttp's or requests' error), if one did."""
    return next((s for s in map(_own_status, _causes(e)) if s is not None), None)


def is_final(e: BaseException) -> bool:
    """No further attempt can cure ``e``: an HTTP answer other than 5xx, 408 and 429 (404 and 410 say the file
    is not there), a missing file or package, a wrong call. A timeout, a connection error (refused, reset, closed
    mid-answer) and an HTTP 5xx/408/429 answer may pass: they are retried, whatever fsspec wrapped them in."""
    status = http_status(e)
    if status is not None:
        return not (status in RETRY_STATUSES or status >= 500)
    if any(isinstance(cause, _TRANSIENT_ERRORS) or _is_client_error(cause) for cause in _causes(e)):
        return False
    return isinstance(e, _FINAL_ERRORS)


def _is_client_error(e: BaseException) -> bool:
    """An aiohttp connection or payload error (a server that closed the connection, a body cut short)."""
    module = type(e).__module__ or ""
    return module.startswith("aiohttp") and not isinstance(e, _FINAL_ERRORS)


def _retry_after(e: BaseException) -> float:
    """The seconds an HTTP answer's ``Retry-After`` asks to wait (at most ``MAX_RETRY_AFTER``), else 0."""
    for cause in _causes(e):
        headers = getattr(cause, "headers", None) or getattr(getattr(cause, "response", None), "headers", None)
        value = headers.get("Retry-After") if headers is not None else None
        if value is not None:
            try:
                return min(max(float(value), 0.0), MAX_RETRY_AFTER)
            except ValueError:
                return 0.0  # an HTTP date: the doubling pause instead
    return 0.0


def describe_network_error(e: BaseException) -> str:
    """What went wrong reading a URL: the HTTP status, or the error at the root of fsspec's wrapping."""
    status = http_status(e)
    if status is not None:
        cause = next(c for c in _causes(e) if _own_status(c) == status)  # the answer's error, not a wrapper
        reason = getattr(cause, "message", "") or getattr(getattr(cause, "response", None), "reason", "") or ""
        return f"HTTP {status} {reason}".strip()
    chain = _causes(e)
    root = next((c for c in chain if isinstance(c, _TRANSIENT_ERRORS) or _is_client_error(c)), chain[-1])
    if isinstance(root, TimeoutError) and not str(root).strip():
        return "TimeoutError: no answer within the timeout (--timeout)"
    return describe_error(root)


def open_location(location: str, network: Network) -> IO[bytes]:
    """A binary file object for a local path or a URL (seekable where the store allows ranges)."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = url_filesystem(location, network)
    return fs.open(path, "rb")


def read_location(location: str, network: Network, start: int | None = None, size: int | None = None) -> bytes:
    """The bytes of a local path or a URL (``size`` bytes from ``start`` when given), with retries for URLs.
    Fewer bytes than ``size`` raise ``ValueError``: the file ends early (a truncated shard). A URL that is not
    there raises ``FileNotFoundError`` naming the HTTP status when there is one."""

    def read() -> bytes:
        with open_location(location, network) as f:
            if start is not None:
                f.seek(start)
            return f.read() if size is None else f.read(size)

    data = with_retries(read, network.retries, f"reading {location}") if is_url(location) else read()
    if size is not None and len(data) < size:
        raise ValueError(f"the data ends after {len(data)} of {size} bytes: the file is truncated")
    return data


def _names_a_file(path: str) -> bool:
    """A path ending in a media, table or tar extension names a file: it is read when its turn comes, not looked up
    while listing."""
    return posixpath.splitext(path)[1].lower() in FILE_SUFFIXES


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


_CANNOT_LIST = (
    "the {scheme}:// filesystem cannot list a folder or match a pattern (fsspec: no listing); "
    "name its files, or list them in a .txt file"
)


def list_url(url: str, network: Network) -> tuple[list[str], str]:
    """The files a URL names, sorted: a glob's matches, every file under a folder (names starting with ``.``
    skipped; over HTTP a URL ending in ``/`` is a folder, its files the links of its listing page, followed into
    the sub-folders it links), or the URL itself. Returns ``(urls, reason)``; ``reason`` says why there are none."""
    fs, path = url_filesystem(url, network)
    what = f"listing {url}"
    if (GLOB_CHARS - {"?"} if _is_http(url) else GLOB_CHARS) & set(path):  # over HTTP a ? starts the query
        try:
            matches = with_retries(lambda: sorted(fs.glob(path)), network.retries, what)
        except NotImplementedError:
            return [], _CANNOT_LIST.format(scheme=url.split("://", 1)[0])
        files = [fs.unstrip_protocol(m) for m in matches if not _hidden(m)]
        return files, "" if files else "no file matches this pattern"
    if _names_a_file(path) or (_is_http(url) and not url.endswith("/")):
        return [url], ""  # a file (or a web page): read when its turn comes, one request instead of two
    if not _is_http(url):  # over HTTP every URL is a "file" to fsspec's info: a trailing / names a folder instead
        try:
            info: dict[str, Any] = with_retries(lambda: fs.info(path), network.retries, what)
        except FileNotFoundError:
            return [], "no such file or folder"
        if info.get("type") != "directory":
            return [url], ""
    try:
        # on_error: a sub-folder that cannot be listed fails the listing (fsspec would leave its files out)
        found = with_retries(lambda: sorted(fs.find(path, on_error="raise")), network.retries, what)
    except FileNotFoundError:
        return [], "no such file or folder"
    except NotImplementedError:
        return [], _CANNOT_LIST.format(scheme=url.split("://", 1)[0])
    root = path.rstrip("/")
    # the files as the folder's URL was given, followed by their paths under it; over HTTP a link with a query or
    # a fragment (a listing's sort links) is no file of the folder
    files = [
        url.rstrip("/") + f[len(root) :]
        for f in found
        if f.startswith(root) and not _hidden(f[len(root) :]) and not (_is_http(url) and set("?#") & set(f))
    ]
    return files, "" if files else "no files in this folder (names starting with '.' are skipped)"


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/") if part)
