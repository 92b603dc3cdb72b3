"""The P4Info contract: load it, map names to ids and back, encode P4Runtime bytestrings.

One helper for both ends of P4Runtime: ``switchml.p4runtime_target`` (the controller's
client) and ``emulation.p4runtime_server`` (the software switch's server) resolve every
table, action, parameter, counter and register through it, so neither hard-codes an id.

The P4Info file lives in ``p4/`` beside the package (the repository is installed
editable); ``SWITCHML_P4_DIR`` points elsewhere, e.g. at a copy next to a wheel install.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from switchml import pipeline
from switchml.extras import needs

with needs("p4", "P4Runtime (switchml.p4info)"):
    from google.protobuf import text_format
    from p4.config.v1 import p4info_pb2

P4INFO_FILENAME = "switchml_v1model.p4info.txtpb"
LEAF_P4INFO_FILENAME = "switchml_v1model_leaf.p4info.txtpb"  #: the same program built with -DSWITCHML_LEAF_ROLE
P4_DIR_ENV = "SWITCHML_P4_DIR"

# p4.config.v1.MatchField.MatchType values, by name (for messages)
MATCH_TYPES = {v: k for k, v in p4info_pb2.MatchField.MatchType.items()}
EXACT = p4info_pb2.MatchField.EXACT
LPM = p4info_pb2.MatchField.LPM


def p4_dir() -> Path:
    """The folder holding the P4 programs and their P4Info.

    ``$SWITCHML_P4_DIR`` if set, else ``p4/`` beside the ``switchml`` package (an editable
    install or a checkout), else ``switchml/p4/`` (a package that ships it inside).
    """
    env = os.environ.get(P4_DIR_ENV)
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    candidates = (package.parent / "p4", package / "p4")
    for candidate in candidates:
        if (candidate / P4INFO_FILENAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"cannot find {P4INFO_FILENAME}: looked in {', '.join(str(c) for c in candidates)}; "
        f"install switchml from a checkout (pip install -e .) or set {P4_DIR_ENV} to the repository's p4/ folder")


def default_p4info_path() -> Path:
    """``p4/switchml_v1model.p4info.txtpb``: the contract of tables, actions, counters, registers."""
    return p4_dir() / P4INFO_FILENAME


def leaf_p4info_path() -> Path:
    """``p4/switchml_v1model_leaf.p4info.txtpb``: the leaf role's contract (``with_leaf_role``)."""
    return p4_dir() / LEAF_P4INFO_FILENAME


@dataclass(frozen=True)
class MatchFieldInfo:
    id: int
    name: str
    bitwidth: int
    match_type: int  #: p4info_pb2.MatchField.MatchType

    @property
    def match_type_name(self) -> str:
        return MATCH_TYPES.get(self.match_type, str(self.match_type))


@dataclass(frozen=True)
class ParamInfo:
    id: int
    name: str
    bitwidth: int


@dataclass(frozen=True)
class ActionInfo:
    id: int
    name: str
    alias: str
    params: tuple[ParamInfo, ...]

    def param(self, name: str) -> ParamInfo:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"action {self.name} has no parameter {name!r}; it has {[p.name for p in self.params]}")

    def param_by_id(self, param_id: int) -> ParamInfo | None:
        return next((p for p in self.params if p.id == param_id), None)


@dataclass(frozen=True)
class TableInfo:
    id: int
    name: str
    alias: str
    match_fields: tuple[MatchFieldInfo, ...]
    action_ids: frozenset[int]
    default_only_action_ids: frozenset[int]  #: actions allowed only as the default action
    table_only_action_ids: frozenset[int]  #: actions never allowed as the default action
    const_default_action_id: int  #: 0 when the default action may be changed
    initial_default_action_id: int
    size: int

    def match_field(self, name: str) -> MatchFieldInfo:
        for f in self.match_fields:
            if f.name == name:
                return f
        raise KeyError(f"table {self.name} has no match field {name!r}; it has {[f.name for f in self.match_fields]}")

    def match_field_by_id(self, field_id: int) -> MatchFieldInfo | None:
        return next((f for f in self.match_fields if f.id == field_id), None)


@dataclass(frozen=True)
class CounterInfo:
    id: int
    name: str
    alias: str
    size: int
    unit: int  #: p4info_pb2.CounterSpec.Unit


@dataclass(frozen=True)
class RegisterInfo:
    id: int
    name: str
    alias: str
    size: int
    bitwidth: int


