"""The software switch's native data plane: ``NativeDataPlane``, the C extension behind ``DataPlane``.

``emulation._native_switch`` (``native/switch.c``) does the per-packet work and the UDP loop
(recvmmsg/sendmmsg batches, the GIL released, one or more threads on one socket), and the
leaf role of ``emulation.dataplane`` (docs/hierarchy.md) too.

- The slot state and the counters are numpy arrays that this class allocates and the C code
  writes in place; every read and write here holds the C state's mutex, which the C loop
  holds per batch of packets.
- ``SoftwareSwitch`` pushes each change of its tables (``set_tables``); a compiled copy goes
  to the C state under the mutex, so the data path never sees a half-updated table.
- The loss generator is MT19937 seeded as ``random.Random(seed)``, drawing
  ``getrandbits(15)`` as the reference does: a seeded stream loses the same packets.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from emulation.dataplane import Address, DataPlane, Reply, SlotState, StopSignal, Tables
from switchml import native, protocol
from switchml.pipeline import (
    DROPS_COUNTER,
    LEAF_COUNTER,
    NUM_DROP_REASONS,
    NUM_LEAF_COUNTERS,
    PACKETS_COUNTER,
    RESULTS_COUNTER,
    RETRANSMISSIONS_COUNTER,
    DropReason,
    LeafCounter,
    PacketCounter,
)

log = logging.getLogger(__name__)

SWITCH_MODULE = "emulation._native_switch"
NATIVE, PYTHON = native.NATIVE, native.PYTHON


def switch_module() -> tuple[ModuleType | None, str | None]:
    """The switch's extension, or why it is missing."""
    expected = {"PREAMBLE_BYTES": protocol.PREAMBLE_BYTES, "MAX_K": protocol.MAX_K,
                "SLOT_MASK": protocol.SLOT_MASK, "UPDATE": int(protocol.MsgType.UPDATE),
                "RESULT": int(protocol.MsgType.RESULT), "RESET": int(protocol.MsgType.RESET),
                "NUM_DROP_REASONS": NUM_DROP_REASONS, "NUM_LEAF_COUNTERS": NUM_LEAF_COUNTERS}
    expected.update({r.name: int(r) for r in DropReason})
    expected.update({c.name: int(c) for c in PacketCounter})
    expected.update({c.name: int(c) for c in LeafCounter})
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


