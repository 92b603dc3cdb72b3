"""Fixtures shared by the tests: a software switch with its controller on loopback.

``make_switch`` (and every test that asks for ``dataplane``) runs once per data path:
``python`` (the reference) and ``native`` (the C extensions; skipped where they did not
build). The fixture sets ``$SWITCHML_DATAPLANE``, so workers in this process and in the
processes the test spawns use the same data path as the switch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from emulation import native as switch_native
from emulation.runner import SoftwareSwitchRunner
from switchml import defaults, native

DATAPLANES = ("python", "native")


@pytest.fixture(params=DATAPLANES)
def dataplane(request, monkeypatch) -> str:
    """The data path of this run of the test (see the module docstring)."""
    if request.param == "native" and (why_not := switch_native.why_missing()) is not None:
        pytest.skip(f"native data path not built: {why_not}")
    monkeypatch.setenv(native.ENV_VAR, request.param)
    return request.param


@pytest.fixture
def make_switch(dataplane: str) -> Iterator:
    """Factory: ``make_switch(drop_probability=..., window=..., k=..., ...)`` -> a running
    SoftwareSwitchRunner on free loopback ports; all are stopped after the test."""
    runners: list[SoftwareSwitchRunner] = []

    def factory(drop_probability: float = 0.0, pool_size: int = 1024, seed: int = 7, **options) -> SoftwareSwitchRunner:
        runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, pool_size, drop_probability, seed, dataplane=dataplane,
                                      **options)
        runners.append(runner)
        return runner

    yield factory
    for runner in runners:
        runner.stop()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


@pytest.fixture(autouse=True)
def _no_cluster_secret(monkeypatch):
    """Every test starts without a cluster secret in the environment and leaves none behind:
    a launcher run in-process puts its secret in ``os.environ`` for the ranks it starts, and a
    later test's workers would inherit it and fail the handshake with an open controller."""
    for name in (defaults.SECRET_ENV, defaults.SECRET_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
