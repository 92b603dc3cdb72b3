"""Faults and misuse caught at the first sign (issue 15, items 2-5 and 7): real processes,
real sockets, a real Gloo process group; processes are stopped and killed by PID.

Bounds on how fast a failure is reported use small heartbeat intervals and generous slack
(the machine running the tests is loaded); without the fixes each of them takes 30-120 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ddp_workers import ddp_rank
from mpworkers import CTX, run_processes

from emulation.spawn import spawn_switch, stop_process
from switchml import ControllerError, Worker
from switchml.errors import SwitchUnreachable
from switchml.net import free_port

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.25  #: the workers' heartbeat interval in these tests
SLACK = 3.0  #: seconds of scheduling noise allowed on top of a bound


def _construct(results: dict, key: str, *args, **kwargs) -> None:
    """Build a Worker in a thread (registration blocks until the job forms); keep it or its error."""
    start = time.monotonic()
    try:
        results[key] = Worker(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        results[key] = exc
    results[key + "_s"] = time.monotonic() - start


# ----------------------------------------------------------------- item 5
def test_duplicate_registration_is_refused_at_once_and_the_first_stays_valid(make_switch):
    env = make_switch(window=4, k=64)
    results: dict = {}
    first = threading.Thread(target=_construct, args=(results, "first", env.endpoint, "dup", 0, 2),
                             kwargs={"control_timeout": 30})
    first.start()
    deadline = time.monotonic() + 20
    while not any(j["registered"] == [0] for j in _jobs(env)) and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    with pytest.raises(ControllerError, match=r"rank 0 is already registered.*first stays"):
        Worker(env.endpoint, "dup", 0, 2, control_timeout=30)
    assert time.monotonic() - start < SLACK  # at once, not at the registration timeout
    second = threading.Thread(target=_construct, args=(results, "second", env.endpoint, "dup", 1, 2),
                              kwargs={"control_timeout": 30})
    second.start()
    first.join(60)
    second.join(60)
    workers = [results["first"], results["second"]]
    assert all(isinstance(w, Worker) for w in workers), workers
    try:
        futures = [w.allreduce_async(np.full(100, w.rank + 1, np.int32)) for w in workers]
        assert all(f.result(timeout=30).tolist() == [3] * 100 for f in futures)
    finally:
        for w in workers:
            w.close()


def _jobs(env) -> list[dict]:
    from switchml.control import ControlClient

    client = ControlClient(env.endpoint, 10)
    try:
        return client.request({"op": "stats"})["jobs"]
    finally:
        client.close()


# ----------------------------------------------------------------- item 2
def test_worker_names_the_switch_address_when_no_packet_comes_back(make_switch):
    env = make_switch(window=4, k=64)
    # every worker port loses everything; port 0 (the controller, whose RESETs set up the job) nothing
    env.switch.set_drop_probability(None, 1.0)
    env.switch.set_drop_probability(0, 0.0)
    results: dict = {}
    threads = [threading.Thread(target=_construct, args=(results, f"r{r}", env.endpoint, "blackhole", r, 2),
                                kwargs={"control_timeout": 30, "probe_timeout": 1.0}) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    host, port = env.server.address
    for r in range(2):
        error = results[f"r{r}"]
        assert isinstance(error, SwitchUnreachable), error
        assert f"{host}:{port}" in str(error) and "no packet came back" in str(error) and "advertise" in str(error)
        assert results[f"r{r}_s"] < 1.0 + SLACK
    # the failed job left: its slots are free again for a job that reaches the switch
    env.switch.set_drop_probability(None, 0.0)
    with Worker(env.endpoint, "after", 0, 1, control_timeout=30) as w:
        assert w.allreduce(np.arange(10, dtype=np.int32)).tolist() == list(range(10))


class _Namespace:
    """A network namespace joined to this one by a veth pair: a 'remote' host, as Mininet's are."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.name, self.host_if, self.ns_if = f"smlf{tag}", f"smh{tag}", f"smn{tag}"
        subnet = 10 + os.getpid() % 200
        self.host_ip, self.ns_ip = f"10.252.{subnet}.1", f"10.252.{subnet}.2"
        steps = [["ip", "netns", "add", self.name],
                 ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
                 ["ip", "link", "set", self.ns_if, "netns", self.name],
                 ["ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if],
                 ["ip", "link", "set", self.host_if, "up"],
                 *[["ip", "netns", "exec", self.name, *c] for c in (
                     ["ip", "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if],
                     ["ip", "link", "set", self.ns_if, "up"], ["ip", "link", "set", "lo", "up"])]]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, timeout=30)
        except (subprocess.CalledProcessError, OSError) as exc:
            self.close()
            pytest.skip(f"cannot build a network namespace here: {exc}")

    def run_python(self, code: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, PY, "-c", textwrap.dedent(code)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)


@pytest.fixture
def remote_host():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    ns = _Namespace()
    yield ns
    ns.close()


def _emulate(*extra: str) -> tuple[subprocess.Popen, int]:
    port, control = free_port(), free_port()
    # --insecure: an open control channel on the wildcard address (reached only from the test's namespace)
    proc = subprocess.Popen([PY, "-m", "emulation.cli", "emulate", "--host", "0.0.0.0", "--port", str(port),
                             "--control-port", str(control), "-k", "64", "--window", "4", "--insecure", *extra],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    return proc, control


_REMOTE_WORKER = """
    import numpy as np
    from switchml import Worker
    try:
        with Worker("tcp://{ip}:{control}", "remote", 0, 1, control_timeout=20, probe_timeout=2) as w:
            print("SUM", w.allreduce(np.arange(5, dtype=np.int32)).tolist(), w.info.switch)
    except Exception as exc:
        print("ERROR", type(exc).__name__, exc)
"""


def test_wildcard_address_is_refused_to_a_remote_worker_and_advertise_address_fixes_it(remote_host):
    switch, control = _emulate()
    try:
        start = time.monotonic()
        proc = remote_host.run_python(_REMOTE_WORKER.format(ip=remote_host.host_ip, control=control))
        elapsed = time.monotonic() - start
    finally:
        stop_process(switch)
        _, err = switch.communicate(timeout=30)
    assert proc.stdout.startswith("ERROR ControllerError"), proc.stdout + proc.stderr
    assert "0.0.0.0" in proc.stdout and remote_host.ns_ip in proc.stdout and "--advertise-address" in proc.stdout
    assert elapsed < 20  # refused at registration, not after the 20 s control timeout
    assert "--advertise-address" in err  # the switch warned at start-up

    switch, control = _emulate("--advertise-address", remote_host.host_ip)
    try:
        proc = remote_host.run_python(_REMOTE_WORKER.format(ip=remote_host.host_ip, control=control))
    finally:
        stop_process(switch)
        switch.communicate(timeout=30)
    assert proc.stdout.startswith("SUM [0, 1, 2, 3, 4]"), proc.stdout + proc.stderr
    assert remote_host.host_ip in proc.stdout


def test_advertise_address_rejects_a_wildcard():
    proc = subprocess.run([PY, "-m", "emulation.cli", "emulate", "--advertise-address", "0.0.0.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "wildcard" in proc.stderr


# ------------------------------------------------------------- items 3, 7
def _run_ddp(n: int, runs: list[tuple[str, dict]], timeout: float = 150) -> list:
    port = free_port()
    return run_processes(ddp_rank, lambda r: (r, n, port, runs), n, timeout)


def test_switch_death_makes_every_rank_fall_back_within_two_heartbeats(dataplane):
    switch = spawn_switch("127.0.0.1", free_port(), (control := free_port()), k=64)
    try:
        # progress timeout far above the bound: only the heartbeat can meet it
        options = {"controller": f"tcp://127.0.0.1:{control}", "steps": 6, "timeout": 60.0,
                   "heartbeat_interval": HEARTBEAT, "kill_pid": switch.pid, "kill_pid_at_step": 2}
        reports = _run_ddp(2, [("allreduce", {"steps": 6}), ("switchml", options)])
    finally:
        stop_process(switch)
    errors = [r[1] for r in reports if isinstance(r[1], str)]
    assert not errors, errors[0]
    reference = reports[0][1][0][0]
    for _, runs in reports:
        params, stats = runs[1]
        np.testing.assert_allclose(params, reference, rtol=0, atol=1e-5)
        assert stats["through_switch"] > 0 and stats["on_fallback"] > 0 and not stats["using_switch"]
        # the step after the death waited for the heartbeat's verdict, not the progress timeout
        assert stats["max_step_s"] < 2 * HEARTBEAT + SLACK, stats


def test_hook_failure_reaches_ddp_with_its_cause():
    switch = spawn_switch("127.0.0.1", free_port(), (control := free_port()), k=64)
    try:
        options = {"controller": f"tcp://127.0.0.1:{control}", "steps": 6, "timeout": 60.0, "fallback": False,
                   "heartbeat_interval": HEARTBEAT, "kill_pid": switch.pid, "kill_pid_at_step": 2}
        reports = _run_ddp(2, [("switchml", options)])
    finally:
        stop_process(switch)
    for rank, report in reports:
        assert isinstance(report, str), f"rank {rank} did not fail"
        message = report.split("\n[failed")[0]
        assert "Unable to cast" not in message, message
        assert "switchml allreduce failed" in message and "JobFailed" in message, message
        assert "connection to the controller" in message and "closed" in message, message  # the cause, readable


# ----------------------------------------------------------------- item 4
def test_stopped_rank_is_named_to_survivors_within_two_heartbeats(make_switch):
    verdict_after = 1.5  # the controller's heartbeat timeout
    env = make_switch(window=8, k=64, heartbeat_timeout=verdict_after)
    options = {"controller": env.endpoint, "steps": 6, "timeout": 60.0, "heartbeat_interval": HEARTBEAT,
               "stop_rank": 2, "stop_at_step": 2}
    port, queue = free_port(), CTX.Queue()
    procs = [CTX.Process(target=ddp_rank, args=(queue, r, 3, port, [("switchml", options)]), daemon=True)
             for r in range(3)]
    for p in procs:
        p.start()
    try:
        reports = sorted(queue.get(timeout=90) for _ in range(2))  # rank 2 hangs without a word
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
            p.join(10)
    assert [rank for rank, _ in reports] == [0, 1]
    for rank, report in reports:
        assert isinstance(report, str), f"rank {rank} did not fail"
        assert "RanksFailed" in report and "rank(s) [2]" in report, report[:3000]
        assert "Unable to cast" not in report
        into = float(re.search(r"\[failed ([0-9.]+) s into step 3\]", report).group(1))
        # the verdict comes heartbeat_timeout after the stop; survivors act on it within 2 heartbeats
        assert into < verdict_after + 2 * HEARTBEAT + SLACK, report[:2000]


# -------------------------------------------------------------- item 7 (b)
def test_torchrun_summary_reports_the_world_size(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(PY).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "1", "-m", "trainer.cli", "digits", "--launcher", "torchrun",
           "--comm", "allreduce", "--steps", "2", "--out", str(tmp_path), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"workers": 1' in proc.stdout, proc.stdout[-2000:]  # --workers' default is 2; torchrun started 1
