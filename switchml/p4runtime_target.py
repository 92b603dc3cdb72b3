"""The controller's target interface over P4Runtime: BMv2, Tofino and the software switch.

``P4RuntimeConnection`` is a small client of the ``p4runtime`` bindings (gRPC, not
p4runtime-shell, which keeps one global client per process and ``sys.exit()``s when it
cannot connect): StreamChannel arbitration, pipeline config, Write, Read, Capabilities.
Every unary call has a deadline; every failure raises ``P4RuntimeError`` naming the
address, the entity and the gRPC status.

``P4RuntimeTarget`` implements ``switchml.targets.SwitchTarget`` on it: admission entries,
multicast groups (PacketReplicationEngineEntry) with their egress rewrites, the loss table
and counter reads, all resolved by name through the P4Info (``switchml.p4info``).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from switchml import pipeline
from switchml.errors import SwitchMLError
from switchml.extras import needs
from switchml.p4info import (
    P4Info,
    TableInfo,
    decode_int,
    encode_int,
    has_leaf_role,
    int_to_ip,
    int_to_mac,
    ip_to_int,
    mac_to_int,
    upstream_params,
)
from switchml.pipeline import Replica, UpstreamEntry, WorkerEntry
from switchml.security import TLSFiles
from switchml.targets import SwitchTarget

with needs("p4", "P4Runtime (switchml.p4runtime_target)"):
    import grpc
    from google.rpc import code_pb2, status_pb2
    from p4.config.v1 import p4info_pb2
    from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0  #: deadline of every unary P4Runtime call and of arbitration
DEFAULT_DEVICE_ID = 0  #: simple_switch_grpc's default --device-id
DEFAULT_ELECTION_ID = 1
#: Tofino's program counts AGGREGATED and RESETS here (see p4/switchml_tna.p4).
TNA_PACKET_OUTCOMES_COUNTER = "SwitchIngress.packet_outcomes"

_CODE_NAMES = {v: k for k, v in code_pb2.Code.items()}
Update = p4runtime_pb2.Update


def code_name(code: int) -> str:
    """A google.rpc.Code number as its name (``ALREADY_EXISTS``)."""
    return _CODE_NAMES.get(code, str(code))


class P4RuntimeError(SwitchMLError):
    """A P4Runtime call failed; ``code`` is its gRPC status code (None when no RPC failed)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class P4RuntimeWriteError(P4RuntimeError):
    """A Write failed; ``errors`` holds (update index, google.rpc.Code, message) per failed update."""

    def __init__(self, message: str, code: grpc.StatusCode | None, errors: list[tuple[int, int, str]]) -> None:
        super().__init__(message, code)
        self.errors = errors

    def codes(self) -> dict[int, int]:
        """Update index -> canonical code of each failed update."""
        return {i: c for i, c, _ in self.errors}


def _uint128(value: int) -> p4runtime_pb2.Uint128:
    return p4runtime_pb2.Uint128(high=value >> 64, low=value & ((1 << 64) - 1))


def _from_uint128(value: p4runtime_pb2.Uint128) -> int:
    return (value.high << 64) | value.low


def write_errors(exc: grpc.RpcError) -> list[tuple[int, int, str]]:
    """The per-update errors of a failed Write: P4Runtime servers answer UNKNOWN with one
    ``p4.v1.Error`` per update in the binary status details (PI, and so BMv2, does)."""
    raw = next((v for k, v in (exc.trailing_metadata() or ()) if k == "grpc-status-details-bin"), None)
    if raw is None:
        return []
    status = status_pb2.Status.FromString(raw)
    errors = []
    for index, detail in enumerate(status.details):
        error = p4runtime_pb2.Error()
        if detail.Unpack(error) and error.canonical_code != code_pb2.OK:
            errors.append((index, error.canonical_code, error.message))
    return errors


