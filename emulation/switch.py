"""The software switch's data plane: DESIGN.md's switch semantics, packet by packet.

This pure-Python (numpy for the vector add) implementation is the reference: any faster
data plane and every P4 program is tested against its replies and counters. The native
data path (``dataplane="native"``: ``emulation.native`` and ``native/switch.c``) sits
beside it, chosen at construction; it keeps these tables, accessors and counters and
replaces only ``process`` and the UDP loop. It knows
nothing of sockets: ``process(data, src)`` takes one UDP payload and its sender and returns
the packets to send, so tests can drive it packet by packet and the UDP server
(``emulation.server``) is a thin loop around it.

Tables and counters are those of ``switchml.pipeline``; the controller fills them through
``emulation.target.InProcessTarget`` or the P4Runtime server.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence

import numpy as np

from emulation import native
from switchml import defaults
from switchml.pipeline import (
    DROP_PROBABILITY_SCALE,
    DROPS_COUNTER,
    NUM_DROP_REASONS,
    NUM_PACKET_COUNTERS,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    PacketCounter,
    Replica,
    WorkerEntry,
    drop_threshold,
)
from switchml.protocol import (
    MAX_SLOTS,
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

Address = tuple[str, int]
_CONTROLLER = object()  # admission action set_controller()


class SoftwareSwitch:
    """Slot pool, tables and counters of one switch; thread-safe.

    Args:
        pool_size: slots in the pool (all jobs together), at most 16384.
        sizes: size enums accepted (default: all of wire format v1, 32..4096 elements).
        drop_probability: loss applied to every port without its own loss entry (0..1).
        seed: seeds the loss generator, so a lossy run can be replayed (the same draws on both
            data paths).
        dataplane: "native" (C), "python" (this reference) or None: native where its
            extension is built, unless ``$SWITCHML_DATAPLANE`` says otherwise
            (``switchml.native``).
    """

    def __init__(
        self,
        pool_size: int = defaults.POOL_SIZE,
        sizes: Sequence[int] = tuple(SIZE_TO_K),
        drop_probability: float = 0.0,
        seed: int | None = None,
        dataplane: str | None = None,
    ) -> None:
        dataplane = native.resolve(dataplane)
        if not 1 <= pool_size <= MAX_SLOTS:
            raise ValueError(f"pool_size={pool_size}; expected 1..{MAX_SLOTS}")
        self.pool_size = pool_size
        self.sizes = frozenset(sizes)
        max_k = max(SIZE_TO_K[s] for s in self.sizes)
        # value/exp/count/seen per set v and slot s; pages of `value` are touched lazily.
        self._value = np.zeros((2, pool_size, max_k), dtype=np.int32)
        self._exp = [[0] * pool_size, [0] * pool_size]
        self._count = [[0] * pool_size, [0] * pool_size]
        self._seen = [[0] * pool_size, [0] * pool_size]
        self._slot_k = [[0] * pool_size, [0] * pool_size]
        # tables
        self._admission: dict[Address, WorkerEntry | object] = {}
        self._groups: dict[int, list[Replica]] = {}
        self._port_of: dict[Address, int] = {}
        self._loss: dict[int, int] = {}
        self._default_loss = drop_threshold(drop_probability)
        self._rng = random.Random(seed)
        # counters
        self.counters: dict[str, list[int]] = {
            RESULTS_COUNTER: [0] * pool_size,
            RETRANSMISSIONS_COUNTER: [0] * pool_size,
            DROPS_COUNTER: [0] * NUM_DROP_REASONS,
            PACKETS_COUNTER: [0] * NUM_PACKET_COUNTERS,
        }
        self._lock = threading.Lock()
        self.dataplane = dataplane
        # Native: slot state, counters and the lock move onto the C state; tables stay here.
        self._native = native.attach(self, seed) if dataplane == native.NATIVE else None

    # ---------------------------------------------------------------- tables
    def add_admission(self, ip: str, udp_port: int, entry: WorkerEntry | None) -> None:
        """Admit (ip, udp_port) as a worker (``entry``) or, with ``entry=None``, as the controller."""
        if entry is not None:
            _check_entry(entry, self.pool_size)
        with self._lock:
            self._admission[(ip, udp_port)] = _CONTROLLER if entry is None else entry

    def remove_admission(self, ip: str, udp_port: int) -> None:
        """Delete an admission entry (absent entries are ignored)."""
        with self._lock:
            self._admission.pop((ip, udp_port), None)

    def admission_entries(self) -> dict[Address, WorkerEntry | None]:
        """A copy of the admission table (None marks the controller)."""
        with self._lock:
            return {a: (None if e is _CONTROLLER else e) for a, e in self._admission.items()}

    def set_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        """Multicast group ``mgid`` with the egress rewrite of each replica."""
        with self._lock:
            self._groups[mgid] = list(replicas)
            for r in replicas:
                self._port_of[(r.ip, r.udp_port)] = r.port

    def delete_multicast_group(self, mgid: int) -> None:
        """Delete a multicast group and its rewrites."""
        with self._lock:
            for r in self._groups.pop(mgid, []):
                self._port_of.pop((r.ip, r.udp_port), None)

    def multicast_groups(self) -> dict[int, list[Replica]]:
        """A copy of the multicast groups."""
        with self._lock:
            return {g: list(r) for g, r in self._groups.items()}

    def set_drop_probability(self, port: int | None, probability: float) -> None:
        """Loss on ``port`` (both directions), or on every port without an entry if None."""
        threshold = drop_threshold(probability)
        with self._lock:
            if port is None:
                self._default_loss = threshold
            else:
                self._loss[port] = threshold

    def clear_drop_probability(self, port: int) -> None:
        """Delete the loss entry of ``port``: it gets the default loss again."""
        with self._lock:
            self._loss.pop(port, None)

    def loss_entries(self) -> dict[int | None, float]:
        """Loss per port as probabilities; key None is the default of ports without an entry."""
        with self._lock:
            out: dict[int | None, float] = {p: t / DROP_PROBABILITY_SCALE for p, t in self._loss.items()}
            out[None] = self._default_loss / DROP_PROBABILITY_SCALE
            return out

    def clear(self) -> None:
        """Back to power-on state: empty tables, zeroed counters and slots (what loading a
        new pipeline does to a P4 switch); the default loss is kept."""
        with self._lock:
            for per_set in (self._exp, self._count, self._seen, self._slot_k):
                for v in (0, 1):
                    per_set[v][:] = [0] * self.pool_size
            self._value[:] = 0
            self._admission.clear()
            self._groups.clear()
            self._port_of.clear()
            self._loss.clear()
            for counts in self.counters.values():
                counts[:] = [0] * len(counts)

    def slot_state(self, set_bit: int, slot: int) -> tuple[int, int, int, np.ndarray]:
        """(seen bitmap, count mod n, max exponent, values) of one set of one slot (a copy)."""
        with self._lock:
            return (self._seen[set_bit][slot], self._count[set_bit][slot], self._exp[set_bit][slot],
                    self._value[set_bit, slot].copy())

    def set_counter(self, name: str, index: int, value: int) -> None:
        """Overwrite one cell of counter ``name`` (P4Runtime counter writes)."""
        with self._lock:
            if name not in self.counters:
                raise KeyError(f"no counter {name!r}; the switch has {sorted(self.counters)}")
            self.counters[name][index] = value

    def read_counter(self, name: str) -> list[int]:
        """A copy of counter ``name``."""
        with self._lock:
            if name not in self.counters:
                raise KeyError(f"no counter {name!r}; the switch has {sorted(self.counters)}")
            return list(self.counters[name])

    def drops(self) -> dict[str, int]:
        """Drop counts by reason name."""
        counts = self.read_counter(DROPS_COUNTER)
        return {reason.name.lower(): counts[reason] for reason in DropReason}

    # ------------------------------------------------------------ data plane
    def process(self, data: bytes | bytearray | memoryview, src: Address) -> list[tuple[bytes, Address]]:
        """Handle one UDP payload from ``src``; return the (payload, destination) pairs to send."""
        if self._native is not None:
            return self._native.process(data, src)
        with self._lock:
            return self._process(data, src)

    def _lost(self, address: Address) -> bool:
        threshold = self._loss.get(self._port_of.get(address, 0), self._default_loss)
        # getrandbits(15): uniform over 0..32767 like randrange(32768), and one MT19937 word
        # per draw on every Python version, which the native path reproduces draw for draw.
        return threshold > 0 and self._rng.getrandbits(15) < threshold

    def _drop(self, reason: DropReason) -> list[tuple[bytes, Address]]:
        self.counters[DROPS_COUNTER][reason] += 1
        return []

    def _process(self, data, src: Address) -> list[tuple[bytes, Address]]:
        packets = self.counters[PACKETS_COUNTER]
        packets[PacketCounter.RECEIVED] += 1
        if self._lost(src):
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
        entry = self._admission.get(src)

        if msg_type == MsgType.RESET:
            if entry is not _CONTROLLER:
                return self._drop(DropReason.RESET_NOT_FROM_CONTROLLER)
            if slot >= self.pool_size:
                return self._drop(DropReason.SLOT_OUT_OF_RANGE)
            for s in (0, 1):
                self._seen[s][slot] = self._count[s][slot] = self._slot_k[s][slot] = 0
            packets[PacketCounter.RESETS] += 1
            return self._emit(bytes(data), [src])  # the echo acknowledges the reset
        if msg_type != MsgType.UPDATE:
            return self._drop(DropReason.BAD_MSG_TYPE)
        if entry is None or entry is _CONTROLLER:
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
            else:
                value += payload  # int32 add wraps mod 2^32, as the switch's ALUs do
                self._exp[v][slot] = max(self._exp[v][slot], e0)
            packets[PacketCounter.AGGREGATED] += 1
            if count[slot] != 0:
                return []
            self.counters[RESULTS_COUNTER][slot] += 1
            destinations = [(r.ip, r.udp_port) for r in self._groups.get(entry.mgid, [])]
            return self._emit(self._result(data, entry.job, v, slot, k), destinations)
        # a retransmission
        if count[slot] != 0:
            return self._drop(DropReason.RETRANSMISSION_INCOMPLETE)
        self.counters[RETRANSMISSIONS_COUNTER][slot] += 1
        return self._emit(self._result(data, entry.job, v, slot, k), [src])

    def _result(self, data, job: int, v: int, slot: int, k: int) -> bytes:
        header = bytes((MsgType.RESULT << 4 | (data[0] & 0xF), job)) + bytes(data[2:8])
        exps = bytes((self._exp[v][slot] & 0xFF, 0))
        return header + exps + self._value[v, slot, :k].astype(">i4").tobytes()

    def _emit(self, payload: bytes, destinations: list[Address]) -> list[tuple[bytes, Address]]:
        out = []
        for dst in destinations:
            if self._lost(dst):
                self.counters[DROPS_COUNTER][DropReason.EMULATED_LOSS] += 1
            else:
                out.append((payload, dst))
        return out



def _int8(byte: int) -> int:
    return byte - 256 if byte > 127 else byte


def _check_entry(entry: WorkerEntry, pool_size: int) -> None:
    if entry.pool_base < 0 or entry.pool_size < 1 or entry.pool_base + entry.pool_size > pool_size:
        raise ValueError(
            f"job {entry.job}: slots {entry.pool_base}..{entry.pool_base + entry.pool_size - 1} "
            f"outside the switch's pool of {pool_size}"
        )
    if not 0 <= entry.worker_id < min(entry.num_workers, 32):
        raise ValueError(f"worker_id={entry.worker_id}; expected 0..{min(entry.num_workers, 32) - 1}")
