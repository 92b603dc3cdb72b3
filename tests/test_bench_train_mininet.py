"""``switchml-bench train --net mininet``: one rank per host of a Mininet star, launched with
torchrun, the software switch on the switch host; its options checked before anything starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cli, train
from emulation.mininet import mininet_problem

TINY = ["--", "--width", "4", "--train-size", "64", "--test-size", "32"]


def test_comm_wait_share_and_loss_agreement():
    steps = [{"comm_wait": w} for w in (5.0, 0.5, 1.0)]
    # the warm-up step is left out: (0.5 + 1.0) / (1.0 + 2.0)
    assert train.comm_wait_share(steps, np.array([9.0, 1.0, 2.0]), skip=1) == 0.5
    assert train.comm_wait_share([{"loss": 1.0}] * 3, np.ones(3), skip=1) is None  # not logged
    switchml = [{"smoothed_loss": [2.0, 1.0], "seed": 0}, {"smoothed_loss": [2.0, 1.5], "seed": 1}]
    allreduce = [{"smoothed_loss": [2.0, 1.25], "seed": 0}, {"smoothed_loss": [1.0, 1.5], "seed": 1}]
    agreement = train.loss_agreement(switchml, allreduce)
    assert agreement["max_abs_curve_difference"] == [0.25, 1.0] and agreement["final_difference"] == [-0.25, 0.0]
    assert agreement["switchml_final_spread"] == 0.5 and agreement["allreduce_final_spread"] == 0.25
    assert agreement["seeds"] == [0, 1]


def test_every_repeat_of_a_pair_trains_with_the_same_seed():
    cfg = train.TrainBenchConfig(task="shapes_resnet", vary_seed=True, task_args=["--width", "4", "--seed", "9"])
    for backend in train.BACKENDS:
        cmd = train.torchrun_command(cfg, 2, 1, backend, Path("out"), 29401, "tcp://10.255.255.254:48865",
                                     cfg.seed(2))
        assert cmd[-2:] == ["--seed", "2"]  # after the task's options: --vary-seed wins
        assert cmd[cmd.index("--node_rank") + 1] == "1" and "--launcher" in cmd
        assert ("--no-fallback" in cmd) == (backend == "switchml")
    assert train.TrainBenchConfig().seed(2) is None  # without --vary-seed: the trainer's default


def test_link_options_need_the_mininet_star(capsys):
    assert cli.main(["train", "--bw", "100"]) == 1
    assert "--bw 100.0: for --net mininet only" in capsys.readouterr().err
    assert cli.main(["train", "--mtu", "9000"]) == 1
    assert "--mtu 9000: for --net mininet only" in capsys.readouterr().err
    assert cli.main(["train", "--net", "mininet", "--bw", "-5"]) == 1
    assert "--bw -5: expected a positive rate" in capsys.readouterr().err


def test_mininet_without_root_says_so(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["train", "--net", "mininet", "--bw", "100", "--workers", "2"]) == 1
    assert "the Mininet star needs root" in capsys.readouterr().err


@pytest.mark.mininet
@pytest.mark.slow
@pytest.mark.skipif(mininet_problem() is not None, reason=f"Mininet star unavailable: {mininet_problem()}")
def test_train_across_the_mininet_star_with_torchrun(tmp_path, capsys):
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    code = cli.main(["train", "--net", "mininet", "--bw", "100", "--workers", "2", "--steps", "4", "--skip", "1",
                     "--smooth", "2", "--repeats", "1", "--task", "shapes_resnet", "--quiet", "--timeout", "600",
                     "--keep", str(tmp_path / "runs"), "--json", str(out), "--plot", str(png), *TINY])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["config"]["net"] == "mininet" and doc["config"]["bw_mbit"] == 100
    assert {"cpu_count", "python", "platform"} <= set(doc["machine"])
    (point,) = doc["results"]
    assert point["workers"] == 2 and point["step_ratio_switchml_over_allreduce"] > 0
    assert len(point["loss_agreement"]["max_abs_curve_difference"]) == 1
    for backend in ("switchml", "allreduce"):
        res = point["backends"][backend]
        (run,) = res["runs"]
        assert run["comm_per_step"] == [backend] and len(run["loss"]) == 4
        assert run["final"]["world_size"] == 2 and run["final"]["steps"] == 4
        assert 0.0 <= run["comm_wait_share"] <= 1.0 and res["comm_wait_share"]["n"] == 1
        assert res["samples_per_s"] > 0 and res["step_s"]["median"] > 0
        # each host ran its own torchrun (rendezvous on host 0), writing its own log
        assert all((tmp_path / "runs" / "w2" / f"{backend}-0" / f"rank{i}.log").exists() for i in range(2))
    sw = point["backends"]["switchml"]["runs"][0]
    # every bucket of every step went through the switch (the ranks ran with --no-fallback)
    assert sw["final"]["buckets_through_switch"] >= 4 and sw["final"]["buckets_on_fallback"] == 0
    assert sw["k"] == 256 and sw["window"] >= 2  # the largest packet that fits MTU 1500
    assert sw["switch_counters"]["results_multicast"] > 0
    assert "buckets_through_switch" not in point["backends"]["allreduce"]["runs"][0]["final"]
    assert png.stat().st_size > 0
    assert "comm wait" in capsys.readouterr().out
