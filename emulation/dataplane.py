"""The software switch's data-plane seam: one interface, a Python and a native implementation.

``SoftwareSwitch`` (``emulation.switch``) owns the tables and pushes every change to its data
plane as a ``Tables`` snapshot (``DataPlane.set_tables``); the data plane owns what changes per
packet: the slot state, the counters and the loss generator. It processes one packet
(``process``: tests drive it packet by packet) or serves a UDP socket (``serve``:
``emulation.server``), and answers reads of its counters and slots.

``PythonDataPlane`` below is the reference: DESIGN.md's switch semantics, packet by packet (numpy
for the vector add); every faster data plane and every P4 program is tested against its replies
and counters. ``emulation.native.NativeDataPlane`` runs the same semantics in C
(``native/switch.c``).

Leaf role (docs/hierarchy.md; ``PythonDataPlane`` is the reference, ``native/switch.c`` runs the
same steps and tests/test_tree.py checks both against each other). A switch is a leaf for job j when its upstream table
(``Tables.upstream``, ``switchml.pipeline.UpstreamEntry``) has an entry for j: the spine's address,
the rack's multicast group and j's slot range, the same job number and range as at the spine.
The leaf keeps DESIGN.md's state per slot s and set v (``value``, ``exp``, ``count``, ``seen``,
the rack's workers numbered 0..r-1, ``count`` mod r) plus one bit, ``has_result[v][s]``: whether
``value``/``exp`` hold the spine's RESULT (1) or the rack's partial sum (0). No timer: a lost
packet on the leaf-spine link is noticed when a worker retransmits, as SwitchML's switch notices
lost RESULTs. For an UPDATE admitted as rack worker w of a leaf job:

1. A new contribution (w not in ``seen[v][s]``) is aggregated as on a flat switch (the first one
   overwrites ``value`` and clears ``has_result``; ``exp`` is the rack's max).
2. If it completes the rack (``count`` wraps to 0), the leaf sends ONE UPDATE upstream: the
   header of the completing packet (job, tsi, pool index), ``e0`` = the rack's max exponent, the
   rack's sum as payload, from the leaf's own address, which the spine admits as the leaf's
   worker id. Nothing goes to the rack yet.
3. A retransmission (w in ``seen[v][s]``) to an incomplete set is dropped
   (``retransmission_incomplete``), as on a flat switch.
4. A retransmission to a complete set whose ``has_result`` is 1 is answered from the spine's
   RESULT: unicast back to w, as a flat switch answers from its own sum.
5. A retransmission to a complete set whose ``has_result`` is 0 means the spine's RESULT has not
   come (the leaf's UPDATE or the spine's RESULT was lost, or is still on its way): the leaf sends
   its rack sum upstream again. The spine takes it as a new contribution if the first was lost,
   or, its set complete, answers the leaf by unicast (its retransmission rule); if it is still
   collecting other racks it drops it and multicasts when complete.
6. A RESULT from the upstream address of its job (any other RESULT is ``bad_msg_type``), inside
   the job's range and of the set's k, for a set that is complete with ``has_result`` 0: the leaf
   stores it (``value``, ``exp`` = the spine's, the global max), sets ``has_result`` and multicasts
   the packet unchanged to the rack's group. For any other set state (a duplicate answer to a
   second resend, or a set since reset) it is ignored (``leaf`` counter).

Overwriting the rack sum with the spine's RESULT in step 6 loses nothing: the spine has every
rack's contribution once it sends a RESULT. Why the shadow sets stay safe: a leaf contributes to
set 1-v of a slot only when all its rack's workers have sent their next block there, i.e. have the
RESULT of set v, so the spine frees a leaf's bit of set v only when the leaf no longer needs it,
the same argument as a flat switch makes for its workers. As on a flat switch, packets are assumed
not to be delayed across two uses of a slot. Sums are wrapping int32 adds and exponents maxima,
both associative and commutative, so the tree's RESULT payload and exponent are those a flat
switch computes from the same contributions: results are bit-identical to a flat run.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from switchml.net import Address
from switchml.pipeline import (
    DROPS_COUNTER,
    LEAF_COUNTER,
    NUM_DROP_REASONS,
    NUM_LEAF_COUNTERS,
    NUM_PACKET_COUNTERS,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    LeafCounter,
    PacketCounter,
    Replica,
    UpstreamEntry,
    WorkerEntry,
)
from switchml.protocol import (
    MSG_TYPE_SHIFT,
    PREAMBLE_BYTES,
    SET_SHIFT,
    SIZE_MASK,
    SIZE_TO_K,
    SLOT_MASK,
    MsgType,
    packet_bytes,
)

log = logging.getLogger(__name__)

Reply = tuple[bytes, Address]

_RECV_BUFFER = 65536  # larger than any wire-format v1 packet (16 KB)
_ABSENT = object()  # no admission entry


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Tables:
    """What the control plane programmed, as one immutable snapshot.

    ``admission`` maps a sender to its ``WorkerEntry``, or to None for the controller;
    ``groups`` maps a multicast group to its replicas; ``port_of`` maps a replica's address to
    its switch port; ``loss`` maps a port to its drop threshold (out of 32768) and
    ``default_loss`` is the threshold of every port without an entry; ``upstream`` maps a job
    number to its leaf role's ``UpstreamEntry`` (empty on a switch that is no leaf).
    """

    admission: Mapping[Address, WorkerEntry | None] = field(default_factory=dict)
    groups: Mapping[int, tuple[Replica, ...]] = field(default_factory=dict)
    port_of: Mapping[Address, int] = field(default_factory=dict)
    loss: Mapping[int, int] = field(default_factory=dict)
    default_loss: int = 0
    upstream: Mapping[int, UpstreamEntry] = field(default_factory=dict)

    @classmethod
    def of(cls, admission: Mapping, groups: Mapping, port_of: Mapping, loss: Mapping, default_loss: int,
           upstream: Mapping | None = None) -> Tables:
        """A snapshot of (possibly mutable) tables: copied, so later changes do not reach it."""
        return cls(_frozen(admission), _frozen({g: tuple(r) for g, r in groups.items()}), _frozen(port_of),
                   _frozen(loss), default_loss, _frozen(upstream or {}))


class SlotState(NamedTuple):
    """One set of one slot (a copy)."""

    seen: int  #: bitmap of the workers that contributed
    count: int  #: contributions mod n
    exp: int  #: max exponent
    values: np.ndarray  #: int32 sums, the data plane's largest k of them
    k: int  #: elements per packet of the slot's contributions (0: none since its reset)
    has_result: bool = False  #: leaf role: ``values``/``exp`` hold the spine's RESULT, not the rack's sum


class StopSignal:
    """Tells a data plane's ``serve`` loop to end: an Event for Python, a polled byte for C."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.flag = bytearray(1)  # what a native loop polls: it holds no GIL to look at an Event

    def set(self) -> None:
        self.event.set()
        self.flag[0] = 1

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


