"""The watchdog of a local Ray instance, without Ray: it notes a process tree and stops it when its pipe ends."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hevc_vit.encode.engines.ray import watchdog


@pytest.mark.slow  # ~2 s here (init reaps the orphan slowly); the fast sibling: test_stop_all_ends_what_was_noted
def test_the_watchdog_stops_the_processes_it_watches_when_its_pipe_ends():
    # not our child (the shell leaves it to init, which reaps it): a child of ours would stay a zombie, which the
    # watchdog waits out for its grace periods, as it would for a process that ignores SIGTERM
    pid = int(subprocess.check_output(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]))
    psutil = pytest.importorskip("psutil")
    sleeper = psutil.Process(pid)
    try:
        dog = watchdog.start([pid])
        watchdog.stop(dog)  # closes the pipe: the watchdog stops what it noted, then exits
        assert dog.returncode == 0
        assert not sleeper.is_running() or sleeper.status() == psutil.STATUS_ZOMBIE
    finally:
        if sleeper.is_running():
            sleeper.kill()


def test_note_finds_a_root_and_its_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        known: dict = {}
        watchdog._note(known, [os.getpid()])
        assert os.getpid() in known and child.pid in known
        watchdog._note(known, [999_999_999])  # no such process: nothing more
        assert set(known) >= {os.getpid(), child.pid}
    finally:
        child.kill()
        child.wait()


def test_stop_all_ends_what_was_noted():
    psutil = pytest.importorskip("psutil")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        known: dict = {}
        watchdog._note(known, [child.pid])
        assert set(known) == {child.pid}
        watchdog._stop_all(known)  # SIGTERM, and our own child is reaped by the wait
        assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
