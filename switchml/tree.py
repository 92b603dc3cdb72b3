"""Two-level aggregation: one job across racks of workers under leaf switches and a spine.

The controller (``switchml.controller``) programs a tree through the same target interface
(``switchml.targets.SwitchTarget``) as one switch; this module computes what goes where, as one
``SwitchProgram`` per switch. The leaf's per-packet algorithm is in ``emulation.dataplane``'s
docstring; docs/hierarchy.md has the design. For a job whose ranks have all registered:

1. Each rank is placed in a rack, i.e. under a leaf, by ``Tree.rack_of(rank, udp_address)``
   (default: the leaf whose ``hosts`` hold the rank's IP). Leaves with no rank of the job take
   no part in it.
2. The job gets one job number, one multicast group id and one slot range, the same on every
   switch of the tree (the controller owns them all and allocates from one pool), so a packet
   keeps its header from worker to leaf to spine and back, and a leaf's upstream UPDATE is a
   plain worker packet to the spine.
3. Each leaf with ranks: its rack's ranks in rank order are its workers 0..r-1 (n = r at the
   leaf); its multicast group holds them; its upstream entry names the spine's data address,
   the leaf's port towards it (for the loss table) and the MAC there (the leaf's own ``port_of`` and
   ``mac_of`` where it has them, a P4 leaf's port map; else the controller's), the leaf's own
   address as the spine admits it (``Leaf.spine_side``: a P4 leaf writes it into its upstream
   packets), the group and the range. A rack of one
   worker completes a slot at its first contribution and goes straight upstream.
4. The spine: each leaf with ranks is one worker of the job, numbered 0..R-1 in leaf order
   (n = R at the spine), admitted by the address it sends from (``Leaf.uplink``, by default its
   data address: the software switch has one socket); the spine's multicast group holds the
   leaves. The spine itself is a plain switch: it needs no leaf role.
5. Every switch's range is cleared by RESETs from the controller's one UDP socket, which
   every switch of the tree admits as the controller.
6. Each rank is answered with its global rank and the job's world size (the quantizer's n, so
   the exponent scale is the flat job's) and its leaf's address as the switch to send to.

Exponents: a leaf sends the max of its rack's, the spine takes the max of the leaves': the
global max, as in a flat job. Programs are applied spine first, so that the spine admits a leaf
before any rack can complete a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from switchml.errors import LeafRoleUnsupported
from switchml.net import Address
from switchml.pipeline import Replica, UpstreamEntry, WorkerEntry
from switchml.targets import SwitchTarget

#: The switch port (loss table, egress) of an address, and its MAC, as the controller knows them.
PortOf = Callable[[Address], int]
MacOf = Callable[[Address], str]


@dataclass(frozen=True)
class Leaf:
    """A leaf switch of the tree.

    Args:
        target: how the controller programs it; it must have the leaf role
            (``SwitchTarget.why_no_leaf_role()`` None: the software switch, in-process or over P4Runtime,
            or BMv2 running the v1model program built with ``-DSWITCHML_LEAF_ROLE``).
        address: its data address: where its rack's workers send.
        hosts: worker IPs in its rack, for the default ``Tree.rack_of``.
        uplink: its address as the spine sees it: the source of its upstream packets, which the
            spine admits as a worker and multicasts its RESULTs to. Default: ``address`` (one
            interface). A leaf host with a rack-side and a core-side interface sends from the
            core-side IP, with the port of ``address`` (the software switch has one socket).
        port_of, mac_of: this leaf's own port and MAC of an address (its rack's workers, for the
            multicast group; the spine's, for the upstream entry), where they are not the
            controller's ``port_of``/``mac_of``: a P4 leaf's come from its port map.
    """

    target: SwitchTarget
    address: Address
    hosts: Collection[str] = ()
    uplink: Address | None = None
    port_of: PortOf | None = None
    mac_of: MacOf | None = None

    @property
    def spine_side(self) -> Address:
        """The address the spine admits this leaf by."""
        return tuple(self.uplink if self.uplink is not None else self.address)


@dataclass(frozen=True)
class Tree:
    """Leaves under the controller's own switch, which is the spine.

    Args:
        leaves: the leaf switches, numbered by their order here.
        rack_of: (rank, the rank's UDP address) -> index into ``leaves``; default: the leaf whose
            ``hosts`` hold the rank's IP.
    """

    leaves: Sequence[Leaf]
    rack_of: Callable[[int, Address], int] | None = None

    def __post_init__(self) -> None:
        if not self.leaves:
            raise ValueError("tree: leaves=[]; expected at least one leaf switch")
        for kind, addresses in (("data", [tuple(leaf.address) for leaf in self.leaves]),
                                ("uplink", [leaf.spine_side for leaf in self.leaves])):
            if len(set(addresses)) != len(addresses):
                raise ValueError(f"tree: leaf {kind} addresses {addresses}; expected each leaf at its own address")

    def check(self, spine_address: Address, k: int) -> None:
        """Raise ``LeafRoleUnsupported`` for a leaf without the leaf role, ``ValueError`` for a leaf
        that does not take ``k`` or sits at the spine's address."""
        for i, leaf in enumerate(self.leaves):
            if (why := leaf.target.why_no_leaf_role()) is not None:
                raise LeafRoleUnsupported(f"tree leaf {i} at {leaf.address[0]}:{leaf.address[1]}: {why}")
            if k not in leaf.target.supported_k:
                raise ValueError(f"tree leaf {i}: k={k}; it takes {list(leaf.target.supported_k)} elements per packet")
            if tuple(spine_address) in (tuple(leaf.address), leaf.spine_side):
                raise ValueError(f"tree leaf {i}: address {leaf.address} (uplink {leaf.spine_side}) is the spine's; "
                                 "expected its own")

    def rack(self, rank: int, address: Address) -> int:
        """The leaf index of ``rank``; ``ValueError`` naming the rank when there is none."""
        if self.rack_of is not None:
            index = self.rack_of(rank, address)
            if not (isinstance(index, int) and 0 <= index < len(self.leaves)):
                raise ValueError(f"tree: rack_of(rank {rank}, {address[0]}:{address[1]}) = {index!r}; expected a "
                                 f"leaf index 0..{len(self.leaves) - 1}")
            return index
        for i, leaf in enumerate(self.leaves):
            if address[0] in leaf.hosts:
                return i
        raise ValueError(f"tree: rank {rank} at {address[0]}:{address[1]} is in no leaf's hosts; expected its IP in "
                         "one leaf's hosts (or a rack_of function)")


@dataclass(frozen=True)
class SwitchProgram:
    """What one switch holds for one job: its group, its admission entries, its upstream entry."""

    target: SwitchTarget
    address: Address  #: the switch's data address (the controller's RESETs go there)
    mgid: int
    replicas: tuple[Replica, ...]
    workers: tuple[WorkerEntry, ...]
    upstream: UpstreamEntry | None = None
    role: str = "switch"  #: "switch" (a flat job), "spine" or "leaf N", for messages

    def apply(self) -> None:
        """Program the switch: multicast group, admission entries, then the upstream entry."""
        self.target.set_multicast_group(self.mgid, self.replicas)
        for entry in self.workers:
            self.target.add_worker(entry)
        if self.upstream is not None:
            self.target.add_upstream(self.upstream)

    def remove(self) -> None:
        """Delete what ``apply`` programmed (the admission entries first: their packets stop)."""
        for entry in self.workers:
            self.target.remove_worker(entry.ip, entry.udp_port)
        if self.upstream is not None:
            self.target.remove_upstream(self.upstream.job)
        self.target.delete_multicast_group(self.mgid, self.replicas)


@dataclass(frozen=True)
class JobSlots:
    """What the controller allocated to a job: the same on every switch of a tree."""

    number: int
    mgid: int
    pool_base: int
    pool_size: int


@dataclass
class Plan:
    """A job's switch programs (applied in order) and the switch each rank sends to."""

    programs: list[SwitchProgram] = field(default_factory=list)
    switch_of: dict[int, Address] = field(default_factory=dict)


def flat_program(target: SwitchTarget, address: Address, slots: JobSlots, ranks: Mapping[int, Address],
                 port_of: PortOf, mac_of: MacOf, role: str = "switch") -> SwitchProgram:
    """One switch aggregating ``ranks`` (id -> UDP address), their ids in sorted order as worker ids 0..n-1."""
    members = sorted(ranks.items())
    replicas = tuple(Replica(port_of(a), i, mac_of(a), a[0], a[1]) for i, (_, a) in enumerate(members))
    workers = tuple(WorkerEntry(a[0], a[1], slots.number, i, len(members), slots.mgid, slots.pool_base,
                                slots.pool_size) for i, (_, a) in enumerate(members))
    return SwitchProgram(target, address, slots.mgid, replicas, workers, role=role)


def flat_plan(target: SwitchTarget, address: Address, slots: JobSlots, addresses: Mapping[int, Address],
              port_of: PortOf, mac_of: MacOf) -> Plan:
    """A job on one switch: rank r is worker r (the ranks are 0..n-1)."""
    program = flat_program(target, address, slots, addresses, port_of, mac_of)
    return Plan([program], dict.fromkeys(addresses, address))


def tree_plan(tree: Tree, spine: SwitchTarget, spine_address: Address, slots: JobSlots,
              addresses: Mapping[int, Address], port_of: PortOf, mac_of: MacOf) -> Plan:
    """A job across ``tree``'s leaves and the spine (module docstring, steps 1-4 and 6)."""
    racks: dict[int, dict[int, Address]] = {}
    for rank, address in sorted(addresses.items()):
        racks.setdefault(tree.rack(rank, address), {})[rank] = address
    used = sorted(racks)
    plan = Plan()
    leaf_addresses = {i: tree.leaves[i].spine_side for i in used}
    plan.programs.append(flat_program(spine, spine_address, slots, leaf_addresses, port_of, mac_of, role="spine"))
    for i in used:
        leaf = tree.leaves[i]
        leaf_port_of, leaf_mac_of = leaf.port_of or port_of, leaf.mac_of or mac_of
        program = flat_program(leaf.target, leaf.address, slots, racks[i], leaf_port_of, leaf_mac_of,
                               role=f"leaf {i}")
        source = leaf.spine_side
        upstream = UpstreamEntry(slots.number, spine_address[0], spine_address[1], leaf_port_of(spine_address),
                                 slots.mgid, slots.pool_base, slots.pool_size, leaf_mac_of(spine_address), *source)
        plan.programs.append(replace(program, upstream=upstream))
        plan.switch_of.update(dict.fromkeys(racks[i], tuple(leaf.address)))
    return plan
