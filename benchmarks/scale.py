"""``switchml-bench scale``: SwitchML against ring allreduce from 4 to 1024 workers, modelled.

Topologies
    rack: every worker on one switch (a hypothetical switch with n ports beyond 64).
    tree: racks of ``rack_size`` workers under a ToR each, ToRs under one spine; SwitchML
    aggregates in the ToRs and again in the spine (hierarchical aggregation, as SwitchML
    proposes), the ring runs through the tree. 32 x 32 = 1024 also respects the 32-bit
    worker bitmap of the wire format at every switch.

SwitchML (closed form, lossless; exact against ``benchmarks.sim``)
    A worker streams ``P = ceil(E/k) + W`` packets of ``wire`` bytes each way. With a
    window of at least the bandwidth-delay product in packets, its link stays busy and
    ``T = P * ser + (2d + L + ser)``; a smaller window stalls each round for the difference
    (``sim.lossless_time``). The time does not depend on n inside a rack; the tree adds two
    hops and two switch passes to the round trip, so it needs a larger pool for the same rate.

Ring (closed form)
    ``T = 2 (n-1) * (alpha + (S/n) * wire_tcp / (eta * B))``: 2(n-1) steps, each a chunk of
    S/n bytes over TCP and a per-step latency alpha. ``eta`` is the share of line rate the
    transport reaches (1: ideal). Fitted to the published NCCL figures, it shows how far a
    real ring falls below its bound.

Loss
    SwitchML: a loss anywhere in a slot's round (n updates, n results, plus the tree's links)
    stalls that slot for a retransmission timeout, and the allreduce waits for its slowest
    slot. The closed form ``max(P ser, (P/W) (c + ser + q RTO)) + RTO (1 - (1-q)^W)`` with
    ``q = 1 - (1-p)^(2 n_links)`` is only a rough guide; the discrete-event simulation
    (``benchmarks.sim``) gives the slowdown packet by packet at small n.
    Ring over TCP: each step waits for its slowest flow; a flow's rate is capped by Mathis'
    ``MSS / RTT * sqrt(3/2) / sqrt(p)``, and a loss in the last three segments of a chunk
    (no duplicate ACKs to trigger fast retransmit) costs TCP's minimum RTO.

Validation
    Published (Sapio et al., NSDI'21), 100 Gbit/s: SwitchML about 2.8e9 aggregated int32
    elements/s, flat from 4 to 16 workers; NCCL over RDMA about 1.37e9 / 1.25e9 / 0.97e9 at
    4 / 8 / 16 workers. ``--measured`` adds this machine's ``switchml-bench allreduce`` JSON
    (Mininet runs with ``--bw``), as fractions of the line rate, on the same plot. A run with
    ``--topo tree`` is the measured point of the tree: the model is evaluated at its own
    configuration (link rates, racks, k, window, MTU) and its error against the measured
    time is reported, for SwitchML's two levels and for the ring.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import sim, wire
from benchmarks.common import format_size, machine_info, table, write_json

log = logging.getLogger(__name__)

PUBLISHED_SOURCE = ("Sapio et al., 'Scaling Distributed Machine Learning with In-Network Aggregation', NSDI'21: "
                    "aggregated int32 tensor elements per second at 100 Gbit/s")
PUBLISHED_GBPS = 100.0
PUBLISHED = {
    "switchml": {4: 2.8e9, 8: 2.8e9, 16: 2.8e9},
    "nccl_rdma": {4: 1.37e9, 8: 1.25e9, 16: 0.97e9},
}


@dataclass(frozen=True)
class ModelParams:
    """Everything the model assumes; the defaults describe a Tofino rack with DPDK workers."""

    size_bytes: int = 100_000_000  #: tensor bytes (float32)
    k: int = 256  #: elements per SwitchML packet
    mtu: int = 9000  #: for the ring's TCP segments (and SwitchML fragmentation, if k were too large)
    l2_bytes: int = wire.ETHERNET_WIRE_BYTES  #: Ethernet header, FCS, preamble and gap
    rack_size: int = 32  #: workers per ToR in the tree
    prop: float = 0.5e-6  #: one-way propagation and PHY latency per link
    switch_latency: float = 1e-6  #: one pass through a switch pipeline
    host: float = 3e-6  #: worker turnaround from a result to its next packet
    rto: float = 1e-3  #: SwitchML worker's first retransmission timeout
    rto_max: float = 0.2
    pool: int | None = None  #: slots per job; None: sized to the bandwidth-delay product
    ring_alpha: float = 2e-6  #: ring per-step latency
    ring_eta: float = 1.0  #: share of line rate the ring's transport reaches
    #: TCP's recovery of a loss in a flow's last segments (no duplicate ACKs): Linux's tail loss
    #: probe fires after max(2 RTT, 10 ms); without it, the 200 ms minimum RTO
    tcp_tail_recovery: float = 0.010
    uplink_factor: float = 1.0  #: ToR-to-spine link rate as a multiple of the worker links'


# ---------------------------------------------------------------- SwitchML
def switchml_link(gbps: float, p: ModelParams, tree: bool = False) -> sim.LinkParams:
    """Link timing of a SwitchML worker; the tree folds its two extra hops into the turnaround."""
    frames = wire.ip_frames(wire.switchml_packet_bytes(p.k), p.mtu)
    ser = (sum(frames) + p.l2_bytes * len(frames)) * 8 / (gbps * 1e9)
    extra = 0.0
    if tree:  # ToR -> spine -> ToR: two links, two more switch passes
        extra = 2 * p.prop + 2 * p.switch_latency + 2 * ser / p.uplink_factor
    return sim.LinkParams(ser=ser, prop=p.prop, switch_latency=p.switch_latency, host=p.host + extra,
                          rto=p.rto, rto_max=p.rto_max)


def switchml_packets(p: ModelParams, window: int) -> int:
    """Packets per worker: the blocks plus the exponent-only first window."""
    blocks = math.ceil(p.size_bytes // 4 / p.k)
    return blocks + min(window, blocks)


def switchml_point(n: int, gbps: float, p: ModelParams, loss: float = 0.0) -> dict[str, Any]:
    """Closed-form SwitchML allreduce of ``p.size_bytes`` with n workers at ``gbps``."""
    tree = n > p.rack_size
    lp = switchml_link(gbps, p, tree)
    w_needed = sim.window_for_line_rate(lp)
    w = p.pool or w_needed
    packets = switchml_packets(p, w)
    t0 = sim.lossless_time(packets, w, lp)
    t = t0
    q = 0.0
    if loss:
        links = 2 * n + (2 * math.ceil(n / p.rack_size) if tree else 0)
        q = 1 - (1 - loss) ** links  # a slot's round stalls if any of its packets is lost
        rounds = packets / w
        # Stalls of one slot delay its later rounds; the others cannot take them over, so the
        # allreduce ends with the slot that stalled most often: T0 + RTO * E[max over W slots].
        stalled = t0 + p.rto * expected_max_poisson(rounds * q, w)
        # ...unless stalls are so frequent that every round waits: the window is then the limit.
        window_bound = rounds * (lp.turnaround + lp.ser + q * p.rto)
        t = max(stalled, window_bound, t0 * (1 + loss))
    return {
        "time_s": t, "lossless_time_s": t0, "window": w, "window_for_line_rate": w_needed,
        "round_trip_s": lp.turnaround + lp.ser, "elements_per_s": p.size_bytes / 4 / t,
        "goodput_Bps": p.size_bytes / t, "topology": "tree" if tree else "rack",
        # value, shadow copy: 2 sets of W slots of k int32, per job
        "switch_memory_bytes": 2 * w * p.k * 4, "round_stall_probability": q,
    }


def expected_max_poisson(lam: float, m: int) -> float:
    """E[max of m independent Poisson(lam) counts] = sum over j of P(max > j)."""
    if lam <= 0 or m <= 0:
        return 0.0
    # below lam - 12 sqrt(lam) the CDF is ~0: P(max > j) = 1 there
    j = max(0, int(lam - 12 * math.sqrt(lam)))
    total = float(j)
    pmf = math.exp(j * math.log(lam) - lam - math.lgamma(j + 1))
    cdf = 0.0
    while True:
        cdf += pmf
        tail = 1 - min(cdf, 1.0) ** m
        # past the mean, stop when the tail is negligible (or rounding keeps cdf a hair below 1)
        if j > lam and (tail < 1e-12 or pmf * m < 1e-15):
            return total
        total += tail
        j += 1
        pmf *= lam / j


def switchml_des(n: int, gbps: float, p: ModelParams, loss: float, seed: int) -> dict[str, Any]:
    """One rack's allreduce of ``p.size_bytes`` under ``loss``, simulated packet by packet."""
    lp = switchml_link(gbps, p)
    w = p.pool or sim.window_for_line_rate(lp)
    packets = switchml_packets(p, w)
    base = sim.lossless_time(packets, w, lp)
    res = sim.simulate(n, packets, w, lp, loss=loss, seed=seed)
    return {"workers": n, "gbps": gbps, "loss": loss, "packets_per_worker": packets, "window": w,
            "time_s": res.time, "lossless_time_s": base, "slowdown": res.time / base,
            "retransmissions_per_packet": res.retransmissions / max(1, res.packets_sent),
            "lost": res.lost, "events": res.events}


