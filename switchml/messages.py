"""Control messages between workers and the controller, as types.

One dataclass per request and per answer, shared by both ends (``switchml.control`` sends
them, ``switchml.controller`` serves them), and checked in one place: ``decode_request`` on the
controller's side, each answer's ``from_json`` on the worker's. On the wire they are JSON
objects (ZeroMQ REQ/REP), requests with an ``op``, answers with ``ok`` and, when not ok,
``error``; the table is ``switchml.control``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from switchml.net import Address
from switchml.protocol import MAX_WORKERS

#: Of the control protocol, in the hello answer. 2: barrier, heartbeat and leave carry the
#: session token of the rank's register answer.
VERSION = 2


class MessageError(ValueError):
    """A malformed message; the text names the field and what was expected."""


def _address(value: Any, what: str) -> Address:
    if not (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool)):
        raise MessageError(f"{what}={value!r}: expected [ip, udp_port]")
    return (value[0], value[1])


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def to_json(message: Any) -> dict[str, Any]:
    """A request (with its ``op``) or an answer (with ``ok``) as a JSON object."""
    body = {f.name: _plain(getattr(message, f.name)) for f in fields(message)}
    if isinstance(message, Request):
        return {"op": message.op, **body}
    return {"ok": not isinstance(message, Refusal), **body}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------- requests
class Request:
    """Base of the requests; ``op`` names it on the wire, ``answer`` is the type of its answer."""

    op: ClassVar[str]
    answer: ClassVar[type]

    def check(self) -> None:
        """Raise ``MessageError`` if a field is out of its range (types are checked on decoding)."""

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> Request:
        return cls()


@dataclass(frozen=True)
class Ack:
    """The answer that says only ok (barrier, leave)."""

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> Ack:
        return cls()


@dataclass(frozen=True)
class HelloAnswer:
    """The switch's data address and the packet sizes (k) it takes."""

    switch: Address
    k: tuple[int, ...]
    version: int = VERSION

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> HelloAnswer:
        return cls(_address(msg.get("switch"), "switch"), tuple(int(k) for k in msg.get("k") or ()),
                   int(msg.get("version", VERSION)))


