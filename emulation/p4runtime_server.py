"""The software switch's P4Runtime server: the subset of P4Runtime the controller uses.

It serves one ``SoftwareSwitch`` as one P4Runtime device, from the same P4Info as the P4
programs (``p4/switchml_v1model.p4info.txtpb``), so that ``switchml.p4runtime_target``
programs it exactly as it programs BMv2 or Tofino:

- StreamChannel arbitration as BMv2's PI server does it: the connected client with the
  highest election id is primary; every client learns the primary's id (OK for the primary,
  ALREADY_EXISTS for backups); a duplicate election id ends that stream with
  INVALID_ARGUMENT; Write and SetForwardingPipelineConfig need the primary's election id
  (PERMISSION_DENIED otherwise). Roles are not supported.
- SetForwardingPipelineConfig / GetForwardingPipelineConfig: the switch starts with its
  pipeline loaded (a client may skip the push); a pushed P4Info must match the served one
  by table, match-field, action, parameter and counter names and widths (INVALID_ARGUMENT
  otherwise). VERIFY_AND_COMMIT empties tables and zeroes counters and slots, as loading a
  program on a P4 switch does; RECONCILE_AND_COMMIT keeps them. The device config bytes
  (BMv2 JSON, ...) are accepted and ignored.
- Write: INSERT / MODIFY / DELETE of admission, egress_rewrite, loss and forward entries
  (and upstream entries, where the served P4Info has the leaf role's table:
  ``switchml.p4info.with_leaf_role``, docs/hierarchy.md) and of multicast groups, validated like PI (BMv2) does: ids, match fields, match types, action
  ids and scopes, parameter ids and widths (INVALID_ARGUMENT), duplicates (ALREADY_EXISTS),
  missing entries (NOT_FOUND). A failed batch answers UNKNOWN with one ``p4.v1.Error`` per
  update in the status details, as PI does. Forward entries are held and read back but do
  nothing: the software switch is a UDP endpoint and forwards no other traffic.
  Counter MODIFY/DELETE set or zero a cell.
- Read: table entries, counters (by id, one index or all), multicast groups, and registers
  (see below).

Registers: BMv2 answers UNIMPLEMENTED to every register read and write. This server answers
register *reads* from the slot state (``seen``, ``contributions``, ``max_exponent``, the leaf
role's ``has_result`` and the first 64 elements as ``value_00`` .. ``value_63``, index = set *
POOL_SIZE + slot), because
they are what one wants to see when debugging a slot; register *writes* are UNIMPLEMENTED
as on BMv2, so the controller keeps clearing slots with RESET packets in the data plane and
a controller that works here works on BMv2.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from emulation.switch import SoftwareSwitch
from switchml import defaults, pipeline
from switchml.errors import LeafRoleUnsupported
from switchml.extras import needs
from switchml.p4info import (
    EXACT,
    LPM,
    P4Info,
    TableInfo,
    decode_int,
    encode_int,
    has_leaf_role,
    int_to_ip,
    int_to_mac,
    upstream_entry,
)
from switchml.pipeline import Replica, WorkerEntry
from switchml.security import TLSFiles, is_local_endpoint

with needs("p4", "the software switch's P4Runtime server (emulation.p4runtime_server)"):
    import grpc
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, status_pb2
    from p4.v1 import p4data_pb2, p4runtime_pb2, p4runtime_pb2_grpc

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  #: StreamChannel clients per device (PI's limit)
_EXTRA_WORKERS = 8  # threads for unary calls beyond one per open stream
_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}
_REGISTER_VALUE = re.compile(r"value_(\d+)$")
Update = p4runtime_pb2.Update
PipelineAction = p4runtime_pb2.SetForwardingPipelineConfigRequest
ResponseType = p4runtime_pb2.GetForwardingPipelineConfigRequest


class _P4Error(Exception):
    """An error to answer with a google.rpc code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> _P4Error:
    return _P4Error(code_pb2.INVALID_ARGUMENT, message)


