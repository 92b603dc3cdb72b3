"""Fixtures of the conformance suite: every test runs once per switch target present.

``switch`` is module-scoped (a BMv2 start compiles the program and builds a namespace);
``env`` gives each test a freshly reset switch (pipeline pushed again over P4Runtime:
empty tables, zeroed counters and slots) and its own hosts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from switch_harness import (
    Bmv2Harness,
    Env,
    Harness,
    SoftwareHarness,
    VethSoftwareHarness,
    bmv2_unavailable,
    netns_unavailable,
)

#: software: the software switch on loopback UDP; software-veth: the same switch behind the veth
#: pairs and raw-socket hosts of the BMv2 harness (checks that I/O); bmv2: simple_switch_grpc;
#: bmv2-leaf: simple_switch_grpc running the leaf role's build, which must keep every flat behaviour
#: (its leaf behaviour: test_leaf_conformance.py).
TARGETS = ["software", "software-veth", "bmv2", "bmv2-leaf"]


@pytest.fixture(scope="module", params=TARGETS)
def switch(request, tmp_path_factory) -> Iterator[Harness]:
    if request.param in ("bmv2", "bmv2-leaf"):
        reason = bmv2_unavailable()
        if reason:
            pytest.skip(f"BMv2: {reason}")
        leaf_role = request.param == "bmv2-leaf"
        harness: Harness = Bmv2Harness(tmp_path_factory.mktemp(request.param), leaf_role=leaf_role)
    elif request.param == "software-veth":
        reason = netns_unavailable()
        if reason:
            pytest.skip(f"software switch behind veth pairs: {reason}")
        harness = VethSoftwareHarness()
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
