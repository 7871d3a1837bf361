"""``hevc-vit encode`` over the network, against a real HTTP server on 127.0.0.1 (a thread of this process):
URLs, an http folder (a directory listing), list files and tables of URLs and a tar shard behind http give the
same features as the same files given as local paths; a server that never answers, or stalls mid-body, gives a
failed row within the timeout; 5xx, 429 and connection resets are retried (429's Retry-After honoured), 404 and
410 are not; a missing package stops the run before it starts (exit 2); tar member paths round-trip."""

from __future__ import annotations

import functools
import http.server
import io
import socket
import struct
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from hevc_vit import HEVCViTPackingModel
from hevc_vit.cli import main as cli_main
from hevc_vit.encode import encode, read_index
from hevc_vit.encode.readers.remote import with_retries
from hevc_vit.encode.readers.spec import split_tar_path, tar_path
from hevc_vit.processing.processors import NativeResolutionProcessor
from tests.helpers import FIXTURES, assert_close_rel, features_by_path, register_unlisting_filesystem, write_tar

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'data' extra) is not installed")
fsspec = pytest.importorskip("fsspec", reason="fsspec (the 'data' extra) is not installed")
pytest.importorskip("aiohttp", reason="aiohttp (the 'data' extra: fsspec's http) is not installed")

PROC = NativeResolutionProcessor(patch_size=14, min_tokens=4, max_tokens=48, max_video_tokens=96)
OPTIONS = dict(processor=PROC, frames=4, workers=0, progress=False, log=lambda m: None)
SIZES = [(56, 42), (70, 42), (30, 100)]  # (width, height)
NAMES = [f"{i:06d}.jpg" for i in range(len(SIZES))]
QUICK = dict(timeout=0.5, retries=1)  # a hung request fails within about a second per attempt


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# the server: files under a folder, and paths /MODE/KEY/FILE that misbehave (KEY keeps each test's counts apart)
# --------------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close joins every handler thread: none outlives the test module
    block_on_close = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.stop = threading.Event()  # set at the end: a handler that hangs returns
        self.counts: Counter[str] = Counter()  # requests by path
        self.lock = threading.Lock()

    def count(self, path: str) -> int:
        with self.lock:
            self.counts[path] += 1
            return self.counts[path]


class _Handler(http.server.SimpleHTTPRequestHandler):
    """``/hang/K/F``: reads the request, never answers. ``/slow/K/F``: headers and 10 bytes of the body, then
    nothing. ``/CODExN/K/F``: the first N requests (``all``: every one) get HTTP CODE (429 with Retry-After: 1),
    or ``reset``: the connection reset; then F is served. Any other path: the file, or a directory listing."""

    server: _Server

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(super().do_HEAD)

    def do_GET(self) -> None:
        self._route(super().do_GET)

    def _route(self, serve) -> None:
        parts = self.path.split("/", 3)  # "", MODE, KEY, FILE
        mode = parts[1] if len(parts) == 4 else ""
        n = self.server.count(self.path)
        if mode == "hang":
            self.server.stop.wait(60)
            self.close_connection = True
            return
        code, _, times = mode.partition("x")
        if mode == "slow" and self.command == "GET":
            data = (Path(self.directory) / parts[3]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:10])
            self.wfile.flush()
            self.server.stop.wait(60)
            self.close_connection = True
            return
        if times and (times == "all" or n <= int(times)):
            if code == "reset":  # RST instead of an answer: SO_LINGER with a zero timeout, then close
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
                return
            self.send_response(int(code))
            if code == "429":
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode:
            self.path = "/" + parts[3]
        if self.command == "GET" and self.headers.get("Range", "").startswith("bytes="):
            self._serve_range()
            return
        serve()

    def _serve_range(self) -> None:
        """``Range: bytes=A-B`` answered with 206 and those bytes, as web servers and object stores do."""
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