# ---------------------------------------------------------------- ring
def ring_point(n: int, gbps: float, p: ModelParams, loss: float = 0.0, eta: float | None = None,
               alpha: float | None = None) -> dict[str, Any]:
    """Closed-form ring allreduce of ``p.size_bytes`` over TCP with n workers at ``gbps``."""
    eta = p.ring_eta if eta is None else eta
    alpha = p.ring_alpha if alpha is None else alpha
    if n > p.rack_size:
        alpha += 2 * p.prop + 2 * p.switch_latency  # steps that cross racks set the pace
    if n == 1:
        return {"time_s": 0.0, "elements_per_s": math.inf, "goodput_Bps": math.inf}
    bw = eta * gbps * 1e9 / 8
    chunk_wire = wire.tcp_wire_bytes(p.size_bytes / n, p.mtu, p.l2_bytes)
    steps = 2 * (n - 1)
    extra = 0.0
    if loss:
        mss = p.mtu - wire.TCP_IP_BYTES
        rtt = 2 * p.prop + p.switch_latency + 2 * p.host + 2 * (p.mtu + p.l2_bytes) * 8 / (gbps * 1e9)
        bw = min(bw, mss / rtt * math.sqrt(1.5) / math.sqrt(loss))
        extra = (1 - (1 - loss) ** (3 * n)) * p.tcp_tail_recovery  # a tail loss in any of the step's n flows
    step = alpha + chunk_wire / bw + extra
    t = steps * step
    return {"time_s": t, "elements_per_s": p.size_bytes / 4 / t, "goodput_Bps": p.size_bytes / t,
            "topology": "tree" if n > p.rack_size else "rack"}


