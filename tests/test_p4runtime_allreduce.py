"""End to end over P4Runtime: worker processes sum through the software switch while the
controller programs it only through ``P4RuntimeTarget`` and the switch's gRPC server, the
code path of BMv2 and Tofino; in-process and as ``switchml-switch emulate --p4runtime-port``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
from mpworkers import allreduce_job, expected_sum, make_input

from emulation.runner import SoftwareSwitchRunner
from switchml import Worker, pipeline, quantize
from switchml.net import free_port
from switchml.p4runtime_target import P4RuntimeTarget

PY = sys.executable



def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_four_workers_sum_through_the_switch_programmed_over_p4runtime():
    runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, p4runtime_port=0, window=8, k=64)
    try:
        assert isinstance(runner.controller.target, P4RuntimeTarget)
        n, sizes = 4, [5_000, 64 * 8 * 3 + 5]
        floats = allreduce_job(runner.endpoint, "p4rt", n, sizes, seed=2)
        for i, size in enumerate(sizes):
            inputs = [make_input(2 + i, r, size) for r in range(n)]
            exact = np.sum([x.astype(np.float64) for x in inputs], axis=0)
            exps = np.max([quantize.block_exponents(np.pad(x, (0, (-size) % 64)).reshape(-1, 64)) for x in inputs],
                          axis=0)
            bound = np.repeat([quantize.error_bound(int(e), n) for e in exps], 64)[:size]
            for rank in range(n):
                assert np.array_equal(floats[rank][i], floats[0][i])
            assert np.all(np.abs(floats[0][i] - exact) <= bound + np.abs(exact) * 2.0**-23)
        ints = allreduce_job(runner.endpoint, "p4rt-int", n, [3_000], seed=4, dtype="int32")
        assert np.array_equal(ints[2][0], expected_sum(n, 3_000, 4, "int32"))

        switch, target = runner.switch, runner.controller.target
        assert runner.p4runtime.device.writes > 0
        assert switch.read_counter(pipeline.RESULTS_COUNTER) == target.read_counter(pipeline.RESULTS_COUNTER)
        assert sum(target.read_counter(pipeline.RESULTS_COUNTER)) > 0
        # both jobs ended: their entries were deleted over P4Runtime, the controller's stays
        assert wait_for(lambda: [e["action"] for e in target.read_table(pipeline.ADMISSION_TABLE)]
                        == [pipeline.SET_CONTROLLER_ACTION])
        assert target.read_multicast_groups() == {} and switch.multicast_groups() == {}
    finally:
        runner.stop()


def test_emulate_with_a_p4runtime_port_is_programmed_over_p4runtime():
    port, control, grpc_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen([PY, "-m", "emulation.cli", "emulate", "--host", "127.0.0.1", "--port", str(port),
                             "--control-port", str(control), "--p4runtime-port", str(grpc_port), "-k", "64",
                             "--window", "4"], stderr=subprocess.PIPE, text=True)
    try:
        with Worker(f"tcp://127.0.0.1:{control}", "cli", 0, 1, control_timeout=30) as w:
            assert w.allreduce(np.arange(300, dtype=np.int32)).tolist() == list(range(300))
            # a monitor (lower election id: a backup, read-only) sees what the controller wrote
            monitor = P4RuntimeTarget(f"127.0.0.1:{grpc_port}", election_id=0, require_primary=False)
            try:
                assert not monitor.connection.is_primary
                entries = monitor.read_table(pipeline.ADMISSION_TABLE)
            finally:
                monitor.close()
            workers = [e for e in entries if e["action"] == pipeline.SET_WORKER_ACTION]
            assert [(e["match"]["hdr.udp.src_port"], e["params"]["num_workers"]) for e in workers] == [
                (w.address[1], 1)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"P4Runtime: 127.0.0.1:{grpc_port}" in err and "job 'cli' ended" in err
