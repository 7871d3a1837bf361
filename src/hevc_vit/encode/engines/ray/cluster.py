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
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hevc_vit.encode.engines.ray import watchdog
from hevc_vit.encode.options import RAY_TIMEOUT

INSTALL_HINT = "pip install 'hevc-vit[ray]'"
LOOPBACK = "127.0.0.1"
# Ray maps 127.0.0.1 to the machine's network address (so other nodes can reach it) unless this is "0": with it
# the node's address, which every Ray process binds, stays the loopback one
_LOCAL_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# the HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, a Ray Client server) answers
# with a SETTINGS frame (type 4) of its own
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4
_WATCHDOG: Any = None  # the watchdog of the local instance this process started (a subprocess.Popen)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an ``ImportError`` naming the extra to install."""
    try:
        import ray  # optional: the ray extra
        import ray.data  # noqa: F401  (the engine needs Ray Data, not only Ray core)
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
                import ray  # optional: the ray extra

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
    target = _resolve(address)
    check_answers(address, target, RAY_TIMEOUT if timeout is None else timeout)
    ray.init(address=address if "://" in address else target, configure_logging=False)
    return True


def _start_local(ray: Any) -> None:
    """A local instance (no dashboard) whose processes all listen on the loopback address; never the cluster a
    ``ray_current_cluster`` file names (``address="local"``: a file left by a crashed ``ray start`` is ignored).
    A :mod:`.watchdog` stops its processes if this one dies without shutting Ray down."""
    import psutil  # optional: a Ray dependency, present when Ray is
    from ray._private import ray_constants  # optional (the ray extra); read by Ray when it chooses the address

    global _WATCHDOG
    before = {p.pid for p in psutil.Process().children()}

    saved_env, saved_flag = os.environ.get(_LOCAL_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_NODE_ENV] = "0"  # for the processes Ray starts (raylet, workers, agents)
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which imported Ray before
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_LOCAL_NODE_ENV, None)
        else:
            os.environ[_LOCAL_NODE_ENV] = saved_env
    _stop_watchdog()
    _WATCHDOG = watchdog.start([p.pid for p in psutil.Process().children() if p.pid not in before])
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:  # Ray changed how it chooses: never leave servers open to the network
        ray.shutdown()
        _stop_watchdog()
        raise RuntimeError(f"the local Ray instance took the address {node}, expected {LOOPBACK}; it was stopped")


def _stop_watchdog() -> None:
    global _WATCHDOG
    if _WATCHDOG is not None:
        watchdog.stop(_WATCHDOG)
        _WATCHDOG = None


def _resolve(address: str) -> str:
    """``host:port`` that Ray will connect to for ``address`` (``auto``: from ``RAY_ADDRESS`` or the
    ``ray_current_cluster`` file ``ray start`` writes in Ray's temporary folder)."""
    if "://" in address:  # ray://host:port, a Ray Client server
        return address.split("://", 1)[1].rstrip("/")
    from ray._private.services import canonicalize_bootstrap_address  # optional: the ray extra

    try:
        target = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise ValueError(f"--ray-address {address}: {e}") from None
    if target is None:
        raise ValueError(f"--ray-address {address}: no Ray cluster was found; start one with `ray start --head`")
    return target


def check_answers(address: str, target: str, timeout: float) -> None:
    """Something at ``target`` (``host:port``) accepts a connection and answers as a gRPC server (Ray's GCS)
    within ``timeout`` seconds; else a ``ValueError`` naming ``address``. With ``RAY_USE_TLS`` only the connection
    is checked."""
    host, _, port = target.rpartition(":")
    where = address if address == target else f"{address} ({target})"
    if not port.isdigit():
        raise ValueError(f"--ray-address {where}: expected HOST:PORT, auto, or ray://HOST:PORT")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ValueError(f"--ray-address {where}: no Ray cluster answers there ({reason})") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        header = _first_frame_header(sock, deadline)
    if header is None or header[3] != _H2_SETTINGS:
        what = "did not answer" if header is None else "answered, but not"
        raise ValueError(
            f"--ray-address {where}: accepted a connection but {what} as a Ray cluster (gRPC) within {timeout:g} s; "
            f"expected the address of a Ray head node (GCS, default port 6379)"
        )


def _first_frame_header(sock: socket.socket, deadline: float) -> bytes | None:
    """The 9-byte header of the first HTTP/2 frame the server sends after our preface; None when it sends fewer
    bytes before the deadline or closes."""
    data = b""
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.sendall(_H2_HELLO)
        while len(data) < 9:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(9 - len(data))
            if not chunk:
                return None
            data += chunk
    except OSError:  # a timeout, a reset
        return None
    return data


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
    import ray.data  # optional: the ray extra

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray  # optional: the ray extra

    return ray.cluster_resources().get("GPU", 0) > 0
