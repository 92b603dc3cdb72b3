"""Put switchml on a P4Runtime switch and run its controller (``switchml-switch deploy``).

One way for BMv2, Tofino and the software switch (docs/deploy.md):

1. ``make_plan(...)`` resolves a typed ``DeployPlan`` per target: (BMv2, ``compile=True``)
   compile ``p4/switchml_v1model.p4`` with ``p4c-bm2-ss``, read the device config and the
   port map, check k and the switch address;
2. ``deploy(plan)`` connects over P4Runtime (arbitration: this controller must be primary)
   and pushes the pipeline: the P4Info and the target's device config (BMv2 JSON, the
   Tofino pipeline binary; nothing for the software switch);
3. it programs forwarding from the port map (host IP -> switch port and MAC), which also
   tells the controller the port and MAC of every worker, and the loss table;
4. it starts the controller (``switchml.controller``) against the switch and returns the
   running ``Deployment``; close it to stop.

A leaf of a two-level tree (``leaf_role=True``, ``deploy --leaf-role``; BMv2 only,
docs/hierarchy.md) runs the program built with ``-DSWITCHML_LEAF_ROLE`` and has no controller
of its own: ``program_switch(plan)`` does steps 2 and 3 and the spine's controller
(``switchml-switch emulate --leaf ...,kind=bmv2``) programs the rest.

The command line (its flags, signals) is ``emulation.cli``'s; this module is the library.

Switch ports themselves are brought up outside P4Runtime: BMv2 takes them on its command
line (``-i 1@veth1``), a Tofino from its SDE or Stratum chassis config.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from switchml import defaults
from switchml.errors import SwitchMLError
from switchml.p4info import P4Info, default_p4info_path, leaf_p4info_path, mac_to_int, p4_dir
from switchml.pipeline import LEAF_ROLE_DEFINE, P4_K, P4_SUPPORTED_K, SOFTWARE_SWITCH_K
from switchml.security import TLSFiles, is_local_endpoint

__all__ = ["P4_K", "TARGETS", "DeployError", "DeployPlan", "Deployment", "HostPort", "compile_bmv2", "deploy",
           "program_switch",
           "load_ports", "make_plan", "parse_address", "port_lookup"]

log = logging.getLogger(__name__)

TARGETS = ("bmv2", "tofino", "emulator")
PORT_BITS = 9  # v1model and TNA port ids


class DeployError(SwitchMLError):
    """A deployment step failed; the message says which and what to do."""


@dataclass(frozen=True)
class HostPort:
    """Where a host (worker) is attached: switch port and the host's MAC address."""

    ip: str
    port: int
    mac: str


