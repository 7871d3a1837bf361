"""Joining a Ray cluster, or starting a local instance, for the Ray engine; and quieting Ray Data.

:func:`ray_session` is how a run gets Ray: it joins the cluster at ``ray_address`` (after checking, within
``ray_timeout`` seconds, that something there answers as a Ray cluster does), or starts a local instance whose
every process (GCS, raylet, object manager, workers, agents) listens on 127.0.0.1 alone, and shuts down what it
started however the run ends: a normal end, an exception, SIGINT, SIGTERM or SIGHUP (each a
:class:`RayInterrupted`, so the clean-up runs; the CLI exits ``128 + signal``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hevc_vit.encode.engines.ray import watchdog
from hevc_vit.encode.options import RAY_TIMEOUT
from hevc_vit.runtime.ray_connect import init_checked, start_loopback_instance

INSTALL_HINT = "pip install 'hevc-vit[ray]'"
# seconds the model actors have to start (Ray Data waits for them without end by default): an autoscaler's new GPU
# node and the model loading on it fit in 15 minutes
ACTORS_START_S = 900
_WATCHDOG: Any = None  # the watchdog of the local instance this process started (a subprocess.Popen)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an ``ImportError`` naming the extra to install."""
    try:
        import ray  # optional: the 'ray' extra
        import ray.data  # noqa: F401  (optional, the 'ray' extra: the engine needs Ray Data, not only Ray core)
    except ImportError:
        raise ImportError(f"--engine ray needs Ray Data, which is not installed; {INSTALL_HINT}") from None
    return ray


class RayInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived during a Ray run; what the run started was shut down."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextmanager
def ray_session(address: str | None, timeout: float | None = None) -> Iterator[bool]:
    """Ray for one run: the instance this process already has, else the cluster at ``address`` (``auto``: the one
    ``ray start`` made on this machine; None: ``RAY_ADDRESS`` if set, else a new local instance, loopback only).
    Yields True when it started or joined Ray; then, however the block ends, it shuts Ray down. SIGINT, SIGTERM
    and SIGHUP raise :class:`RayInterrupted` inside (in the main thread), and the handlers are restored after."""
    with _signals_as_interrupts() as install:
        started = connect(address, timeout)
        install()  # again: ray.init sets a SIGTERM handler of its own
        try:
            yield started
        finally:
            if started:
                import ray  # optional: the 'ray' extra

                with _ignoring_signals():  # a second Ctrl-C must not leave the shutdown half done
                    ray.shutdown()
                    _stop_watchdog()


def connect(address: str | None, timeout: float | None = None) -> bool:
    """Join or start Ray (see :func:`ray_session`); True when this call did (the caller shuts it down).

    An address where nothing answers as a Ray cluster within ``timeout`` seconds (default
    :data:`~hevc_vit.encode.options.RAY_TIMEOUT`), or ``auto`` with no cluster found, is a ``ValueError`` naming
    the address."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _start_local(ray)
        return True
    init_checked(ray, address, RAY_TIMEOUT if timeout is None else timeout)
    return True


def _start_local(ray: Any) -> None:
    """A local instance on the loopback address alone (:func:`~hevc_vit.runtime.ray_connect.start_loopback_instance`).
    A :mod:`.watchdog` stops its processes if this one dies without shutting Ray down."""
    import psutil  # optional: a Ray dependency (the 'ray' extra)

    global _WATCHDOG
    before = {p.pid for p in psutil.Process().children()}
    start_loopback_instance(ray)
    _stop_watchdog()
    _WATCHDOG = watchdog.start([p.pid for p in psutil.Process().children() if p.pid not in before])


def _stop_watchdog() -> None:
    global _WATCHDOG
    if _WATCHDOG is not None:
        watchdog.stop(_WATCHDOG)
        _WATCHDOG = None


@contextmanager
def _signals_as_interrupts() -> Iterator[Any]:
    """SIGINT, SIGTERM, SIGHUP -> :class:`RayInterrupted` inside; yields the function that installs the handlers
    (again). Nothing outside the main thread or for ignored signals; the previous handlers are restored after."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}

    def interrupt(signum: int, frame: Any) -> None:
        raise RayInterrupted(signum)

    def install() -> None:
        for sig, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, interrupt)

    install()
    try:
        yield install
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def _ignoring_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def quiet_data() -> None:
    """No Ray Data progress bars (the run shows its own: items done of the total) and no notices about each
    execution."""
    import ray.data  # optional: the 'ray' extra

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def bound_actor_start() -> None:
    """Ray Data waits at most :data:`ACTORS_START_S` for the model actors to start (then ``GetTimeoutError``, see
    :func:`actors_not_started`), not without end for actors the cluster has no room for."""
    import ray.data  # optional: the 'ray' extra

    ray.data.DataContext.get_current().wait_for_min_actors_s = ACTORS_START_S


def actors_not_started(e: BaseException) -> TimeoutError:
    """The error of a run whose model actors did not start within :data:`ACTORS_START_S`."""
    return TimeoutError(
        f"--engine ray: the model actors (--model-actors, default one per GPU; a GPU each with a GPU device, else a "
        f"CPU) did not all start within {ACTORS_START_S:g} s: the cluster has no room for them (see `ray status`); "
        f"lower --model-actors, free or add resources (or pick --device), then rerun with --resume ({e})"
    )


def cluster_has_gpus() -> bool:
    import ray  # optional: the 'ray' extra

    return ray.cluster_resources().get("GPU", 0) > 0
