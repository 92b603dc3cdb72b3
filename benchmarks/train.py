"""``switchml-bench train``: a training run through SwitchML against DDP's allreduce, in the same run.

For every worker count and repeat, each backend in turn (interleaved, so that a drift in
the machine's load hits both alike):

1. run the training, with its own output folder:

   - ``--net loopback``: ``switchml-train TASK --workers N --comm {switchml|allreduce}
     --steps S --log-every 1`` as a child process (the local launcher: the software switch
     on loopback for switchml, Gloo on CPU);
   - ``--net mininet``: one rank per host of an ``emulation.mininet.StarNetwork`` (one
     star per worker count, links of ``--bw`` Mbit/s), each started as users start ranks
     on a cluster: ``torchrun --nnodes N --node_rank i --nproc_per_node 1 --master_addr
     <host 0> -m trainer.cli TASK --launcher torchrun ...`` with ``GLOO_SOCKET_IFNAME`` set
     to the host's interface. For switchml a fresh software switch and its controller run
     on the star's switch host (``--controller tcp://SWITCH_IP:48865 --no-fallback``); the
     controller binds an address other hosts reach, so the switch and every rank share a
     random cluster secret (``$SWITCHML_SECRET``). k and the window are sized for the
     links as ``switchml-bench allreduce`` sizes them (``AllreduceConfig``). For allreduce
     the same ranks use DDP's Gloo allreduce over the same links;

2. read rank 0's ``metrics.jsonl`` (elapsed training time after every step; setup,
   registration and evaluation are outside it) and ``final_metrics.json``;
3. step time: the median of the per-step durations after ``--skip`` warm-up steps;
   samples/s: N * batch size / step time; time to target: the first elapsed time at which
   the training loss, averaged over the last ``--smooth`` steps, is at or below the target;
   comm-wait share: the time the steps after ``--skip`` spent blocked in ``backward()``
   after their last gradient was computed (the allreduce the step could not overlap with
   backward; ``trainer.loop.CommWaitClock``), over those steps' total time.

The target loss is ``--target-loss``, or by default the highest final smoothed loss of
all runs of that worker count: the loss every run reached, so every run has a time to it.
Reported per backend: medians over repeats, and the ratio switchml/allreduce of the step
times; per worker count, how far the two backends' loss curves are apart, and (with
``--vary-seed``: repeat r trains with ``--seed r``, both backends alike) how far apart
one backend's curves of different seeds end.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.allreduce import AllreduceConfig, _wait_workers
from benchmarks.common import REPO_ROOT, machine_info, process_cpu_seconds, summarize, table
from emulation.spawn import child_env, stop_process
from switchml import defaults
from switchml.errors import SwitchMLError
from switchml.protocol import MAX_WORKERS

log = logging.getLogger(__name__)

BACKENDS = ("switchml", "allreduce")
NETS = ("loopback", "mininet")
#: torchrun's rendezvous port on host 0 of a star; each run takes the next one, since the
#: previous run's store may linger in TIME_WAIT.
MASTER_PORT_BASE = 29400


class TrainBenchmarkError(RuntimeError):
    """A training run failed, timed out, or left no metrics."""


@dataclass
class TrainBenchConfig:
    """What ``switchml-bench train`` runs; see ``benchmarks.cli`` for each option."""

    task: str = "digits"
    workers: list[int] = field(default_factory=lambda: [4])
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    steps: int = 100
    repeats: int = 3
    skip: int = 5             # warm-up steps left out of the step time
    smooth: int = 10          # steps the loss is averaged over for the time to target
    target_loss: float | None = None
    batch_size: int | None = None
    timeout: float = 1800.0   # seconds one training run may take
    task_args: list[str] = field(default_factory=list)  # passed to switchml-train after the common options
    keep_dir: str | None = None  # keep every run's output folder here (default: a temporary folder)
    progress: bool = True
    net: str = "loopback"     # loopback, or mininet: one rank per host of a star
    bw_mbit: float | None = None  # mininet: every link's rate (None: unshaped)
    mtu: int = 1500           # mininet: the links' MTU
    k: int | None = None      # mininet: elements per packet (None: the largest that fits the MTU)
    window: int | None = None  # mininet: the switch's window (None: sized for the links)
    vary_seed: bool = False   # repeat r trains with --seed r (both backends alike)

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range (MininetUnavailable for a
        star this machine cannot build)."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"--backends: unknown {unknown}; expected some of {', '.join(BACKENDS)}")
        if self.steps <= self.skip:
            raise ValueError(f"--steps {self.steps} must be more than --skip {self.skip} (warm-up steps)")
        for name in ("repeats", "smooth"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.net not in NETS:
            raise ValueError(f"--net {self.net!r}: expected one of {', '.join(NETS)}")
        if self.net == "loopback":
            given = [f"--{name.replace('_mbit', '')} {value}" for name, value in
                     (("bw_mbit", self.bw_mbit), ("k", self.k), ("window", self.window)) if value is not None]
            if given or self.mtu != 1500:
                raise ValueError(f"{', '.join(given) or f'--mtu {self.mtu}'}: for --net mininet only (loopback "
                                 "links are neither shaped nor sized)")
            return
        if self.bw_mbit is not None and self.bw_mbit <= 0:
            raise ValueError(f"--bw {self.bw_mbit:g}: expected a positive rate in Mbit/s")
        if "switchml" in self.backends and max(self.workers) > MAX_WORKERS:
            raise ValueError(f"--workers {max(self.workers)}: the switch takes at most {MAX_WORKERS} workers per job")
        from emulation.mininet import require_mininet

        require_mininet()

    def sizing(self) -> AllreduceConfig:
        """k and the window in a star, chosen as ``switchml-bench allreduce`` chooses them."""
        return AllreduceConfig(net=self.net, bw_mbit=self.bw_mbit, mtu=self.mtu, k=self.k, window=self.window)

    def seed(self, repeat: int) -> int | None:
        """The ``--seed`` of repeat ``repeat`` (None: the trainer's default)."""
        return repeat if self.vary_seed else None


def _run_options(cfg: TrainBenchConfig, out: Path, seed: int | None) -> list[str]:
    """The ``switchml-train`` options after the task, launcher and communication."""
    cmd = ["--steps", str(cfg.steps), "--log-every", "1", "--checkpoint-every", str(cfg.steps),
           "--no-progress", "--out", str(out)]
    if cfg.batch_size:
        cmd += ["--batch-size", str(cfg.batch_size)]
    cmd += list(cfg.task_args)
    # after the task's options: --vary-seed decides the seed even if they name one
    return cmd + (["--seed", str(seed)] if seed is not None else [])


def train_command(cfg: TrainBenchConfig, workers: int, backend: str, out: Path, seed: int | None = None) -> list[str]:
    """The ``switchml-train`` command line of one loopback run."""
    return [sys.executable, "-m", "trainer.cli", cfg.task, "--workers", str(workers), "--comm", backend,
            *_run_options(cfg, out, seed)]


def torchrun_command(cfg: TrainBenchConfig, workers: int, node_rank: int, backend: str, out: Path, master_port: int,
                     controller: str | None, seed: int | None = None) -> list[str]:
    """Host ``node_rank``'s command of one Mininet run: torchrun (as ``python -m
    torch.distributed.run``, this interpreter's), one rank per host, rendezvous on host 0."""
    from emulation.mininet import worker_ip

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(workers), "--node_rank", str(node_rank),
           "--nproc_per_node", "1", "--master_addr", worker_ip(0), "--master_port", str(master_port),
           "-m", "trainer.cli", cfg.task, "--launcher", "torchrun", "--comm", backend]
    if backend == "switchml":
        # --no-fallback: a step that could not go through the switch fails the run rather than
        # timing Gloo under the switch's name
        cmd += ["--controller", controller, "--no-fallback"]
    return cmd + _run_options(cfg, out, seed)