@dataclass(frozen=True)
class JobInfo:
    """What the controller assigned to this worker: the answer to ``Register``."""

    job_number: int
    worker_id: int
    num_workers: int
    k: int
    window: int
    pool_base: int
    switch: Address
    #: This registration's token: ``Barrier``, ``Heartbeat`` and ``Leave`` of this rank carry it.
    session: str = ""

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> JobInfo:
        try:
            return cls(int(msg["job_number"]), int(msg["worker_id"]), int(msg["num_workers"]), int(msg["k"]),
                       int(msg["window"]), int(msg["pool_base"]), _address(msg["switch"], "switch"),
                       str(msg.get("session", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"the controller's register answer lacks or garbles {exc}: {msg!r}") from None


@dataclass(frozen=True)
class HeartbeatAnswer:
    """The job's state (a failed job is answered with a ``Refusal`` naming the silent ranks)."""

    state: str

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> HeartbeatAnswer:
        return cls(str(msg.get("state", "")))


@dataclass(frozen=True)
class StatsAnswer:
    """Every job the controller knows (``describe()`` of each) and the switch's counters."""

    jobs: list[dict[str, Any]]
    counters: dict[str, int]

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> StatsAnswer:
        return cls(list(msg.get("jobs") or []), dict(msg.get("counters") or {}))


@dataclass(frozen=True)
class Refusal:
    """A request refused: why, and for a failed job the ranks the controller declared silent."""

    error: str
    failed_ranks: tuple[int, ...] = ()

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> Refusal:
        return cls(str(msg.get("error", "no reason given")), tuple(int(r) for r in msg.get("failed_ranks") or ()))


@dataclass(frozen=True)
class Hello(Request):
    """Where the switch is and what it takes; asked before a worker opens its UDP socket."""

    op: ClassVar[str] = "hello"
    answer: ClassVar[type] = HelloAnswer


@dataclass(frozen=True)
class Register(Request):
    """Rank ``rank`` of ``job`` (``world_size`` ranks) sends from UDP ``addr``; ``k`` None: the default."""

    job: str
    rank: int
    world_size: int
    addr: Address
    k: int | None = None
    op: ClassVar[str] = "register"
    answer: ClassVar[type] = JobInfo

    def check(self) -> None:
        if not isinstance(self.job, str) or not self.job:
            raise MessageError(f"job={self.job!r}: expected a non-empty string")
        if not _int(self.world_size) or not 1 <= self.world_size <= MAX_WORKERS:
            raise MessageError(f"world_size={self.world_size!r}: expected an integer in 1..{MAX_WORKERS} "
                               "(the switch's bitmap width)")
        if not _int(self.rank) or not 0 <= self.rank < self.world_size:
            raise MessageError(f"rank={self.rank!r}: expected an integer in 0..{self.world_size - 1}")
        if self.k is not None and not _int(self.k):
            raise MessageError(f"k={self.k!r}: expected an integer (elements per packet) or null")

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> Register:
        message = cls(msg.get("job"), msg.get("rank"), msg.get("world_size"), msg.get("addr"), msg.get("k") or None)
        message.check()
        return cls(message.job, message.rank, message.world_size, _address(message.addr, "addr"), message.k)

    def __post_init__(self) -> None:
        if isinstance(self.addr, list):  # a worker's socket name, or JSON's list
            object.__setattr__(self, "addr", tuple(self.addr))


@dataclass(frozen=True)
class _OfRank(Request):
    """A request of one rank of a running job, with the ``session`` its registration was
    answered with (the controller refuses it from anyone else)."""

    job: str
    rank: int
    session: str = ""

    def check(self) -> None:
        if not isinstance(self.job, str):
            raise MessageError(f"job={self.job!r}: expected a job name")
        if not _int(self.rank):
            raise MessageError(f"rank={self.rank!r}: expected an integer")
        if not isinstance(self.session, str):
            raise MessageError(f"session={self.session!r}: expected the token of the rank's register answer")

    @classmethod
    def from_json(cls, msg: dict[str, Any]) -> _OfRank:
        message = cls(msg.get("job"), msg.get("rank"), msg.get("session", ""))
        message.check()
        return message


@dataclass(frozen=True)
class Barrier(_OfRank):
    """Answered when every rank of the job has arrived."""

    op: ClassVar[str] = "barrier"
    answer: ClassVar[type] = Ack


@dataclass(frozen=True)
class Heartbeat(_OfRank):
    """This rank is alive; the answer is the job's state (a failed job: a ``Refusal``)."""

    op: ClassVar[str] = "heartbeat"
    answer: ClassVar[type] = HeartbeatAnswer


@dataclass(frozen=True)
class Leave(_OfRank):
    """This rank is done; the job ends when every rank has left."""

    op: ClassVar[str] = "leave"
    answer: ClassVar[type] = Ack


@dataclass(frozen=True)
class Stats(Request):
    """The controller's jobs and the switch's counters."""

    op: ClassVar[str] = "stats"
    answer: ClassVar[type] = StatsAnswer


REQUESTS: dict[str, type[Request]] = {r.op: r for r in (Hello, Register, Barrier, Heartbeat, Leave, Stats)}


def decode_request(msg: Any) -> Request:
    """A request JSON object as its dataclass; ``MessageError`` says what is wrong with it."""
    if not isinstance(msg, dict):
        raise MessageError("request is not a JSON object")
    kind = REQUESTS.get(msg.get("op"))
    if kind is None:
        raise MessageError(f"unknown op {msg.get('op')!r}; expected {', '.join(REQUESTS)}")
    return kind.from_json(msg)


def decode_answer(request: Request, msg: dict[str, Any]) -> Any:
    """The answer to ``request`` as its dataclass (a ``Refusal`` when not ok)."""
    if not msg.get("ok"):
        return Refusal.from_json(msg)
    return request.answer.from_json(msg)


__all__ = [
    "REQUESTS", "VERSION", "Ack", "Barrier", "Hello", "HelloAnswer", "Heartbeat", "HeartbeatAnswer", "JobInfo",
    "Leave", "MessageError", "Refusal", "Register", "Request", "Stats", "StatsAnswer", "decode_answer",
    "decode_request", "to_json",
]
