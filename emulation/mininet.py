"""Mininet networks: a star (N worker hosts, each on its own bandwidth-limited link to one
switch host) and a two-level tree (racks of workers under leaf hosts, the leaves under a spine).

Needs root and Mininet (the Debian package ``mininet``; ``scripts/setup.sh`` links its
Python package into the virtual environment). No Open vSwitch and no controller: the
switch node is a plain Mininet host with one interface per worker. It runs the software
switch (or, later, BMv2) and routes IP between its interfaces, so every packet between two
workers (Gloo's ring) crosses the sender's link and the receiver's link, like a packet
through a ToR switch::

    h0 (10.0.0.1/24) --TCLink(bw)-- sw-eth0 (10.0.0.254/24)
    h1 (10.0.1.1/24) --TCLink(bw)-- sw-eth1 (10.0.1.254/24)     sw: ip_forward=1,
    ...                                                             lo: 10.255.255.254/32
    h{n-1}         ...                                               (the switch's address)

Each worker's default route points at its link's switch-side address. The software switch
listens on ``SWITCH_IP`` (on the switch host's loopback), reachable from every worker.

Bandwidth: ``TCLink(bw=...)`` shapes each link's egress on both ends with htb (this kernel
has no netem; TCLink adds netem only for delay, jitter, loss or a queue limit, which this
module never asks for). ``start`` checks that every interface got its rate. Loss: the
software switch's ``--drop-probability``, or :meth:`StarNetwork.set_loss`, which installs
nftables rules in every node's namespace (a drop on arrival, per link and direction).

With ``switch="bmv2"`` the switch host runs BMv2 instead (``simple_switch_grpc``, one BMv2
port per link: worker i on port i+1) and does no IP itself: its interfaces carry no
addresses, and every host reaches the others and the switch address through BMv2, with a
static ARP entry that gives its gateway the switch's MAC (the P4 programs do no ARP). One
more host, ``ctl`` (``CONTROLLER_HOST_IP``, on port n+1, unshaped), runs the controller:
``switchml-switch deploy --target bmv2`` pushes the program over P4Runtime (a Unix socket,
reachable from every namespace) and sends its RESET packets through BMv2 like any host.
:meth:`StarNetwork.deploy_bmv2` starts both::

    h0 (10.0.0.1/24) ---- sw-eth0 = BMv2 port 1        sw: simple_switch_grpc, no IP
    ...                                                 ctl (10.0.250.1/24): deploy + controller
    ctl ----------------- sw-ctl  = BMv2 port n+1

``TreeNetwork`` (issue 19, docs/hierarchy.md) puts R racks of W workers under leaf hosts
(worker links at ``bw``), and the leaves under one spine host (core links at ``core_bw``). Leaves
and the spine route IP, so Gloo's ring crosses the core where it goes from rack to rack; the
spine holds ``SWITCH_IP``, and each leaf runs a software switch with the leaf role on its core
address (:meth:`TreeNetwork.spawn_tree`)::

    h0 (10.0.0.1/24) --bw-- l0-eth0 (10.0.0.254/24)
    ...                     l0: 10.1.0.1/24 on l0-up --core_bw-- sp-eth0 (10.1.0.254/24)    sp: lo 10.255.255.254/32
    h4 (10.0.4.1/24) --bw-- l1-eth0 (10.0.4.254/24)
    ...                     l1: 10.1.1.1/24 on l1-up --core_bw-- sp-eth1 (10.1.1.254/24)

With ``leaf_switch="bmv2"`` each leaf host runs BMv2 with the leaf build instead (docs/hierarchy.md)
and does no IP: ``10.1.r.1`` is then the leaf's virtual address, its rack's workers reach it and
the spine through it by static ARP entries (``leaf_mac(r)``), and the leaf forwards the control
traffic between its rack and the spine's controller from its port map (:meth:`TreeNetwork.spawn_tree`)::

    h0 ---- l0-eth0 = BMv2 port 1          l0: simple_switch_grpc (leaf build), no IP; 10.1.0.1 virtual
    h1 ---- l0-eth1 = BMv2 port 2
            l0-up   = BMv2 port 3 ------ sp-eth0 (10.1.0.254/24)

Never call ``mn -c`` (it kills processes by name machine-wide); ``stop()`` kills the
processes this object started, by PID, then calls ``net.stop()``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emulation.spawn import child_env, emulate_command, spawn_switch, stop_process, wait_command
from switchml import defaults
from switchml.errors import SwitchMLError
from switchml.pipeline import P4_K

log = logging.getLogger(__name__)

SWITCH_IP = "10.255.255.254"  #: the switch host's own address (on its loopback)
NFT_TABLE = "switchml_loss"
SWITCH_KINDS = ("software", "bmv2")
#: BMv2 star: the MAC every host's static ARP entry gives its gateway (BMv2 answers no ARP).
SWITCH_MAC = "02:00:00:00:00:fe"
CONTROLLER_LINK = 250  #: BMv2 star: the controller host's link number (workers use 0..249)
BMV2_DEVICE_ID = 0


class MininetUnavailable(RuntimeError):
    """Mininet cannot run here (not root, Mininet missing, ...); the message says what to do."""


def mininet_problem() -> str | None:
    """Why a Mininet network cannot be built on this machine, or None if it can."""
    if os.geteuid() != 0:
        return "the Mininet star needs root (network namespaces, tc, veth pairs): run as root"
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return ("the Python package 'mininet' is not importable: install the Debian package "
                "(apt-get install -y --no-install-recommends mininet iperf3 bridge-utils nftables ethtool) and run "
                "scripts/setup.sh, which links /usr/lib/python3/dist-packages/mininet into the virtual environment")
    for tool in ("mnexec", "tc", "ip"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH (Debian packages mininet and iproute2)"
    return None


def bmv2_problem() -> str | None:
    """Why a BMv2 star cannot run here (Mininet or the P4 tools missing), or None if it can."""
    problem = mininet_problem()
    if problem:
        return problem
    missing = [tool for tool in ("simple_switch_grpc", "p4c-bm2-ss") if shutil.which(tool) is None]
    if missing:
        return (f"{' and '.join(missing)} not on PATH: p4c and BMv2 are built from p4lang's sources "
                "(docs/deploy.md); put their bin folder (e.g. /opt/p4/bin) on PATH")
    if shutil.which("ethtool") is None:
        return "'ethtool' is not on PATH (apt-get install -y ethtool): a BMv2 star turns off the links' offloads"
    return None


def require_mininet() -> None:
    """Raise :class:`MininetUnavailable` with a clear message unless a Mininet star can be built."""
    problem = mininet_problem()
    if problem:
        raise MininetUnavailable(problem)


def worker_ip(i: int) -> str:
    """IP address of worker host i."""
    return f"10.0.{i}.1"


def worker_subnet(i: int) -> str:
    """The /24 of worker i's link (``worker_ip(i)`` and ``gateway_ip(i)``)."""
    return f"10.0.{i}.0/24"