def _channel(address: str, tls: TLSFiles | None) -> grpc.Channel:
    """A gRPC channel to ``address``: plain text, or TLS with grpc's own credentials."""
    if tls is None:
        return grpc.insecure_channel(address)
    try:
        ca, cert, key = tls.client_credentials()
    except ValueError as exc:
        raise P4RuntimeError(f"P4Runtime over TLS to {address}: {exc}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def _diagnose(address: str, tls: TLSFiles | None) -> str:
    """Why a channel to ``address`` did not come up, as far as one TLS handshake can tell
    (Python's ssl module, certificates unchecked: it only asks whether the server speaks TLS)."""
    host, sep, port = address.rpartition(":")
    if not sep or address.startswith("unix:") or not port.isdigit():
        return "is the switch running, and is this its gRPC address?"
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0) as raw:
            with context.wrap_socket(raw, server_hostname=host.strip("[]")):
                speaks_tls = True
    except ssl.SSLError as exc:
        # a server that demands a client certificate may still complete the handshake here
        # (TLS 1.3 checks it afterwards) or refuse it with an alert: both are TLS servers
        speaks_tls = "alert" in str(exc).lower() or "certificate" in str(exc).lower()
    except OSError:
        return "nothing accepts connections there: is the switch running, and is this its gRPC address?"
    if speaks_tls and tls is None:
        return ("the server speaks TLS and this client connects in plain text: pass the CA that signed its "
                "certificate (deploy: --tls-ca FILE; with mutual TLS also --tls-cert and --tls-key)")
    if not speaks_tls and tls is not None:
        return "the server speaks plain text, not TLS: connect without --tls-ca, or start the switch with TLS"
    if tls is not None:
        return ("the server speaks TLS but the handshake failed: does --tls-ca sign its certificate, does the "
                "certificate name the host dialled (or --tls-server-name), and does the server require a client "
                "certificate (--tls-cert, --tls-key) signed by the CA it trusts?")
    return "is the switch running, and is this its gRPC address?"


