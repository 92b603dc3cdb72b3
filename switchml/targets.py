"""The controller's narrow interface to a switch.

Its operations are those of the pipeline's tables (``switchml.pipeline``): admission
entries, multicast groups with their egress rewrites, the loss table and counters. The
software switch implements it in-process (``emulation.target.InProcessTarget``); a
P4Runtime target implements it for BMv2, Tofino and the software switch's gRPC server.
Slots are cleared in the data plane by RESET packets (``switchml.controller``), so no
register access is needed here. A target that can be a leaf of a tree (docs/hierarchy.md) also
takes upstream entries (``switchml.pipeline.UPSTREAM_TABLE``); the others say why not, and the
controller refuses a tree with them as leaves (``switchml.tree``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from switchml.errors import LeafRoleUnsupported
from switchml.pipeline import P4_SUPPORTED_K, UPSTREAM_TABLE, Replica, UpstreamEntry, WorkerEntry


class SwitchTarget(ABC):
    """What the controller needs from a switch; one implementation per way to program it."""

    #: The packet sizes (elements per packet) the target accepts, largest first.
    supported_k: tuple[int, ...] = P4_SUPPORTED_K

    @abstractmethod
    def add_controller(self, ip: str, udp_port: int) -> None:
        """Admission entry: RESET packets from (ip, udp_port) are the controller's."""

    @abstractmethod
    def add_worker(self, entry: WorkerEntry) -> None:
        """Admission entry for one worker of a job."""

    @abstractmethod
    def remove_worker(self, ip: str, udp_port: int) -> None:
        """Delete a worker's admission entry; its packets are dropped from now on."""

    @abstractmethod
    def set_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        """Create a job's multicast group and the egress rewrite entry of each replica."""

    @abstractmethod
    def delete_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        """Delete a job's multicast group and its egress rewrite entries."""

    @abstractmethod
    def set_drop_probability(self, port: int | None, probability: float) -> None:
        """Loss table entry: drop packets arriving on ``port`` with ``probability`` (0..1); ``port``
        None sets the table's default entry, the loss of every port without an entry of its own."""

    @abstractmethod
    def read_counter(self, name: str) -> list[int]:
        """Packet counts of counter ``name`` (a ``switchml.pipeline`` counter), by index."""

    def why_no_leaf_role(self) -> str | None:
        """None if this target can be a leaf (``add_upstream`` works), else why it cannot."""
        return f"{self!r} has no upstream table ({UPSTREAM_TABLE}), so it cannot be a leaf of a tree"

    def add_upstream(self, entry: UpstreamEntry) -> None:
        """Upstream entry: make the switch a leaf for job ``entry.job`` (docs/hierarchy.md)."""
        raise LeafRoleUnsupported(f"upstream entry for job {entry.job}: {self.why_no_leaf_role()}")

    def remove_upstream(self, job: int) -> None:
        """Delete job ``job``'s upstream entry."""
        raise LeafRoleUnsupported(f"upstream entry for job {job}: {self.why_no_leaf_role()}")

    def close(self) -> None:
        """Release connections; the default has none."""
