"""The software switch's native data path: glue between ``SoftwareSwitch`` and its C extension.

``emulation._native_switch`` (``native/switch.c``) does the per-packet work; Python keeps
everything else. ``attach(switch, seed)`` gives a ``SoftwareSwitch`` built with
``dataplane="native"`` this arrangement:

- The slot state and the counters become numpy arrays that Python allocates and the C
  code writes in place. ``_IntRows``/``_IntRow`` wrap them so that the reference's own
  accessors (``read_counter``, ``slot_state``, ``clear``, ``set_counter``; written for
  lists of ints) read and write them unchanged and still hand out Python ints.
- ``switch._lock`` becomes the C state's mutex (``NativeLock``), so every accessor that
  holds the lock excludes the data path, which holds it per batch of packets.
- The tables stay Python dicts. When Python releases the lock after changing them, the
  lock pushes a compiled copy to the C state (``set_tables``), still under the mutex:
  the data path never sees a half-updated table.
- The loss generator is MT19937 seeded as ``random.Random(seed)``, drawing
  ``getrandbits(15)`` as the reference does: a seeded stream loses the same packets.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from switchml import native, protocol
from switchml.pipeline import (
    DROPS_COUNTER,
    NUM_DROP_REASONS,
    NUM_PACKET_COUNTERS,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    PacketCounter,
    WorkerEntry,
)

if TYPE_CHECKING:
    from emulation.switch import SoftwareSwitch

log = logging.getLogger(__name__)

SWITCH_MODULE = "emulation._native_switch"
NATIVE, PYTHON = native.NATIVE, native.PYTHON


def switch_module() -> tuple[ModuleType | None, str | None]:
    """The switch's extension, or why it is missing."""
    expected = {"PREAMBLE_BYTES": protocol.PREAMBLE_BYTES, "MAX_K": protocol.MAX_K,
                "SLOT_MASK": protocol.SLOT_MASK, "UPDATE": int(protocol.MsgType.UPDATE),
                "RESULT": int(protocol.MsgType.RESULT), "RESET": int(protocol.MsgType.RESET),
                "NUM_DROP_REASONS": NUM_DROP_REASONS}
    expected.update({r.name: int(r) for r in DropReason})
    expected.update({c.name: int(c) for c in PacketCounter})
    return native.load(SWITCH_MODULE, expected)


def available() -> bool:
    """Whether the switch's native data path can be used in this process."""
    return switch_module()[0] is not None


def why_missing() -> str | None:
    """Why the native data paths (switch and worker) cannot both run here; None if they can."""
    for module, why_not in (native.worker_module(), switch_module()):
        if module is None:
            return why_not
    return None


def resolve(requested: str | None) -> str:
    """The software switch's data path for ``SoftwareSwitch(dataplane=requested)``."""
    module, why_not = switch_module()
    return native.resolve(requested, "software switch", module, why_not)


def ipv4(text: str) -> int | None:
    """Dotted-quad text as a host-order int; None if it is not an IPv4 address."""
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except (OSError, TypeError):
        return None


