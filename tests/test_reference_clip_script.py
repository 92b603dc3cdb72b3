"""benchmarks/reference/clip.sh's bookkeeping, with stand-ins for switchml-train and switchml-eval.

Training and evaluation themselves are tested elsewhere (test_clip_task), and the script's
smallest real invocation is seven trainings and evaluations of the default model, minutes of
CI; so here a stand-in records each call and writes what the script copies, so that the test checks which runs the
script starts, which it reuses (REUSE=1: same command, finished) and what it hands the evaluation.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reference" / "clip.sh"

STAND_IN = """#!/usr/bin/env bash
# Records its arguments; as switchml-train writes --out's final_metrics.json.
echo "$(basename "$0") $*" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
if [ -n "$out" ]; then mkdir -p "$out"; echo '{}' > "$out/final_metrics.json"; fi
"""


def _run(tmp_path: Path, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("switchml-train", "switchml-eval"):
        path = bin_dir / name
        path.write_text(STAND_IN)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(SCRIPT), "7", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=60, cwd=ROOT,
                          env={**os.environ, "SWITCHML_BIN": str(bin_dir), "CALLS": str(calls), "SEEDS": "0 1",
                               "RESULTS": str(tmp_path / "results"), **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return calls.read_text().splitlines()


def _trained(calls: list[str]) -> list[str]:
    return [c.split("--out ")[1] for c in calls if c.startswith("switchml-train")]


@pytest.mark.parametrize("reuse", ["", "1"])
def test_reference_script_trains_every_method_and_seed_then_compares_them(tmp_path, reuse):
    calls = _run(tmp_path, REUSE=reuse)
    runs = tmp_path / "runs"
    assert _trained(calls) == [str(runs / n) for n in ("clip_s0", "tripletclip_s0", "negclip_s0", "clip_s1",
                                                       "tripletclip_s1", "negclip_s1", "tripletclip-allreduce_s0")]
    assert all("--steps 7" in c for c in calls if c.startswith("switchml-train"))
    # Every method trains on the same (data-limited) scenes, the script's default unless TRAIN_SCENES is given.
    scenes = {c.split("--train-scenes ")[1].split()[0] for c in calls if c.startswith("switchml-train")}
    assert len(scenes) == 1 and int(scenes.pop()) > 0
    (evaluation,) = [c for c in calls if c.startswith("switchml-eval")]
    assert f"--ckpt clip@0={runs / 'clip_s0'}" in evaluation and "tripletclip-allreduce@0=" in evaluation
    assert (tmp_path / "results" / "negclip_s1.final_metrics.json").is_file()


def test_reuse_keeps_finished_runs_of_the_same_command_only(tmp_path):
    _run(tmp_path)
    runs = tmp_path / "runs"
    (runs / "negclip_s1" / "final_metrics.json").unlink()  # an interrupted run
    cmd = runs / "clip_s1.cmd"
    cmd.write_text(cmd.read_text().replace("--seed 1", "--seed 9"))  # a folder trained otherwise
    calls = _run(tmp_path, REUSE="1")
    assert _trained(calls) == [str(runs / "clip_s1"), str(runs / "negclip_s1")]
    assert len([c for c in calls if c.startswith("switchml-eval")]) == 1  # every run is still compared
    assert len(_trained(_run(tmp_path))) == 7  # without REUSE, everything trains again


def test_train_scenes_reaches_every_run_and_a_change_retrains(tmp_path):
    _run(tmp_path)
    calls = _run(tmp_path, REUSE="1", TRAIN_SCENES="123")  # another data set: nothing is reused
    trainings = [c for c in calls if c.startswith("switchml-train")]
    assert len(trainings) == 7 and all("--train-scenes 123 " in c for c in trainings)
    assert "training scenes: 123" in (tmp_path / "results" / "COMMAND").read_text()