COUNTER_SIZES = {RESULTS_COUNTER: None, RETRANSMISSIONS_COUNTER: None,  # None: the pool size
                 DROPS_COUNTER: NUM_DROP_REASONS, PACKETS_COUNTER: NUM_PACKET_COUNTERS,
                 LEAF_COUNTER: NUM_LEAF_COUNTERS}


def counter_sizes(pool_size: int) -> dict[str, int]:
    """Cells of each counter of a switch with ``pool_size`` slots."""
    return {name: pool_size if size is None else size for name, size in COUNTER_SIZES.items()}


class DataPlane(ABC):
    """Per-packet state and work of one software switch; thread-safe.

    Args:
        pool_size: slots in the pool.
        sizes: size enums accepted.
        seed: seeds the loss generator (the same draws on every data plane).
    """

    name: str  #: "python" or "native"
    parallel: bool = False  #: whether several threads may serve one socket
    leaf_role: bool = False  #: whether it takes upstream entries (the leaf role, module docstring)

    def __init__(self, pool_size: int, sizes: frozenset[int], seed: Any) -> None:
        self.pool_size = pool_size
        self.sizes = sizes
        self.max_k = max(SIZE_TO_K[s] for s in sizes)
        self.counter_sizes = counter_sizes(pool_size)

    def _check_counter(self, name: str) -> None:
        if name not in self.counter_sizes:
            raise KeyError(f"no counter {name!r}; the switch has {sorted(self.counter_sizes)}")

    @abstractmethod
    def set_tables(self, tables: Tables, clear_state: bool = False) -> None:
        """Use ``tables`` from the next packet on; with ``clear_state`` also zero the slots and
        counters, in the same step (what loading a pipeline does)."""

    @abstractmethod
    def process(self, data: bytes | bytearray | memoryview, src: Address) -> list[Reply]:
        """Handle one UDP payload from ``src``; return the (payload, destination) pairs to send."""

    @abstractmethod
    def serve(self, sock: socket.socket, stop: StopSignal, batch: int, offload: bool) -> None:
        """Receive, process and send on ``sock`` until ``stop`` is set."""

    @abstractmethod
    def read_counter(self, name: str) -> list[int]:
        """A copy of counter ``name`` (Python ints)."""

    @abstractmethod
    def set_counter(self, name: str, index: int, value: int) -> None:
        """Overwrite one cell of counter ``name``."""

    @abstractmethod
    def slot_state(self, set_bit: int, slot: int) -> SlotState:
        """One set of one slot (a copy)."""


