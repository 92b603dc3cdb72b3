"""The software switch on a UDP socket: receive a packet, process it, send the replies."""

from __future__ import annotations

import logging
import threading

from emulation.switch import SoftwareSwitch
from switchml import defaults
from switchml.net import open_udp_socket

log = logging.getLogger(__name__)

_RECV_BUFFER = 65536  # larger than any wire-format v1 packet (16 KB)


class SwitchServer:
    """Runs a ``SoftwareSwitch`` on a UDP socket in a background thread.

    Never raises on a packet: a packet the switch cannot parse is counted and dropped by
    the switch; an unexpected error is logged and the loop goes on.
    """

    def __init__(self, switch: SoftwareSwitch, host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT):
        self.switch = switch
        self.sock = open_udp_socket(host, port)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="switchml-switch", daemon=True)

    def start(self) -> SwitchServer:
        self._thread.start()
        log.info("software switch listening on %s:%d", *self.address)
        return self

    def _serve(self) -> None:
        buf = bytearray(_RECV_BUFFER)
        view = memoryview(buf)
        self.sock.settimeout(0.2)  # so stop() is noticed
        while not self._stop.is_set():
            try:
                n, src = self.sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            try:
                for payload, dst in self.switch.process(view[:n], src):
                    self.sock.sendto(payload, dst)
            except Exception:  # noqa: BLE001 - a packet must never stop the switch
                log.exception("error handling a packet of %d bytes from %s", n, src)

    def stop(self) -> None:
        """Stop the loop and close the socket (waits for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> SwitchServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