def fit_ring(p: ModelParams) -> dict[str, Any]:
    """Least-squares (eta, alpha) of the ring model to the published NCCL figures (eta <= 1, alpha >= 0)."""
    import numpy as np

    ns = sorted(PUBLISHED["nccl_rdma"])
    bw = PUBLISHED_GBPS * 1e9 / 8
    times = np.array([p.size_bytes / 4 / PUBLISHED["nccl_rdma"][n] for n in ns])
    a = np.array([2 * (n - 1) for n in ns], dtype=float)  # coefficient of alpha
    b = np.array([2 * (n - 1) * wire.tcp_wire_bytes(p.size_bytes / n, p.mtu, p.l2_bytes) / bw for n in ns])  # of 1/eta
    best: tuple[float, float, float] | None = None
    candidates = []
    sol, *_ = np.linalg.lstsq(np.stack([a, b], axis=1), times, rcond=None)
    candidates.append((max(0.0, sol[0]), max(1.0, sol[1])))
    x_only = max(1.0, float(b @ times / (b @ b)))  # alpha = 0
    candidates.append((0.0, x_only))
    alpha_only = max(0.0, float(a @ (times - b) / (a @ a)))  # eta = 1
    candidates.append((alpha_only, 1.0))
    for alpha, x in candidates:
        resid = float(np.sum((a * alpha + b * x - times) ** 2))
        if best is None or resid < best[2]:
            best = (alpha, x, resid)
    assert best is not None
    alpha, x, _ = best
    model = a * alpha + b * x
    return {"eta": 1 / x, "alpha_s": alpha, "size_bytes": p.size_bytes,
            "points": [{"workers": n, "published_elements_per_s": PUBLISHED["nccl_rdma"][n],
                        "fitted_elements_per_s": p.size_bytes / 4 / m,
                        "ideal_ring_elements_per_s": ring_point(n, PUBLISHED_GBPS, replace(p, ring_eta=1.0,
                                                                                           ring_alpha=0.0))["elements_per_s"]}
                       for n, m in zip(ns, model, strict=True)]}


