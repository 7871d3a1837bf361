"""Joining a Ray cluster, or starting a local instance, for the Ray engine; and quieting Ray Data."""

from __future__ import annotations

import logging
from typing import Any

INSTALL_HINT = "pip install 'hevc-vit[ray]'"


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an ``ImportError`` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (the engine needs Ray Data, not only Ray core)
    except ImportError:
        raise ImportError(f"--engine ray needs Ray Data, which is not installed; {INSTALL_HINT}") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` made on this machine), or with None use
    the Ray instance this process already has, else start a local one (no dashboard). Returns True when this
    call started or joined it (the caller shuts it down when done)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    return True


def quiet_data(show_progress: bool) -> None:
    """Ray Data's progress bars only when the run shows progress; its notices about each execution only then."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    logging.getLogger("ray.data").setLevel(logging.INFO if show_progress else logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
