"""``switchml-bench train``: a training run through SwitchML against DDP's allreduce, in the same run.

For every worker count and repeat, each backend in turn (interleaved, so that a drift in
the machine's load hits both alike):

1. run ``switchml-train TASK --workers N --comm {switchml|allreduce} --steps S --log-every 1``
   as a child process (the local launcher: the software switch on loopback for switchml,
   Gloo on CPU), with its own output folder;
2. read rank 0's ``metrics.jsonl`` (elapsed training time after every step; setup,
   registration and evaluation are outside it) and ``final_metrics.json``;
3. step time: the median of the per-step durations after ``--skip`` warm-up steps;
   samples/s: N * batch size / step time; time to target: the first elapsed time at which
   the training loss, averaged over the last ``--smooth`` steps, is at or below the target.

The target loss is ``--target-loss``, or by default the highest final smoothed loss of
all runs of that worker count: the loss every run reached, so every run has a time to it.
Reported per backend: medians over repeats, and the ratio switchml/allreduce of the step
times. Only loopback for now: the Mininet star of ``allreduce`` is not wired to the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, machine_info, summarize, table, write_json
from emulation.spawn import child_env

log = logging.getLogger(__name__)

BACKENDS = ("switchml", "allreduce")


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

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"--backends: unknown {unknown}; expected some of {', '.join(BACKENDS)}")
        if self.steps <= self.skip:
            raise ValueError(f"--steps {self.steps} must be more than --skip {self.skip} (warm-up steps)")
        for name in ("repeats", "smooth"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")


def train_command(cfg: TrainBenchConfig, workers: int, backend: str, out: Path) -> list[str]:
    """The ``switchml-train`` command line of one run."""
    cmd = [sys.executable, "-m", "trainer.cli", cfg.task, "--workers", str(workers), "--comm", backend,
           "--steps", str(cfg.steps), "--log-every", "1", "--checkpoint-every", str(cfg.steps),
           "--no-progress", "--out", str(out)]
    if cfg.batch_size:
        cmd += ["--batch-size", str(cfg.batch_size)]
    return cmd + list(cfg.task_args)


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


def run_once(cfg: TrainBenchConfig, workers: int, backend: str, out: Path) -> dict[str, Any]:
    """One training run; its step times, loss curve and final metrics."""
    cmd = train_command(cfg, workers, backend, out)
    out.mkdir(parents=True, exist_ok=True)
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
    steps, final = read_run(out)
    if len(steps) != cfg.steps:
        raise TrainBenchmarkError(f"{out}: expected {cfg.steps} step records, found {len(steps)}")
    durations = step_durations(steps)[cfg.skip:]
    return {"step_s": float(np.median(durations)), "step_s_mean": float(durations.mean()),
            "train_seconds": float(steps[-1]["time"]), "loss": [r["loss"] for r in steps],
            "elapsed_s": [r["time"] for r in steps], "smoothed_loss": smoothed_loss(steps, cfg.smooth).tolist(),
            "comm_per_step": sorted({r.get("comm", backend) for r in steps}), "final": final}


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
            for repeat in range(cfg.repeats):
                for backend in cfg.backends:
                    bar.set_postfix(workers=n, backend=backend, repeat=repeat)
                    runs[backend].append(run_once(cfg, n, backend, root / f"w{n}" / f"{backend}-{repeat}"))
                    bar.update(1)
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
        backends[backend] = {
            "step_s": step, "samples_per_s": workers * batch / step["median"] if batch else None,
            "train_seconds": summarize([r["train_seconds"] for r in rs]),
            "time_to_target_s": summarize(reached) if reached else None,
            "runs_reaching_target": len(reached), "runs": rs}
    point = {"workers": workers, "target_loss": target, "backends": backends}
    if {"switchml", "allreduce"} <= set(backends):
        point["step_ratio_switchml_over_allreduce"] = (backends["switchml"]["step_s"]["median"]
                                                       / backends["allreduce"]["step_s"]["median"])
    return point


def format_report(doc: dict[str, Any]) -> str:
    """The results as a table: one row per (workers, backend)."""
    rows = []
    for point in doc["results"]:
        for backend, res in point["backends"].items():
            final = res["runs"][-1]["final"]
            metric = next(((k, v) for k, v in final.items() if "accuracy" in k), None)
            ttt = res["time_to_target_s"]
            rows.append([point["workers"], backend, res["step_s"]["median"] * 1e3,
                         res["step_s"]["min"] * 1e3, res["step_s"]["max"] * 1e3, res["samples_per_s"],
                         ttt["median"] if ttt else None, f"{metric[0]}={metric[1]:.3f}" if metric else "-",
                         point.get("step_ratio_switchml_over_allreduce") if backend == "switchml" else None])
    head = ["workers", "backend", "step ms (median)", "min", "max", "samples/s", "s to target", "final",
            "step ratio"]
    targets = ", ".join(f"{p['workers']} workers: {p['target_loss']:.4f}" for p in doc["results"])
    return table(head, rows) + f"\ntarget loss (smoothed training loss): {targets}"


def save(doc: dict[str, Any], json_path: str | None, plot_path: str | None) -> None:
    """Write the JSON and, if asked, a PNG of smoothed loss against training time."""
    if json_path:
        write_json(json_path, doc)
    if plot_path:
        _plot(doc, plot_path)


def _plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = doc["results"]
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4), squeeze=False)
    colours = {"switchml": "tab:blue", "allreduce": "tab:orange"}
    for ax, point in zip(axes[0], points, strict=True):
        for backend, res in point["backends"].items():
            for i, r in enumerate(res["runs"]):
                ax.plot(r["elapsed_s"], r["smoothed_loss"], color=colours.get(backend), alpha=0.8,
                        label=f"{backend} ({res['step_s']['median'] * 1e3:.1f} ms/step)" if i == 0 else None)
        ax.axhline(point["target_loss"], color="grey", linestyle=":", label="target")
        ax.set(title=f"{doc['config']['task']}, {point['workers']} workers", xlabel="training time (s)",
               ylabel="training loss (smoothed)")
        ax.legend()
    fig.suptitle("\n".join(textwrap.wrap(doc["command"], 100)), fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
