"""The software switch: the tables of DESIGN.md's pipeline, and the data plane they program.

``SoftwareSwitch`` owns the tables (admission, multicast groups with their egress rewrites,
loss) and pushes every change to its data plane (``emulation.dataplane``): the Python
reference (``PythonDataPlane``) or the native one (``emulation.native.NativeDataPlane``,
``native/switch.c``), chosen at construction. The data plane owns the slot state, the
counters and the loss generator. ``process(data, src)`` takes one UDP payload and its sender
and returns the packets to send, so tests can drive the switch packet by packet; the UDP
server (``emulation.server``) runs the data plane's loop on a socket.

Tables and counters are those of ``switchml.pipeline``; the controller fills them through
``emulation.target.InProcessTarget`` or the P4Runtime server. The upstream table makes the
switch a leaf of a tree for a job (docs/hierarchy.md; the leaf role is described in
``emulation.dataplane``; both data planes have it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from emulation import native
from emulation.dataplane import Address, DataPlane, PythonDataPlane, Reply, SlotState, Tables
from switchml import defaults
from switchml.errors import LeafRoleUnsupported
from switchml.pipeline import (
    DROP_PROBABILITY_SCALE,
    DROPS_COUNTER,
    DropReason,
    Replica,
    UpstreamEntry,
    WorkerEntry,
    drop_threshold,
)
from switchml.protocol import MAX_SLOTS, SIZE_TO_K

log = logging.getLogger(__name__)

class SoftwareSwitch:
    """Tables of one switch and the data plane they program; thread-safe.

    Args:
        pool_size: slots in the pool (all jobs together), at most 16384.
        sizes: size enums accepted (default: all of wire format v1, 32..4096 elements).
        drop_probability: loss applied to every port without its own loss entry (0..1).
        seed: seeds the loss generator, so a lossy run can be replayed (the same draws on both
            data paths).
        dataplane: "native" (C), "python" (the reference) or None: native where its
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
        # tables
        self._admission: dict[Address, WorkerEntry | None] = {}  # None: the controller
        self._groups: dict[int, list[Replica]] = {}
        self._port_of: dict[Address, int] = {}
        self._loss: dict[int, int] = {}
        self._upstream: dict[int, UpstreamEntry] = {}  # by job number: the jobs this switch is a leaf of
        self._default_loss = drop_threshold(drop_probability)
        self._lock = threading.Lock()  # the tables' (the data plane has its own)
        plane = native.NativeDataPlane if dataplane == native.NATIVE else PythonDataPlane
        self.data_plane: DataPlane = plane(pool_size, self.sizes, seed)
        self.dataplane = self.data_plane.name
        #: cells of each counter, by name
        self.counter_sizes: dict[str, int] = dict(self.data_plane.counter_sizes)
        with self._lock:
            self._push()

    def _push(self, clear_state: bool = False) -> None:
        """Hand the tables to the data plane; the caller holds ``_lock``, so pushes keep their order."""
        # the spine's address gets the port of its upstream entry, so that the loss table applies to it
        port_of = {**{(u.ip, u.udp_port): u.port for u in self._upstream.values()}, **self._port_of}
        self.data_plane.set_tables(Tables.of(self._admission, self._groups, port_of, self._loss,
                                             self._default_loss, self._upstream), clear_state)

    # ---------------------------------------------------------------- tables
    def add_admission(self, ip: str, udp_port: int, entry: WorkerEntry | None) -> None:
        """Admit (ip, udp_port) as a worker (``entry``) or, with ``entry=None``, as the controller."""
        if entry is not None:
            _check_entry(entry, self.pool_size)
        with self._lock:
            self._admission[(ip, udp_port)] = entry
            self._push()

    def remove_admission(self, ip: str, udp_port: int) -> None:
        """Delete an admission entry (absent entries are ignored)."""
        with self._lock:
            self._admission.pop((ip, udp_port), None)
            self._push()

    def admission_entries(self) -> dict[Address, WorkerEntry | None]:
        """A copy of the admission table (None marks the controller)."""
        with self._lock:
            return dict(self._admission)

    def set_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        """Multicast group ``mgid`` with the egress rewrite of each replica."""
        with self._lock:
            self._groups[mgid] = list(replicas)
            for r in replicas:
                self._port_of[(r.ip, r.udp_port)] = r.port
            self._push()

    def delete_multicast_group(self, mgid: int) -> None:
        """Delete a multicast group and its rewrites."""
        with self._lock:
            for r in self._groups.pop(mgid, []):
                self._port_of.pop((r.ip, r.udp_port), None)
            self._push()

    def multicast_groups(self) -> dict[int, list[Replica]]:
        """A copy of the multicast groups."""
        with self._lock:
            return {g: list(r) for g, r in self._groups.items()}

    @property
    def leaf_role(self) -> bool:
        """Whether this switch can be a leaf (its data plane takes upstream entries)."""
        return self.data_plane.leaf_role

    def add_upstream(self, entry: UpstreamEntry) -> None:
        """Make this switch a leaf for job ``entry.job``: its rack's completed slots go to the spine."""
        if not self.data_plane.leaf_role:
            raise LeafRoleUnsupported(
                f"upstream entry for job {entry.job}: the {self.dataplane} data plane has no leaf role "
                "(docs/hierarchy.md)")
        _check_range(f"job {entry.job}", entry.pool_base, entry.pool_size, self.pool_size)
        with self._lock:
            self._upstream[entry.job] = entry
            self._push()

    def remove_upstream(self, job: int) -> None:
        """Delete job ``job``'s upstream entry (absent entries are ignored)."""
        with self._lock:
            self._upstream.pop(job, None)
            self._push()

    def upstream_entries(self) -> dict[int, UpstreamEntry]:
        """A copy of the upstream table, by job number."""
        with self._lock:
            return dict(self._upstream)

    def set_drop_probability(self, port: int | None, probability: float) -> None:
        """Loss on ``port`` (both directions), or on every port without an entry if None."""
        threshold = drop_threshold(probability)
        with self._lock:
            if port is None:
                self._default_loss = threshold
            else:
                self._loss[port] = threshold
            self._push()

    def clear_drop_probability(self, port: int) -> None:
        """Delete the loss entry of ``port``: it gets the default loss again."""
        with self._lock:
            self._loss.pop(port, None)
            self._push()

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
            self._admission.clear()
            self._groups.clear()
            self._port_of.clear()
            self._loss.clear()
            self._upstream.clear()
            self._push(clear_state=True)

    # ------------------------------------------------------------ data plane
    def slot_state(self, set_bit: int, slot: int) -> SlotState:
        """(seen bitmap, count mod n, max exponent, values, k) of one set of one slot (a copy)."""
        return self.data_plane.slot_state(set_bit, slot)

    def set_counter(self, name: str, index: int, value: int) -> None:
        """Overwrite one cell of counter ``name`` (P4Runtime counter writes)."""
        self.data_plane.set_counter(name, index, value)

    def read_counter(self, name: str) -> list[int]:
        """A copy of counter ``name``."""
        return self.data_plane.read_counter(name)

    def drops(self) -> dict[str, int]:
        """Drop counts by reason name."""
        counts = self.read_counter(DROPS_COUNTER)
        return {reason.name.lower(): counts[reason] for reason in DropReason}

    def process(self, data: bytes | bytearray | memoryview, src: Address) -> list[Reply]:
        """Handle one UDP payload from ``src``; return the (payload, destination) pairs to send."""
        return self.data_plane.process(data, src)


def _check_range(what: str, pool_base: int, size: int, pool_size: int) -> None:
    if pool_base < 0 or size < 1 or pool_base + size > pool_size:
        raise ValueError(f"{what}: slots {pool_base}..{pool_base + size - 1} outside the switch's pool of {pool_size}")


def _check_entry(entry: WorkerEntry, pool_size: int) -> None:
    _check_range(f"job {entry.job}", entry.pool_base, entry.pool_size, pool_size)
    if not 0 <= entry.worker_id < min(entry.num_workers, 32):
        raise ValueError(f"worker_id={entry.worker_id}; expected 0..{min(entry.num_workers, 32) - 1}")