@dataclass
class P4Info:
    """A P4Info message with name <-> id maps.

    Lookups take a fully qualified name (``SwitchIngress.admission``) or, when it is
    unambiguous, the alias (``admission``); an unknown name raises ``KeyError`` listing the
    names there are.
    """

    message: p4info_pb2.P4Info
    source: str = "<message>"  #: where it was loaded from, for messages
    tables: dict[int, TableInfo] = field(init=False)
    actions: dict[int, ActionInfo] = field(init=False)
    counters: dict[int, CounterInfo] = field(init=False)
    registers: dict[int, RegisterInfo] = field(init=False)

    def __post_init__(self) -> None:
        m = self.message
        self.actions = {
            a.preamble.id: ActionInfo(a.preamble.id, a.preamble.name, a.preamble.alias,
                                      tuple(ParamInfo(p.id, p.name, p.bitwidth) for p in a.params))
            for a in m.actions
        }
        self.tables = {}
        for t in m.tables:
            refs = list(t.action_refs)
            self.tables[t.preamble.id] = TableInfo(
                t.preamble.id, t.preamble.name, t.preamble.alias,
                tuple(MatchFieldInfo(f.id, f.name, f.bitwidth, f.match_type) for f in t.match_fields),
                frozenset(r.id for r in refs),
                frozenset(r.id for r in refs if r.scope == p4info_pb2.ActionRef.DEFAULT_ONLY),
                frozenset(r.id for r in refs if r.scope == p4info_pb2.ActionRef.TABLE_ONLY),
                t.const_default_action_id,
                t.initial_default_action.action_id if t.HasField("initial_default_action") else 0,
                t.size,
            )
        self.counters = {c.preamble.id: CounterInfo(c.preamble.id, c.preamble.name, c.preamble.alias, c.size,
                                                    c.spec.unit) for c in m.counters}
        self.registers = {}
        for r in m.registers:
            width = r.type_spec.bitstring.bit.bitwidth if r.type_spec.HasField("bitstring") else 0
            self.registers[r.preamble.id] = RegisterInfo(r.preamble.id, r.preamble.name, r.preamble.alias, r.size,
                                                         width)

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> P4Info:
        """Read a P4Info file: protobuf text (``.txt``, ``.txtpb``, ``.pb.txt``) or binary."""
        path = Path(path) if path is not None else default_p4info_path()
        data = path.read_bytes()
        message = p4info_pb2.P4Info()
        try:
            text_format.Parse(data.decode("utf-8"), message, allow_unknown_field=True)
        except (UnicodeDecodeError, text_format.ParseError) as text_error:
            try:
                message = p4info_pb2.P4Info.FromString(data)
            except Exception:  # noqa: BLE001 - report the text parse error, the likelier intent
                raise ValueError(f"{path} is not a P4Info file (protobuf text or binary): {text_error}") from None
        if not message.tables:
            raise ValueError(f"{path}: a P4Info without tables; is this the P4Info of switchml's program?")
        return cls(message, str(path))

    @classmethod
    def default(cls) -> P4Info:
        """The contract: ``p4/switchml_v1model.p4info.txtpb``."""
        return cls.load(default_p4info_path())

    # ------------------------------------------------------------ lookups
    @staticmethod
    def _find(items: Iterable, name: str, kind: str):
        items = list(items)
        exact = [i for i in items if i.name == name]
        if exact:
            return exact[0]
        aliased = [i for i in items if i.alias == name]
        if len(aliased) == 1:
            return aliased[0]
        raise KeyError(f"the P4Info has no {kind} {name!r}; it has {sorted(i.name for i in items)}")

    def table(self, name: str) -> TableInfo:
        return self._find(self.tables.values(), name, "table")

    def action(self, name: str) -> ActionInfo:
        return self._find(self.actions.values(), name, "action")

    def counter(self, name: str) -> CounterInfo:
        return self._find(self.counters.values(), name, "counter")

    def register(self, name: str) -> RegisterInfo:
        return self._find(self.registers.values(), name, "register")

    def has_counter(self, name: str) -> bool:
        try:
            self.counter(name)
        except KeyError:
            return False
        return True

    def name(self, p4_id: int) -> str:
        """The name of any object by its id (``<unknown id N>`` if there is none)."""
        for group in (self.tables, self.actions, self.counters, self.registers):
            if p4_id in group:
                return group[p4_id].name
        return f"<unknown id {p4_id}>"

    # ------------------------------------------------------------ comparing
    def signature(self) -> dict[str, object]:
        """What a pipeline must agree on to be programmed by the same controller: table,
        match-field, action and parameter names and widths, and counter names."""
        actions = {a.name: tuple((p.name, p.bitwidth) for p in a.params) for a in self.actions.values()}
        tables = {
            t.name: (tuple((f.name, f.bitwidth, f.match_type) for f in t.match_fields),
                     tuple(sorted(self.actions[i].name for i in t.action_ids if i in self.actions)))
            for t in self.tables.values()
        }
        return {"tables": tables, "actions": actions, "counters": sorted(c.name for c in self.counters.values())}

    def differences(self, other: P4Info) -> list[str]:
        """How ``other`` differs from this P4Info, by signature; empty when they agree."""
        mine, theirs = self.signature(), other.signature()
        out: list[str] = []
        for kind in ("tables", "actions"):
            a, b = mine[kind], theirs[kind]
            out += [f"{kind[:-1]} {n} is missing" for n in sorted(set(a) - set(b))]
            out += [f"{kind[:-1]} {n} is not in the served pipeline" for n in sorted(set(b) - set(a))]
            out += [f"{kind[:-1]} {n} differs: {b[n]} instead of {a[n]}" for n in sorted(set(a) & set(b))
                    if a[n] != b[n]]
        missing = sorted(set(mine["counters"]) - set(theirs["counters"]))
        out += [f"counter {n} is missing" for n in missing]
        return out


