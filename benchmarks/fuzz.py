"""``switchml-bench fuzz``: hostile packets at the software switch while an honest job runs.

For each data path (python, native) one software switch (its UDP server and controller, in
this process) serves an honest job of N real ``switchml.Worker`` processes over UDP on
127.0.0.1 that sum int32 arrays and check every sum exactly. Meanwhile this process throws
malformed, truncated, forged and replayed packets at the switch, each built with the drop
reason the switch must count for it (``expected_reason``, the DESIGN's order of checks):

- most through the data plane's process-a-packet entry point (``SoftwareSwitch.process``),
  which the UDP loop runs too, from unadmitted sender addresses, and, for packets that
  must be dropped whoever sends them (RESET, RESULT and other message types, truncated
  or badly sized packets), from the admitted workers' own addresses;
- a share (``udp_fraction``) as real datagrams from unadmitted sockets on 127.0.0.1,
  through the UDP loop, paced by the switch socket's receive queue so the kernel drops none.

Never forged: an UPDATE of valid length from an admitted worker's address, or anything from
the controller's. The data plane admits by sender address (on a switch that is all there
is to check), so whoever can send from those addresses can corrupt a sum by design;
docs/security.md, "Threat model".

Checks: no exception from the switch and its server thread alive (0 crashes); every honest
sum exact (0 wrong results); no packet sent back for a fuzz packet; and per drop reason,
the counter grew by exactly the fuzz packets built for it (honest traffic adds only
``retransmission_incomplete``); the switch's packet counter equals the sum of its
outcomes. Reports packets/s of the fuzz loop (packet building excluded) and every counter.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from benchmarks.common import machine_info
from emulation.server import SwitchServer
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml import protocol
from switchml.controller import Controller, ControllerOptions
from switchml.pipeline import DROPS_COUNTER, PACKETS_COUNTER, RETRANSMISSIONS_COUNTER, DropReason, PacketCounter
from switchml.protocol import PREAMBLE_BYTES, SIZE_TO_K, MsgType, packet_bytes

log = logging.getLogger(__name__)

#: Packet sizes (the ``size`` field) the fuzzed switch takes: k 32..256, a P4 switch's range,
#: so that sizes 4..7 (which the software switch would otherwise take) are forged bad sizes.
SWITCH_SIZES = (0, 1, 2, 3)
#: Kinds of hostile packets and their weights (share of the packets).
KINDS: dict[str, int] = {
    "random_bytes": 10, "truncated": 12, "wrong_length": 8, "bad_size": 6, "bad_msg_type": 8,
    "reset_forged": 8, "spoofed_job": 8, "spoofed_slot": 8, "spoofed_set_bit": 6, "spoofed_sender": 8,
    "replayed": 8, "worker_reset": 5, "worker_bad_type": 3, "worker_malformed": 2,
}
#: Kinds sent from the admitted workers' own addresses (in-process only: a socket cannot send from them).
FROM_WORKER = frozenset({"worker_reset", "worker_bad_type", "worker_malformed"})
#: Above this many bytes queued on the switch's socket the UDP sender waits (the buffer is 4 MB).
_RX_QUEUE_LIMIT = 1 << 20
_CHUNK = 4096  # packets built, then sent, at a time


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz run: ``packets`` hostile packets per data path while ``workers`` ranks sum."""

    packets: int = 1_000_000
    dataplanes: tuple[str, ...] = ("python", "native")
    workers: int = 4
    udp_fraction: float = 0.1
    elements: int = 4096  #: int32 elements per honest allreduce
    k: int = 256
    seed: int = 0
    timeout: float = 120.0  #: seconds an honest allreduce may take before the run fails


@dataclass
class Forged:
    """A hostile packet, its sender, and the drop reason the switch must count for it."""

    data: bytes
    src: tuple[str, int]
    kind: str
    reason: DropReason