def load_ports(path: str | Path) -> dict[str, HostPort]:
    """Read a port map: host IPv4 -> switch port and MAC.

    JSON: ``{"10.0.0.1": {"port": 1, "mac": "00:00:00:00:00:01"}, ...}`` or a list of
    ``{"ip": ..., "port": ..., "mac": ...}``. CSV: ``ip,port,mac`` per line (a header line
    and ``#`` comments are allowed).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeployError(f"--ports {path}: {exc.strerror or exc}") from None
    rows: list[tuple[object, object, object]] = []
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DeployError(f"--ports {path}: not valid JSON: {exc}") from None
        items = data.items() if isinstance(data, dict) else [(d.get("ip"), d) for d in data if isinstance(d, dict)]
        for ip, spec in items:
            if isinstance(spec, dict):
                rows.append((ip, spec.get("port"), spec.get("mac")))
            elif isinstance(spec, list | tuple) and len(spec) == 2:
                rows.append((ip, spec[0], spec[1]))
            else:
                raise DeployError(f"--ports {path}: entry for {ip!r} must be {{\"port\": N, \"mac\": \"..\"}}")
    else:
        for line in csv.reader(io.StringIO(text)):
            cells = [c.strip() for c in line]
            if not cells or not cells[0] or cells[0].startswith("#") or cells[0].lower() == "ip":
                continue
            if len(cells) != 3:
                raise DeployError(f"--ports {path}: line {line!r}: expected ip,port,mac")
            rows.append((cells[0], cells[1], cells[2]))
    hosts: dict[str, HostPort] = {}
    for ip, port, mac in rows:
        try:
            ip_text = str(ipaddress.IPv4Address(str(ip)))
            port_num = int(port)
            if not 0 <= port_num < 1 << PORT_BITS:
                raise ValueError(f"port {port_num} is not a {PORT_BITS}-bit switch port")
            mac_text = str(mac).lower()
            mac_to_int(mac_text)
        except (ValueError, TypeError) as exc:
            raise DeployError(f"--ports {path}: entry {ip!r}: {exc}") from None
        if ip_text in hosts:
            raise DeployError(f"--ports {path}: {ip_text} appears twice")
        hosts[ip_text] = HostPort(ip_text, port_num, mac_text)
    if not hosts:
        raise DeployError(f"--ports {path}: no hosts in it")
    return hosts


def port_lookup(hosts: dict[str, HostPort], source: str) -> tuple[Callable, Callable]:
    """``ControllerOptions.port_of`` and ``mac_of`` from a port map."""

    def find(address: tuple[str, int]) -> HostPort:
        try:
            return hosts[address[0]]
        except KeyError:
            raise DeployError(f"worker {address[0]} is not in the port map {source}: add its switch port "
                              "and MAC there") from None

    return (lambda a: find(a).port), (lambda a: find(a).mac)


def compile_bmv2(build_dir: Path, source: Path | None = None, leaf_role: bool = False) -> tuple[Path, Path]:
    """Compile the v1model program with p4c-bm2-ss; returns (P4Info, BMv2 JSON).

    With ``leaf_role`` it is built with ``-DSWITCHML_LEAF_ROLE``: a leaf of a two-level tree
    (docs/hierarchy.md), whose P4Info is ``switchml.p4info.with_leaf_role()``'s.
    """
    compiler = shutil.which("p4c-bm2-ss")
    if compiler is None:
        raise DeployError("--compile needs p4c-bm2-ss on PATH (p4c is not installable from this project's package "
                          "registries: install it from p4lang's packages, see docs/deploy.md), or pass --config "
                          "with a BMv2 JSON built elsewhere")
    source = source or p4_dir() / "switchml_v1model.p4"
    build_dir.mkdir(parents=True, exist_ok=True)
    stem = "switchml_v1model_leaf" if leaf_role else "switchml_v1model"
    p4info, config = build_dir / f"{stem}.p4info.txtpb", build_dir / f"{stem}.json"
    defines = [f"-D{LEAF_ROLE_DEFINE}"] if leaf_role else []
    cmd = [compiler, *defines, "--p4runtime-files", str(p4info), "-o", str(config), str(source)]
    log.info("compiling: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise DeployError(f"p4c-bm2-ss failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-3000:]}")
    return p4info, config


@dataclass(frozen=True)
class DeployPlan:
    """What ``deploy`` will push and run, resolved by ``make_plan``."""

    target: str
    grpc: str
    device_id: int
    election_id: int
    p4info: Path
    config: bytes | None  #: None: do not push a pipeline
    supported_k: tuple[int, ...]
    k: int
    hosts: dict[str, HostPort] = field(default_factory=dict)
    ports_source: str = "None"
    switch_address: tuple[str, int] = (defaults.SWITCH_HOST, defaults.SWITCH_PORT)
    control_bind: str = f"tcp://*:{defaults.CONTROL_PORT}"
    pool_size: int | None = None  #: None: the P4 program's, from its counter sizes
    window: int = defaults.WINDOW
    drop_probability: float = 0.0
    timeout: float = 10.0  #: deadline of each P4Runtime call, in seconds
    tls: TLSFiles | None = None  #: P4Runtime over TLS (None: plain text)
    secret: bytes | None = field(default=None, repr=False)  #: the control channel's cluster secret
    insecure: bool = False  #: allow an open control channel on an address other hosts reach
    leaf_role: bool = False  #: a tree's leaf: the leaf build, no controller of its own (program_switch only)


def make_plan(target: str, grpc: str, *, device_id: int = 0, election_id: int = 1, p4info: str | Path | None = None,
              config: str | Path | None = None, compile: bool = False, build_dir: str | Path = "build/p4",
              no_push: bool = False, ports: str | Path | None = None, switch_address: str | None = None,
              control_host: str = "*", control_port: int = defaults.CONTROL_PORT, pool_size: int | None = None,
              window: int = defaults.WINDOW, k: int | None = None, drop_probability: float = 0.0,
              timeout: float = 10.0, tls: TLSFiles | None = None, secret: bytes | None = None,
              insecure: bool = False, leaf_role: bool = False) -> DeployPlan:
    """Resolve defaults per target; compile when asked. Errors name the command line's flags."""
    p4info_path = Path(p4info) if p4info else None
    device_config: bytes | None = None
    if leaf_role and target != "bmv2":
        raise DeployError(f"--leaf-role with --target {target}: the leaf build is BMv2's (a software leaf is "
                          "switchml-switch emulate --no-controller --leaf-role; docs/hierarchy.md)")
    if target == "bmv2":
        if compile:
            compiled_p4info, json_path = compile_bmv2(Path(build_dir), leaf_role=leaf_role)
            p4info_path = p4info_path or compiled_p4info
            device_config = json_path.read_bytes()
        elif not no_push:
            if not config:
                raise DeployError("--target bmv2 pushes a BMv2 JSON: pass --config build/switchml_v1model.json, or "
                                  "--compile to build it with p4c-bm2-ss, or --no-push if the switch already runs it")
            device_config = _read(config, "--config")
    elif target == "tofino":
        if compile:
            raise DeployError("--compile builds for BMv2 only: build the Tofino pipeline with bf-p4c and your "
                              "P4Runtime server's packaging tool (docs/deploy.md), then pass --p4info and --config")
        if not no_push:
            if not (config and p4info):
                raise DeployError("--target tofino needs --p4info (bf-p4c's P4Info) and --config (the pipeline "
                                  "binary your Tofino P4Runtime server takes, see docs/deploy.md), or --no-push")
            device_config = _read(config, "--config")
    elif target == "emulator":
        device_config = None if no_push else (_read(config, "--config") if config else b"")
    else:
        raise DeployError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    p4info_path = p4info_path or (leaf_p4info_path() if leaf_role else default_p4info_path())
    supported = SOFTWARE_SWITCH_K if target == "emulator" else P4_SUPPORTED_K
    k = k or (defaults.K if target == "emulator" else P4_K)
    if k not in supported:
        raise DeployError(f"-k {k}: --target {target} takes {list(supported)} elements per packet")
    hosts = load_ports(ports) if ports else {}
    if not hosts and target != "emulator":
        raise DeployError(f"--target {target} needs --ports: the switch port and MAC of every worker host")
    if leaf_role:  # no controller here: the spine's controller programs the jobs
        return DeployPlan(target, grpc, device_id, election_id, p4info_path, device_config, supported, k, hosts,
                          str(ports), timeout=timeout, tls=tls, drop_probability=drop_probability, leaf_role=True)
    if switch_address is None and target != "emulator":
        raise DeployError(f"--target {target} needs --switch-address: the IP workers send to (any unused address "
                          "of their subnet, with a static ARP entry on each host; see docs/deploy.md)")
    control_bind = f"tcp://{control_host}:{control_port}"
    if not secret and not insecure and not is_local_endpoint(control_bind):
        # before the switch is touched: the controller would refuse to start open anyway
        raise DeployError(f"--control-host {control_host}: other hosts can reach the controller there, and it has no "
                          f"cluster secret: pass --secret-file FILE (or set ${defaults.SECRET_ENV}; docs/security.md), "
                          "or --insecure to run the control channel open")
    return DeployPlan(target, grpc, device_id, election_id, p4info_path, device_config, supported, k, hosts,
                      str(ports), parse_address(switch_address or defaults.SWITCH_HOST, defaults.SWITCH_PORT),
                      control_bind, pool_size, window, drop_probability, timeout, tls,
                      secret, insecure)


