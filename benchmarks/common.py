"""Helpers shared by the benchmarks: sizes, ports, statistics, machine info, JSON and tables."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from switchml.net import free_port
from switchml.pipeline import parse_drop_probability

__all__ = ["free_port", "parse_fraction"]  # re-exported: benchmarks import them from here

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "K": 10**3, "M": 10**6, "G": 10**9}
REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``25MB`` (10^6), ``4MiB`` (2^20), ``1KB``, ``1000``; case-insensitive."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return int(value)


def format_size(nbytes: float) -> str:
    """``25MB``, ``1.5KB``, ``300B`` (decimal units, as parse_size reads them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:g}{unit}"
    return f"{int(nbytes)}B"


#: A probability: ``0.01`` or ``1%`` (the one parser and check of a loss fraction).
parse_fraction = parse_drop_probability


def parse_list(text: str, convert: Any) -> list:
    """Comma-separated values, each through ``convert``."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty list")
    return [convert(t) for t in items]


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, max, quartiles and count of ``samples``."""
    a = np.asarray(samples, dtype=float)
    if a.size == 0:
        return {"n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "median": float(med), "min": float(a.min()), "max": float(a.max()),
            "q1": float(q1), "q3": float(q3), "mean": float(a.mean())}


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds (None if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # after the ")" of comm: field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The fields of /proc/stat's "cpu" line, in order (jiffies spent in each state, all cores).
_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_cpu_times() -> dict[str, int] | None:
    """This machine's CPU time by state since boot, all cores together (``/proc/stat``), or
    None where there is none. Every network namespace shares the kernel, so in Mininet this
    holds every host's processes and the kernel's packet processing (softirq) alike."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return dict(zip(_PROC_STAT_FIELDS, map(int, first[1:1 + len(_PROC_STAT_FIELDS)]), strict=True))


def host_cpu_share(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """Where the machine's CPU time went between two ``host_cpu_times()``: each state's share of
    all cores' time (``busy`` = 1 - idle - iowait: 1.0 means every core was busy throughout)."""
    if before is None or after is None:
        return None
    delta = {key: after[key] - before[key] for key in before}
    total = sum(delta.values())
    if total <= 0:
        return None
    share = {key: value / total for key, value in delta.items() if key in ("user", "system", "softirq", "steal")}
    share["busy"] = 1 - (delta["idle"] + delta["iowait"]) / total
    return share


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, kernel, Python, library versions, load, git commit."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
        info["rmem_max"] = int(open("/proc/sys/net/core/rmem_max").read())
    except OSError:
        pass
    for mod in ("numpy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