def expected_reason(data: bytes, admitted: bool, sizes: frozenset[int]) -> DropReason | None:
    """The drop reason of ``data`` from a sender that is (``admitted``) or is not a worker of
    the job, in DESIGN.md's order of checks; None if it could be accepted (never built here)."""
    if len(data) < PREAMBLE_BYTES:
        return DropReason.MALFORMED
    msg_type, size = data[0] >> protocol.MSG_TYPE_SHIFT, data[0] & protocol.SIZE_MASK
    if size not in sizes:
        return DropReason.BAD_SIZE
    if len(data) != packet_bytes(SIZE_TO_K[size]):
        return DropReason.MALFORMED
    if msg_type == MsgType.RESET:
        return DropReason.RESET_NOT_FROM_CONTROLLER
    if msg_type != MsgType.UPDATE:
        return DropReason.BAD_MSG_TYPE
    return None if admitted else DropReason.NOT_ADMITTED


class PacketForge:
    """Builds hostile packets against one job (its number, slots, k and workers' addresses)."""

    def __init__(self, seed: int, job: int, pool_base: int, pool_size: int, k: int,
                 workers: list[tuple[str, int]], unadmitted: list[tuple[str, int]], sizes: frozenset[int]) -> None:
        self.rng = random.Random(seed)
        self.job, self.pool_base, self.pool_size, self.k = job, pool_base, pool_size, k
        self.workers, self.unadmitted, self.sizes = workers, unadmitted, sizes
        self.kinds = list(KINDS)
        self.weights = [KINDS[k] for k in self.kinds]
        self.tsi = 0

    def _packet(self, msg_type: int, size: int, job: int, slot: int, set_bit: int, k: int | None = None) -> bytes:
        self.tsi = (self.tsi + 1) & 0xFFFFFFFF
        header = protocol.encode_header(msg_type, size, job, self.tsi, slot, set_bit,
                                        self.rng.randrange(-126, 127))
        payload = self.rng.randbytes(protocol.ELEMENT_BYTES * (SIZE_TO_K[size] if k is None else k))
        return header + payload

    def _valid_update(self) -> bytes:
        """An UPDATE a worker of the job could send: its job, a slot of its range, its k."""
        return self._packet(MsgType.UPDATE, protocol.k_to_size(self.k), self.job,
                            self.pool_base + self.rng.randrange(self.pool_size), self.rng.randrange(2))

    def _with_byte0(self, packet: bytes, msg_type: int, size: int) -> bytes:
        return bytes((msg_type << protocol.MSG_TYPE_SHIFT | (packet[0] & 0x08) | size,)) + packet[1:]

    def build(self, kind: str | None = None) -> Forged:
        """One hostile packet of ``kind`` (default: drawn by ``KINDS``' weights)."""
        rng = self.rng
        kind = kind or rng.choices(self.kinds, self.weights)[0]
        src = rng.choice(self.workers) if kind in FROM_WORKER else rng.choice(self.unadmitted)
        good_size = protocol.k_to_size(self.k)
        if kind == "random_bytes":
            data = rng.randbytes(rng.randrange(0, 2 * packet_bytes(self.k)))
        elif kind in ("truncated", "worker_malformed"):
            full = self._valid_update()
            data = full[:rng.randrange(0, len(full))]
        elif kind == "wrong_length":  # the header claims one k, the payload has another length
            k = SIZE_TO_K[rng.choice(sorted(self.sizes))]
            other = rng.choice([n for n in range(0, 2 * k + 1, 4) if n != protocol.ELEMENT_BYTES * k])
            data = self._packet(MsgType.UPDATE, protocol.k_to_size(k), self.job, self.pool_base, 0, 0)
            data = data + rng.randbytes(other)
        elif kind == "bad_size":
            size = rng.choice([s for s in SIZE_TO_K if s not in self.sizes])
            data = self._packet(MsgType.UPDATE, size, self.job, self.pool_base, 0)
        elif kind in ("bad_msg_type", "worker_bad_type"):
            msg_type = rng.choice([t for t in range(16) if t not in (MsgType.UPDATE, MsgType.RESET)])
            data = self._with_byte0(self._valid_update(), msg_type, good_size)
        elif kind in ("reset_forged", "worker_reset"):
            data = self._packet(MsgType.RESET, rng.choice(sorted(self.sizes)), self.job,
                                self.pool_base + rng.randrange(self.pool_size), rng.randrange(2))
        elif kind == "spoofed_job":
            data = self._packet(MsgType.UPDATE, good_size, rng.randrange(256), self.pool_base, rng.randrange(2))
        elif kind == "spoofed_slot":
            data = self._packet(MsgType.UPDATE, good_size, self.job, rng.randrange(1 << 14), rng.randrange(2))
        elif kind == "spoofed_set_bit":  # every bit of pool_index, the unused one of byte 0 too
            data = bytearray(self._valid_update())
            data[6] ^= rng.choice((0x80, 0x40, 0xC0))
            data[0] |= 0x08 * rng.randrange(2)
            data = bytes(data)
        elif kind == "spoofed_sender":  # a worker's IP with another port: claims to be that worker
            ip = rng.choice(self.workers)[0]
            src = (ip, rng.choice([p for p in range(40000, 40064) if (ip, p) not in self.workers]))
            data = self._valid_update()
        elif kind == "replayed":  # an UPDATE exactly as the job's workers send it, from elsewhere
            data = self._valid_update()
        else:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
        reason = expected_reason(data, kind in FROM_WORKER, self.sizes)
        assert reason is not None, (kind, data[:10])  # never an acceptable packet
        return Forged(data, src, kind, reason)