class P4RuntimeConnection:
    """One P4Runtime client session with a device: a channel, a StreamChannel, arbitration.

    Args:
        address: ``host:port`` of the P4Runtime server (gRPC addresses such as
            ``unix:/path`` work too).
        device_id: the device's P4Runtime id (simple_switch_grpc: ``--device-id``, 0 by default).
        election_id: this client's election id; the highest one connected is primary.
        timeout: deadline in seconds of connecting, of arbitration and of every call.
        require_primary: raise ``P4RuntimeError`` unless this client becomes primary
            (False: stay connected as a backup, with read access only).
        tls: connect over TLS (``TLSFiles``: ca verifies the server; cert and key are a
            client certificate for mutual TLS). None: plain text. A connection that fails
            says whether the server speaks TLS when this client does not, or the reverse.
    """

    def __init__(self, address: str, device_id: int = DEFAULT_DEVICE_ID, election_id: int = DEFAULT_ELECTION_ID,
                 timeout: float = DEFAULT_TIMEOUT_S, require_primary: bool = True, tls: TLSFiles | None = None) -> None:
        if not 0 <= election_id < 1 << 128:
            raise ValueError(f"election_id={election_id}: expected an unsigned 128-bit integer")
        self.address, self.device_id, self.election_id, self.timeout = address, device_id, election_id, timeout
        self.is_primary = False
        self.primary_election_id: int | None = None
        self._closed = threading.Event()
        self._require_primary = require_primary
        self.tls = tls
        self.channel = _channel(address, tls)
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise P4RuntimeError(f"no P4Runtime server answers at {address} {'over TLS' if tls else 'in plain text'} "
                                 f"(waited {timeout:g} s): {_diagnose(address, tls)}",
                                 grpc.StatusCode.UNAVAILABLE) from None
        self.stub = p4runtime_pb2_grpc.P4RuntimeStub(self.channel)
        try:
            self._open_stream()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"P4RuntimeConnection({self.address}, device {self.device_id}, election id {self.election_id})"

    # ------------------------------------------------------------ stream
    def _open_stream(self) -> None:
        """Open a StreamChannel and do arbitration on it."""
        self._requests: queue.Queue = queue.Queue()
        self._arbitration: queue.Queue = queue.Queue()
        self._stream = self.stub.StreamChannel(self._request_iterator(self._requests), wait_for_ready=True)
        self._reader = threading.Thread(target=self._read_stream, args=(self._stream, self._arbitration),
                                        name="p4runtime-stream", daemon=True)
        self._reader.start()
        self._arbitrate(self._require_primary)

    def _ensure_stream(self) -> None:
        """A switch that restarted (or a network that broke) ends the stream, and with it
        this client's mastership: open a new one before writing, so a long-running controller
        survives a switch restart instead of failing every later job."""
        if not self._reader.is_alive() and not self._closed.is_set():
            log.warning("%s: StreamChannel lost; doing arbitration again", self)
            self._open_stream()

    @staticmethod
    def _request_iterator(requests: queue.Queue):
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    def _read_stream(self, stream, arbitration: queue.Queue) -> None:
        try:
            for response in stream:
                if response.HasField("arbitration"):
                    self._on_arbitration(response.arbitration, arbitration)
                elif response.HasField("error"):
                    log.warning("%s: stream error %s: %s", self, code_name(response.error.canonical_code),
                                response.error.message)
                else:
                    log.debug("%s: ignoring a %s stream message", self, response.WhichOneof("update"))
        except grpc.RpcError as exc:
            if not self._closed.is_set():
                arbitration.put(exc)
                log.warning("%s: StreamChannel ended: %s: %s", self, exc.code().name, exc.details())
        finally:
            self.is_primary = False
            arbitration.put(None)

    def _on_arbitration(self, update: p4runtime_pb2.MasterArbitrationUpdate, arbitration: queue.Queue) -> None:
        was_primary = self.is_primary
        self.primary_election_id = _from_uint128(update.election_id) if update.HasField("election_id") else None
        self.is_primary = update.status.code == code_pb2.OK
        if was_primary and not self.is_primary:
            log.warning("%s: no longer primary: election id %s took over", self, self.primary_election_id)
        arbitration.put(update)

    def _arbitrate(self, require_primary: bool) -> None:
        request = p4runtime_pb2.StreamMessageRequest()
        request.arbitration.device_id = self.device_id
        request.arbitration.election_id.CopyFrom(_uint128(self.election_id))
        self._requests.put(request)
        try:
            answer = self._arbitration.get(timeout=self.timeout)
        except queue.Empty:
            raise P4RuntimeError(f"{self}: no arbitration answer within {self.timeout:g} s",
                                 grpc.StatusCode.DEADLINE_EXCEEDED) from None
        if isinstance(answer, grpc.RpcError):
            raise P4RuntimeError(f"{self}: arbitration refused: {answer.code().name}: {answer.details()}",
                                 answer.code())
        if answer is None:
            raise P4RuntimeError(f"{self}: the server closed the StreamChannel during arbitration",
                                 grpc.StatusCode.UNAVAILABLE)
        if require_primary and answer.status.code != code_pb2.OK:
            raise P4RuntimeError(
                f"{self}: not primary: the switch's primary client has election id {self.primary_election_id} "
                f"({code_name(answer.status.code)}: {answer.status.message}); another controller owns this "
                "switch: stop it, or connect with a higher election id", grpc.StatusCode.PERMISSION_DENIED)
        log.info("%s: %s", self, "primary" if self.is_primary else "backup")

    # ------------------------------------------------------------ calls
    def _rpc_error(self, what: str, exc: grpc.RpcError) -> P4RuntimeError:
        return P4RuntimeError(f"{self}: {what}: {exc.code().name}: {exc.details()}", exc.code())

    def write(self, updates: Sequence[p4runtime_pb2.Update], what: Sequence[str] | None = None) -> None:
        """One Write of ``updates``; ``what`` names each update for the error message."""
        self._ensure_stream()
        request = p4runtime_pb2.WriteRequest(device_id=self.device_id, election_id=_uint128(self.election_id),
                                             updates=updates)
        try:
            self.stub.Write(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            errors = write_errors(exc)
            names = list(what or [])
            if errors:
                detail = "; ".join(f"{names[i] if i < len(names) else f'update {i}'}: {code_name(c)}: {m}"
                                   for i, c, m in errors)
            else:
                detail = f"{', '.join(names) or 'write'}: {exc.code().name}: {exc.details()}"
            raise P4RuntimeWriteError(f"{self}: write failed: {detail}", exc.code(), errors) from None

    def read(self, entities: Sequence[p4runtime_pb2.Entity], what: str = "read") -> list[p4runtime_pb2.Entity]:
        """All entities a Read of ``entities`` returns."""
        request = p4runtime_pb2.ReadRequest(device_id=self.device_id, entities=entities)
        try:
            return [e for response in self.stub.Read(request, timeout=self.timeout, wait_for_ready=True)
                    for e in response.entities]
        except grpc.RpcError as exc:
            raise self._rpc_error(what, exc) from None

    def set_pipeline(self, p4info: p4info_pb2.P4Info, device_config: bytes = b"",
                     action: int = p4runtime_pb2.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT,
                     cookie: int | None = None) -> None:
        """SetForwardingPipelineConfig: push ``p4info`` and the target's binary (BMv2 JSON,
        Tofino pipeline config; nothing for the software switch)."""
        self._ensure_stream()
        request = p4runtime_pb2.SetForwardingPipelineConfigRequest(
            device_id=self.device_id, election_id=_uint128(self.election_id), action=action)
        request.config.p4info.CopyFrom(p4info)
        request.config.p4_device_config = device_config
        if cookie is not None:
            request.config.cookie.cookie = cookie
        try:
            self.stub.SetForwardingPipelineConfig(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise self._rpc_error(f"SetForwardingPipelineConfig ({len(device_config)}-byte device config)",
                                  exc) from None

    def get_pipeline(self, response_type: int = p4runtime_pb2.GetForwardingPipelineConfigRequest.ALL
                     ) -> p4runtime_pb2.ForwardingPipelineConfig:
        request = p4runtime_pb2.GetForwardingPipelineConfigRequest(device_id=self.device_id,
                                                                   response_type=response_type)
        try:
            return self.stub.GetForwardingPipelineConfig(request, timeout=self.timeout, wait_for_ready=True).config
        except grpc.RpcError as exc:
            raise self._rpc_error("GetForwardingPipelineConfig", exc) from None

    def capabilities(self) -> str:
        """The server's P4Runtime API version."""
        try:
            return self.stub.Capabilities(p4runtime_pb2.CapabilitiesRequest(),
                                          timeout=self.timeout).p4runtime_api_version
        except grpc.RpcError as exc:
            raise self._rpc_error("Capabilities", exc) from None

    def close(self) -> None:
        """End the stream (the server then elects another primary) and close the channel."""
        if self._closed.is_set():
            return
        self._closed.set()
        if hasattr(self, "_stream"):
            self._requests.put(None)
            self._stream.cancel()
            self._reader.join(timeout=self.timeout)
        self.channel.close()


@dataclass(frozen=True)
class _Resolved:
    table: TableInfo
    action: int
    params: dict[str, tuple[int, int]]  # name -> (id, bitwidth)


class P4RuntimeTarget(SwitchTarget):
    """Programs a switch over P4Runtime, by the names of ``switchml.pipeline``.

    Args:
        address: the switch's P4Runtime gRPC address (``host:port``).
        device_id: its P4Runtime device id.
        election_id: this controller's election id; it must become primary.
        p4info: the pipeline's P4Info (object or file); default ``p4/switchml_v1model.p4info.txtpb``.
        timeout: deadline of every call.
        supported_k: elements per packet the switch takes (P4 targets: 64; the software
            switch: all of wire format v1).
        pipeline_config: if given, pushed first (SetForwardingPipelineConfig with
            VERIFY_AND_COMMIT): the device config bytes (BMv2 JSON; b"" for the software switch).
        require_primary: False connects as a backup that may only read (counters, tables):
            a monitor beside the controller.
        tls: P4Runtime over TLS (``P4RuntimeConnection``'s); None: plain text.
    """

    def __init__(self, address: str, device_id: int = DEFAULT_DEVICE_ID, election_id: int = DEFAULT_ELECTION_ID,
                 p4info: P4Info | str | Path | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 supported_k: Sequence[int] = pipeline.P4_SUPPORTED_K, pipeline_config: bytes | None = None,
                 require_primary: bool = True, tls: TLSFiles | None = None) -> None:
        self.p4info = p4info if isinstance(p4info, P4Info) else P4Info.load(p4info)
        self.supported_k = tuple(sorted(supported_k, reverse=True))
        # Resolve the contract first: a P4Info without switchml's tables fails before connecting.
        self._admission_worker = self._resolve(pipeline.ADMISSION_TABLE, pipeline.SET_WORKER_ACTION,
                                               pipeline.SET_WORKER_PARAMS)
        self._admission_controller = self._resolve(pipeline.ADMISSION_TABLE, pipeline.SET_CONTROLLER_ACTION, ())
        self._rewrite = self._resolve(pipeline.EGRESS_REWRITE_TABLE, pipeline.SET_DESTINATION_ACTION,
                                      pipeline.SET_DESTINATION_PARAMS)
        self._loss = self._resolve(pipeline.LOSS_TABLE, pipeline.SET_DROP_PROBABILITY_ACTION,
                                   pipeline.SET_DROP_PROBABILITY_PARAMS)
        self._forward = self._resolve(pipeline.FORWARD_TABLE, pipeline.SET_EGRESS_ACTION, pipeline.SET_EGRESS_PARAMS)
        # the leaf role's table: only in the leaf role's P4Info (``switchml.p4info.with_leaf_role``)
        self._upstream = (self._resolve(pipeline.UPSTREAM_TABLE, pipeline.SET_UPSTREAM_ACTION,
                                        pipeline.SET_UPSTREAM_PARAMS) if has_leaf_role(self.p4info) else None)
        for name in (pipeline.RESULTS_COUNTER, pipeline.RETRANSMISSIONS_COUNTER, pipeline.DROPS_COUNTER,
                     pipeline.PACKETS_COUNTER):
            self.p4info.counter(name)
        self.connection = P4RuntimeConnection(address, device_id, election_id, timeout, require_primary, tls)
        if pipeline_config is not None:
            try:
                self.set_pipeline(pipeline_config)
            except BaseException:
                self.connection.close()
                raise

    def __repr__(self) -> str:
        return f"P4RuntimeTarget({self.connection.address}, device {self.connection.device_id})"

    def why_no_leaf_role(self) -> str | None:
        # The leaf role is in the pipeline or not (docs/hierarchy.md): the P4Info this target speaks says.
        if self._upstream is not None:
            return None
        return (f"{self!r}: the pipeline's P4Info ({self.p4info.source}) has no table {pipeline.UPSTREAM_TABLE}, so "
                "this switch cannot be a leaf of a tree; a leaf runs p4/switchml_v1model.p4 built with "
                "-DSWITCHML_LEAF_ROLE (BMv2) or is a software switch started with --leaf-role, and is programmed "
                "with switchml.p4info.with_leaf_role() (docs/hierarchy.md)")

    def add_upstream(self, entry: UpstreamEntry) -> None:
        if self._upstream is None:
            super().add_upstream(entry)  # raises, saying why
        te = self._table_entry(self._upstream, (entry.job,), upstream_params(entry))
        self._upsert([self._entity(te)], [f"{pipeline.UPSTREAM_TABLE} job {entry.job} -> set_upstream("
                                          f"{entry.ip}:{entry.udp_port})"])

    def remove_upstream(self, job: int) -> None:
        if self._upstream is None:
            super().remove_upstream(job)
        te = self._table_entry(self._upstream, (job,), None)
        self._delete([self._entity(te)], [f"{pipeline.UPSTREAM_TABLE} job {job}"])

    def _resolve(self, table: str, action: str, params: Sequence[str]) -> _Resolved:
        t = self.p4info.table(table)
        a = self.p4info.action(action)
        if a.id not in t.action_ids:
            raise KeyError(f"the P4Info's table {t.name} has no action {a.name}")
        return _Resolved(t, a.id, {p: (a.param(p).id, a.param(p).bitwidth) for p in params})

    # ------------------------------------------------------------ pipeline
    def set_pipeline(self, device_config: bytes = b"") -> None:
        """Push this target's P4Info and ``device_config`` (VERIFY_AND_COMMIT: the switch
        starts from empty tables and zeroed state)."""
        self.connection.set_pipeline(self.p4info.message, device_config)
        log.info("%s: pipeline pushed (P4Info %s, %d-byte device config)", self, self.p4info.source,
                 len(device_config))

    # ------------------------------------------------------------ entries
    def _table_entry(self, r: _Resolved, keys: Sequence[int | tuple[int, int]],
                     params: dict[str, int] | None, default: bool = False) -> p4runtime_pb2.TableEntry:
        """An entry of ``r``'s table; ``default``: its default entry (no keys)."""
        entry = p4runtime_pb2.TableEntry(table_id=r.table.id, is_default_action=default)
        for f, key in zip(() if default else r.table.match_fields, keys, strict=True):
            m = entry.match.add(field_id=f.id)
            if isinstance(key, tuple):  # LPM (value, prefix length)
                m.lpm.value, m.lpm.prefix_len = encode_int(key[0], f.bitwidth), key[1]
            else:
                m.exact.value = encode_int(key, f.bitwidth)
        if params is not None:
            entry.action.action.action_id = r.action
            for name, value in params.items():
                pid, width = r.params[name]
                try:
                    encoded = encode_int(value, width)
                except ValueError as exc:
                    raise ValueError(f"{r.table.name}: parameter {name}={value}: {exc}") from None
                entry.action.action.params.add(param_id=pid, value=encoded)
        return entry

    def _upsert(self, entities: list[p4runtime_pb2.Entity], what: list[str]) -> None:
        """INSERT, then MODIFY those that exist already (a controller restarted against a
        switch that kept its entries must take them over, not fail)."""
        try:
            self.connection.write([Update(type=Update.INSERT, entity=e) for e in entities], what)
        except P4RuntimeWriteError as exc:
            codes = exc.codes()
            if not codes or any(c != code_pb2.ALREADY_EXISTS for c in codes.values()):
                raise
            self.connection.write([Update(type=Update.MODIFY, entity=entities[i]) for i in sorted(codes)],
                                  [what[i] for i in sorted(codes)])

    def _delete(self, entities: list[p4runtime_pb2.Entity], what: list[str]) -> None:
        """DELETE; entries already gone are fine (the switch may have been reset)."""
        try:
            self.connection.write([Update(type=Update.DELETE, entity=e) for e in entities], what)
        except P4RuntimeWriteError as exc:
            codes = exc.codes()
            if not codes or any(c != code_pb2.NOT_FOUND for c in codes.values()):
                raise
            log.debug("%s: already absent: %s", self, [what[i] for i in codes])

    @staticmethod
    def _entity(table_entry: p4runtime_pb2.TableEntry) -> p4runtime_pb2.Entity:
        return p4runtime_pb2.Entity(table_entry=table_entry)

    def add_controller(self, ip: str, udp_port: int) -> None:
        entry = self._table_entry(self._admission_controller, (ip_to_int(ip), udp_port), {})
        self._upsert([self._entity(entry)], [f"{pipeline.ADMISSION_TABLE} {ip}:{udp_port} -> set_controller"])

    def add_worker(self, entry: WorkerEntry) -> None:
        params = {"job": entry.job, "worker_id": entry.worker_id, "num_workers": entry.num_workers,
                  "mgid": entry.mgid, "pool_base": entry.pool_base, "pool_size": entry.pool_size}
        te = self._table_entry(self._admission_worker, (ip_to_int(entry.ip), entry.udp_port), params)
        self._upsert([self._entity(te)], [f"{pipeline.ADMISSION_TABLE} {entry.ip}:{entry.udp_port} -> "
                                          f"set_worker(job {entry.job}, worker {entry.worker_id})"])

    def remove_worker(self, ip: str, udp_port: int) -> None:
        te = self._table_entry(self._admission_worker, (ip_to_int(ip), udp_port), None)
        self._delete([self._entity(te)], [f"{pipeline.ADMISSION_TABLE} {ip}:{udp_port}"])

    def _rewrite_entities(self, mgid: int, replicas: Sequence[Replica], with_action: bool):
        entities, what = [], []
        for r in replicas:
            params = {"mac": mac_to_int(r.mac), "ip": ip_to_int(r.ip), "udp_port": r.udp_port} if with_action else None
            entities.append(self._entity(self._table_entry(self._rewrite, (mgid, r.rid), params)))
            what.append(f"{pipeline.EGRESS_REWRITE_TABLE} (mgid {mgid}, rid {r.rid}) -> {r.ip}:{r.udp_port}")
        return entities, what

    @staticmethod
    def _group_entity(mgid: int, replicas: Sequence[Replica]) -> p4runtime_pb2.Entity:
        entity = p4runtime_pb2.Entity()
        group = entity.packet_replication_engine_entry.multicast_group_entry
        group.multicast_group_id = mgid
        for r in replicas:
            # egress_port (uint32) is what BMv2's PI server and p4runtime-shell use
            group.replicas.add(egress_port=r.port, instance=r.rid)
        return entity

    def set_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        # Rewrites first: a copy that meets no rewrite entry is dropped by the default action.
        entities, what = self._rewrite_entities(mgid, replicas, True)
        if entities:
            self._upsert(entities, what)
        self._upsert([self._group_entity(mgid, replicas)],
                     [f"multicast group {mgid} (ports {[r.port for r in replicas]})"])

    def delete_multicast_group(self, mgid: int, replicas: Sequence[Replica]) -> None:
        self._delete([self._group_entity(mgid, ())], [f"multicast group {mgid}"])
        entities, what = self._rewrite_entities(mgid, replicas, False)
        if entities:
            self._delete(entities, what)

    def set_drop_probability(self, port: int | None, probability: float) -> None:
        threshold = pipeline.drop_threshold(probability)
        if port is not None:
            te = self._table_entry(self._loss, (port,), {"threshold": threshold})
            self._upsert([self._entity(te)], [f"{pipeline.LOSS_TABLE} port {port} -> threshold {threshold}"])
            return
        te = self._table_entry(self._loss, (), {"threshold": threshold}, default=True)
        self.connection.write([Update(type=Update.MODIFY, entity=self._entity(te))],
                              [f"{pipeline.LOSS_TABLE} default entry -> threshold {threshold}"])

    def add_forward(self, ip: str, port: int, mac: str, prefix_len: int = 32) -> None:
        """Plain IPv4 forwarding (traffic that is not switchml's): ip/prefix -> port, dst MAC."""
        te = self._table_entry(self._forward, ((ip_to_int(ip), prefix_len),), {"port": port, "mac": mac_to_int(mac)})
        self._upsert([self._entity(te)], [f"{pipeline.FORWARD_TABLE} {ip}/{prefix_len} -> port {port}"])

    # ------------------------------------------------------------ reads
    def read_counter(self, name: str) -> list[int]:
        counter = self.p4info.counter(name)
        counts = self._read_counter(counter.id, counter.size, name)
        if name == pipeline.PACKETS_COUNTER and self.p4info.has_counter(TNA_PACKET_OUTCOMES_COUNTER):
            # Tofino counts one packet in one counter cell per pass: AGGREGATED and RESETS
            # live in packet_outcomes (same indices), RECEIVED stays in packets.
            outcomes = self.p4info.counter(TNA_PACKET_OUTCOMES_COUNTER)
            extra = self._read_counter(outcomes.id, outcomes.size, outcomes.name)
            for index in (pipeline.PacketCounter.AGGREGATED, pipeline.PacketCounter.RESETS):
                counts[index] = extra[index]
        return counts

    def _read_counter(self, counter_id: int, size: int, name: str) -> list[int]:
        entity = p4runtime_pb2.Entity(counter_entry=p4runtime_pb2.CounterEntry(counter_id=counter_id))
        counts = [0] * size
        for e in self.connection.read([entity], f"reading counter {name}"):
            index = e.counter_entry.index.index
            if 0 <= index < size:
                counts[index] = e.counter_entry.data.packet_count
        return counts

    def read_table(self, name: str) -> list[dict]:
        """The entries of table ``name``, decoded: ``{"match": {field: value}, "action": name,
        "params": {name: value}}`` (IPv4 and MAC fields as text)."""
        table = self.p4info.table(name)
        entity = p4runtime_pb2.Entity(table_entry=p4runtime_pb2.TableEntry(table_id=table.id))
        out = []
        for e in self.connection.read([entity], f"reading table {table.name}"):
            te = e.table_entry
            match = {}
            for m in te.match:
                f = table.match_field_by_id(m.field_id)
                if f is None:
                    continue
                raw = m.lpm.value if m.HasField("lpm") else m.exact.value
                match[f.name] = _readable(f.name, decode_int(raw, f.bitwidth), f.bitwidth)
                if m.HasField("lpm"):
                    match[f.name] = (match[f.name], m.lpm.prefix_len)
            action = self.p4info.actions.get(te.action.action.action_id)
            params = {}
            if action is not None:
                for p in te.action.action.params:
                    info = action.param_by_id(p.param_id)
                    if info is not None:
                        params[info.name] = _readable(info.name, decode_int(p.value, info.bitwidth), info.bitwidth)
            out.append({"match": match, "action": action.name if action else None, "params": params})
        return out

    def read_multicast_groups(self) -> dict[int, list[tuple[int, int]]]:
        """Multicast group id -> [(egress port, instance)]."""
        entity = p4runtime_pb2.Entity()
        entity.packet_replication_engine_entry.multicast_group_entry.multicast_group_id = 0  # wildcard
        groups: dict[int, list[tuple[int, int]]] = {}
        for e in self.connection.read([entity], "reading multicast groups"):
            g = e.packet_replication_engine_entry.multicast_group_entry
            groups[g.multicast_group_id] = sorted((r.egress_port, r.instance) for r in g.replicas)
        return groups

    def close(self) -> None:
        self.connection.close()


def _readable(name: str, value: int, bitwidth: int) -> int | str:
    if bitwidth == 32 and ("addr" in name or name == "ip"):
        return int_to_ip(value)
    if bitwidth == 48:
        return int_to_mac(value)
    return value
