"""The switch pipeline's contract: table, action, parameter and counter names.

These names are shared by ``p4/*.p4``, their P4Info files, the software switch and the
controller's targets (``tests/test_p4_contract.py`` checks the P4 side against this file).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from switchml.protocol import MAX_JOBS, MAX_SLOTS, MAX_WORKERS, SIZE_TO_K

#: Elements per packet compiled into the P4 programs (p4/include/constants.p4's SWITCHML_K;
#: tests/test_p4_contract.py checks they agree). DESIGN.md, Targets.
P4_K = 64


def supported_k(sizes: Iterable[int]) -> tuple[int, ...]:
    """The elements per packet a target takes, largest first, from the size enums it accepts."""
    return tuple(sorted({SIZE_TO_K[s] for s in sizes}, reverse=True))


#: What the P4 programs take, and what the software switch takes by default (all of wire format v1).
P4_SUPPORTED_K = (P4_K,)
SOFTWARE_SWITCH_K = supported_k(SIZE_TO_K)

# Admission: (ipv4 src, udp src port) -> set_worker(...) | set_controller(), default drop.
ADMISSION_TABLE = "SwitchIngress.admission"
ADMISSION_KEYS = ("hdr.ipv4.src_addr", "hdr.udp.src_port")
SET_WORKER_ACTION = "SwitchIngress.set_worker"
SET_WORKER_PARAMS = ("job", "worker_id", "num_workers", "mgid", "pool_base", "pool_size")
SET_CONTROLLER_ACTION = "SwitchIngress.set_controller"

# Egress rewrite: (multicast group, replica id) -> the worker's MAC, IP, UDP port.
EGRESS_REWRITE_TABLE = "SwitchEgress.egress_rewrite"
EGRESS_REWRITE_KEYS = ("standard_metadata.mcast_grp", "standard_metadata.egress_rid")
SET_DESTINATION_ACTION = "SwitchEgress.set_destination"
SET_DESTINATION_PARAMS = ("mac", "ip", "udp_port")

# Emulated loss: port -> set_drop_probability(threshold of 32768). The P4 programs drop
# packets arriving on the port; the software switch also drops packets leaving on it, so
# that lost RESULTs (and the retransmissions they cause) are emulated too.
LOSS_TABLE = "SwitchIngress.loss"
LOSS_KEYS = ("standard_metadata.ingress_port",)
SET_DROP_PROBABILITY_ACTION = "SwitchIngress.set_drop_probability"
SET_DROP_PROBABILITY_PARAMS = ("threshold",)
DROP_PROBABILITY_SCALE = 32768  #: a drop probability p is programmed as round(p * 32768)


class DropProbabilityError(ValueError, argparse.ArgumentTypeError):
    """A drop probability outside 0..1 (an ``ArgumentTypeError`` too, so that a command line shows it)."""


def check_drop_probability(probability: float) -> float:
    """``probability`` if it is a fraction in 0..1, else ``DropProbabilityError`` (the one check of it)."""
    if not 0.0 <= probability <= 1.0:  # NaN fails too
        raise DropProbabilityError(f"drop probability={probability}; expected a fraction in 0..1 (0.01 = 1%)")
    return probability


def parse_drop_probability(text: str) -> float:
    """A drop probability from a command line: ``0.01`` or ``1%``; checked by ``check_drop_probability``."""
    stripped = text.strip()
    try:
        value = float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
        return check_drop_probability(value)
    except ValueError:
        raise DropProbabilityError(f"{text} is not a fraction in 0..1 (0.01 = 1%)") from None


def drop_threshold(probability: float) -> int:
    """A drop probability (0..1) as the loss table's threshold out of ``DROP_PROBABILITY_SCALE``."""
    return round(check_drop_probability(probability) * DROP_PROBABILITY_SCALE)

# Leaf role (docs/hierarchy.md): in p4/switchml_v1model.p4 built with -DSWITCHML_LEAF_ROLE, whose
# P4Info (p4/switchml_v1model_leaf.p4info.txtpb, switchml.p4info.with_leaf_role) a software switch
# serving P4Runtime as a leaf serves too: job -> set_upstream(...). A leaf sends each slot its rack
# completed to the spine at (ip, udp_port) as one UPDATE, from its address as the spine admits it
# (src_ip, src_udp_port; the software switch sends from its one socket), out of ``port`` to the next
# hop's ``mac``, and multicasts the spine's RESULT, which it takes only from that address, to the
# rack's group ``mgid``. A target whose pipeline lacks this table has no leaf role: the controller
# refuses a tree with it (``switchml.tree``).
UPSTREAM_TABLE = "SwitchIngress.upstream"
UPSTREAM_KEYS = ("hdr.switchml.job_number",)
SET_UPSTREAM_ACTION = "SwitchIngress.set_upstream"
SET_UPSTREAM_PARAMS = ("ip", "udp_port", "port", "mgid", "pool_base", "pool_size", "mac", "src_ip", "src_udp_port")
HAS_RESULT_REGISTER = "SwitchIngress.bookkeeping.has_result"  #: the leaf role's bit per set and slot
#: The preprocessor macro that builds p4/switchml_v1model.p4 with the leaf role (p4c -D...).
LEAF_ROLE_DEFINE = "SWITCHML_LEAF_ROLE"

# Plain forwarding of traffic that is not switchml's.
FORWARD_TABLE = "SwitchIngress.forward"
FORWARD_KEYS = ("hdr.ipv4.dst_addr",)
SET_EGRESS_ACTION = "SwitchIngress.set_egress"
SET_EGRESS_PARAMS = ("port", "mac")