@pytest.fixture(scope="module")
def blobs() -> list[bytes]:
    return [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def root(tmp_path_factory, blobs) -> Path:
    """What the server serves: img/ (the images), lists/urls.txt (relative lines), tables/urls.parquet (URLs),
    shards/data.tar (the images as a webdataset shard)."""
    folder = tmp_path_factory.mktemp("www")
    (folder / "img").mkdir()
    for name, data in zip(NAMES, blobs):
        (folder / "img" / name).write_bytes(data)
    (folder / "img" / ".hidden.jpg").write_bytes(b"never listed")
    (folder / "lists").mkdir()
    (folder / "lists" / "urls.txt").write_text("# the images\n" + "".join(f"../img/{n}\n" for n in NAMES))
    (folder / "shards").mkdir()
    write_tar(folder / "shards" / "data.tar", [(n, b) for n, b in zip(NAMES, blobs)])
    return folder


@pytest.fixture(scope="module")
def server(root):
    srv = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    (root / "tables").mkdir(exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"{srv.base}/img/{n}" for n in NAMES]}), root / "tables" / "urls.parquet")
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()  # joins the handler threads
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture
def silent_socket():
    """A port that accepts connections (the kernel's backlog) and never reads or answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture(scope="module")
def model() -> HEVCViTPackingModel:
    return HEVCViTPackingModel.from_pretrained(FIXTURES / "llava_vit_packing_tiny")


@pytest.fixture(scope="module")
def local(model, root, tmp_path_factory) -> dict:
    """The images encoded from local paths: features by file name."""
    out = tmp_path_factory.mktemp("local") / "out"
    encode([root / "img" / n for n in NAMES], out, model=model, **OPTIONS)
    return {Path(p).name: t for p, t in features_by_path(out).items()}


def _assert_same_features(out: Path, local: dict, names=NAMES) -> None:
    """Every row of ``out`` is ok and its features equal those of the local file of the same name."""
    rows = read_index(out)
    assert [r["status"] for r in rows] == ["ok"] * len(names), [(r["path"], r["error"]) for r in rows]
    got = features_by_path(out)
    assert sorted(_name(p) for p in got) == sorted(names)
    for path, tensors in got.items():
        for key in ("patches", "pooled", "grid_thw"):
            assert_close_rel(tensors[key].float(), local[_name(path)][key].float(), what=f"{path} {key}")


def _name(path: str) -> str:
    return split_tar_path(path)[0] if path.startswith("tar") else path.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------
# http sources give the local features
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["urls", "folder", "local-list", "remote-list", "csv", "remote-parquet", "tar"])
def test_http_sources_give_the_features_of_the_local_files(kind, model, server, local, tmp_path):
    base = server.base
    if kind == "urls":
        inputs = [f"{base}/img/{n}" for n in NAMES]
    elif kind == "folder":  # a directory listing; .hidden.jpg skipped
        inputs = [f"{base}/img/"]
    elif kind == "local-list":  # a .txt of URLs: each line a URL, not a path under the list's folder
        (tmp_path / "urls.txt").write_text("".join(f"{base}/img/{n}\n" for n in NAMES))
        inputs = [tmp_path / "urls.txt"]
    elif kind == "remote-list":  # a .txt behind a URL, its lines relative to it
        inputs = [f"{base}/lists/urls.txt"]
    elif kind == "csv":
        (tmp_path / "urls.csv").write_text("url\n" + "".join(f"{base}/img/{n}\n" for n in NAMES))
        inputs = [tmp_path / "urls.csv"]
    elif kind == "remote-parquet":
        inputs = [f"{base}/tables/urls.parquet"]
    else:  # a shard behind http: listed by its headers, members read by range
        inputs = [f"{base}/shards/data.tar"]
    encode(inputs, tmp_path / "out", model=model, **QUICK, **OPTIONS)
    _assert_same_features(tmp_path / "out", local)
    if kind != "tar":
        assert all(r["path"].startswith(f"{base}/") for r in read_index(tmp_path / "out"))


# --------------------------------------------------------------------------------------------------
# hangs end in a failed row
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_a_server_that_never_answers_gives_a_failed_row_and_the_run_goes_on(
    workers, model, server, silent_socket, local, tmp_path
):
    hung = [f"{server.base}/hang/w{workers}/img/{NAMES[0]}", f"{silent_socket}/img/{NAMES[0]}"]
    slow = f"{server.base}/slow/w{workers}/img/{NAMES[1]}"  # headers, then a stalled body
    good = f"{server.base}/img/{NAMES[2]}"
    options = {**OPTIONS, "workers": workers}
    result = encode([*hung, slow, good], tmp_path / "out", model=model, **QUICK, **options)
    rows = {r["path"]: r for r in read_index(tmp_path / "out")}
    for url in [*hung, slow]:
        assert rows[url]["status"] == "failed" and "failed after 2 attempts" in rows[url]["error"], rows[url]
        assert "Timeout" in rows[url]["error"], rows[url]["error"]
    assert rows[good]["status"] == "ok" and result.encoded == 1 and result.failed == 3
    assert server.counts[f"/slow/w{workers}/img/{NAMES[1]}"] >= 2  # retried once


@pytest.mark.slow
def test_a_folder_url_that_never_answers_is_a_failed_row(model, server, silent_socket, root, tmp_path):
    folder = f"{server.base}/hang/folder/img/"
    (tmp_path / "list.txt").write_text(f"{silent_socket}/img/\n")
    good = root / "img" / NAMES[0]  # beside a file that works: a run, with the listings' failed rows
    result = encode([folder, tmp_path / "list.txt", good], tmp_path / "out", model=model, **QUICK, **OPTIONS)
    rows = {r["path"]: r for r in read_index(tmp_path / "out")}
    assert rows[folder]["status"] == "failed" and "listing" in rows[folder]["error"]
    assert rows[f"{silent_socket}/img/"]["status"] == "failed" and result.failed == 2 and result.encoded == 1
    # alone, nothing can be encoded: refused before a folder is made, each listing named with its timeout
    with pytest.raises(ValueError, match=r"nothing to encode: .*hang/folder/img/.*no answer within the timeout"):
        encode([folder], tmp_path / "alone", model=model, **QUICK, **OPTIONS)
    assert not (tmp_path / "alone").exists()


def test_cli_timeout_option(model, server, tmp_path, capsys):
    ckpt = str(FIXTURES / "llava_vit_packing_tiny")
    base = ["encode", "--model", ckpt, "--workers", "0", "--min-image-tokens", "4", "--max-image-tokens", "48", "-q"]
    hung = f"{server.base}/hang/cli/img/{NAMES[0]}"
    args = [hung, "--timeout", "0.3", "--retries", "0", "--json", "--out", str(tmp_path / "a")]
    assert cli_main(base + args) == 1
    assert "no retries" in read_index(tmp_path / "a")[0]["error"]
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(SystemExit) as parse_error:  # refused while parsing, as every numeric option is
            cli_main(base + [hung, "--timeout", bad, "--out", str(tmp_path / "b")])
        assert parse_error.value.code == 2 and not (tmp_path / "b").exists()
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# what is retried, and what is not
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["503x2", "500x2", "resetx2", "429x2"])
def test_server_errors_resets_and_429_are_retried(mode, model, server, local, tmp_path, monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    pauses: list[float] = []
    monkeypatch.setattr("hevc_vit.encode.readers.remote.time", SimpleNamespace(sleep=pauses.append))
    urls = [f"{server.base}/{mode}/{n[:6]}/img/{n}" for n in NAMES]
    encode(urls, tmp_path / "out", model=model, retries=2, timeout=5, **OPTIONS)
    _assert_same_features(tmp_path / "out", local)
    assert all(server.counts[u.removeprefix(server.base)] > 2 for u in urls)  # the failures were met, then passed
    if mode.startswith("429"):  # the server's Retry-After (1 s), not the (zero) pause of its own
        assert pauses and all(p == 1.0 for p in pauses)


@pytest.mark.parametrize("code", ["404", "410", "403"])
def test_missing_and_refused_files_are_not_retried(code, model, server, tmp_path, monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    url = f"{server.base}/{code}xall/k/img/{NAMES[0]}"
    result = encode([url], tmp_path / "out", model=model, retries=3, timeout=5, **OPTIONS)
    (row,) = read_index(tmp_path / "out")
    assert row["status"] == "failed" and result.failed == 1
    assert "attempts" not in row["error"]
    assert server.counts[url.removeprefix(server.base)] <= 2  # one attempt: fsspec's HEAD, then its GET


def test_a_server_that_always_fails_names_the_status_after_the_retries(model, server, tmp_path, monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    urls = [f"{server.base}/503xall/k/img/{NAMES[0]}", f"{server.base}/resetxall/k/img/{NAMES[0]}"]
    encode(urls, tmp_path / "out", model=model, retries=2, timeout=5, **OPTIONS)
    rows = {r["path"]: r for r in read_index(tmp_path / "out")}
    assert "failed after 3 attempts: HTTP 503" in rows[urls[0]]["error"]
    assert "failed after 3 attempts" in rows[urls[1]]["error"] and "HTTP" not in rows[urls[1]]["error"]


def test_an_import_error_is_never_retried(monkeypatch):
    monkeypatch.setattr("hevc_vit.encode.readers.remote.RETRY_PAUSE", 0)
    calls = []

    def fail():
        calls.append(1)
        raise ImportError("no aiohttp")

    with pytest.raises(ImportError):
        with_retries(fail, retries=3, what="reading x")
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------------
# a missing package: named once, before anything is made
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def without_aiohttp(monkeypatch):
    """fsspec's http filesystem as it is where aiohttp is not installed."""
    loaded = sys.modules["fsspec.registry"]._registry  # the classes fsspec has imported (fsspec.registry: a view)
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    monkeypatch.setitem(sys.modules, "fsspec.implementations.http", None)
    for protocol in ("http", "https"):
        if protocol in loaded:
            monkeypatch.delitem(loaded, protocol)