# ---------------------------------------------------------------- validation
def validate_published(p: ModelParams) -> dict[str, Any]:
    """The model at 100 Gbit/s next to the published SwitchML figures."""
    rows = []
    for n, published in sorted(PUBLISHED["switchml"].items()):
        model = switchml_point(n, PUBLISHED_GBPS, p)["elements_per_s"]
        rows.append({"workers": n, "published_elements_per_s": published, "model_elements_per_s": model,
                     "model_over_published": model / published})
    return {"source": PUBLISHED_SOURCE, "gbps": PUBLISHED_GBPS, "switchml": rows, "nccl_fit": fit_ring(p)}


def load_measured(paths: list[str]) -> list[dict[str, Any]]:
    """Points of ``switchml-bench allreduce`` JSON files, with the model's prediction for each."""
    out = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        cfg = doc.get("config", {})
        bw = cfg.get("bw_mbit")
        for point in doc.get("results", []):
            n, size = point["workers"], point["size_bytes"]
            row: dict[str, Any] = {"file": str(path), "net": cfg.get("net"), "workers": n, "size_bytes": size,
                                   "loss": point.get("loss", 0.0), "bw_mbit": bw}
            for backend, res in point["backends"].items():
                seconds = res["time_s"]["median"]
                row[f"{backend}_time_s"] = seconds
                if bw:
                    row[f"{backend}_line_fraction"] = size * 8 / seconds / (bw * 1e6)
                    row[f"{backend}_bound_s"] = res.get("bound_s")
            if bw:
                l2 = cfg.get("l2_bytes_in_bound", wire.ETHERNET_TC_BYTES)
                mtu = cfg.get("mtu", 1500)
                if "switchml" in point["backends"]:
                    r = point["backends"]["switchml"]
                    sw = wire.switchml_wire(size, r["k"], r["window"], mtu, l2)
                    row["switchml_model_line_fraction"] = size / sw.wire_bytes
                row["ring_model_line_fraction"] = size / wire.tcp_wire_bytes(wire.ring_bytes(size, n), mtu, l2)
            if "switchml_time_s" in row and "gloo_time_s" in row:
                row["speedup"] = row["gloo_time_s"] / row["switchml_time_s"]
            if cfg.get("topo") == "tree" and bw:
                row.update(tree_model_errors(cfg, point))
            out.append(row)
    return out


