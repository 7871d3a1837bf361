"""This process's place in a run under ``torchrun`` (or with ``torch.distributed`` initialised): its rank,
the world size, and the few collectives a run needs (on a CPU ``gloo`` group, whatever the device).

Waiting on the other ranks is bounded and interruptible. Every collective starts with a barrier that this
process waits on in Python (:meth:`Ranks.barrier`), so the long waits (rank 0 listing the inputs, ranks that
finish their shares far apart) let a signal in at once: SIGTERM from torchrun, whose agent stops every rank
when one dies, ends this rank cleanly (a wait inside gloo would hold the signal until the wait ends). A rank
that dies closes its connections: the others' waits end at once with :class:`RankLostError`, and a live rank
that never arrives ends them after :data:`BARRIER_TIMEOUT`. A rank started by torchrun dies with torchrun's agent
(:func:`die_with_parent`): killed with -9, the agent can no longer stop its ranks, which would otherwise wait in
the rendezvous for hours, or finish the run unseen while holding the output folder."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

BARRIER_TIMEOUT = timedelta(hours=6)  # ranks may finish their shares far apart on large runs
POLL_SECONDS = 0.05  # how often a rank waiting on the others looks (and lets signals in)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ``parent`` ends (Linux; elsewhere a no-op);
    exit now if it already has. Used by the decoding workers and by ranks under torchrun."""
    if sys.platform.startswith("linux"):  # prctl is Linux's
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the callers' own checks remain
            pass
    if os.getppid() != parent:  # the parent went before the request above took effect
        os._exit(0)


class RankLostError(ConnectionError):
    """Another rank of the run is gone (it died, or its connection did): this rank stops too."""


@dataclass
class Ranks:
    """This process's place in the run. One process: rank 0 of 1, no process group."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a gloo group for barriers and broadcasts of Python objects (None: default group)
    owns_group: bool = False

    @classmethod
    def setup(cls, device: torch.device) -> Ranks:
        under_launcher = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        if not dist.is_available() or not (dist.is_initialized() or under_launcher):
            return cls()
        owns = False
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: its agent is this process's parent
            die_with_parent(os.getppid())
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
            owns = True
        group = None
        if dist.get_backend() != "gloo":  # object broadcasts and barriers stay on the CPU
            group = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), group, owns)

    @property
    def active(self) -> bool:
        return self.world > 1 or self.owns_group

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self.barrier()  # the wait for rank 0, interruptible; then the broadcast itself is quick
        with _naming_a_lost_rank("broadcast"):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on rank 0 (other ranks get an empty list)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self.barrier()  # the wait for the last rank, interruptible; then the gather itself is quick
        with _naming_a_lost_rank("gather"):
            dist.gather_object(obj, out, dst=0, group=self.group)
        return out or []

    def barrier(self) -> None:
        """Wait until every rank is here, looking every :data:`POLL_SECONDS` (signals are handled meanwhile);
        :class:`RankLostError` when a rank is gone, or none came for :data:`BARRIER_TIMEOUT`."""
        if not self.active:
            return
        with _naming_a_lost_rank("barrier"):
            work = dist.barrier(group=self.group, async_op=True)
            while not work.is_completed():
                time.sleep(POLL_SECONDS)
            work.wait()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


@contextmanager
def _naming_a_lost_rank(what: str):
    try:
        yield
    except RuntimeError as e:  # gloo: "Connection closed by peer", a timeout
        raise RankLostError(
            f"the {what} of the ranks failed: another rank of the run has stopped or is unreachable "
            f"({str(e).strip().splitlines()[0][:300]}); what this rank finished is kept: rerun with --resume"
        ) from e
