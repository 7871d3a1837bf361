"""Re-audit of ``hevc-vit encode``'s durability with new inputs: a real stop signal (kill -9, SIGTERM, Ctrl-C) sent
at a random moment to a run with decoding workers, in every output format (``test_processes`` pins the safetensors
layout; ``test_durability`` the other formats under a simulated ``os._exit``), then ``--resume`` to the folder of an
uninterrupted run: one ``ok`` row per input, the same features, no file that no row names, no process left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from hevc_vit.encode import read_index
from hevc_vit.encode.output.formats import owned_files, part_files
from hevc_vit.encode.output.index import rank_index_files, read_jsonl
from tests.helpers import assert_same_output, group_members, launch_command, subprocess_env, write_image

np = pytest.importorskip("numpy")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (the 'data' extra) is not installed")

FORMATS = ("safetensors", "npy-parquet", "parquet", "clip-retrieval")
ARGS = ("--min-image-tokens", "4", "--max-image-tokens", "16", "--max-tokens", "32", "--shard-size-mb", "0", "-q")
ARGS += ("--storage-dtype", "float32")
GONE_WITHIN = 20.0  # seconds: every process of a stopped run is gone by then (a bound, not a timing measured)

# the CLI with every forward slowed down (so that a stop lands mid-run), its pid written to PIDS
WRAPPER = """
import os, sys, time
from pathlib import Path
from hevc_vit.encode.model import forward
Path(sys.argv.pop(1)).write_text(str(os.getpid()))
run = forward.GroupEncoder.run
def slow_run(self, items):
    time.sleep(0.2)
    return run(self, items)
