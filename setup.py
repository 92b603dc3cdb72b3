"""Build of the optional native data paths; all metadata lives in pyproject.toml.

Three C extensions (sources in native/): ``switchml._native`` (worker engine loop and
quantizer), ``emulation._native_switch`` (the software switch's per-packet work) and
``benchmarks._native_bench`` (the load generator and UDP echo of ``switchml-bench pps``).
All are optional: where they do not build (no compiler, no Python headers, not Linux)
the install goes on without them and switchml uses its pure-Python data paths
(``switchml.native`` logs which one it uses).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

log = logging.getLogger("switchml.setup")

# -O3 vectorises the byte-swap, add and quantize loops; no -march: the build must run on
# any x86-64 (native/switchml_native.h adds AVX2 clones that are picked at load time).
# -fno-math-errno lets ldexp inline; no -ffast-math: the quantizer's rounding trick and
# its bit-exactness with numpy need IEEE arithmetic.
UNIX_FLAGS = ["-O3", "-std=gnu11", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
HEADERS = ["native/switchml_native.h"]


class OptionalBuildExt(build_ext):
    """build_ext that logs a failed extension and carries on: the package works without it."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for ext in self.extensions:
                ext.extra_compile_args = UNIX_FLAGS + list(ext.extra_compile_args or [])
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler at all lands here (DistutilsPlatformError)
            self._skipped("all native extensions", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, a missing header...
            self._skipped(ext.name, exc)

    @staticmethod
    def _skipped(what: str, exc: BaseException) -> None:
        message = (f"switchml: could not build {what} ({type(exc).__name__}: {exc}); "
                   "installing without it, switchml will use its pure-Python data path")
        log.warning(message)
        print(f"WARNING: {message}", file=sys.stderr)


class BuildPyWithP4(build_py):
    """build_py that also ships p4/ (programs and P4Info) as ``switchml/p4/`` in the package.

    A checkout or an editable install reads p4/ beside the package; an installed wheel has
    only the package, and ``switchml.p4info.p4_dir`` finds the copy there.
    """

    P4_SUFFIXES = (".p4", ".txtpb")

    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "p4"
        target = Path(self.build_lib) / "switchml" / "p4"
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix in self.P4_SUFFIXES:
                dest = target / path.relative_to(source)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


def extensions() -> list[Extension]:
    if not sys.platform.startswith("linux"):  # recvmmsg/sendmmsg are Linux calls
        return []
    return [
        Extension("switchml._native", ["native/worker.c"], depends=HEADERS, include_dirs=["native"],
                  libraries=["m"], optional=True),
        Extension("emulation._native_switch", ["native/switch.c"], depends=HEADERS, include_dirs=["native"],
                  libraries=["pthread"], optional=True),
        Extension("benchmarks._native_bench", ["native/bench.c"], depends=HEADERS, include_dirs=["native"],
                  optional=True),
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithP4})
