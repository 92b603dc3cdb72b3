"""``switchml-bench allreduce``: SwitchML against Gloo's ring allreduce, in the same run.

For every (workers, size, loss) of the grid:

1. start the software switch as its own process (``switchml-switch emulate`` on free
   ports; in Mininet, on the star's switch host),
2. start one process per rank (``benchmarks.worker``) that times ``repeats`` SwitchML
   allreduces of ``size`` bytes of float32, each after a barrier, and checks the last
   result against the exact sum,
3. stop the switch by its PID, having read its CPU time from ``/proc/<pid>/stat``,
4. do the same with torch.distributed's Gloo allreduce (on 127.0.0.1, or on the star's
   hosts and links).

``--topo tree`` (Mininet): racks of workers under leaf hosts, leaves under a spine
(``emulation.mininet.TreeNetwork``); ``switchml`` then aggregates in two levels (a leaf
switch per rack, the spine above: docs/hierarchy.md), ``flat`` is one switch on the spine
that every worker's stream reaches through the core, and Gloo's ring crosses the core from
rack to rack. Beside the times: the bytes each backend put on the core links per allreduce.

A repeat's time is the slowest rank's (the collective is done when the last rank is).
Reported per backend: median, min/max and quartiles of that time, goodput per worker
(size / time), the ratio SwitchML/Gloo of the medians and, with ``--bw``, each backend's
time over its wire bound (``benchmarks.wire``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import wire
from benchmarks.common import (
    REPO_ROOT,
    format_size,
    free_port,
    machine_info,
    process_cpu_seconds,
    summarize,
    table,
)
from emulation.spawn import child_env, spawn_switch, stop_process
from switchml import defaults
from switchml.deploy import P4_K
from switchml.errors import SwitchMLError
from switchml.protocol import MAX_WORKERS, SIZE_TO_K

log = logging.getLogger(__name__)

BACKENDS = ("switchml", "flat", "gloo")
TOPOLOGIES = ("star", "tree")
#: Bytes of packets all workers may have in flight towards the switch: half of the 4 MB
#: receive buffer the switch gets (DESIGN.md, "Pitfalls": n * W * packet must fit).
IN_FLIGHT_BUDGET = 2 * 1024 * 1024
LOOPBACK_MTU = 65536
BMV2_WINDOW = 8  #: default window through BMv2 (see AllreduceConfig.window_for)


@dataclass
class AllreduceConfig:
    """What ``switchml-bench allreduce`` runs; see ``benchmarks.cli`` for each option."""

    workers: list[int] = field(default_factory=lambda: [4])
    sizes: list[int] = field(default_factory=lambda: [25_000_000])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    k: int | None = None
    window: int | None = None
    rto: float | None = None
    net: str = "loopback"
    switch: str = "software"
    bw_mbit: float | None = None
    mtu: int = 1500
    topo: str = "star"
    racks: int = 2
    per_rack: int = 4
    core_bw_mbit: float | None = None
    losses: list[float] = field(default_factory=lambda: [0.0])
    loss_at: str = "switch"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    timeout: float = 120.0
    check: bool = True
    progress: bool = True

    def core_rate_mbit(self) -> float | None:
        """--topo tree: the leaf-spine links' rate (--core-bw, by default --bw)."""
        return self.core_bw_mbit if self.core_bw_mbit is not None else self.bw_mbit

    def effective_mtu(self) -> int:
        """The MTU the packets see: the links' in Mininet, loopback's (64 KB) otherwise."""
        return self.mtu if self.net == "mininet" else LOOPBACK_MTU

    def packet_k(self) -> int:
        """Elements per packet: --k, BMv2's compiled-in k, or the largest packet that fits the MTU unfragmented."""
        if self.switch == "bmv2":
            return self.k or P4_K
        return self.k if self.k else wire.largest_k(self.effective_mtu())

    def window_for(self, n: int) -> int:
        """Window (slots per job): --window, or the largest (<= 64) that keeps queues short.

        Always: n * W * packet stays under the switch's receive buffer. On a link of --bw:
        a window of packets also drains from the worker's link queue within half the
        worker's minimum retransmission timeout; a larger window only queues, and once the
        queueing delay passes the timeout every packet is sent twice.
        """
        if self.window:
            return self.window
        if self.switch == "bmv2":
            # BMv2 handles a packet at a time, in about 0.1 ms for this program: a deep window
            # only queues in front of it, until retransmission timeouts fire.
            return BMV2_WINDOW
        packet = wire.switchml_packet_bytes(self.packet_k())
        w = min(64, IN_FLIGHT_BUDGET // (n * packet))
        if self.bw_mbit and self.net == "mininet":
            frame = sum(f + self.l2_bytes() for f in wire.ip_frames(packet, self.effective_mtu()))
            w = min(w, int(self.retransmit_timeout() / 2 * self.bw_mbit * 1e6 / 8 / frame))
        return max(2, w)

    def retransmit_timeout(self) -> float:
        """The workers' first retransmission timeout: --rto, or the worker's default."""
        return self.rto or defaults.RETRANSMIT_TIMEOUT_S

    def l2_bytes(self) -> int:
        """Ethernet bytes per frame in the bound: tc's accounting in Mininet, a real wire's otherwise."""
        return wire.ETHERNET_TC_BYTES if self.net == "mininet" else wire.ETHERNET_WIRE_BYTES


class BenchmarkError(RuntimeError):
    """A benchmark step failed (a worker or the switch died, or timed out)."""


# ---------------------------------------------------------------- placements
class _Loopback:
    """Every process on this machine, on 127.0.0.1."""

    name = "loopback"
    switch_host = "127.0.0.1"

    def __init__(self, n: int, cfg: AllreduceConfig) -> None:
        self.n = n
        self._procs: list[subprocess.Popen] = []

    def _popen(self, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=REPO_ROOT)
        self._procs.append(proc)
        return proc

    def start_switch(self, log_path: Path, **options: Any) -> subprocess.Popen:
        """``emulation.spawn.spawn_switch`` here, its output to ``log_path``."""
        return spawn_switch(start=lambda cmd: self._popen(cmd, _child_env(), log_path), **options)

    def start_worker(self, rank: int, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        return self._popen(args, env, log_path)

    def gloo_master(self) -> str:
        return f"127.0.0.1:{free_port()}"

    def core_bytes(self) -> None:
        """No core links on loopback."""
        return None

    def gloo_ifname(self, rank: int) -> str:
        return "lo"

    def free_ports(self) -> tuple[int, int]:
        return free_port(socket.SOCK_DGRAM), free_port()

    def capture(self, args: list[str], timeout: float = 15) -> str:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT).stdout

    def close(self) -> None:
        for proc in self._procs:
            stop_process(proc, grace=5.0)


class _Mininet:
    """Workers and switch on the hosts of an ``emulation.mininet.StarNetwork`` (or, with
    ``--topo tree``, a ``TreeNetwork``: the flat switch on its spine, the tree's leaves on its
    leaf hosts)."""

    name = "mininet"

    def __init__(self, n: int, cfg: AllreduceConfig) -> None:
        from emulation.mininet import SWITCH_IP, StarNetwork, TreeNetwork

        self.switch_host = SWITCH_IP
        if cfg.topo == "tree":
            self.star = TreeNetwork(cfg.racks, cfg.per_rack, cfg.bw_mbit, cfg.core_rate_mbit(), cfg.mtu).start()
        else:
            self.star = StarNetwork(n, cfg.bw_mbit, cfg.mtu, switch=cfg.switch).start()
        self._gloo_port = 29500
        self._bmv2_config: tuple[str, str] | None = None

    def deploy_bmv2(self, tmp: Path, window: int, loss: float) -> tuple[subprocess.Popen, str]:
        """BMv2 and its controller on the star (compiled once per star); (BMv2 process, controller endpoint)."""
        from switchml.deploy import compile_bmv2

        if self._bmv2_config is None:
            p4info, config = compile_bmv2(tmp.parent / "p4")
            self._bmv2_config = (str(p4info), str(config))
        endpoint = self.star.deploy_bmv2(tmp / "bmv2", window=window, drop_probability=loss, config=self._bmv2_config)
        return self.star.bmv2_process, endpoint

    def start_switch(self, log_path: Path, **options: Any) -> subprocess.Popen:
        """``emulation.spawn.spawn_switch`` on the switch host, ready when worker 0 gets ``hello``."""
        # the star's namespaces are this run's own, reachable from nothing else: an open control channel
        return self.star.spawn_switch(log_path, env=_THREAD_CAPS, extra=["--insecure"], **options)

    def start_tree(self, log_dir: Path, **options: Any) -> list[subprocess.Popen]:
        """--topo tree: a leaf switch per rack and the spine above them; [spine, leaves...]."""
        return self.star.spawn_tree(log_dir, env=_THREAD_CAPS, extra=["--insecure"], **options)

    def core_bytes(self) -> dict[str, int] | None:
        """--topo tree: bytes the core links carried so far (``TreeNetwork.core_bytes``); star: None."""
        return self.star.core_bytes() if hasattr(self.star, "core_bytes") else None

    def start_worker(self, rank: int, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        return self.star.popen(self.star.hosts[rank], args, env=env, log_path=str(log_path), cwd=str(REPO_ROOT))

    def gloo_master(self) -> str:
        from emulation.mininet import worker_ip

        self._gloo_port += 1  # a fresh port per run: the previous store's may linger in TIME_WAIT
        return f"{worker_ip(0)}:{self._gloo_port}"

    def gloo_ifname(self, rank: int) -> str:
        return self.star.worker_ifname(rank)

    def free_ports(self) -> tuple[int, int]:
        return 48864, 48865  # the switch host's namespace is ours alone

    def set_loss(self, probability: float) -> None:
        self.star.set_loss(probability)

    def capture(self, args: list[str], timeout: float = 15) -> str:
        proc = self.star.hosts[0].popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT))
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc, grace=5.0)
            return ""
        return out.decode()

    def close(self) -> None:
        self.star.stop()