# ----------------------------------------------------------------------------- honest ranks
def _honest_array(seed: int, rank: int, call: int, elements: int) -> np.ndarray:
    rng = np.random.default_rng([seed, rank, call])
    return rng.integers(-2**31, 2**31 - 1, elements, dtype=np.int64, endpoint=True).astype(np.int32)


def _honest_rank(endpoint: str, job: str, rank: int, n: int, cfg: FuzzConfig, dataplane: str,
                 stop: Any, results: Any, leave: Any) -> None:
    """One honest rank: sums until rank 0 sees ``stop``, checking every sum exactly.

    The last element of every call is a lane of flags: rank 0 puts 1 there once ``stop`` is
    set, so that every rank learns from the same sum to end after the same call."""
    from switchml import Worker

    calls = wrong = 0
    error = None
    try:
        with Worker(endpoint, job, rank, n, k=cfg.k, dataplane=dataplane, timeout=cfg.timeout) as w:
            results.put({"rank": rank, "ready": True})
            while True:
                arrays = [_honest_array(cfg.seed, r, calls, cfg.elements) for r in range(n)]
                x = np.append(arrays[rank], np.int32(rank == 0 and stop.is_set()))
                got = w.allreduce(x, timeout=cfg.timeout)
                expected = np.sum(arrays, axis=0, dtype=np.int64).astype(np.int32)  # int32 sums wrap
                calls += 1
                if not np.array_equal(got[:-1], expected):
                    wrong += 1
                if got[-1]:
                    break
            results.put({"rank": rank, "calls": calls, "wrong": wrong, "error": None})
            leave.wait(60)
    except Exception as exc:  # noqa: BLE001 - reported as the run's failure
        error = f"{type(exc).__name__}: {exc}"
        results.put({"rank": rank, "calls": calls, "wrong": wrong, "error": error})


# ------------------------------------------------------------------------------- the run
def _rx_queue_and_drops(port: int) -> tuple[int, int]:
    """Bytes queued on, and datagrams the kernel dropped at, the UDP socket bound to ``port`` here."""
    want = f":{port:04X}"
    with open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(want):
                return int(cols[4].split(":")[1], 16), int(cols[-1])
    return 0, 0


def _counters(switch: SoftwareSwitch) -> dict[str, int]:
    drops = switch.read_counter(DROPS_COUNTER)
    packets = switch.read_counter(PACKETS_COUNTER)
    out = {f"drop_{r.name.lower()}": int(drops[r]) for r in DropReason}
    out.update({c.name.lower(): int(packets[c]) for c in PacketCounter})
    out["retransmissions_answered"] = int(sum(switch.read_counter(RETRANSMISSIONS_COUNTER)))
    return out