def gateway_ip(i: int) -> str:
    """The switch host's address on worker i's link (BMv2 star: only its ARP entry exists)."""
    return f"10.0.{i}.254"


CONTROLLER_HOST_IP = worker_ip(CONTROLLER_LINK)  #: BMv2 star: where the controller runs


def bmv2_port(i: int) -> int:
    """BMv2 port of link i (worker i; ``CONTROLLER_LINK`` is the controller host's)."""
    return i + 1


class _Network:
    """What the star and the tree share: Mininet's lifecycle, processes started in a node's
    namespace (killed by PID on :meth:`stop`), the controller's readiness check, loss.

    ``switch`` is the node that serves ``SWITCH_IP`` (the star's switch host, the tree's spine)
    and ``hosts`` the worker hosts, in rank order. Use as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    def __init__(self, bw_mbit: float | None, mtu: int) -> None:
        self.bw_mbit, self.mtu = bw_mbit, mtu
        self.net: Any = None
        self.switch: Any = None
        self.hosts: list[Any] = []
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ lifecycle
    def start(self):
        """Build the network, configure addresses, routes and shaping, check them; return self."""
        problem = self._problem()
        if problem:
            raise MininetUnavailable(problem)
        from mininet.log import setLogLevel
        from mininet.net import Mininet

        # TCLink reports tc's harmless "quantum of class is big" warnings at error level; start()
        # verifies the shaping itself instead.
        setLogLevel("critical")
        self.net = Mininet(topo=None, build=False, controller=None, autoSetMacs=False, autoStaticArp=False,
                           waitConnected=False)
        try:
            self._add_nodes()
            self.net.build()
            self._configure()
        except BaseException:
            self.stop()
            raise
        log.info("mininet %s up", self._describe())
        return self

    def _problem(self) -> str | None:
        return mininet_problem()

    def _add_nodes(self) -> None:
        raise NotImplementedError

    def _configure(self) -> None:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _add_link(self, a: Any, b: Any, intf_a: str, intf_b: str, bw_mbit: float | None) -> None:
        """A veth pair between ``a`` and ``b``, shaped to ``bw_mbit`` on both ends (None: unshaped)."""
        from mininet.link import TCLink

        kwargs = {"cls": TCLink, "bw": bw_mbit} if bw_mbit else {}
        self.net.addLink(a, b, intfName1=intf_a, intfName2=intf_b, **kwargs)

    def _nodes(self) -> list[Any]:
        """Every node that forwards or receives packets (the loss rules go to each)."""
        return [*self.hosts, self.switch]

    def _start_bmv2(self, node: Any, ports: dict[int, str], socket_path: Path, log_path: Path) -> subprocess.Popen:
        """``simple_switch_grpc`` on ``node`` (BMv2 port -> interface), serving P4Runtime on the Unix
        socket ``socket_path`` (reachable from every namespace), once that socket exists."""
        socket_path.unlink(missing_ok=True)
        interfaces = [arg for port, intf in ports.items() for arg in ("-i", f"{port}@{intf}")]
        bmv2 = self.popen(node, ["simple_switch_grpc", "--device-id", str(BMV2_DEVICE_ID), "--no-p4", *interfaces,
                                 "--", "--grpc-server-addr", f"unix:{socket_path}"], log_path=str(log_path))
        _wait_for(socket_path.exists, bmv2, log_path, 30, f"simple_switch_grpc on {node.name} did not open {socket_path}")
        return bmv2

    def stop(self) -> None:
        """Kill the processes started here (by PID), remove loss rules, then ``net.stop()``."""
        for proc in self._procs:
            stop_process(proc, grace=5.0)
        self._procs.clear()
        if self.net is not None:
            try:
                self.net.stop()
            finally:
                self.net = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------- running
    def popen(self, node: Any, args: Sequence[str], env: dict[str, str] | None = None, log_path: str | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        """Start ``args`` in ``node``'s namespace; it is killed by :meth:`stop` if still running."""
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # the child gets its own copy of the descriptor
        try:
            proc = node.popen(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, cwd=cwd)
        finally:
            if log_path:
                out.close()
        self._procs.append(proc)
        return proc

    def worker_ifname(self, i: int) -> str:
        """Interface of worker i (for GLOO_SOCKET_IFNAME)."""
        return f"h{i}-eth0"

    def spawn_switch(self, log_path: str | os.PathLike, env: dict[str, str] | None = None,
                     **options: Any) -> subprocess.Popen:
        """``emulation.spawn.spawn_switch`` on the switch host (listening on ``SWITCH_IP`` unless
        ``host`` says otherwise), ready once worker 0 gets its controller's ``hello``; output to
        ``log_path``; stopped by :meth:`stop` if still running. ``env``: added to the switch's
        and the readiness check's environment (``SWITCHML_SECRET``, say); ``options``: spawn_switch's."""
        options.setdefault("host", SWITCH_IP)
        return spawn_switch(start=lambda cmd: self.popen(self.switch, cmd, env=child_env(env), log_path=str(log_path)),
                            wait=lambda endpoint, proc, timeout: self.wait_for_controller(endpoint, proc, timeout, env),
                            **options)

    def wait_for_controller(self, endpoint: str, proc: subprocess.Popen, timeout: float = 30.0,
                            env: dict[str, str] | None = None) -> None:
        """Return once the controller at ``endpoint`` answers ``hello`` from worker 0's namespace
        (``switchml-switch wait``: the readiness check of ``emulation.spawn``, run where the
        workers are); raise ``SwitchMLError`` if ``proc`` (the switch or deploy process) exits
        first or ``timeout`` passes. ``emulation.spawn.spawn_switch`` takes it as ``wait``."""
        waiter = self.hosts[0].popen(wait_command(endpoint, timeout), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(env))
        deadline = time.monotonic() + timeout + 10  # the waiter keeps its own deadline; this one is a backstop
        try:
            while waiter.poll() is None:
                if proc.poll() is not None:
                    raise SwitchMLError(f"the process serving {endpoint} exited with {proc.returncode} before "
                                        "its controller answered")
                if time.monotonic() > deadline:
                    raise SwitchMLError(f"the controller at {endpoint} did not answer within {timeout:g} s")
                time.sleep(0.1)
        finally:
            stop_process(waiter, grace=2.0)
        with waiter.stdout:
            output = waiter.stdout.read().decode(errors="replace").strip()
        if waiter.returncode != 0:
            raise SwitchMLError(output or f"switchml-switch wait exited with {waiter.returncode}")

    def set_loss(self, probability: float) -> None:
        """Drop ``probability`` of the IP packets that cross each link, in each direction (nftables).

        Every node (workers, switch host, leaves and spine) drops that share of the packets it receives, in
        its prerouting hook: a packet is dropped on arrival, never by its sender's own
        output hook (a sender would get EPERM from ``sendto`` instead of a silent loss).
        A worker-to-worker packet (Gloo) crosses two links, so it meets two chances of loss.
        """
        if shutil.which("nft") is None:
            raise MininetUnavailable("'nft' is not on PATH: apt-get install -y --no-install-recommends nftables")
        scale = 1_000_000
        threshold = round(probability * scale)
        for node in self._nodes():
            node.cmd(f"nft delete table inet {NFT_TABLE} 2>/dev/null")
            if threshold <= 0:
                continue
            rules = (f"table inet {NFT_TABLE} {{\n"
                     f" chain arrive {{ type filter hook prerouting priority 0; policy accept;"
                     f" meta l4proto {{ tcp, udp }} numgen random mod {scale} < {threshold} drop; }}\n}}\n")
            out, err, code = _nft(node, rules)
            if code != 0:
                raise MininetUnavailable(f"nftables rules failed on {node.name}: {err.strip() or out.strip()}")
        log.info("loss %.4g per link and direction (nftables)", probability)


