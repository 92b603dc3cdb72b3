"""The software switch's P4Runtime server over real gRPC: status codes, arbitration, pipeline
config, reads; and the P4Runtime client's errors (``switchml.p4runtime_target``)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from p4.v1 import p4runtime_pb2

from emulation.p4runtime_server import P4RuntimeServer
from emulation.switch import SoftwareSwitch
from switchml import pipeline, protocol
from switchml.p4info import P4Info, encode_int, ip_to_int
from switchml.p4runtime_target import P4RuntimeConnection, P4RuntimeError, P4RuntimeTarget, P4RuntimeWriteError
from switchml.pipeline import Replica, WorkerEntry
from switchml.protocol import MsgType

Update = p4runtime_pb2.Update
INFO = P4Info.default()
ADMISSION = INFO.table(pipeline.ADMISSION_TABLE)
SET_WORKER = INFO.action(pipeline.SET_WORKER_ACTION)
SET_CONTROLLER = INFO.action(pipeline.SET_CONTROLLER_ACTION)
FORWARD = INFO.table(pipeline.FORWARD_TABLE)
SET_EGRESS = INFO.action(pipeline.SET_EGRESS_ACTION)


@pytest.fixture
def server() -> Iterator[P4RuntimeServer]:
    srv = P4RuntimeServer(SoftwareSwitch(pool_size=1024), "127.0.0.1", 0).start()
    yield srv
    srv.stop()


@pytest.fixture
def conns(server) -> Iterator:
    """Factory of connections to ``server``; all are closed after the test."""
    opened: list[P4RuntimeConnection] = []

    def connect(election_id: int = 1, **kw) -> P4RuntimeConnection:
        c = P4RuntimeConnection(server.grpc_address, election_id=election_id, timeout=5, **kw)
        opened.append(c)
        return c

    yield connect
    for c in opened:
        c.close()


def admission_entry(ip: str = "10.0.0.1", port: int = 4000, *, worker: dict | None = None,
                    action_id: int | None = None, raw_key: tuple[bytes, bytes] | None = None) -> p4runtime_pb2.Entity:
    te = p4runtime_pb2.TableEntry(table_id=ADMISSION.id)
    key = raw_key or (encode_int(ip_to_int(ip), 32), encode_int(port, 16))
    for f, value in zip(ADMISSION.match_fields, key, strict=True):
        te.match.add(field_id=f.id).exact.value = value
    params = {"job": 1, "worker_id": 0, "num_workers": 2, "mgid": 2, "pool_base": 0, "pool_size": 8} | (worker or {})
    te.action.action.action_id = action_id or SET_WORKER.id
    if te.action.action.action_id == SET_WORKER.id:
        for p in SET_WORKER.params:
            value = params[p.name]
            te.action.action.params.add(param_id=p.id, value=value if isinstance(value, bytes)
                                        else encode_int(value, p.bitwidth))
    return p4runtime_pb2.Entity(table_entry=te)


def group_entity(mgid: int, replicas=((1, 0), (2, 1))) -> p4runtime_pb2.Entity:
    e = p4runtime_pb2.Entity()
    g = e.packet_replication_engine_entry.multicast_group_entry
    g.multicast_group_id = mgid
    for port, rid in replicas:
        g.replicas.add(egress_port=port, instance=rid)
    return e


def write_codes(conn: P4RuntimeConnection, *updates: tuple[int, p4runtime_pb2.Entity]) -> list[int]:
    """Canonical code per update of one Write (all OK when the Write succeeds)."""
    try:
        conn.write([Update(type=t, entity=e) for t, e in updates])
    except P4RuntimeWriteError as exc:
        assert exc.code == grpc.StatusCode.UNKNOWN  # PI's batch error format
        codes = exc.codes()
        return [codes.get(i, code_pb2.OK) for i in range(len(updates))]
    return [code_pb2.OK] * len(updates)


def code_of(conn, kind: int, entity) -> str:
    return code_pb2.Code.Name(write_codes(conn, (kind, entity))[0])


# ------------------------------------------------------------------------ writes
def test_table_writes_answer_bmv2s_status_codes(server, conns):
    c = conns()
    e = admission_entry()
    assert code_of(c, Update.MODIFY, e) == "NOT_FOUND"
    assert code_of(c, Update.DELETE, e) == "NOT_FOUND"
    assert code_of(c, Update.INSERT, e) == "OK"
    assert code_of(c, Update.INSERT, e) == "ALREADY_EXISTS"
    assert code_of(c, Update.MODIFY, admission_entry(worker={"job": 9})) == "OK"
    assert server.device.switch.admission_entries()[("10.0.0.1", 4000)].job == 9
    assert code_of(c, Update.DELETE, e) == "OK"
    assert server.device.switch.admission_entries() == {}


@pytest.mark.parametrize("mutate, why", [
    (lambda te: setattr(te, "table_id", 12345), "unknown table id"),
    (lambda te: te.match.pop(), "missing exact field"),
    (lambda te: te.match.add(field_id=9).exact.__setattr__("value", b"\x01"), "unknown field id"),
    (lambda te: te.match[1].exact.__setattr__("value", b"\x01\x00\x00"), "3 bytes for a 16-bit field"),
    (lambda te: te.match[1].ClearField("exact") or te.match[1].lpm.__setattr__("value", b"\x01"), "wrong match kind"),
    (lambda te: setattr(te.action.action, "action_id", INFO.action(pipeline.SET_DESTINATION_ACTION).id),
     "action of another table"),
    (lambda te: setattr(te.action.action, "action_id", 999), "unknown action id"),
    (lambda te: te.action.action.params.pop(), "missing parameter"),
    (lambda te: setattr(te.action.action.params[2], "value", b"\x40"), "num_workers 64 in 6 bits"),
    (lambda te: setattr(te.action.action.params[0], "param_id", 77), "unknown parameter id"),
    (lambda te: setattr(te, "priority", 10), "priority on an exact table"),
    (lambda te: setattr(te.action.action.params[1], "value", b"\x05"), "worker_id >= num_workers (switch refuses)"),
])
def test_invalid_table_entries_are_invalid_argument_and_change_nothing(server, conns, mutate, why):
    entity = admission_entry()
    mutate(entity.table_entry)
    assert code_of(conns(), Update.INSERT, entity) == "INVALID_ARGUMENT", why
    assert server.device.switch.admission_entries() == {}


def test_default_only_and_const_default_actions_are_refused(conns):
    c = conns()
    no_action = INFO.action("NoAction").id
    assert code_of(c, Update.INSERT, admission_entry(action_id=no_action)) == "INVALID_ARGUMENT"
    default = p4runtime_pb2.TableEntry(table_id=ADMISSION.id, is_default_action=True)
    default.action.action.action_id = SET_CONTROLLER.id
    assert code_of(c, Update.MODIFY, p4runtime_pb2.Entity(table_entry=default)) == "PERMISSION_DENIED"
    assert code_of(c, Update.INSERT, p4runtime_pb2.Entity(table_entry=default)) == "INVALID_ARGUMENT"


def test_canonical_and_padded_bytestrings_are_the_same_entry(server, conns):
    c = conns()
    # 10.0.0.1 port 80: canonical form drops leading zero bytes
    assert code_of(c, Update.INSERT, admission_entry(raw_key=(b"\x0a\x00\x00\x01", b"\x50"))) == "OK"
    assert code_of(c, Update.INSERT, admission_entry(raw_key=(b"\x0a\x00\x00\x01", b"\x00\x50"))) == "ALREADY_EXISTS"
    read = c.read([p4runtime_pb2.Entity(table_entry=p4runtime_pb2.TableEntry(table_id=ADMISSION.id))])
    assert [m.exact.value for m in read[0].table_entry.match] == [b"\x0a\x00\x00\x01", b"\x00\x50"]  # padded
    assert ("10.0.0.1", 80) in server.device.switch.admission_entries()


def test_lpm_entries_are_validated(conns):
    c = conns()

    def forward(value: int, prefix: int) -> p4runtime_pb2.Entity:
        te = p4runtime_pb2.TableEntry(table_id=FORWARD.id)
        m = te.match.add(field_id=FORWARD.match_fields[0].id)
        m.lpm.value, m.lpm.prefix_len = encode_int(value, 32), prefix
        te.action.action.action_id = SET_EGRESS.id
        te.action.action.params.add(param_id=SET_EGRESS.param("port").id, value=encode_int(3, 9))
        te.action.action.params.add(param_id=SET_EGRESS.param("mac").id, value=encode_int(1, 48))
        return p4runtime_pb2.Entity(table_entry=te)

    assert code_of(c, Update.INSERT, forward(ip_to_int("10.0.0.0"), 24)) == "OK"
    assert code_of(c, Update.INSERT, forward(ip_to_int("10.0.0.1"), 24)) == "INVALID_ARGUMENT"  # host bits set
    assert code_of(c, Update.INSERT, forward(0, 0)) == "INVALID_ARGUMENT"  # omit the field instead
    assert code_of(c, Update.INSERT, forward(ip_to_int("10.0.0.0"), 33)) == "INVALID_ARGUMENT"


def test_a_batch_continues_on_error_and_reports_each_update(server, conns):
    c = conns()
    assert write_codes(c, (Update.INSERT, admission_entry(port=1)), (Update.INSERT, admission_entry(port=1)),
                       (Update.DELETE, admission_entry(port=2)), (Update.INSERT, admission_entry(port=3))) == [
        code_pb2.OK, code_pb2.ALREADY_EXISTS, code_pb2.NOT_FOUND, code_pb2.OK]
    assert set(server.device.switch.admission_entries()) == {("10.0.0.1", 1), ("10.0.0.1", 3)}


def test_multicast_group_writes(server, conns):
    c = conns()
    assert code_of(c, Update.MODIFY, group_entity(5)) == "NOT_FOUND"
    assert code_of(c, Update.INSERT, group_entity(5)) == "OK"
    assert code_of(c, Update.INSERT, group_entity(5)) == "ALREADY_EXISTS"
    assert code_of(c, Update.INSERT, group_entity(0)) == "INVALID_ARGUMENT"
    assert code_of(c, Update.INSERT, group_entity(6, ((1, 0), (1, 0)))) == "INVALID_ARGUMENT"
    assert code_of(c, Update.INSERT, group_entity(6, ((600, 0),))) == "INVALID_ARGUMENT"  # ports are 9 bits
    assert code_of(c, Update.MODIFY, group_entity(5, ((3, 0),))) == "OK"
    read = c.read([group_entity(0)])
    assert [(g.packet_replication_engine_entry.multicast_group_entry.multicast_group_id,
             [(r.egress_port, r.instance) for r in g.packet_replication_engine_entry.multicast_group_entry.replicas])
            for g in read] == [(5, [(3, 0)])]
    assert code_of(c, Update.DELETE, group_entity(5)) == "OK"
    assert code_of(c, Update.DELETE, group_entity(5)) == "NOT_FOUND"
    with pytest.raises(P4RuntimeError) as exc:
        c.read([group_entity(5)])
    assert exc.value.code == grpc.StatusCode.NOT_FOUND


def test_multicast_copies_need_both_the_group_and_the_egress_rewrite(server, conns):
    target = P4RuntimeTarget(server.grpc_address, timeout=5)
    try:
        replicas = [Replica(4, 0, "02:00:00:00:00:04", "127.0.0.1", 7000),
                    Replica(5, 1, "02:00:00:00:00:05", "127.0.0.1", 7001)]
        target.set_multicast_group(3, replicas)
        assert server.device.switch.multicast_groups() == {3: replicas}
        # deleting one rewrite leaves that copy without an address: the switch drops it
        rewrite = INFO.table(pipeline.EGRESS_REWRITE_TABLE)
        te = p4runtime_pb2.TableEntry(table_id=rewrite.id)
        te.match.add(field_id=rewrite.match_fields[0].id).exact.value = encode_int(3, 16)
        te.match.add(field_id=rewrite.match_fields[1].id).exact.value = encode_int(1, 16)
        target.connection.write([Update(type=Update.DELETE, entity=p4runtime_pb2.Entity(table_entry=te))])
        assert server.device.switch.multicast_groups() == {3: replicas[:1]}
        target.delete_multicast_group(3, replicas)
        assert server.device.switch.multicast_groups() == {}
        assert target.read_table(pipeline.EGRESS_REWRITE_TABLE) == []
    finally:
        target.close()


def test_register_writes_are_unimplemented_like_bmv2(conns):
    reg = INFO.register("SwitchIngress.bookkeeping.seen")
    entity = p4runtime_pb2.Entity(register_entry=p4runtime_pb2.RegisterEntry(register_id=reg.id))
    entity.register_entry.index.index = 3
    entity.register_entry.data.bitstring = encode_int(0, 32)
    assert code_of(conns(), Update.MODIFY, entity) == "UNIMPLEMENTED"


def test_counter_writes_set_a_cell(server, conns):
    c = conns()
    drops = INFO.counter(pipeline.DROPS_COUNTER)
    entry = p4runtime_pb2.CounterEntry(counter_id=drops.id)
    entry.index.index = 4
    entry.data.packet_count = 17
    assert code_of(c, Update.MODIFY, p4runtime_pb2.Entity(counter_entry=entry)) == "OK"
    assert server.device.switch.read_counter(pipeline.DROPS_COUNTER)[4] == 17
    entry.index.index = drops.size
    assert code_of(c, Update.MODIFY, p4runtime_pb2.Entity(counter_entry=entry)) == "OUT_OF_RANGE"


# ------------------------------------------------------------------------ reads
def test_reads_of_counters_registers_and_tables(server, conns):
    switch = server.device.switch
    target = P4RuntimeTarget(server.grpc_address, timeout=5)
    try:
        target.set_multicast_group(2, [Replica(1, 0, "02:00:00:00:00:01", "127.0.0.1", 7000),
                                       Replica(2, 1, "02:00:00:00:00:02", "127.0.0.1", 7001)])
        for w in range(2):
            target.add_worker(WorkerEntry("127.0.0.1", 7000 + w, 1, w, 2, 2, 8, 4))
        packet = protocol.encode_packet(MsgType.UPDATE, 1, 5, 9, 1, -4, np.arange(64, dtype=np.int32) - 3)
        switch.process(packet, ("127.0.0.1", 7000))
        switch.process(b"xx", ("127.0.0.1", 7000))
        drops = target.read_counter(pipeline.DROPS_COUNTER)
        assert drops[pipeline.DropReason.MALFORMED] == 1 and len(drops) == pipeline.NUM_DROP_REASONS
        assert target.read_counter(pipeline.PACKETS_COUNTER) == [2, 1, 0]
        # one index
        counter = INFO.counter(pipeline.PACKETS_COUNTER)
        one = p4runtime_pb2.Entity(counter_entry=p4runtime_pb2.CounterEntry(counter_id=counter.id))
        one.counter_entry.index.index = 1
        assert [e.counter_entry.data.packet_count for e in target.connection.read([one])] == [1]
        one.counter_entry.index.index = counter.size
        with pytest.raises(P4RuntimeError) as exc:
            target.connection.read([one])
        assert exc.value.code == grpc.StatusCode.OUT_OF_RANGE
        bad = p4runtime_pb2.Entity(counter_entry=p4runtime_pb2.CounterEntry(counter_id=42))
        with pytest.raises(P4RuntimeError) as exc:
            target.connection.read([bad])
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # registers: slot 9, set 1 -> index 1024 + 9
        def register(name: str, index: int) -> int:
            reg = INFO.register(name)
            e = p4runtime_pb2.Entity(register_entry=p4runtime_pb2.RegisterEntry(register_id=reg.id))
            e.register_entry.index.index = index
            (entity,) = target.connection.read([e])
            return int.from_bytes(entity.register_entry.data.bitstring, "big")
        index = 1024 + 9
        assert register("SwitchIngress.bookkeeping.seen", index) == 0b01
        assert register("SwitchIngress.bookkeeping.contributions", index) == 1
        assert register("SwitchIngress.bookkeeping.max_exponent", index) == (-4) & 0xFF
        assert register("SwitchIngress.values.value_00", index) == (-3) & 0xFFFFFFFF
        assert register("SwitchIngress.values.value_63", index) == 60
        assert register("SwitchIngress.bookkeeping.seen", 9) == 0  # set 0 untouched
        # tables, filtered by key
        assert [e["params"]["worker_id"] for e in target.read_table(pipeline.ADMISSION_TABLE)] == [0, 1]
        filtered = admission_entry("127.0.0.1", 7001)
        filtered.table_entry.ClearField("action")
        (entity,) = target.connection.read([filtered])
        assert entity.table_entry.action.action.params[1].value == encode_int(1, 5)
        assert target.read_multicast_groups() == {2: [(1, 0), (2, 1)]}
    finally:
        target.close()


def test_capabilities_and_wrong_device_ids(server, conns):
    c = conns()
    assert c.capabilities().startswith("1.")
    request = p4runtime_pb2.ReadRequest(device_id=3, entities=[group_entity(0)])
    with pytest.raises(grpc.RpcError) as exc:
        list(c.stub.Read(request, timeout=5))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(P4RuntimeError) as exc2:
        conns(election_id=9, device_id=3)  # arbitration for a device this server is not
    assert exc2.value.code == grpc.StatusCode.NOT_FOUND and "device 3" in str(exc2.value)


# ------------------------------------------------------------------------ arbitration
def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_highest_election_id_is_primary_and_only_the_primary_writes(server, conns):
    a = conns(election_id=10)
    assert a.is_primary
    with pytest.raises(P4RuntimeError) as exc:
        P4RuntimeTarget(server.grpc_address, election_id=5, timeout=5)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "election id 10" in str(exc.value) and "not primary" in str(exc.value)
    b = conns(election_id=5, require_primary=False)
    assert not b.is_primary and b.primary_election_id == 10
    with pytest.raises(P4RuntimeError) as denied:
        b.write([Update(type=Update.INSERT, entity=admission_entry())])
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert b.read([group_entity(0)]) == []  # a backup may read
    # a higher election id takes over; the old primary is told and loses write access
    c = conns(election_id=20)
    assert c.is_primary and wait_for(lambda: not a.is_primary and a.primary_election_id == 20)
    with pytest.raises(P4RuntimeError) as denied:
        a.write([Update(type=Update.INSERT, entity=admission_entry())])
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    c.write([Update(type=Update.INSERT, entity=admission_entry())])
    # when the primary leaves, the next highest becomes primary again
    c.close()
    assert wait_for(lambda: a.is_primary and a.primary_election_id == 10)
    assert not b.is_primary
    a.write([Update(type=Update.DELETE, entity=admission_entry())])


def test_a_duplicate_election_id_is_refused(server, conns):
    conns(election_id=7)
    with pytest.raises(P4RuntimeError) as exc:
        conns(election_id=7)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and "Election id already exists" in str(exc.value)


def test_requests_need_the_primarys_election_id(server, conns):
    c = conns(election_id=3)
    request = p4runtime_pb2.WriteRequest(device_id=0, updates=[Update(type=Update.INSERT, entity=admission_entry())])
    request.election_id.low = 2
    with pytest.raises(grpc.RpcError) as exc:
        c.stub.Write(request, timeout=5)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_server_is_a_clear_error():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # a port nobody listens on
    start = time.monotonic()
    with pytest.raises(P4RuntimeError) as exc:
        P4RuntimeTarget(address, timeout=1)
    assert time.monotonic() - start < 5
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE and address in str(exc.value)


def test_the_target_does_arbitration_again_after_a_switch_restart():
    switch = SoftwareSwitch(pool_size=64)
    first = P4RuntimeServer(switch, "127.0.0.1", 0).start()
    port = first.port
    target = P4RuntimeTarget(first.grpc_address, timeout=5)
    try:
        target.add_controller("10.0.0.9", 9000)
        first.stop()  # the switch restarts: its stream and this client's mastership are gone
        assert wait_for(lambda: not target.connection.is_primary)
        second = P4RuntimeServer(switch, "127.0.0.1", port).start()
        try:
            target.add_worker(WorkerEntry("10.0.0.1", 4000, 1, 0, 1, 1, 0, 4))
            assert target.connection.is_primary
            assert second.device.switch.admission_entries()[("10.0.0.1", 4000)].job == 1
        finally:
            target.close()
            second.stop()
    finally:
        target.close()


def test_a_taken_port_is_an_error(server):
    with pytest.raises(OSError, match="taken"):
        P4RuntimeServer(SoftwareSwitch(pool_size=8), "127.0.0.1", server.port)


# ------------------------------------------------------------------------ pipeline config
def test_pipeline_push_clears_state_and_a_different_p4info_is_refused(server, conns):
    c = conns()
    c.write([Update(type=Update.INSERT, entity=admission_entry())])
    P4Action = p4runtime_pb2.SetForwardingPipelineConfigRequest
    c.set_pipeline(INFO.message, b"any device config", action=P4Action.VERIFY)
    assert server.device.switch.admission_entries()  # VERIFY changes nothing
    c.set_pipeline(INFO.message, b"", action=P4Action.RECONCILE_AND_COMMIT, cookie=7)
    assert server.device.switch.admission_entries()  # RECONCILE keeps state
    assert c.get_pipeline().cookie.cookie == 7
    c.set_pipeline(INFO.message, b"{}", cookie=8)  # VERIFY_AND_COMMIT: fresh state
    assert server.device.switch.admission_entries() == {}
    assert c.read([p4runtime_pb2.Entity(table_entry=p4runtime_pb2.TableEntry(table_id=ADMISSION.id))]) == []
    config = c.get_pipeline()
    assert config.p4info == INFO.message and config.p4_device_config == b"{}" and config.cookie.cookie == 8

    other = p4runtime_pb2.ForwardingPipelineConfig().p4info
    other.CopyFrom(INFO.message)
    for t in other.tables:
        if t.preamble.name == pipeline.ADMISSION_TABLE:
            t.match_fields[1].bitwidth = 32
    with pytest.raises(P4RuntimeError) as exc:
        c.set_pipeline(other)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and pipeline.ADMISSION_TABLE in str(exc.value)
    with pytest.raises(P4RuntimeError) as exc:
        c.set_pipeline(INFO.message, action=P4Action.COMMIT)
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    c.set_pipeline(INFO.message, action=P4Action.VERIFY_AND_SAVE)
    c.set_pipeline(INFO.message, action=P4Action.COMMIT)
    with pytest.raises(P4RuntimeError) as exc:
        c.set_pipeline(INFO.message, action=P4Action.UNSPECIFIED)
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_backup_cannot_push_a_pipeline(conns):
    conns(election_id=2)
    backup = conns(election_id=1, require_primary=False)
    with pytest.raises(P4RuntimeError) as exc:
        backup.set_pipeline(INFO.message)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("p4runtime_port, with_controller", [(None, True), (0, True), (0, False)])
def test_emulated_loss_is_programmed_through_the_loss_tables_default_entry(p4runtime_port, with_controller):
    """``switchml-switch emulate --drop-probability``: in-process, through P4Runtime, and with
    --no-controller, the loss is the loss table's default entry, programmed as a controller
    programs any entry (so a P4Runtime read shows it)."""
    from emulation.runner import SoftwareSwitchRunner

    runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, drop_probability=0.25, seed=1, p4runtime_port=p4runtime_port,
                                  with_controller=with_controller)
    try:
        assert runner.switch.loss_entries() == {None: 0.25}
        if runner.p4runtime is not None:
            monitor = P4RuntimeConnection(runner.p4runtime.grpc_address, election_id=0, timeout=5,
                                          require_primary=False)
            try:
                query = p4runtime_pb2.TableEntry(table_id=INFO.table(pipeline.LOSS_TABLE).id, is_default_action=True)
                (entity,) = monitor.read([p4runtime_pb2.Entity(table_entry=query)])
            finally:
                monitor.close()
            action = entity.table_entry.action.action
            assert action.action_id == INFO.action(pipeline.SET_DROP_PROBABILITY_ACTION).id
            assert int.from_bytes(action.params[0].value, "big") == pipeline.DROP_PROBABILITY_SCALE // 4
    finally:
        runner.stop()