def tree_model_errors(cfg: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The model at a measured ``--topo tree`` point's own configuration, and its error.

    The tree's racks are ``per_rack`` workers (``rack_size``), the uplink factor is the core
    links' rate over the worker links', the pool is the run's window and the Ethernet bytes
    are tc's (what Mininet's shaping charges). Error: model time over measured time, minus 1
    (negative: the model is optimistic).
    """
    n, size, bw = point["workers"], point["size_bytes"], cfg["bw_mbit"]
    core = cfg.get("core_bw_mbit") or bw
    backends = point["backends"]
    out: dict[str, Any] = {"topo": "tree", "racks": cfg.get("racks"), "per_rack": cfg.get("per_rack"),
                           "core_bw_mbit": core}
    params = ModelParams(size_bytes=size, mtu=cfg.get("mtu", 1500),
                         l2_bytes=cfg.get("l2_bytes_in_bound", wire.ETHERNET_TC_BYTES),
                         rack_size=cfg.get("per_rack", n), uplink_factor=core / bw)
    if "switchml" in backends:
        r = backends["switchml"]
        model = switchml_point(n, bw / 1e3, replace(params, k=r["k"], pool=r["window"]))
        out["switchml_tree_model_time_s"] = model["time_s"]
        out["switchml_tree_model_error"] = model["time_s"] / r["time_s"]["median"] - 1
    if "gloo" in backends:
        model = ring_point(n, bw / 1e3, params)
        out["ring_tree_model_time_s"] = model["time_s"]
        out["ring_tree_model_error"] = model["time_s"] / backends["gloo"]["time_s"]["median"] - 1
    return out


# ---------------------------------------------------------------- the whole model
def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every table of ``switchml-bench scale`` as one JSON document."""
    from tqdm import tqdm

    p = ModelParams(size_bytes=args.size, k=args.k, mtu=args.mtu, rack_size=args.rack_size, rto=args.rto,
                    tcp_tail_recovery=args.tcp_tail_recovery, pool=args.pool)
    grid = []
    for gbps in args.gbps:
        for n in args.workers:
            sw = switchml_point(n, gbps, p)
            ring = ring_point(n, gbps, p)
            rack_only = switchml_point(n, gbps, replace(p, rack_size=max(n, p.rack_size)))
            grid.append({"gbps": gbps, "workers": n, "switchml": sw, "switchml_one_rack": rack_only, "ring": ring,
                         "speedup": ring["time_s"] / sw["time_s"]})
    validation = validate_published(p)
    fit = validation["nccl_fit"]
    loss_rows = []
    des_gbps = 100.0 if 100.0 in args.gbps else args.gbps[0]
    lossy = replace(p, size_bytes=args.loss_size)
    jobs = [(n, loss) for n in args.des_workers for loss in args.loss]
    for n, loss in tqdm(jobs, desc="simulating", unit="run", file=sys.stderr, leave=False,
                        disable=not sys.stderr.isatty()):
        des = switchml_des(n, des_gbps, lossy, loss, args.seed) if loss else None
        closed = switchml_point(n, des_gbps, lossy, loss)
        ring, ring0 = ring_point(n, des_gbps, lossy, loss), ring_point(n, des_gbps, lossy)
        loss_rows.append({"workers": n, "gbps": des_gbps, "loss": loss, "size_bytes": lossy.size_bytes,
                          "switchml_closed_slowdown": closed["time_s"] / closed["lossless_time_s"],
                          "switchml_des_slowdown": des["slowdown"] if des else 1.0, "des": des,
                          "ring_slowdown": ring["time_s"] / ring0["time_s"],
                          "switchml_time_s": des["time_s"] if des else closed["lossless_time_s"],
                          "ring_time_s": ring["time_s"]})
    large = []
    for n in sorted({max(args.workers)} | {n for n in args.workers if n >= 256}):
        for loss in args.loss:
            sw, ring = switchml_point(n, des_gbps, p, loss), ring_point(n, des_gbps, p, loss)
            large.append({"workers": n, "gbps": des_gbps, "loss": loss, "switchml_time_s": sw["time_s"],
                          "ring_time_s": ring["time_s"], "speedup": ring["time_s"] / sw["time_s"],
                          "method": "closed form (approximate under loss)"})
    return {
        "benchmark": "scale", "command": command, "machine": machine_info(), "params": asdict(p),
        "grid": grid, "validation": validation, "ring_fitted": {"eta": fit["eta"], "alpha_s": fit["alpha_s"]},
        "loss": loss_rows, "loss_large_n": large, "measured": load_measured(args.measured),
    }


