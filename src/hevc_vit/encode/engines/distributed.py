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

import ipaddress
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hevc_vit.encode.decode.workers import die_with_parent

BARRIER_TIMEOUT = timedelta(hours=6)  # ranks may finish their shares far apart on large runs
POLL_SECONDS = 0.05  # how often a rank waiting on the others looks (and lets signals in)


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
            store = _loopback_store()
            if store is None:
                dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
            else:
                rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
                dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
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


def _loopback_store() -> Any:
    """For ranks started without torchrun's agent store whose ``MASTER_ADDR`` is a loopback address: the
    rendezvous store, which rank 0 hosts on that address alone (torch's own, ``env://``, listens on every
    interface); every rank takes this path alike (the same ``MASTER_ADDR``), so their store keys agree. None
    otherwise: ``env://``, on the interfaces the user's ``MASTER_ADDR`` asks for (other machines' ranks)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    host, port = os.environ["MASTER_ADDR"].strip("[]"), int(os.environ["MASTER_PORT"])
    host = "127.0.0.1" if host == "localhost" else host
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: other machines' ranks may need to reach it
        return None
    world = int(os.environ["WORLD_SIZE"])
    if os.environ["RANK"] != "0":
        return dist.TCPStore(host, port, world, False, timeout=BARRIER_TIMEOUT)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(
            e.errno,
            f"MASTER_ADDR={host} MASTER_PORT={port}: rank 0 cannot listen there ({e.strerror}); choose a free "
            f"MASTER_PORT",
        ) from None
    # the store owns the listening socket from here (detach: Python must not close it)
    return dist.TCPStore(host, port, world, True, timeout=BARRIER_TIMEOUT, master_listen_fd=sock.detach())


@contextmanager
def _naming_a_lost_rank(what: str):
    try:
        yield
    except RuntimeError as e:  # gloo: "Connection closed by peer", a timeout
        raise RankLostError(
            f"the {what} of the ranks failed: another rank of the run has stopped or is unreachable "
            f"({str(e).strip().splitlines()[0][:300]}); what this rank finished is kept: rerun with --resume"
        ) from e
