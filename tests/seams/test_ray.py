"""Where the Ray engine meets the machine: connecting (an address where nothing answers, a port that is no Ray
cluster, a stale ``ray_current_cluster`` file) is refused in bounded time with the address named; the local
instance the CLI starts listens on the loopback address alone; a run shows items done of the total and names its
parts by input number; and every process a run started is gone after a normal end, an exception, SIGTERM,
SIGINT and kill -9 of the driver.

Each run is ``hevc-vit encode --engine ray`` in a process of its own (its own session, its own ``RAY_TMPDIR``:
Ray's ``ray_current_cluster`` and session folders live there, never in the real /tmp/ray), paused mid-way by the
stages' test seam (``HEVC_VIT_RAY_FAULT``: ``hold write``) while the test looks at its processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hevc_vit.encode import EncodeOptions, read_index
from tests.helpers import write_image

pytestmark = pytest.mark.ray
SRC = Path(__file__).resolve().parents[2] / "src"
BOUND = 600  # seconds any process the tests start may take before the test fails (the old code hung here)
HOLD_WAIT = 600  # a loaded 2-core machine took minutes to start Ray
TOKENS = ("--min-image-tokens", "4", "--max-image-tokens", "48", "--max-video-tokens", "48", "--max-tokens", "64")
# the CLI with a terminal's defaults (a progress bar) while its stderr goes to a file
CLI = "import sys; sys.stderr.isatty = lambda: True; from hevc_vit.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short RAY_TMPDIR (Ray's socket paths must stay under 107 characters)."""
    pytest.importorskip("ray.data")
    folder = Path(tempfile.mkdtemp(prefix="hvray", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _env(ray_tmp: Path, loopback_addresses: bool = False, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", **extra)
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    if loopback_addresses:  # Ray keeps 127.0.0.1 as given (else it dials the machine's address, where our test
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # servers, on the loopback only, are not)
    return env


def _cli(args: list[str], env: dict[str, str], stderr_path: Path) -> subprocess.Popen:
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, "encode", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its signals and Ray's process-group clean-up stay away from pytest
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A TCP server on 127.0.0.1 that accepts connections and then says nothing (``reply`` None) or ``reply``."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port, self.reply, self.stop, self.held = self.sock.getsockname()[1], reply, threading.Event(), []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)
            if self.reply is not None:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()


def _refused(args: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Run the CLI, which must refuse (exit 2) within the bound without making the output folder; its stderr."""
    out = tmp_path / "out"
    proc = _cli([str(_images(tmp_path, 2)), "--out", str(out), "--engine", "ray", *TOKENS, *args], env, tmp_path / "e")
    try:
        status = proc.wait(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        pytest.fail(f"hevc-vit encode {args} was still connecting after {BOUND} s")
    text = (tmp_path / "e").read_text(errors="replace")
    assert status == 2, text
    assert not out.exists() or not any(out.iterdir()), "a refused run left files"
    return text


def _images(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "images"
    if not folder.exists():
        folder.mkdir()
        for i in range(n):
            write_image(folder / f"{i}.png", 30 + 10 * i, 40, i)
    return folder


# ------------------------------------------------------------------------------------------------------------
# 1. connecting: bounded, refused with the address named
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", ["nothing", "silent", "http"])
def test_an_address_that_is_no_ray_cluster_is_refused_in_time(server, ray_tmp, tmp_path):
    """Nothing listening (refused at once), a port that accepts and says nothing, one that answers HTTP/1: each
    is exit 2 naming the address, within ``--ray-timeout``; the old code waited without end."""
    replies = {"silent": None, "http": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"}
    fake = _Server(replies[server]) if server in replies else None
    port = fake.port if fake else _free_port()
    try:
        text = _refused(["--ray-address", f"127.0.0.1:{port}", "--ray-timeout", "3"], _env(ray_tmp, True), tmp_path)
    finally:
        if fake:
            fake.close()
    assert f"127.0.0.1:{port}" in text
    expected = {"nothing": "no Ray cluster answers there", "silent": "did not answer", "http": "answered, but not"}
    assert expected[server] in text, text


@pytest.mark.slow
def test_auto_with_a_stale_ray_current_cluster_is_refused(ray_tmp, tmp_path):
    """``ray start`` left ``ray_current_cluster`` (in Ray's temporary folder, ``$RAY_TMPDIR/ray``) naming a cluster
    that is gone: ``--ray-address auto`` says so, naming that address."""
    port = _free_port()
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
    text = _refused(["--ray-address", "auto", "--ray-timeout", "3"], _env(ray_tmp, True), tmp_path)
    assert f"127.0.0.1:{port}" in text and "auto" in text, text


def test_ray_timeout_is_checked():
    with pytest.raises(ValueError, match=r"ray_timeout=0; expected a finite number > 0"):
        EncodeOptions(engine="ray", ray_timeout=0)
    with pytest.raises(ValueError, match="ray_timeout was given with engine='local'"):
        EncodeOptions(ray_timeout=5.0)
    assert EncodeOptions(engine="ray", ray_timeout=2.5).ray_timeout == 2.5


# ------------------------------------------------------------------------------------------------------------
# 2-4. a whole run, paused mid-way: loopback only, progress, part names, nothing left behind
# ------------------------------------------------------------------------------------------------------------


def _tree(proc: subprocess.Popen, ray_tmp: Path) -> list:
    """The driver and every process it started (its descendants), and any process naming our RAY_TMPDIR."""
    import psutil

    found = {}
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if str(ray_tmp) in " ".join(p.info["cmdline"] or []):
            found.setdefault(p.pid, p)
    return list(found.values())


def _listening(processes: list) -> dict[str, list[str]]:
    import psutil

    out = {}
    for p in processes:
        try:
            addresses = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            out[f"{p.pid} {p.name()}"] = addresses
        except psutil.NoSuchProcess:
            continue
    return out


def _is_loopback(ip: str) -> bool:
    ip = ip.removeprefix("::ffff:")
    return ip.startswith("127.") or ip == "::1"


def _still_running(processes: list, wait: float) -> list[str]:
    """The processes not gone (zombies count as gone) after waiting at most ``wait`` seconds."""
    import psutil

    def alive(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    end = time.monotonic() + wait
    while True:
        left = [p for p in processes if alive(p)]
        if not left or time.monotonic() > end:
            return [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left if alive(p)]
        time.sleep(0.5)


def _wait_held(fault: Path, proc: subprocess.Popen, stderr_path: Path) -> None:
    end = time.monotonic() + HOLD_WAIT
    while time.monotonic() < end:
        if fault.read_text() == "held":
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before the write stage: {stderr_path.read_text()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the run did not reach the write stage in {HOLD_WAIT} s: {stderr_path.read_text()[-3000:]}")


def _progress_seen(stderr_path: Path, wait: float) -> tuple[int, int]:
    """The last ``done/total`` the bar printed, once done > 0 (or what it shows after ``wait`` seconds)."""
    end = time.monotonic() + wait
    while True:
        found = re.findall(r"encode \(ray\):[^\r\n]*?(\d+)/(\d+) \[", stderr_path.read_text(errors="replace"))
        last = tuple(map(int, found[-1])) if found else (0, 0)
        if last[0] > 0 or time.monotonic() > end:
            return last
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("end", ["normal", "SIGTERM", "SIGINT", "SIGKILL"])
def test_a_run_binds_loopback_shows_progress_and_leaves_nothing(end, ray_tmp, tmp_path, ckpt):
    """The CLI starts its own Ray (a stale ``ray_current_cluster`` naming a dead cluster must not be joined);
    paused before its first part is written: every process of the run listens on loopback addresses only, and
    the bar shows items the model finished, of the total. Then the run ends (normally, or the driver gets the
    signal) and every process it started is gone; a normal end names each part by its first input's number."""
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
    images = _images(tmp_path, 7)  # with the corrupt JPEG 8 inputs: two model calls of at most 5 (--max-tokens 64)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(40)))
    fault, out, stderr_path = tmp_path / "fault", tmp_path / "out", tmp_path / "stderr"
    fault.write_text("hold write")
    args = [str(images), "--out", str(out), "--model", str(ckpt), "--engine", "ray", "--workers", "0", *TOKENS]
    proc = _cli([*args, "--shard-size-mb", "0"], _env(ray_tmp, HEVC_VIT_RAY_FAULT=str(fault)), stderr_path)
    try:
        _wait_held(fault, proc, stderr_path)
        processes = _tree(proc, ray_tmp)
        listening = _listening(processes)
        names = " ".join(listening)
        assert "gcs_server" in names and "raylet" in names, listening  # the test saw the servers
        open_to_network = {p: ips for p, ips in listening.items() if not all(map(_is_loopback, ips))}
        assert not open_to_network, f"listening beyond the loopback: {open_to_network}"
        done, total = _progress_seen(stderr_path, 30)
        assert total == 8 and 0 < done <= total, stderr_path.read_text()[-2000:]
        assert not (out / "shards").exists() or not any((out / "shards").iterdir())  # nothing written yet
        if end == "normal":
            fault.unlink()
        else:
            os.kill(proc.pid, getattr(signal, end))
        status = proc.wait(timeout=BOUND)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    expected = {"normal": 1, "SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[end]  # normal: corrupt.jpg failed
    assert status == expected, stderr_path.read_text()[-3000:]
    left = _still_running(processes, 60)
    assert not left, f"after {end} of the driver these processes of the run are still running: {left}"
    if end == "normal":
        _assert_parts_named_by_first_input(out)


def _assert_parts_named_by_first_input(out: Path) -> None:
    """Every part is ``rankNNNNN-MMMMM``, NNNNN the listing number of its first input (index.jsonl keeps the
    listing order); the rows of one part share its name."""
    rows = read_index(out)
    first: dict[str, int] = {}
    for position, row in enumerate(rows):
        if row["shard"]:
            first.setdefault(row["shard"], position)
    assert len(first) >= 2, rows  # several parts: --shard-size-mb 0 writes a part per model call
    for shard, position in first.items():
        match = re.fullmatch(r"shards/rank(\d{5})-(\d{5})\.safetensors", shard)
        assert match and int(match[1]) == position, (shard, position)
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.split("/")[1] for s in first)


@pytest.mark.slow
def test_an_exception_in_the_run_stops_the_ray_it_started(ray_tmp, tmp_path, ckpt, monkeypatch):
    """An error on the driver after Ray started: raised to the caller, and Ray's processes are gone."""
    import psutil
    import ray

    from hevc_vit.encode.engines.ray import run

    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    seen, seen_names = [], []
    # processes this test process already had (e.g. multiprocessing's forkserver from an earlier test) are not the run's
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}

    def broken(*args, **kwargs):
        seen.extend(p for p in psutil.Process().children(recursive=True) if p.pid not in earlier)
        seen_names.extend(p.name() for p in seen)
        raise RuntimeError("a bug on the driver")

    monkeypatch.setattr(run, "_encode_claimed", broken)
    with pytest.raises(RuntimeError, match="a bug on the driver"):
        run.encode_folder([_images(tmp_path, 2)], tmp_path / "out", EncodeOptions(model=ckpt, progress=False))
    assert not ray.is_initialized()
    assert "raylet" in seen_names and "gcs_server" in seen_names, seen_names
    left = _still_running(seen, 60)
    assert not left, f"still running after the exception: {left}"