class StarNetwork(_Network):
    """N workers, one switch host, one shaped link each.

    Args:
        workers: number of worker hosts (1..250).
        bw_mbit: rate of every worker link in Mbit/s, both directions (None: unshaped veth).
        mtu: MTU of every interface (1500 or 9000; veth takes up to 65535).
        switch: what the switch host runs: "software" (it routes IP; start the software
            switch on it with :meth:`spawn_switch`) or "bmv2" (BMv2 on its interfaces, a controller
            host beside the workers; start both with :meth:`deploy_bmv2`).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, workers: int, bw_mbit: float | None = 100.0, mtu: int = 1500, switch: str = "software") -> None:
        if not 1 <= workers < CONTROLLER_LINK:
            raise ValueError(f"workers={workers}; expected 1..{CONTROLLER_LINK - 1}")
        if switch not in SWITCH_KINDS:
            raise ValueError(f"switch={switch!r}; expected one of {', '.join(SWITCH_KINDS)}")
        super().__init__(bw_mbit, mtu)
        self.n, self.switch_kind = workers, switch
        self.controller_host: Any = None  #: BMv2 star only
        self.bmv2_process: subprocess.Popen | None = None  #: BMv2 star, once deployed
        self._deployer: subprocess.Popen | None = None

    # ------------------------------------------------------------ lifecycle
    def _problem(self) -> str | None:
        return bmv2_problem() if self.switch_kind == "bmv2" else mininet_problem()

    def _add_nodes(self) -> None:
        self.switch = self.net.addHost("sw", ip=None)
        self.hosts = [self.net.addHost(f"h{i}", ip=None) for i in range(self.n)]
        for i, host in enumerate(self.hosts):
            self._add_link(host, self.switch, f"h{i}-eth0", f"sw-eth{i}", self.bw_mbit)
        if self.switch_kind == "bmv2":
            self.controller_host = self.net.addHost("ctl", ip=None)
            self._add_link(self.controller_host, self.switch, "ctl-eth0", "sw-ctl", None)

    def _describe(self) -> str:
        return (f"star: {self.n} workers, {f'{self.bw_mbit:g} Mbit/s links' if self.bw_mbit else 'unshaped links'}, "
                f"MTU {self.mtu}")

    def _links(self) -> list[tuple[int, Any, str, str]]:
        """(link number, host, host interface, switch interface) of every link."""
        links = [(i, host, f"h{i}-eth0", f"sw-eth{i}") for i, host in enumerate(self.hosts)]
        if self.controller_host is not None:
            links.append((CONTROLLER_LINK, self.controller_host, "ctl-eth0", "sw-ctl"))
        return links

    def _configure(self) -> None:
        sw = self.switch
        bmv2 = self.switch_kind == "bmv2"
        if bmv2:
            _check(sw, "sysctl -qw net.ipv4.ip_forward=0")  # BMv2 forwards, the host's kernel must not
        else:
            _check(sw, f"ip addr add {SWITCH_IP}/32 dev lo")
            _route_ip(sw)
        for i, host, h_if, s_if in self._links():
            _address(host, h_if, worker_ip(i), self.mtu)
            _check(host, f"ip route replace default via {gateway_ip(i)} dev {h_if}")
            if bmv2:
                _bmv2_owns(sw, s_if, self.mtu, peer=(host, h_if))
                _check(host, f"ip neigh replace {gateway_ip(i)} lladdr {SWITCH_MAC} dev {h_if} nud permanent")
            else:
                _address(sw, s_if, gateway_ip(i), self.mtu)
            if self.bw_mbit and i != CONTROLLER_LINK:
                _check_shaped((host, h_if), (sw, s_if))
        for i, host, _, _ in self._links():
            _check_route(host, SWITCH_IP, gateway_ip(i))


    # ------------------------------------------------------------------ BMv2
    def port_map(self) -> dict[str, dict[str, Any]]:
        """BMv2 star: every host's IP -> its BMv2 port and MAC (``deploy --ports``'s JSON)."""
        return {worker_ip(i): {"port": bmv2_port(i), "mac": host.intf(h_if).MAC()}
                for i, host, h_if, _ in self._links()}

    def deploy_bmv2(self, workdir: str | os.PathLike, *, window: int = defaults.WINDOW, drop_probability: float = 0.0,
                    config: tuple[str, str] | None = None, timeout: float = 300.0) -> str:
        """Start BMv2 on the switch host and ``switchml-switch deploy --target bmv2`` on the
        controller host; return the controller's endpoint once it serves.

        ``config``: (P4Info, BMv2 JSON) compiled earlier; None compiles with ``--compile``
        (p4c-bm2-ss, a few seconds to a minute). ``drop_probability`` goes to the P4 loss table
        of every port. Logs (``simple_switch_grpc.log``, ``deploy.log``) and the port map go to
        ``workdir``; both processes are stopped by :meth:`stop`.
        """
        if self.switch_kind != "bmv2" or self.net is None:
            raise RuntimeError("deploy_bmv2 needs a started StarNetwork(..., switch='bmv2')")
        self.stop_bmv2()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        socket_path = workdir / "p4runtime.sock"
        bmv2 = self._start_bmv2(self.switch, {bmv2_port(i): s_if for i, _, _, s_if in self._links()}, socket_path,
                                workdir / "simple_switch_grpc.log")
        ports = workdir / "ports.json"
        ports.write_text(json.dumps(self.port_map(), indent=1))
        args = [sys.executable, "-m", "emulation.cli", "deploy", "--target", "bmv2", "--grpc", f"unix:{socket_path}",
                "--device-id", str(BMV2_DEVICE_ID), "--ports", str(ports), "--switch-address", SWITCH_IP,
                # --insecure: the star's namespaces are this process's own, reachable from nothing else
                "--control-host", CONTROLLER_HOST_IP, "--insecure", "--window", str(window),
                "--drop-probability", repr(drop_probability), "--timeout", "30"]
        if config is None:
            args += ["--compile", "--build-dir", str(workdir / "p4")]
        else:
            args += ["--p4info", str(config[0]), "--config", str(config[1])]
        deploy_log = workdir / "deploy.log"
        deployer = self.popen(self.controller_host, args, env=child_env(), log_path=str(deploy_log))
        endpoint = f"tcp://{CONTROLLER_HOST_IP}:{defaults.CONTROL_PORT}"
        try:
            self.wait_for_controller(endpoint, deployer, timeout)
        except SwitchMLError as exc:
            tail = deploy_log.read_text(errors="replace")[-3000:] if deploy_log.exists() else "(no log)"
            raise MininetUnavailable(f"switchml-switch deploy did not come up ({exc}); {deploy_log}:\n{tail}") from None
        log.info("BMv2 star: simple_switch_grpc pid %d, controller on %s (pid %d)", bmv2.pid, CONTROLLER_HOST_IP,
                 deployer.pid)
        self.bmv2_process, self._deployer = bmv2, deployer
        return endpoint


    def stop_bmv2(self) -> None:
        """Stop the controller and BMv2 of :meth:`deploy_bmv2` (by PID), if running."""
        for proc in (self._deployer, self.bmv2_process):
            if proc is not None:
                stop_process(proc, grace=5.0)
        self._deployer = self.bmv2_process = None


def leaf_core_ip(rack: int) -> str:
    """Tree: leaf ``rack``'s address on its core link (its software switch listens here)."""
    return f"10.1.{rack}.1"


