"""``switchml-bench pps``: the software switch's packet rate against a plain UDP echo, and
the quantizer's throughput against a memory copy, in the same run.

Packet rate. One process, loopback: N worker sockets driven by one closed-loop load
generator in C (``benchmarks._native_bench.load``, native/bench.c: each socket keeps ``window`` slots busy
and sends a slot's next UPDATE when that slot's reply comes back, resending after ``rto``)
against, in turn:

- the software switch (``SoftwareSwitch`` + ``SwitchServer``) on each data path asked for:
  every slot completes when all N workers' packets are in, and its RESULT is multicast
  back to the N, so the switch sends one packet per packet received. ``native`` uses UDP
  segmentation offload (UDP_GRO receives, UDP_SEGMENT sends), ``native-plain`` does not;
- a UDP echo of the same packets, the ceiling the kernel allows here: ``echo-native``
  with recvmmsg/sendmmsg (the batching of the native switch), ``echo-offload`` with
  UDP_GRO/UDP_SEGMENT on top, and a Python ``recvfrom``/``sendto`` echo for scale.

The generator sends and receives as the native worker engine does (with offload, as a
native worker would); every target gets the same datagrams on the wire.

The rate is replies per second at the generator (= packets the target sent; it received
as many). Payloads are the int32 bytes after the 10-byte header: 256 B is k=64, 1 KB k=256.

Quantizer. ``switchml._native``'s fused block quantizer (exponent scan, scale, round, byte
swap) and its dequantizer over SIZE bytes of float32, against numpy's implementation of
the same (``switchml.quantize``, vectorised over all blocks) and against a memcpy of the
same bytes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import format_size, machine_info, summarize, table
from switchml import quantize
from switchml.net import open_udp_socket
from switchml.pipeline import Replica, WorkerEntry

log = logging.getLogger(__name__)

TARGETS = ("native", "native-plain", "python", "echo-native", "echo-offload", "echo-python")
ECHOES = ("echo-native", "echo-offload")


@dataclass
class PpsConfig:
    """What ``switchml-bench pps`` runs; see ``benchmarks.cli`` for each option."""

    payloads: list[int] = field(default_factory=lambda: [256, 1024])
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    threads: list[int] = field(default_factory=lambda: [1])
    workers: int = 4
    window: int = 64
    duration: float = 3.0
    warmup: float = 0.5
    repeats: int = 3
    rto: float = 0.05
    batch: int = 64
    quantize_size: int = 25_000_000
    quantize_k: int = 1024
    quantize_repeats: int = 5


def _modules():
    """(the benchmark extension: load generator and echo, the worker extension: quantizer);
    the native switch data path itself is asked for by name (``dataplane="native"``)."""
    import importlib

    from emulation.native import switch_module
    from switchml.native import worker_module

    try:
        bench, why_bench = importlib.import_module("benchmarks._native_bench"), None
    except ImportError as exc:
        bench, why_bench = None, f"benchmarks._native_bench did not load ({exc}); rebuild with pip install -e ."
    sw, why_sw = switch_module()
    wk, why_wk = worker_module()
    if bench is None or sw is None or wk is None:
        raise RuntimeError(f"switchml-bench pps needs the native extensions: {why_bench or why_sw or why_wk}")
    return bench, wk


def _generate(module, socks: list[socket.socket], target: tuple[str, int], k: int, job: int, cfg: PpsConfig) -> dict:
    ip = int.from_bytes(socket.inet_aton(target[0]), "big")
    return module.load([s.fileno() for s in socks], ip, target[1], k, job, 0, cfg.window, cfg.warmup, cfg.duration,
                       cfg.rto, True)


def _worker_sockets(n: int) -> list[socket.socket]:
    socks = [open_udp_socket("127.0.0.1", 0) for _ in range(n)]
    for s in socks:
        s.setblocking(False)  # the generator polls
    return socks


def run_switch(dataplane: str, payload: int, threads: int, cfg: PpsConfig, offload: bool = True) -> dict[str, Any]:
    """One timed run against the software switch (offload: the native loop's UDP GSO/GRO)."""
    from emulation.server import SwitchServer
    from emulation.switch import SoftwareSwitch

    module, _ = _modules()
    k = payload // 4
    socks = _worker_sockets(cfg.workers)
    switch = SoftwareSwitch(pool_size=max(cfg.window, 64), dataplane=dataplane)
    job, mgid = 1, 1
    addrs = [s.getsockname() for s in socks]
    switch.set_multicast_group(mgid, [Replica(w + 1, w, "00:00:00:00:00:00", *a) for w, a in enumerate(addrs)])
    for w, a in enumerate(addrs):
        switch.add_admission(*a, WorkerEntry(*a, job, w, cfg.workers, mgid, 0, cfg.window))
    server = SwitchServer(switch, "127.0.0.1", 0, threads=threads, batch=cfg.batch, offload=offload).start()
    try:
        out = _generate(module, socks, server.address, k, job, cfg)
    finally:
        server.stop()
        for s in socks:
            s.close()
    out["switch_received"] = switch.read_counter("SwitchIngress.packets")[0]
    out["switch_drops"] = {r: v for r, v in switch.drops().items() if v}
    return out


def run_echo(kind: str, payload: int, cfg: PpsConfig) -> dict[str, Any]:
    """One timed run against a UDP echo (native: recvmmsg/sendmmsg; offload: and UDP GSO/GRO;
    python: recvfrom/sendto)."""
    module, _ = _modules()
    k = payload // 4
    socks = _worker_sockets(cfg.workers)
    echo = open_udp_socket("127.0.0.1", 0)
    stop_flag, stop = bytearray(1), threading.Event()

    def python_echo() -> None:
        echo.settimeout(0.1)
        buf = bytearray(65536)
        while not stop.is_set():
            try:
                n, src = echo.recvfrom_into(buf)
            except TimeoutError:
                continue
            echo.sendto(memoryview(buf)[:n], src)

    serve: Callable[[], Any] = python_echo if kind == "python" else (
        lambda: module.echo(echo.fileno(), cfg.batch, stop_flag, kind == "offload"))
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        out = _generate(module, socks, echo.getsockname(), k, 1, cfg)
    finally:
        stop.set()
        stop_flag[0] = 1
        thread.join(5)
        echo.close()
        for s in socks:
            s.close()
    return out


def measure_quantizer(cfg: PpsConfig) -> dict[str, Any]:
    """GB/s (of float32 input) of native and numpy quantize/dequantize, and of a memcpy."""
    _, native = _modules()
    k, n = cfg.quantize_k, 4
    elements = cfg.quantize_size // 4
    blocks = -(-elements // k)
    x = np.random.default_rng(0).standard_normal(blocks * k, dtype=np.float32)
    q = bytearray(blocks * k * 4)
    exps = np.empty(blocks, np.int8)
    back = np.empty_like(x)
    copy = np.empty_like(x)

    def numpy_quantize() -> None:
        b = x.reshape(blocks, k)
        e = quantize.block_exponents(b)
        f = np.ldexp(1.0, quantize.QUANT_BITS - quantize.sum_bits(n) - e.astype(np.int64))[:, None]
        numpy_state["q"] = np.rint(b.astype(np.float64) * f).astype(np.int32).astype(">i4")
        numpy_state["f"] = f

    def numpy_dequantize() -> None:
        numpy_state["back"] = (numpy_state["q"].astype(np.float64) / numpy_state["f"]).astype(np.float32)

    numpy_state: dict[str, Any] = {}
    kernels = {
        "native_quantize": lambda: native.quantize_blocks(x, k, n, q, exps),
        "native_dequantize": lambda: native.dequantize_blocks(q, k, n, exps, back),
        "memcpy": lambda: native.copy(x, copy),
        "numpy_copy": lambda: np.copyto(copy, x),
        "numpy_quantize": numpy_quantize,
        "numpy_dequantize": numpy_dequantize,
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(cfg.quantize_repeats + 1):  # the first round warms caches and page tables
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    assert np.array_equal(back, numpy_state["back"].reshape(-1)), "native and numpy round trips differ"
    result: dict[str, Any] = {"bytes": x.nbytes, "k": k, "workers": n, "seconds": {}, "gb_per_s": {}}
    for name, samples in times.items():
        stats = summarize(samples[1:])
        result["seconds"][name] = stats
        result["gb_per_s"][name] = x.nbytes / stats["median"] / 1e9
    med = {name: result["seconds"][name]["median"] for name in times}
    result["native_roundtrip_over_memcpy"] = (med["native_quantize"] + med["native_dequantize"]) / med["memcpy"]
    result["native_roundtrip_over_two_memcpy"] = (med["native_quantize"] + med["native_dequantize"]) / (2 * med["memcpy"])
    result["numpy_roundtrip_over_native"] = ((med["numpy_quantize"] + med["numpy_dequantize"])
                                             / (med["native_quantize"] + med["native_dequantize"]))
    return result


def run(cfg: PpsConfig, command: str) -> dict[str, Any]:
    """Every (target, payload[, threads]) ``repeats`` times, then the quantizer."""
    _modules()
    points = []
    for payload in cfg.payloads:
        if payload % 4 or payload // 4 not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"payload {payload} B: expected 4*k bytes with k in 32..4096, a power of two")
        for target in cfg.targets:
            for threads in (cfg.threads if target == "native" else [1]):
                runs = []
                for _ in range(cfg.repeats):
                    if target.startswith("echo-"):
                        runs.append(run_echo(target.split("-", 1)[1], payload, cfg))
                    else:
                        runs.append(run_switch(target.split("-")[0], payload, threads, cfg,
                                               offload=target != "native-plain"))
                rates = [r["replies"] / r["seconds"] for r in runs]
                point = {"target": target, "payload_bytes": payload, "k": payload // 4, "threads": threads,
                         "pps": summarize(rates), "runs": runs}
                log.info("%s %dB threads=%d: %.0f packets/s", target, payload, threads, point["pps"]["median"])
                points.append(point)
    doc: dict[str, Any] = {"command": command, "config": asdict(cfg), "machine": machine_info(), "points": points}
    for point in points:
        point["over_echo"] = {}
        for echo in (p for p in points if p["target"] in ECHOES and p["payload_bytes"] == point["payload_bytes"]):
            point["over_echo"][echo["target"]] = point["pps"]["median"] / echo["pps"]["median"]
    if cfg.quantize_size:
        doc["quantizer"] = measure_quantizer(cfg)
    return doc


def format_report(doc: dict[str, Any]) -> str:
    rows = [(p["target"], f"{p['payload_bytes']}B", p["threads"], p["pps"]["median"], p["pps"]["min"],
             p["pps"]["max"], *(p["over_echo"].get(e) for e in ECHOES)) for p in doc["points"]]
    text = table(["target", "payload", "threads", "packets/s (median)", "min", "max", *(f"/ {e}" for e in ECHOES)],
                 rows)
    if "quantizer" in doc:
        qz = doc["quantizer"]
        text += (f"\n\nquantizer over {format_size(qz['bytes'])} of float32 (k={qz['k']}, n={qz['workers']}), GB/s:\n"
                 + table(["kernel", "GB/s", "median s"], [(name, gbps, qz["seconds"][name]["median"])
                                                         for name, gbps in qz["gb_per_s"].items()])
                 + f"\nnative quantize+dequantize time / one memcpy's: {qz['native_roundtrip_over_memcpy']:.2f}"
                 f"   / two memcpy: {qz['native_roundtrip_over_two_memcpy']:.2f}"
                 f"   numpy / native: {qz['numpy_roundtrip_over_native']:.1f}x")
    return text


