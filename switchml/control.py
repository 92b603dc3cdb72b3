"""The worker side of the control channel: JSON requests over ZeroMQ REQ, with timeouts.

Requests and answers are the dataclasses of ``switchml.messages`` (a plain dict is sent as
it is). On the wire, requests carry ``op``; answers carry ``ok`` and, when not ok, ``error``:

| op        | fields                                  | answer                                        |
| --------- | --------------------------------------- | --------------------------------------------- |
| hello     |                                         | switch address, sizes the switch takes        |
| register  | job, rank, world_size, addr, k (opt.)   | held until every rank registered: job_number, |
|           |                                         | worker_id, num_workers, k, window, pool_base  |
| barrier   | job, rank                               | held until every rank of the job arrived      |
| heartbeat | job, rank                               | the job's state; an error if it failed, with  |
|           |                                         | failed_ranks (the ranks that went silent)     |
| leave     | job, rank                               | ok                                            |
| stats     |                                         | jobs and switch counters                      |

``register``'s answer carries a ``session`` token; ``barrier``, ``heartbeat`` and ``leave`` must
carry it back, from the address that registered, or the controller refuses them (a rank
acts only for its own registration). With a cluster secret the channel is CurveZMQ
(``switchml.security``); a handshake that fails raises ``ControlAuthError`` at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from switchml import defaults
from switchml.errors import ControlAuthError, ControllerError, ControllerGone, ControllerTimeout
from switchml.messages import Request, decode_answer, to_json
from switchml.security import HANDSHAKE_FAILED_EVENTS, CurveKeys, read_secret

log = logging.getLogger(__name__)

#: ``ControlClient(secret=...)`` not given: the cluster secret of the environment (``read_secret``).
FROM_ENV: Any = object()


class ControlClient:
    """One REQ socket to the controller; not thread-safe (give each thread its own).

    With ``watch_connection`` the client also watches its TCP connection (a ZeroMQ socket
    monitor): when the controller's process ends, its kernel closes the connection, and
    ``call`` and ``wait_for_disconnect`` raise ``ControllerGone`` at once rather than at a
    timeout. A controller that hangs, or a host that vanishes, still shows only as a timeout.

    ``secret``: the cluster secret (bytes) that makes the channel CurveZMQ, None for an open
    channel, or by default the environment's (``switchml.security.read_secret``). A handshake
    that fails (another secret, or none on one side) raises ``ControlAuthError`` as soon as
    the socket monitor reports it, not at the timeout.
    """

    def __init__(self, endpoint: str, timeout: float, watch_connection: bool = False,
                 secret: bytes | None = FROM_ENV) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._watch = watch_connection
        self._monitor: zmq.Socket | None = None
        secret = read_secret() if secret is FROM_ENV else secret
        self._keys = CurveKeys.from_secret(secret) if secret else None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            if self._keys is not None:
                self._keys.secure_client(self._sock)
            self._monitor = self._sock.get_monitor_socket(
                HANDSHAKE_FAILED_EVENTS | (zmq.EVENT_DISCONNECTED if self._watch else 0))
            self._sock.connect(self.endpoint)
        return self._sock

    def connect(self) -> None:
        """Open the connection now (it is otherwise opened by the first request)."""
        self._socket()

    def wait_for_disconnect(self, timeout: float) -> None:
        """Wait up to ``timeout`` s; raise ControllerGone if the watched connection closes meanwhile."""
        self._socket()
        if not self._watch:
            raise ValueError("wait_for_disconnect needs ControlClient(..., watch_connection=True)")
        if self._monitor.poll(int(timeout * 1000), zmq.POLLIN):
            self._raise_if_gone()

    def _raise_if_gone(self) -> None:
        while self._monitor is not None and self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)
            if event["event"] & HANDSHAKE_FAILED_EVENTS:
                self.close()
                raise ControlAuthError(self._handshake_message(event["event"]))
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.close()
                raise ControllerGone(f"the connection to the controller at {self.endpoint} closed: its process "
                                     "ended (with it, the software switch it runs)")

    def _handshake_message(self, event: int) -> str:
        # libzmq reports a missing or mismatched mechanism as a protocol error or with no
        # detail, depending on which side notices first: only the client's own keys tell
        if self._keys is None:
            why = "the controller requires a cluster secret (CurveZMQ) and this client has none"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = "the controller refused this client's key: it was derived from another cluster secret"
        else:
            why = "the controller holds another cluster secret, or runs open without one"
        mine = "with a cluster secret" if self._keys is not None else "without a cluster secret"
        return (f"control channel to {self.endpoint}: the CurveZMQ handshake failed ({why}); this client connects "
                f"{mine}. Give every rank and the controller the same secret (--secret-file FILE, "
                f"${defaults.SECRET_ENV} or ${defaults.SECRET_FILE_ENV}); nothing was sent")

    def request(self, message: Request | dict[str, Any], timeout: float | None = None) -> Any:
        """Send ``message`` and wait for its answer (a typed request: its answer's dataclass);
        raise ControllerTimeout, or ControllerError when the controller refuses it."""
        raw = self._exchange(to_json(message) if isinstance(message, Request) else message, timeout)
        if not raw.get("ok"):
            op = message.op if isinstance(message, Request) else message.get("op")
            raise ControllerError(f"controller refused {op!r}: {raw.get('error', 'no reason given')}")
        return message.answer.from_json(raw) if isinstance(message, Request) else raw

    def call(self, message: Request | dict[str, Any], timeout: float | None = None) -> Any:
        """Send ``message`` and return the answer, refusals included (a typed request's as a
        ``Refusal``, whose ``failed_ranks`` are for the caller); raise ControllerTimeout."""
        if isinstance(message, Request):
            return decode_answer(message, self._exchange(to_json(message), timeout))
        return self._exchange(message, timeout)

    def _exchange(self, message: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        sock = self._socket()
        sock.send_json(message)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while sock not in (ready := dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))):
            if self._monitor in ready:
                self._raise_if_gone()  # other events (none are subscribed) fall through
                if time.monotonic() < deadline:
                    continue
            self.close()  # a REQ socket that missed its answer cannot send again
            raise ControllerTimeout(
                f"no answer from the controller at {self.endpoint} to {message.get('op')!r} within {timeout:g} s "
                "(is `switchml-switch emulate` running there, and are all ranks started?)"
            )
        return sock.recv_json()

    def close(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
