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

Never call ``mn -c`` (it kills processes by name machine-wide); :meth:`StarNetwork.stop`
kills the processes this object started, by PID, then calls ``net.stop()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

SWITCH_IP = "10.255.255.254"  #: the switch host's own address (on its loopback)
NFT_TABLE = "switchml_loss"


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
                "(apt-get install -y --no-install-recommends mininet iperf3 bridge-utils nftables) and run "
                "scripts/setup.sh, which links /usr/lib/python3/dist-packages/mininet into the virtual environment")
    for tool in ("mnexec", "tc", "ip"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH (Debian packages mininet and iproute2)"
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
    """The switch host's address on worker i's link."""
    return f"10.0.{i}.254"


class StarNetwork:
    """N workers, one switch host, one shaped link each.

    Args:
        workers: number of worker hosts (1..250).
        bw_mbit: rate of every link in Mbit/s, both directions (None: unshaped veth).
        mtu: MTU of every interface (1500 or 9000; veth takes up to 65535).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, workers: int, bw_mbit: float | None = 100.0, mtu: int = 1500) -> None:
        if not 1 <= workers <= 250:
            raise ValueError(f"workers={workers}; expected 1..250")
        self.n, self.bw_mbit, self.mtu = workers, bw_mbit, mtu
        self.net: Any = None
        self.switch: Any = None
        self.hosts: list[Any] = []
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> StarNetwork:
        require_mininet()
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
            self.net.build()
            self._configure()
        except BaseException:
            self.stop()
            raise
        log.info("mininet star up: %d workers, %s, MTU %d", self.n,
                 f"{self.bw_mbit:g} Mbit/s links" if self.bw_mbit else "unshaped links", self.mtu)
        return self

    def _configure(self) -> None:
        sw = self.switch
        _check(sw, f"ip addr add {SWITCH_IP}/32 dev lo")
        _check(sw, "sysctl -qw net.ipv4.ip_forward=1")
        # the switch host answers on every interface for SWITCH_IP; no reverse-path surprises
        _check(sw, "sysctl -qw net.ipv4.conf.all.rp_filter=0")
        for i, host in enumerate(self.hosts):
            h_if, s_if = f"h{i}-eth0", f"sw-eth{i}"
            _check(host, f"ip addr flush dev {h_if}")
            _check(host, f"ip link set dev {h_if} mtu {self.mtu}")
            _check(host, f"ip addr add {worker_ip(i)}/24 dev {h_if}")
            _check(host, f"ip route replace default via {gateway_ip(i)} dev {h_if}")
            _check(sw, f"ip addr flush dev {s_if}")
            _check(sw, f"ip link set dev {s_if} mtu {self.mtu}")
            _check(sw, f"ip addr add {gateway_ip(i)}/24 dev {s_if}")
            if self.bw_mbit:
                for node, intf in ((host, h_if), (sw, s_if)):
                    qdisc = node.cmd(f"tc qdisc show dev {intf}")
                    classes = node.cmd(f"tc class show dev {intf}")
                    if not any(q in qdisc for q in ("htb", "tbf", "hfsc")) or "rate" not in classes + qdisc:
                        raise MininetUnavailable(f"link shaping failed on {node.name}:{intf} (tc shows {qdisc.strip()!r}); "
                                                 "this kernel may lack sch_htb")
        for i, host in enumerate(self.hosts):
            out = host.cmd(f"ip route get {SWITCH_IP}")
            if gateway_ip(i) not in out:
                raise MininetUnavailable(f"h{i} has no route to the switch: {out.strip()!r}")

    def stop(self) -> None:
        """Kill the processes started here (by PID), remove loss rules, then ``net.stop()``."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
                except ProcessLookupError:
                    pass
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