def read_run(out: Path) -> tuple[list[dict], dict]:
    """Rank 0's per-step records (the last stage's) and final metrics of a finished run."""
    metrics, final = out / "metrics.jsonl", out / "final_metrics.json"
    if not metrics.exists() or not final.exists():
        raise TrainBenchmarkError(f"{out}: the run left no metrics.jsonl/final_metrics.json")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    stages = json.loads(final.read_text())
    last_stage = list(stages)[-1]
    steps = [r for r in records if r.get("stage") == last_stage and "step" in r and not r.get("final")]
    return steps, stages[last_stage]


def smoothed_loss(steps: list[dict], window: int) -> np.ndarray:
    """The training loss averaged over the last ``window`` steps (fewer at the start)."""
    loss = np.array([r["loss"] for r in steps], dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(loss)])
    ends = np.arange(1, len(loss) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def step_durations(steps: list[dict]) -> np.ndarray:
    """Seconds each step took, from the elapsed times rank 0 logged after every step."""
    elapsed = np.array([r["time"] for r in steps], dtype=float)
    return np.diff(np.concatenate([[0.0], elapsed]))


def time_to_loss(elapsed: list[float], smooth: list[float], target: float) -> float | None:
    """Elapsed training time when the smoothed loss first reached ``target`` (None: never)."""
    hits = np.nonzero(np.asarray(smooth) <= target)[0]
    return float(elapsed[hits[0]]) if hits.size else None


def _execute_loopback(cfg: TrainBenchConfig, workers: int, backend: str, out: Path, seed: int | None) -> dict:
    """One loopback run: ``switchml-train`` as a child process with the local launcher."""
    cmd = train_command(cfg, workers, backend, out, seed)
    env = child_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    log_path = out / "train.log"
    with log_path.open("w") as log_file:
        try:
            proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=cfg.timeout,
                                  cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            raise TrainBenchmarkError(f"{backend} with {workers} workers did not finish within --timeout "
                                      f"{cfg.timeout:g} s; its log: {log_path}") from None
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise TrainBenchmarkError(f"{backend} with {workers} workers failed (exit code {proc.returncode}): "
                                  f"{shlex.join(cmd)}\n{tail}")
    return {}


class MininetStar:
    """The ranks of one worker count on the hosts of a Mininet star, and its switch host.

    One star serves every run of its worker count; each switchml run gets a fresh software
    switch (stopped by PID after the run) and each run a fresh rendezvous port.
    """

    def __init__(self, cfg: TrainBenchConfig, workers: int) -> None:
        from emulation.mininet import StarNetwork

        sizing = cfg.sizing()
        self.workers, self.k, self.window = workers, sizing.packet_k(), sizing.window_for(workers)
        # the controller listens on the switch host's address, which every worker host reaches:
        # authenticated, with a secret of this benchmark's own
        self.secret = {defaults.SECRET_ENV: secrets.token_hex(32)}
        self.star = StarNetwork(workers, cfg.bw_mbit, cfg.mtu).start()
        self._port = MASTER_PORT_BASE

    def __enter__(self) -> MininetStar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop what runs on the star (by PID) and take it down."""
        self.star.stop()

    def execute(self, cfg: TrainBenchConfig, backend: str, out: Path, seed: int | None) -> dict[str, Any]:
        """One run: torchrun on every host; for switchml, the switch on the switch host.
        Returns what the run adds to its record (k, window, the switch's CPU and counters)."""
        from emulation.mininet import SWITCH_IP

        self._port += 1
        switch, controller, extra = None, None, {}
        if backend == "switchml":
            switch_log = out / "switch.log"
            try:
                switch = self.star.spawn_switch(switch_log, env=self.secret, port=defaults.SWITCH_PORT,
                                                control_port=defaults.CONTROL_PORT, k=self.k, window=self.window)
            except SwitchMLError as exc:
                tail = switch_log.read_text(errors="replace")[-2000:] if switch_log.exists() else ""
                raise TrainBenchmarkError(f"the software switch did not start on the star: {exc}\n{tail}") from None
            controller = f"tcp://{SWITCH_IP}:{defaults.CONTROL_PORT}"
            extra = {"k": self.k, "window": self.window}
        try:
            cpu0 = process_cpu_seconds(switch.pid) if switch else None
            procs = [self.star.popen(host, torchrun_command(cfg, self.workers, i, backend, out, self._port, controller,
                                                            seed),
                                     env=self._env(i), log_path=str(out / f"rank{i}.log"), cwd=str(REPO_ROOT))
                     for i, host in enumerate(self.star.hosts)]
            _wait_workers(procs, time.monotonic() + cfg.timeout)
            if switch is not None:
                cpu1 = process_cpu_seconds(switch.pid)
                extra["switch_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
                extra["switch_counters"] = self._switch_counters(controller)
        finally:
            if switch is not None:
                stop_process(switch, grace=5.0)
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            # a host that exited with an error first; those killed (negative codes) after it, or at the timeout
            rank, code = min(failed, key=lambda f: f[1] is None or f[1] < 0)
            tail = "\n".join((out / f"rank{rank}.log").read_text(errors="replace").splitlines()[-15:])
            what = "did not finish within --timeout" if code is None or code < 0 else f"exited with {code}"
            raise TrainBenchmarkError(f"{backend} with {self.workers} workers on the Mininet star: host {rank} {what} "
                                      f"(--timeout {cfg.timeout:g} s); {out / f'rank{rank}.log'}:\n{tail}")
        return extra

    def _env(self, host: int) -> dict[str, str]:
        return child_env({**self.secret, "GLOO_SOCKET_IFNAME": self.star.worker_ifname(host),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})

    def _switch_counters(self, controller: str) -> dict[str, Any] | None:
        """The switch's counters (``switchml-switch stats`` from host 0), or None if it did not answer."""
        proc = self.star.hosts[0].popen([sys.executable, "-m", "emulation.cli", "stats", "--controller", controller],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                        env=child_env(self.secret), cwd=str(REPO_ROOT))
        try:
            text, _ = proc.communicate(timeout=30)
            return json.loads(text).get("counters")
        except (subprocess.TimeoutExpired, ValueError):
            stop_process(proc, grace=2.0)
            return None


def comm_wait_share(steps: list[dict], durations: np.ndarray, skip: int) -> float | None:
    """The share of the steps after ``skip`` spent waiting for the allreduce (None: not logged)."""
    waits = [r.get("comm_wait") for r in steps[skip:]]
    if not waits or any(w is None for w in waits):
        return None
    total = float(durations[skip:].sum())
    return float(sum(waits)) / total if total > 0 else None


def run_once(cfg: TrainBenchConfig, workers: int, backend: str, out: Path, star: MininetStar | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """One training run (on ``star``'s hosts if given, else on loopback); its step times,
    comm wait, loss curve and final metrics."""
    out.mkdir(parents=True, exist_ok=True)
    extra = star.execute(cfg, backend, out, seed) if star else _execute_loopback(cfg, workers, backend, out, seed)
    steps, final = read_run(out)
    if len(steps) != cfg.steps:
        raise TrainBenchmarkError(f"{out}: expected {cfg.steps} step records, found {len(steps)}")
    all_durations = step_durations(steps)
    durations = all_durations[cfg.skip:]
    return {"step_s": float(np.median(durations)), "step_s_mean": float(durations.mean()),
            "train_seconds": float(steps[-1]["time"]), "loss": [r["loss"] for r in steps],
            "elapsed_s": [r["time"] for r in steps], "smoothed_loss": smoothed_loss(steps, cfg.smooth).tolist(),
            "comm_wait_s": [r.get("comm_wait") for r in steps],
            "comm_wait_share": comm_wait_share(steps, all_durations, cfg.skip), "seed": seed,
            "comm_per_step": sorted({r.get("comm", backend) for r in steps}), "final": final, **extra}


def run(cfg: TrainBenchConfig, command: str) -> dict[str, Any]:
    """Every (workers, repeat, backend) of ``cfg``; the JSON document of the results."""
    cfg.validate()
    from tqdm import tqdm

    total = len(cfg.workers) * cfg.repeats * len(cfg.backends)
    bar = tqdm(total=total, desc="train runs", unit="run", disable=not cfg.progress, dynamic_ncols=True)
    points = []
    with tempfile.TemporaryDirectory(prefix="switchml-bench-train-") as tmp:
        root = Path(cfg.keep_dir) if cfg.keep_dir else Path(tmp)
        for n in cfg.workers:
            runs: dict[str, list[dict]] = {b: [] for b in cfg.backends}
            star = MininetStar(cfg, n) if cfg.net == "mininet" else None
            try:
                for repeat in range(cfg.repeats):
                    for backend in cfg.backends:
                        bar.set_postfix(workers=n, backend=backend, repeat=repeat)
                        runs[backend].append(run_once(cfg, n, backend, root / f"w{n}" / f"{backend}-{repeat}", star,
                                                      cfg.seed(repeat)))
                        bar.update(1)
            finally:
                if star is not None:
                    star.close()
            points.append(_point(cfg, n, runs))
    bar.close()
    return {"command": command, "machine": machine_info(), "config": asdict(cfg), "results": points}


def _point(cfg: TrainBenchConfig, workers: int, runs: dict[str, list[dict]]) -> dict[str, Any]:
    all_runs = [r for rs in runs.values() for r in rs]
    target = cfg.target_loss if cfg.target_loss is not None else max(r["smoothed_loss"][-1] for r in all_runs)
    backends = {}
    for backend, rs in runs.items():
        for r in rs:
            r["time_to_target_s"] = time_to_loss(r["elapsed_s"], r["smoothed_loss"], target)
        step = summarize([r["step_s"] for r in rs])
        reached = [r["time_to_target_s"] for r in rs if r["time_to_target_s"] is not None]
        batch = cfg.batch_size or rs[0]["final"].get("batch_size")
        shares = [r["comm_wait_share"] for r in rs if r.get("comm_wait_share") is not None]
        backends[backend] = {
            "step_s": step, "samples_per_s": workers * batch / step["median"] if batch else None,
            "train_seconds": summarize([r["train_seconds"] for r in rs]),
            "time_to_target_s": summarize(reached) if reached else None,
            "comm_wait_share": summarize(shares) if shares else None,
            "runs_reaching_target": len(reached), "runs": rs}
    point = {"workers": workers, "target_loss": target, "backends": backends}
    if {"switchml", "allreduce"} <= set(backends):
        point["step_ratio_switchml_over_allreduce"] = (backends["switchml"]["step_s"]["median"]
                                                       / backends["allreduce"]["step_s"]["median"])
        point["loss_agreement"] = loss_agreement(runs["switchml"], runs["allreduce"])
    return point


def loss_agreement(switchml: list[dict], allreduce: list[dict]) -> dict[str, Any]:
    """How far apart the two backends' smoothed loss curves are, repeat by repeat (each pair
    trained with the same seed), against how far apart one backend's repeats end: with
    --vary-seed that is the seed-to-seed spread the backends' difference is judged against."""
    pairs = list(zip(switchml, allreduce, strict=False))
    curve = [float(np.max(np.abs(np.subtract(s["smoothed_loss"], a["smoothed_loss"])))) for s, a in pairs]
    final = [s["smoothed_loss"][-1] - a["smoothed_loss"][-1] for s, a in pairs]

    def spread(rs: list[dict]) -> float | None:
        ends = [r["smoothed_loss"][-1] for r in rs]
        return float(max(ends) - min(ends)) if len(ends) > 1 else None

    return {"max_abs_curve_difference": curve, "final_difference": final,
            "switchml_final_spread": spread(switchml), "allreduce_final_spread": spread(allreduce),
            "seeds": [a.get("seed") for a in allreduce]}


def format_report(doc: dict[str, Any]) -> str:
    """The results as a table: one row per (workers, backend)."""
    rows = []
    for point in doc["results"]:
        for backend, res in point["backends"].items():
            final = res["runs"][-1]["final"]
            metric = next(((k, v) for k, v in final.items() if "accuracy" in k), None)
            ttt = res["time_to_target_s"]
            share = res.get("comm_wait_share")
            rows.append([point["workers"], backend, res["step_s"]["median"] * 1e3,
                         res["step_s"]["min"] * 1e3, res["step_s"]["max"] * 1e3, res["samples_per_s"],
                         ttt["median"] if ttt else None, share["median"] if share else None,
                         f"{metric[0]}={metric[1]:.3f}" if metric else "-",
                         point.get("step_ratio_switchml_over_allreduce") if backend == "switchml" else None])
    head = ["workers", "backend", "step ms (median)", "min", "max", "samples/s", "s to target", "comm wait",
            "final", "step ratio"]
    targets = ", ".join(f"{p['workers']} workers: {p['target_loss']:.4f}" for p in doc["results"])
    return (table(head, rows) + f"\ntarget loss (smoothed training loss): {targets}"
            "\ncomm wait: share of each step blocked in backward() after its last gradient (the unhidden allreduce)")


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["results"]
    # top: loss against training time (what the step times buy); bottom: against the step
    # (whether the two backends train alike)
    fig, axes = plt.subplots(2, len(points), figsize=(6 * len(points), 8), squeeze=False)
    colours = {"switchml": "tab:blue", "allreduce": "tab:orange"}
    config = doc["config"]
    net = (f", Mininet {config['bw_mbit']:g} Mbit/s" if config.get("bw_mbit") else ", Mininet") \
        if config.get("net") == "mininet" else ""
    for col, point in enumerate(points):
        for row, x_key in enumerate(("elapsed_s", None)):
            ax = axes[row][col]
            for backend, res in point["backends"].items():
                for i, r in enumerate(res["runs"]):
                    x = r[x_key] if x_key else np.arange(1, len(r["smoothed_loss"]) + 1)
                    ax.plot(x, r["smoothed_loss"], color=colours.get(backend), alpha=0.8,
                            label=f"{backend} ({res['step_s']['median'] * 1e3:.1f} ms/step)" if i == 0 else None)
            ax.axhline(point["target_loss"], color="grey", linestyle=":", label="target")
            ax.set(title=f"{config['task']}, {point['workers']} workers{net}",
                   xlabel="training time (s)" if x_key else "step", ylabel="training loss (smoothed)")
            ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(doc["command"], 100)), fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