def fuzz_dataplane(cfg: FuzzConfig, dataplane: str) -> dict[str, Any]:
    """One data path: start a switch, an honest job and the fuzzer; return the figures and checks."""
    switch = SoftwareSwitch(pool_size=1024, sizes=SWITCH_SIZES, seed=cfg.seed, dataplane=dataplane)
    server = SwitchServer(switch, "127.0.0.1", 0).start()
    controller = Controller(InProcessTarget(switch), ControllerOptions(
        bind="tcp://127.0.0.1:0", switch_address=server.address, pool_size=1024, k=cfg.k,
        window=16, heartbeat_timeout=max(10.0, cfg.timeout))).start()
    ctx = mp.get_context("spawn")
    stop, leave, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_honest_rank, args=(controller.endpoint, "honest", r, cfg.workers, cfg, dataplane,
                                                    stop, results, leave), daemon=True) for r in range(cfg.workers)]
    sockets: list[socket.socket] = []
    try:
        for p in procs:
            p.start()
        ready = 0
        while ready < cfg.workers:
            msg = results.get(timeout=cfg.timeout)
            if msg.get("error"):
                raise RuntimeError(f"honest rank {msg['rank']} failed to start: {msg['error']}")
            ready += bool(msg.get("ready"))
        entries = switch.admission_entries()
        workers = [a for a, e in entries.items() if e is not None]
        (entry,) = {(e.job, e.pool_base, e.pool_size) for e in entries.values() if e is not None}
        for _ in range(4):  # the UDP senders: unadmitted sockets on this host
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        unadmitted = [s.getsockname() for s in sockets] + [("127.0.0.2", 5000), ("10.9.8.7", 48864),
                                                          ("127.0.0.1", 1), ("192.0.2.1", 65535)]
        forge = PacketForge(cfg.seed, entry[0], entry[1], entry[2], cfg.k, workers, unadmitted, switch.sizes)
        by_socket = {s.getsockname(): s for s in sockets}
        port = server.address[1]
        before, (_, kernel_before) = _counters(switch), _rx_queue_and_drops(port)
        expected: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        crashes, replies, sent_udp, sent_inproc, busy = 0, 0, 0, 0, 0.0
        udp_rng = random.Random(cfg.seed + 1)
        done = 0
        while done < cfg.packets:
            chunk = [forge.build() for _ in range(min(_CHUNK, cfg.packets - done))]
            plan = [(f, f.kind not in FROM_WORKER and udp_rng.random() < cfg.udp_fraction) for f in chunk]
            start = time.perf_counter()
            for forged, by_udp in plan:
                if by_udp:
                    sock = by_socket.get(forged.src) or sockets[sent_udp % len(sockets)]
                    if sock.getsockname() != forged.src:  # an address no socket here has: send from one that is
                        forged = Forged(forged.data, sock.getsockname(), forged.kind, forged.reason)
                    if sent_udp % 256 == 0:
                        while _rx_queue_and_drops(port)[0] > _RX_QUEUE_LIMIT:
                            time.sleep(0.001)
                    sock.sendto(forged.data, ("127.0.0.1", port))
                    sent_udp += 1
                else:
                    try:
                        out = switch.process(forged.data, forged.src)
                    except Exception:  # noqa: BLE001 - counted: a crash of the data plane
                        crashes += 1
                        log.exception("the %s data plane raised on a %s packet", dataplane, forged.kind)
                        continue
                    replies += len(out)
                    sent_inproc += 1
                expected[f"drop_{forged.reason.name.lower()}"] += 1
                kinds[forged.kind] += 1
            busy += time.perf_counter() - start
            done += len(chunk)
        stop.set()
        finals = []
        while len(finals) < cfg.workers:
            msg = results.get(timeout=cfg.timeout + 30)
            if not msg.get("ready"):
                finals.append(msg)
        after, (_, kernel_after) = _counters(switch), _rx_queue_and_drops(port)
        server_alive = all(t.is_alive() for t in server._threads)
        leave.set()
    finally:
        stop.set()
        leave.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        for s in sockets:
            s.close()
        controller.stop()
        server.stop()
    delta = {name: after[name] - before[name] for name in after}
    honest_drops = {"drop_retransmission_incomplete"}
    mismatched = {name: {"counted": delta[name], "forged": expected.get(name, 0)}
                  for name in delta if name.startswith("drop_") and name not in honest_drops
                  and delta[name] != expected.get(name, 0)}
    outcomes = (sum(v for n, v in delta.items() if n.startswith("drop_")) + delta["aggregated"] + delta["resets"]
                + delta["retransmissions_answered"])
    errors = [f"rank {m['rank']}: {m['error']}" for m in finals if m.get("error")]
    doc = {
        "dataplane": switch.dataplane, "packets": cfg.packets, "in_process": sent_inproc, "udp": sent_udp,
        "packets_per_s": cfg.packets / busy if busy else None, "seconds_sending": busy, "kinds": dict(kinds),
        "forged_by_reason": dict(expected), "counter_deltas": delta, "kernel_drops": kernel_after - kernel_before,
        "honest": {"calls": min((m.get("calls", 0) for m in finals), default=0),
                   "wrong_results": sum(m.get("wrong", 0) for m in finals), "errors": errors},
        "checks": {
            "crashes": crashes + (not server_alive), "wrong_results": sum(m.get("wrong", 0) for m in finals),
            "honest_errors": len(errors), "replies_to_forged": replies, "reasons_mismatched": mismatched,
            "received_equals_outcomes": delta["received"] == outcomes,
        },
    }
    doc["ok"] = passed(doc)
    return doc


