"""The software switch on a UDP socket: receive a packet, process it, send the replies.

The loop is the switch's data plane's (``DataPlane.serve``): the Python one handles one
datagram at a time; the native one (``native/switch.c``) receives and sends in
recvmmsg/sendmmsg batches with the GIL released, with one or more threads on the one socket.
"""

from __future__ import annotations

import logging
import threading

from emulation.dataplane import StopSignal
from emulation.switch import SoftwareSwitch
from switchml import defaults
from switchml.native import udp_offload
from switchml.net import open_udp_socket

log = logging.getLogger(__name__)

DEFAULT_BATCH = 64  #: datagrams per recvmmsg on the native path


class SwitchServer:
    """Runs a ``SoftwareSwitch`` on a UDP socket in background threads.

    Never raises on a packet: a packet the switch cannot parse is counted and dropped by
    the switch; an unexpected error is logged and the loop goes on.

    Args:
        switch: the switch; its ``dataplane`` picks the loop.
        host, port: where the socket binds (port 0: any free port).
        threads: native only: threads receiving on the socket. Each processes its own batch
            under the switch's mutex, so only the system calls run in parallel; on this
            2-core machine one thread measured best (``switchml-bench pps --threads``).
        batch: native only: messages per recvmmsg.
        offload: native only: UDP GSO/GRO (None: ``switchml.native.udp_offload()``).
    """

    def __init__(self, switch: SoftwareSwitch, host: str = defaults.SWITCH_HOST, port: int = defaults.SWITCH_PORT,
                 threads: int = 1, batch: int = DEFAULT_BATCH, offload: bool | None = None):
        if threads < 1 or not 1 <= batch <= 256:
            raise ValueError(f"threads={threads}, batch={batch}; expected threads >= 1 and batch 1..256")
        self.switch = switch
        self.sock = open_udp_socket(host, port)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._stop = StopSignal()
        self._batch = batch
        self._offload = udp_offload() if offload is None else offload
        plane = switch.data_plane
        if threads != 1 and not plane.parallel:
            log.warning("the %s data path serves with one thread (threads=%d ignored)", plane.name, threads)
            threads = 1
        self._threads = [threading.Thread(target=self._serve, name=f"switchml-switch-{i}" if threads > 1
                                          else "switchml-switch", daemon=True) for i in range(threads)]

    def start(self) -> SwitchServer:
        for thread in self._threads:
            thread.start()
        log.info("software switch listening on %s:%d (%s data path, %d thread%s)", *self.address,
                 self.switch.dataplane, len(self._threads), "" if len(self._threads) == 1 else "s")
        return self

    def _serve(self) -> None:
        self.switch.data_plane.serve(self.sock, self._stop, self._batch, self._offload)

    def stop(self) -> None:
        """Stop the loop and close the socket (waits for the threads)."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> SwitchServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