def _read(path: str | Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeployError(f"{flag} {path}: {exc.strerror or exc}") from None


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        return host, int(port)
    except ValueError:
        raise DeployError(f"{text!r}: expected HOST[:PORT]") from None


class Deployment:
    """A running deployment: the switch programmed and its controller serving; ``close()`` stops it."""

    def __init__(self, plan: DeployPlan, target, controller) -> None:
        self.plan, self.target, self.controller = plan, target, controller

    @property
    def endpoint(self) -> str:
        """The controller's ZeroMQ endpoint, for ``Worker(controller=...)``."""
        return self.controller.endpoint

    def close(self) -> None:
        try:
            self.controller.stop()
        finally:
            self.target.close()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def program_switch(plan: DeployPlan):
    """Steps 2 and 3: connect, push the pipeline, program forwarding and the loss table; return the
    connected ``P4RuntimeTarget`` (the caller closes it)."""
    from switchml.p4runtime_target import P4RuntimeTarget

    try:
        p4info = P4Info.load(plan.p4info)
    except (OSError, ValueError) as exc:
        raise DeployError(f"--p4info {plan.p4info}: {exc}") from None
    target = P4RuntimeTarget(plan.grpc, plan.device_id, plan.election_id, p4info, timeout=plan.timeout,
                             supported_k=plan.supported_k, tls=plan.tls)
    try:
        if plan.config is not None:
            target.set_pipeline(plan.config)
        for host in plan.hosts.values():
            target.add_forward(host.ip, host.port, host.mac)
        log.info("programmed forwarding for %d hosts", len(plan.hosts))
        if plan.drop_probability:
            for port in sorted({host.port for host in plan.hosts.values()}):
                target.set_drop_probability(port, plan.drop_probability)
            log.info("loss table: dropping %.4g of the packets arriving on each of %d ports", plan.drop_probability,
                     len(plan.hosts))
    except BaseException:
        target.close()
        raise
    return target


def deploy(plan: DeployPlan) -> Deployment:
    """Push the pipeline, program forwarding and the loss table, start the controller."""
    from switchml.controller import Controller, ControllerOptions

    if plan.leaf_role:
        raise DeployError("a leaf has no controller of its own: program it with program_switch(plan)")
    target = program_switch(plan)
    try:
        p4info = target.p4info
        port_of, mac_of = port_lookup(plan.hosts, plan.ports_source) if plan.hosts else (None, None)
        pool_size = plan.pool_size or p4info.counter("SwitchIngress.results_multicast").size
        controller = Controller(target, ControllerOptions(
            bind=plan.control_bind, switch_address=plan.switch_address, pool_size=pool_size, window=plan.window,
            k=plan.k, port_of=port_of, mac_of=mac_of, secret=plan.secret, insecure=plan.insecure)).start()
    except BaseException:
        target.close()
        raise
    log.info("switchml deployed on %s (%s, device %d): controller %s, switch data address %s, k=%d, "
             "window %d, pool %d", plan.target, plan.grpc, plan.device_id, controller.endpoint,
             "{}:{}".format(*controller.options.switch_address), plan.k, plan.window, pool_size)
    return Deployment(plan, target, controller)