def spine_core_ip(rack: int) -> str:
    """Tree: the spine's address on leaf ``rack``'s core link (the leaf's default route)."""
    return f"10.1.{rack}.254"


#: Tree: UDP port of every leaf's software switch and TCP port of its P4Runtime server.
LEAF_PORT, LEAF_P4RUNTIME_PORT = 48870, 9570


def leaf_mac(rack: int) -> str:
    """Tree of BMv2 leaves: the MAC every neighbour's static ARP entry gives leaf ``rack`` (BMv2 answers no ARP)."""
    return f"02:00:00:00:{rack:02x}:fe"


class TreeNetwork(_Network):
    """Racks of worker hosts under leaf hosts, the leaves under one spine host.

    Worker i sits in rack ``i // per_rack``, on a link of ``bw_mbit`` to its leaf; each leaf
    is on a link of ``core_bw_mbit`` to the spine (the core). Leaves and the spine route IP
    between their interfaces; the spine holds ``SWITCH_IP``. :meth:`spawn_switch` starts one
    software switch on the spine (every worker's stream crosses the core), :meth:`spawn_tree`
    a leaf switch on every leaf and the spine of the tree above them; :meth:`core_bytes` counts
    what crossed the core links.

    Args:
        racks: number of racks (leaf hosts), 1..250.
        per_rack: workers per rack; racks * per_rack <= 250.
        bw_mbit: rate of every worker link in Mbit/s (None: unshaped veth).
        core_bw_mbit: rate of every leaf-spine link in Mbit/s (default: ``bw_mbit``).
        mtu: MTU of every interface.
        leaf_switch: what the leaves run: "software" (they route IP; :meth:`spawn_tree` starts a
            software leaf on each) or "bmv2" (BMv2 with the leaf build on their interfaces, set up by
            :meth:`spawn_tree` with ``deploy --target bmv2 --leaf-role``; k = 64).
    """

    def __init__(self, racks: int, per_rack: int, bw_mbit: float | None = 100.0, core_bw_mbit: float | None = None,
                 mtu: int = 1500, leaf_switch: str = "software") -> None:
        if leaf_switch not in SWITCH_KINDS:
            raise ValueError(f"leaf_switch={leaf_switch!r}; expected one of {', '.join(SWITCH_KINDS)}")
        if not 1 <= racks < CONTROLLER_LINK:
            raise ValueError(f"racks={racks}; expected 1..{CONTROLLER_LINK - 1}")
        if per_rack < 1 or racks * per_rack >= CONTROLLER_LINK:
            raise ValueError(f"per_rack={per_rack}: {racks} racks of it must hold 1..{CONTROLLER_LINK - 1} workers")
        super().__init__(bw_mbit, mtu)
        self.racks, self.per_rack = racks, per_rack
        self.n = racks * per_rack
        self.core_bw_mbit = core_bw_mbit if core_bw_mbit is not None else bw_mbit
        self.leaf_switch = leaf_switch
        self.leaves: list[Any] = []

    def _problem(self) -> str | None:
        return bmv2_problem() if self.leaf_switch == "bmv2" else mininet_problem()

    def rack_of(self, i: int) -> int:
        """The rack (leaf index) of worker i."""
        return i // self.per_rack

    def rack_hosts(self, rack: int) -> list[int]:
        """The worker indices in ``rack``."""
        return list(range(rack * self.per_rack, (rack + 1) * self.per_rack))

    def _add_nodes(self) -> None:
        self.switch = self.net.addHost("sp", ip=None)
        self.leaves = [self.net.addHost(f"l{r}", ip=None) for r in range(self.racks)]
        self.hosts = [self.net.addHost(f"h{i}", ip=None) for i in range(self.n)]
        for i, host in enumerate(self.hosts):
            self._add_link(host, self.leaves[self.rack_of(i)], f"h{i}-eth0", self._leaf_intf(i), self.bw_mbit)
        for r, leaf in enumerate(self.leaves):
            self._add_link(leaf, self.switch, f"l{r}-up", f"sp-eth{r}", self.core_bw_mbit)

    def _leaf_intf(self, i: int) -> str:
        return f"l{self.rack_of(i)}-eth{i % self.per_rack}"

    def _nodes(self) -> list[Any]:
        return [*self.hosts, *self.leaves, self.switch]

    def _describe(self) -> str:
        def rate(mbit: float | None) -> str:
            return f"{mbit:g} Mbit/s" if mbit else "unshaped"
        return (f"tree: {self.racks} racks of {self.per_rack} workers ({self.leaf_switch} leaves), worker links "
                f"{rate(self.bw_mbit)}, core links {rate(self.core_bw_mbit)}, MTU {self.mtu}")

    def _configure(self) -> None:
        sp = self.switch
        bmv2 = self.leaf_switch == "bmv2"
        _check(sp, f"ip addr add {SWITCH_IP}/32 dev lo")
        _route_ip(sp)
        for r, leaf in enumerate(self.leaves):
            if bmv2:
                _check(leaf, "sysctl -qw net.ipv4.ip_forward=0")  # BMv2 forwards, the host's kernel must not
                _bmv2_owns(leaf, f"l{r}-up", self.mtu, peer=(sp, f"sp-eth{r}"))
            else:
                _route_ip(leaf)
                _address(leaf, f"l{r}-up", leaf_core_ip(r), self.mtu)
                _check(leaf, f"ip route replace default via {spine_core_ip(r)} dev l{r}-up")
            _address(sp, f"sp-eth{r}", spine_core_ip(r), self.mtu)
            if bmv2:
                _check(sp, f"ip neigh replace {leaf_core_ip(r)} lladdr {leaf_mac(r)} dev sp-eth{r} nud permanent")
            if self.core_bw_mbit:
                _check_shaped((leaf, f"l{r}-up"), (sp, f"sp-eth{r}"))
        for i, host in enumerate(self.hosts):
            r = self.rack_of(i)
            _address(host, f"h{i}-eth0", worker_ip(i), self.mtu)
            if bmv2:
                _bmv2_owns(self.leaves[r], self._leaf_intf(i), self.mtu, peer=(host, f"h{i}-eth0"))
                _check(host, f"ip neigh replace {gateway_ip(i)} lladdr {leaf_mac(r)} dev h{i}-eth0 nud permanent")
            else:
                _address(self.leaves[r], self._leaf_intf(i), gateway_ip(i), self.mtu)
            _check(host, f"ip route replace default via {gateway_ip(i)} dev h{i}-eth0")
            _check(sp, f"ip route replace {worker_subnet(i)} via {leaf_core_ip(r)} dev sp-eth{r}")
            if self.bw_mbit:
                _check_shaped((host, f"h{i}-eth0"), (self.leaves[r], self._leaf_intf(i)))
        for i, host in enumerate(self.hosts):
            _check_route(host, SWITCH_IP, gateway_ip(i))
            # the other racks are reached through this rack's leaf, then the spine
            _check_route(host, worker_ip((i + self.per_rack) % self.n), gateway_ip(i))

    def spawn_tree(self, log_dir: str | os.PathLike, env: dict[str, str] | None = None, *,
                   leaf_port: int = LEAF_PORT, leaf_p4runtime_port: int = LEAF_P4RUNTIME_PORT,
                   pool_size: int | None = None, leaf_drop_probability: float = 0.0,
                   leaf_config: tuple[str, str] | None = None, **options: Any) -> list[subprocess.Popen]:
        """A leaf switch on every leaf host and the spine's switch and controller (``emulate --leaf
        ...``, each leaf's rack by its hosts' IPs), ready once worker 0 gets the controller's ``hello``.

        Software leaves: ``emulate --no-controller --leaf-role`` on each leaf's core address. BMv2
        leaves: ``simple_switch_grpc`` on each leaf's interfaces (rack worker j on port j+1, the
        uplink on port per_rack+1, P4Runtime on ``log_dir``/leaf{r}.sock), set up by ``deploy
        --target bmv2 --leaf-role`` with the leaf's port map (``log_dir``/leaf{r}-ports.json) and
        ``leaf_drop_probability`` on each of its ports; ``leaf_config``: (P4Info, BMv2 JSON) of the
        leaf build compiled earlier (None: compiled here, once). Returns [spine, leaf 0, leaf 1,
        ...]; all are stopped by :meth:`stop` if still running. Logs: ``log_dir``/spine.log and
        leaf{r}.log. ``options``: the spine's ``spawn_switch`` options (port, control_port,
        window, k, extra, ...).
        """
        log_dir = Path(log_dir)
        if self.leaf_switch == "bmv2":
            leaves, specs = self._spawn_bmv2_leaves(log_dir, leaf_port, leaf_drop_probability, leaf_config)
            options.setdefault("k", P4_K)  # the BMv2 leaves take k = 64 only
        else:
            leaves, specs = [], []
            for r, leaf in enumerate(self.leaves):
                cmd = emulate_command(leaf_core_ip(r), leaf_port, pool_size=pool_size,
                                      extra=["--no-controller", "--p4runtime-port", str(leaf_p4runtime_port),
                                             "--leaf-role"])
                leaves.append(self.popen(leaf, cmd, env=child_env(env), log_path=str(log_dir / f"leaf{r}.log")))
                specs.append(f"p4runtime={leaf_core_ip(r)}:{leaf_p4runtime_port}")
        for r in range(self.racks):
            hosts = "+".join(worker_ip(i) for i in self.rack_hosts(r))
            specs[r] += f",data={leaf_core_ip(r)}:{leaf_port},hosts={hosts}"
        options["extra"] = [*options.get("extra", ()), *(arg for spec in specs for arg in ("--leaf", spec))]
        try:
            spine = self.spawn_switch(log_dir / "spine.log", env=env, pool_size=pool_size, **options)
        except SwitchMLError as exc:
            dead = [f"leaf {r} exited with {proc.returncode}: "
                    f"{(log_dir / f'leaf{r}.log').read_text(errors='replace')[-1500:]}"
                    for r, proc in enumerate(leaves) if proc.poll() is not None]
            raise SwitchMLError("; ".join([str(exc), *dead])) from None
        return [spine, *leaves]

    def _spawn_bmv2_leaves(self, log_dir: Path, leaf_port: int, drop_probability: float,
                           config: tuple[str, str] | None) -> tuple[list[subprocess.Popen], list[str]]:
        """BMv2 with the leaf build on every leaf, set up; (their processes, the start of each ``--leaf`` spec)."""
        if config is None:
            from switchml.deploy import compile_bmv2

            config = tuple(map(str, compile_bmv2(log_dir / "p4", leaf_role=True)))
        processes, specs = [], []
        uplink_port = self.per_rack + 1
        for r, leaf in enumerate(self.leaves):
            ports = {worker_ip(i): {"port": j + 1, "mac": self.hosts[i].intf(f"h{i}-eth0").MAC()}
                     for j, i in enumerate(self.rack_hosts(r))}
            ports[SWITCH_IP] = {"port": uplink_port, "mac": self.switch.intf(f"sp-eth{r}").MAC()}
            ports_path = log_dir / f"leaf{r}-ports.json"
            ports_path.write_text(json.dumps(ports, indent=1))
            socket_path = (log_dir / f"leaf{r}.sock").resolve()
            interfaces = {j + 1: f"l{r}-eth{j}" for j in range(self.per_rack)} | {uplink_port: f"l{r}-up"}
            processes.append(self._start_bmv2(leaf, interfaces, socket_path, log_dir / f"leaf{r}.log"))
            setup_log = log_dir / f"leaf{r}-deploy.log"
            setup = self.popen(leaf, [sys.executable, "-m", "emulation.cli", "deploy", "--target", "bmv2", "--leaf-role",
                                      "--grpc", f"unix:{socket_path}", "--device-id", str(BMV2_DEVICE_ID),
                                      "--p4info", config[0], "--config", config[1], "--ports", str(ports_path),
                                      "--drop-probability", repr(drop_probability), "--timeout", "30"],
                               env=child_env(), log_path=str(setup_log))
            try:
                code = setup.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                tail = setup_log.read_text(errors="replace")[-3000:] if setup_log.exists() else "(no log)"
                raise MininetUnavailable(f"deploy --leaf-role on leaf {r} failed ({code}); {setup_log}:\n{tail}")
            specs.append(f"p4runtime=unix:{socket_path},kind=bmv2,ports={ports_path.resolve()}")
        return processes, specs

    def core_bytes(self) -> dict[str, int]:
        """Bytes the core links have carried so far, per direction, read from the spine's interfaces
        (Ethernet headers included): ``up{r}`` leaf r to the spine, ``down{r}`` the spine to leaf r."""
        counters = _interface_bytes(self.switch)
        out = {}
        for r in range(self.racks):
            rx, tx = counters[f"sp-eth{r}"]
            out[f"up{r}"], out[f"down{r}"] = rx, tx
        return out


