"""Bytes on the wire: the lower bounds every benchmark compares its times against.

A SwitchML worker sends its tensor once and receives the sum once, in packets of k
int32 elements; the first window carries exponents only (DESIGN.md, "Data flow"), so a
float32 tensor of E elements costs ``ceil(E / k) + W`` packets each way. A ring allreduce
(Gloo, NCCL) sends and receives ``2 (n-1)/n`` of the tensor per worker, over TCP.

Overheads per packet (bytes):

==========================  ===========================================================
SwitchML header             10 (8 B header + 2 B exponents, ``switchml.protocol``)
UDP / IPv4                  8 / 20 (IPv4 again on every further IP fragment)
TCP (Gloo)                  20 + 12 of timestamp option (Linux default), so MSS = MTU - 52
Ethernet, as tc counts it   14 (header; what htb/tbf shaping in Mininet charges)
Ethernet, on a real wire    38 (14 header + 4 FCS + 8 preamble + 12 inter-frame gap)
==========================  ===========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from switchml.protocol import PREAMBLE_BYTES, SIZE_TO_K

UDP_IP_BYTES = 28  #: UDP (8) + IPv4 (20)
IP_BYTES = 20
TCP_IP_BYTES = 52  #: IPv4 (20) + TCP (20) + timestamps option (12)
ETHERNET_TC_BYTES = 14  #: what Linux traffic control charges per frame (the Ethernet header)
ETHERNET_WIRE_BYTES = 38  #: header, FCS, preamble and inter-frame gap of a real Ethernet link


def switchml_packet_bytes(k: int) -> int:
    """UDP payload of one SwitchML packet of ``k`` elements."""
    return PREAMBLE_BYTES + 4 * k


def ip_frames(udp_payload: int, mtu: int) -> list[int]:
    """IP packet lengths of one UDP datagram after fragmentation to ``mtu`` (IPv4, no options)."""
    total = udp_payload + 8  # the UDP header rides in the first fragment
    if total + IP_BYTES <= mtu:
        return [total + IP_BYTES]
    per_fragment = (mtu - IP_BYTES) // 8 * 8  # fragment offsets count 8-byte units
    frames = []
    while total > 0:
        chunk = min(per_fragment, total)
        frames.append(chunk + IP_BYTES)
        total -= chunk
    return frames


def largest_k(mtu: int, allowed: tuple[int, ...] = tuple(sorted(SIZE_TO_K.values()))) -> int:
    """The largest packet size (elements) whose datagram fits ``mtu`` unfragmented."""
    fitting = [k for k in allowed if switchml_packet_bytes(k) + UDP_IP_BYTES <= mtu]
    return max(fitting) if fitting else min(allowed)


@dataclass(frozen=True)
class SwitchMLWire:
    """Wire cost of one SwitchML allreduce, per worker and per direction."""

    elements: int
    k: int
    window: int
    packets: int  #: datagrams sent (= received) per worker
    frame_bytes_per_packet: int  #: bytes the link carries per datagram, fragments and L2 included
    wire_bytes: int  #: per worker, one direction

    @property
    def efficiency(self) -> float:
        """Tensor bytes / wire bytes."""
        return 4 * self.elements / self.wire_bytes if self.wire_bytes else 1.0


def switchml_wire(size_bytes: int, k: int, window: int, mtu: int = 1500, l2_bytes: int = ETHERNET_WIRE_BYTES,
                  dtype: str = "float32") -> SwitchMLWire:
    """Bytes per worker and direction for an allreduce of ``size_bytes`` of float32 (or int32).

    float32 adds one window of exponent-only packets (same size as the others: their
    payload is zeros); int32 does not. The window is ``min(window, blocks)``, as in the worker.
    """
    elements = size_bytes // 4
    blocks = math.ceil(elements / k) if elements else 0
    w = min(window, blocks)
    packets = blocks + (w if dtype == "float32" else 0)
    frames = ip_frames(switchml_packet_bytes(k), mtu)
    per_packet = sum(frames) + l2_bytes * len(frames)
    return SwitchMLWire(elements, k, w, packets, per_packet, packets * per_packet)


def tcp_wire_bytes(payload_bytes: float, mtu: int = 1500, l2_bytes: int = ETHERNET_WIRE_BYTES) -> float:
    """Bytes a TCP stream of ``payload_bytes`` puts on the link (full-MSS segments)."""
    mss = mtu - TCP_IP_BYTES
    return payload_bytes * (mss + TCP_IP_BYTES + l2_bytes) / mss


def ring_bytes(size_bytes: float, n: int) -> float:
    """Tensor bytes a ring allreduce sends (and receives) per worker: 2 (n-1)/n of the tensor."""
    return 2.0 * (n - 1) / n * size_bytes if n > 1 else 0.0


def switchml_bound_s(size_bytes: int, k: int, window: int, bw_bits: float, mtu: int = 1500,
                     l2_bytes: int = ETHERNET_WIRE_BYTES) -> float:
    """Lower bound of a SwitchML allreduce on links of ``bw_bits`` bit/s: S_wire / B."""
    return switchml_wire(size_bytes, k, window, mtu, l2_bytes).wire_bytes * 8 / bw_bits


def ring_bound_s(size_bytes: int, n: int, bw_bits: float, mtu: int = 1500, l2_bytes: int = ETHERNET_WIRE_BYTES) -> float:
    """Lower bound of a ring allreduce over TCP: 2 (n-1)/n * S_wire / B."""
    return tcp_wire_bytes(ring_bytes(size_bytes, n), mtu, l2_bytes) * 8 / bw_bits