# Counters (P4 packet counters; P4Runtime reads them, BMv2 cannot read registers).
RESULTS_COUNTER = "SwitchIngress.results_multicast"  #: indexed by slot
RETRANSMISSIONS_COUNTER = "SwitchIngress.retransmissions_answered"  #: indexed by slot
DROPS_COUNTER = "SwitchIngress.drops"  #: indexed by DropReason
PACKETS_COUNTER = "SwitchIngress.packets"  #: indexed by PacketCounter


class DropReason(IntEnum):
    """Index into the ``drops`` counter: why a switchml packet was dropped."""

    MALFORMED = 0  #: too short, or length does not match the size enum
    BAD_SIZE = 1  #: a size enum the target does not take
    BAD_MSG_TYPE = 2  #: msg_type not UPDATE or RESET
    NOT_ADMITTED = 3  #: sender has no admission entry
    SLOT_OUT_OF_RANGE = 4  #: slot outside the sender's job pool range
    JOB_MISMATCH = 5  #: header job_number differs from the sender's admitted job
    RESET_NOT_FROM_CONTROLLER = 6  #: RESET from an address not admitted as controller
    RETRANSMISSION_INCOMPLETE = 7  #: a retransmission to a slot that is not complete yet
    EMULATED_LOSS = 8  #: dropped by the per-port drop probability
    SIZE_MISMATCH = 9  #: k differs from the slot's current contributions (software switch only)


class PacketCounter(IntEnum):
    """Index into the ``packets`` counter."""

    RECEIVED = 0  #: switchml packets seen (UDP dst port matched)
    AGGREGATED = 1  #: new contributions absorbed into a slot
    RESETS = 2  #: RESET packets applied


#: A leaf's own counter (in the leaf role's P4Info only).
LEAF_COUNTER = "SwitchIngress.leaf"


class LeafCounter(IntEnum):
    """Index into the ``leaf`` counter: what a leaf did with a slot its rack completed."""

    SENT_UPSTREAM = 0  #: rack sums sent to the spine when the rack completed a slot
    RESENT_UPSTREAM = 1  #: rack sums sent again: a worker retransmitted before the spine's RESULT came
    RESULTS_FROM_UPSTREAM = 2  #: the spine's RESULTs taken and multicast to the rack
    IGNORED_FROM_UPSTREAM = 3  #: the spine's RESULTs for a set that held no rack sum waiting for one (a duplicate)


NUM_DROP_REASONS = len(DropReason)
NUM_PACKET_COUNTERS = len(PacketCounter)
NUM_LEAF_COUNTERS = len(LeafCounter)


@dataclass(frozen=True)
class WorkerEntry:
    """An admission entry: the sender (ip, udp port) is worker ``worker_id`` of ``job``."""

    ip: str
    udp_port: int
    job: int  #: job number, 0..255
    worker_id: int  #: bit in the slot bitmaps, 0..31
    num_workers: int  #: n: the count at which a slot completes
    mgid: int  #: multicast group of the job
    pool_base: int  #: first slot of the job's range
    pool_size: int  #: number of slots in the range

    def __post_init__(self) -> None:
        # The P4 programs hold num_workers in 6 bits and complete a slot when its count wraps
        # to 0 mod n: an n of 0 or above the bitmap width would never complete a slot (the
        # job would hang on every target), so no target is ever handed such an entry.
        checks = (("num_workers", self.num_workers, 1, MAX_WORKERS), ("worker_id", self.worker_id, 0, self.num_workers - 1),
                  ("job", self.job, 0, MAX_JOBS - 1), ("pool_base", self.pool_base, 0, MAX_SLOTS - 1),
                  ("pool_size", self.pool_size, 1, MAX_SLOTS - self.pool_base))
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"admission entry for {self.ip}:{self.udp_port}: {name}={value} out of range {low}..{high}")


@dataclass(frozen=True)
class Replica:
    """One copy of a job's multicast: egress port, replica id and the rewrite it gets."""

    port: int  #: switch egress port of the worker
    rid: int  #: replica id (the worker id)
    mac: str
    ip: str
    udp_port: int


@dataclass(frozen=True)
class UpstreamEntry:
    """A leaf's upstream entry: where job ``job``'s completed slots go, and whose RESULTs it takes.

    The spine at (``ip``, ``udp_port``) is reached through the leaf's port ``port`` (its loss
    entry applies); the spine's RESULTs, accepted only from that address and only for slots
    ``pool_base``..``pool_base + pool_size - 1``, go to the rack's multicast group ``mgid``.
    A P4 leaf also needs the next hop's ``mac`` and its own address as the spine admits it
    (``src_ip``, ``src_udp_port``), which it writes into each upstream packet; the software
    switch sends from its one socket and ignores the three.
    """

    job: int  #: job number, 0..255 (the same at the leaf and at the spine)
    ip: str  #: the spine's data address
    udp_port: int
    port: int  #: the leaf's port towards the spine (loss table)
    mgid: int  #: the rack's multicast group
    pool_base: int  #: first slot of the job's range (the same at the leaf and at the spine)
    pool_size: int
    mac: str = "00:00:00:00:00:00"  #: the next hop's MAC towards the spine (P4 leaves)
    src_ip: str = "0.0.0.0"  #: the leaf's address as the spine admits it (P4 leaves)
    src_udp_port: int = 0

    def __post_init__(self) -> None:
        checks = (("job", self.job, 0, MAX_JOBS - 1), ("udp_port", self.udp_port, 1, 65535),
                  ("src_udp_port", self.src_udp_port, 0, 65535),
                  ("pool_base", self.pool_base, 0, MAX_SLOTS - 1), ("pool_size", self.pool_size, 1, MAX_SLOTS - self.pool_base))
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"upstream entry for job {self.job} (spine {self.ip}:{self.udp_port}): {name}={value} "
                                 f"out of range {low}..{high}")
