"""``switchml-switch``: emulate as a real process, stats over the controller, clean shutdown."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from switchml import Worker
from trainer.launch import free_port

pytestmark = pytest.mark.usefixtures("dataplane")  # both data paths (conftest.py)

PY = sys.executable


def test_emulate_serves_a_job_and_stats_reports_its_counters():
    port, control = free_port(), free_port()
    switch = subprocess.Popen([PY, "-m", "emulation.cli", "emulate", "--host", "127.0.0.1", "--port", str(port),
                               "--control-port", str(control), "-k", "256", "--window", "4"],
                              stderr=subprocess.PIPE, text=True)
    endpoint = f"tcp://127.0.0.1:{control}"
    try:
        ready = subprocess.run([PY, "-m", "emulation.cli", "wait", "--controller", endpoint, "--timeout", "60"],
                               capture_output=True, text=True, timeout=90)
        assert ready.returncode == 0, ready.stderr
        assert ready.stdout.strip() == f"controller {endpoint} ready: switch data address 127.0.0.1:{port}"
        with Worker(endpoint, "cli", 0, 1, control_timeout=30) as w:
            assert w.info.k == 256 and w.info.window == 4
            assert w.allreduce(np.arange(1000, dtype=np.int32)).tolist() == list(range(1000))
            stats = subprocess.run([PY, "-m", "emulation.cli", "stats", "--controller", endpoint],
                                   capture_output=True, text=True, timeout=60)
        assert stats.returncode == 0, stats.stderr
        report = json.loads(stats.stdout)
        # 1000 int32 in 4 blocks of 256 after a first window of 4 (the call descriptor), and the
        # registration probe (one round on one slot)
        assert report["counters"]["results_multicast"] == 4 + 4 + 1
        assert report["counters"]["aggregated"] == 4 + 4 + 1 and report["counters"]["resets"] == 4
        assert [j["name"] for j in report["jobs"]] == ["cli"] and report["jobs"][0]["state"] == "running"
    finally:
        switch.send_signal(signal.SIGTERM)
        _, err = switch.communicate(timeout=30)
    assert switch.returncode == 0, err
    assert "job 'cli' ended" in err and "stopped" in err


def test_stats_without_a_switch_fails_clearly():
    proc = subprocess.run([PY, "-m", "emulation.cli", "stats", "--controller", f"tcp://127.0.0.1:{free_port()}",
                           "--timeout", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no answer from the controller" in proc.stderr


def test_wait_without_a_switch_gives_up_at_its_timeout():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.run([PY, "-m", "emulation.cli", "wait", "--controller", endpoint, "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"the controller at {endpoint} did not answer within 1 s" in proc.stderr


def test_emulate_rejects_bad_options():
    proc = subprocess.run([PY, "-m", "emulation.cli", "emulate", "--drop-probability", "5"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--drop-probability" in proc.stderr and "fraction" in proc.stderr
    proc = subprocess.run([PY, "-m", "emulation.cli", "emulate", "-k", "100"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "100" in proc.stderr