def _python() -> list[str]:
    return [sys.executable]


def _switch_command() -> list[str]:
    script = Path(sys.executable).with_name("switchml-switch")
    return [str(script)] if script.exists() else [*_python(), "-m", "emulation.cli"]


#: One thread per process: the ranks and the switch share the cores.
_THREAD_CAPS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """``emulation.spawn.child_env`` with ``_THREAD_CAPS``."""
    return child_env({**_THREAD_CAPS, **(extra or {})})


# ---------------------------------------------------------------- one backend
def _wait_workers(procs: list[subprocess.Popen], deadline: float) -> None:
    """Wait for every worker; when one fails, give the others a short grace, then kill them."""
    failed_at: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > 15):
            for p in procs:
                stop_process(p, grace=2)
            return
        time.sleep(0.1)


def _read_reports(tmp: Path, backend: str, n: int) -> list[dict[str, Any]]:
    reports = []
    for rank in range(n):
        path = tmp / f"{backend}-r{rank}.json"
        log_path = tmp / f"{backend}-r{rank}.log"
        if not path.exists():
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise BenchmarkError(f"{backend} rank {rank} wrote no report (killed or timed out). Its log:\n{tail}")
        reports.append(json.loads(path.read_text()))
    errors = [r for r in reports if not r.get("ok")]
    if errors:
        raise BenchmarkError(f"{backend} rank {errors[0]['rank']} failed: {errors[0]['error']}\n"
                             f"{errors[0].get('traceback', '')[-2000:]}")
    return reports