def format_report(doc: dict[str, Any]) -> str:
    """Readable tables of a ``scale`` document."""
    p = doc["params"]
    out = [f"scale model: {format_size(p['size_bytes'])} float32, k={p['k']}, MTU {p['mtu']}, racks of "
           f"{p['rack_size']}; ring: eta={p['ring_eta']:g}, alpha={p['ring_alpha'] * 1e6:g} us (ideal); "
           f"SwitchML pool sized to the bandwidth-delay product", ""]
    rows = []
    for g in doc["grid"]:
        sw, ring = g["switchml"], g["ring"]
        rows.append([f"{g['gbps']:g}", g["workers"], sw["topology"], sw["time_s"] * 1e3,
                     g["switchml_one_rack"]["time_s"] * 1e3, ring["time_s"] * 1e3, g["speedup"],
                     sw["elements_per_s"] / 1e9, sw["window"], sw["round_trip_s"] * 1e6,
                     sw["switch_memory_bytes"] / 1024])
    out.append(table(["Gbit/s", "n", "topology", "SwitchML ms", "1-rack ms", "ring ms", "speedup", "SwitchML Gel/s",
                      "pool slots", "RTT us", "SRAM KiB/job"], rows))
    v = doc["validation"]
    out += ["", f"validation at {v['gbps']:g} Gbit/s against {v['source']}:"]
    rows = [[r["workers"], r["published_elements_per_s"] / 1e9, r["model_elements_per_s"] / 1e9,
             r["model_over_published"]] for r in v["switchml"]]
    out.append(table(["n", "SwitchML published Gel/s", "model Gel/s", "model/published"], rows))
    fit = v["nccl_fit"]
    rows = [[r["workers"], r["published_elements_per_s"] / 1e9, r["ideal_ring_elements_per_s"] / 1e9,
             r["fitted_elements_per_s"] / 1e9] for r in fit["points"]]
    out.append(table(["n", "NCCL published Gel/s", "ideal ring Gel/s", "fitted ring Gel/s"], rows))
    out.append(f"ring fitted to NCCL: eta={fit['eta']:.3f} of line rate, alpha={fit['alpha_s'] * 1e6:.2f} us per step")
    size = format_size(doc["loss"][0]["size_bytes"]) if doc["loss"] else "-"
    out += ["", f"loss, {size} tensor (SwitchML: discrete-event simulation and closed form; ring over TCP: closed form; "
                f"SwitchML RTO {p['rto'] * 1e3:g} ms, TCP tail recovery {p['tcp_tail_recovery'] * 1e3:g} ms):"]
    rows = [[r["workers"], f"{r['gbps']:g}", f"{r['loss']:g}", r["switchml_des_slowdown"], r["switchml_closed_slowdown"],
             r["des"]["retransmissions_per_packet"] if r["des"] else 0.0, r["ring_slowdown"],
             r["ring_time_s"] / r["switchml_time_s"]] for r in doc["loss"]]
    out.append(table(["n", "Gbit/s", "loss", "SwitchML DES slowdown", "closed form", "retx/packet",
                      "ring slowdown", "speedup"], rows))
    rows = [[r["workers"], f"{r['loss']:g}", r["switchml_time_s"] * 1e3, r["ring_time_s"] * 1e3, r["speedup"]]
            for r in doc["loss_large_n"]]
    out += ["", "large n under loss (closed form, rough):", table(["n", "loss", "SwitchML ms", "ring ms", "speedup"], rows)]
    if doc["measured"]:
        rows = [[m["net"] + (f" (tree {m['racks']}x{m['per_rack']})" if m.get("topo") == "tree" else ""),
                 m["workers"], format_size(m["size_bytes"]), m.get("bw_mbit"),
                 m.get("switchml_line_fraction"), m.get("switchml_model_line_fraction"), m.get("gloo_line_fraction"),
                 m.get("ring_model_line_fraction"), m.get("speedup")] for m in doc["measured"]]
        out += ["", "measured (fractions of line rate, tensor bytes per second over link rate):",
                table(["net", "n", "size", "Mbit/s", "SwitchML", "model", "Gloo", "ring model", "speedup"], rows)]
    trees = [m for m in doc["measured"] if m.get("topo") == "tree"]
    if trees:
        rows = [[f"{m['racks']}x{m['per_rack']}", format_size(m["size_bytes"]), f"{m['bw_mbit']:g}/{m['core_bw_mbit']:g}",
                 m.get("switchml_time_s"), m.get("switchml_tree_model_time_s"), m.get("switchml_tree_model_error"),
                 m.get("flat_time_s"), m.get("gloo_time_s"), m.get("ring_tree_model_time_s"),
                 m.get("ring_tree_model_error")] for m in trees]
        out += ["", "measured trees against the model at their configuration (error: model / measured - 1):",
                table(["racks", "size", "Mbit/s edge/core", "SwitchML tree s", "model s", "error", "flat s",
                       "Gloo s", "ring model s", "error"], rows)]
    return "\n".join(out)