def _route_ip(node: Any) -> None:
    """``node`` forwards IP between its interfaces, and answers on any of them for any of its
    addresses (``SWITCH_IP``, a leaf's core address): no reverse-path surprises."""
    _check(node, "sysctl -qw net.ipv4.ip_forward=1")
    _check(node, "sysctl -qw net.ipv4.conf.all.rp_filter=0")


def _bmv2_owns(node: Any, intf: str, mtu: int, peer: tuple[Any, str]) -> None:
    """BMv2 runs on ``node``'s ``intf``: the host's kernel must not answer there (it sees every frame
    too; the caller turns its IP forwarding off once per node), so it gets no address and no IPv6;
    BMv2 reads and writes whole frames, so ``intf`` and its ``peer`` (node, interface) lose their
    segmentation and checksum offloads (64 KB TCP super-frames, frames whose checksum is unfilled)."""
    _check(node, f"ip addr flush dev {intf}")
    _check(node, f"ip link set dev {intf} mtu {mtu}")
    _check(node, f"sysctl -qw net.ipv6.conf.{intf}.disable_ipv6=1")
    for n, i in ((node, intf), peer):
        _check(n, f"ethtool -K {i} rx off tx off sg off tso off gso off gro off >/dev/null")


def _address(node: Any, intf: str, ip: str, mtu: int) -> None:
    """``intf`` of ``node`` gets ``ip``/24 (and nothing else) and ``mtu``."""
    _check(node, f"ip addr flush dev {intf}")
    _check(node, f"ip link set dev {intf} mtu {mtu}")
    _check(node, f"ip addr add {ip}/24 dev {intf}")