def _worker_args(backend: str, rank: int, n: int, elements: int, cfg: AllreduceConfig, out: Path) -> list[str]:
    args = [*_python(), "-m", "benchmarks.worker", "--backend", backend, "--rank", str(rank), "--world-size", str(n),
            "--elements", str(elements), "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup),
            "--seed", str(cfg.seed), "--timeout", str(cfg.timeout), "--out", str(out)]
    if cfg.check:
        args.append("--check")
    return args


def run_switchml(place: Any, n: int, elements: int, loss: float, cfg: AllreduceConfig, tmp: Path,
                 tree: bool = False) -> dict[str, Any]:
    """One SwitchML measurement: its own switch process (``tree``: a leaf switch per rack and
    the spine, as processes on their hosts), n worker processes."""
    k, window = cfg.packet_k(), cfg.window_for(n)
    port, control_port = place.free_ports()
    switch_loss = loss if cfg.loss_at == "switch" else 0.0
    switch_log = tmp / ("spine.log" if tree else "switch.log")
    leaves: list[subprocess.Popen] = []
    if cfg.switch == "bmv2":
        switch, controller = place.deploy_bmv2(tmp, window, switch_loss)
    else:
        options = dict(host=place.switch_host, port=port, control_port=control_port, window=window, k=k,
                       pool_size=max(1024, window), heartbeat_timeout=max(10.0, cfg.timeout / 2))
        try:
            if tree:
                switch, *leaves = place.start_tree(tmp, **options)
            else:
                switch = place.start_switch(switch_log, drop_probability=switch_loss, seed=cfg.seed, **options)
        except SwitchMLError as exc:
            raise BenchmarkError(f"{exc}:\n{switch_log.read_text(errors='replace')[-2000:]}") from None
        controller = f"tcp://{place.switch_host}:{control_port}"
    try:
        leaf_cpu0 = [process_cpu_seconds(leaf.pid) for leaf in leaves]
        cpu0 = process_cpu_seconds(switch.pid)
        t0 = time.monotonic()
        procs = []
        for rank in range(n):
            args = _worker_args("switchml", rank, n, elements, cfg, tmp / f"switchml-r{rank}.json")
            args += ["--controller", controller, "--job", "bench", "--k", str(k)]
            if cfg.rto:
                args += ["--rto", repr(cfg.rto)]
            procs.append(place.start_worker(rank, args, _child_env(), tmp / f"switchml-r{rank}.log"))
        _wait_workers(procs, time.monotonic() + cfg.timeout * (cfg.repeats + cfg.warmup + 3))
        wall = time.monotonic() - t0
        cpu1 = process_cpu_seconds(switch.pid)
        leaf_cpu = [_cpu_delta(before, process_cpu_seconds(leaf.pid)) for before, leaf in zip(leaf_cpu0, leaves,
                                                                                              strict=True)]
        stats_out = place.capture([*_switch_command(), "stats", "--controller", controller, "--timeout", "5"])
        reports = _read_reports(tmp, "switchml", n)
    finally:
        if cfg.switch != "bmv2":  # BMv2 also forwards Gloo's traffic: the star stops it
            for proc in (switch, *leaves):
                stop_process(proc, grace=5.0)
    result = _summarize_backend(reports, elements * 4)
    calls = cfg.repeats + cfg.warmup
    cpu = _cpu_delta(cpu0, cpu1)
    median = result["time_s"].get("median")
    result.update({
        "k": reports[0]["k"], "window": reports[0]["window"], "rto_s": cfg.retransmit_timeout(), "loss": switch_loss, "loss_at": cfg.loss_at,
        "packets_sent": sum(r["packets_sent"] for r in reports),
        "retransmissions": sum(r["retransmissions"] for r in reports),
        "stale_results": sum(r["stale_results"] for r in reports),
        "duplicate_results": sum(r.get("duplicate_results", 0) for r in reports),
        "switch": {
            "pid": switch.pid, "cpu_s": cpu, "wall_s": wall,
            "cpu_per_allreduce_s": cpu / calls if cpu is not None else None,
            # CPU seconds of the switch per second of allreduce: ~1.0 means its one thread is saturated
            "busy_fraction": (cpu / calls / median) if cpu is not None and median else None,
            "counters": _parse_stats(stats_out),
        },
    })
    if tree:
        result["leaves"] = {"cpu_s": leaf_cpu,
                            "busy_fraction": [c / calls / median if c is not None and median else None
                                              for c in leaf_cpu]}
    result.update(spurious_retransmissions(result))
    return result


