"""The ranks of a run on their own: one process is rank 0 of 1 with no group; a lost rank is named; a child
that outlived its parent leaves at once."""

from __future__ import annotations

import os

import pytest
import torch

from hevc_vit.encode.engines.distributed import RankLostError, Ranks, _naming_a_lost_rank, die_with_parent

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_one_process_is_rank_0_of_1_and_every_collective_is_local(monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks.setup(torch.device("cpu"))
    assert (ranks.rank, ranks.world, ranks.active) == (0, 1, False)
    box = {"a": 1}
    assert ranks.broadcast(box) is box and ranks.gather(box) == [box]
    ranks.barrier()
    ranks.close()  # owns no group: nothing to destroy


def test_a_collective_that_fails_names_the_lost_rank():
    with pytest.raises(RankLostError, match=r"the barrier of the ranks failed: .*\(Connection closed by peer\)") as e:
        with _naming_a_lost_rank("barrier"):
            raise RuntimeError("Connection closed by peer\nmore detail")
    assert isinstance(e.value, ConnectionError) and "rerun with --resume" in str(e.value)
    with pytest.raises(ValueError):  # other errors pass as they are
        with _naming_a_lost_rank("gather"):
            raise ValueError("x")


@pytest.mark.parametrize("parent_alive", [True, False])
def test_die_with_parent_returns_only_while_the_parent_is_there(parent_alive):
    parent = os.getpid()
    child = os.fork()
    if child == 0:  # the child: says by its exit status whether die_with_parent returned
        try:
            die_with_parent(parent if parent_alive else parent + 1_000_000)
        finally:
            os._exit(3)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == (3 if parent_alive else 0)  # a wrong parent: gone at once


# two ranks started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; no torchrun): each sets up, rank 0
# broadcasts its pid, and rank 0 says on which addresses it listens
_RANK = r"""
import json, os, sys
import psutil, torch
from hevc_vit.encode.engines.distributed import Ranks
ranks = Ranks.setup(torch.device("cpu"))
got = ranks.broadcast(os.getpid())
me = psutil.Process()
listening = [c.laddr.ip for c in me.net_connections("inet") if c.status == psutil.CONN_LISTEN]
ranks.barrier()
ranks.close()
print(json.dumps({"rank": ranks.rank, "got": got, "listening": listening}))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_ranks_started_by_hand_on_the_loopback_listen_on_the_loopback_only(tmp_path):
    """With MASTER_ADDR=127.0.0.1, rank 0's rendezvous store (torch's own listens on every interface, "::") and
    its gloo connections listen on the loopback address alone, and the ranks still meet."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[3] / "src")
    base = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC")}
    base.update(PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [
        subprocess.Popen([sys.executable, "-c", _RANK], env={**base, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    rank0 = next(o for o in outs if o["rank"] == 0)
    assert [o["got"] for o in outs] == [procs[0].pid, procs[0].pid]  # rank 0's pid, on both ranks
    assert rank0["listening"], rank0  # the test saw the store
    assert all(ip.removeprefix("::ffff:").startswith("127.") or ip == "::1" for ip in rank0["listening"]), rank0