class PythonDataPlane(DataPlane):
    """The reference data plane: one packet at a time, under one lock; it has the leaf role."""

    name = "python"
    leaf_role = True

    def __init__(self, pool_size: int, sizes: frozenset[int], seed: Any) -> None:
        super().__init__(pool_size, sizes, seed)
        # value/exp/count/seen per set v and slot s; pages of `value` are touched lazily.
        self._value = np.zeros((2, pool_size, self.max_k), dtype=np.int32)
        self._exp = [[0] * pool_size, [0] * pool_size]
        self._count = [[0] * pool_size, [0] * pool_size]
        self._seen = [[0] * pool_size, [0] * pool_size]
        self._slot_k = [[0] * pool_size, [0] * pool_size]
        self._has_result = [[False] * pool_size, [False] * pool_size]  # leaf role: value holds the spine's RESULT
        self._counters: dict[str, list[int]] = {name: [0] * size for name, size in self.counter_sizes.items()}
        self._tables = Tables()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ state
    def set_tables(self, tables: Tables, clear_state: bool = False) -> None:
        with self._lock:
            self._tables = tables
            if clear_state:
                for per_set in (self._exp, self._count, self._seen, self._slot_k, self._has_result):
                    for v in (0, 1):
                        per_set[v][:] = [0] * self.pool_size
                self._value[:] = 0
                for counts in self._counters.values():
                    counts[:] = [0] * len(counts)

    def read_counter(self, name: str) -> list[int]:
        self._check_counter(name)
        with self._lock:
            return list(self._counters[name])

    def set_counter(self, name: str, index: int, value: int) -> None:
        self._check_counter(name)
        with self._lock:
            self._counters[name][index] = value

    def slot_state(self, set_bit: int, slot: int) -> SlotState:
        with self._lock:
            return SlotState(self._seen[set_bit][slot], self._count[set_bit][slot], self._exp[set_bit][slot],
                             self._value[set_bit, slot].copy(), self._slot_k[set_bit][slot],
                             bool(self._has_result[set_bit][slot]))

    # ------------------------------------------------------------ packets
    def serve(self, sock: socket.socket, stop: StopSignal, batch: int, offload: bool) -> None:
        """One datagram at a time (``batch`` and ``offload`` are the native loop's)."""
        buf = bytearray(_RECV_BUFFER)
        view = memoryview(buf)
        sock.settimeout(0.2)  # so that stop is noticed
        while not stop.is_set():
            try:
                n, src = sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                raise
            try:
                for payload, dst in self.process(view[:n], src):
                    sock.sendto(payload, dst)
            except Exception:  # noqa: BLE001 - a packet must never stop the switch
                log.exception("error handling a packet of %d bytes from %s", n, src)

    def process(self, data: bytes | bytearray | memoryview, src: Address) -> list[Reply]:
        with self._lock:
            return self._process(data, src, self._tables)

    def _lost(self, address: Address, tables: Tables) -> bool:
        threshold = tables.loss.get(tables.port_of.get(address, 0), tables.default_loss)
        # getrandbits(15): uniform over 0..32767 like randrange(32768), and one MT19937 word
        # per draw on every Python version, which the native path reproduces draw for draw.
        return threshold > 0 and self._rng.getrandbits(15) < threshold

    def _drop(self, reason: DropReason) -> list[Reply]:
        self._counters[DROPS_COUNTER][reason] += 1
        return []

    def _process(self, data, src: Address, tables: Tables) -> list[Reply]:
        packets = self._counters[PACKETS_COUNTER]
        packets[PacketCounter.RECEIVED] += 1
        if self._lost(src, tables):
            return self._drop(DropReason.EMULATED_LOSS)
        n_bytes = len(data)
        if n_bytes < PREAMBLE_BYTES:
            return self._drop(DropReason.MALFORMED)
        byte0, job, pidx = data[0], data[1], (data[6] << 8) | data[7]
        msg_type, size = byte0 >> MSG_TYPE_SHIFT, byte0 & SIZE_MASK
        if size not in self.sizes:
            return self._drop(DropReason.BAD_SIZE)
        k = SIZE_TO_K[size]
        if n_bytes != packet_bytes(k):
            return self._drop(DropReason.MALFORMED)
        slot, v = pidx & SLOT_MASK, pidx >> SET_SHIFT
        entry = tables.admission.get(src, _ABSENT)  # None: the controller

        if msg_type == MsgType.RESET:
            if entry is not None:
                return self._drop(DropReason.RESET_NOT_FROM_CONTROLLER)
            if slot >= self.pool_size:
                return self._drop(DropReason.SLOT_OUT_OF_RANGE)
            for s in (0, 1):
                self._seen[s][slot] = self._count[s][slot] = self._slot_k[s][slot] = 0
                self._has_result[s][slot] = False
            packets[PacketCounter.RESETS] += 1
            return self._emit(bytes(data), [src], tables)  # the echo acknowledges the reset
        if msg_type == MsgType.RESULT:
            up = tables.upstream.get(job)
            if up is None or (up.ip, up.udp_port) != src:  # a RESULT is a leaf's, from its own spine only
                return self._drop(DropReason.BAD_MSG_TYPE)
            return self._from_upstream(data, up, v, slot, k, tables)
        if msg_type != MsgType.UPDATE:
            return self._drop(DropReason.BAD_MSG_TYPE)
        if entry is None or entry is _ABSENT:
            return self._drop(DropReason.NOT_ADMITTED)
        if job != entry.job:
            return self._drop(DropReason.JOB_MISMATCH)
        if not entry.pool_base <= slot < entry.pool_base + entry.pool_size:
            return self._drop(DropReason.SLOT_OUT_OF_RANGE)

        bit = 1 << entry.worker_id
        seen = self._seen[v]
        count = self._count[v]
        if not seen[slot] & bit:  # a new contribution
            first = count[slot] == 0
            if not first and self._slot_k[v][slot] != k:
                return self._drop(DropReason.SIZE_MISMATCH)
            seen[slot] |= bit
            self._seen[1 - v][slot] &= ~bit  # frees the other set for this worker's next use
            count[slot] = (count[slot] + 1) % entry.num_workers
            payload = np.frombuffer(data, dtype=">i4", count=k, offset=PREAMBLE_BYTES)
            e0 = _int8(data[8])
            value = self._value[v, slot, :k]
            if first:
                value[:] = payload
                self._exp[v][slot] = e0
                self._slot_k[v][slot] = k
                self._has_result[v][slot] = False  # leaf role, step 1: value holds the rack's sum
            else:
                value += payload  # int32 add wraps mod 2^32, as the switch's ALUs do
                self._exp[v][slot] = max(self._exp[v][slot], e0)
            packets[PacketCounter.AGGREGATED] += 1
            if count[slot] != 0:
                return []
            up = tables.upstream.get(entry.job)
            if up is not None:  # leaf role, step 2: the rack's sum goes upstream as one contribution
                return self._to_upstream(data, up, v, slot, k, LeafCounter.SENT_UPSTREAM, tables)
            self._counters[RESULTS_COUNTER][slot] += 1
            destinations = [(r.ip, r.udp_port) for r in tables.groups.get(entry.mgid, ())]
            return self._emit(self._result(data, entry.job, v, slot, k), destinations, tables)
        # a retransmission
        if count[slot] != 0:
            return self._drop(DropReason.RETRANSMISSION_INCOMPLETE)
        up = tables.upstream.get(entry.job)
        if up is not None and not self._has_result[v][slot]:
            # leaf role, step 5: the spine's RESULT has not come; the worker's resend is the leaf's timer
            return self._to_upstream(data, up, v, slot, k, LeafCounter.RESENT_UPSTREAM, tables)
        self._counters[RETRANSMISSIONS_COUNTER][slot] += 1  # (leaf role, step 4: from the spine's RESULT)
        return self._emit(self._result(data, entry.job, v, slot, k), [src], tables)

    def _to_upstream(self, data, up: UpstreamEntry, v: int, slot: int, k: int, counter: LeafCounter,
                     tables: Tables) -> list[Reply]:
        """Leaf role, steps 2 and 5: the rack's sum of set v of ``slot`` to the spine, as one UPDATE."""
        self._counters[LEAF_COUNTER][counter] += 1
        return self._emit(self._packet(MsgType.UPDATE, data, up.job, v, slot, k), [(up.ip, up.udp_port)], tables)

    def _from_upstream(self, data, up: UpstreamEntry, v: int, slot: int, k: int, tables: Tables) -> list[Reply]:
        """Leaf role, step 6: the spine's RESULT for set v of ``slot``, kept and multicast to the rack."""
        if not up.pool_base <= slot < up.pool_base + up.pool_size:
            return self._drop(DropReason.SLOT_OUT_OF_RANGE)
        if self._count[v][slot] != 0 or not self._seen[v][slot] or self._has_result[v][slot]:
            # no rack sum waiting in this set: a duplicate (the spine answered a second resend) or stale
            self._counters[LEAF_COUNTER][LeafCounter.IGNORED_FROM_UPSTREAM] += 1
            return []
        if self._slot_k[v][slot] != k:
            return self._drop(DropReason.SIZE_MISMATCH)
        self._value[v, slot, :k] = np.frombuffer(data, dtype=">i4", count=k, offset=PREAMBLE_BYTES)
        self._exp[v][slot] = _int8(data[8])
        self._has_result[v][slot] = True
        self._counters[LEAF_COUNTER][LeafCounter.RESULTS_FROM_UPSTREAM] += 1
        self._counters[RESULTS_COUNTER][slot] += 1
        destinations = [(r.ip, r.udp_port) for r in tables.groups.get(up.mgid, ())]
        return self._emit(bytes(data), destinations, tables)

    def _result(self, data, job: int, v: int, slot: int, k: int) -> bytes:
        return self._packet(MsgType.RESULT, data, job, v, slot, k)

    def _packet(self, msg_type: MsgType, data, job: int, v: int, slot: int, k: int) -> bytes:
        """A packet of set v of ``slot``: ``data``'s size, tsi and pool index, the slot's exponent and values."""
        header = bytes((msg_type << MSG_TYPE_SHIFT | (data[0] & 0xF), job)) + bytes(data[2:8])
        exps = bytes((self._exp[v][slot] & 0xFF, 0))
        return header + exps + self._value[v, slot, :k].astype(">i4").tobytes()

    def _emit(self, payload: bytes, destinations: list[Address], tables: Tables) -> list[Reply]:
        out = []
        for dst in destinations:
            if self._lost(dst, tables):
                self._counters[DROPS_COUNTER][DropReason.EMULATED_LOSS] += 1
            else:
                out.append((payload, dst))
        return out


def _int8(byte: int) -> int:
    return byte - 256 if byte > 127 else byte
