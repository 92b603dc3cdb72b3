"""Targets for the conformance suite: one interface, one implementation per kind of switch.

A ``Harness`` owns a running switch that it programs over P4Runtime (``P4RuntimeTarget``,
the controller's own code path) and hands out ``Host`` endpoints that send crafted switchml
packets to it and receive its replies:

- ``SoftwareHarness``: the software switch on its UDP socket on loopback, with its
  P4Runtime server; hosts are UDP sockets (the switch sees UDP payloads and addresses).
- ``Bmv2Harness``: ``simple_switch_grpc`` running the compiled ``p4/switchml_v1model.p4`` in
  a network namespace this harness creates, one veth pair per host; hosts inject and
  capture whole Ethernet/IPv4/UDP frames (scapy) on raw sockets opened inside that
  namespace. BMv2's P4Runtime server listens on a Unix socket, which needs no route into
  the namespace. It needs root, ``ip``, ``p4c-bm2-ss`` and ``simple_switch_grpc``.
- ``VethSoftwareHarness``: the software switch behind the same namespace, veth pairs and
  raw-socket hosts as BMv2 (through a small L2 shim), so that the BMv2 harness's packet
  I/O is exercised wherever root is available, BMv2 or not.

``SoftwareHarness(leaf_role=True)`` and ``Bmv2Harness(..., leaf_role=True)`` run the leaf role
(docs/hierarchy.md): the software switch serving the leaf P4Info, BMv2 running the program
built with ``-DSWITCHML_LEAF_ROLE``; ``tests/conformance/test_leaf_conformance.py`` uses them.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy_layer import SwitchML

from emulation.p4runtime_server import P4RuntimeServer
from emulation.server import SwitchServer
from emulation.switch import SoftwareSwitch
from switchml import pipeline, protocol
from switchml.deploy import compile_bmv2
from switchml.p4info import P4Info, with_leaf_role
from switchml.p4runtime_target import P4RuntimeError, P4RuntimeTarget

log = logging.getLogger(__name__)

POOL_SIZE = 1024  # the P4 programs' compiled-in pool (p4/include/constants.p4)


class Host(ABC):
    """A sender/receiver attached to the switch: (ip, udp_port) is its identity, ``port`` its
    switch port, ``mac`` its MAC (used by the P4 targets' egress rewrite)."""

    ip: str
    udp_port: int
    port: int
    mac: str

    @abstractmethod
    def send(self, packet: SwitchML | bytes) -> None:
        """Send a switchml packet (or raw UDP payload bytes) to the switch's UDP port."""

    @abstractmethod
    def recv(self, timeout: float) -> SwitchML | None:
        """The next switchml packet addressed to this host, or None after ``timeout``."""

    @abstractmethod
    def recv_from(self, timeout: float) -> tuple[SwitchML, tuple[str, int]] | None:
        """``recv``, with the (ip, udp port) the packet came from."""

    @abstractmethod
    def close(self) -> None: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ip}:{self.udp_port}, port {self.port})"


class Harness(ABC):
    """A running switch under test."""

    name: str
    p4rt: P4RuntimeTarget
    reply_timeout: float  #: how long an expected reply may take
    quiet_time: float  #: how long to listen to conclude that no reply comes
    #: size enums the target takes for UPDATE packets
    update_sizes: frozenset[int]
    forwards_plain_ipv4: bool  #: the target forwards traffic that is not switchml's
    max_payload: int  #: largest UDP payload a host can send to it (the links' MTU)
    address: tuple[str, int]  #: the switch's (ip, udp port) as its hosts address it
    leaf_role: bool = False  #: whether it runs the leaf role's pipeline

    @abstractmethod
    def reset(self) -> None:
        """Fresh state: push the pipeline again (empty tables, zeroed counters and slots)."""

    @abstractmethod
    def make_host(self, index: int) -> Host:
        """Host ``index`` (0..max_hosts-1), each on its own switch port."""

    @abstractmethod
    def make_stranger(self) -> Host:
        """A host with an address no table knows (on host 0's port)."""

    max_hosts: int

    @abstractmethod
    def close(self) -> None: ...


