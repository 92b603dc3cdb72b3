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

BACKENDS = ("switchml", "gloo")
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
    losses: list[float] = field(default_factory=lambda: [0.0])
    loss_at: str = "switch"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    timeout: float = 120.0
    check: bool = True
    progress: bool = True

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
    """Workers and switch on the hosts of an ``emulation.mininet.StarNetwork``."""

    name = "mininet"

    def __init__(self, n: int, cfg: AllreduceConfig) -> None:
        from emulation.mininet import SWITCH_IP, StarNetwork

        self.switch_host = SWITCH_IP
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


def run_switchml(place: Any, n: int, elements: int, loss: float, cfg: AllreduceConfig, tmp: Path) -> dict[str, Any]:
    """One SwitchML measurement: its own switch process, n worker processes."""
    k, window = cfg.packet_k(), cfg.window_for(n)
    port, control_port = place.free_ports()
    switch_loss = loss if cfg.loss_at == "switch" else 0.0
    switch_log = tmp / "switch.log"
    if cfg.switch == "bmv2":
        switch, controller = place.deploy_bmv2(tmp, window, switch_loss)
    else:
        try:
            switch = place.start_switch(switch_log, host=place.switch_host, port=port, control_port=control_port,
                                        window=window, k=k, pool_size=max(1024, window),
                                        drop_probability=switch_loss, seed=cfg.seed,
                                        heartbeat_timeout=max(10.0, cfg.timeout / 2))
        except SwitchMLError as exc:
            raise BenchmarkError(f"{exc}:\n{switch_log.read_text(errors='replace')[-2000:]}") from None
        controller = f"tcp://{place.switch_host}:{control_port}"
    try:
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
        stats_out = place.capture([*_switch_command(), "stats", "--controller", controller, "--timeout", "5"])
        reports = _read_reports(tmp, "switchml", n)
    finally:
        if cfg.switch != "bmv2":  # BMv2 also forwards Gloo's traffic: the star stops it
            stop_process(switch, grace=5.0)
    result = _summarize_backend(reports, elements * 4)
    calls = cfg.repeats + cfg.warmup
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
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
    result.update(spurious_retransmissions(result))
    return result


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
    }


# ---------------------------------------------------------------- the grid
def run(cfg: AllreduceConfig, command: str) -> dict[str, Any]:
    """Run the whole grid; returns the JSON document (also printed as a table by ``main``)."""
    for b in cfg.backends:
        if b not in BACKENDS:
            raise ValueError(f"backend {b!r}: expected one of {', '.join(BACKENDS)}")
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
        with tempfile.TemporaryDirectory(prefix=f"switchml-bench-{backend}-") as tmpdir:
            tmp = Path(tmpdir)
            if backend == "switchml":
                res = run_switchml(place, n, elements, loss, cfg, tmp)
            else:
                res = run_gloo(place, n, elements, cfg, tmp)
                res["loss"] = loss if cfg.loss_at == "hosts" else 0.0
        point["backends"][backend] = res
        bar.update(1)
    _add_bounds(point, cfg)
    return point


def _add_bounds(point: dict[str, Any], cfg: AllreduceConfig) -> None:
    b = point["backends"]
    n, size = point["workers"], point["size_bytes"]
    if "switchml" in b and "gloo" in b:
        point["ratio_switchml_over_gloo"] = b["switchml"]["time_s"]["median"] / b["gloo"]["time_s"]["median"]
    if not cfg.bw_mbit:
        return
    bw = cfg.bw_mbit * 1e6
    mtu, l2 = cfg.mtu, cfg.l2_bytes()
    if "switchml" in b:
        sw = wire.switchml_wire(size, b["switchml"]["k"], b["switchml"]["window"], mtu, l2)
        b["switchml"]["bound_s"] = sw.wire_bytes * 8 / bw
        b["switchml"]["wire_bytes_per_worker"] = sw.wire_bytes
    if "gloo" in b:
        b["gloo"]["bound_s"] = wire.ring_bound_s(size, n, bw, mtu, l2)
        b["gloo"]["wire_bytes_per_worker"] = wire.tcp_wire_bytes(wire.ring_bytes(size, n), mtu, l2)
    for res in b.values():
        res["time_over_bound"] = res["time_s"]["median"] / res["bound_s"] if res.get("bound_s") else None
    if "switchml" in b and "gloo" in b:
        point["bound_ratio_switchml_over_gloo"] = b["switchml"]["bound_s"] / b["gloo"]["bound_s"]


# ---------------------------------------------------------------- output
def format_report(doc: dict[str, Any]) -> str:
    """The readable table of a run, with the correctness verdicts under it."""
    cfg = doc["config"]
    rows, notes = [], []
    for p in doc["results"]:
        for name, r in p["backends"].items():
            t = r["time_s"]
            switch = r.get("switch") or {}
            rows.append([
                p["workers"], format_size(p["size_bytes"]), f"{p['loss']:g}", name,
                t["median"] * 1e3, f"{t['min'] * 1e3:.4g}..{t['max'] * 1e3:.4g}", r["goodput_MBps"]["median"],
                p.get("ratio_switchml_over_gloo") if name == "switchml" else None,
                r.get("time_over_bound"), r.get("slowdown_vs_lossless") if p["loss"] else None,
                switch.get("busy_fraction"),
                _verdict(r),
            ])
            if name == "switchml" and r.get("retransmissions"):
                spurious = (f", {r['spurious_retransmissions']} spurious ({r['spurious_rate']:.2%})"
                            if r.get("spurious_rate") is not None else "")
                notes.append(f"n={p['workers']} {format_size(p['size_bytes'])} loss={p['loss']:g}: "
                             f"{r['retransmissions']} retransmissions of {r['packets_sent']} packets{spurious}")
    headers = ["n", "size", "loss", "backend", "median ms", "min..max ms", "MB/s/worker", "sw/gloo",
               "time/bound", "vs loss 0", "switch CPU", "result"]
    lines = [f"allreduce on {cfg['net']}: k={cfg['k_effective']}, repeats={cfg['repeats']}, warmup={cfg['warmup']}"
             + (f", links {cfg['bw_mbit']:g} Mbit/s, MTU {cfg['mtu']}" if cfg.get("bw_mbit") else ""),
             table(headers, rows), ""]
    lines.append("sw/gloo: median time of SwitchML over Gloo's (below 1: SwitchML is faster). "
                 "switch CPU: the switch process's CPU seconds per second of allreduce (1.0: its thread is saturated).")
    if cfg.get("bw_mbit"):
        lines.append("time/bound: median time over the wire bound (SwitchML S_wire/B, ring 2(n-1)/n S_wire/B).")
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


