"""A discrete-event simulation of one SwitchML allreduce in one rack, packet by packet.

n workers, each on its own full-duplex link to the switch (rate B, propagation d each
way); the switch has a pipeline latency L and a FIFO per egress port; a worker needs h
seconds from a result to its next packet. Each worker streams ``packets`` packets through
``window`` slots: packet i uses slot ``i mod W`` and is sent when the result of packet
``i - W`` came back (the first W at time 0). Every packet on every link is lost with
probability p, independently. A worker resends a packet whose result has not come back
after its retransmission timeout, which doubles on every resend of the same packet up to
``rto_max`` (as ``switchml.worker`` does).

The switch follows DESIGN.md: a slot completes when it has one contribution from every
worker and then multicasts the result; a duplicate of an incomplete slot's contribution is
dropped; a resend for a completed slot (the worker lost the result) is answered by unicast.

With p = 0 and identical workers the simulation reproduces :func:`lossless_time` exactly,
which the tests check; with loss it shows what no closed form captures well: a loss stalls
one slot for a timeout, and the allreduce waits for its slowest slot.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

_UPDATE, _RESULT, _TIMER = 0, 1, 2


@dataclass(frozen=True)
class LinkParams:
    """Timing of one rack: seconds per packet on a link and the fixed latencies."""

    ser: float  #: serialization time of one packet on a worker link (wire bytes * 8 / B)
    prop: float = 0.5e-6  #: one-way propagation per link
    switch_latency: float = 1e-6  #: the switch pipeline, per pass
    host: float = 3e-6  #: a worker's turnaround from a result to the next packet
    rto: float = 1e-3  #: first retransmission timeout
    rto_max: float = 0.2  #: cap of the doubling timeout

    @property
    def turnaround(self) -> float:
        """c: from a packet's uplink departure to its successor in the slot being ready, minus nothing else."""
        return 2 * self.prop + self.switch_latency + self.ser + self.host


