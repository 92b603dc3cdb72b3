"""A tree of software switches and its controller, in this process: leaves under a spine.

``SoftwareTreeRunner`` is ``emulation.runner.SoftwareSwitchRunner`` for two-level aggregation
(docs/hierarchy.md): one software switch per leaf and one for the spine, each on its own UDP socket, and one ``Controller`` that programs all of
them as a ``switchml.tree.Tree``: in-process (``InProcessTarget``), or over P4Runtime
(``P4RuntimeTarget``; each switch serves P4Runtime, the leaves with the leaf role's table), the
code path of switches in other processes or hosts. ``LeafSpec`` and ``connect_leaves`` serve
``switchml-switch emulate --leaf SPEC``: a spine whose controller programs leaves that run as
``switchml-switch emulate --no-controller --p4runtime-port P --leaf-role`` elsewhere, or BMv2
leaves running the leaf build (``switchml-switch deploy --target bmv2 --leaf-role``; ``kind=bmv2``
and the leaf's ``ports=`` map in the spec).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from emulation.runner import SoftwareSwitchRunner
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml import defaults
from switchml.controller import Controller, ControllerOptions
from switchml.net import Address
from switchml.pipeline import P4_SUPPORTED_K, SOFTWARE_SWITCH_K, check_drop_probability
from switchml.security import TLSFiles
from switchml.targets import SwitchTarget
from switchml.tree import Leaf, Tree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeafSpec:
    """A leaf switch reached over P4Runtime, as ``--leaf`` names it (``parse_leaf_spec``)."""

    p4runtime: str  #: its P4Runtime gRPC address, HOST:PORT or unix:PATH
    data: Address  #: its data address, where its rack sends
    uplink: Address | None = None  #: its address as the spine sees it (default: ``data``)
    hosts: tuple[str, ...] = ()  #: worker IPs of its rack
    kind: str = "software"  #: "software" (any k the software switch takes) or "bmv2" (k = 64 compiled in)
    ports: str | None = None  #: its port map (deploy --ports's format): its rack's and the spine's IPs

    #: what --leaf takes, for help texts and errors
    SYNTAX = ("p4runtime=HOST:PORT|unix:PATH,data=IP:PORT[,uplink=IP:PORT][,hosts=IP+IP+...]"
              "[,kind=software|bmv2][,ports=FILE]")
    KINDS = ("software", "bmv2")


def _address(field: str, text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--leaf {field}={text!r}: expected HOST:PORT with a port 1..65535")
    return (host, int(port))


def parse_leaf_spec(text: str) -> LeafSpec:
    """``LeafSpec.SYNTAX`` as a ``LeafSpec``; ``ValueError`` naming the field, its value and what
    was expected. A ``kind=bmv2`` leaf needs ``ports=``: its port and MAC of each address."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("p4runtime", "data", "uplink", "hosts", "kind", "ports") or key in fields:
            raise ValueError(f"--leaf {text!r}: field {part!r}; expected {LeafSpec.SYNTAX}, each field once")
        fields[key] = value.strip()
    for required in ("p4runtime", "data"):
        if required not in fields:
            raise ValueError(f"--leaf {text!r}: no {required}=...; expected {LeafSpec.SYNTAX}")
    if not fields["p4runtime"].startswith("unix:"):
        _address("p4runtime", fields["p4runtime"])
    kind = fields.get("kind", "software")
    if kind not in LeafSpec.KINDS:
        raise ValueError(f"--leaf kind={kind!r}: expected one of {', '.join(LeafSpec.KINDS)}")
    if kind == "bmv2" and "ports" not in fields:
        raise ValueError(f"--leaf {text!r}: kind=bmv2 needs ports=FILE, the leaf's port and MAC of its rack's "
                         "workers and of the spine (deploy --ports's format)")
    hosts = tuple(h for h in fields.get("hosts", "").split("+") if h)
    return LeafSpec(fields["p4runtime"], _address("data", fields["data"]),
                    _address("uplink", fields["uplink"]) if "uplink" in fields else None, hosts, kind,
                    fields.get("ports"))


def connect_leaves(specs: Sequence[LeafSpec], tls: TLSFiles | None = None,
                   timeout: float = defaults.CONTROL_TIMEOUT_S) -> list[Leaf]:
    """A ``Leaf`` of each spec, its target a ``P4RuntimeTarget`` with the leaf role's P4Info (and,
    with ``ports``, the leaf's own port and MAC lookups); each leaf's server is retried until
    ``timeout`` (they may still be starting). The caller closes the targets; on failure the ones
    already connected are closed and the error names the leaf."""
    from switchml.deploy import load_ports, port_lookup
    from switchml.p4info import with_leaf_role
    from switchml.p4runtime_target import P4RuntimeError, P4RuntimeTarget

    p4info = with_leaf_role()
    leaves: list[Leaf] = []
    deadline = time.monotonic() + timeout
    try:
        for i, spec in enumerate(specs):
            port_of, mac_of = port_lookup(load_ports(spec.ports), spec.ports) if spec.ports else (None, None)
            supported_k = P4_SUPPORTED_K if spec.kind == "bmv2" else SOFTWARE_SWITCH_K
            while True:
                try:
                    target = P4RuntimeTarget(spec.p4runtime, p4info=p4info, supported_k=supported_k, tls=tls,
                                             timeout=min(10.0, max(1.0, deadline - time.monotonic())))
                    break
                except P4RuntimeError as exc:
                    if time.monotonic() >= deadline:
                        raise P4RuntimeError(f"leaf {i} ({spec.p4runtime}): not reachable within {timeout:g} s: "
                                             f"{exc}", exc.code) from exc
                    time.sleep(0.5)
            leaves.append(Leaf(target, spec.data, spec.hosts, spec.uplink, port_of, mac_of))
    except BaseException:
        for leaf in leaves:
            leaf.target.close()
        raise
    return leaves


