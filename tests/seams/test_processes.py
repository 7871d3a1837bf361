"""The processes of an ``hevc-vit encode`` run: its decoding workers and its torchrun ranks end with the run
however it ends (kill -9, SIGTERM, Ctrl-C, a rank that dies), within a bounded time, and leave a folder that
``--resume`` completes to what an uninterrupted run writes; a run keeps a bounded number of file descriptors
whatever its packing window holds, and whatever stops it leaves ``index.jsonl`` of what it wrote."""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hevc_vit.encode import encode, read_index
from hevc_vit.encode.output.index import INDEX_NAME, rank_index_files, read_jsonl
from tests.helpers import assert_same_output, group_members, launch_command, subprocess_env, write_image

# `python WRAPPER PIDS encode ...`: the CLI with every forward slowed down, writing its pid to PIDS/RANK so that the
# test can signal one process of the run; `HEVC_VIT_TEST_SLOW` is the pause per forward in seconds
WRAPPER = """
import os, sys, time
from pathlib import Path
from hevc_vit.encode.model import forward
pids = Path(sys.argv.pop(1))
(pids / os.environ.get("RANK", "0")).write_text(str(os.getpid()))
run = forward.GroupEncoder.run
def slow_run(self, items):
    time.sleep(float(os.environ.get("HEVC_VIT_TEST_SLOW", "0.3")))
    return run(self, items)
forward.GroupEncoder.run = slow_run
from hevc_vit.cli import main
sys.exit(main(sys.argv[1:]))
"""

# small images, so that a run forwards many times; the options of every run here (one shard per forward)
ARGS = ("--min-image-tokens", "4", "--max-image-tokens", "16", "--max-tokens", "32", "--shard-size-mb", "0", "-q")
OPTIONS = dict(min_image_tokens=4, max_image_tokens=16, max_tokens=32, shard_size_mb=0, progress=False)
GONE_WITHIN = 20.0  # seconds: every process of a killed run is gone by then (a bound, not a timing measured)


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(40):
        write_image(root / f"{i:03d}.png", 28 + 14 * (i % 3), 28 + 14 * (i % 2), i)
    return root


FEW = 16  # images of the in-process stops: 5 forwards or more, so the third one stops the run midway


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    """The first ``FEW`` images of ``many``: the in-process stop tests need a few forwards, not forty items."""
    root = tmp_path_factory.mktemp("few")
    for i in range(FEW):
        write_image(root / f"{i:03d}.png", 28 + 14 * (i % 3), 28 + 14 * (i % 2), i)
    return root


@pytest.fixture(scope="module")
def few_whole(few, model, tmp_path_factory) -> Path:
    """The uninterrupted run of ``few``."""
    out = tmp_path_factory.mktemp("few_whole") / "out"
    encode([few], out, model=model, workers=0, **OPTIONS)
    return out