def passed(doc: dict[str, Any]) -> bool:
    """Whether one data path's run met every check."""
    c = doc["checks"]
    return (c["crashes"] == 0 and c["wrong_results"] == 0 and c["honest_errors"] == 0 and c["replies_to_forged"] == 0
            and not c["reasons_mismatched"] and c["received_equals_outcomes"] and doc["kernel_drops"] == 0
            and doc["honest"]["calls"] > 0)


def run(cfg: FuzzConfig, command: str, note: str | None = None) -> dict[str, Any]:
    """Every data path of ``cfg``; the document ``save`` writes."""
    runs = [fuzz_dataplane(cfg, dp) for dp in cfg.dataplanes]
    machine = machine_info()
    if note:
        machine["note"] = note
    return {"benchmark": "fuzz", "command": command, "config": asdict(cfg), "machine": machine, "runs": runs,
            "ok": all(r["ok"] for r in runs)}


def format_report(doc: dict[str, Any]) -> str:
    """The run as text: per data path, packets/s and the checks, then the drop counters."""
    lines = []
    for r in doc["runs"]:
        c = r["checks"]
        lines.append(f"{r['dataplane']}: {r['packets']:,} hostile packets ({r['in_process']:,} in-process, "
                     f"{r['udp']:,} UDP) at {r['packets_per_s']:,.0f} packets/s; honest job {r['honest']['calls']} "
                     f"exact sums per rank; crashes {c['crashes']}, wrong results {c['wrong_results']}, honest "
                     f"errors {c['honest_errors']}, replies to forged packets {c['replies_to_forged']}, kernel drops "
                     f"{r['kernel_drops']}, reasons mismatched {c['reasons_mismatched'] or 'none'}, received = "
                     f"sum of outcomes: {c['received_equals_outcomes']} -> {'PASS' if r['ok'] else 'FAIL'}")
        lines += [f"    {name}: {value:,}" for name, value in r["counter_deltas"].items() if value]
    return "\n".join(lines)


__all__ = ["FuzzConfig", "KINDS", "PacketForge", "expected_reason", "format_report", "passed", "run"]
