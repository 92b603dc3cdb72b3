"""Fixtures of the conformance suite: every test runs once per switch target present.

``switch`` is module-scoped (a BMv2 start compiles the program and builds a namespace);
``env`` gives each test a freshly reset switch (pipeline pushed again over P4Runtime:
empty tables, zeroed counters and slots) and its own hosts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from switch_harness import Bmv2Harness, Env, Harness, SoftwareHarness, bmv2_unavailable

TARGETS = ["software", "bmv2"]


@pytest.fixture(scope="module", params=TARGETS)
def switch(request, tmp_path_factory) -> Iterator[Harness]:
    if request.param == "bmv2":
        reason = bmv2_unavailable()
        if reason:
            pytest.skip(f"BMv2: {reason}")
        harness: Harness = Bmv2Harness(tmp_path_factory.mktemp("bmv2"))
    else:
        harness = SoftwareHarness()
    yield harness
    harness.close()


@pytest.fixture
def env(switch: Harness) -> Iterator[Env]:
    switch.reset()
    e = Env(switch)
    yield e
    e.close()