def _check_shaped(*ends: tuple[Any, str]) -> None:
    """Raise unless tc shapes each (node, interface) with a rate (htb, tbf or hfsc)."""
    for node, intf in ends:
        qdisc = node.cmd(f"tc qdisc show dev {intf}")
        classes = node.cmd(f"tc class show dev {intf}")
        if not any(q in qdisc for q in ("htb", "tbf", "hfsc")) or "rate" not in classes + qdisc:
            raise MininetUnavailable(f"link shaping failed on {node.name}:{intf} (tc shows {qdisc.strip()!r}); "
                                     "this kernel may lack sch_htb")


def _check_route(node: Any, destination: str, via: str) -> None:
    """Raise unless ``node`` routes ``destination`` through ``via``."""
    out = node.cmd(f"ip route get {destination}")
    if via not in out:
        raise MininetUnavailable(f"{node.name} has no route to {destination} via {via}: {out.strip()!r}")


def _interface_bytes(node: Any) -> dict[str, tuple[int, int]]:
    """(received, sent) bytes of every interface of ``node``'s namespace (``/proc/net/dev``)."""
    out = {}
    for line in node.cmd("cat /proc/net/dev").splitlines()[2:]:
        name, sep, fields = line.partition(":")
        if sep:
            values = fields.split()
            out[name.strip()] = (int(values[0]), int(values[8]))
    return out



def _wait_for(ready: Any, proc: subprocess.Popen, log_path: Path, timeout: float, what: str) -> None:
    """Poll ``ready()`` until true; raise with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:g} s"
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else "(no log)"
            raise MininetUnavailable(f"{what} ({state}); {log_path}:\n{tail}")
        time.sleep(0.1)


def _nft(host: Any, rules: str) -> tuple[str, str, int]:
    proc = host.popen(["nft", "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(rules.encode(), timeout=10)
    return out.decode(), err.decode(), proc.returncode


def _check(node: Any, command: str) -> str:
    """Run ``command`` in ``node``; raise if it fails."""
    out = node.cmd(f"{command}; echo __rc=$?")
    text, _, rc = out.rpartition("__rc=")
    if rc.strip() != "0":
        raise MininetUnavailable(f"{node.name}: `{command}` failed: {text.strip()}")
    return text
