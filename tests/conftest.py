"""Fixtures shared by the tests: a software switch with its controller on loopback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from emulation.server import SwitchServer
from emulation.switch import SoftwareSwitch
from emulation.target import InProcessTarget
from switchml.controller import Controller, ControllerOptions


@dataclass
class SwitchEnv:
    """A running software switch (UDP, loopback) and its controller (ZeroMQ, loopback)."""

    switch: SoftwareSwitch
    server: SwitchServer
    controller: Controller

    @property
    def endpoint(self) -> str:
        return self.controller.endpoint

    def stop(self) -> None:
        self.controller.stop()
        self.server.stop()


@pytest.fixture
def make_switch() -> Iterator:
    """Factory: ``make_switch(drop_probability=..., window=..., k=..., ...)`` -> SwitchEnv."""
    envs: list[SwitchEnv] = []

    def factory(drop_probability: float = 0.0, pool_size: int = 1024, seed: int = 7, **options) -> SwitchEnv:
        switch = SoftwareSwitch(pool_size=pool_size, drop_probability=drop_probability, seed=seed)
        server = SwitchServer(switch, "127.0.0.1", 0).start()
        controller = Controller(InProcessTarget(switch), ControllerOptions(
            bind="tcp://127.0.0.1:0", switch_address=server.address, pool_size=pool_size, **options)).start()
        env = SwitchEnv(switch, server, controller)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.stop()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)