class _RpcStatus(collections.namedtuple("_RpcStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    """A grpc.Status with binary details (what grpcio-status would build)."""


def _api_version() -> str:
    try:
        return metadata.version("p4runtime")
    except metadata.PackageNotFoundError:
        return "1.4.0"


def _from_uint128(value: p4runtime_pb2.Uint128) -> int:
    return (value.high << 64) | value.low


def _uint128(value: int) -> p4runtime_pb2.Uint128:
    return p4runtime_pb2.Uint128(high=value >> 64, low=value & ((1 << 64) - 1))


_END = object()  # ends a stream's response generator


@dataclass(eq=False)
class _Connection:
    """One StreamChannel."""

    peer: str
    out: queue.Queue = field(default_factory=queue.Queue)
    election_id: int | None = None  # None until its first arbitration message
    serial: int = field(default_factory=itertools.count().__next__)


class _Device:
    """The P4Runtime state of one software switch; every method holds the device lock."""

    def __init__(self, switch: SoftwareSwitch, device_id: int, p4info: P4Info) -> None:
        self.switch = switch
        self.device_id = device_id
        self.served = p4info  # the contract this switch implements
        self.p4info = p4info  # the committed pipeline's P4Info (served, or an equivalent pushed one)
        self.device_config = b""
        self.cookie: int | None = None
        self.writes = 0  #: Write RPCs accepted (for tests and logs)
        self._saved: tuple[P4Info, p4runtime_pb2.ForwardingPipelineConfig] | None = None
        self._lock = threading.RLock()
        self._connections: list[_Connection] = []
        self._tables: dict[str, dict[tuple, p4runtime_pb2.TableEntry]] = {}
        self._defaults: dict[str, p4runtime_pb2.TableEntry] = {}
        self._groups: dict[int, list[tuple[int, int]]] = {}  # mgid -> [(egress port, instance)]
        self._rewrites: dict[tuple[int, int], tuple[str, str, int]] = {}  # (mgid, rid) -> (mac, ip, udp port)

    # ------------------------------------------------------------ arbitration
    def _primary(self) -> _Connection | None:
        return max(self._connections, key=lambda c: c.election_id, default=None)

    def _notify(self, conn: _Connection) -> None:
        primary = self._primary()
        response = p4runtime_pb2.StreamMessageResponse()
        arbitration = response.arbitration
        arbitration.device_id = self.device_id
        if primary is not None:
            arbitration.election_id.CopyFrom(_uint128(primary.election_id))
        if conn is primary:
            arbitration.status.code, arbitration.status.message = code_pb2.OK, "Is primary"
        else:
            arbitration.status.code, arbitration.status.message = code_pb2.ALREADY_EXISTS, "Is backup"
        conn.out.put(response)

    def arbitrate(self, conn: _Connection, update: p4runtime_pb2.MasterArbitrationUpdate) -> _P4Error | None:
        """Handle a MasterArbitrationUpdate; an error ends the stream."""
        with self._lock:
            if update.device_id != self.device_id:
                return _P4Error(code_pb2.NOT_FOUND if conn.election_id is None else code_pb2.FAILED_PRECONDITION,
                                f"device {update.device_id} not found: this software switch is device {self.device_id}")
            if update.HasField("role") and (update.role.name or update.role.id):
                return _P4Error(code_pb2.UNIMPLEMENTED, "roles are not supported by the software switch; "
                                                        "connect with the default role")
            election_id = _from_uint128(update.election_id)
            old_primary = self._primary()
            if any(c is not conn and c.election_id == election_id for c in self._connections):
                return _invalid("Election id already exists")
            if conn.election_id is None:
                if len(self._connections) >= MAX_CONNECTIONS:
                    return _P4Error(code_pb2.RESOURCE_EXHAUSTED, "Too many connections")
                self._connections.append(conn)
            conn.election_id = election_id
            primary = self._primary()
            log.info("P4Runtime client %s: election id %d, %s", conn.peer, election_id,
                     "primary" if conn is primary else f"backup (primary: {primary.election_id})")
            for c in (self._connections if primary is not old_primary else [conn]):
                self._notify(c)
            return None

    def disconnect(self, conn: _Connection) -> None:
        with self._lock:
            if conn not in self._connections:
                return
            was_primary = conn is self._primary()
            self._connections.remove(conn)
            log.info("P4Runtime client %s disconnected%s", conn.peer, " (was primary)" if was_primary else "")
            if was_primary:
                for c in self._connections:
                    self._notify(c)

    def check_access(self, device_id: int, request) -> _P4Error | None:
        """Write and SetForwardingPipelineConfig: only the primary (PI's rule: with no client
        connected, only requests without an election id are accepted)."""
        if device_id != self.device_id:
            return _P4Error(code_pb2.NOT_FOUND,
                            f"device {device_id} not found: this software switch is device {self.device_id}")
        with self._lock:
            has_id = request.HasField("election_id")
            primary = self._primary()
            if primary is None:
                if has_id:
                    return _P4Error(code_pb2.PERMISSION_DENIED,
                                    "Not primary: no client has done arbitration on a StreamChannel")
                return None
            election_id = _from_uint128(request.election_id) if has_id else None
            if election_id != primary.election_id:
                return _P4Error(code_pb2.PERMISSION_DENIED, f"Not primary: the primary's election id is "
                                                            f"{primary.election_id}, this request has {election_id}")
            return None

    # ------------------------------------------------------------ pipeline
    def set_pipeline(self, request: p4runtime_pb2.SetForwardingPipelineConfigRequest) -> None:
        with self._lock:
            action = request.action
            if action == PipelineAction.UNSPECIFIED:
                raise _invalid("Invalid SetForwardingPipeline action")
            if action == PipelineAction.COMMIT:
                if self._saved is None:
                    raise _P4Error(code_pb2.FAILED_PRECONDITION, "COMMIT without a saved config: VERIFY_AND_SAVE first")
                pushed, config = self._saved
                self._saved = None
                self._commit(pushed, config, clear=True)
                return
            config = request.config
            if not config.HasField("p4info") or not config.p4info.tables:
                raise _invalid("the forwarding pipeline config has no P4Info")
            pushed = P4Info(config.p4info, "pushed P4Info")
            diffs = self.served.differences(pushed)
            if diffs:
                raise _invalid(f"the P4Info does not match the pipeline this software switch serves "
                               f"({self.served.source}): {'; '.join(diffs[:10])}")
            if action == PipelineAction.VERIFY:
                return
            if action == PipelineAction.VERIFY_AND_SAVE:
                self._saved = (pushed, config)
                return
            if action not in (PipelineAction.VERIFY_AND_COMMIT, PipelineAction.RECONCILE_AND_COMMIT):
                raise _invalid(f"unknown SetForwardingPipeline action {action}")
            self._commit(pushed, config, clear=action == PipelineAction.VERIFY_AND_COMMIT)

    def _commit(self, pushed: P4Info, config: p4runtime_pb2.ForwardingPipelineConfig, clear: bool) -> None:
        self.p4info = pushed
        self.device_config = config.p4_device_config
        self.cookie = config.cookie.cookie if config.HasField("cookie") else None
        if clear:
            self._tables.clear()
            self._defaults.clear()
            self._groups.clear()
            self._rewrites.clear()
            self.switch.clear()
        log.info("pipeline %s (%d-byte device config ignored)", "committed: tables, counters and slots cleared"
                 if clear else "reconciled: state kept", len(self.device_config))

    def get_pipeline(self, request: p4runtime_pb2.GetForwardingPipelineConfigRequest
                     ) -> p4runtime_pb2.ForwardingPipelineConfig:
        if request.device_id != self.device_id:
            raise _P4Error(code_pb2.NOT_FOUND,
                           f"device {request.device_id} not found: this software switch is device {self.device_id}")
        with self._lock:
            config = p4runtime_pb2.ForwardingPipelineConfig()
            kind = request.response_type
            if kind in (ResponseType.ALL, ResponseType.P4INFO_AND_COOKIE):
                config.p4info.CopyFrom(self.p4info.message)
            if kind in (ResponseType.ALL, ResponseType.DEVICE_CONFIG_AND_COOKIE):
                config.p4_device_config = self.device_config
            if self.cookie is not None:
                config.cookie.cookie = self.cookie
            return config

    # ------------------------------------------------------------ write
    def write(self, request: p4runtime_pb2.WriteRequest) -> list[tuple[int, str]]:
        """Apply every update (CONTINUE_ON_ERROR); (code, message) per update."""
        with self._lock:
            results = []
            touched: set[int] = set()
            for index, update in enumerate(request.updates):
                try:
                    self._apply(update, touched)
                    results.append((code_pb2.OK, ""))
                except _P4Error as exc:
                    log.debug("write: update %d refused: %s", index, exc.message)
                    results.append((exc.code, exc.message))
            for mgid in sorted(touched):
                self._sync_group(mgid)
            self.writes += 1
            return results

    def _apply(self, update: p4runtime_pb2.Update, touched: set[int]) -> None:
        if update.type not in (Update.INSERT, Update.MODIFY, Update.DELETE):
            raise _invalid(f"update type {update.type}: expected INSERT, MODIFY or DELETE")
        kind = update.entity.WhichOneof("entity")
        if kind == "table_entry":
            self._write_table(update.type, update.entity.table_entry, touched)
        elif kind == "packet_replication_engine_entry":
            self._write_pre(update.type, update.entity.packet_replication_engine_entry, touched)
        elif kind == "counter_entry":
            self._write_counter(update.type, update.entity.counter_entry)
        elif kind == "register_entry":
            raise _P4Error(code_pb2.UNIMPLEMENTED, "Register writes are not supported (as on BMv2): clear slots "
                                                   "with RESET packets")
        else:
            raise _P4Error(code_pb2.UNIMPLEMENTED, f"{kind} writes are not supported by the software switch")

    def _table(self, table_id: int) -> TableInfo:
        table = self.p4info.tables.get(table_id)
        if table is None:
            raise _invalid(f"Invalid P4 id {table_id}: not a table of the pipeline")
        return table

    @staticmethod
    def _int(data: bytes, bitwidth: int, what: str) -> int:
        try:
            return decode_int(data, bitwidth)
        except ValueError as exc:
            raise _invalid(f"Invalid bytestring format for {what}: {exc}") from None

    def _match_key(self, table: TableInfo, te: p4runtime_pb2.TableEntry) -> tuple:
        given: dict[int, p4runtime_pb2.FieldMatch] = {}
        for m in te.match:
            if table.match_field_by_id(m.field_id) is None:
                raise _invalid(f"Unknown field id {m.field_id} in the match key of {table.name}")
            if m.field_id in given:
                raise _invalid(f"Duplicate field id {m.field_id} in the match key of {table.name}")
            given[m.field_id] = m
        key: list = []
        for f in table.match_fields:
            m = given.get(f.id)
            what = f"match field {f.name} of {table.name}"
            if f.match_type == EXACT:
                if m is None:
                    raise _invalid(f"Missing non-ternary field {f.name} in the match key of {table.name}")
                if m.WhichOneof("field_match_type") != "exact":
                    raise _invalid(f"Invalid match type for {what}: the field is EXACT")
                key.append(self._int(m.exact.value, f.bitwidth, what))
            elif f.match_type == LPM:
                if m is None:
                    key.append((0, 0))
                    continue
                if m.WhichOneof("field_match_type") != "lpm":
                    raise _invalid(f"Invalid match type for {what}: the field is LPM")
                value, prefix = self._int(m.lpm.value, f.bitwidth, what), m.lpm.prefix_len
                if not 0 < prefix <= f.bitwidth:
                    raise _invalid(f"Invalid prefix length {prefix} for {what} (1..{f.bitwidth}; omit the field "
                                   "for a don't-care match)")
                if value & ((1 << (f.bitwidth - prefix)) - 1):
                    raise _invalid(f"Invalid LPM value for {what}, incorrect number of trailing zeros")
                key.append((value, prefix))
            else:
                raise _P4Error(code_pb2.UNIMPLEMENTED, f"match type {f.match_type_name} of {what}")
        if te.priority != 0:
            raise _invalid(f"Non-zero priority for non-ternary match in {table.name}")
        return tuple(key)

    def _action(self, table: TableInfo, te: p4runtime_pb2.TableEntry, default: bool):
        kind = te.action.WhichOneof("type")
        if kind is None:
            raise _invalid(f"{table.name}: the entry has no action")
        if kind != "action":
            raise _invalid(f"{table.name} is not an indirect table: {kind} is not allowed")
        a = te.action.action
        action = self.p4info.actions.get(a.action_id)
        if action is None:
            raise _invalid(f"Invalid P4 id {a.action_id}: not an action of the pipeline")
        if action.id not in table.action_ids:
            raise _invalid(f"Invalid action for table: {action.name} is not an action of {table.name}")
        if not default and action.id in table.default_only_action_ids:
            raise _invalid(f"Cannot use default-only action {action.name} in a match entry of {table.name}")
        if default and action.id in table.table_only_action_ids:
            raise _invalid(f"Cannot use table-only action {action.name} as the default action of {table.name}")
        params: dict[str, int] = {}
        for p in a.params:
            info = action.param_by_id(p.param_id)
            if info is None:
                raise _invalid(f"Unknown parameter id {p.param_id} for action {action.name}")
            if info.name in params:
                raise _invalid(f"Duplicate parameter {info.name} for action {action.name}")
            params[info.name] = self._int(p.value, info.bitwidth, f"parameter {info.name} of {action.name}")
        missing = [p.name for p in action.params if p.name not in params]
        if missing:
            raise _invalid(f"Missing parameter(s) {missing} for action {action.name}")
        return action, params

    def _normalized(self, table: TableInfo, key: tuple, action, params: dict[str, int] | None,
                    te: p4runtime_pb2.TableEntry) -> p4runtime_pb2.TableEntry:
        """The entry as it is read back: padded bytestrings, fields in P4Info order."""
        out = p4runtime_pb2.TableEntry(table_id=table.id, controller_metadata=te.controller_metadata,
                                       metadata=te.metadata)
        for f, k in zip(table.match_fields if key else (), key, strict=True):  # key (): the default entry
            if f.match_type == LPM:
                if k[1]:
                    m = out.match.add(field_id=f.id)
                    m.lpm.value, m.lpm.prefix_len = encode_int(k[0], f.bitwidth), k[1]
            else:
                out.match.add(field_id=f.id).exact.value = encode_int(k, f.bitwidth)
        if action is not None:
            out.action.action.action_id = action.id
            for p in action.params:
                out.action.action.params.add(param_id=p.id, value=encode_int(params[p.name], p.bitwidth))
        return out

    def _write_table(self, kind: int, te: p4runtime_pb2.TableEntry, touched: set[int]) -> None:
        table = self._table(te.table_id)
        if te.is_default_action:
            self._write_default(kind, table, te)
            return
        key = self._match_key(table, te)
        store = self._tables.setdefault(table.name, {})
        if kind == Update.DELETE:
            if key not in store:
                raise _P4Error(code_pb2.NOT_FOUND, f"Cannot find match entry {key} in {table.name}")
            self._unprogram(table.name, key, touched)
            del store[key]
            return
        action, params = self._action(table, te, default=False)
        if kind == Update.INSERT:
            if key in store:
                raise _P4Error(code_pb2.ALREADY_EXISTS,
                               f"Match entry exists in {table.name}, use MODIFY if you wish to change action")
            if len(store) >= table.size:
                raise _P4Error(code_pb2.RESOURCE_EXHAUSTED, f"{table.name} is full ({table.size} entries)")
        elif key not in store:
            raise _P4Error(code_pb2.NOT_FOUND, f"Cannot find match entry {key} in {table.name}")
        self._program(table.name, key, action.name, params, touched)
        store[key] = self._normalized(table, key, action, params, te)

    def _write_default(self, kind: int, table: TableInfo, te: p4runtime_pb2.TableEntry) -> None:
        if kind != Update.MODIFY:
            raise _invalid(f"the default entry of {table.name} can only be modified (MODIFY)")
        if te.match:
            raise _invalid("Non-empty key for default entry")
        if table.const_default_action_id:
            raise _P4Error(code_pb2.PERMISSION_DENIED, f"{table.name} has a const default action")
        action, params = self._action(table, te, default=True)
        if table.name == pipeline.LOSS_TABLE:
            threshold = params.get("threshold", 0)
            self.switch.set_drop_probability(None, min(threshold, pipeline.DROP_PROBABILITY_SCALE)
                                             / pipeline.DROP_PROBABILITY_SCALE)
        elif table.name == pipeline.EGRESS_REWRITE_TABLE and action.params:
            raise _P4Error(code_pb2.UNIMPLEMENTED, "the software switch drops every multicast copy that has no "
                                                   "egress_rewrite entry; its default action cannot address copies")
        entry = self._normalized(table, (), action, params, te)
        entry.match.clear()
        entry.is_default_action = True
        self._defaults[table.name] = entry

    def _program(self, table: str, key: tuple, action: str, params: dict[str, int], touched: set[int]) -> None:
        """Make the software switch do what the entry says."""
        if table == pipeline.ADMISSION_TABLE:
            ip, port = int_to_ip(key[0]), key[1]
            try:
                if action == pipeline.SET_CONTROLLER_ACTION:
                    self.switch.add_admission(ip, port, None)
                else:
                    self.switch.add_admission(ip, port, WorkerEntry(ip, port, **params))
            except (ValueError, TypeError) as exc:
                raise _invalid(f"{table} {ip}:{port}: {exc}") from None
        elif table == pipeline.EGRESS_REWRITE_TABLE:
            if action == pipeline.SET_DESTINATION_ACTION:
                self._rewrites[key] = (int_to_mac(params["mac"]), int_to_ip(params["ip"]), params["udp_port"])
            else:  # drop: the copy is not sent
                self._rewrites.pop(key, None)
            touched.add(key[0])
        elif table == pipeline.LOSS_TABLE:
            threshold = params.get("threshold", 0) if action == pipeline.SET_DROP_PROBABILITY_ACTION else 0
            # A threshold at or above 32768 drops every packet in the P4 programs, too.
            self.switch.set_drop_probability(key[0], min(threshold, pipeline.DROP_PROBABILITY_SCALE)
                                             / pipeline.DROP_PROBABILITY_SCALE)
        elif table == pipeline.UPSTREAM_TABLE:
            try:
                self.switch.add_upstream(upstream_entry(key[0], params))
            except (ValueError, TypeError) as exc:  # LeafRoleUnsupported is a ValueError
                raise _invalid(f"{table} job {key[0]}: {exc}") from None
        # FORWARD_TABLE: held for reads only (the software switch forwards no other traffic)

    def _unprogram(self, table: str, key: tuple, touched: set[int]) -> None:
        if table == pipeline.ADMISSION_TABLE:
            self.switch.remove_admission(int_to_ip(key[0]), key[1])
        elif table == pipeline.UPSTREAM_TABLE:
            self.switch.remove_upstream(key[0])
        elif table == pipeline.EGRESS_REWRITE_TABLE:
            self._rewrites.pop(key, None)
            touched.add(key[0])
        elif table == pipeline.LOSS_TABLE:
            self.switch.clear_drop_probability(key[0])

    def _write_pre(self, kind: int, pre: p4runtime_pb2.PacketReplicationEngineEntry, touched: set[int]) -> None:
        if pre.WhichOneof("type") != "multicast_group_entry":
            raise _P4Error(code_pb2.UNIMPLEMENTED, "clone sessions are not supported by the software switch")
        group = pre.multicast_group_entry
        mgid = group.multicast_group_id
        if not 0 < mgid < 1 << 16:
            raise _invalid(f"multicast group id {mgid}: expected 1..65535 (0 means no multicast)")
        replicas: list[tuple[int, int]] = []
        for r in group.replicas:
            if r.WhichOneof("port_kind") == "port":
                port = self._int(r.port, 32, f"replica port of multicast group {mgid}")
            else:
                port = r.egress_port
            if port >= 1 << 9 or r.instance >= 1 << 16:
                raise _invalid(f"multicast group {mgid}: replica (port {port}, instance {r.instance}) out of range "
                               "(ports are 9 bits, instances 16 bits)")
            if (port, r.instance) in replicas:
                raise _invalid("Duplicate replica in multicast group")
            replicas.append((port, r.instance))
        exists = mgid in self._groups
        if kind == Update.INSERT and exists:
            raise _P4Error(code_pb2.ALREADY_EXISTS, f"Multicast group {mgid} already exists")
        if kind != Update.INSERT and not exists:
            raise _P4Error(code_pb2.NOT_FOUND, f"Multicast group {mgid} does not exist")
        if kind == Update.DELETE:
            del self._groups[mgid]
        else:
            self._groups[mgid] = replicas
        touched.add(mgid)

    def _sync_group(self, mgid: int) -> None:
        """The software switch's group: each replica that has an egress rewrite (a copy
        without one is dropped by egress_rewrite's default action in the P4 programs)."""
        if mgid not in self._groups:
            self.switch.delete_multicast_group(mgid)
            return
        replicas = [Replica(port, rid, *self._rewrites[(mgid, rid)])
                    for port, rid in self._groups[mgid] if (mgid, rid) in self._rewrites]
        self.switch.set_multicast_group(mgid, replicas)

    def _counter(self, counter_id: int):
        counter = self.p4info.counters.get(counter_id)
        if counter is None:
            raise _invalid(f"Invalid P4 id {counter_id}: not a counter of the pipeline")
        if counter.name not in self.switch.counter_sizes:
            raise _P4Error(code_pb2.NOT_FOUND, f"the software switch has no counter {counter.name}")
        return counter

    def _write_counter(self, kind: int, ce: p4runtime_pb2.CounterEntry) -> None:
        counter = self._counter(ce.counter_id)
        if not ce.HasField("index"):
            raise _P4Error(code_pb2.UNIMPLEMENTED, "Wildcard write is not supported for indirect counters yet")
        index = ce.index.index
        if index < 0:
            raise _invalid("A negative number is not a valid index value")
        if index >= counter.size:
            raise _P4Error(code_pb2.OUT_OF_RANGE, f"index {index} of {counter.name} (size {counter.size})")
        if kind == Update.INSERT:
            raise _invalid("INSERT update type not supported for counters")
        if index < self.switch.counter_sizes[counter.name]:
            self.switch.set_counter(counter.name, index, ce.data.packet_count if kind == Update.MODIFY else 0)

    # ------------------------------------------------------------ read
    def read(self, request: p4runtime_pb2.ReadRequest) -> list[p4runtime_pb2.Entity]:
        if request.device_id != self.device_id:
            raise _P4Error(code_pb2.NOT_FOUND,
                           f"device {request.device_id} not found: this software switch is device {self.device_id}")
        out: list[p4runtime_pb2.Entity] = []
        with self._lock:
            for entity in request.entities:
                kind = entity.WhichOneof("entity")
                if kind == "table_entry":
                    self._read_tables(entity.table_entry, out)
                elif kind == "counter_entry":
                    self._read_counters(entity.counter_entry, out)
                elif kind == "packet_replication_engine_entry":
                    self._read_groups(entity.packet_replication_engine_entry, out)
                elif kind == "register_entry":
                    self._read_registers(entity.register_entry, out)
                else:
                    raise _P4Error(code_pb2.UNIMPLEMENTED, f"{kind} reads are not supported by the software switch")
        return out

    def _read_tables(self, te: p4runtime_pb2.TableEntry, out: list) -> None:
        tables = list(self.p4info.tables.values()) if te.table_id == 0 else [self._table(te.table_id)]
        for table in tables:
            if te.is_default_action:
                entry = self._defaults.get(table.name)
                if entry is None:
                    entry = p4runtime_pb2.TableEntry(table_id=table.id, is_default_action=True)
                    entry.action.action.action_id = table.initial_default_action_id
                out.append(p4runtime_pb2.Entity(table_entry=entry))
                continue
            store = self._tables.get(table.name, {})
            if te.match:
                key = self._match_key(table, te)
                entries = [store[key]] if key in store else []
            else:
                entries = list(store.values())
            out.extend(p4runtime_pb2.Entity(table_entry=e) for e in entries)

    def _read_counters(self, ce: p4runtime_pb2.CounterEntry, out: list) -> None:
        if ce.counter_id == 0:
            counters = [c for c in self.p4info.counters.values() if c.name in self.switch.counter_sizes]
        else:
            counters = [self._counter(ce.counter_id)]
        for counter in counters:
            counts = self.switch.read_counter(counter.name)
            if ce.HasField("index"):
                index = ce.index.index
                if index < 0:
                    raise _invalid("A negative number is not a valid index value")
                if index >= counter.size:
                    raise _P4Error(code_pb2.OUT_OF_RANGE, f"index {index} of {counter.name} (size {counter.size})")
                indices: range | list[int] = [index]
            else:
                indices = range(counter.size)
            for i in indices:
                entry = p4runtime_pb2.CounterEntry(counter_id=counter.id)
                entry.index.index = i
                entry.data.packet_count = counts[i] if i < len(counts) else 0
                out.append(p4runtime_pb2.Entity(counter_entry=entry))

    def _read_groups(self, pre: p4runtime_pb2.PacketReplicationEngineEntry, out: list) -> None:
        if pre.WhichOneof("type") != "multicast_group_entry":
            raise _P4Error(code_pb2.UNIMPLEMENTED, "clone sessions are not supported by the software switch")
        mgid = pre.multicast_group_entry.multicast_group_id
        if mgid and mgid not in self._groups:
            raise _P4Error(code_pb2.NOT_FOUND, f"Multicast group {mgid} does not exist")
        for gid in ([mgid] if mgid else sorted(self._groups)):
            entity = p4runtime_pb2.Entity()
            group = entity.packet_replication_engine_entry.multicast_group_entry
            group.multicast_group_id = gid
            for port, rid in self._groups[gid]:
                group.replicas.add(egress_port=port, instance=rid)
            out.append(entity)

    def _register_reader(self, name: str):
        """(set, slot) -> int for the registers the software switch's state answers."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "seen":
            return lambda v, s: self.switch.slot_state(v, s)[0]
        if leaf == "contributions":
            return lambda v, s: self.switch.slot_state(v, s)[1]
        if leaf == "max_exponent":
            return lambda v, s: self.switch.slot_state(v, s)[2] & 0xFF  # int8 as bits, as in P4
        if leaf == "has_result":  # the leaf role's
            return lambda v, s: int(self.switch.slot_state(v, s).has_result)
        match = _REGISTER_VALUE.search(leaf)
        if match:
            element = int(match.group(1))

            def value(v: int, s: int) -> int:
                values = self.switch.slot_state(v, s)[3]
                return int(values[element]) & 0xFFFFFFFF if element < len(values) else 0
            return value
        return None

    def _read_registers(self, re_: p4runtime_pb2.RegisterEntry, out: list) -> None:
        if re_.register_id == 0:
            registers = list(self.p4info.registers.values())
        else:
            reg = self.p4info.registers.get(re_.register_id)
            if reg is None:
                raise _invalid(f"Invalid P4 id {re_.register_id}: not a register of the pipeline")
            registers = [reg]
        for reg in registers:
            reader = self._register_reader(reg.name)
            if reader is None:
                raise _P4Error(code_pb2.UNIMPLEMENTED, f"the software switch has no state for register {reg.name}")
            half = reg.size // 2  # set * POOL_SIZE + slot
            if re_.HasField("index"):
                if not 0 <= re_.index.index < reg.size:
                    raise _P4Error(code_pb2.OUT_OF_RANGE, f"index {re_.index.index} of {reg.name} (size {reg.size})")
                indices: range | list[int] = [re_.index.index]
            else:
                indices = range(reg.size)
            for i in indices:
                v, s = divmod(i, half)
                value = reader(v, s) if s < self.switch.pool_size else 0
                entry = p4runtime_pb2.RegisterEntry(register_id=reg.id)
                entry.index.index = i
                entry.data.CopyFrom(p4data_pb2.P4Data(bitstring=encode_int(value, reg.bitwidth)))
                out.append(p4runtime_pb2.Entity(register_entry=entry))


class _Servicer(p4runtime_pb2_grpc.P4RuntimeServicer):
    """gRPC glue: errors become gRPC statuses, streams get a reader thread each."""

    def __init__(self, device: _Device) -> None:
        self.device = device

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: _P4Error) -> None:
        context.abort(_GRPC_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message)

    def Write(self, request, context):
        error = self.device.check_access(request.device_id, request)
        if error:
            self._abort(context, error)
        if request.atomicity != p4runtime_pb2.WriteRequest.CONTINUE_ON_ERROR:
            self._abort(context, _P4Error(code_pb2.UNIMPLEMENTED, "only CONTINUE_ON_ERROR atomicity is supported"))
        results = self.device.write(request)
        failed = [(i, c, m) for i, (c, m) in enumerate(results) if c != code_pb2.OK]
        if failed:
            status = status_pb2.Status(code=code_pb2.UNKNOWN,
                                       message=f"Write failure: {len(failed)} of {len(results)} updates failed; "
                                               f"first: update {failed[0][0]}: {failed[0][2]}")
            for code, message in results:
                detail = any_pb2.Any()
                detail.Pack(p4runtime_pb2.Error(canonical_code=code, message=message,
                                                space="ALL-sswitch-p4org" if code else ""))
                status.details.append(detail)
            context.abort_with_status(_RpcStatus(grpc.StatusCode.UNKNOWN, status.message,
                                                 (("grpc-status-details-bin", status.SerializeToString()),)))
        return p4runtime_pb2.WriteResponse()

    def Read(self, request, context):
        try:
            entities = self.device.read(request)
        except _P4Error as error:
            self._abort(context, error)
        yield p4runtime_pb2.ReadResponse(entities=entities)

    def SetForwardingPipelineConfig(self, request, context):
        error = self.device.check_access(request.device_id, request)
        if error:
            self._abort(context, error)
        try:
            self.device.set_pipeline(request)
        except _P4Error as error:
            self._abort(context, error)
        return p4runtime_pb2.SetForwardingPipelineConfigResponse()

    def GetForwardingPipelineConfig(self, request, context):
        try:
            config = self.device.get_pipeline(request)
        except _P4Error as error:
            self._abort(context, error)
        return p4runtime_pb2.GetForwardingPipelineConfigResponse(config=config)

    def Capabilities(self, request, context):
        return p4runtime_pb2.CapabilitiesResponse(p4runtime_api_version=_api_version())

    def StreamChannel(self, request_iterator, context):
        conn = _Connection(context.peer())
        context.add_callback(lambda: conn.out.put(_END))

        def read_requests() -> None:
            try:
                for request in request_iterator:
                    kind = request.WhichOneof("update")
                    if kind == "arbitration":
                        error = self.device.arbitrate(conn, request.arbitration)
                        if error:
                            conn.out.put(error)
                            return
                    else:
                        log.debug("P4Runtime client %s: ignoring a %s stream message (no CPU port)", conn.peer, kind)
            except Exception:  # noqa: BLE001 - a cancelled stream ends its iterator with an error
                pass
            finally:
                conn.out.put(_END)

        threading.Thread(target=read_requests, name="p4runtime-stream-reader", daemon=True).start()
        try:
            while True:
                item = conn.out.get()
                if item is _END:
                    return
                if isinstance(item, _P4Error):
                    self._abort(context, item)
                yield item
        finally:
            self.device.disconnect(conn)


class P4RuntimeServer:
    """A gRPC P4Runtime server for one software switch.

    Args:
        switch: the data plane it programs.
        host: address to listen on.
        port: TCP port (``defaults.P4RUNTIME_PORT``, 9559; 0 picks a free one).
        device_id: the device id clients must name (0, simple_switch_grpc's default).
        p4info: the pipeline it serves (default ``p4/switchml_v1model.p4info.txtpb``); with the
            leaf role's table (``switchml.p4info.with_leaf_role``) the switch's data plane must
            have the leaf role.
        tls: serve over TLS (``switchml.security.TLSFiles``: cert and key are the server's;
            ca, if given, must sign every client's certificate: mutual TLS). None: plain text.
    """

    def __init__(self, switch: SoftwareSwitch, host: str = defaults.SWITCH_HOST,
                 port: int = defaults.P4RUNTIME_PORT, device_id: int = 0,
                 p4info: P4Info | str | Path | None = None, tls: TLSFiles | None = None) -> None:
        p4info = p4info if isinstance(p4info, P4Info) else P4Info.load(p4info)
        for name in (pipeline.ADMISSION_TABLE, pipeline.EGRESS_REWRITE_TABLE, pipeline.LOSS_TABLE):
            p4info.table(name)  # fail early on a P4Info that is not switchml's
        if has_leaf_role(p4info) and not switch.leaf_role:
            raise LeafRoleUnsupported(f"P4Runtime server: {p4info.source} has the leaf role's table, but the "
                                      f"{switch.dataplane} data plane has no leaf role")
        self.device = _Device(switch, device_id, p4info)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=MAX_CONNECTIONS + _EXTRA_WORKERS,
                                                      thread_name_prefix="p4runtime"),
                                   # gRPC sets SO_REUSEPORT by default: a second server on the same
                                   # port would then start silently and share the connections.
                                   options=[("grpc.so_reuseport", 0)])
        p4runtime_pb2_grpc.add_P4RuntimeServicer_to_server(_Servicer(self.device), self._server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if tls is None:
                bound = self._server.add_insecure_port(target)
            else:
                cert, key, client_ca = tls.server_credentials()
                bound = self._server.add_secure_port(target, grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None))
        except RuntimeError as exc:  # grpcio >= 1.50 raises where older versions returned 0
            raise OSError(f"cannot serve P4Runtime on {target}: {exc} (is the port taken?)") from None
        if bound == 0:
            raise OSError(f"cannot serve P4Runtime on {target} (is the port taken?)")
        self.host, self.port = host, bound
        self.tls = tls
        self._started = False

    @property
    def grpc_address(self) -> str:
        """``host:port`` for a client (``P4RuntimeTarget``, p4runtime-shell's ``grpc_addr``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> P4RuntimeServer:
        self._server.start()
        self._started = True
        log.info("P4Runtime server for device %d on %s (%s)", self.device.device_id, self.grpc_address,
                 "plain text" if self.tls is None else
                 f"TLS{', client certificates required' if self.tls.ca else ''}")
        if self.tls is None and not is_local_endpoint(f"tcp://{self.grpc_address}"):
            log.warning("P4Runtime on %s is plain text: whoever reaches it can become primary and rewrite the "
                        "switch's tables; serve TLS with --p4runtime-tls-cert/--p4runtime-tls-key (docs/security.md)",
                        self.grpc_address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; open streams are cancelled."""
        if self._started:
            self._server.stop(grace).wait()
            self._started = False

    def __enter__(self) -> P4RuntimeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
