"""Reaching Ray safely, for every part of the library that runs on it (``encode --engine ray``, ``codec-assets
--engine ray``): a cluster address is checked to answer as Ray within a bound before ``ray.init`` is given it (Ray
itself would wait without end on a port that accepts and says nothing), and a local instance listens on
127.0.0.1 alone (Ray's default is every interface).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

LOOPBACK = "127.0.0.1"
# Ray maps 127.0.0.1 to the machine's network address (so other nodes can reach it) unless this is "0": with it
# the node's address, which every Ray process binds, stays the loopback one
_LOCAL_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# the HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, a Ray Client server) answers
# with a SETTINGS frame (type 4) of its own
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_H2_SETTINGS = 4


def start_loopback_instance(ray: Any) -> None:
    """``ray.init`` of a new local instance (no dashboard) whose every process (GCS, raylet, object manager,
    workers, agents) listens on the loopback address; never the cluster a ``ray_current_cluster`` file names
    (``address="local"``: a file left by a crashed ``ray start`` is ignored). A ``RuntimeError`` (Ray stopped
    again) if Ray took another address anyway."""
    from ray._private import ray_constants  # optional ('ray' extra); read by Ray when it chooses the node's address

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
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:  # Ray changed how it chooses: never leave servers open to the network
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance took the address {node}, expected {LOOPBACK}; it was stopped")


def resolve_address(address: str) -> str:
    """``host:port`` that Ray will connect to for ``address`` (``auto``: from ``RAY_ADDRESS`` or the
    ``ray_current_cluster`` file ``ray start`` writes in Ray's temporary folder)."""
    if "://" in address:  # ray://host:port, a Ray Client server
        return address.split("://", 1)[1].rstrip("/")
    from ray._private.services import canonicalize_bootstrap_address  # optional: the 'ray' extra

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


def init_checked(ray: Any, address: str, timeout: float) -> None:
    """``ray.init`` of the cluster at ``address`` once something there answers as Ray within ``timeout`` seconds
    (else a ``ValueError`` naming the address and the bound)."""
    target = resolve_address(address)
    check_answers(address, target, timeout)
    ray.init(address=address if "://" in address else target, configure_logging=False)