def seed_key(seed: Any) -> list[int]:
    """The 32-bit words ``random.Random(seed)`` feeds MT19937 for an int seed.

    None draws a fresh seed (as ``random.Random(None)`` does); other types get a derived
    int seed, so their loss pattern is reproducible but not the reference's.
    """
    if seed is None:
        seed = random.SystemRandom().getrandbits(64)
    elif not isinstance(seed, int):
        seed = random.Random(seed).getrandbits(128)
    n = abs(seed)
    return [(n >> (32 * i)) & 0xFFFFFFFF for i in range(max(1, (n.bit_length() + 31) // 32))]


class _IntRow:
    """A 1-D numpy array that reads as a list of Python ints (indexing, slicing, iteration)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, index):
        return self.array[index].tolist()

    def __setitem__(self, index, value) -> None:
        self.array[index] = value

    def __len__(self) -> int:
        return len(self.array)

    def __iter__(self) -> Iterator[int]:
        return iter(self.array.tolist())


class _IntRows:
    """A 2-D numpy array whose rows are ``_IntRow`` (the reference's ``x[set][slot]``)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, v: int) -> _IntRow:
        return _IntRow(self.array[v])


class NativeLock:
    """The C state's mutex as a context manager; pushes changed tables before releasing it."""

    def __init__(self, path: NativePath) -> None:
        self._path = path

    def __enter__(self) -> NativeLock:
        self._path.state.acquire()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._path.sync_tables()
        finally:
            self._path.state.release()

    def acquire(self) -> None:
        self._path.state.acquire()

    def release(self) -> None:
        self.__exit__()


class NativePath:
    """The native state of one ``SoftwareSwitch``; created by ``attach``."""

    def __init__(self, switch: SoftwareSwitch, module: ModuleType, seed: Any) -> None:
        self.switch = switch
        pool = switch.pool_size
        max_k = switch._value.shape[2]
        mask = sum(1 << s for s in switch.sizes)
        self.exp = np.zeros((2, pool), np.int8)
        self.count = np.zeros((2, pool), np.int32)
        self.seen = np.zeros((2, pool), np.uint32)
        self.slot_k = np.zeros((2, pool), np.int32)
        self.counters = {RESULTS_COUNTER: np.zeros(pool, np.uint64),
                         RETRANSMISSIONS_COUNTER: np.zeros(pool, np.uint64),
                         DROPS_COUNTER: np.zeros(NUM_DROP_REASONS, np.uint64),
                         PACKETS_COUNTER: np.zeros(NUM_PACKET_COUNTERS, np.uint64)}
        self.state = module.Switch(pool, max_k, mask, seed_key(seed), switch._value, self.exp, self.count, self.seen,
                                   self.slot_k, self.counters[RESULTS_COUNTER],
                                   self.counters[RETRANSMISSIONS_COUNTER], self.counters[DROPS_COUNTER],
                                   self.counters[PACKETS_COUNTER])
        self._pushed: tuple | None = None

    def snapshot(self) -> tuple:
        """The tables as they are now (compared with the last push to see a change)."""
        sw = self.switch
        return (dict(sw._admission), {g: tuple(r) for g, r in sw._groups.items()}, dict(sw._port_of),
                dict(sw._loss), sw._default_loss)

    def sync_tables(self) -> None:
        """Push the tables to the C state if they changed; the caller holds the lock."""
        current = self.snapshot()
        if current == self._pushed:
            return
        admission, groups, port_of, loss, default_loss = current
        adm_rows = []
        for (ip, udp_port), entry in admission.items():
            addr = ipv4(ip)
            if addr is None:
                log.warning("native switch: admission key %s:%s is not IPv4; no packet can match it", ip, udp_port)
                continue
            if isinstance(entry, WorkerEntry):
                adm_rows.append((addr, udp_port, 0, entry.job, entry.worker_id, entry.num_workers, entry.mgid,
                                 entry.pool_base, entry.pool_size))
            else:  # the controller
                adm_rows.append((addr, udp_port, 1, 0, 0, 1, 0, 0, 0))
        port_rows = [(ipv4(ip), udp_port, port) for (ip, udp_port), port in port_of.items() if ipv4(ip) is not None]
        group_rows = []
        for mgid, replicas in groups.items():
            rows = []
            for r in replicas:
                addr = ipv4(r.ip)
                if addr is None:
                    log.warning("native switch: replica %s:%s of group %d is not IPv4; skipped", r.ip, r.udp_port,
                                mgid)
                    continue
                rows.append((addr, r.udp_port))
            group_rows.append((mgid, rows))
        self.state.set_tables(adm_rows, port_rows, list(loss.items()), default_loss, group_rows)
        self._pushed = current

    def process(self, data: bytes | bytearray | memoryview, src: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
        """``SoftwareSwitch.process`` through the C data path."""
        addr = ipv4(src[0])
        if addr is None:
            raise ValueError(f"sender {src[0]!r}: the native data path takes IPv4 senders (the UDP socket is IPv4)")
        return self.state.process(data, addr, src[1])


def attach(switch: SoftwareSwitch, seed: Any) -> NativePath:
    """Move ``switch``'s slot state, counters and lock onto the native data path."""
    module, why_not = switch_module()
    if module is None:
        raise native.NativeUnavailable(f"software switch: {why_not}")
    path = NativePath(switch, module, seed)
    switch._exp, switch._count = _IntRows(path.exp), _IntRows(path.count)
    switch._seen, switch._slot_k = _IntRows(path.seen), _IntRows(path.slot_k)
    switch.counters = {name: _IntRow(array) for name, array in path.counters.items()}
    switch._lock = NativeLock(path)
    with switch._lock:  # pushes the (empty) tables and the default loss
        pass
    return path
