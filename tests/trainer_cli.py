"""switchml-train in a subprocess, as the end-to-end trainer tests run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m trainer.cli ARGS``; fails the test with its output's tail unless it exits 0."""
    proc = subprocess.run([PY, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metric_lines(out: Path) -> list[dict]:
    """The run's ``metrics.jsonl`` records, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
