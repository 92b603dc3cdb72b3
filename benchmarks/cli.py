"""``switchml-bench``: allreduce, train, scale and pps benchmarks.

    switchml-bench allreduce --workers 4 --size 25MB --backends switchml,gloo --json out.json
    switchml-bench allreduce --net mininet --bw 100 --mtu 9000 --workers 4,8 --size 64MB --plot out.png
    switchml-bench allreduce --net mininet --topo tree --racks 2 --per-rack 4 --bw 100 --core-bw 100 --size 64MB
    switchml-bench scale --measured benchmarks/results/allreduce_mininet.json --plot scale.png
    switchml-bench pps --payload 256,1024 --json benchmarks/results/pps.json
    switchml-bench train --task digits --workers 4 --steps 100 --plot train.png -- --width 64
    switchml-bench train --net mininet --bw 100 --mtu 9000 --workers 4,8 --task shapes_resnet --plot train.png
    switchml-bench fuzz --packets 1000000 --json benchmarks/results/fuzz_1M.json
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from benchmarks.common import parse_fraction, parse_list, parse_size, write_json
from switchml.extras import missing


def _arg(convert, what: str):
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None
    return parse


def _ints(text: str) -> list[int]:
    values = parse_list(text, int)
    if any(v < 1 for v in values):
        raise ValueError("expected positive integers")
    return values


def _add_network_options(p: argparse.ArgumentParser, net: str, bw: str, mtu: str) -> None:
    """--net, --bw and --mtu (with these helps), then SwitchML's --k and --window, which are sized
    for them (``benchmarks.allreduce.AllreduceConfig``, for the allreduce and train benchmarks alike)."""
    p.add_argument("--net", choices=["loopback", "mininet"], default="loopback", help=net)
    p.add_argument("--bw", type=float, default=None, metavar="MBIT", help=bw)
    p.add_argument("--mtu", type=int, default=1500, help=mtu)
    p.add_argument("--k", type=int, default=None,
                   help="SwitchML elements per packet (32..4096; Tofino: 64 or 256); default: the largest "
                        "packet that fits the MTU (loopback: 4096; MTU 1500: 256; MTU 9000: 2048)")
    p.add_argument("--window", type=int, default=None,
                   help="SwitchML window (slots per job); default: the largest <= 64 with "
                        "n * W * packet <= 2 MiB (the switch's 4 MB receive buffer) and, in Mininet, whose "
                        "packets leave a --bw link within half the workers' first retransmission timeout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchml-bench",
        description="Benchmarks of switchml against the baseline in the same run. Results: JSON (with the command "
                    "that made them) and PNG, by convention under benchmarks/results/.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{allreduce,scale,pps,train,fuzz}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    ar = sub.add_parser(
        "allreduce", formatter_class=fmt,
        help="time SwitchML (software switch) against Gloo's ring allreduce, in the same run",
        description="For each (workers, size, loss): start the software switch as its own process and N worker "
                    "processes that each time R allreduces of SIZE bytes of float32 (barrier-aligned), then the "
                    "same with torch.distributed's Gloo allreduce. Prints medians, spread, goodput per worker, "
                    "the SwitchML/Gloo ratio and, with --bw, each backend's time over its wire bound; checks the "
                    "SwitchML result against the exact sum within the quantization bound.")
    ar.add_argument("--workers", type=_arg(_ints, "--workers"), default=None, metavar="N[,N...]",
                    help="worker counts (at most 32: the switch's bitmap); default 4, and with --topo tree "
                         "racks x per-rack")
    ar.add_argument("--size", type=_arg(lambda t: parse_list(t, parse_size), "--size"), default=[25_000_000],
                    metavar="S[,S...]", help="bytes of float32 per worker: 25MB (10^6), 4MiB (2^20), 1KB, 1000")
    ar.add_argument("--backends", type=_arg(lambda t: parse_list(t, str.strip), "--backends"),
                    default=None, metavar="B[,B...]",
                    help="switchml, gloo and, with --topo tree, flat (one switch at the spine, reached through "
                         "the core); default: all of them")
    ar.add_argument("--rto", type=float, default=None, metavar="SECONDS",
                    help="SwitchML workers' first retransmission timeout (default: the worker's, 0.01); a larger "
                         "one tolerates more queueing and CPU jitter, a smaller one recovers losses sooner")
    _add_network_options(ar, net="loopback: all processes on 127.0.0.1; mininet: a star of shaped links "
                                  "(needs root and Mininet, see emulation/mininet.py)",
                         bw="link rate in Mbit/s: shapes the Mininet links, and is the B of the wire bounds",
                         mtu="MTU of the Mininet links (1500 or 9000) and of the bounds")
    ar.add_argument("--switch", choices=["software", "bmv2"], default="software",
                    help="software: the software switch; bmv2: BMv2 (simple_switch_grpc) running "
                         "p4/switchml_v1model.p4, deployed over P4Runtime (needs --net mininet, p4c-bm2-ss and "
                         "simple_switch_grpc on PATH; k=64)")
    ar.add_argument("--topo", choices=["star", "tree"], default="star",
                    help="--net mininet: star (every worker on a link to one switch host) or tree (--racks racks "
                         "of --per-rack workers under leaf hosts, the leaves under a spine host; SwitchML "
                         "aggregates in the leaves and the spine, docs/hierarchy.md)")
    ar.add_argument("--racks", type=int, default=2, help="--topo tree: racks (leaf switches)")
    ar.add_argument("--per-rack", type=int, default=4, help="--topo tree: workers per rack")
    ar.add_argument("--core-bw", type=float, default=None, metavar="MBIT",
                    help="--topo tree: rate of the leaf-spine links in Mbit/s (default: --bw); with --per-rack 4 "
                         "and --core-bw equal to --bw the core is 4:1 oversubscribed")
    ar.add_argument("--loss", type=_arg(lambda t: parse_list(t, parse_fraction), "--loss"), default=[0.0],
                    metavar="P[,P...]", help="packet loss, a fraction or a percentage (0.001 or 0.1%%)")
    ar.add_argument("--loss-at", choices=["switch", "hosts"], default="switch",
                    help="switch: the software switch's drop probability (SwitchML only); hosts: nftables rules "
                         "in every Mininet node, each link and direction, both backends (Mininet only)")
    ar.add_argument("--repeats", type=int, default=5, help="timed allreduces per backend and point")
    ar.add_argument("--warmup", type=int, nargs="?", const=1, default=1,
                    help="untimed allreduces before the timed ones (--warmup 0: none)")
    ar.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the switch's loss")
    ar.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a worker may wait on any one step (registration, barrier, a stalled allreduce)")
    ar.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the check of the result against the exact float64 sum")
    ar.add_argument("--json", metavar="FILE", help="write every raw sample, the machine and the command here")
    ar.add_argument("--plot", metavar="FILE", help="write a PNG plot here")
    ar.add_argument("--quiet", action="store_true", help="no progress bar")

    sc = sub.add_parser(
        "scale", formatter_class=fmt,
        help="model SwitchML vs ring allreduce from 4 to 1024 workers at 10/100/400 Gbit/s",
        description="A model of one rack and of a two-level tree: closed forms for lossless runs, a discrete-event "
                    "simulation of SwitchML's slots and retransmissions under loss, pool sizing from the "
                    "bandwidth-delay product. Validated against published SwitchML figures and, with --measured, "
                    "against this machine's `allreduce` JSON (both on one plot).")
    sc.add_argument("--workers", type=_arg(_ints, "--workers"), default=[4, 8, 16, 32, 64, 128, 256, 512, 1024],
                    metavar="N[,N...]")
    sc.add_argument("--gbps", type=_arg(lambda t: parse_list(t, float), "--gbps"), default=[10.0, 100.0, 400.0],
                    metavar="G[,G...]", help="link rates in Gbit/s")
    sc.add_argument("--size", type=_arg(parse_size, "--size"), default=100_000_000, help="tensor bytes (float32)")
    sc.add_argument("--k", type=int, default=256, help="elements per packet (Tofino: 256)")
    sc.add_argument("--mtu", type=int, default=9000, help="MTU (for the ring's TCP segments and fragmentation)")
    sc.add_argument("--rack-size", type=int, default=32, help="workers per ToR in the two-level tree")
    sc.add_argument("--loss", type=_arg(lambda t: parse_list(t, parse_fraction), "--loss"),
                    default=[0.0, 1e-4, 1e-3, 1e-2], metavar="P[,P...]", help="per-packet loss rates to model")
    sc.add_argument("--des-workers", type=_arg(_ints, "--des-workers"), default=[4, 8, 16],
                    metavar="N[,N...]", help="worker counts simulated packet by packet under loss")
    sc.add_argument("--loss-size", type=_arg(parse_size, "--loss-size"), default=25_000_000,
                    help="tensor bytes of the loss study (simulated packet by packet: larger is slower)")
    sc.add_argument("--rto", type=float, default=1e-3, help="SwitchML worker's retransmission timeout (s)")
    sc.add_argument("--tcp-tail-recovery", type=float, default=0.010,
                    help="seconds TCP needs to recover a loss in a flow's last segments (Linux tail loss probe: "
                         ">= 10 ms; 0.2 for the minimum RTO)")
    sc.add_argument("--pool", type=int, default=None,
                    help="SwitchML slots per job (default: the bandwidth-delay product of each link rate)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the simulations' loss")
    sc.add_argument("--measured", metavar="FILE", action="append", default=[],
                    help="JSON of `switchml-bench allreduce` to put next to the model (repeatable)")
    sc.add_argument("--json", metavar="FILE", help="write the model's numbers here")
    sc.add_argument("--plot", metavar="FILE", help="write a PNG plot here")

    pp = sub.add_parser(
        "pps", formatter_class=fmt,
        help="the software switch's packets/s against a plain UDP echo, and the quantizer against memcpy",
        description="Loopback, one process: a closed-loop load generator in C (N worker sockets, WINDOW slots "
                    "each) against the software switch on each data path and against a UDP echo of the same "
                    "packets (native: recvmmsg/sendmmsg, the kernel's ceiling here; python: recvfrom/sendto). "
                    "Then the native quantizer and dequantizer against numpy's and against a memcpy of the same "
                    "bytes. Needs the native extensions (the generator is one of them).")
    pp.add_argument("--payload", type=_arg(_ints, "--payload"), default=[256, 1024], metavar="B[,B...]",
                    help="payload bytes per packet after the 10-byte header (4*k: 256 = k 64, 1024 = k 256)")
    pp.add_argument("--targets", type=_arg(lambda t: parse_list(t, str.strip), "--targets"),
                    default=["native", "native-plain", "python", "echo-native", "echo-offload", "echo-python"],
                    metavar="T[,T...]", help="the switch: native (UDP GSO/GRO), native-plain (without), python; "
                    "a UDP echo: echo-native (recvmmsg/sendmmsg), echo-offload (and GSO/GRO), echo-python")
    pp.add_argument("--threads", type=_arg(_ints, "--threads"), default=[1], metavar="N[,N...]",
                    help="receive threads of the native switch (each value is measured)")
    pp.add_argument("--workers", type=int, default=4, help="worker sockets (a slot completes when all sent)")
    pp.add_argument("--window", type=int, default=64, help="slots each worker socket keeps busy")
    pp.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    pp.add_argument("--warmup", type=float, default=0.5, help="seconds run before measuring")
    pp.add_argument("--repeats", type=int, default=3, help="runs per point (the median is reported)")
    pp.add_argument("--quantize-size", type=_arg(parse_size, "--quantize-size"), default=25_000_000,
                    help="bytes of float32 for the quantizer's throughput (0: skip)")
    pp.add_argument("--json", metavar="FILE", help="write every run, the machine and the command here")

    fz = sub.add_parser(
        "fuzz", formatter_class=fmt,
        help="malformed, truncated, forged and replayed packets at the software switch while an honest job runs",
        description="Per data path: the software switch with its controller in this process, N honest "
                    "switchml.Worker processes summing int32 arrays over UDP on 127.0.0.1 with exact checks, and "
                    "PACKETS hostile packets, each built with the drop reason the switch must count for it: "
                    "most through the data plane's process-a-packet entry point (from unadmitted senders, and "
                    "packets any sender must be refused for from the workers' own addresses), a share as UDP "
                    "datagrams from unadmitted sockets. Fails (exit 3) on a crash, a wrong sum, a reply to a "
                    "forged packet, or a drop counter that differs from the packets forged for its reason. "
                    "The threat model: docs/security.md.")
    fz.add_argument("--packets", type=int, default=1_000_000, help="hostile packets per data path")
    fz.add_argument("--dataplanes", type=_arg(lambda t: parse_list(t, str.strip), "--dataplanes"),
                    default=["python", "native"], metavar="D[,D...]", help="the switch's data paths to fuzz")
    fz.add_argument("--workers", type=int, default=4, help="ranks of the honest job")
    fz.add_argument("--udp-fraction", type=_arg(parse_fraction, "--udp-fraction"), default=0.1,
                    help="share of the packets sent as UDP datagrams rather than in-process")
    fz.add_argument("--elements", type=int, default=4096, help="int32 elements per honest allreduce")
    fz.add_argument("--seed", type=int, default=0, help="seed of the packets and of the honest arrays")
    fz.add_argument("--note", default=None, help="a remark stored with the machine's description (e.g. its load)")
    fz.add_argument("--json", metavar="FILE", help="write the figures, the machine and the command here")

    tr = sub.add_parser(
        "train", formatter_class=fmt,
        help="a training run through SwitchML against DDP's allreduce: step time, samples/s, time to a loss",
        description="For each worker count and repeat, run `switchml-train TASK --comm switchml` and `--comm "
                    "allreduce` (Gloo) in turn, with the same seed, steps and batch. --net loopback: the local "
                    "launcher, the software switch on loopback. --net mininet: a Mininet star of --bw links, one "
                    "rank per host started with `torchrun --nnodes N --node_rank i` (rendezvous on host 0), the "
                    "software switch and its controller on the star's switch host (authenticated with a random "
                    "cluster secret), switchml without fallback. Reports the median step time (after --skip "
                    "warm-up steps), samples/s, the time until the smoothed training loss reaches the target, the "
                    "share of each step spent waiting for the allreduce (blocked in backward() after the last "
                    "gradient), the final metrics, the step-time ratio switchml/allreduce and how far the loss "
                    "curves are apart. Options after `--` go to switchml-train (e.g. -- --width 64).")
    tr.add_argument("--task", default="digits",
                    help="a switchml-train task (digits, shapes_resnet: the communication-bound ResNet-18, "
                         "attribution, clip)")
    tr.add_argument("--workers", type=_arg(_ints, "--workers"), default=[4], metavar="N[,N...]",
                    help="worker counts")
    tr.add_argument("--backends", type=_arg(lambda t: parse_list(t, str.strip), "--backends"),
                    default=["switchml", "allreduce"], metavar="B[,B...]", help="switchml and/or allreduce")
    _add_network_options(tr, net="loopback: every rank on 127.0.0.1 (the local launcher); mininet: one rank per "
                                  "host of a star of shaped links, launched with torchrun (needs root and Mininet, "
                                  "see emulation/mininet.py)",
                         bw="--net mininet: rate of every link in Mbit/s (default: unshaped veth links)",
                         mtu="--net mininet: MTU of the links (1500 or 9000)")
    tr.add_argument("--vary-seed", action="store_true",
                    help="repeat r trains with --seed r (both backends alike), so that the spread of one "
                         "backend's repeats is the seed-to-seed spread")
    tr.add_argument("--steps", type=int, default=100, help="optimiser steps per run")
    tr.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: the task's)")
    tr.add_argument("--repeats", type=int, default=3, help="runs per backend; medians over them are reported")
    tr.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the step time")
    tr.add_argument("--smooth", type=int, default=10, help="steps the training loss is averaged over")
    tr.add_argument("--target-loss", type=float, default=None,
                    help="smoothed training loss to time (default: the highest final one of all runs, "
                         "which every run reached)")
    tr.add_argument("--timeout", type=float, default=1800.0, help="seconds one training run may take")
    tr.add_argument("--keep", metavar="DIR", default=None, help="keep every run's output folder under DIR")
    tr.add_argument("--json", metavar="FILE", help="write every run, the machine and the command here")
    tr.add_argument("--plot", metavar="FILE",
                    help="write a PNG of the loss against training time and against the step here")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    if error := missing("bench", "switchml-bench", "matplotlib", "tqdm"):
        print(error, file=sys.stderr)
        return 1
    raw = sys.argv[1:] if argv is None else list(argv)
    passthrough: list[str] = []
    if "--" in raw:  # the rest goes to switchml-train (switchml-bench train -- --width 64)
        cut = raw.index("--")
        raw, passthrough = raw[:cut], raw[cut + 1:]
    args = build_parser().parse_args(raw)
    if passthrough and args.command != "train":
        build_parser().error(f"options after -- are for `train` only, got {passthrough}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = "switchml-bench " + shlex.join(raw + (["--", *passthrough] if passthrough else []))
    if args.command == "allreduce":
        return _allreduce(args, command)
    if args.command == "scale":
        from benchmarks import scale

        return scale.main(args, command)
    if args.command == "pps":
        return _pps(args, command)
    if args.command == "fuzz":
        return _fuzz(args, command)
    return _train(args, command, passthrough)


def _report(module: Any, doc: dict[str, Any], json_path: str | None, plot_path: str | None = None) -> None:
    """Print a benchmark's table, write its JSON and (``module.plot``) its PNG, and say where they went."""
    print(module.format_report(doc))
    if json_path:
        write_json(json_path, doc)
    if plot_path:
        module.plot(doc, plot_path)
    for what, path in (("JSON", json_path), ("plot", plot_path)):
        if path:
            print(f"{what}: {path}")


