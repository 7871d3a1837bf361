"""This process's place in a run under ``torchrun`` (or with ``torch.distributed`` initialised): its rank,
the world size, and the few collectives a run needs (on a CPU ``gloo`` group, whatever the device)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

BARRIER_TIMEOUT = timedelta(hours=6)  # ranks may finish their shares far apart on large runs


@dataclass
class Ranks:
    """This process's place in the run. One process: rank 0 of 1, no process group."""

    rank: int = 0
    world: int = 1
    group: Any = None  # a gloo group for barriers and broadcasts of Python objects (None: default group)
    owns_group: bool = False

    @classmethod
    def setup(cls, device: torch.device) -> Ranks:
        import torch.distributed as dist

        under_launcher = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
        if not dist.is_available() or not (dist.is_initialized() or under_launcher):
            return cls()
        owns = False
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
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on rank 0 (other ranks get an empty list)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out or []

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