forward.GroupEncoder.run = slow_run
if os.environ.get("HEVC_VIT_TEST_HANG"):  # a decoder stuck on that file, deaf to SIGTERM and SIGINT (C code)
    import signal
    from hevc_vit.encode.decode import load
    real_open = load.open_image
    def hang(path):
        if Path(path).name == os.environ["HEVC_VIT_TEST_HANG"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                time.sleep(3600)
        return real_open(path)
    load.open_image = hang
from hevc_vit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(40):
        write_image(root / f"{i:03d}.png", 28 + 14 * (i % 3), 28 + 14 * (i % 2), i)
    return root


def _cli(many: Path, out: Path, ckpt: Path, fmt: str, *extra: str) -> list[str]:
    return ["encode", str(many), "--out", str(out), "--model", str(ckpt), *ARGS, "--output-format", fmt, *extra]


def _stored(out: Path) -> dict[str, list[tuple[str, dict[str, torch.Tensor]]]]:
    """Every item a part file in ``out`` holds, read from the files (not the index): key -> [(part, tensors)]."""
    from safetensors import safe_open

    items: dict[str, list] = {}
    for path in owned_files(out):
        name = str(path.relative_to(out))
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as f:
                by_key: dict[str, dict] = {}
                for t in f.keys():
                    key, _, what = t.rpartition(".")
                    by_key.setdefault(key, {})[what] = f.get_tensor(t)
            for key, tensors in by_key.items():
                items.setdefault(key, []).append((name, tensors))
        elif path.suffix == ".parquet":
            npy = [p for p in part_files(out, name) if p.suffix == ".npy"]
            pooled = np.load(npy[0]) if npy else None
            for i, row in enumerate(pq.read_table(path).to_pylist()):
                tensors = {}
                vector = pooled[i] if pooled is not None else row.get("pooled")
                if vector is not None:
                    tensors["pooled"] = torch.tensor(np.asarray(vector, dtype=np.float32))
                if row.get("patches") is not None:
                    tensors["patches"] = torch.tensor(np.asarray(row["patches"], dtype=np.float32))
                items.setdefault(row["key"], []).append((name, tensors))
    return items


def _features(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A finished folder is consistent (one row per input, unique keys, no temporary or rank file, every part file
    named by a row, every ok row's item stored once in the part it names); its features by input path."""
    rows = read_index(out)
    assert len({r["path"] for r in rows}) == len(rows), Counter(r["path"] for r in rows).most_common(3)
    assert len({r["key"] for r in rows}) == len(rows)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not rank_index_files(out)
    ok = [r for r in rows if r["status"] == "ok"]
    named = {p for r in ok for p in part_files(out, r["shard"])}
    assert set(owned_files(out)) == named, f"files no row names: {sorted(set(owned_files(out)) - named)}"
    stored = _stored(out)
    assert {k: len(v) for k, v in stored.items()} == {r["key"]: 1 for r in ok}
    features = {}
    for r in ok:
        ((part, tensors),) = stored[r["key"]]
        assert part == r["shard"], (r, part)
        features[r["path"]] = tensors
    return features


def _assert_same(got: Path, want: Path) -> None:
    assert_same_output(got, want, _features)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_command(1, ["-m", "hevc_vit", *args]),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def wholes(many, ckpt, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wholes")
    return {fmt: root / fmt for fmt in FORMATS}


def _whole(wholes: dict[str, Path], many: Path, ckpt: Path, fmt: str) -> Path:
    """The uninterrupted run in ``fmt`` (made once, on first use)."""
    if not (wholes[fmt] / "index.jsonl").is_file():
        done = _run(_cli(many, wholes[fmt], ckpt, fmt, "--workers", "0"))
        assert done.returncode == 0, done.stderr
    return wholes[fmt]


STOPS = [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("signum", "status"), STOPS, ids=["kill-9", "sigterm", "sigint"])
def test_a_stop_signal_at_a_random_moment_in_any_format_resumes_to_the_uninterrupted_folder(
    many, ckpt, wholes, tmp_path, fmt, signum, status
):
    out, pid_file = tmp_path / "out", tmp_path / "pid"
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    cmd = launch_command(
        1, [str(tmp_path / "wrapper.py"), str(pid_file), *_cli(many, out, ckpt, fmt, "--workers", "2")]
    )
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    delay = random.Random(f"{fmt}{signum}").uniform(0.0, 1.5)  # after the first row: anywhere in a write
    deadline = time.monotonic() + 120
    while not any(read_jsonl(f) for f in rank_index_files(out) if f.stat().st_size) if out.is_dir() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no row was written in 120 s"
        time.sleep(0.02)
    time.sleep(delay)
    target = int(pid_file.read_text())
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal's foreground process group
    else:
        os.kill(target, signum)  # the main process alone (the OOM killer, timeout(1), Kubernetes)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        deadline = time.monotonic() + GONE_WITHIN
        while (alive := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert alive == [], f"processes of the run alive {GONE_WITHIN} s after {signum!r}"
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal")  # the delay fell after its end: nothing to check
    if proc.returncode == -signum != -signal.SIGKILL:
        # the signal came as the process exited, after the run had ended and given the signal its default
        # disposition back: the folder must be the finished run's, its lock let go
        assert not (out / ".encode.lock").exists(), stderr
        _assert_same(out, _whole(wholes, many, ckpt, fmt))
        pytest.skip("the signal came after the run had ended, as the process exited")
    assert proc.returncode == status, stderr
    if signum != signal.SIGKILL:
        assert "Traceback" not in stderr and "--resume" in stderr, stderr
    done = _run(_cli(many, out, ckpt, fmt, "--workers", "2", "--resume"))
    assert done.returncode == 0, done.stderr
    _assert_same(out, _whole(wholes, many, ckpt, fmt))


# --------------------------------------------------------------------------------------------------
# a full disk met by a raw write or an fsync (the index rows, the lock), at the n-th call
# --------------------------------------------------------------------------------------------------


def _cli_args(many: Path, out: Path, ckpt: Path, fmt: str, *extra: str) -> list[str]:
    return _cli(many, out, ckpt, fmt, "--workers", "0", *extra)


def _full_disk_at(monkeypatch, call: str, n: int) -> list[int]:
    """From the ``n``-th ``os.write`` (half its bytes land) or ``os.fsync`` on a file on, the disk is full."""
    real, calls = getattr(os, call), []

    def full(fd, *data):
        if fd > 2:
            calls.append(fd)
        if fd > 2 and len(calls) >= n:
            if data:
                real(fd, bytes(data[0])[: len(data[0]) // 2])
            raise OSError(28, os.strerror(28), f"fd {fd}")
        return real(fd, *data)

    monkeypatch.setattr(os, call, full)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("call", "n"), [("write", 1), ("write", 2), ("write", 4), ("fsync", 2), ("fsync", 5)])
def test_a_full_disk_at_a_raw_write_ends_with_one_line_and_resumes(
    many, ckpt, wholes, tmp_path, capsys, monkeypatch, fmt, call, n
):
    from hevc_vit.cli import main as cli_main

    whole = _whole(wholes, many, ckpt, fmt)
    out = tmp_path / "out"
    calls = _full_disk_at(monkeypatch, call, n)
    status = cli_main(_cli_args(many, out, ckpt, fmt))
    monkeypatch.undo()  # space was freed
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hevc-vit encode")]
    assert len(calls) >= n, f"only {len(calls)} calls of os.{call}"
    assert status == 1 and len(lines) == 1, lines
    assert "no space left" in lines[0] and "--resume" in lines[0], lines
    assert cli_main(_cli_args(many, out, ckpt, fmt, "--resume")) == 0, capsys.readouterr().err
    _assert_same(out, whole)


def test_a_disk_too_full_for_the_lock_file_is_reported_and_lets_the_folder_go(model, tmp_path, monkeypatch):
    """The first write of a run is the lock file's one line: a full disk there is reported as a full disk (the
    folder, what to do), and the lock is let go, so that the same process may use the folder once space is freed
    (it was kept, and every later run of the process on the folder was refused as 'in use by another run')."""
    from hevc_vit.encode import encode

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.png", 28, 28, 0)
    out = tmp_path / "out"
    options = dict(model=model, workers=0, progress=False, log=lambda m: None, min_image_tokens=4, max_image_tokens=16)
    _full_disk_at(monkeypatch, "write", 1)
    with pytest.raises(OSError, match="no space left") as raised:
        encode([inputs], out, **options)
    monkeypatch.undo()
    assert str(out) in str(raised.value) and "--resume" in str(raised.value)
    assert not (out / ".encode.lock").exists()
    assert encode([inputs], out, resume=True, **options).encoded == 1
    assert encode([inputs], tmp_path / "fresh", **options).encoded == 1


def _gone(pgid: int) -> list[int]:
    """Poll until no process of group ``pgid`` is alive, at most ``GONE_WITHIN`` s; the survivors (then killed)."""
    deadline = time.monotonic() + GONE_WITHIN
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "target"), [(*stop, "main") for stop in STOPS] + [(signal.SIGTERM, 143, "group")]
)
def test_a_stop_signal_while_a_worker_is_stuck_deaf_to_signals_takes_every_process(
    many, ckpt, wholes, tmp_path, signum, status, target
):
    """A decoding worker stuck on one input (in C code: it ignores SIGTERM and SIGINT) while the run is stopped:
    every process of the run is gone within a bound, and --resume (the input readable again) completes the run."""
    out, pid_file = tmp_path / "out", tmp_path / "pid"
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    args = _cli(many, out, ckpt, "safetensors", "--workers", "2", "--decode-timeout", "600")
    env = {**subprocess_env(), "HEVC_VIT_TEST_HANG": "039.png"}
    proc = subprocess.Popen(
        launch_command(1, [str(tmp_path / "wrapper.py"), str(pid_file), *args]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(f.stat().st_size for f in rank_index_files(out))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no row was written in 120 s"
        time.sleep(0.05)
    time.sleep(2.0)  # the run is waiting on the stuck input by now
    if target == "group" or signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        os.kill(int(pid_file.read_text()), signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stderr = "(still running 60 s after the signal)"
    finally:
        alive = _gone(proc.pid)
    assert alive == [], f"processes of the run alive {GONE_WITHIN} s after {signum!r}: {stderr[-2000:]}"
    assert proc.returncode == status, stderr[-3000:]
    done = _run(_cli(many, out, ckpt, "safetensors", "--workers", "2", "--resume"))
    assert done.returncode == 0, done.stderr
    _assert_same(out, _whole(wholes, many, ckpt, "safetensors"))


# --------------------------------------------------------------------------------------------------
# bounded memory
# --------------------------------------------------------------------------------------------------

HUGE = 4 << 30  # bytes of each stray file: a run that read one whole would peak far above PEAK_RSS
PEAK_RSS = 2 << 30  # bytes: the CLI with the tiny model peaks well under this (a bound, not a measured figure)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])  # 2: the workers, reaped by the run, count in its peak (wait4)
def test_huge_stray_files_in_an_input_folder_are_not_read_whole(ckpt, tmp_path, workers):
    """A 4 GiB non-media file, with and without an image suffix, beside an image: each gets a failed row, the image
    is encoded, and the run's peak memory stays far below the size of either file (sparse files: no disk used)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.png", 28, 28, 0)
    for name in ("huge.bin", "huge.png"):
        with open(inputs / name, "wb") as f:
            f.truncate(HUGE)
    out = tmp_path / "out"
    args = [
        "-m",
        "hevc_vit",
        "encode",
        str(inputs),
        "--out",
        str(out),
        "--model",
        str(ckpt),
        "--workers",
        workers,
        "-q",
    ]
    proc = subprocess.Popen(
        launch_command(1, args), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # the resources of this child alone
    finally:
        proc.kill()
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    rows = {Path(r["path"]).name: r["status"] for r in read_index(out)}
    assert os.waitstatus_to_exitcode(status) in (0, 1), status  # 1: the run had failures
    assert rows == {"a.png": "ok", "huge.bin": "failed", "huge.png": "failed"}, rows
    assert peak < PEAK_RSS, f"peak RSS {peak / 2**30:.2f} GiB"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 2])  # the run settings, then the merged index
def test_a_full_disk_at_a_whole_file_write_ends_with_one_line_and_resumes(
    many, ckpt, wholes, tmp_path, capsys, monkeypatch, fmt, n
):
    """The files written whole (the run's settings, the merged index) from the ``n``-th on meet a full disk."""
    from hevc_vit import files
    from hevc_vit.cli import main as cli_main

    whole = _whole(wholes, many, ckpt, fmt)
    real, calls = files._write_synced, []

    def full(path, data):
        calls.append(path)
        if len(calls) >= n:
            raise OSError(28, os.strerror(28), str(path))
        return real(path, data)

    monkeypatch.setattr(files, "_write_synced", full)
    out = tmp_path / "out"
    status = cli_main(_cli_args(many, out, ckpt, fmt))
    monkeypatch.undo()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hevc-vit encode")]
    if len(calls) < n:
        pytest.skip(f"a run writes {len(calls)} whole files")
    assert status == 1 and len(lines) == 1, lines
    assert "no space left" in lines[0] and str(out) in lines[0] and "--resume" in lines[0], lines
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert cli_main(_cli_args(many, out, ckpt, fmt, "--resume")) == 0, capsys.readouterr().err
    _assert_same(out, whole)