def _cpu_delta(before: float | None, after: float | None) -> float | None:
    return after - before if before is not None and after is not None else None


def spurious_retransmissions(result: dict[str, Any]) -> dict[str, Any]:
    """Counts of a SwitchML run's resends whose original was not lost, and their rates.

    A resend is spurious when the switch already had the worker's packet: it drops it as
    ``retransmission_incomplete`` when the slot still waits for a peer, and answers it
    again when the slot is complete, which reaches the worker as a duplicate result (the
    workers' ``duplicate_results``; a resend answered after a lost result is no duplicate).
    Rates are per packet sent (first transmissions, warm-up calls included, as the counts).
    """
    counters = ((result.get("switch") or {}).get("counters") or {}).get("counters") or {}
    incomplete = counters.get("drop_retransmission_incomplete")
    spurious = (incomplete or 0) + result.get("duplicate_results", 0)
    sent = result.get("packets_sent") or 0
    return {
        "spurious_retransmissions": spurious if incomplete is not None else None,
        "spurious_switch_incomplete": incomplete,
        "retransmission_rate": result.get("retransmissions", 0) / sent if sent else None,
        "spurious_rate": spurious / sent if sent and incomplete is not None else None,
    }


def run_gloo(place: Any, n: int, elements: int, cfg: AllreduceConfig, tmp: Path) -> dict[str, Any]:
    """One Gloo measurement: n worker processes, torch.distributed over TCP."""
    if cfg.switch == "bmv2":  # Gloo's TCP crosses BMv2 too, through its forward table, without loss
        place.deploy_bmv2(tmp, cfg.window_for(n), 0.0)
    master = place.gloo_master()
    procs = []
    for rank in range(n):
        args = _worker_args("gloo", rank, n, elements, cfg, tmp / f"gloo-r{rank}.json") + ["--master", master]
        env = _child_env({"GLOO_SOCKET_IFNAME": place.gloo_ifname(rank)})
        procs.append(place.start_worker(rank, args, env, tmp / f"gloo-r{rank}.log"))
    _wait_workers(procs, time.monotonic() + cfg.timeout * (cfg.repeats + cfg.warmup + 3))
    return _summarize_backend(_read_reports(tmp, "gloo", n), elements * 4)


def _parse_stats(text: str) -> dict[str, Any] | None:
    try:
        stats = json.loads(text)
    except ValueError:
        return None
    return {key: stats[key] for key in ("counters", "drops") if key in stats} or stats


