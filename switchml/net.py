"""Socket helpers shared by the worker, the controller and the software switch."""

from __future__ import annotations

import socket

from switchml import defaults

#: An IPv4 address and a UDP or TCP port, as the socket module gives and takes them.
Address = tuple[str, int]


def open_udp_socket(host: str, port: int, buffer_bytes: int = defaults.SOCKET_BUFFER_BYTES) -> socket.socket:
    """A UDP socket bound to (host, port) with large buffers (forced past rmem_max as root)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for forced, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                          (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            if forced is None:
                raise PermissionError
            sock.setsockopt(socket.SOL_SOCKET, forced, buffer_bytes)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
    sock.bind((host, port))
    return sock


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port (TCP, or UDP with ``socket.SOCK_DGRAM``) the kernel calls free right now, for a
    process about to bind it."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ip_towards(address: tuple[str, int]) -> str:
    """The local IP the kernel would use to reach ``address`` (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(address)
        return probe.getsockname()[0]
    finally:
        probe.close()
