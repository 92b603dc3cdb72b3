"""The worker side of the control channel: JSON requests over ZeroMQ REQ, with timeouts.

Requests (all carry ``op``; answers carry ``ok`` and, when not ok, ``error``):

| op        | fields                                  | answer                                        |
| --------- | --------------------------------------- | --------------------------------------------- |
| hello     |                                         | switch address, sizes the switch takes        |
| register  | job, rank, world_size, addr, k (opt.)   | held until every rank registered: job_number, |
|           |                                         | worker_id, num_workers, k, window, pool_base  |
| barrier   | job, rank                               | held until every rank of the job arrived      |
| heartbeat | job, rank                               | the job's state; an error if it failed        |
| leave     | job, rank                               | ok                                            |
| stats     |                                         | jobs and switch counters                      |
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from switchml.errors import ControllerError, ControllerTimeout

log = logging.getLogger(__name__)


class ControlClient:
    """One REQ socket to the controller; not thread-safe (give each thread its own)."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        return self._sock

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send ``message`` and wait for the answer; raise ControllerTimeout or ControllerError."""
        timeout = self.timeout if timeout is None else timeout
        sock = self._socket()
        sock.send_json(message)
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            self.close()  # a REQ socket that missed its answer cannot send again
            raise ControllerTimeout(
                f"no answer from the controller at {self.endpoint} to {message.get('op')!r} within {timeout:g} s "
                "(is `switchml-switch emulate` running there, and are all ranks started?)"
            )
        answer = sock.recv_json()
        if not answer.get("ok"):
            raise ControllerError(f"controller refused {message.get('op')!r}: {answer.get('error', 'no reason given')}")
        return answer

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
