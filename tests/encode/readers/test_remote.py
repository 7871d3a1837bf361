"""Reading URLs on their own: which errors are retried, how they are described, reads and listings of
``file://`` URLs (fsspec, no network)."""

from __future__ import annotations

import pytest

import hevc_vit.encode.readers.remote as remote
from hevc_vit.encode.readers.remote import (
    Network,
    describe_network_error,
    http_status,
    is_final,
    is_url,
    list_url,
    read_location,
    url_protocols,
    with_retries,
)
from hevc_vit.encode.readers.spec import describe_error
from tests.helpers import register_unlisting_filesystem

pytest.importorskip("fsspec")


class _HTTPError(Exception):
    """An answer's error as aiohttp raises it: a ``status`` and the answer's headers."""

    def __init__(self, status: int, headers: dict | None = None, message: str = "Service Unavailable"):
        super().__init__(message)
        self.status, self.headers, self.message = status, headers or {}, message


def _wrapped(cause: BaseException) -> FileNotFoundError:
    try:
        raise cause
    except BaseException as e:
        try:
            raise FileNotFoundError("https://host/x.jpg") from e  # how fsspec's HTTP info reports every failure
        except FileNotFoundError as outer:
            return outer


def test_is_url_and_protocols():
    assert is_url("s3://b/k") and is_url("tar://m::https://h/s.tar") and not is_url("/data/a.jpg")
    assert not is_url("C:/data/a.jpg") and not is_url("a:b")
    assert url_protocols("tar://m.jpg::s3://b/s.tar") == ["tar", "s3"]


@pytest.mark.parametrize(
    "error, final",
    [
        (TimeoutError(), False),
        (ConnectionResetError(), False),
        (_wrapped(_HTTPError(503)), False),  # a 5xx under fsspec's FileNotFoundError: retried
        (_wrapped(_HTTPError(429)), False),
        (_wrapped(_HTTPError(404, message="Not Found")), True),
        (FileNotFoundError("x"), True),
        (ImportError("s3fs"), True),
        (RuntimeError("odd"), False),  # unknown: another attempt may cure it
    ],
)
def test_is_final_tells_what_another_attempt_may_cure(error, final):
    assert is_final(error) is final


def test_with_retries_retries_what_may_pass_and_says_how_often(monkeypatch):
    monkeypatch.setattr(remote, "RETRY_PAUSE", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError()
        return "ok"

    assert with_retries(flaky, retries=2, what="reading x") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match=r"reading x failed after 2 attempts: HTTP 503"):
        with_retries(lambda: (calls.append(1), _raise(_wrapped(_HTTPError(503))))[1], retries=1, what="reading x")
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):  # final: raised at once, as it is
        with_retries(lambda: (calls.append(1), _raise(FileNotFoundError("gone")))[1], retries=5, what="reading x")
    assert len(calls) == 1


def _raise(e: BaseException):
    raise e


def test_errors_are_described_by_their_root():
    assert describe_error(ValueError("bad")) == "ValueError: bad"
    assert describe_error(ValueError("ValueError: said")) == "ValueError: said"
    assert http_status(_wrapped(_HTTPError(502))) == 502 and http_status(ValueError()) is None
    assert describe_network_error(_HTTPError(404, message="Not Found")) == "HTTP 404 Not Found"
    assert describe_network_error(_wrapped(_HTTPError(404, message="Not Found"))) == "HTTP 404 Not Found"  # fsspec's
    assert describe_network_error(_wrapped(TimeoutError())) == "TimeoutError: no answer within the timeout (--timeout)"


def test_read_location_local_and_file_url_and_a_truncated_read(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"0123456789")
    assert read_location(str(path), Network(), start=2, size=3) == b"234"
    assert read_location(path.as_uri(), Network(retries=0)) == b"0123456789"
    with pytest.raises(ValueError, match="ends after 2 of 5 bytes"):
        read_location(str(path), Network(), start=8, size=5)


def test_list_url_globs_folders_and_says_why_nothing_is_there(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", ".hidden.jpg", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    base = tmp_path.as_uri()
    files, reason = list_url(base + "/", Network(retries=0))
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.png", "b.jpg", "c.jpg"] and reason == ""
    files, _ = list_url(base + "/*.jpg", Network(retries=0))
    assert [f.rsplit("/", 1)[1] for f in files] == ["b.jpg"]
    assert list_url(base + "/*.gif", Network(retries=0)) == ([], "no file matches this pattern")
    assert list_url(base + "/nothing/", Network(retries=0)) == ([], "no such file or folder")


def test_a_filesystem_without_listing_says_so_once_for_a_folder_and_a_glob(monkeypatch):
    calls = register_unlisting_filesystem(monkeypatch)
    for url in ("nols://bucket/folder", "nols://bucket/*.jpg"):
        files, reason = list_url(url, Network(retries=3))
        assert files == [] and reason.startswith("the nols:// filesystem cannot list a folder or match a pattern")
    assert calls.count("ls") == 2  # once per URL: no further attempt can cure a missing operation