class NativeDataPlane(DataPlane):
    """The C data plane (``native/switch.c``); raises ``NativeUnavailable`` where it is not built."""

    name = NATIVE
    parallel = True
    leaf_role = True

    def __init__(self, pool_size: int, sizes: frozenset[int], seed: Any) -> None:
        super().__init__(pool_size, sizes, seed)
        module, why_not = switch_module()
        if module is None:
            raise native.NativeUnavailable(f"software switch: {why_not}")
        self._value = np.zeros((2, pool_size, self.max_k), dtype=np.int32)
        self._exp = np.zeros((2, pool_size), np.int8)
        self._count = np.zeros((2, pool_size), np.int32)
        self._seen = np.zeros((2, pool_size), np.uint32)
        self._slot_k = np.zeros((2, pool_size), np.int32)
        self._has_result = np.zeros((2, pool_size), np.uint8)
        self._counters = {name: np.zeros(size, np.uint64) for name, size in self.counter_sizes.items()}
        self._state = module.Switch(pool_size, self.max_k, sum(1 << s for s in sizes), seed_key(seed), self._value,
                                    self._exp, self._count, self._seen, self._slot_k, self._counters[RESULTS_COUNTER],
                                    self._counters[RETRANSMISSIONS_COUNTER], self._counters[DROPS_COUNTER],
                                    self._counters[PACKETS_COUNTER], self._has_result, self._counters[LEAF_COUNTER])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The C state's mutex: excludes the C loop, which holds it per batch of packets."""
        self._state.acquire()
        try:
            yield
        finally:
            self._state.release()

    # ------------------------------------------------------------ state
    def set_tables(self, tables: Tables, clear_state: bool = False) -> None:
        rows = _compile(tables)
        with self._locked():
            if clear_state:
                for array in (self._value, self._exp, self._count, self._seen, self._slot_k, self._has_result,
                              *self._counters.values()):
                    array[...] = 0
            self._state.set_tables(*rows)

    def read_counter(self, name: str) -> list[int]:
        self._check_counter(name)
        with self._locked():
            return self._counters[name].tolist()

    def set_counter(self, name: str, index: int, value: int) -> None:
        self._check_counter(name)
        with self._locked():
            self._counters[name][index] = value

    def slot_state(self, set_bit: int, slot: int) -> SlotState:
        with self._locked():
            return SlotState(int(self._seen[set_bit, slot]), int(self._count[set_bit, slot]),
                             int(self._exp[set_bit, slot]), self._value[set_bit, slot].copy(),
                             int(self._slot_k[set_bit, slot]), bool(self._has_result[set_bit, slot]))

    def rng_bits15(self, count: int) -> list[int]:
        """The loss generator's next ``count`` draws (they are used up)."""
        return self._state.rng_bits15(count)

    # ------------------------------------------------------------ packets
    def process(self, data: bytes | bytearray | memoryview, src: Address) -> list[Reply]:
        addr = ipv4(src[0])
        if addr is None:
            raise ValueError(f"sender {src[0]!r}: the native data path takes IPv4 senders (the UDP socket is IPv4)")
        return self._state.process(data, addr, src[1])

    def serve(self, sock: socket.socket, stop: StopSignal, batch: int, offload: bool) -> None:
        """``Switch.serve`` of ``native/switch.c``: recvmmsg/sendmmsg batches, the GIL released."""
        sock.setblocking(True)  # the C loop polls before it receives; sends wait for buffer space
        while not stop.is_set():
            try:
                self._state.serve(sock.fileno(), batch, stop.flag, offload)  # until the flag is set
            except OSError:
                if stop.is_set():
                    return
                log.exception("native switch loop failed; restarting it")
                stop.wait(0.1)


def _compile(tables: Tables) -> tuple:
    """``tables`` as the rows ``Switch.set_tables`` takes (IPv4 addresses as ints)."""
    adm_rows = []
    for (ip, udp_port), entry in tables.admission.items():
        addr = ipv4(ip)
        if addr is None:
            log.warning("native switch: admission key %s:%s is not IPv4; no packet can match it", ip, udp_port)
            continue
        if entry is None:  # the controller
            adm_rows.append((addr, udp_port, 1, 0, 0, 1, 0, 0, 0))
        else:
            adm_rows.append((addr, udp_port, 0, entry.job, entry.worker_id, entry.num_workers, entry.mgid,
                             entry.pool_base, entry.pool_size))
    port_rows = [(ipv4(ip), udp_port, port) for (ip, udp_port), port in tables.port_of.items()
                 if ipv4(ip) is not None]
    group_rows = []
    for mgid, replicas in tables.groups.items():
        rows = []
        for r in replicas:
            addr = ipv4(r.ip)
            if addr is None:
                log.warning("native switch: replica %s:%s of group %d is not IPv4; skipped", r.ip, r.udp_port, mgid)
                continue
            rows.append((addr, r.udp_port))
        group_rows.append((mgid, rows))
    up_rows = []
    for job, up in tables.upstream.items():
        addr = ipv4(up.ip)
        if addr is None:
            log.warning("native switch: the spine %s:%s of job %d is not IPv4; its RESULTs cannot match", up.ip,
                        up.udp_port, job)
            continue
        up_rows.append((job, addr, up.udp_port, up.mgid, up.pool_base, up.pool_size))
    return adm_rows, port_rows, list(tables.loss.items()), tables.default_loss, group_rows, up_rows
