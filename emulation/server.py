"""The software switch on a UDP socket: receive a packet, process it, send the replies.

The Python loop (``_serve``) handles one datagram at a time. On a switch built with
``dataplane="native"`` the loop is ``Switch.serve`` of ``native/switch.c`` instead:
recvmmsg/sendmmsg batches, the GIL released, one or more threads on the one socket.
"""

from __future__ import annotations

import logging
import threading

from emulation.switch import SoftwareSwitch
from switchml import defaults
from switchml.native import udp_offload
from switchml.net import open_udp_socket

log = logging.getLogger(__name__)

_RECV_BUFFER = 65536  # larger than any wire-format v1 packet (16 KB)
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
        self._stop = threading.Event()
        if switch._native is None:
            if threads != 1:
                log.warning("the Python data path serves with one thread (threads=%d ignored)", threads)
            self._threads = [threading.Thread(target=self._serve, name="switchml-switch", daemon=True)]
        else:
            self.sock.setblocking(True)  # the native loop polls before it receives; sends wait for buffer space
            self._stop_flag = bytearray(1)  # what the native loop polls: it holds no GIL to look at an Event
            self._batch = batch
            self._offload = udp_offload() if offload is None else offload
            self._threads = [threading.Thread(target=self._serve_native, name=f"switchml-switch-{i}", daemon=True)
                             for i in range(threads)]

    def start(self) -> SwitchServer:
        for thread in self._threads:
            thread.start()
        log.info("software switch listening on %s:%d (%s data path, %d thread%s)", *self.address,
                 self.switch.dataplane, len(self._threads), "" if len(self._threads) == 1 else "s")
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

    def _serve_native(self) -> None:
        state = self.switch._native.state
        while not self._stop.is_set():
            try:
                state.serve(self.sock.fileno(), self._batch, self._stop_flag, self._offload)  # until the flag is set
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("native switch loop failed; restarting it")
                self._stop.wait(0.1)

    def stop(self) -> None:
        """Stop the loop and close the socket (waits for the threads)."""
        self._stop.set()
        if self.switch._native is not None:
            self._stop_flag[0] = 1
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=5)
        self.sock.close()

    def __enter__(self) -> SwitchServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
