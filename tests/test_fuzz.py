"""The fuzzer of ``switchml-bench fuzz`` at 20,000 packets per data path (not timed): hostile
packets at the software switch while an honest 4-worker job sums int32 arrays over UDP."""

from __future__ import annotations

import pytest

from benchmarks import fuzz
from switchml.pipeline import DropReason


def test_the_oracle_names_the_reason_of_each_kind_of_packet():
    forge = fuzz.PacketForge(1, job=3, pool_base=16, pool_size=16, k=256, workers=[("127.0.0.1", 5000)],
                             unadmitted=[("127.0.0.1", 6000)], sizes=frozenset(fuzz.SWITCH_SIZES))
    reasons = {kind: {forge.build(kind).reason for _ in range(200)} for kind in fuzz.KINDS}
    assert reasons["bad_size"] == {DropReason.BAD_SIZE}
    assert reasons["bad_msg_type"] == reasons["worker_bad_type"] == {DropReason.BAD_MSG_TYPE}
    assert reasons["reset_forged"] == reasons["worker_reset"] == {DropReason.RESET_NOT_FROM_CONTROLLER}
    assert reasons["replayed"] == reasons["spoofed_job"] == reasons["spoofed_sender"] == {DropReason.NOT_ADMITTED}
    assert reasons["wrong_length"] == {DropReason.MALFORMED}
    assert forge.build("worker_reset").src == ("127.0.0.1", 5000)  # a worker's own address: RESET from a worker
    assert forge.build("spoofed_sender").src not in (("127.0.0.1", 5000),)
    # a valid UPDATE from an admitted sender is the one packet the data plane must accept
    assert fuzz.expected_reason(forge._valid_update(), True, frozenset(fuzz.SWITCH_SIZES)) is None


def test_twenty_thousand_hostile_packets_change_no_sum(dataplane):
    doc = fuzz.run(fuzz.FuzzConfig(packets=20_000, dataplanes=(dataplane,), elements=2048), "pytest")
    (run,) = doc["runs"]
    checks = run["checks"]
    assert run["dataplane"] == dataplane
    assert checks["crashes"] == 0 and checks["wrong_results"] == 0 and checks["honest_errors"] == 0, run
    assert run["honest"]["calls"] > 0 and checks["replies_to_forged"] == 0, run
    assert checks["reasons_mismatched"] == {} and checks["received_equals_outcomes"], run
    assert run["kernel_drops"] == 0 and run["udp"] > 0 and run["in_process"] > 0
    assert sum(run["forged_by_reason"].values()) == 20_000 and set(run["kinds"]) == set(fuzz.KINDS)
    assert doc["ok"]


def test_the_command_line_checks_its_flags(capsys):
    from benchmarks.cli import main

    assert main(["fuzz", "--dataplanes", "fpga"]) == 2
    assert "--dataplanes ['fpga']" in capsys.readouterr().err
    assert main(["fuzz", "--packets", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["fuzz", "--udp-fraction", "2"])
