"""Reaching a Ray cluster, checked without Ray: what answers at an address, and the addresses named."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from hevc_vit.encode.engines.ray.cluster import RayInterrupted
from hevc_vit.runtime.ray_connect import _H2_SETTINGS, check_answers
from hevc_vit.runtime.ray_connect import resolve_address as _resolve


def _server(answer: bytes | None):
    """A one-connection server on the loopback that reads the client's hello, then sends ``answer`` (None: closes)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.recv(64)
            if answer is not None:
                conn.sendall(answer)
                try:
                    conn.recv(1)  # hold the connection until the client is done
                except OSError:  # the client reset it
                    pass
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def test_a_grpc_server_answers_and_other_servers_are_named():
    settings = bytes([0, 0, 0, _H2_SETTINGS, 0, 0, 0, 0, 0])  # an empty HTTP/2 SETTINGS frame: what gRPC sends
    target = _server(settings)
    check_answers(target, target, timeout=5)
    target = _server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ValueError, match=rf"--ray-address {target}: .*answered, but not as a Ray cluster"):
        check_answers(target, target, timeout=5)
    target = _server(None)
    with pytest.raises(ValueError, match="accepted a connection but did not answer as a Ray cluster"):
        check_answers("auto", target, timeout=5)


def test_nothing_listening_and_a_bad_address_are_named():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed below: nothing listens there
    with pytest.raises(ValueError, match=rf"--ray-address auto \(127.0.0.1:{port}\): no Ray cluster answers there"):
        check_answers("auto", f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ValueError, match="expected HOST:PORT, auto, or ray://HOST:PORT"):
        check_answers("head", "head:http", timeout=1)


def test_a_ray_client_address_and_an_interrupt():
    assert _resolve("ray://head.example:10001/") == "head.example:10001"
    interrupted = RayInterrupted(signal.SIGTERM)
    assert isinstance(interrupted, KeyboardInterrupt) and str(interrupted) == "interrupted by SIGTERM"
