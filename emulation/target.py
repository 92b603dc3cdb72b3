"""The controller's target interface, implemented on a software switch in the same process."""

from __future__ import annotations

from collections.abc import Sequence

from emulation.switch import SoftwareSwitch
from switchml.pipeline import Replica, UpstreamEntry, WorkerEntry, supported_k
from switchml.targets import SwitchTarget


class InProcessTarget(SwitchTarget):
    """Programs a ``SoftwareSwitch`` object directly (no P4Runtime in between)."""

    def __repr__(self) -> str:
        return f"InProcessTarget({self.switch.dataplane} software switch)"

    def __init__(self, switch: SoftwareSwitch) -> None:
        self.switch = switch
        self.supported_k = supported_k(switch.sizes)

    def add_controller(self, ip: str, udp_port: int) -> None:
        self.switch.add_admission(ip, udp_port, None)

    def add_worker(self, entry: WorkerEntry) -> None:
        self.switch.add_admission(entry.ip, entry.udp_port, entry)

    def remove_worker(self, ip: str, udp_port: int) -> None:
        self.switch.remove_admission(ip, udp_port)

    def set_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        self.switch.set_multicast_group(mgid, replicas)

    def delete_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        self.switch.delete_multicast_group(mgid)

    def set_drop_probability(self, port: int | None, probability: float) -> None:
        self.switch.set_drop_probability(port, probability)

    def why_no_leaf_role(self) -> str | None:
        if self.switch.leaf_role:
            return None
        return f"the software switch's {self.switch.dataplane} data plane has no leaf role"

    def add_upstream(self, entry: UpstreamEntry) -> None:
        self.switch.add_upstream(entry)

    def remove_upstream(self, job: int) -> None:
        self.switch.remove_upstream(job)

    def read_counter(self, name: str) -> list[int]:
        return self.switch.read_counter(name)
