"""A Mininet star: N worker hosts, each on its own bandwidth-limited link to one switch host.

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

Never call ``mn -c`` (it kills processes by name machine-wide); :meth:`StarNetwork.stop`
kills the processes this object started, by PID, then calls ``net.stop()``.
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

from emulation.spawn import child_env, spawn_switch, stop_process, wait_command
from switchml import defaults
from switchml.errors import SwitchMLError

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


def gateway_ip(i: int) -> str:
    """The switch host's address on worker i's link (BMv2 star: only its ARP entry exists)."""
    return f"10.0.{i}.254"


CONTROLLER_HOST_IP = worker_ip(CONTROLLER_LINK)  #: BMv2 star: where the controller runs


def bmv2_port(i: int) -> int:
    """BMv2 port of link i (worker i; ``CONTROLLER_LINK`` is the controller host's)."""
    return i + 1


class StarNetwork:
    """N workers, one switch host, one shaped link each.

    Args:
        workers: number of worker hosts (1..250).
        bw_mbit: rate of every worker link in Mbit/s, both directions (None: unshaped veth).
        mtu: MTU of every interface (1500 or 9000; veth takes up to 65535).
        switch: what the switch host runs: "software" (it routes IP; start the software
            switch on it with :meth:`popen`) or "bmv2" (BMv2 on its interfaces, a controller
            host beside the workers; start both with :meth:`deploy_bmv2`).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, workers: int, bw_mbit: float | None = 100.0, mtu: int = 1500, switch: str = "software") -> None:
        if not 1 <= workers < CONTROLLER_LINK:
            raise ValueError(f"workers={workers}; expected 1..{CONTROLLER_LINK - 1}")
        if switch not in SWITCH_KINDS:
            raise ValueError(f"switch={switch!r}; expected one of {', '.join(SWITCH_KINDS)}")
        self.n, self.bw_mbit, self.mtu, self.switch_kind = workers, bw_mbit, mtu, switch
        self.net: Any = None
        self.switch: Any = None
        self.hosts: list[Any] = []
        self.controller_host: Any = None  #: BMv2 star only
        self.bmv2_process: subprocess.Popen | None = None  #: BMv2 star, once deployed
        self._deployer: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> StarNetwork:
        problem = bmv2_problem() if self.switch_kind == "bmv2" else mininet_problem()
        if problem:
            raise MininetUnavailable(problem)
        from mininet.link import TCLink
        from mininet.log import setLogLevel
        from mininet.net import Mininet

        # TCLink reports tc's harmless "quantum of class is big" warnings at error level; start()
        # verifies the shaping itself instead.
        setLogLevel("critical")
        self.net = Mininet(topo=None, build=False, controller=None, autoSetMacs=False, autoStaticArp=False,
                           waitConnected=False)
        try:
            self.switch = self.net.addHost("sw", ip=None)
            self.hosts = [self.net.addHost(f"h{i}", ip=None) for i in range(self.n)]
            params = {"bw": self.bw_mbit} if self.bw_mbit else {}
            for i, host in enumerate(self.hosts):
                link_cls = TCLink if self.bw_mbit else None
                kwargs = {"cls": link_cls, **params} if link_cls else {}
                self.net.addLink(host, self.switch, intfName1=f"h{i}-eth0", intfName2=f"sw-eth{i}", **kwargs)
            if self.switch_kind == "bmv2":
                self.controller_host = self.net.addHost("ctl", ip=None)
                self.net.addLink(self.controller_host, self.switch, intfName1="ctl-eth0", intfName2="sw-ctl")
            self.net.build()
            self._configure()
        except BaseException:
            self.stop()
            raise
        log.info("mininet star up: %d workers, %s, MTU %d", self.n,
                 f"{self.bw_mbit:g} Mbit/s links" if self.bw_mbit else "unshaped links", self.mtu)
        return self

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
            # BMv2 owns the switch's interfaces: the host's kernel must neither route nor answer
            # on them (it sees every frame too), so they get no address and no IPv6.
            _check(sw, "sysctl -qw net.ipv4.ip_forward=0")
        else:
            _check(sw, f"ip addr add {SWITCH_IP}/32 dev lo")
            _check(sw, "sysctl -qw net.ipv4.ip_forward=1")
            # the switch host answers on every interface for SWITCH_IP; no reverse-path surprises
            _check(sw, "sysctl -qw net.ipv4.conf.all.rp_filter=0")
        for i, host, h_if, s_if in self._links():
            _check(host, f"ip addr flush dev {h_if}")
            _check(host, f"ip link set dev {h_if} mtu {self.mtu}")
            _check(host, f"ip addr add {worker_ip(i)}/24 dev {h_if}")
            _check(host, f"ip route replace default via {gateway_ip(i)} dev {h_if}")
            _check(sw, f"ip addr flush dev {s_if}")
            _check(sw, f"ip link set dev {s_if} mtu {self.mtu}")
            if bmv2:
                _check(host, f"ip neigh replace {gateway_ip(i)} lladdr {SWITCH_MAC} dev {h_if} nud permanent")
                _check(sw, f"sysctl -qw net.ipv6.conf.{s_if}.disable_ipv6=1")
                # BMv2 reads and writes whole frames: a veth's segmentation offloads would hand it
                # 64 KB TCP super-frames, and checksum offload frames whose checksum is unfilled.
                for node, intf in ((host, h_if), (sw, s_if)):
                    _check(node, f"ethtool -K {intf} rx off tx off sg off tso off gso off gro off >/dev/null")
            else:
                _check(sw, f"ip addr add {gateway_ip(i)}/24 dev {s_if}")
            if self.bw_mbit and i != CONTROLLER_LINK:
                for node, intf in ((host, h_if), (sw, s_if)):
                    qdisc = node.cmd(f"tc qdisc show dev {intf}")
                    classes = node.cmd(f"tc class show dev {intf}")
                    if not any(q in qdisc for q in ("htb", "tbf", "hfsc")) or "rate" not in classes + qdisc:
                        raise MininetUnavailable(f"link shaping failed on {node.name}:{intf} (tc shows {qdisc.strip()!r}); "
                                                 "this kernel may lack sch_htb")
        for i, host, _, _ in self._links():
            out = host.cmd(f"ip route get {SWITCH_IP}")
            if gateway_ip(i) not in out:
                raise MininetUnavailable(f"{host.name} has no route to the switch: {out.strip()!r}")

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

    def __enter__(self) -> StarNetwork:
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
        socket_path.unlink(missing_ok=True)
        interfaces = [arg for i, _, _, s_if in self._links() for arg in ("-i", f"{bmv2_port(i)}@{s_if}")]
        bmv2_log = workdir / "simple_switch_grpc.log"
        bmv2 = self.popen(self.switch, ["simple_switch_grpc", "--device-id", str(BMV2_DEVICE_ID), "--no-p4",
                                        *interfaces, "--", "--grpc-server-addr", f"unix:{socket_path}"],
                          log_path=str(bmv2_log))
        _wait_for(lambda: socket_path.exists(), bmv2, bmv2_log, 30, f"simple_switch_grpc did not open {socket_path}")
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

    def stop_bmv2(self) -> None:
        """Stop the controller and BMv2 of :meth:`deploy_bmv2` (by PID), if running."""
        for proc in (self._deployer, self.bmv2_process):
            if proc is not None:
                stop_process(proc, grace=5.0)
        self._deployer = self.bmv2_process = None

    def set_loss(self, probability: float) -> None:
        """Drop ``probability`` of the IP packets that cross each link, in each direction (nftables).

        Every node (workers and switch host) drops that share of the packets it receives, in
        its prerouting hook: a packet is dropped on arrival, never by its sender's own
        output hook (a sender would get EPERM from ``sendto`` instead of a silent loss).
        A worker-to-worker packet (Gloo) crosses two links, so it meets two chances of loss.
        """
        if shutil.which("nft") is None:
            raise MininetUnavailable("'nft' is not on PATH: apt-get install -y --no-install-recommends nftables")
        scale = 1_000_000
        threshold = round(probability * scale)
        for node in [*self.hosts, self.switch]:
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