@pytest.fixture(scope="module")
def whole(many, model, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("whole") / "out"
    encode([many], out, model=model, workers=0, **OPTIONS)
    return out


def wait_until_gone(pgid: int, within: float = GONE_WITHIN) -> list[int]:
    """Poll until no process of group ``pgid`` is alive, at most ``within`` seconds; the survivors (then killed)."""
    deadline = time.monotonic() + within
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def published_rows(out: Path) -> int:
    """ok rows in the rank index files: each names a shard already complete on disk."""
    try:
        return sum(row.get("status") == "ok" for f in rank_index_files(out) for row in read_jsonl(f))
    except (OSError, ValueError):  # a row being written
        return 0


def start(world: int, args: list[str], tmp_path: Path, slow: float = 0.3) -> tuple[subprocess.Popen, Path]:
    """``hevc-vit ARGS`` through :data:`WRAPPER` at ``world`` ranks, in a session (and process group) of its own;
    returns the process and the folder its ranks write their pids to."""
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    cmd = launch_command(world, [str(tmp_path / "wrapper.py"), str(pids), *args])
    env = {**subprocess_env(), "HEVC_VIT_TEST_SLOW": str(slow)}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    return proc, pids


def wait_for_a_shard(proc: subprocess.Popen, out: Path, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while published_rows(out) == 0:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was interrupted: {proc.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no shard was published in {within} s")
        time.sleep(0.05)


def encode_args(many: Path, out: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["encode", str(many), "--out", str(out), "--model", str(ckpt), *ARGS, *extra]


def resume_and_compare(many: Path, out: Path, ckpt: Path, whole: Path, world: int = 1, *extra: str) -> None:
    """``--resume`` at ``world`` ranks is accepted (no process of the stopped run holds the folder) and completes
    it to ``whole``."""
    done = subprocess.run(
        launch_command(world, ["-m", "hevc_vit", *encode_args(many, out, ckpt, "--resume", *extra)]),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert_same_output(out, whole)


# --------------------------------------------------------------------------------------------------
# one process and its decoding workers
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_of_the_main_process_takes_its_workers_and_resume_completes_the_run(many, ckpt, whole, tmp_path):
    """The workers inherit the folder's lock at fork: one that outlived its parent would refuse --resume."""
    out = tmp_path / "out"
    proc, pids = start(1, encode_args(many, out, ckpt, "--workers", "2"), tmp_path)
    wait_for_a_shard(proc, out)
    assert len(group_members(proc.pid)) == 3, "expected the main process and its 2 workers"
    os.kill(int((pids / "0").read_text()), signal.SIGKILL)  # the main process alone, as the OOM killer does
    killed = time.monotonic()
    try:
        proc.communicate(timeout=60)  # the workers hold its stdout and stderr while they live
    finally:
        survivors = wait_until_gone(proc.pid)
    print(f"kill -9: every process of the run gone {time.monotonic() - killed:.1f} s later")
    assert survivors == [], f"processes of the run were alive {GONE_WITHIN} s after kill -9"
    resume_and_compare(many, out, ckpt, whole, 1, "--workers", "2")


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, status, target",
    [
        (signal.SIGTERM, 143, "main"),  # timeout(1), Kubernetes: the main process
        (signal.SIGTERM, 143, "group"),  # Slurm's scancel, a shell's kill -TERM -PGID: every process
        (signal.SIGINT, 130, "group"),  # Ctrl-C: the terminal's foreground process group
        (signal.SIGHUP, 129, "main"),  # the terminal closed
    ],
)
def test_a_stop_signal_ends_the_run_with_its_status_a_line_and_no_worker_left(
    many, ckpt, whole, tmp_path, signum, status, target
):
    out = tmp_path / "out"
    proc, pids = start(1, encode_args(many, out, ckpt, "--workers", "2"), tmp_path)
    wait_for_a_shard(proc, out)
    if target == "main":
        os.kill(int((pids / "0").read_text()), signum)
    else:
        os.killpg(proc.pid, signum)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        survivors = wait_until_gone(proc.pid)
    assert proc.returncode == status, stderr
    assert "hevc-vit encode: interrupted" in stderr and "--resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert survivors == []
    rows = read_index(out)  # the index of what was written, with every shard it names on disk
    assert 0 < len(rows) < 40 and not rank_index_files(out)
    assert all((out / row["shard"]).is_file() for row in rows if row["status"] == "ok")
    resume_and_compare(many, out, ckpt, whole, 1, "--workers", "2")


# --------------------------------------------------------------------------------------------------
# file descriptors, and the index of a run stopped by an error
# --------------------------------------------------------------------------------------------------

FD_LIMIT = 256


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def open_descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone meanwhile
        return 0


@pytest.mark.slow
def test_a_packing_window_of_many_small_items_holds_no_descriptor_per_item(model, ckpt, tmp_path):
    """1,200 inputs of 4 patches fit one forward of --max-tokens 65536, so all of them wait in the packer at once;
    under a limit of 256 descriptors the run finishes, and its descriptors never come near the limit."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(1200):
        write_image(tiny / f"{i:04d}.png", 28, 28, i)
    out = tmp_path / "out"
    args = ["encode", str(tiny), "--out", str(out), "--model", str(ckpt), "--workers", "2", "-q"]
    args += ["--min-image-tokens", "4", "--max-image-tokens", "4", "--max-tokens", "65536"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hevc_vit", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit_descriptors,
        start_new_session=True,
    )
    most = 0
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        most = max(most, open_descriptors(proc.pid))
        time.sleep(0.01)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        wait_until_gone(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Too many open files" not in stderr
    print(f"most descriptors open at once: {most} (limit {FD_LIMIT})")
    assert most < FD_LIMIT // 4, f"{most} descriptors open at once"
    here = tmp_path / "here"
    encode([tiny], here, model=model, workers=0, min_image_tokens=4, max_image_tokens=4, max_tokens=65536)
    assert_same_output(out, here)


class _Stop(KeyboardInterrupt):
    pass


def _fail_third_shard(monkeypatch) -> None:
    import hevc_vit.encode.output.shards as shards

    real, calls = shards.save_shard, []

    def save(tensors, path, mode):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device (simulated)")
        return real(tensors, path, mode)

    monkeypatch.setattr(shards, "save_shard", save)


def _interrupt_third_forward(monkeypatch) -> None:
    from hevc_vit.encode.model import forward

    real, calls = forward.GroupEncoder.run, []

    def run(self, items):
        calls.append(1)
        if len(calls) == 3:
            raise _Stop("interrupted (simulated)")
        return real(self, items)

    monkeypatch.setattr(forward.GroupEncoder, "run", run)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop, error", [(_fail_third_shard, OSError), (_interrupt_third_forward, _Stop)])
def test_whatever_stops_a_run_leaves_an_index_of_what_it_wrote(
    few, model, few_whole, tmp_path, monkeypatch, stop, error, workers
):
    out = tmp_path / "out"
    with monkeypatch.context() as patched:
        stop(patched)
        with pytest.raises(error):
            encode([few], out, model=model, workers=workers, **OPTIONS)
    assert multiprocessing.active_children() == []  # the decoding workers are stopped
    rows = read_index(out)
    assert (out / INDEX_NAME).is_file() and not rank_index_files(out)
    assert 0 < len(rows) < FEW
    assert all(row["status"] == "ok" and (out / row["shard"]).is_file() for row in rows)
    whole_rows = {row["path"]: row for row in read_index(few_whole)}
    assert [row["path"] for row in rows] == [path for path in whole_rows if path in {row["path"] for row in rows}]
    resumed = encode([few], out, model=model, resume=True, workers=workers, **OPTIONS)
    assert resumed.skipped == len(rows) and resumed.encoded == FEW - len(rows)
    assert_same_output(out, few_whole)


# --------------------------------------------------------------------------------------------------
# torchrun: a rank that dies
# --------------------------------------------------------------------------------------------------

RUN_ENDS_WITHIN = 60.0  # seconds from a rank's death to the end of torchrun (a bound, not a timing measured)


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it (torchrun's ranks run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("killed", [1, 0, "torchrun"])  # a rank, or torchrun's agent itself
def test_a_rank_killed_brings_the_run_down_and_resume_completes_it(many, ckpt, whole, tmp_path, killed):
    out = tmp_path / "out"
    args = encode_args(many, out, ckpt, "--workers", "2", "--device", "cpu")
    proc, pids = start(2, args, tmp_path, slow=0.5)
    wait_for_a_shard(proc, out)
    run = descendants(proc.pid)  # torchrun, both ranks, their decoding workers
    assert len(run) >= 3, f"expected torchrun and 2 ranks (and their workers): {run}"
    os.kill(proc.pid if killed == "torchrun" else int((pids / str(killed)).read_text()), signal.SIGKILL)
    deadline = time.monotonic() + RUN_ENDS_WITHIN
    while alive(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(run)
    print(f"rank {killed} killed: the run ended {time.monotonic() - deadline + RUN_ENDS_WITHIN:.1f} s later")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not left, f"processes of the run were alive {RUN_ENDS_WITHIN} s after rank {killed} was killed"
    assert proc.returncode != 0
    resume_and_compare(many, out, ckpt, whole, 2, "--device", "cpu")