def racks_of_sizes(sizes: Sequence[int]) -> Callable[[int, Address], int]:
    """A ``Tree.rack_of`` that puts ranks 0..sizes[0]-1 under leaf 0, the next sizes[1] under leaf 1, ..."""
    if not sizes or any(size < 1 for size in sizes):
        raise ValueError(f"rack sizes={list(sizes)}; expected one or more racks of at least 1 rank")
    leaf_of_rank = [i for i, size in enumerate(sizes) for _ in range(size)]

    def rack_of(rank: int, address: Address) -> int:
        if not 0 <= rank < len(leaf_of_rank):
            raise ValueError(f"rank {rank}: the racks {list(sizes)} hold ranks 0..{len(leaf_of_rank) - 1}")
        return leaf_of_rank[rank]

    return rack_of


class SoftwareTreeRunner:
    """Starts ``leaves`` leaf switches, a spine and a controller on ``host``; ``stop()`` ends all.

    Args:
        leaves: number of leaf switches.
        rack_of: (rank, UDP address) -> leaf index (``racks_of_sizes`` builds one).
        host: the address every socket binds (ports are free ones, the controller's
            ``control_port``).
        control_port: ZeroMQ port (0: any free port).
        pool_size: slots in every switch.
        leaf_drop_probability, spine_drop_probability: emulated loss on every port of each
            leaf and of the spine, both directions (0..1): the loss table's default entry.
        seed: seed of the loss generators (leaf i: seed + i + 1; the spine: seed).
        dataplane: every switch's data path ("native", "python", None: native where built);
            both have the leaf role.
        p4runtime: program every switch over P4Runtime (each serves it on a free port) instead
            of in-process.
        **options: further ``ControllerOptions`` (window, k, heartbeat_timeout, ...).
    """

    def __init__(self, leaves: int, rack_of: Callable[[int, Address], int], host: str = defaults.SWITCH_HOST,
                 control_port: int = 0, pool_size: int = defaults.POOL_SIZE, leaf_drop_probability: float = 0.0,
                 spine_drop_probability: float = 0.0, seed: int = 0, dataplane: str | None = None,
                 p4runtime: bool = False, **options) -> None:
        if leaves < 1:
            raise ValueError(f"leaves={leaves}; expected at least 1 leaf switch")
        check_drop_probability(leaf_drop_probability)
        check_drop_probability(spine_drop_probability)
        self.switches: list[SoftwareSwitchRunner] = []  # the spine, then the leaves
        self.targets: list[SwitchTarget] = []
        self.controller: Controller | None = None
        try:
            for i in range(leaves + 1):
                # the loss is the switch's default entry, programmed as a controller would (no controller here)
                self.switches.append(SoftwareSwitchRunner(
                    host, 0, 0, pool_size, spine_drop_probability if i == 0 else leaf_drop_probability, seed + i,
                    p4runtime_port=0 if p4runtime else None, with_controller=False,
                    dataplane=dataplane, leaf_role=p4runtime and i > 0))
                runner = self.switches[-1]
                self.targets.append(runner.p4runtime_target() if p4runtime else InProcessTarget(runner.switch))
            tree = Tree([Leaf(target, runner.server.address)
                         for target, runner in zip(self.targets[1:], self.switches[1:], strict=True)], rack_of)
            self.controller = Controller(self.targets[0], ControllerOptions(
                bind=f"tcp://{host}:{control_port}", switch_address=self.spine_address, pool_size=pool_size,
                tree=tree, **options)).start()
        except Exception:
            self._stop_switches()
            raise

    @property
    def endpoint(self) -> str:
        """The controller's ZeroMQ endpoint, for ``Worker(controller=...)``."""
        return self.controller.endpoint

    @property
    def spine(self) -> SoftwareSwitch:
        """The spine switch."""
        return self.switches[0].switch

    @property
    def leaves(self) -> list[SoftwareSwitch]:
        """The leaf switches, in leaf order."""
        return [runner.switch for runner in self.switches[1:]]

    @property
    def spine_address(self) -> Address:
        """The spine's data address."""
        return self.switches[0].server.address

    @property
    def leaf_addresses(self) -> list[Address]:
        """Each leaf's data address, in leaf order."""
        return [runner.server.address for runner in self.switches[1:]]

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self._stop_switches()

    def _stop_switches(self) -> None:
        for target in self.targets:
            target.close()
        for runner in self.switches:
            runner.stop()

    def __enter__(self) -> SoftwareTreeRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
