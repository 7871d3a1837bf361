"""A watchdog for the local Ray instance a run starts: stops its processes when the driver dies without shutting
Ray down (``kill -9``), which Ray's own fate-sharing does not do for all of them (its dashboard and runtime-env
agents outlive the raylet).

``python -m hevc_vit.encode.engines.ray.watchdog PID...``: the PIDs are the processes ``ray.init`` started
(GCS, raylet, ...). Once a second it notes them and their descendants (workers, agents); when its stdin, a pipe
from the driver, ends (the driver shut Ray down and closed it, or died), it sends SIGTERM to each noted process
still running, then SIGKILL to those left after :data:`GRACE` seconds, and exits. psutil (a Ray dependency)
guards against PIDs reused by other processes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from typing import Any

GRACE = 3.0  # seconds between SIGTERM and SIGKILL
POLL = 1.0  # seconds between looks at the process table (one pass each)


def start(roots: list[int]) -> subprocess.Popen:
    """The watchdog of the processes ``roots`` (and their descendants), fed by a pipe; :func:`stop` ends it."""
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *map(str, roots)],  # by path: only stdlib and psutil needed
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        close_fds=True,
    )


def stop(watchdog: subprocess.Popen, timeout: float = GRACE + 10) -> None:
    """Close the pipe (the watchdog then stops whatever is left) and wait for it, at most ``timeout`` seconds."""
    if watchdog.stdin is not None:
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait(timeout=5)


def _note(known: dict[int, Any], roots: list[int]) -> None:
    """Add the running descendants of ``roots`` (and the roots) to ``known``: one pass over the process table."""
    import psutil  # optional: a Ray dependency (the 'ray' extra)

    children: dict[int, list[Any]] = {}
    for p in psutil.process_iter(["ppid"]):
        children.setdefault(p.info["ppid"], []).append(p)
        if p.pid in roots:
            known.setdefault(p.pid, p)
    stack = [pid for pid in roots if pid in known]
    while stack:
        pid = stack.pop()
        if not _same(known[pid]):  # gone, and the PID maybe reused: its new children are not ours
            continue
        for child in children.get(pid, []):
            if child.pid not in known:
                known[child.pid] = child
                stack.append(child.pid)


def _same(p: Any) -> bool:
    import psutil  # optional: a Ray dependency (the 'ray' extra)

    try:
        return p.is_running()  # compares the creation time: False for a PID reused by another process
    except psutil.Error:
        return False


def _stop_all(known: dict[int, Any]) -> None:
    import psutil  # optional: a Ray dependency (the 'ray' extra)

    alive = []
    for p in known.values():
        try:
            if p.is_running():  # the same process (its creation time), not a reused PID
                p.terminate()
                alive.append(p)
        except psutil.Error:
            continue
    _, left = psutil.wait_procs(alive, timeout=GRACE)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=GRACE)


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl-C and a closed terminal reach the whole group: the driver
        signal.signal(sig, signal.SIG_IGN)  # handles them and closes the pipe, or dies and the pipe ends

    roots = [int(pid) for pid in argv]
    known: dict[int, Any] = {}
    while True:
        _note(known, roots)
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # the pipe ended: the driver is done or gone
            break
    known.pop(os.getpid(), None)
    _stop_all(known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
