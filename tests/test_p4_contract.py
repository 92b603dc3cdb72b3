"""The P4 programs, their P4Info and the Python contract cannot drift apart.

``p4/switchml_v1model.p4`` and ``p4/switchml_tna.p4`` are read by a small P4 reader
(``tests/p4reader.py``: preprocessor, tokenizer, and a recursive-descent pass over headers,
constants, parsers, controls, tables, actions and extern instances). What it finds is checked against

- ``p4/switchml_v1model.p4info.txtpb`` (tables, keys, actions, parameters, counters,
  registers, and p4c's ID and alias scheme),
- ``switchml.pipeline`` (names, drop reasons, counter sizes) and ``switchml.defaults``,
- ``switchml.protocol`` (UDP port, message types, the k = 64 size enum, the header layout,
  which must decode ``tests/data/wire_v1.json`` field by field as the protocol module does),
- ``p4/gen_registers.py`` (the committed generated files are its output).

Tests that need the P4 compilers run when ``p4c-bm2-ss`` (or ``bf-p4c``) is on PATH and
skip with that reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from p4reader import P4_DIR, PROGRAMS, Program, read_program

from switchml import defaults, pipeline, protocol

P4INFO = P4_DIR / "switchml_v1model.p4info.txtpb"
LEAF_P4INFO = P4_DIR / "switchml_v1model_leaf.p4info.txtpb"
#: Each v1model build and its committed P4Info: the flat switch, and the leaf role (-DSWITCHML_LEAF_ROLE).
V1MODEL_BUILDS = {"v1model": P4INFO, "v1model_leaf": LEAF_P4INFO}
#: p4c's command-line defines of each build.
BUILD_DEFINES = {"v1model": [], "v1model_leaf": [f"-D{pipeline.LEAF_ROLE_DEFINE}"]}
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire_v1.json"
K = pipeline.P4_K  # the P4 targets' compiled-in elements per packet: Python's one constant, checked below


# ---------------------------------------------------------------------------------------
# P4Info
# ---------------------------------------------------------------------------------------

def load_p4info(path: Path):
    p4info_pb2 = pytest.importorskip("p4.config.v1.p4info_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    return text_format.Parse(path.read_text(), p4info_pb2.P4Info())


@pytest.fixture(scope="module")
def p4info():
    return load_p4info(P4INFO)


@pytest.fixture(scope="module", params=sorted(V1MODEL_BUILDS))
def build(request):
    """(a v1model build's name, its committed P4Info)."""
    return request.param, load_p4info(V1MODEL_BUILDS[request.param])


def jenkins_one_at_a_time(name: str) -> int:
    """p4c's hash of a P4Runtime name (control-plane/p4RuntimeSymbolTable.cpp)."""
    h = 0
    for byte in name.encode():
        h = (h + byte) & 0xFFFFFFFF
        h = (h + (h << 10)) & 0xFFFFFFFF
        h ^= h >> 6
    h = (h + (h << 3)) & 0xFFFFFFFF
    h ^= h >> 11
    return (h + (h << 15)) & 0xFFFFFFFF


def p4c_ids(names_by_prefix: dict[int, list[str]]) -> dict[str, int]:
    """IDs as p4c assigns them: per resource type, names in sorted order, linear probing."""
    assigned: set[int] = set()
    ids = {}
    for prefix, names in names_by_prefix.items():
        for name in sorted(names):
            h = jenkins_one_at_a_time(name)
            while (prefix << 24 | (h & 0xFFFFFF)) in assigned:
                h += 1
            ids[name] = prefix << 24 | (h & 0xFFFFFF)
            assigned.add(ids[name])
    return ids


def shortest_unique_suffix(name: str, names: list[str]) -> str:
    parts = name.split(".")
    for n in range(1, len(parts) + 1):
        if sum(other.split(".")[-n:] == parts[-n:] for other in names) < 2:
            return ".".join(parts[-n:])
    return name


def summarize(info) -> dict:
    """The parts of a P4Info that the programs and the controller depend on."""
    from p4.config.v1 import p4info_pb2

    match_type = p4info_pb2.MatchField.MatchType.Name
    unit = p4info_pb2.CounterSpec.Unit.Name
    return {
        "tables": {t.preamble.name: {
            "id": t.preamble.id, "alias": t.preamble.alias,
            "keys": [(m.id, m.name, m.bitwidth, match_type(m.match_type)) for m in t.match_fields],
            "actions": sorted((a.id, a.scope) for a in t.action_refs),
            "const_default_action_id": t.const_default_action_id, "size": t.size,
        } for t in info.tables},
        "actions": {a.preamble.name: {
            "id": a.preamble.id, "alias": a.preamble.alias,
            "params": [(p.id, p.name, p.bitwidth) for p in a.params],
        } for a in info.actions},
        "counters": {c.preamble.name: (c.preamble.id, c.preamble.alias, unit(c.spec.unit), c.size)
                     for c in info.counters},
        "registers": {r.preamble.name: (r.preamble.id, r.preamble.alias, r.type_spec.bitstring.bit.bitwidth, r.size)
                      for r in info.registers},
    }


# ---------------------------------------------------------------------------------------
# The generated register code
# ---------------------------------------------------------------------------------------

def load_generator():
    spec = importlib.util.spec_from_file_location("gen_registers", P4_DIR / "gen_registers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_register_code_is_what_the_generator_writes():
    generator = load_generator()
    assert generator.read_k() == K
    for path, text in generator.outputs().items():
        assert path.exists(), f"{path} is missing: run python3 p4/gen_registers.py"
        assert path.read_text() == text, f"{path.name} is out of date: run python3 p4/gen_registers.py"


def test_generated_registers_cover_every_element():
    v1 = read_program("v1model")
    values = [name for name in v1.registers if name.startswith("SwitchIngress.values.")]
    assert values == [f"SwitchIngress.values.value_{i:02d}" for i in range(K)]
    tna = read_program("tna")
    pairs = [name for name in tna.registers if name.startswith("SwitchIngress.values.")]
    assert pairs == [f"SwitchIngress.values.value_{i:02d}" for i in range(K // 2)]
    assert all(tna.registers[p][0] == 64 for p in pairs)  # a pair of int32 elements


# ---------------------------------------------------------------------------------------
# v1model program <-> P4Info
# ---------------------------------------------------------------------------------------

def test_p4info_ids_and_aliases_are_those_p4c_assigns(build):
    _, p4info = build
    prefixes = {"tables": 0x02, "actions": 0x01, "counters": 0x12, "registers": 0x16}
    groups = {prefixes[kind]: [e.preamble.name for e in getattr(p4info, kind)] for kind in prefixes}
    expected = p4c_ids(groups)
    every_name = [n for names in groups.values() for n in names]
    for kind in prefixes:
        for entity in getattr(p4info, kind):
            pre = entity.preamble
            assert pre.id == expected[pre.name], f"{kind} {pre.name}: id {pre.id:#x}, p4c gives {expected[pre.name]:#x}"
            assert pre.alias == shortest_unique_suffix(pre.name, every_name), pre.name
    assert p4info.pkg_info.arch == "v1model"


def test_p4info_tables_are_the_programs(build):
    from p4.config.v1 import p4info_pb2

    name, p4info = build
    program = read_program(name)
    ids = {a.preamble.id: a.preamble.name for a in p4info.actions}
    assert sorted(t.preamble.name for t in p4info.tables) == sorted(program.tables)
    for t in p4info.tables:
        table = program.tables[t.preamble.name]
        keys = [(m.name, m.bitwidth, p4info_pb2.MatchField.MatchType.Name(m.match_type)) for m in t.match_fields]
        assert keys == table.keys, t.preamble.name
        assert [m.id for m in t.match_fields] == list(range(1, len(keys) + 1))
        refs = {ids[a.id]: a.scope == p4info_pb2.ActionRef.DEFAULT_ONLY for a in t.action_refs}
        assert refs == table.actions, t.preamble.name
        assert ids[t.initial_default_action.action_id] == table.default_action, t.preamble.name
        assert (ids.get(t.const_default_action_id) if t.const_default_action_id else None) == (
            table.default_action if table.const_default else None), t.preamble.name
        assert t.size == table.size, t.preamble.name


def test_p4info_actions_are_the_programs(build):
    name, p4info = build
    program = read_program(name)
    in_p4info = {a.preamble.name: [(p.name, p.bitwidth) for p in a.params] for a in p4info.actions}
    assert in_p4info == program.actions
    for a in p4info.actions:
        assert [p.id for p in a.params] == list(range(1, len(a.params) + 1)), a.preamble.name


def test_p4info_counters_and_registers_are_the_programs(build):
    from p4.config.v1 import p4info_pb2

    name, p4info = build
    program = read_program(name)
    counters = {c.preamble.name: (c.size, p4info_pb2.CounterSpec.Unit.Name(c.spec.unit)) for c in p4info.counters}
    assert counters == program.counters
    registers = {r.preamble.name: (r.type_spec.bitstring.bit.bitwidth, r.size) for r in p4info.registers}
    assert registers == program.registers


def test_the_leaf_build_adds_the_leaf_role_and_keeps_every_object_of_the_flat_program(p4info):
    """The leaf P4Info is the flat one, every id kept, plus the leaf role's table, action, counter and
    register, named and sized as switchml.pipeline says; so a controller holding either programs the rest."""
    flat, leaf = summarize(p4info), summarize(load_p4info(LEAF_P4INFO))
    added = {kind: sorted(set(leaf[kind]) - set(flat[kind])) for kind in flat}
    assert added == {"tables": [pipeline.UPSTREAM_TABLE], "actions": [pipeline.SET_UPSTREAM_ACTION],
                     "counters": [pipeline.LEAF_COUNTER], "registers": [pipeline.HAS_RESULT_REGISTER]}
    for kind in flat:
        assert {n: leaf[kind][n] for n in flat[kind]} == flat[kind], kind  # the same ids, keys, params, sizes
    program = read_program("v1model_leaf")
    assert tuple(k[0] for k in program.tables[pipeline.UPSTREAM_TABLE].keys) == pipeline.UPSTREAM_KEYS
    assert tuple(p for p, _ in program.actions[pipeline.SET_UPSTREAM_ACTION]) == pipeline.SET_UPSTREAM_PARAMS
    assert program.counters[pipeline.LEAF_COUNTER] == (pipeline.NUM_LEAF_COUNTERS, "PACKETS")
    assert program.registers[pipeline.HAS_RESULT_REGISTER] == (1, 2 * defaults.POOL_SIZE)
    assert {n[len("LEAF_"):]: v for n, v in program.consts.items() if n.startswith("LEAF_")} == {
        c.name: c.value for c in pipeline.LeafCounter}
    upstream = dict(program.actions[pipeline.SET_UPSTREAM_ACTION])
    worker = dict(program.actions[pipeline.SET_WORKER_ACTION])
    assert {n: upstream[n] for n in ("mgid", "pool_base", "pool_size")} == {
        n: worker[n] for n in ("mgid", "pool_base", "pool_size")}
    assert (upstream["ip"], upstream["src_ip"], upstream["mac"]) == (32, 32, 48)
    assert upstream["udp_port"] == upstream["src_udp_port"] == 16


# ---------------------------------------------------------------------------------------
# Both programs <-> switchml.pipeline, switchml.defaults
# ---------------------------------------------------------------------------------------

CONTRACT_TABLES = [
    (pipeline.ADMISSION_TABLE, pipeline.ADMISSION_KEYS,
     {pipeline.SET_WORKER_ACTION: pipeline.SET_WORKER_PARAMS, pipeline.SET_CONTROLLER_ACTION: ()}),
    (pipeline.EGRESS_REWRITE_TABLE, pipeline.EGRESS_REWRITE_KEYS,
     {pipeline.SET_DESTINATION_ACTION: pipeline.SET_DESTINATION_PARAMS}),
    (pipeline.LOSS_TABLE, pipeline.LOSS_KEYS,
     {pipeline.SET_DROP_PROBABILITY_ACTION: pipeline.SET_DROP_PROBABILITY_PARAMS}),
    (pipeline.FORWARD_TABLE, pipeline.FORWARD_KEYS, {pipeline.SET_EGRESS_ACTION: None}),
]


@pytest.mark.parametrize("target", sorted(PROGRAMS))
@pytest.mark.parametrize("table, keys, actions", CONTRACT_TABLES, ids=[t[0] for t in CONTRACT_TABLES])
def test_contract_tables_in_both_programs(target, table, keys, actions):
    program = read_program(target)
    assert table in program.tables, f"{target}: no table {table}"
    assert tuple(k[0] for k in program.tables[table].keys) == keys
    for action, params in actions.items():
        assert action in program.tables[table].actions, f"{target}: {table} cannot run {action}"
        if params is not None:
            assert tuple(p for p, _ in program.actions[action]) == params


def test_tna_keys_and_parameters_match_the_p4info(p4info):
    """The TNA program's control-plane API is the v1model one, so one controller drives both."""
    tna = read_program("tna")
    v1 = read_program("v1model")
    for table in (pipeline.ADMISSION_TABLE, pipeline.EGRESS_REWRITE_TABLE, pipeline.LOSS_TABLE, pipeline.FORWARD_TABLE):
        assert tna.tables[table].keys == v1.tables[table].keys, table
        for action in v1.tables[table].actions:
            assert tna.actions[action] == v1.actions[action], action
    for counter in (pipeline.RESULTS_COUNTER, pipeline.RETRANSMISSIONS_COUNTER, pipeline.DROPS_COUNTER,
                    pipeline.PACKETS_COUNTER):
        assert tna.counters[counter] == v1.counters[counter], counter


@pytest.mark.parametrize("target", sorted(PROGRAMS))
def test_counters_have_the_contracts_sizes(target):
    counters = read_program(target).counters
    assert counters[pipeline.RESULTS_COUNTER] == (defaults.POOL_SIZE, "PACKETS")
    assert counters[pipeline.RETRANSMISSIONS_COUNTER] == (defaults.POOL_SIZE, "PACKETS")
    assert counters[pipeline.DROPS_COUNTER] == (pipeline.NUM_DROP_REASONS, "PACKETS")
    assert counters[pipeline.PACKETS_COUNTER] == (pipeline.NUM_PACKET_COUNTERS, "PACKETS")


def test_drop_reasons_and_packet_counters_are_the_pipelines():
    consts = read_program("v1model").consts
    assert {n[len("DROP_"):]: v for n, v in consts.items() if n.startswith("DROP_")} == {
        r.name: r.value for r in pipeline.DropReason}
    assert {n[len("PACKETS_"):]: v for n, v in consts.items() if n.startswith("PACKETS_")} == {
        c.name: c.value for c in pipeline.PacketCounter}
    macros = read_program("v1model").macros
    assert int(macros["NUM_DROP_REASONS"]) == pipeline.NUM_DROP_REASONS
    assert int(macros["NUM_PACKET_COUNTERS"]) == pipeline.NUM_PACKET_COUNTERS


@pytest.mark.parametrize("target", sorted(PROGRAMS))
def test_parameters_hold_the_values_the_controller_sends(target):
    program = read_program(target)
    worker = dict(program.actions[pipeline.SET_WORKER_ACTION])
    assert 2 ** worker["job"] == protocol.MAX_JOBS
    assert 2 ** worker["worker_id"] == protocol.MAX_WORKERS
    assert 2 ** worker["num_workers"] > protocol.MAX_WORKERS
    assert 2 ** worker["pool_base"] >= protocol.MAX_SLOTS
    assert 2 ** worker["pool_size"] > protocol.MAX_SLOTS
    loss = dict(program.actions[pipeline.SET_DROP_PROBABILITY_ACTION])
    assert 2 ** loss["threshold"] > pipeline.DROP_PROBABILITY_SCALE  # 32768 itself: always drop
    destination = dict(program.actions[pipeline.SET_DESTINATION_ACTION])
    assert destination == {"mac": 48, "ip": 32, "udp_port": 16}


def test_v1model_registers_hold_both_sets_of_every_slot():
    program = read_program("v1model")
    assert int(program.macros["POOL_SIZE"]) == defaults.POOL_SIZE
    for name, (_, size) in program.registers.items():
        assert size == 2 * defaults.POOL_SIZE, name
    assert program.registers["SwitchIngress.bookkeeping.seen"][0] == protocol.MAX_WORKERS
    assert program.registers["SwitchIngress.bookkeeping.max_exponent"][0] == 8
    assert int(program.macros["MAX_WORKERS"]) == protocol.MAX_WORKERS


# ---------------------------------------------------------------------------------------
# Headers and constants <-> switchml.protocol
# ---------------------------------------------------------------------------------------

def test_constants_are_the_protocols():
    program = read_program("v1model")
    c = program.consts
    assert (c["SWITCHML_UDP_PORT"], c["SWITCHML_UDP_PORT_MASK"]) == protocol.UDP_PORT_MATCH
    assert c["SWITCHML_UDP_PORT"] == protocol.UDP_PORT
    assert {n[len("MSG_TYPE_"):]: v for n, v in c.items() if n.startswith("MSG_TYPE_")} == {
        m.name: m.value for m in protocol.MsgType}
    assert int(program.macros["SWITCHML_K"]) == pipeline.P4_K  # constants.p4 and Python's one home of k agree
    assert pipeline.P4_SUPPORTED_K == (pipeline.P4_K,)
    assert c["SWITCHML_SIZE"] == protocol.K_TO_SIZE[K]
    assert c["SWITCHML_MAX_HARDWARE_SIZE"] == max(protocol.HARDWARE_SIZES)
    assert c["SWITCHML_UDP_LENGTH"] == c["UDP_HEADER_BYTES"] + protocol.packet_bytes(K)
    for k in (32, 128, 256):
        assert c[f"SWITCHML_SIZE_K{k}"] == protocol.K_TO_SIZE[k]
        assert c[f"SWITCHML_UDP_LENGTH_K{k}"] == c["UDP_HEADER_BYTES"] + protocol.packet_bytes(k)
    assert c["IPV4_HEADER_BYTES"] == 20 and c["UDP_HEADER_BYTES"] == 8


def test_switchml_header_layout_is_the_protocols():
    program = read_program("v1model")
    header = program.headers["switchml_h"]
    assert [f for f, _ in header] == [
        "msg_type", "unused", "size", "job_number", "tsi", "set_bit", "pool_unused", "slot"]
    assert sum(w for _, w in header) == 8 * protocol.HEADER_BYTES
    widths = dict(header)
    # pool_index is the last 16 bits: set is its top bit, slot its low bits
    pool_index_bits = widths["set_bit"] + widths["pool_unused"] + widths["slot"]
    assert pool_index_bits == 16
    assert 1 << (pool_index_bits - 1) == protocol.SET_BIT
    assert (1 << widths["slot"]) - 1 == protocol.SLOT_MASK
    assert program.headers["exponents_h"] == [("e0", 8), ("e1", 8)]
    assert 8 * protocol.EXPONENT_BYTES == 16
    payload = program.headers["payload_h"]
    assert payload == [(f"d{i:02d}", 8 * protocol.ELEMENT_BYTES) for i in range(K)]
    assert [f for f, _ in program.structs["headers_t"]][-3:] == ["switchml", "exponents", "payload"]


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def decode_with(layout: list[tuple[str, str, int]], data: bytes) -> dict[str, int]:
    """Slice ``data`` into the fields of ``layout``, most significant bit first, as P4 extracts."""
    total = sum(w for _, _, w in layout)
    assert len(data) * 8 >= total
    bits = int.from_bytes(data[:total // 8], "big")
    values, pos = {}, 0
    for header, name, width in layout:
        pos += width
        values[f"{header}.{name}"] = (bits >> (total - pos)) & ((1 << width) - 1)
    return values


def encode_with(layout: list[tuple[str, str, int]], values: dict[str, int]) -> bytes:
    bits, total = 0, 0
    for header, name, width in layout:
        bits = (bits << width) | (values[f"{header}.{name}"] & ((1 << width) - 1))
        total += width
    return bits.to_bytes(total // 8, "big")


WIRE = json.loads(WIRE_VECTORS.read_text())


@pytest.mark.parametrize("case", WIRE["cases"], ids=[c["name"] for c in WIRE["cases"]])
def test_header_layout_decodes_the_wire_vectors(case):
    program = read_program("v1model")
    data = bytes.fromhex(case["hex"])
    fields = case["fields"]
    preamble = program.layout("switchml_h", "exponents_h")
    got = decode_with(preamble, data)
    expected = protocol.decode_header(data)
    assert got["switchml_h.msg_type"] == fields["msg_type"] == expected.msg_type
    assert got["switchml_h.size"] == fields["size_enum"] == expected.size
    assert got["switchml_h.job_number"] == fields["job_number"] == expected.job_number
    assert got["switchml_h.tsi"] == fields["tsi"] == expected.tsi
    assert got["switchml_h.set_bit"] == fields["set"] == expected.set_bit
    assert got["switchml_h.slot"] == fields["slot"] == expected.slot
    assert got["switchml_h.unused"] == got["switchml_h.pool_unused"] == 0
    assert _signed(got["exponents_h.e0"], 8) == fields["e0"] == expected.e0
    assert _signed(got["exponents_h.e1"], 8) == fields["e1"] == expected.e1
    assert encode_with(preamble, got) == data[:protocol.PREAMBLE_BYTES]
    if fields["k"] == K:  # the one payload the P4 programs read
        whole = program.layout("switchml_h", "exponents_h", "payload_h")
        values = decode_with(whole, data)
        payload = [_signed(values[f"payload_h.d{i:02d}"], 32) for i in range(K)]
        assert payload == fields["payload"] == protocol.decode_packet(data).payload.tolist()
        assert encode_with(whole, values) == data


def _parse(program: Program, fields: dict[str, int]) -> list[str]:
    """The states the ingress parser walks for a UDP packet with ``fields``, from parse_udp on."""
    states = next(s for s in program.parsers.values() if "parse_switchml" in s)
    walked, name = [], "parse_udp"
    while name not in ("accept", "reject"):
        walked.append(name)
        state = states[name]
        if state.select is None:
            name = state.next_state
            continue
        values = [fields[e] for e in state.select.expressions]
        for keyset, target in state.select.cases:
            pairs = zip(keyset or [], values, strict=keyset is not None)
            if keyset is None or all(k is None or (v & k[1]) == (k[0] & k[1]) for k, v in pairs):
                name = target
                break
        else:
            name = "reject"
    return walked


def _udp_fields(data: bytes, dst_port: int = protocol.UDP_PORT) -> dict[str, int]:
    header = protocol.decode_header(data)
    return {"hdr.udp.dst_port": dst_port, "hdr.udp.length": 8 + len(data),
            "hdr.switchml.msg_type": header.msg_type, "hdr.switchml.size": header.size}


@pytest.mark.parametrize("target", sorted(PROGRAMS))
@pytest.mark.parametrize("case", WIRE["cases"], ids=[c["name"] for c in WIRE["cases"]])
def test_parser_reads_a_payload_only_for_k64(target, case):
    program = read_program(target)
    data = bytes.fromhex(case["hex"])
    walked = _parse(program, _udp_fields(data))
    assert "parse_switchml" in walked
    states = next(s for s in program.parsers.values() if "parse_switchml" in s)
    assert states["parse_payload"].extracts == ["hdr.payload"]
    assert ("parse_payload" in walked) == (case["fields"]["k"] == K)
    if case["fields"]["msg_type"] == protocol.MsgType.RESET and case["fields"]["size_enum"] in protocol.HARDWARE_SIZES:
        assert walked[-1] in ("parse_payload", "reset_without_payload")


@pytest.mark.parametrize("target", sorted(PROGRAMS))
def test_parser_rejects_other_sizes_and_lengths_as_k64(target):
    program = read_program(target)
    update64 = protocol.encode_packet(protocol.MsgType.UPDATE, 1, 0, 5, 0, 0, [0] * K)
    assert _parse(program, _udp_fields(update64))[-1] == "parse_payload"
    for k in protocol.SIZE_TO_K.values():
        if k != K:
            other = protocol.encode_packet(protocol.MsgType.UPDATE, 1, 0, 5, 0, 0, [0] * k)
            assert "parse_payload" not in _parse(program, _udp_fields(other)), k
            reset = protocol.encode_packet(protocol.MsgType.RESET, 1, 0, 5, 0, 0, [0] * k)
            walked = _parse(program, _udp_fields(reset))
            assert (walked[-1] == "reset_without_payload") == (protocol.K_TO_SIZE[k] in protocol.HARDWARE_SIZES), k
    for cut in (1, 4, 100):  # k = 64 by its size enum, yet too short or too long
        fields = _udp_fields(update64)
        assert "parse_payload" not in _parse(program, {**fields, "hdr.udp.length": fields["hdr.udp.length"] - cut})
        assert "parse_payload" not in _parse(program, {**fields, "hdr.udp.length": fields["hdr.udp.length"] + cut})


@pytest.mark.parametrize("target", sorted(PROGRAMS))
def test_parser_takes_the_sixteen_switchml_ports(target):
    program = read_program(target)
    update64 = protocol.encode_packet(protocol.MsgType.UPDATE, 1, 0, 5, 0, 0, [0] * K)
    base, mask = protocol.UDP_PORT_MATCH
    for port in (base - 1, base, base + 5, base + 15, base + 16, 0x0BEE, 53):
        walked = _parse(program, _udp_fields(update64, dst_port=port))
        assert ("parse_switchml" in walked) == (port & mask == base), hex(port)


# ---------------------------------------------------------------------------------------
# With the compilers
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("p4c-bm2-ss") is None, reason="p4c-bm2-ss is not on PATH")
def test_v1model_compiles_and_p4c_writes_the_committed_p4info(build, tmp_path):
    name, p4info = build
    out = tmp_path / "p4info.txtpb"  # p4c deprecates the .txt suffix
    result = subprocess.run(
        ["p4c-bm2-ss", *BUILD_DEFINES[name], "--p4runtime-files", str(out), "-o", str(tmp_path / "switchml.json"),
         str(PROGRAMS["v1model"])], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert summarize(load_p4info(out)) == summarize(p4info)


@pytest.mark.skipif(shutil.which("bf-p4c") is None, reason="bf-p4c (the Tofino back end of p4lang/p4c, built from source: docs/deploy.md) is not on PATH")
def test_tna_compiles_for_tofino_and_keeps_the_control_plane_contract(p4info, tmp_path):
    """bf-p4c places the program in Tofino 1's 12 stages (its assembler refuses more) and writes
    a tofino.bin; the P4Info it writes (standard externs, as Stratum takes them) has every
    table, key, action, parameter and counter of the contract as the v1model P4Info has them,
    so one controller drives both (ids differ: each P4Info is read at run time)."""
    p4info_pb2 = pytest.importorskip("p4.config.v1.p4info_pb2")
    from google.protobuf import text_format

    out = tmp_path / "build"
    tna_info = out / "switchml_tna.p4info.txtpb"
    result = subprocess.run(
        ["bf-p4c", "--arch", "tna", "--target", "tofino", "--p4runtime-force-std-externs",
         "--p4runtime-files", str(tna_info), "-o", str(out), str(PROGRAMS["tna"])],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "pipe" / "tofino.bin").stat().st_size > 0

    def contract(info) -> dict:
        view = summarize(info)
        return {
            "tables": {name: [key[1:] for key in t["keys"]] for name, t in view["tables"].items()},
            "actions": {name: [param[1:] for param in a["params"]] for name, a in view["actions"].items()},
            "counters": {name: c[2:] for name, c in view["counters"].items()},
        }

    compiled = contract(text_format.Parse(tna_info.read_text(), p4info_pb2.P4Info()))
    committed = contract(p4info)
    for kind, entries in committed.items():
        for name, spec in entries.items():
            assert compiled[kind].get(name) == spec, (kind, name, compiled[kind].get(name), spec)


def test_an_installed_package_ships_the_p4_folder(tmp_path):
    """A wheel has no p4/ beside the package: build_py copies it into switchml/p4/, and
    p4_dir() finds that copy."""
    build = tmp_path / "build"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=P4_DIR.parent,
                   check=True, capture_output=True, timeout=120)
    shipped = build / "switchml" / "p4"
    for path in P4_DIR.rglob("*.p4"):
        assert (shipped / path.relative_to(P4_DIR)).read_bytes() == path.read_bytes()
    assert (shipped / "switchml_v1model.p4info.txtpb").is_file()
    found = subprocess.run([sys.executable, "-c", "from switchml.p4info import p4_dir; print(p4_dir())"],
                           cwd=tmp_path, env={"PYTHONPATH": str(build), "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == shipped
