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
