"""The controller: owns the switch, admits jobs, hands out slot ranges.

Workers talk to it over ZeroMQ (``switchml.control`` lists the requests, ``switchml.messages``
types and checks them). When the last
rank of a job has registered, the controller

1. picks a job number, a multicast group and a free range of ``window`` slots,
2. programs the switch through its target (admission entries, multicast group and egress
   rewrites: the tables of ``switchml.pipeline``),
3. clears the range in the data plane with RESET packets from its own UDP socket (the
   switch admits that socket as the controller and echoes each RESET as its ack),
4. answers every rank with its job number, worker id, k, window and slot base.

A job ends when all its ranks leave, or fails when one stops sending heartbeats; either
way its entries are deleted and its slots and job number go back to the pool.

With ``ControllerOptions.tree`` the controller's switch is the spine of a tree of leaf switches
and every job spans the racks its ranks are in: steps 2 and 3 program and clear every switch of
the tree, and step 4 tells each rank its leaf's address (``switchml.tree``, docs/hierarchy.md).

Security (docs/security.md): with a cluster secret the ZeroMQ socket is a CurveZMQ server
that admits only clients holding the same secret; without one it refuses to bind an address
other hosts can reach unless ``insecure`` says so. Each registration is answered with a
random session token, and a rank's ``barrier``, ``heartbeat`` and ``leave`` are served only
with that token and from the IP address that registered it; others are refused and logged.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from switchml import defaults, protocol
from switchml.messages import (
    Ack,
    Barrier,
    Heartbeat,
    HeartbeatAnswer,
    Hello,
    HelloAnswer,
    JobInfo,
    Leave,
    MessageError,
    Refusal,
    Register,
    Stats,
    StatsAnswer,
    decode_request,
    to_json,
)
from switchml.net import Address, local_ip_towards
from switchml.protocol import MAX_JOBS, MsgType
from switchml.security import HANDSHAKE_FAILED_EVENTS, CurveKeys, is_local_endpoint
from switchml.targets import SwitchTarget
from switchml.tree import JobSlots, Plan, Tree, flat_plan, tree_plan

log = logging.getLogger(__name__)

_HANDSHAKE_EVENT_NAMES = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                          "protocol error", zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key refused"}
_PLACEHOLDER_MAC = "00:00:00:00:00:00"  # the software switch routes by IP; P4 targets get MACs from --ports


@dataclass
class ControllerOptions:
    """Knobs of the controller."""

    #: ZeroMQ endpoint the controller binds.
    bind: str = f"tcp://*:{defaults.CONTROL_PORT}"
    #: Where workers send their packets (the switch's data address).
    switch_address: Address = (defaults.SWITCH_HOST, defaults.SWITCH_PORT)
    #: Slots in the switch's pool, shared by all jobs.
    pool_size: int = defaults.POOL_SIZE
    #: Slots (window W) each job gets.
    window: int = defaults.WINDOW
    #: Elements per packet handed to jobs that ask for none; must be one the target takes.
    k: int = defaults.K
    #: How long a job may wait for its last rank to register.
    register_timeout: float = defaults.CONTROL_TIMEOUT_S
    #: A running job whose rank is silent this long fails and is released.
    heartbeat_timeout: float = defaults.HEARTBEAT_TIMEOUT_S
    #: How long RESET packets are retransmitted before a job's set-up fails.
    reset_timeout: float = defaults.RESET_TIMEOUT_S
    #: Switch port of a worker address (P4 targets: from the deployment's port map).
    port_of: Callable[[Address], int] | None = None
    #: MAC address of a worker (P4 targets rewrite Ethernet too).
    mac_of: Callable[[Address], str] | None = None
    #: The cluster secret: the control channel is CurveZMQ and admits only clients holding it
    #: (``switchml.security``). None: an open channel, which ``bind`` must keep to this host.
    secret: bytes | None = field(default=None, repr=False)
    #: Serve an open channel on an address other hosts can reach (anyone there can then
    #: register, leave and read every job's state).
    insecure: bool = False
    #: Leaf switches under this controller's switch, which is then their spine: every job spans
    #: the racks its ranks are in (``switchml.tree``). None: one switch.
    tree: Tree | None = None


class InsecureBind(ValueError):
    """An open control channel on an address other hosts can reach, without ``insecure``."""


@dataclass
class _Job:
    name: str
    world_size: int
    created: float
    k: int
    addresses: dict[int, Address] = field(default_factory=dict)
    peers: dict[int, str] = field(default_factory=dict)  # the control connection's source IP, per rank
    sessions: dict[int, str] = field(default_factory=dict)  # the token each rank's register answer carried
    identities: dict[int, bytes] = field(default_factory=dict)  # pending register answers
    number: int = -1
    mgid: int = 0
    pool_base: int = 0
    pool_size: int = 0
    state: str = "registering"  # -> running -> ended | failed
    error: str = ""
    failed_ranks: list[int] = field(default_factory=list)  # the silent ranks of a failed job
    last_seen: dict[int, float] = field(default_factory=dict)
    left: set[int] = field(default_factory=set)
    barrier: dict[int, bytes] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)  # what the switches hold for the job
    ended_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "job_number": self.number, "world_size": self.world_size,
            "registered": sorted(self.addresses), "pool_base": self.pool_base, "pool_size": self.pool_size,
            "k": self.k, "error": self.error, "failed_ranks": self.failed_ranks,
        }


class Controller:
    """Serves workers' control requests and programs the switch through ``target``."""

    def __init__(self, target: SwitchTarget, options: ControllerOptions | None = None) -> None:
        self.target = target
        self.options = options or ControllerOptions()
        o = self.options
        if o.k not in target.supported_k:
            raise ValueError(f"k={o.k}: the target takes {list(target.supported_k)} elements per packet")
        if not 1 <= o.window <= o.pool_size:
            raise ValueError(f"window={o.window}; expected 1..pool_size ({o.pool_size})")
        if o.tree is not None:
            o.tree.check(o.switch_address, o.k)  # a leaf without the leaf role is refused here
        self._jobs: dict[str, _Job] = {}
        self._free_slots = [(0, o.pool_size)]  # (base, size) runs
        self._next_number = 0
        self._virtual_ports: dict[Address, int] = {}
        self._peer: str | None = None  # source IP of the request being handled
        self._local: dict[str, bool] = {}  # peer IP -> is it an address of this host
        self._auth = None
        if o.secret:
            # the ZAP authenticator takes its context's one ZAP endpoint: a context of our own
            # lets several controllers live in one process
            self._ctx = zmq.Context()
        else:
            if not is_local_endpoint(o.bind) and not o.insecure:
                raise InsecureBind(
                    f"the controller would bind {o.bind}, which other hosts can reach, without authentication: "
                    "anyone there could register, make ranks leave and read every job. Give it a cluster secret "
                    f"(--secret-file FILE or ${defaults.SECRET_ENV}; docs/security.md), bind a loopback address, "
                    "or pass --insecure to run it open")
            if not is_local_endpoint(o.bind):
                log.warning("control channel on %s is open (--insecure): anyone who reaches it can register, "
                            "make ranks leave and read every job", o.bind)
            self._ctx = zmq.Context.instance()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._monitor: zmq.Socket | None = None
        if o.secret:
            self._auth = CurveKeys.from_secret(o.secret).secure_server(self._router)
            # a client with another secret fails before ZAP sees its key: only the monitor tells
            self._monitor = self._router.get_monitor_socket(HANDSHAKE_FAILED_EVENTS)
        self._router.bind(o.bind)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        # One RESET socket per switch (a tree has several), each admitted as the controller by its
        # switch: an echo then answers the switch its socket names, whatever source address the
        # switch's host picks for it.
        self._reset_sockets: dict[Address, socket.socket] = {}
        switches = [(target, o.switch_address)] + [(leaf.target, leaf.address) for leaf in
                                                    (o.tree.leaves if o.tree is not None else ())]
        for switch_target, address in switches:
            udp = self._reset_sockets[tuple(address)] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((local_ip_towards(address), 0))
            switch_target.add_controller(*udp.getsockname())
        self.reset_address: Address = self._reset_sockets[tuple(o.switch_address)].getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="switchml-controller", daemon=True)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Controller:
        self._thread.start()
        log.info("controller on %s, switch at %s:%d", self.endpoint, *self.options.switch_address)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for job in list(self._jobs.values()):
            if job.state == "running":
                self._release(job, "ended", "controller stopped")
        if self._monitor is not None:
            self._router.disable_monitor()
            self._monitor.close(linger=0)
        self._router.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._ctx.term()
        for udp in self._reset_sockets.values():
            udp.close()

    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------- serving
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self._monitor in ready:
                self._log_handshake_failures()
            if self._router in ready:
                identity, _, frame = self._router.recv_multipart(copy=False)
                identity, raw = identity.bytes, frame.bytes
                self._peer = _peer_address(frame)
                try:
                    self._handle(identity, raw)
                except Exception as exc:  # noqa: BLE001 - one bad request must not stop the controller
                    log.exception("error handling a control request")
                    self._answer(identity, Refusal(f"internal error: {exc}"))
            self._expire(time.monotonic())

    def _log_handshake_failures(self) -> None:
        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor)
            # libzmq names no peer here; the refused client is told why (ControlAuthError)
            log.warning("refused a control connection on %s: the CurveZMQ handshake failed (%s): the client holds "
                        "another cluster secret or none", self.endpoint, _HANDSHAKE_EVENT_NAMES.get(event["event"],
                                                                                                   event["event"]))

    def _answer(self, identity: bytes, answer: Any) -> None:
        """Send an answer of ``switchml.messages`` (an ``Ack``, a ``Refusal``, ...)."""
        self._router.send_multipart([identity, b"", zmq.utils.jsonapi.dumps(to_json(answer))])

    def _handle(self, identity: bytes, raw: bytes) -> None:
        try:
            msg = zmq.utils.jsonapi.loads(raw)
        except ValueError as exc:
            self._answer(identity, Refusal(f"request is not a JSON object: {exc}"))
            return
        try:
            request = decode_request(msg)
        except MessageError as exc:
            self._answer(identity, Refusal(str(exc)))
            return
        handler = {
            Hello: self._hello, Register: self._register, Barrier: self._barrier,
            Heartbeat: self._heartbeat, Leave: self._leave, Stats: self._stats,
        }[type(request)]
        error = handler(identity, request)
        if error:
            self._answer(identity, Refusal(error))

    def _hello(self, identity: bytes, msg: Hello) -> str | None:
        self._answer(identity, HelloAnswer(self.options.switch_address, self.target.supported_k))
        return None

    def _register(self, identity: bytes, msg: Register) -> str | None:
        name, rank, world_size, address = msg.job, msg.rank, msg.world_size, msg.addr
        k = msg.k or self.options.k
        if k not in self.target.supported_k:
            return f"k={k}: the switch takes {list(self.target.supported_k)} elements per packet"
        job = self._jobs.get(name)
        if job is not None and job.state in ("ended", "failed"):
            del self._jobs[name]
            job = None
        if job is None:
            job = self._jobs[name] = _Job(name, world_size, time.monotonic(), k)
            log.info("job %r: registering %d workers", name, world_size)
        if job.state != "registering":
            return f"job {name!r} is already running; choose another job name or wait until it ends"
        if job.world_size != world_size or job.k != k:
            return (f"job {name!r}: rank {rank} says world_size={world_size}, k={k} but earlier ranks said "
                    f"world_size={job.world_size}, k={job.k}")
        if rank in job.addresses:
            # Replacing the first registration would leave its worker waiting for an answer that
            # never comes; the second one is the mistake (two processes given the same rank).
            first = job.peers.get(rank)
            return (f"job {name!r}: rank {rank} is already registered (UDP {job.addresses[rank][0]}:"
                    f"{job.addresses[rank][1]}{f', from {first}' if first else ''}); this second registration "
                    f"is refused and the first stays: do two processes use rank {rank}?")
        if address in (a for r, a in job.addresses.items() if r != rank):
            return f"job {name!r}: address {address} is registered for another rank"
        if error := self._unreachable_from(self._peer):
            # the job cannot form without this rank: tell the ranks already waiting now, not
            # after the registration timeout
            error = f"job {name!r}, rank {rank}: {error}"
            log.warning(error)
            for waiting in job.identities.values():
                self._answer(waiting, Refusal(error))
            del self._jobs[name]
            return error
        job.addresses[rank] = address
        job.identities[rank] = identity
        job.sessions[rank] = secrets.token_urlsafe(16)
        if self._peer is not None:
            job.peers[rank] = self._peer
        if len(job.addresses) == world_size:
            self._start_job(job)
        return None

    def _unreachable_from(self, peer: str | None) -> str | None:
        """Why a worker whose control connection comes from ``peer`` cannot send to the switch's
        advertised address (a wildcard or loopback address is only reachable on this host), or None."""
        host, port = self.options.switch_address
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(host))
        except (OSError, ValueError):
            return None  # a name that does not resolve here is the operator's to check
        if not (ip.is_unspecified or ip.is_loopback) or peer is None or self._is_local(peer):
            return None
        kind = "a wildcard" if ip.is_unspecified else "a loopback"
        return (f"the switch's data address {host}:{port} is {kind} address, which this worker on {peer} "
                f"cannot send to: restart the switch with an address of its host that {peer} can reach "
                "(switchml-switch emulate --advertise-address IP, or deploy --switch-address IP)")

    def _is_local(self, ip: str) -> bool:
        """Whether ``ip`` is an address of this host (binding to it succeeds only then)."""
        if ip not in self._local:
            try:
                local = ipaddress.ip_address(ip).is_loopback
                if not local:
                    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as probe:
                        probe.bind((ip, 0))
                    local = True
            except (OSError, ValueError):
                local = False
            self._local[ip] = local
        return self._local[ip]

    def _start_job(self, job: _Job) -> None:
        error = self._allocate(job)
        if not error:
            try:
                self._program(job)
                self._reset_slots(job)
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                log.exception("job %r: programming the switch failed", job.name)
                self._release(job, "failed", f"programming the switch failed: {exc}")
                error = job.error
        if error:
            job.state, job.error = "failed", error
            for identity in job.identities.values():
                self._answer(identity, Refusal(error))
            return
        job.state = "running"
        now = time.monotonic()
        job.last_seen = dict.fromkeys(job.addresses, now)
        log.info("job %r running: job number %d, slots %d..%d, k=%d, %d workers", job.name, job.number,
                 job.pool_base, job.pool_base + job.pool_size - 1, job.k, job.world_size)
        for rank, identity in job.identities.items():
            self._answer(identity, JobInfo(job.number, rank, job.world_size, job.k, job.pool_size, job.pool_base,
                                           job.plan.switch_of[rank], job.sessions[rank]))
        job.identities.clear()

    def _allocate(self, job: _Job) -> str | None:
        used = {j.number for j in self._jobs.values() if j.state == "running"}
        if len(used) >= MAX_JOBS:
            return f"the switch runs {MAX_JOBS} jobs already (job_number is 8 bits)"
        window = self.options.window
        for i, (base, size) in enumerate(self._free_slots):
            if size >= window:
                self._free_slots[i] = (base + window, size - window)
                job.pool_base, job.pool_size = base, window
                break
        else:
            free = sum(size for _, size in self._free_slots)
            return f"switch pool exhausted: job {job.name!r} needs {window} contiguous slots, {free} are free"
        while self._next_number in used:
            self._next_number = (self._next_number + 1) % MAX_JOBS
        job.number = self._next_number  # round robin, so a stale packet rarely meets a new job
        self._next_number = (self._next_number + 1) % MAX_JOBS
        job.mgid = job.number + 1  # multicast group 0 means "none" on v1model
        return None

    def _port_of(self, address: Address) -> int:
        if self.options.port_of is not None:
            return self.options.port_of(address)
        # the software switch needs distinct ports only for per-port loss: number them
        return self._virtual_ports.setdefault(address, len(self._virtual_ports) + 1)

    def _program(self, job: _Job) -> None:
        """Program every switch of the job (one, or a tree's spine and leaves: ``switchml.tree``)."""
        o = self.options
        mac_of = o.mac_of or (lambda _: _PLACEHOLDER_MAC)
        slots = JobSlots(job.number, job.mgid, job.pool_base, job.pool_size)
        if o.tree is None:
            plan = flat_plan(self.target, o.switch_address, slots, job.addresses, self._port_of, mac_of)
        else:
            plan = tree_plan(o.tree, self.target, o.switch_address, slots, job.addresses, self._port_of, mac_of)
        job.plan = Plan([], plan.switch_of)
        for program in plan.programs:
            job.plan.programs.append(program)  # before apply: a half-programmed switch is cleaned up too
            program.apply()
        if o.tree is not None:
            log.info("job %r: a tree of %d leaves (%s) under the spine at %s:%d", job.name, len(plan.programs) - 1,
                     ", ".join(f"{p.role}: {len(p.workers)} ranks" for p in plan.programs[1:]), *o.switch_address)

    def _reset_slots(self, job: _Job) -> None:
        """Clear the job's slots on each of its switches with RESET packets; retransmit until every one is echoed."""
        for program in job.plan.programs:
            self._reset_switch(job, tuple(program.address), program.role)

    def _reset_switch(self, job: _Job, switch: Address, role: str) -> None:
        udp = self._reset_sockets[switch]  # its echoes come back to this socket only
        pending = {slot: protocol.encode_header(MsgType.RESET, 0, job.number, 0, slot, 0, 0)
                   + bytes(protocol.ELEMENT_BYTES * protocol.SIZE_TO_K[0])
                   for slot in range(job.pool_base, job.pool_base + job.pool_size)}
        deadline = time.monotonic() + self.options.reset_timeout
        buf = bytearray(protocol.packet_bytes(protocol.MAX_K))
        while pending:
            for packet in pending.values():
                udp.sendto(packet, switch)
            resend_at = min(time.monotonic() + 0.05, deadline)
            while pending and (wait := resend_at - time.monotonic()) > 0:
                udp.settimeout(wait)
                try:
                    n = udp.recv_into(buf)
                except TimeoutError:
                    break
                if n >= protocol.PREAMBLE_BYTES:
                    h = protocol.decode_header(buf[:n])
                    if h.msg_type == MsgType.RESET and h.job_number == job.number:
                        pending.pop(h.slot, None)
            if pending and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(pending)} of {job.pool_size} RESET packets were not acknowledged by the "
                                   f"{role} at {switch} within {self.options.reset_timeout:g} s")

    def _job_of(self, msg: Barrier | Heartbeat | Leave) -> tuple[_Job | None, str | None]:
        job = self._jobs.get(msg.job)
        if job is None:
            return None, f"no job {msg.job!r}"
        if msg.rank not in job.addresses:
            return None, f"job {job.name!r} has no rank {msg.rank!r}"
        registered_from = job.peers.get(msg.rank)
        token_ok = secrets.compare_digest(msg.session.encode(), job.sessions[msg.rank].encode())
        if not token_ok or (registered_from is not None and self._peer != registered_from):
            why = "from another address" if token_ok else "without its session token"
            log.warning("refused %r for job %r, rank %d from %s: %s (rank %d registered from %s)", msg.op, job.name,
                        msg.rank, self._peer or "an unknown address", why, msg.rank, registered_from or "unknown")
            return None, (f"{msg.op!r} for job {job.name!r}, rank {msg.rank} refused: it does not come from the "
                          f"worker that registered that rank ({why}); a rank acts only for its own registration")
        return job, None

    def _barrier(self, identity: bytes, msg: Barrier) -> str | None:
        job, error = self._job_of(msg)
        if error:
            return error
        if job.state != "running":
            return f"job {job.name!r} is {job.state}: {job.error}"
        job.barrier[msg.rank] = identity
        job.last_seen[msg.rank] = time.monotonic()
        if len(job.barrier) == job.world_size:
            for waiting in job.barrier.values():
                self._answer(waiting, Ack())
            job.barrier.clear()
        return None

    def _heartbeat(self, identity: bytes, msg: Heartbeat) -> str | None:
        job, error = self._job_of(msg)
        if error:
            return error
        if job.state == "failed":
            # the silent ranks as data, so survivors can name them without parsing the text
            self._answer(identity, Refusal(f"job {job.name!r} failed: {job.error}", tuple(job.failed_ranks)))
            return None
        job.last_seen[msg.rank] = time.monotonic()
        self._answer(identity, HeartbeatAnswer(job.state))
        return None

    def _leave(self, identity: bytes, msg: Leave) -> str | None:
        job, error = self._job_of(msg)
        if error:
            return error
        job.left.add(msg.rank)
        self._answer(identity, Ack())
        if job.state == "running" and len(job.left) == job.world_size:
            self._release(job, "ended", "")
        return None

    def _stats(self, identity: bytes, msg: Stats) -> str | None:
        from switchml.pipeline import (
            DROPS_COUNTER,
            PACKETS_COUNTER,
            RESULTS_COUNTER,
            RETRANSMISSIONS_COUNTER,
            DropReason,
            PacketCounter,
        )

        drops = self.target.read_counter(DROPS_COUNTER)
        packets = self.target.read_counter(PACKETS_COUNTER)
        counters = {c.name.lower(): packets[c] for c in PacketCounter}
        counters["results_multicast"] = sum(self.target.read_counter(RESULTS_COUNTER))
        counters["retransmissions_answered"] = sum(self.target.read_counter(RETRANSMISSIONS_COUNTER))
        counters.update({f"drop_{r.name.lower()}": drops[r] for r in DropReason})
        self._answer(identity, StatsAnswer([j.describe() for j in self._jobs.values()], counters))
        return None

    # ------------------------------------------------------------- expiry
    def _expire(self, now: float) -> None:
        o = self.options
        for job in list(self._jobs.values()):
            if job.state == "registering" and now - job.created > o.register_timeout:
                missing = sorted(set(range(job.world_size)) - set(job.addresses))
                error = f"job {job.name!r}: ranks {missing} did not register within {o.register_timeout:g} s"
                log.warning(error)
                for identity in job.identities.values():
                    self._answer(identity, Refusal(error))
                del self._jobs[job.name]
            elif job.state == "running":
                silent = [r for r, t in job.last_seen.items() if r not in job.left and now - t > o.heartbeat_timeout]
                if silent:
                    job.failed_ranks = silent
                    self._release(job, "failed", f"rank(s) {silent} sent no heartbeat for {o.heartbeat_timeout:g} s")
            elif job.state in ("ended", "failed") and now - job.ended_at > 2 * o.heartbeat_timeout:
                del self._jobs[job.name]  # kept a while so survivors learn why their job failed

    def _release(self, job: _Job, state: str, error: str) -> None:
        (log.warning if state == "failed" else log.info)("job %r %s%s", job.name, state, f": {error}" if error else "")
        for waiting in job.barrier.values():
            self._answer(waiting, Refusal(f"job {job.name!r} {state}: {error}", tuple(job.failed_ranks)))
        job.barrier.clear()
        job.state, job.error, job.ended_at = state, error, time.monotonic()
        if job.number < 0:
            return
        for program in job.plan.programs:
            try:
                program.remove()
            except Exception:  # noqa: BLE001 - the other switches and the slots must still be released
                log.exception("job %r: deleting its entries on the %s at %s failed", job.name, program.role,
                              program.address)
        job.plan.programs.clear()
        if job.pool_size:
            self._free_slots.append((job.pool_base, job.pool_size))
            self._free_slots = _merge_runs(self._free_slots)
            job.pool_size = 0


def _peer_address(frame: zmq.Frame) -> str | None:
    """The source IP of a request (TCP transports; None for inproc, ipc or an old libzmq)."""
    try:
        return frame.get("Peer-Address") or None
    except (zmq.ZMQError, KeyError, AttributeError):
        return None


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for base, size in sorted(r for r in runs if r[1] > 0):
        if merged and merged[-1][0] + merged[-1][1] == base:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((base, size))
    return merged

