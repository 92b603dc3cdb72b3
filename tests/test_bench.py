"""Smoke tests of ``switchml-bench``: every subcommand on tiny sizes, and the model's consistency.

Nothing here asserts a timing (the machine is shared and noisy): the benchmarks measure,
the tests check that they run, that their JSON holds what it promises, and that the
model is self-consistent (the simulation reproduces the closed form without loss).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest

from benchmarks import allreduce, cli, scale, sim, train, wire
from benchmarks.allreduce import AllreduceConfig
from benchmarks.common import parse_fraction, parse_size, process_cpu_seconds, summarize
from emulation.mininet import MininetUnavailable, mininet_problem, require_mininet


# ---------------------------------------------------------------- helpers and bounds
def test_parse_size_and_fraction():
    assert parse_size("25MB") == 25_000_000
    assert parse_size("100mb") == 100_000_000
    assert parse_size("1KB") == 1000
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("12 parsecs")
    assert parse_fraction("0.1%") == pytest.approx(0.001)
    assert parse_fraction("0.01") == 0.01
    with pytest.raises(ValueError):
        parse_fraction("2")


def test_summarize_and_cpu_time():
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert process_cpu_seconds(os.getpid()) > 0


def test_wire_bounds():
    # MTU 9000, k=2048: the datagram fits one frame; MTU 1500, k=256 likewise; k=1024 fragments
    assert wire.largest_k(9000) == 2048 and wire.largest_k(1500) == 256 and wire.largest_k(65536) == 4096
    assert len(wire.ip_frames(wire.switchml_packet_bytes(1024), 1500)) == 3
    sw = wire.switchml_wire(64_000_000, 2048, 8, mtu=9000, l2_bytes=wire.ETHERNET_TC_BYTES)
    assert sw.packets == math.ceil(16_000_000 / 2048) + 8  # plus the exponent-only first window
    assert 0.99 < sw.efficiency < 1.0
    bw = 100e6
    for n, expected in ((4, 0.66), (8, 0.57)):  # the "about 0.68 / 0.60", before overheads
        ratio = (wire.switchml_bound_s(64_000_000, 2048, 8, bw, 9000, 14)
                 / wire.ring_bound_s(64_000_000, n, bw, 9000, 14))
        assert ratio == pytest.approx(expected, abs=0.01)


def test_default_packet_size_and_window():
    assert AllreduceConfig().packet_k() == 4096  # loopback: the largest packet
    mn = AllreduceConfig(net="mininet", mtu=9000, bw_mbit=100)
    assert mn.packet_k() == 2048
    w = mn.window_for(4)
    # the window's frames leave a 100 Mbit/s link within half the 10 ms retransmission timeout
    assert 2 <= w and w * 8230 * 8 / 100e6 <= 0.005
    assert AllreduceConfig(window=5).window_for(8) == 5


# ---------------------------------------------------------------- allreduce on loopback
@pytest.mark.slow
def test_allreduce_loopback_smoke(tmp_path):
    out, png = tmp_path / "ar.json", tmp_path / "ar.png"
    code = cli.main(["allreduce", "--workers", "2", "--size", "40KB", "--backends", "switchml,gloo", "--k", "256",
                     "--repeats", "2", "--warmup", "0", "--bw", "1000", "--quiet", "--timeout", "60",
                     "--json", str(out), "--plot", str(png)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("switchml-bench allreduce --workers 2")
    assert {"cpu_count", "python", "platform"} <= set(doc["machine"])
    (point,) = doc["results"]
    assert point["workers"] == 2 and point["size_bytes"] == 40_000
    sw, gl = point["backends"]["switchml"], point["backends"]["gloo"]
    for res in (sw, gl):
        assert len(res["samples_s"]) == 2 and len(res["per_rank_samples_s"]) == 2
        assert res["time_s"]["min"] <= res["time_s"]["median"] <= res["time_s"]["max"]
        assert res["goodput_MBps"]["median"] > 0
        assert res["ranks_identical"] and res["check"]["within_bound"]
        assert res["bound_s"] > 0 and res["time_over_bound"] > 0
        # CPU of the timed calls: each rank's, and the machine's share busy
        assert len(res["worker_cpu_per_call_s"]) == 2 and all(c > 0 for c in res["worker_cpu_per_call_s"])
        # (two 40 KB calls may span no tick of the kernel's CPU accounting: then None; or only
        # a few ticks, every one of them idle: then busy is 0.0, seen in CI)
        host = res["host_cpu_timed"]
        assert host is None or (0 <= host["busy"] <= 1 and all(0 <= v <= 1 for v in host.values())), host
    assert sw["check"]["max_error_over_bound"] <= 1.0
    assert sw["k"] == 256 and sw["switch"]["cpu_s"] is not None and sw["switch"]["counters"]
    # spurious resends (the switch's retransmission_incomplete drops + the workers' duplicate results)
    assert sw["spurious_retransmissions"] == sw["spurious_switch_incomplete"] + sw["duplicate_results"]
    assert 0 <= sw["spurious_rate"] <= sw["retransmission_rate"] + 1e-9 or sw["retransmissions"] == 0
    # n=2: ring and SwitchML send the same bytes, but this tiny tensor pays a whole exponent-only window
    assert point["ratio_switchml_over_gloo"] > 0 and 1 < point["bound_ratio_switchml_over_gloo"] < 2.5
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_train_both_backends_same_run(tmp_path, capsys):
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    code = cli.main(["train", "--task", "digits", "--workers", "2", "--steps", "8", "--skip", "2", "--smooth", "3",
                     "--repeats", "1", "--quiet", "--timeout", "300", "--keep", str(tmp_path / "runs"),
                     "--json", str(out), "--plot", str(png), "--", "--width", "8"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["command"].endswith("-- --width 8") and doc["config"]["task_args"] == ["--width", "8"]
    (point,) = doc["results"]
    sw, ar = point["backends"]["switchml"], point["backends"]["allreduce"]
    for res, comm in ((sw, "switchml"), (ar, "allreduce")):
        (run,) = res["runs"]
        assert run["comm_per_step"] == [comm] and len(run["loss"]) == 8
        assert all(b > a for a, b in zip(run["elapsed_s"], run["elapsed_s"][1:], strict=False))
        assert run["final"]["steps"] == 8 and run["final"]["world_size"] == 2
        assert res["samples_per_s"] == pytest.approx(2 * 32 / res["step_s"]["median"])
        # the default target is the highest final smoothed loss: every run reaches it
        assert res["runs_reaching_target"] == 1 and res["time_to_target_s"]["median"] <= run["train_seconds"]
    assert sw["runs"][0]["final"]["buckets_through_switch"] > 0
    assert point["step_ratio_switchml_over_allreduce"] == pytest.approx(sw["step_s"]["median"] / ar["step_s"]["median"])
    assert png.stat().st_size > 0
    assert "step ratio" in capsys.readouterr().out


def test_train_helpers_and_bad_options(capsys):
    steps = [{"time": t, "loss": loss} for t, loss in ((0.5, 4.0), (1.0, 2.0), (2.0, 0.0), (2.5, 2.0))]
    assert list(train.step_durations(steps)) == [0.5, 0.5, 1.0, 0.5]
    smooth = train.smoothed_loss(steps, 2)
    assert list(smooth) == [4.0, 3.0, 1.0, 1.0]
    assert train.time_to_loss([0.5, 1.0, 2.0, 2.5], smooth, 1.0) == 2.0
    assert train.time_to_loss([0.5, 1.0, 2.0, 2.5], smooth, 0.5) is None
    assert cli.main(["train", "--steps", "3", "--skip", "5"]) == 1
    assert "--steps 3 must be more than --skip 5" in capsys.readouterr().err
    assert cli.main(["train", "--backends", "nccl,switchml"]) == 1
    assert "unknown ['nccl']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["scale", "--", "--width", "8"])


# ---------------------------------------------------------------- the model
def test_loss_slowdown_is_against_the_same_backend_without_loss():
    def point(loss, sw, gl, size=1000):
        return {"workers": 4, "size_bytes": size, "loss": loss,
                "backends": {"switchml": {"time_s": {"median": sw}}, "gloo": {"time_s": {"median": gl}}}}

    points = [point(0.0, 2.0, 1.0), point(0.01, 3.0, 1.5), point(0.01, 5.0, 5.0, size=99)]
    allreduce.add_loss_slowdown(points)
    assert points[1]["backends"]["switchml"]["slowdown_vs_lossless"] == 1.5
    assert points[1]["backends"]["gloo"]["slowdown_vs_lossless"] == 1.5
    assert points[0]["backends"]["switchml"]["slowdown_vs_lossless"] == 1.0
    assert "slowdown_vs_lossless" not in points[2]["backends"]["switchml"]  # no lossless run of that size


def test_des_without_loss_is_the_closed_form():
    lp = sim.LinkParams(ser=88e-9)
    for n in (1, 3, 8):
        for window, packets in ((4, 500), (59, 700), (128, 300), (1000, 50)):
            res = sim.simulate(n, packets, window, lp)
            assert res.time == pytest.approx(sim.lossless_time(packets, window, lp), rel=1e-9)
            assert res.retransmissions == 0 and res.lost == 0
    # a window at the bandwidth-delay product keeps the link busy: one packet per ser
    w = sim.window_for_line_rate(lp)
    t_busy, t_short = sim.lossless_time(10_000, w, lp), sim.lossless_time(10_000, w // 2, lp)
    assert t_busy == pytest.approx(10_000 * lp.ser, rel=0.01) and t_short > 1.5 * t_busy


def test_des_with_loss_retransmits_and_finishes():
    lp = sim.LinkParams(ser=88e-9)
    clean = sim.simulate(4, 3000, 32, lp)
    lossy = sim.simulate(4, 3000, 32, lp, loss=0.01, seed=3)
    assert lossy.lost > 0 and lossy.retransmissions >= lossy.lost / 2
    assert lossy.time > clean.time + lp.rto * 0.9  # a stalled slot waits at least one timeout
    again = sim.simulate(4, 3000, 32, lp, loss=0.01, seed=3)
    assert again.time == lossy.time  # seeded: reproducible


def test_scale_switchml_flat_and_ring_grows_to_twice():
    p = replace(scale.ModelParams(size_bytes=10_000_000), ring_alpha=0.0, rack_size=4096)
    ns = [2, 4, 8, 16, 64, 256, 1024]
    sw = [scale.switchml_point(n, 100, p)["time_s"] for n in ns]
    ring = [scale.ring_point(n, 100, p)["time_s"] for n in ns]
    assert max(sw) == pytest.approx(min(sw), rel=1e-12)  # in one rack, SwitchML does not depend on n
    assert all(a < b for a, b in zip(ring, ring[1:], strict=False))
    assert ring[-1] / ring[0] == pytest.approx(2 * 1023 / 1024, rel=1e-9)  # 2(n-1)/n against n=2
    speedups = [r / s for r, s in zip(ring, sw, strict=True)]
    assert all(a < b for a, b in zip(speedups, speedups[1:], strict=False)) and speedups[-1] < 2
    # the tree needs a larger pool (longer round trip) but reaches the same rate
    tree = scale.switchml_point(1024, 100, scale.ModelParams())
    rack = scale.switchml_point(16, 100, scale.ModelParams())
    assert tree["window"] > rack["window"] and tree["elements_per_s"] == pytest.approx(rack["elements_per_s"], rel=0.01)


def test_scale_matches_published_switchml_within_ten_percent():
    v = scale.validate_published(scale.ModelParams())
    for row in v["switchml"]:
        assert row["model_over_published"] == pytest.approx(1.0, abs=0.10)
    fit = v["nccl_fit"]
    assert 0 < fit["eta"] <= 1 and fit["alpha_s"] >= 0
    for pt in fit["points"]:  # the ideal ring is an upper bound of what NCCL reached
        assert pt["ideal_ring_elements_per_s"] > pt["published_elements_per_s"]


def test_scale_closed_form_under_loss_tracks_the_simulation():
    p = scale.ModelParams(size_bytes=2_000_000)
    for loss in (1e-3, 1e-2):
        des = scale.switchml_des(4, 100, p, loss, seed=1)
        closed = scale.switchml_point(4, 100, p, loss)
        assert des["slowdown"] > 1
        assert 0.5 < closed["time_s"] / des["time_s"] < 2.0
    assert scale.expected_max_poisson(0.0, 10) == 0.0
    assert scale.expected_max_poisson(3.0, 1) == pytest.approx(3.0, rel=1e-6)  # the mean of one


@pytest.mark.slow
def test_scale_cli_with_measured(tmp_path):
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({
        "config": {"net": "mininet", "bw_mbit": 100.0, "mtu": 9000, "l2_bytes_in_bound": 14},
        "results": [{"workers": 4, "size_bytes": 4_000_000, "loss": 0.0, "backends": {
            "switchml": {"time_s": {"median": 0.40}, "k": 2048, "window": 7, "bound_s": 0.32},
            "gloo": {"time_s": {"median": 0.55}, "bound_s": 0.48}}}]}))
    out, png = tmp_path / "scale.json", tmp_path / "scale.png"
    code = cli.main(["scale", "--workers", "4,8,64", "--gbps", "10,100", "--des-workers", "4", "--loss", "0,0.001",
                     "--loss-size", "300KB", "--measured", str(measured), "--json", str(out), "--plot", str(png)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("switchml-bench scale")
    assert len(doc["grid"]) == 6 and {g["switchml"]["topology"] for g in doc["grid"]} == {"rack", "tree"}
    (m,) = doc["measured"]
    assert m["speedup"] == pytest.approx(0.55 / 0.40)
    assert 0 < m["switchml_line_fraction"] < m["switchml_model_line_fraction"] <= 1
    assert [r["loss"] for r in doc["loss"]] == [0.0, 0.001] and doc["loss"][1]["des"]["lost"] >= 0
    assert png.stat().st_size > 0


# ---------------------------------------------------------------- Mininet
def test_mininet_needs_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MininetUnavailable, match="root"):
        require_mininet()
    assert "root" in mininet_problem()


@pytest.mark.mininet
@pytest.mark.slow
@pytest.mark.skipif(mininet_problem() is not None, reason=f"Mininet star unavailable: {mininet_problem()}")
def test_allreduce_across_the_mininet_star(tmp_path):
    out = tmp_path / "mn.json"
    code = cli.main(["allreduce", "--net", "mininet", "--bw", "100", "--mtu", "1500", "--workers", "2",
                     "--size", "20KB", "--repeats", "1", "--warmup", "0", "--quiet", "--timeout", "60",
                     "--json", str(out)])
    assert code == 0
    (point,) = json.loads(out.read_text())["results"]
    assert point["net"] == "mininet"
    for res in point["backends"].values():
        assert res["ranks_identical"] and res["check"]["within_bound"]
    assert point["backends"]["switchml"]["k"] == 256  # the largest packet that fits MTU 1500


# ---------------------------------------------------------------- the Mininet tree (issue 19)
@pytest.mark.parametrize("argv, message", [
    (["--topo", "tree"], "--topo tree needs --net mininet"),
    (["--net", "mininet", "--topo", "tree", "--workers", "4"], "--workers 4: --topo tree has racks x per-rack = 8"),
    (["--net", "mininet", "--topo", "tree", "--racks", "5", "--per-rack", "8"], "= 40 workers; at most 32"),
    (["--net", "mininet", "--topo", "tree", "--switch", "bmv2"], "--topo tree --switch bmv2"),
    (["--net", "mininet", "--topo", "tree", "--core-bw", "0"], "--core-bw 0: expected a positive rate"),
    (["--net", "mininet", "--topo", "tree", "--loss", "0.01"], "--loss-at hosts"),
    (["--net", "mininet", "--backends", "switchml,flat"], "--backends flat: one switch reached through the core"),
])
def test_tree_options_are_checked_before_anything_starts(argv, message, capsys):
    assert cli.main(["allreduce", *argv]) == 1
    assert message in capsys.readouterr().err


def _point(backends: dict[str, dict]) -> dict:
    return {"workers": 8, "size_bytes": 64_000_000, "backends": {
        name: {"time_s": {"median": t}, "k": 2048, "window": 7, **extra} for name, (t, extra) in backends.items()}}


def test_tree_bounds_count_the_streams_on_each_core_link():
    cfg = AllreduceConfig(net="mininet", topo="tree", racks=2, per_rack=4, bw_mbit=100, core_bw_mbit=50, mtu=9000)
    point = _point({"switchml": (11.0, {}), "flat": (44.0, {}), "gloo": (20.0, {})})
    allreduce._add_bounds(point, cfg)
    b = point["backends"]
    stream = b["switchml"]["wire_bytes_per_worker"]
    # at 50 Mbit/s the core is the bottleneck of each: one stream per rack (tree), 4 (flat), one ring edge (Gloo)
    assert b["switchml"]["bound_s"] == pytest.approx(stream * 8 / 50e6)
    assert b["flat"]["bound_s"] == pytest.approx(4 * stream * 8 / 50e6)
    assert b["gloo"]["bound_s"] == pytest.approx(b["gloo"]["wire_bytes_per_worker"] * 8 / 50e6)
    # both directions of both core links: 2 racks x (up + down) x streams
    assert b["switchml"]["core_bytes_model"] == 4 * stream and b["flat"]["core_bytes_model"] == 16 * stream
    assert b["gloo"]["core_bytes_model"] == 4 * b["gloo"]["wire_bytes_per_worker"]
    assert point["ratio_switchml_over_flat"] == 0.25 and point["ratio_switchml_over_gloo"] == 0.55
    # a core as fast as the edge: the tree's bound is the star's, the ring's too
    fast = replace(cfg, core_bw_mbit=None)
    point = _point({"switchml": (11.0, {}), "gloo": (20.0, {})})
    allreduce._add_bounds(point, fast)
    assert point["backends"]["switchml"]["bound_s"] == pytest.approx(stream * 8 / 100e6)
    assert point["bound_ratio_switchml_over_gloo"] == pytest.approx(wire.switchml_bound_s(
        64_000_000, 2048, 7, 100e6, 9000, 14) / wire.ring_bound_s(64_000_000, 8, 100e6, 9000, 14))
    # one rack: the ring never crosses the core
    one = replace(cfg, racks=1, per_rack=8)
    point = _point({"gloo": (20.0, {})})
    allreduce._add_bounds(point, one)
    assert point["backends"]["gloo"]["core_bytes_model"] == 0


def test_scale_reports_the_model_error_at_a_measured_tree(tmp_path):
    cfg = {"net": "mininet", "bw_mbit": 100.0, "core_bw_mbit": 100.0, "mtu": 9000, "l2_bytes_in_bound": 14,
           "topo": "tree", "racks": 2, "per_rack": 4}
    point = _point({"switchml": (5.6, {}), "flat": (21.0, {}), "gloo": (9.8, {})})
    measured = tmp_path / "tree.json"
    measured.write_text(json.dumps({"config": cfg, "results": [point]}))
    (row,) = scale.load_measured([str(measured)])
    assert (row["topo"], row["racks"], row["per_rack"], row["flat_time_s"]) == ("tree", 2, 4, 21.0)
    # lossless at 100 Mbit/s the model is the wire bound plus a round trip: a little above 64 MB's 5.12 s
    assert 5.12 < row["switchml_tree_model_time_s"] < 5.6
    assert row["switchml_tree_model_error"] == pytest.approx(row["switchml_tree_model_time_s"] / 5.6 - 1)
    assert row["ring_tree_model_error"] == pytest.approx(row["ring_tree_model_time_s"] / 9.8 - 1)
    doc = {"measured": [row]}
    png = tmp_path / "v.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    scale._plot_measured_trees(ax, doc["measured"])
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["measured tree: SwitchML tree (Mininet)", "model at the measured tree: SwitchML tree",
                      "measured tree: SwitchML flat, through the core (Mininet)", "measured tree: Gloo ring (Mininet)",
                      "model at the measured tree: Gloo ring"]
    fig.savefig(png)
    plt.close(fig)


@pytest.mark.mininet
@pytest.mark.slow
@pytest.mark.skipif(mininet_problem() is not None, reason=f"Mininet tree unavailable: {mininet_problem()}")
def test_allreduce_across_a_mininet_tree(tmp_path):
    out = tmp_path / "tree.json"
    code = cli.main(["allreduce", "--net", "mininet", "--topo", "tree", "--racks", "2", "--per-rack", "2",
                     "--bw", "100", "--core-bw", "50", "--mtu", "1500", "--size", "400KB", "--repeats", "1",
                     "--warmup", "0", "--quiet", "--timeout", "60", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    (point,) = doc["results"]
    assert point["workers"] == 4 and set(point["backends"]) == {"switchml", "flat", "gloo"}
    b = point["backends"]
    for res in b.values():
        assert res["ranks_identical"] and res["check"]["within_bound"]
        # what crossed the core is what the backend must put there, plus set-up and control traffic
        assert 0.95 < res["core"]["bytes_per_allreduce"] / res["core_bytes_model"] < 1.5, res["core"]
    # the tree sends one stream per rack over the core, the flat switch one per worker
    assert b["flat"]["core"]["bytes_per_allreduce"] > 1.8 * b["switchml"]["core"]["bytes_per_allreduce"]
    assert len(b["switchml"]["leaves"]["cpu_s"]) == 2 and "leaves" not in b["flat"]
    assert "ratio_switchml_over_flat" in point