# ---------------------------------------------------------------- the leaf role
def with_leaf_role() -> P4Info:
    """The leaf role's contract: ``p4/switchml_v1model_leaf.p4info.txtpb``.

    It is what p4c writes for ``p4/switchml_v1model.p4`` built with ``-DSWITCHML_LEAF_ROLE``:
    the flat contract with every id kept, plus the upstream table, its ``set_upstream`` action,
    the ``leaf`` counter and the ``has_result`` register (docs/hierarchy.md). A BMv2 leaf runs
    that program; a software switch serving P4Runtime as a leaf serves the same P4Info, so one
    ``P4RuntimeTarget`` given it programs either.
    """
    return P4Info.load(leaf_p4info_path())


def has_leaf_role(p4info: P4Info) -> bool:
    """Whether ``p4info`` has the leaf role's upstream table (``with_leaf_role``)."""
    return any(t.name == pipeline.UPSTREAM_TABLE for t in p4info.tables.values())


# ---------------------------------------------------------------- bytestrings
def encode_int(value: int, bitwidth: int) -> bytes:
    """``value`` as a P4Runtime bytestring padded to ceil(bitwidth / 8) bytes (what BMv2 and
    every P4Runtime version accept)."""
    if value < 0 or value >= 1 << bitwidth:
        raise ValueError(f"{value} does not fit in {bitwidth} bits")
    return value.to_bytes((bitwidth + 7) // 8, "big")


def decode_int(data: bytes, bitwidth: int) -> int:
    """A bytestring as an integer; both the padded and the canonical (shortest) form are
    accepted, as P4Runtime 1.1+ requires. Raises ``ValueError`` when it does not fit."""
    if not data:
        raise ValueError("empty bytestring")
    if len(data) > (bitwidth + 7) // 8:
        raise ValueError(f"{len(data)}-byte bytestring for a {bitwidth}-bit field")
    value = int.from_bytes(data, "big")
    if value >= 1 << bitwidth:
        raise ValueError(f"value {value:#x} does not fit in {bitwidth} bits")
    return value


def ip_to_int(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def int_to_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def mac_to_int(mac: str) -> int:
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return int("".join(parts), 16)


def int_to_mac(value: int) -> str:
    raw = value.to_bytes(6, "big")
    return ":".join(f"{b:02x}" for b in raw)


#: ``set_upstream``'s parameters that are addresses: (to a P4Runtime integer, back to text).
_UPSTREAM_ADDRESSES = {"ip": (ip_to_int, int_to_ip), "src_ip": (ip_to_int, int_to_ip), "mac": (mac_to_int, int_to_mac)}


def upstream_params(entry: pipeline.UpstreamEntry) -> dict[str, int]:
    """``entry`` as ``set_upstream``'s parameters, P4Runtime integers by name (the controller's side)."""
    return {name: _UPSTREAM_ADDRESSES[name][0](value) if name in _UPSTREAM_ADDRESSES else value
            for name in pipeline.SET_UPSTREAM_PARAMS for value in [getattr(entry, name)]}


def upstream_entry(job: int, params: dict[str, int]) -> pipeline.UpstreamEntry:
    """``set_upstream``'s parameters of job ``job`` as an ``UpstreamEntry`` (the switch's side);
    ``ValueError`` when one is out of range."""
    return pipeline.UpstreamEntry(job, **{
        name: _UPSTREAM_ADDRESSES[name][1](params[name]) if name in _UPSTREAM_ADDRESSES else params[name]
        for name in pipeline.SET_UPSTREAM_PARAMS})
