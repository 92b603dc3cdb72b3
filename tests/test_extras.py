"""Optional dependencies stay optional: the core imports without them, and a missing extra is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from switchml.extras import MissingExtra, needs, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("ray", "open_clip", "scapy", "matplotlib", "grpc", "google.protobuf", "p4", "p4runtime_sh", "sklearn",
            "tqdm", "torchvision", "PIL")

# Prepended to code run in a fresh interpreter: the modules named fail to import, as if not installed.
BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in {blocked!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str, blocked: tuple[str, ...] = OPTIONAL) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked) + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_the_core_dependencies_are_the_cores():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for name in ("ray", "open_clip", "scapy", "matplotlib", "grpcio", "p4runtime", "scikit-learn", "torchvision"):
        assert name not in core
    extras = project["optional-dependencies"]
    assert {"p4", "train", "clip", "bench", "test", "all"} <= set(extras)
    assert "torch==2.14.1" in project["dependencies"] and "torchvision==0.29.1" in extras["train"]


def test_the_core_imports_and_runs_without_the_extras():
    proc = run_blocked("""
import numpy as np
import switchml, switchml.controller, switchml.hook, switchml.worker
import emulation.cli, emulation.runner, trainer.hook
from emulation.runner import SoftwareSwitchRunner
with SoftwareSwitchRunner("127.0.0.1", 0, 0) as runner:
    with switchml.Worker(runner.endpoint, "core", 0, 1) as w:
        assert w.allreduce(np.arange(100, dtype=np.int32)).tolist() == list(range(100))
print("ok")
""")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("code, extra", [
    ("import switchml.p4info", "p4"),
    ("import switchml.deploy", "p4"),
    ("import emulation.p4runtime_server", "p4"),
    ("from trainer.tasks.clip import build_model, ClipSpec; build_model(ClipSpec({}))", "clip"),
])
def test_a_missing_extra_is_named(code, extra):
    proc = run_blocked(code, ("open_clip",) if extra == "clip" else OPTIONAL)
    assert proc.returncode != 0 and f"pip install 'switchml[{extra}]'" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("command, extra", [
    ("from emulation.cli import main; sys.exit(main(['emulate', '--port', '0', '--control-port', '0', "
     "'--p4runtime-port', '0']))", "p4"),
    ("from trainer.cli import main; sys.exit(main(['digits']))", "train"),
    ("from benchmarks.cli import main; sys.exit(main(['pps']))", "bench"),
])
def test_commands_name_the_extra_they_miss(command, extra):
    proc = run_blocked(command)
    assert proc.returncode == 1 and f"[{extra}] extra" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_needs_and_require():
    with pytest.raises(MissingExtra, match=r"switchml\[clip\]") as info, needs("clip", "a task"):
        import switchml_no_such_module  # noqa: F401
    assert info.value.extra == "clip" and isinstance(info.value, ImportError)
    require("train", "x", "numpy")
    with pytest.raises(MissingExtra, match="'switchml_no_such_module' is not installed"):
        require("bench", "x", "switchml_no_such_module")