@pytest.mark.parametrize("given", ["url", "txt", "csv", "parquet", "csv-later-row"])
def test_a_missing_package_stops_the_run_named_once(given, server, root, tmp_path, capsys, without_aiohttp):
    import pyarrow.parquet as pq

    urls = [f"{server.base}/img/{n}" for n in NAMES]
    (tmp_path / "urls.txt").write_text("".join(f"{u}\n" for u in urls))
    (tmp_path / "urls.csv").write_text("url\n" + "".join(f"{u}\n" for u in urls))
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    (tmp_path / "urls.csv-later-row").write_text(f"url\n{root / 'img' / NAMES[0]}\n{urls[1]}\n")
    inputs = urls if given == "url" else [str(tmp_path / f"urls.{given}")]
    if given == "csv-later-row":  # the first row a local path: the URL is met when the rows are read
        inputs = [str((tmp_path / "urls.csv-later-row").rename(tmp_path / "later.csv"))]
    ckpt = str(FIXTURES / "llava_vit_packing_tiny")
    args = ["encode", *inputs, "--model", ckpt, "--workers", "0", "--out", str(tmp_path / "out"), "-q"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("hevc-vit[data]") == 1 and "aiohttp" in err and "http://" in err
    assert not (tmp_path / "out" / "index.jsonl").exists()  # nothing encoded, no row
    if given != "csv-later-row":  # found before the output folder is made
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# tar member paths round-trip
# --------------------------------------------------------------------------------------------------

HOSTILE_MEMBERS = ["a::b.jpg", "dir\nx/c.jpg", "new\nline.jpg", "colon:.jpg", "per%3A%3Acent.jpg", "sp ace.jpg"]


@pytest.mark.parametrize("shard_folder", ["plain", "a::b", "n\nl"])
def test_tar_member_paths_round_trip_and_open(shard_folder, model, blobs, tmp_path):
    folder = tmp_path / shard_folder
    folder.mkdir()
    members = [(name, blobs[i % len(blobs)]) for i, name in enumerate(HOSTILE_MEMBERS)]
    shard = write_tar(folder / "s.tar", members)
    result = encode([shard], tmp_path / "out", model=model, **OPTIONS)
    rows = read_index(tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"] * len(members) and result.encoded == len(members)
    assert [split_tar_path(r["path"]) for r in rows] == [(name, str(shard)) for name, _ in members]
    for row, (name, data) in zip(rows, members):
        assert tar_path(name, str(shard)) == row["path"]
        assert row["path"].startswith("tar://") == ("::" not in name and "::" not in str(shard))
        if row["path"].startswith("tar://"):  # the plain form: fsspec opens it as it is
            with fsspec.open(row["path"], "rb") as f:
                assert f.read() == data
    resumed = encode([shard], tmp_path / "out", model=model, resume=True, **OPTIONS)
    assert resumed.skipped == len(members) and resumed.encoded == 0


def test_split_tar_path_refuses_other_paths():
    for path in ("a.jpg", "tar://no-shard", "http://h/x.tar"):
        with pytest.raises(ValueError, match="tar://MEMBER::SHARD"):
            split_tar_path(path)


def test_a_url_folder_that_cannot_be_listed_is_refused_naming_it(monkeypatch, tmp_path):
    """A store without listing, given as a folder: refused before anything is made, the URL and the fix named."""
    register_unlisting_filesystem(monkeypatch)
    with pytest.raises(ValueError, match=r"'nols://bucket/folder': the nols:// filesystem cannot list .* \.txt file"):
        encode(["nols://bucket/folder"], tmp_path / "out", model=str(FIXTURES / "llava_vit_packing_tiny"), **OPTIONS)
    assert not (tmp_path / "out").exists()