def _train(args: argparse.Namespace, command: str, passthrough: list[str]) -> int:
    from benchmarks import train

    cfg = train.TrainBenchConfig(
        task=args.task, workers=args.workers, backends=args.backends, steps=args.steps, repeats=args.repeats,
        skip=args.skip, smooth=args.smooth, target_loss=args.target_loss, batch_size=args.batch_size,
        timeout=args.timeout, task_args=passthrough, keep_dir=args.keep, progress=not args.quiet, net=args.net,
        bw_mbit=args.bw, mtu=args.mtu, k=args.k, window=args.window, vary_seed=args.vary_seed)
    try:
        doc = train.run(cfg, command)
    except (ValueError, OSError, RuntimeError) as exc:  # TrainBenchmarkError, MininetUnavailable and friends
        print(f"switchml-bench train: {exc}", file=sys.stderr)
        return 1
    _report(train, doc, args.json, args.plot)
    return 0


def _fuzz(args: argparse.Namespace, command: str) -> int:
    from benchmarks import fuzz
    from switchml.native import DATAPLANES

    if unknown := [d for d in args.dataplanes if d not in DATAPLANES]:
        print(f"switchml-bench fuzz: --dataplanes {unknown}: expected some of {', '.join(DATAPLANES)}", file=sys.stderr)
        return 2
    if args.packets < 1 or args.workers < 1 or args.elements < 1:
        print(f"switchml-bench fuzz: --packets {args.packets}, --workers {args.workers}, --elements {args.elements}: "
              "expected positive integers", file=sys.stderr)
        return 2
    cfg = fuzz.FuzzConfig(packets=args.packets, dataplanes=tuple(args.dataplanes), workers=args.workers,
                          udp_fraction=args.udp_fraction, elements=args.elements, seed=args.seed)
    try:
        doc = fuzz.run(cfg, command, args.note)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"switchml-bench fuzz: {exc}", file=sys.stderr)
        return 1
    _report(fuzz, doc, args.json)
    return 0 if doc["ok"] else 3


