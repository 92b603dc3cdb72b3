"""p4runtime-shell, the P4Runtime community's own client, against the software switch's server.

p4runtime-shell keeps one global client per process and calls ``sys.exit(1)`` when it cannot
connect, so each session runs in a subprocess (this file's ``SESSION`` script); the server
and the switch run in the test process, where their state is checked directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from emulation.p4runtime_server import P4RuntimeServer
from emulation.switch import SoftwareSwitch
from switchml import pipeline
from switchml.p4info import default_p4info_path
from switchml.pipeline import WorkerEntry

SESSION = r'''
import json, sys
import p4runtime_sh.shell as sh
from p4runtime_sh.p4runtime import P4RuntimeWriteException

addr, device, mode, p4info, binary = sys.argv[1:6]
config = sh.FwdPipeConfig(p4info, binary) if mode == "push" else None
sh.setup(device_id=int(device), grpc_addr=addr, election_id=(0, 1), config=config, verbose=False)
out = {"api": sh.APIVersion()}

def admission(action, ip, port, **params):
    te = sh.TableEntry("SwitchIngress.admission")(action=action)
    te.match["hdr.ipv4.src_addr"] = ip
    te.match["hdr.udp.src_port"] = str(port)
    for name, value in params.items():
        te.action[name] = str(value)
    return te

try:
    if mode == "push":
        admission("SwitchIngress.set_worker", "10.0.0.1", 40001, job=3, worker_id=1, num_workers=2, mgid=4,
                  pool_base=8, pool_size=4).insert()
        admission("SwitchIngress.set_controller", "10.0.0.9", 9000).insert()
        sh.MulticastGroupEntry(4).add(1, 0).add(2, 1).insert()
        try:
            admission("SwitchIngress.set_controller", "10.0.0.9", 9000).insert()
        except P4RuntimeWriteException as exc:
            out["duplicate"] = str(exc)
    else:
        admission("SwitchIngress.set_worker", "10.0.0.1", 40001, job=5, worker_id=0, num_workers=2, mgid=4,
                  pool_base=8, pool_size=4).modify()
        admission("SwitchIngress.set_controller", "10.0.0.9", 9000).delete()
        sh.MulticastGroupEntry(4).add(3, 0).modify()
    out["admission"] = sorted(
        [[m.exact.value.hex() for m in e.msg().match], e.msg().action.action.action_id,
         [p.value.hex() for p in e.msg().action.action.params]]
        for e in sh.TableEntry("SwitchIngress.admission").read())
    out["groups"] = sorted([g.group_id, sorted([r.egress_port, r.instance] for r in g.replicas)]
                           for g in sh.MulticastGroupEntry().read())
    drops = sh.CounterEntry("SwitchIngress.drops")
    out["drops"] = [c.data.packet_count for c in drops.read()]
finally:
    sh.teardown()
print(json.dumps(out))
'''


@pytest.fixture
def server() -> Iterator[P4RuntimeServer]:
    srv = P4RuntimeServer(SoftwareSwitch(pool_size=1024), "127.0.0.1", 0, device_id=1).start()
    yield srv
    srv.stop()


def shell(server: P4RuntimeServer, mode: str, binary: str, device: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SESSION, server.grpc_address, str(device), mode,
                           str(default_p4info_path()), binary], capture_output=True, text=True, timeout=60)


def test_p4runtime_shell_programs_the_software_switch(server, tmp_path):
    switch = server.device.switch
    switch.process(b"x", ("10.0.0.7", 1))  # a drop before the push; the push zeroes the counters
    binary = tmp_path / "device_config.bin"
    binary.write_bytes(b"")  # the software switch takes no device config
    first = shell(server, "push", str(binary))
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["api"].startswith("1.")
    assert "ALREADY_EXISTS" in out["duplicate"]
    set_worker = server.device.p4info.action(pipeline.SET_WORKER_ACTION).id
    set_controller = server.device.p4info.action(pipeline.SET_CONTROLLER_ACTION).id
    assert out["admission"] == sorted([
        [["0a000001", "9c41"], set_worker, ["03", "01", "02", "0004", "0008", "0004"]],
        [["0a000009", "2328"], set_controller, []],
    ])
    assert out["groups"] == [[4, [[1, 0], [2, 1]]]]
    assert out["drops"] == [0] * pipeline.NUM_DROP_REASONS
    assert switch.admission_entries() == {
        ("10.0.0.1", 40001): WorkerEntry("10.0.0.1", 40001, 3, 1, 2, 4, 8, 4),
        ("10.0.0.9", 9000): None,
    }
    assert 4 in switch.multicast_groups()  # no egress rewrite yet: a group without addressed copies

    # a second session, without pushing a pipeline: it finds the state and changes it
    second = shell(server, "attach", "")
    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout.strip().splitlines()[-1])
    assert out["admission"] == [[["0a000001", "9c41"], set_worker, ["05", "00", "02", "0004", "0008", "0004"]]]
    assert out["groups"] == [[4, [[3, 0]]]]
    assert switch.admission_entries() == {("10.0.0.1", 40001): WorkerEntry("10.0.0.1", 40001, 5, 0, 2, 4, 8, 4)}


def test_p4runtime_shell_exits_when_it_names_another_device(server):
    proc = shell(server, "attach", "", device=7)
    assert proc.returncode == 1  # p4runtime-shell's sys.exit(1): why it runs in a subprocess
    assert "device 7 not found" in proc.stderr