def plot(doc: dict[str, Any], path: str | Path) -> None:
    """Four panels: time vs n, validation (published and measured, as fractions of line rate), loss, pool size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {10.0: "tab:blue", 100.0: "tab:orange", 400.0: "tab:green"}
    ax = axes[0][0]
    for gbps in sorted({g["gbps"] for g in doc["grid"]}):
        pts = [g for g in doc["grid"] if g["gbps"] == gbps]
        ns = [g["workers"] for g in pts]
        c = colors.get(gbps)
        ax.plot(ns, [g["switchml"]["time_s"] * 1e3 for g in pts], "-o", color=c, ms=3, label=f"SwitchML {gbps:g}G")
        ax.plot(ns, [g["ring"]["time_s"] * 1e3 for g in pts], "--s", color=c, ms=3, label=f"ring {gbps:g}G")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers")
    ax.set_ylabel(f"allreduce time of {format_size(doc['params']['size_bytes'])} (ms)")
    ax.set_title(f"model: one rack up to {doc['params']['rack_size']}, two-level tree beyond (lossless)")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0][1]
    p = doc["params"]
    line_el = PUBLISHED_GBPS * 1e9 / 32  # int32 elements per second at line rate
    ns = [4, 8, 16, 32, 64]
    sw_frac = [g["switchml"]["elements_per_s"] / line_el for g in doc["grid"] if g["gbps"] == PUBLISHED_GBPS]
    sw_ns = [g["workers"] for g in doc["grid"] if g["gbps"] == PUBLISHED_GBPS]
    if sw_frac:
        ax.plot(sw_ns, sw_frac, "-", color="tab:orange", label=f"SwitchML model (k={p['k']}, 100G)")
    params = ModelParams(**{k: v for k, v in p.items()})
    ideal = [ring_point(n, PUBLISHED_GBPS, params)["elements_per_s"] / line_el for n in ns]
    fitted = [ring_point(n, PUBLISHED_GBPS, params, eta=doc["ring_fitted"]["eta"],
                         alpha=doc["ring_fitted"]["alpha_s"])["elements_per_s"] / line_el for n in ns]
    ax.plot(ns, ideal, "--", color="tab:blue", label="ring model, ideal (n/(2(n-1)))")
    ax.plot(ns, fitted, ":", color="tab:blue", label=f"ring model fitted to NCCL (eta={doc['ring_fitted']['eta']:.2f})")
    for name, marker, color in (("switchml", "*", "tab:orange"), ("nccl_rdma", "*", "tab:blue")):
        pts = sorted(PUBLISHED[name].items())
        ax.plot([n for n, _ in pts], [v / line_el for _, v in pts], marker, ms=12, color=color, ls="none",
                label=f"published {'SwitchML' if name == 'switchml' else 'NCCL/RDMA'} (100G)")
    measured = [m for m in doc["measured"] if m.get("bw_mbit")]
    for key, marker, color, label in (("switchml", "o", "tab:red", "measured SwitchML"),
                                      ("gloo", "s", "tab:purple", "measured Gloo")):
        pts = [(m["workers"], m[f"{key}_line_fraction"]) for m in measured
               if f"{key}_line_fraction" in m and m.get("topo") != "tree"]
        if pts:
            bw = sorted({m["bw_mbit"] for m in measured})
            ax.plot(*zip(*pts, strict=True), marker, color=color, ms=8, ls="none", mfc="none",
                    label=f"{label} (Mininet, {'/'.join(f'{b:g}' for b in bw)} Mbit/s)")
    for key, color in (("switchml", "tab:red"), ("ring", "tab:purple")):
        pts = [(m["workers"], m[f"{key}_model_line_fraction"]) for m in measured
               if f"{key}_model_line_fraction" in m and m.get("topo") != "tree"]
        if pts:
            ax.plot(*zip(*pts, strict=True), "x", color=color, ms=7, ls="none",
                    label=f"wire bound of the measured {'SwitchML' if key == 'switchml' else 'ring'} config")
    _plot_measured_trees(ax, [m for m in measured if m.get("topo") == "tree"])
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("workers")
    ax.set_ylabel("tensor bytes/s over link rate (fraction of line rate)")
    ax.set_title("validation: published (100 Gbit/s) and measured (this machine)")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    for n in sorted({r["workers"] for r in doc["loss"]}):
        rows = [r for r in doc["loss"] if r["workers"] == n and r["loss"] > 0]
        if not rows:
            continue
        line, = ax.plot([r["loss"] for r in rows], [r["switchml_des_slowdown"] for r in rows], "-o", ms=4,
                        label=f"SwitchML DES n={n}")
        ax.plot([r["loss"] for r in rows], [r["switchml_closed_slowdown"] for r in rows], ":", color=line.get_color())
        ax.plot([r["loss"] for r in rows], [r["ring_slowdown"] for r in rows], "--", color=line.get_color(), alpha=0.6,
                label=f"ring/TCP n={n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("packet loss probability (every link)")
    ax.set_ylabel("slowdown vs lossless")
    g = doc["loss"][0]["gbps"] if doc["loss"] else 100
    size = format_size(doc["loss"][0]["size_bytes"]) if doc["loss"] else ""
    ax.set_title(f"loss, {size} at {g:g} Gbit/s (dotted: SwitchML closed form; RTO {p['rto'] * 1e3:g} ms, "
                 f"TCP tail {p['tcp_tail_recovery'] * 1e3:g} ms)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)

    ax = axes[1][1]
    for gbps in sorted({g["gbps"] for g in doc["grid"]}):
        params_g = params
        windows = [8, 16, 32, 64, 128, 256, 512, 1024]
        rack = [switchml_point(8, gbps, replace(params_g, pool=w))["goodput_Bps"] * 8 / (gbps * 1e9) for w in windows]
        tree = [switchml_point(params_g.rack_size * 2, gbps, replace(params_g, pool=w))["goodput_Bps"] * 8 / (gbps * 1e9)
                for w in windows]
        c = colors.get(gbps)
        ax.plot(windows, rack, "-o", ms=3, color=c, label=f"{gbps:g}G, one rack")
        ax.plot(windows, tree, "--", color=c, label=f"{gbps:g}G, two-level tree")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pool slots per job (window W)")
    ax.set_ylabel("SwitchML goodput / line rate")
    ax.set_title("pool sizing: the window must cover the bandwidth-delay product")
    ax.legend(fontsize=7)
    fig.text(0.01, 0.005, textwrap.fill(doc["command"], 180), fontsize=6, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_measured_trees(ax: Any, trees: list[dict[str, Any]]) -> None:
    """Measured ``--topo tree`` points (triangles) and the model at their configuration (+)."""
    for key, model_key, color, label in (("switchml", "switchml_tree_model_time_s", "tab:red", "SwitchML tree"),
                                         ("flat", None, "tab:brown", "SwitchML flat, through the core"),
                                         ("gloo", "ring_tree_model_time_s", "tab:purple", "Gloo ring")):
        pts = [(m["workers"], m["size_bytes"] * 8 / m[f"{key}_time_s"] / (m["bw_mbit"] * 1e6))
               for m in trees if f"{key}_time_s" in m]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), "^", color=color, ms=9, ls="none", mfc="none",
                label=f"measured tree: {label} (Mininet)")
        model = [(m["workers"], m["size_bytes"] * 8 / m[model_key] / (m["bw_mbit"] * 1e6))
                 for m in trees if model_key and model_key in m]
        if model:
            ax.plot(*zip(*model, strict=True), "+", color=color, ms=10, ls="none",
                    label=f"model at the measured tree: {label}")


def main(args: argparse.Namespace, command: str) -> int:
    """Entry point of ``switchml-bench scale``."""
    try:
        doc = run(args, command)
    except (OSError, ValueError, KeyError) as exc:
        print(f"switchml-bench scale: {exc}", file=sys.stderr)
        return 1
    print(format_report(doc))
    if args.json:
        write_json(args.json, doc)
        print(f"JSON: {args.json}")
    if args.plot:
        plot(doc, args.plot)
        print(f"plot: {args.plot}")
    return 0