def _pps(args: argparse.Namespace, command: str) -> int:
    from benchmarks import pps

    unknown = [t for t in args.targets if t not in pps.TARGETS]
    if unknown:
        print(f"switchml-bench pps: unknown targets {unknown}; expected some of {', '.join(pps.TARGETS)}",
              file=sys.stderr)
        return 2
    cfg = pps.PpsConfig(payloads=args.payload, targets=args.targets, threads=args.threads, workers=args.workers,
                        window=args.window, duration=args.duration, warmup=args.warmup, repeats=args.repeats,
                        quantize_size=args.quantize_size)
    try:
        doc = pps.run(cfg, command)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"switchml-bench pps: {exc}", file=sys.stderr)
        return 1
    _report(pps, doc, args.json)
    return 0


def _allreduce(args: argparse.Namespace, command: str) -> int:
    from benchmarks import allreduce

    tree = args.topo == "tree"
    backends = args.backends or (["switchml", "flat", "gloo"] if tree else ["switchml", "gloo"])
    workers = args.workers or ([] if tree else [4])
    cfg = allreduce.AllreduceConfig(
        workers=workers, sizes=args.size, backends=backends, k=args.k, window=args.window, rto=args.rto, net=args.net,
        switch=args.switch, bw_mbit=args.bw, mtu=args.mtu, topo=args.topo, racks=args.racks, per_rack=args.per_rack,
        core_bw_mbit=args.core_bw, losses=args.loss, loss_at=args.loss_at, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, timeout=args.timeout, check=args.check, progress=not args.quiet)
    try:
        doc = allreduce.run(cfg, command)
    except (allreduce.BenchmarkError, ValueError, OSError) as exc:
        print(f"switchml-bench allreduce: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # MininetUnavailable and friends
        print(f"switchml-bench allreduce: {exc}", file=sys.stderr)
        return 1
    _report(allreduce, doc, args.json, args.plot)
    if not allreduce.all_checks_pass(doc):
        print("switchml-bench allreduce: a result was outside its bound or differed between ranks", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