def _summarize_backend(reports: list[dict[str, Any]], size_bytes: int) -> dict[str, Any]:
    per_rank = [r["times_s"] for r in reports]
    per_repeat = [max(ts) for ts in zip(*per_rank, strict=True)]  # the collective ends with its last rank
    summary = summarize(per_repeat)
    goodput = {key: size_bytes / 1e6 / summary[src] for key, src in
               (("median", "median"), ("min", "max"), ("max", "min"))} if summary.get("n") else {}
    digests = {r["digest"] for r in reports}
    check = next((r["check"] for r in reports if "check" in r), None)
    return {
        "time_s": summary, "samples_s": per_repeat, "per_rank_samples_s": per_rank,
        "goodput_MBps": goodput, "ranks_identical": len(digests) == 1, "check": check,
        "worker_cpu_s": [r["cpu_s"] for r in reports],
        **_timed_cpu(reports),
    }


def _timed_cpu(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU during the timed calls only (``benchmarks.worker.time_calls``): each rank's CPU seconds
    per call (median over calls) and, as rank 0 saw it, the share of the machine's cores busy
    (and in softirq: the kernel's packet processing) over its timed calls (None: too short to
    measure)."""
    if not all(r.get("cpu_per_call_s") for r in reports):
        return {}
    import numpy as np

    return {"worker_cpu_per_call_s": [float(np.median(r["cpu_per_call_s"])) for r in reports],
            "host_cpu_timed": reports[0].get("host_cpu_timed")}


# ---------------------------------------------------------------- the grid
def run(cfg: AllreduceConfig, command: str) -> dict[str, Any]:
    """Run the whole grid; returns the JSON document (also printed as a table by ``main``)."""
    for b in cfg.backends:
        if b not in BACKENDS:
            raise ValueError(f"backend {b!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.topo not in TOPOLOGIES:
        raise ValueError(f"--topo {cfg.topo!r}: expected one of {', '.join(TOPOLOGIES)}")
    if cfg.topo == "tree":
        _check_tree(cfg)
    elif "flat" in cfg.backends:
        raise ValueError("--backends flat: one switch reached through the core exists only with --topo tree "
                         "(on a star, switchml is that switch)")
    if any(not 1 <= n <= MAX_WORKERS for n in cfg.workers):
        raise ValueError(f"--workers {cfg.workers}: each must be in 1..{MAX_WORKERS} (the switch's worker bitmap)")
    if any(size < 4 for size in cfg.sizes):
        raise ValueError(f"--size {cfg.sizes}: at least 4 bytes (one float32)")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if cfg.k is not None and cfg.k not in SIZE_TO_K.values():
        raise ValueError(f"--k {cfg.k}: expected one of {sorted(SIZE_TO_K.values())}")
    if cfg.switch == "bmv2":
        if cfg.net != "mininet":
            raise ValueError("--switch bmv2 needs --net mininet (BMv2 runs on the star's switch host)")
        if cfg.packet_k() != P4_K:
            raise ValueError(f"--k {cfg.k}: BMv2 runs the v1model program, compiled for k={P4_K}")
        if cfg.loss_at != "switch" and any(cfg.losses):
            raise ValueError("--switch bmv2 takes its loss from the P4 loss table: use --loss-at switch")
    if cfg.net == "mininet":
        from emulation.mininet import bmv2_problem, mininet_problem

        problem = bmv2_problem() if cfg.switch == "bmv2" else mininet_problem()
        if problem:
            raise BenchmarkError(problem)
    elif cfg.loss_at == "hosts" and any(cfg.losses):
        raise ValueError("--loss-at hosts needs --net mininet (nftables rules in the hosts' namespaces)")
    from tqdm import tqdm

    doc: dict[str, Any] = {
        "benchmark": "allreduce", "command": command, "machine": machine_info(),
        "config": asdict(cfg) | {"k_effective": cfg.packet_k(), "mtu_effective": cfg.effective_mtu(),
                                 "l2_bytes_in_bound": cfg.l2_bytes()},
        "results": [],
    }
    steps = len(cfg.workers) * len(cfg.sizes) * len(cfg.losses) * len(cfg.backends)
    bar = tqdm(total=steps, desc="allreduce", unit="run", disable=not cfg.progress, file=sys.stderr, leave=False)
    try:
        for n in cfg.workers:
            place = _Mininet(n, cfg) if cfg.net == "mininet" else _Loopback(n, cfg)
            try:
                for size in cfg.sizes:
                    for loss in cfg.losses:
                        doc["results"].append(_run_point(place, n, size, loss, cfg, bar))
            finally:
                place.close()
    finally:
        bar.close()
    add_loss_slowdown(doc["results"])
    return doc


def _check_tree(cfg: AllreduceConfig) -> None:
    """--topo tree's own rules (a ValueError naming the option otherwise); sets cfg.workers."""
    if cfg.net != "mininet":
        raise ValueError("--topo tree needs --net mininet (racks, leaves and a spine as Mininet hosts)")
    if cfg.switch != "software":
        raise ValueError(f"--topo tree --switch {cfg.switch}: the leaf role is the software switch's "
                         "(docs/hierarchy.md); use --switch software")
    if cfg.racks < 1 or cfg.per_rack < 1:
        raise ValueError(f"--racks {cfg.racks} --per-rack {cfg.per_rack}: expected at least 1 of each")
    n = cfg.racks * cfg.per_rack
    if n > MAX_WORKERS:
        raise ValueError(f"--racks {cfg.racks} x --per-rack {cfg.per_rack} = {n} workers; at most {MAX_WORKERS}")
    if cfg.workers not in ([n], []):
        raise ValueError(f"--workers {','.join(map(str, cfg.workers))}: --topo tree has racks x per-rack = {n} "
                         "workers; leave --workers out")
    if cfg.core_bw_mbit is not None and cfg.core_bw_mbit <= 0:
        raise ValueError(f"--core-bw {cfg.core_bw_mbit:g}: expected a positive rate in Mbit/s")
    if cfg.loss_at == "switch" and any(cfg.losses):
        raise ValueError("--topo tree takes loss from the hosts (--loss-at hosts): a switch's drop probability "
                         "would hit the tree's leaves and the flat switch differently")
    cfg.workers = [n]


def add_loss_slowdown(points: list[dict[str, Any]]) -> None:
    """Each backend's ``slowdown_vs_lossless``: its median time over its own at loss 0 for the
    same workers and size (where the grid has loss 0)."""
    lossless = {(p["workers"], p["size_bytes"], name): r["time_s"]["median"]
                for p in points if p["loss"] == 0 for name, r in p["backends"].items()}
    for p in points:
        for name, r in p["backends"].items():
            base = lossless.get((p["workers"], p["size_bytes"], name))
            if base:
                r["slowdown_vs_lossless"] = r["time_s"]["median"] / base


def _run_point(place: Any, n: int, size: int, loss: float, cfg: AllreduceConfig, bar: Any) -> dict[str, Any]:
    elements = size // 4
    point: dict[str, Any] = {"workers": n, "size_bytes": elements * 4, "elements": elements, "loss": loss,
                             "net": place.name, "backends": {}}
    if hasattr(place, "set_loss"):
        place.set_loss(loss if cfg.loss_at == "hosts" else 0.0)
    for backend in cfg.backends:
        bar.set_postfix_str(f"{backend} n={n} {format_size(size)} loss={loss:g}")
        core_before = place.core_bytes()
        with tempfile.TemporaryDirectory(prefix=f"switchml-bench-{backend}-") as tmpdir:
            tmp = Path(tmpdir)
            if backend == "gloo":
                res = run_gloo(place, n, elements, cfg, tmp)
                res["loss"] = loss if cfg.loss_at == "hosts" else 0.0
            else:
                res = run_switchml(place, n, elements, loss, cfg, tmp, tree=backend == "switchml" and cfg.topo == "tree")
        if core_before is not None:
            res["core"] = _core_traffic(core_before, place.core_bytes(), cfg.repeats + cfg.warmup)
        point["backends"][backend] = res
        bar.update(1)
    _add_bounds(point, cfg)
    return point


def _core_traffic(before: dict[str, int], after: dict[str, int], calls: int) -> dict[str, Any]:
    """Bytes on the core links over one backend's run (start-up and control traffic included)
    and per allreduce (over every call, warm-up included): per link and direction, and in all."""
    delta = {link: after[link] - before[link] for link in before}
    total = sum(delta.values())
    return {"bytes": delta, "bytes_total": total, "bytes_per_allreduce": total / calls,
            "max_link_bytes_per_allreduce": max(delta.values()) / calls}


def _add_bounds(point: dict[str, Any], cfg: AllreduceConfig) -> None:
    b = point["backends"]
    n, size = point["workers"], point["size_bytes"]
    for name in ("switchml", "flat"):
        if name in b and "gloo" in b:
            point[f"ratio_{name}_over_gloo"] = b[name]["time_s"]["median"] / b["gloo"]["time_s"]["median"]
    if "switchml" in b and "flat" in b:
        point["ratio_switchml_over_flat"] = b["switchml"]["time_s"]["median"] / b["flat"]["time_s"]["median"]
    if not cfg.bw_mbit:
        return
    bw = cfg.bw_mbit * 1e6
    mtu, l2 = cfg.mtu, cfg.l2_bytes()
    # --topo tree: how many streams of each backend share a core link (one direction), at its rate
    core_bw = cfg.core_rate_mbit() * 1e6
    # (the ring, in rank order, crosses each core link once per direction, and not at all in one rack)
    streams = {"switchml": 1, "flat": cfg.per_rack, "gloo": 1 if cfg.racks > 1 else 0}
    for name in ("switchml", "flat"):
        if name in b:
            sw = wire.switchml_wire(size, b[name]["k"], b[name]["window"], mtu, l2)
            b[name]["bound_s"] = sw.wire_bytes * 8 / bw
            b[name]["wire_bytes_per_worker"] = sw.wire_bytes
    if "gloo" in b:
        b["gloo"]["bound_s"] = wire.ring_bound_s(size, n, bw, mtu, l2)
        b["gloo"]["wire_bytes_per_worker"] = wire.tcp_wire_bytes(wire.ring_bytes(size, n), mtu, l2)
    if cfg.topo == "tree":
        for name, res in b.items():
            per_stream = res["wire_bytes_per_worker"]
            res["bound_s"] = max(res["bound_s"], streams[name] * per_stream * 8 / core_bw)
            # what crosses the core per allreduce, both directions of every core link, if nothing is resent
            res["core_bytes_model"] = 2 * cfg.racks * streams[name] * per_stream
    for res in b.values():
        res["time_over_bound"] = res["time_s"]["median"] / res["bound_s"] if res.get("bound_s") else None
    for name in ("switchml", "flat"):
        if name in b and "gloo" in b:
            point[f"bound_ratio_{name}_over_gloo"] = b[name]["bound_s"] / b["gloo"]["bound_s"]


# ---------------------------------------------------------------- output
def format_report(doc: dict[str, Any]) -> str:
    """The readable table of a run, with the correctness verdicts under it."""
    cfg = doc["config"]
    tree = cfg.get("topo") == "tree"
    rows, notes = [], []
    for p in doc["results"]:
        for name, r in p["backends"].items():
            t = r["time_s"]
            switch = r.get("switch") or {}
            row = [
                p["workers"], format_size(p["size_bytes"]), f"{p['loss']:g}", name,
                t["median"] * 1e3, f"{t['min'] * 1e3:.4g}..{t['max'] * 1e3:.4g}", r["goodput_MBps"]["median"],
                p.get(f"ratio_{name}_over_gloo"),
                r.get("time_over_bound"), r.get("slowdown_vs_lossless") if p["loss"] else None,
                switch.get("busy_fraction"), (r.get("host_cpu_timed") or {}).get("busy"),
                _verdict(r),
            ]
            if tree:
                core = r.get("core") or {}
                row[-1:-1] = [core.get("bytes_per_allreduce", 0) / 1e6 or None,
                              (core["bytes_per_allreduce"] / r["core_bytes_model"]) if r.get("core_bytes_model") else None]
            rows.append(row)
            if r.get("host_cpu_timed") and r.get("worker_cpu_per_call_s"):
                h = r["host_cpu_timed"]
                ranks = sorted(r["worker_cpu_per_call_s"])
                notes.append(f"{name} n={p['workers']} {format_size(p['size_bytes'])}: per call, each rank "
                             f"{ranks[0]:.3g}..{ranks[-1]:.3g} CPU s, the machine {h['busy']:.0%} busy "
                             f"(user {h['user']:.0%}, system {h['system']:.0%}, softirq {h['softirq']:.0%})")
            if name != "gloo" and r.get("retransmissions"):
                spurious = (f", {r['spurious_retransmissions']} spurious ({r['spurious_rate']:.2%})"
                            if r.get("spurious_rate") is not None else "")
                notes.append(f"{name} n={p['workers']} {format_size(p['size_bytes'])} loss={p['loss']:g}: "
                             f"{r['retransmissions']} retransmissions of {r['packets_sent']} packets{spurious}")
        if "ratio_switchml_over_flat" in p:
            notes.append(f"n={p['workers']} {format_size(p['size_bytes'])}: the tree takes "
                         f"{p['ratio_switchml_over_flat']:.3f} x the flat switch's time")
    headers = ["n", "size", "loss", "backend", "median ms", "min..max ms", "MB/s/worker", "x gloo",
               "time/bound", "vs loss 0", "switch CPU", "host CPU", *(["core MB", "core/model"] if tree else []), "result"]
    where = cfg["net"]
    if tree:
        core = cfg.get("core_bw_mbit") or cfg.get("bw_mbit")
        where += (f", tree of {cfg['racks']} racks x {cfg['per_rack']} workers"
                  + (f", core links {core:g} Mbit/s" if core else ""))
    lines = [f"allreduce on {where}: k={cfg['k_effective']}, repeats={cfg['repeats']}, warmup={cfg['warmup']}"
             + (f", links {cfg['bw_mbit']:g} Mbit/s, MTU {cfg['mtu']}" if cfg.get("bw_mbit") else ""),
             table(headers, rows), ""]
    lines.append("x gloo: median time over Gloo's (below 1: faster than Gloo). "
                 "switch CPU: the switch process's CPU seconds per second of allreduce (1.0: its thread is saturated"
                 "; the tree: the spine's). host CPU: the share of all this machine's cores busy during the timed "
                 "calls (in Mininet every host and the kernel's packet processing share them).")
    if tree:
        lines.append("switchml: a leaf switch per rack and the spine (two-level aggregation); flat: one switch on "
                     "the spine, every worker's stream through the core; core MB: bytes on the leaf-spine links "
                     "(both directions of all) per allreduce; core/model: over what the backend must put there "
                     "(2 x racks x streams per core link x its wire bytes).")
    if cfg.get("bw_mbit"):
        lines.append("time/bound: median time over the wire bound (SwitchML S_wire/B, ring 2(n-1)/n S_wire/B"
                     + ("; in the tree, at least the streams a core link carries over its rate)." if tree else ")."))
    else:
        lines.append("time/bound: needs --bw (the link rate the bound is computed for).")
    lines.append("vs loss 0: median time over the same backend's without loss (the slowdown loss causes).")
    lines.append("result: 'exact' = every element within the quantization bound of the float64 sum "
                 "(SwitchML) or float32 summation error (Gloo), and identical on every rank.")
    lines += notes
    return "\n".join(lines)


def _verdict(r: dict[str, Any]) -> str:
    check = r.get("check")
    if check is None:
        return "unchecked" if r.get("ranks_identical") else "ranks differ"
    ok = check.get("within_bound") and r.get("ranks_identical")
    detail = f"err {check['max_abs_error']:.2g}"
    if "max_error_over_bound" in check:
        detail += f" ({check['max_error_over_bound']:.2f} of bound)"
    return ("exact " if ok else "WRONG ") + detail


def all_checks_pass(doc: dict[str, Any]) -> bool:
    """True if every checked result was within its bound and identical on every rank."""
    for p in doc["results"]:
        for r in p["backends"].values():
            if not r.get("ranks_identical") or (r.get("check") and not r["check"].get("within_bound")):
                return False
    return True


def plot(doc: dict[str, Any], path: str | os.PathLike) -> None:
    """Goodput per worker of each backend (bars, min..max whiskers), and time over the wire bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = doc["results"]
    labels = [f"n={p['workers']}\n{format_size(p['size_bytes'])}" + (f"\nloss {p['loss']:g}" if p["loss"] else "")
              for p in points]
    backends = [b for b in BACKENDS if any(b in p["backends"] for p in points)]
    has_bound = any(r.get("time_over_bound") for p in points for r in p["backends"].values())
    fig, axes = plt.subplots(1, 2 if has_bound else 1, figsize=(11 if has_bound else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(points))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        med = [p["backends"][b]["goodput_MBps"]["median"] if b in p["backends"] else np.nan for p in points]
        lo = [m - p["backends"][b]["goodput_MBps"]["min"] if b in p["backends"] else 0 for m, p in zip(med, points, strict=True)]
        hi = [p["backends"][b]["goodput_MBps"]["max"] - m if b in p["backends"] else 0 for m, p in zip(med, points, strict=True)]
        ax.bar(x + (i - (len(backends) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=3, label=b)
    ax.set_xticks(x, labels)
    ax.set_ylabel("goodput per worker (MB/s), median, min..max")
    cfg = doc["config"]
    ax.set_title(f"allreduce on {cfg['net']}" + (f", {cfg['bw_mbit']:g} Mbit/s links" if cfg.get("bw_mbit") else ""))
    ax.legend()
    if has_bound:
        ax2 = axes[0][1]
        for i, b in enumerate(backends):
            vals = [p["backends"].get(b, {}).get("time_over_bound") or np.nan for p in points]
            ax2.bar(x + (i - (len(backends) - 1) / 2) * width, vals, width, label=b)
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.axhline(1.15, color="gray", lw=0.8, ls="--", label="bound + 15%")
        ax2.set_xticks(x, labels)
        ax2.set_ylabel("median time / wire bound")
        ax2.legend()
    fig.text(0.01, 0.01, textwrap.fill(doc["command"], 180), fontsize=6, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