# --------------------------------------------------------------------------------------
# Software switch
# --------------------------------------------------------------------------------------
class UdpHost(Host):
    """A UDP socket on loopback; the switch sees its (ip, port) as the sender."""

    def __init__(self, switch_address: tuple[str, int], port: int, ip: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.ip, self.udp_port = self.sock.getsockname()
        self.port, self.mac = port, f"02:00:00:00:01:{port:02x}"
        self.switch_address = switch_address

    def send(self, packet: SwitchML | bytes) -> None:
        self.sock.sendto(bytes(packet), self.switch_address)

    def recv(self, timeout: float) -> SwitchML | None:
        received = self.recv_from(timeout)
        return None if received is None else received[0]

    def recv_from(self, timeout: float) -> tuple[SwitchML, tuple[str, int]] | None:
        self.sock.settimeout(timeout)
        try:
            data, source = self.sock.recvfrom(65536)
        except TimeoutError:
            return None
        return SwitchML(data), source

    def close(self) -> None:
        self.sock.close()


class SoftwareHarness(Harness):
    """The software switch on loopback, programmed over its own P4Runtime server."""

    name = "software"
    reply_timeout = 3.0
    quiet_time = 0.15
    update_sizes = frozenset(protocol.SIZE_TO_K)
    forwards_plain_ipv4 = False
    max_payload = 65000
    max_hosts = 8

    def __init__(self, leaf_role: bool = False) -> None:
        self.leaf_role = leaf_role
        self.name = "software-leaf" if leaf_role else "software"
        p4info = with_leaf_role() if leaf_role else None
        self.switch = SoftwareSwitch(pool_size=POOL_SIZE)
        self.server = SwitchServer(self.switch, "127.0.0.1", 0).start()
        self.address = self.server.address
        self.p4runtime = P4RuntimeServer(self.switch, "127.0.0.1", 0, p4info=p4info).start()
        try:
            self.p4rt = P4RuntimeTarget(self.p4runtime.grpc_address, p4info=p4info,
                                        supported_k=tuple(protocol.SIZE_TO_K.values()))
        except Exception:
            self.p4runtime.stop()
            self.server.stop()
            raise

    def reset(self) -> None:
        self.p4rt.set_pipeline(b"")

    def make_host(self, index: int) -> Host:
        return UdpHost(self.server.address, index + 1)

    def make_stranger(self) -> Host:
        return UdpHost(self.server.address, 1)

    def close(self) -> None:
        self.p4rt.close()
        self.p4runtime.stop()
        self.server.stop()


# --------------------------------------------------------------------------------------
# BMv2 in a network namespace
# --------------------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SWITCH_MAC = "02:00:00:00:00:fe"
SWITCH_IP = "10.0.0.254"


def netns_unavailable() -> str | None:
    """Why a harness in a network namespace cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: it creates a network namespace, veth pairs and raw sockets"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not on PATH"
    return None


def bmv2_unavailable() -> str | None:
    """Why the BMv2 harness cannot run here, or None."""
    missing = [tool for tool in ("p4c-bm2-ss", "simple_switch_grpc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH (p4c and BMv2 are not installable from this project's registries)"
    return netns_unavailable()


@contextlib.contextmanager
def in_netns(name: str):
    """Run the block with this thread in network namespace ``name``.

    Sockets belong to the namespace of the thread that creates them, so a raw socket opened
    here keeps capturing in ``name`` after the thread has switched back.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as own, open(f"/var/run/netns/{name}") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(own.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back from {name}: {os.strerror(err)}")


class RawHost(Host):
    """Injects and captures Ethernet frames on a veth end inside the harness's namespace."""

    def __init__(self, netns: str, iface: str, ip: str, mac: str, udp_port: int, port: int) -> None:
        self.iface, self.ip, self.mac, self.udp_port, self.port = iface, ip, mac, udp_port, port
        with in_netns(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((iface, ETH_P_ALL))

    def frame(self, packet: SwitchML | bytes) -> bytes:
        payload = packet if isinstance(packet, SwitchML) else Raw(bytes(packet))
        return bytes(Ether(src=self.mac, dst=SWITCH_MAC) / IP(src=self.ip, dst=SWITCH_IP)
                     / UDP(sport=self.udp_port, dport=protocol.UDP_PORT) / payload)

    def send(self, packet: SwitchML | bytes) -> None:
        self.sock.send(self.frame(packet))

    def send_frame(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv_frame(self, timeout: float, accept) -> Ether | None:
        """The next incoming frame for which ``accept(frame)`` is true."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            data, address = self.sock.recvfrom(65536)
            if address[2] == PACKET_OUTGOING:  # our own transmissions are looped back to us
                continue
            frame = Ether(data)
            if accept(frame):
                return frame
        return None

    def recv(self, timeout: float) -> SwitchML | None:
        received = self.recv_from(timeout)
        return None if received is None else received[0]

    def recv_from(self, timeout: float) -> tuple[SwitchML, tuple[str, int]] | None:
        def mine(frame: Ether) -> bool:
            return (IP in frame and UDP in frame and frame[IP].dst == self.ip
                    and frame[UDP].dport == self.udp_port and frame[UDP].sport == protocol.UDP_PORT)

        frame = self.recv_frame(timeout, mine)
        return None if frame is None else (SwitchML(bytes(frame[UDP].payload)), (frame[IP].src, frame[UDP].sport))

    def close(self) -> None:
        self.sock.close()


class NetnsHarness(Harness):
    """A switch attached to one veth pair per port in a network namespace of its own.

    Host i sends and captures on ``h{i+1}``; the switch owns ``s{i+1}`` (switch port i+1).
    Subclasses start the switch on the ``s`` ends and set ``self.p4rt``.
    """

    reply_timeout = 5.0
    quiet_time = 0.5
    max_payload = 1500 - 20 - 8  # veth MTU less IPv4 and UDP headers
    max_hosts = 6
    address = (SWITCH_IP, protocol.UDP_PORT)

    def __init__(self) -> None:
        self.netns = f"swml{type(self).__name__[:4].lower()}{os.getpid()}"
        _ip("netns", "add", self.netns)
        try:
            ns = self.netns
            # no IPv6: no router solicitations or MLD reports on the links
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True, timeout=30)
            _ip("-n", ns, "link", "set", "lo", "up")
            for port in range(1, self.max_hosts + 1):
                _ip("-n", ns, "link", "add", f"h{port}", "type", "veth", "peer", "name", f"s{port}")
                for end in (f"h{port}", f"s{port}"):
                    _ip("-n", ns, "link", "set", end, "up")
            self._start_switch()
        except BaseException:
            self.close()
            raise

    @abstractmethod
    def _start_switch(self) -> None:
        """Start the switch on s1..s{max_hosts} (ports 1..max_hosts) and connect ``self.p4rt``."""

    def make_host(self, index: int) -> Host:
        port = index + 1
        return RawHost(self.netns, f"h{port}", f"10.0.0.{port}", f"02:00:00:00:00:{port:02x}", 40000 + port, port)

    def make_stranger(self) -> Host:
        return RawHost(self.netns, "h1", "10.0.0.99", "02:00:00:00:00:63", 41000, 1)

    def close(self) -> None:
        p4rt = getattr(self, "p4rt", None)
        if p4rt is not None:
            p4rt.close()
        self._stop_switch()
        # deleting the namespace deletes the veth pairs in it
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)

    def _stop_switch(self) -> None:
        """Stop what ``_start_switch`` started (it may have failed half way)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class Bmv2Harness(NetnsHarness):
    """simple_switch_grpc running the compiled p4/switchml_v1model.p4 on the veth pairs (with
    ``leaf_role``, the program built with -DSWITCHML_LEAF_ROLE)."""

    name = "bmv2"
    update_sizes = frozenset({1})  # k = 64 is compiled in
    forwards_plain_ipv4 = True
    device_id = 0

    def __init__(self, workdir: Path, leaf_role: bool = False) -> None:
        self.workdir, self.leaf_role = workdir, leaf_role
        self.name = "bmv2-leaf" if leaf_role else "bmv2"
        self.process: subprocess.Popen | None = None
        self.p4info_path, self.json_path = compile_bmv2(workdir, leaf_role=leaf_role)
        self.device_config = self.json_path.read_bytes()
        super().__init__()

    def _start_switch(self) -> None:
        interfaces = [arg for port in range(1, self.max_hosts + 1) for arg in ("-i", f"{port}@s{port}")]
        # P4Runtime on a Unix socket: reachable from the test process without a route into the namespace
        self.grpc_socket = self.workdir / "p4runtime.sock"
        self.log_path = self.workdir / "simple_switch_grpc.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "simple_switch_grpc", "--device-id", str(self.device_id),
                 "--no-p4", *interfaces, "--", "--grpc-server-addr", f"unix:{self.grpc_socket}"],
                stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.grpc_socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"simple_switch_grpc did not open {self.grpc_socket}:\n{self._log_tail()}")
            time.sleep(0.1)
        self.p4rt = P4RuntimeTarget(f"unix:{self.grpc_socket}", self.device_id, p4info=P4Info.load(self.p4info_path),
                                    timeout=20, supported_k=pipeline.P4_SUPPORTED_K, pipeline_config=self.device_config)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def reset(self) -> None:
        # Whether BMv2 keeps multicast groups across a pipeline push depends on its version:
        # delete those its server reports (older PI versions cannot read the PRE), and tests
        # take fresh group ids (Env.mgid) anyway.
        try:
            for mgid in self.p4rt.read_multicast_groups():
                self.p4rt.delete_multicast_group(mgid, ())
        except P4RuntimeError as exc:
            log.debug("not clearing multicast groups: %s", exc)
        self.p4rt.set_pipeline(self.device_config)

    def _stop_switch(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class VethSoftwareHarness(NetnsHarness):
    """The software switch behind the same veth pairs as BMv2, through a small L2 shim.

    The shim reads frames on the switch's ends, hands each switchml UDP payload and its
    sender to ``SoftwareSwitch.process`` and sends the replies as Ethernet/IPv4/UDP frames
    out of the port where the destination was last seen. It runs the BMv2 harness's packet
    I/O (namespace, raw sockets, frames, filters, timing) against the reference switch, so
    that I/O is known to work before it meets BMv2.
    """

    name = "software-veth"
    update_sizes = frozenset(protocol.SIZE_TO_K)
    forwards_plain_ipv4 = False

    def _start_switch(self) -> None:
        self.switch = SoftwareSwitch(pool_size=POOL_SIZE)
        self.ports: dict[int, socket.socket] = {}
        with in_netns(self.netns):
            for port in range(1, self.max_hosts + 1):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                sock.bind((f"s{port}", ETH_P_ALL))
                self.ports[port] = sock
        self._where: dict[str, tuple[int, str]] = {}  # ip -> (port, mac), learned from senders
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._forward, name="veth-shim", daemon=True)
        self._thread.start()
        self.p4runtime = P4RuntimeServer(self.switch, "127.0.0.1", 0).start()
        self.p4rt = P4RuntimeTarget(self.p4runtime.grpc_address, supported_k=tuple(protocol.SIZE_TO_K.values()))

    def _forward(self) -> None:
        by_fd = {sock.fileno(): (port, sock) for port, sock in self.ports.items()}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(by_fd), [], [], 0.1)
            for fd in ready:
                port, sock = by_fd[fd]
                data, address = sock.recvfrom(65536)
                if address[2] == PACKET_OUTGOING:
                    continue
                frame = Ether(data)
                if IP not in frame or UDP not in frame:
                    continue
                src = (frame[IP].src, frame[UDP].sport)
                self._where[src[0]] = (port, frame.src)
                if frame[UDP].dport & 0xFFF0 != protocol.UDP_PORT:
                    continue
                for payload, (ip, udp_port) in self.switch.process(bytes(frame[UDP].payload), src):
                    out_port, mac = self._where.get(ip, (None, None))
                    if out_port is None:
                        log.warning("veth shim: no port known for %s", ip)
                        continue
                    self.ports[out_port].send(bytes(Ether(src=SWITCH_MAC, dst=mac) / IP(src=SWITCH_IP, dst=ip)
                                                    / UDP(sport=protocol.UDP_PORT, dport=udp_port) / Raw(payload)))

    def reset(self) -> None:
        self.p4rt.set_pipeline(b"")

    def _stop_switch(self) -> None:
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join(timeout=5)
        if hasattr(self, "p4runtime"):
            self.p4runtime.stop()
        for sock in getattr(self, "ports", {}).values():
            sock.close()


# --------------------------------------------------------------------------------------
# A test's view
# --------------------------------------------------------------------------------------
class Env:
    """One test's view of the switch: its P4Runtime target, hosts and counter helpers."""

    _tests = itertools.count()

    def __init__(self, switch: Harness) -> None:
        self.switch = switch
        self.p4rt = switch.p4rt
        self._mgid_base = 1 + 8 * (next(self._tests) % 8000)
        self._hosts: dict[int, Host] = {}
        self._others: list[Host] = []

    @property
    def name(self) -> str:
        return self.switch.name

    def host(self, index: int) -> Host:
        if index >= self.switch.max_hosts:
            pytest.fail(f"the {self.name} harness has {self.switch.max_hosts} hosts; asked for host {index}")
        if index not in self._hosts:
            self._hosts[index] = self.switch.make_host(index)
        return self._hosts[index]

    def mgid(self, job: int = 0) -> int:
        """A multicast group id no earlier test used (0 is "no multicast" on v1model)."""
        return self._mgid_base + job

    def stranger(self) -> Host:
        host = self.switch.make_stranger()
        self._others.append(host)
        return host

    def controller(self) -> Host:
        """The last host, admitted as the controller (RESET packets)."""
        host = self.host(self.switch.max_hosts - 1)
        self.p4rt.add_controller(host.ip, host.udp_port)
        return host

    def counter(self, name: str) -> list[int]:
        return self.p4rt.read_counter(name)

    def wait_counter(self, name: str, index: int, expected: int, timeout: float | None = None) -> None:
        """Poll counter ``name[index]`` over P4Runtime until it reads ``expected``: the switch
        has then decided on the packets that count there."""
        deadline = time.monotonic() + (timeout or self.switch.reply_timeout)
        while True:
            value = self.counter(name)[index]
            if value == expected:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: counter {name}[{index}] reads {value}, expected {expected}")
            time.sleep(0.01)

    def close(self) -> None:
        for host in [*self._hosts.values(), *self._others]:
            host.close()
