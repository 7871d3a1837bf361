"""Where a codec-assets run on Ray (``write_assets(engine="ray")``) meets the machine: the local instance it starts
listens on the loopback address alone; an address where nothing answers as a Ray cluster is refused in bounded
time, naming it; and a task the cluster never runs fails its row after a bound instead of holding the run.

Each case runs in a process of its own (its own ``RAY_TMPDIR``), which the test waits on for at most ``BOUND``
seconds: the old code hung in each of the last two, and the test then fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # each case starts (or tries to join) a Ray instance
SRC = Path(__file__).resolve().parents[3] / "src"
BOUND = 240  # seconds a case may take before the test fails (a loaded 2-core machine starts Ray in ~30 s)


@pytest.fixture
def ray_tmp():
    """A short RAY_TMPDIR (Ray's socket paths must stay under 107 characters)."""
    pytest.importorskip("ray", reason="Ray is not installed")
    folder = Path(tempfile.mkdtemp(prefix="hvca", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(script: str, ray_tmp: Path, **extra: str) -> dict:
    """``script`` in a fresh interpreter (its own session); the JSON it prints last. Fails the test after BOUND."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0")
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    env.update(extra)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail(f"the codec-assets run was still waiting after {BOUND} s")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_the_local_instance_listens_on_the_loopback_only(ray_tmp, tmp_path):
    """Just before the run shuts its Ray down, every process Ray started listens on 127.0.0.1 or ::1 alone."""
    script = f"""
        import json, pathlib, psutil, ray
        from hevc_vit.codec.assets import run
        seen = {{}}
        shutdown = ray.shutdown
        def look_then_shutdown(*a, **k):
            for p in psutil.Process().children(recursive=True):
                try:
                    ips = [c.laddr.ip for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
                except psutil.NoSuchProcess:
                    continue
                seen[f"{{p.pid}} {{p.name()}}"] = ips
            shutdown(*a, **k)
        ray.shutdown = look_then_shutdown
        run._run_on_ray([], [], pathlib.Path({str(tmp_path)!r}), None, None, False, None)
        print(json.dumps(seen))
    """
    seen = _run(script, ray_tmp)
    assert any("gcs_server" in name for name in seen) and any("raylet" in name for name in seen), seen

    def loopback(ip: str) -> bool:
        ip = ip.removeprefix("::ffff:")
        return ip.startswith("127.") or ip == "::1"

    open_to_network = {name: ips for name, ips in seen.items() if not all(map(loopback, ips))}
    assert not open_to_network, f"listening beyond the loopback: {open_to_network}"


def test_an_address_where_nothing_answers_as_ray_is_refused_in_time(ray_tmp, tmp_path):
    """A port that accepts connections and says nothing: a ValueError naming the address, within the bound."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        script = f"""
            import json, pathlib
            from hevc_vit.codec.assets import run
            run.RAY_CONNECT_S = 3.0
            try:
                run._run_on_ray([], [], pathlib.Path({str(tmp_path)!r}), None, None, False, {address!r})
                print(json.dumps({{"error": None}}))
            except ValueError as e:
                print(json.dumps({{"error": str(e)}}))
        """
        # Ray keeps 127.0.0.1 as given (else it dials the machine's address, where the silent server is not)
        error = _run(script, ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")["error"]
    assert error and address in error and "did not answer as a Ray cluster" in error and "3 s" in error, error


def test_a_task_the_cluster_never_runs_fails_its_row_after_the_bound(ray_tmp, tmp_path):
    """A Ray instance with no CPU for the task (it is never scheduled): the row fails with a TimeoutError naming the
    wait and its length, and the run returns."""
    script = f"""
        import json, pathlib, ray
        from hevc_vit.codec.assets import run
        from hevc_vit.codec.assets.inputs import Job
        ray.init(address="local", num_cpus=0, _node_ip_address="127.0.0.1", include_dashboard=False)
        run.WORKER_MARGIN_S = 2.0
        jobs = [Job(key="a", video="/nonexistent/a.mp4", source="/nonexistent/a.mp4")]
        rows = run._run_on_ray(jobs, [0], pathlib.Path({str(tmp_path)!r}), None, 1.0, False, None)
        ray.shutdown()
        print(json.dumps(rows[0]))
    """
    row = _run(script, ray_tmp)
    assert row["status"] == "failed" and row["error"].startswith("TimeoutError"), row
    assert "3 s" in row["error"] and "Ray" in row["error"], row
