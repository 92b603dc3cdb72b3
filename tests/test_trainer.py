"""switchml-train end to end: the local launcher, --resume, torchrun, Ray, switchml-eval."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from trainer_cli import ENV, PY, metric_lines, train

from switchml import defaults


def test_local_launcher_trains_through_the_switch_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = train("digits", "--workers", "2", "--steps", "20", "--log-every", "5", "--checkpoint-every", "10",
                 "--out", str(out), "--no-progress")
    final = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]["digits"]
    assert final["buckets_through_switch"] == 20 and final["buckets_on_fallback"] == 0
    lines = [m for m in metric_lines(out) if "final" not in m]
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert all(m["comm"] == "switchml" for m in lines)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (out / "digits.pt").exists()

    train("digits", "--workers", "2", "--steps", "30", "--log-every", "5", "--out", str(out), "--resume",
          "--no-progress")
    resumed = [m for m in metric_lines(out) if "final" not in m][len(lines):]
    assert [m["step"] for m in resumed] == [25, 30]  # continued at 20, not from scratch
    final = json.loads((out / "final_metrics.json").read_text())["digits"]
    assert final["steps"] == 30 and final["buckets_through_switch"] == 10

    proc = subprocess.run([PY, "-m", "trainer.eval_cli", "digits", "--ckpt", str(out)], capture_output=True,
                          text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["test_accuracy"] == pytest.approx(final["test_accuracy"])


def test_allreduce_baseline_runs(tmp_path):
    proc = train("digits", "--workers", "2", "--steps", "5", "--comm", "allreduce", "--out", str(tmp_path),
                 "--no-progress")
    final = json.loads(proc.stdout[proc.stdout.index("{"):])["results"]["digits"]
    assert "buckets_through_switch" not in final and final["steps"] == 5


def _ports_free(*ports: int) -> bool:
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return False
    return True


@pytest.mark.slow
def test_torchrun_standalone_starts_the_switch_on_rank_zero(tmp_path):
    if not _ports_free(defaults.SWITCH_PORT, defaults.CONTROL_PORT):
        pytest.skip("the default switch ports are in use on this machine")
    torchrun = shutil.which("torchrun", path=str(Path(PY).parent)) or shutil.which("torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "trainer.cli", "digits", "--launcher",
           "torchrun", "--steps", "6", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())["digits"]
    assert final["buckets_through_switch"] == 6


@pytest.mark.slow
def test_ray_local_cluster_with_two_cpu_workers(tmp_path):
    proc = train("digits", "--launcher", "ray", "--workers", "2", "--steps", "6", "--out", str(tmp_path),
                 "--no-progress", timeout=400)
    final = json.loads((tmp_path / "final_metrics.json").read_text())["digits"]
    assert final["buckets_through_switch"] == 6 and final["steps"] == 6, proc.stdout[-2000:]
    output = proc.stdout + proc.stderr
    # Ray Train's noise about what a cluster without its dashboard lacks, and about the
    # preemption watcher the launcher switches off, stays out; where the time went is logged
    assert "Failed to query Ray Train Controller actor state" not in output
    assert "PreemptionWatcher" not in output
    assert "Ray: cluster (local) started in" in output and "Ray Train: the run took" in output


def test_help_and_bad_task():
    proc = subprocess.run([PY, "-m", "trainer.cli", "--help"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0 and "digits" in proc.stdout
    proc = subprocess.run([PY, "-m", "trainer.cli", "digits", "--help"], capture_output=True, text=True, env=ENV)
    assert "--comm" in proc.stdout and "--resume" in proc.stdout and "--width" in proc.stdout
    proc = subprocess.run([PY, "-m", "trainer.cli", "nosuchtask"], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and "nosuchtask" in proc.stderr
