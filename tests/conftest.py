"""Fixtures shared by the tests: a software switch with its controller on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from emulation.runner import SoftwareSwitchRunner


@pytest.fixture
def make_switch() -> Iterator:
    """Factory: ``make_switch(drop_probability=..., window=..., k=..., ...)`` -> a running
    SoftwareSwitchRunner on free loopback ports; all are stopped after the test."""
    runners: list[SoftwareSwitchRunner] = []

    def factory(drop_probability: float = 0.0, pool_size: int = 1024, seed: int = 7, **options) -> SoftwareSwitchRunner:
        runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, pool_size, drop_probability, seed, **options)
        runners.append(runner)
        return runner

    yield factory
    for runner in runners:
        runner.stop()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)