def lossless_time(packets: int, window: int, lp: LinkParams) -> float:
    """Exact finish time of a lossless allreduce (every worker alike), matching :func:`simulate`.

    Packet i leaves the uplink at ``(i+1) ser + floor(i/W) * max(0, c + ser - W ser)``
    (c = the turnaround): a window of at least ``(c + ser) / ser`` packets keeps the link
    busy, a smaller one stalls for the difference once per round. The last result arrives
    ``2 d + L + ser`` later.
    """
    if packets <= 0:
        return 0.0
    w = min(window, packets)
    c = lp.turnaround
    i = packets - 1
    depart = (i + 1) * lp.ser + (i // w) * max(0.0, c + lp.ser - w * lp.ser)
    return depart + 2 * lp.prop + lp.switch_latency + lp.ser


def window_for_line_rate(lp: LinkParams) -> int:
    """The smallest window that keeps a worker's link busy: the bandwidth-delay product in packets."""
    return max(1, math.ceil((lp.turnaround + lp.ser) / lp.ser - 1e-9))


@dataclass
class SimResult:
    """What one simulated allreduce did."""

    time: float  #: when the last worker had its last result
    retransmissions: int
    lost: int
    packets_sent: int
    events: int


def simulate(n: int, packets: int, window: int, lp: LinkParams, loss: float = 0.0, seed: int = 0,
             max_events: int = 50_000_000) -> SimResult:
    """Simulate one allreduce of ``packets`` packets per worker; see the module docstring."""
    if n < 1 or packets < 0 or window < 1:
        raise ValueError(f"n={n}, packets={packets}, window={window}: expected n >= 1, packets >= 0, window >= 1")
    if packets == 0:
        return SimResult(0.0, 0, 0, 0, 0)
    w = min(window, packets)
    rng = random.Random(seed)
    rand = rng.random
    ser, prop, lat, host = lp.ser, lp.prop, lp.switch_latency, lp.host
    up_free = [0.0] * n
    down_free = [0.0] * n
    outstanding = [[s for s in range(w)] for _ in range(n)]  # per worker and slot: packet awaiting its result
    rto = [[lp.rto] * w for _ in range(n)]
    generation = [[0] * w for _ in range(n)]  # bumps on every (re)send: stale timers are ignored
    completed = [-1] * w  # per slot: the last packet index whose sum is complete
    current = list(range(w))  # per slot: the packet index being aggregated
    seen: list[set[int]] = [set() for _ in range(w)]
    remaining = n * w  # slot streams still running
    heap: list[tuple[float, int, int, int, int, int]] = []
    # Timers of first transmissions expire in the order they were set (same timeout, sends in time
    # order), so they wait in a FIFO; only the doubled timers of resends need the heap.
    fresh_timers: deque[tuple[float, int, int, int]] = deque()
    seq = 0
    stats = {"retx": 0, "lost": 0, "sent": 0}
    finish = 0.0

    def send_up(t: float, worker: int, i: int, resend: bool = False) -> None:
        nonlocal seq
        depart = max(t, up_free[worker]) + ser
        up_free[worker] = depart
        stats["sent"] += 1
        s = i % w
        gen = generation[worker][s] = generation[worker][s] + 1
        if resend:
            seq += 1
            heapq.heappush(heap, (t + rto[worker][s], seq, _TIMER, worker, i, gen))
        else:
            fresh_timers.append((t + lp.rto, worker, i, gen))
        if loss and rand() < loss:
            stats["lost"] += 1
            return
        seq += 1
        heapq.heappush(heap, (depart + prop, seq, _UPDATE, worker, i, 0))

    def send_down(t: float, worker: int, i: int) -> None:
        nonlocal seq
        depart = max(t, down_free[worker]) + ser
        down_free[worker] = depart
        if loss and rand() < loss:
            stats["lost"] += 1
            return
        seq += 1
        heapq.heappush(heap, (depart + prop, seq, _RESULT, worker, i, 0))

    for worker in range(n):
        for s in range(w):
            send_up(0.0, worker, s)
    events = 0
    while remaining:
        if fresh_timers and (not heap or fresh_timers[0][0] <= heap[0][0]):
            t, worker, i, gen = fresh_timers.popleft()
            if outstanding[worker][i % w] != i or generation[worker][i % w] != gen:
                continue  # its result came back in time
            kind = _TIMER
        elif heap:
            t, _, kind, worker, i, gen = heapq.heappop(heap)
        else:
            break
        events += 1
        if events > max_events:
            raise RuntimeError(f"simulation exceeded {max_events} events (n={n}, packets={packets}, loss={loss})")
        s = i % w
        if kind == _UPDATE:
            if i == current[s]:
                if worker not in seen[s]:
                    seen[s].add(worker)
                    if len(seen[s]) == n:
                        completed[s], current[s] = i, i + w
                        seen[s] = set()
                        for dst in range(n):
                            send_down(t + lat, dst, i)
            elif i == completed[s]:  # a resend of a completed slot: the worker lost the result
                send_down(t + lat, worker, i)
        elif kind == _RESULT:
            if outstanding[worker][s] == i:
                nxt = i + w
                rto[worker][s] = lp.rto
                if nxt < packets:
                    outstanding[worker][s] = nxt
                    send_up(t + host, worker, nxt)
                else:
                    outstanding[worker][s] = -1
                    remaining -= 1
                    finish = max(finish, t)
        else:  # timer
            if outstanding[worker][s] == i and generation[worker][s] == gen:
                rto[worker][s] = min(rto[worker][s] * 2, lp.rto_max)
                stats["retx"] += 1
                send_up(t + host, worker, i, resend=True)
    if remaining:
        raise RuntimeError("simulation ran out of events before every slot finished")
    return SimResult(finish, stats["retx"], stats["lost"], stats["sent"], events)
