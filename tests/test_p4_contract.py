"""The P4 programs, their P4Info and the Python contract cannot drift apart.

``p4/switchml_v1model.p4`` and ``p4/switchml_tna.p4`` are read by a small P4 reader below
(preprocessor, tokenizer, and a recursive-descent pass over headers, constants, parsers,
controls, tables, actions and extern instances). What it finds is checked against

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

import ast
import importlib.util
import json
import operator
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

from switchml import defaults, pipeline, protocol

ROOT = Path(__file__).resolve().parents[1]
P4_DIR = ROOT / "p4"
PROGRAMS = {"v1model": P4_DIR / "switchml_v1model.p4", "tna": P4_DIR / "switchml_tna.p4"}
P4INFO = P4_DIR / "switchml_v1model.p4info.txtpb"
WIRE_VECTORS = Path(__file__).resolve().parent / "data" / "wire_v1.json"
K = 64  # the P4 targets' compiled-in elements per packet (DESIGN.md, Targets)

# Types the architecture files declare; the reader does not read core.p4, v1model.p4 or tna.p4.
SCALAR_WIDTHS = {"bool": 1, "PortId_t": 9, "MulticastGroupId_t": 16}
ARCHITECTURE_STRUCTS = {
    "standard_metadata_t": {
        "ingress_port": 9, "egress_spec": 9, "egress_port": 9, "instance_type": 32,
        "packet_length": 32, "mcast_grp": 16, "egress_rid": 16, "checksum_error": 1,
    },
    "ingress_intrinsic_metadata_t": {"resubmit_flag": 1, "packet_version": 2, "ingress_port": 9},
    "egress_intrinsic_metadata_t": {"egress_port": 9, "egress_rid": 16, "pkt_length": 16},
}
OPENING, CLOSING = {"(", "{", "["}, {")", "}", "]"}
COUNTER_UNITS = {"packets": "PACKETS", "bytes": "BYTES", "packets_and_bytes": "BOTH",
                 "PACKETS": "PACKETS", "BYTES": "BYTES", "PACKETS_AND_BYTES": "BOTH"}


# ---------------------------------------------------------------------------------------
# Preprocessor and tokenizer
# ---------------------------------------------------------------------------------------

def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def preprocess(path: Path, macros: dict[str, str]) -> str:
    """cpp, as far as these programs use it: quoted includes, #define, #ifndef/#ifdef/#else/#endif."""
    out: list[str] = []
    active: list[bool] = []
    for line in _strip_comments(path.read_text()).splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if all(active):
                out.append(line)
            continue
        directive, _, rest = stripped[1:].strip().partition(" ")
        rest = rest.strip()
        if directive in ("ifndef", "ifdef"):
            active.append((rest in macros) == (directive == "ifdef"))
        elif directive == "else":
            active[-1] = not active[-1]
        elif directive == "endif":
            active.pop()
        elif not all(active):
            continue
        elif directive == "define":
            name, _, value = rest.partition(" ")
            macros[name] = value.strip()
        elif directive == "include" and rest.startswith('"'):
            out.append(preprocess(path.parent / rest.strip('"'), macros))
        # <core.p4>, <v1model.p4>, <tna.p4>: the architecture, not this project's code
    return "\n".join(out)


def expand_macros(text: str, macros: dict[str, str]) -> str:
    for _ in range(10):
        expanded = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: macros.get(m.group(0), m.group(0)), text)
        if expanded == text:
            return text
        text = expanded
    raise ValueError("macro expansion does not terminate")


_TOKEN = re.compile(r"""\s*(?:
    (?P<tok>"(?:[^"\\]|\\.)*"
    | \d+[ws]\d+ | 0[xX][0-9a-fA-F_]+ | 0[bB][01_]+ | \d+
    | [A-Za-z_]\w*
    | &&& | \+\+ | && | \|\| | == | != | <= | >=
    | [{}()\[\];:,.<>=@&|^~!?+\-*/%])
    | (?P<end>$))""", re.VERBOSE)


def tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    while True:
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"cannot tokenize P4 at {text[pos:pos + 40]!r}")
        if match.group("end") is not None:
            return tokens
        tokens.append(match.group("tok"))
        pos = match.end()


def parse_int(token: str) -> int:
    token = token.replace("_", "")
    if re.fullmatch(r"\d+[ws]\d+", token):
        return int(re.split(r"[ws]", token)[1])
    return int(token, 0)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.FloorDiv: operator.floordiv, ast.LShift: operator.lshift, ast.RShift: operator.rshift,
              ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor}


def evaluate(tokens: list[str], consts: dict[str, int]) -> int:
    """The value of a constant integer expression."""
    parts: list[str] = []
    for i, tok in enumerate(tokens):
        if tok in consts:
            parts.append(str(consts[tok]))
        elif tok[0].isdigit():
            parts.append(str(parse_int(tok)))
        elif tok in ("<", ">") and i + 1 < len(tokens) and tokens[i + 1] == tok:
            parts.append(tok)  # the first half of a shift
        elif tok in ("<", ">") and i > 0 and tokens[i - 1] == tok:
            parts.append(tok + " ")
        elif tok in "+-*()&|^~":
            parts.append(f" {tok} ")
        elif tok == "/":
            parts.append(" // ")
        else:
            raise ValueError(f"not a constant expression: {' '.join(tokens)}")

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return ~walk(node.operand)
        raise ValueError(f"not a constant expression: {' '.join(tokens)}")

    return walk(ast.parse("".join(parts).strip(), mode="eval"))


# ---------------------------------------------------------------------------------------
# Reader: what a P4 program declares
# ---------------------------------------------------------------------------------------

@dataclass
class TypeRef:
    name: str
    args: list[TypeRef | str] = field(default_factory=list)


@dataclass
class Key:
    name: str  # the P4Runtime name: @name, else the expression's text
    expression: str
    match_kind: str


@dataclass
class TableDecl:
    name: str
    keys: list[Key]
    actions: list[tuple[str, bool]]  # (action, @defaultonly)
    default_action: str | None
    const_default: bool
    size: int | None


@dataclass
class Instance:
    type: TypeRef
    args: list[list[str]]
    name: str


@dataclass
class ControlDecl:
    name: str
    params: dict[str, TypeRef]
    actions: dict[str, list[tuple[str, TypeRef]]]
    tables: list[TableDecl]
    instances: list[Instance]


@dataclass
class Select:
    expressions: list[str]
    cases: list[tuple[list[tuple[int, int] | None] | None, str]]  # (keyset, next state); None = default


@dataclass
class State:
    extracts: list[str]
    next_state: str | None = None
    select: Select | None = None


@dataclass
class Table:
    """A table as P4Runtime sees it: full names, key widths."""

    keys: list[tuple[str, int, str]]  # (name, bitwidth, match kind)
    actions: dict[str, bool]  # full action name -> @defaultonly
    default_action: str | None
    const_default: bool
    size: int | None


@dataclass
class Program:
    headers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    structs: dict[str, list[tuple[str, TypeRef]]] = field(default_factory=dict)
    typedefs: dict[str, TypeRef] = field(default_factory=dict)
    consts: dict[str, int] = field(default_factory=dict)
    macros: dict[str, str] = field(default_factory=dict)
    controls: dict[str, ControlDecl] = field(default_factory=dict)
    parsers: dict[str, dict[str, State]] = field(default_factory=dict)
    # the control-plane view, filled by expand()
    tables: dict[str, Table] = field(default_factory=dict)
    actions: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    counters: dict[str, tuple[int, str]] = field(default_factory=dict)
    registers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def width(self, type_: TypeRef) -> int:
        if type_.name in ("bit", "int"):
            arg = type_.args[0]
            return arg if isinstance(arg, int) else evaluate([str(arg)], self.consts)
        if type_.name in SCALAR_WIDTHS:
            return SCALAR_WIDTHS[type_.name]
        if type_.name in self.typedefs:
            return self.width(self.typedefs[type_.name])
        if type_.name in self.headers:
            return sum(w for _, w in self.headers[type_.name])
        if type_.name in self.structs:
            return sum(self.width(t) for _, t in self.structs[type_.name])
        raise KeyError(f"width of type {type_.name}")

    def path_width(self, path: str, params: dict[str, TypeRef]) -> int:
        """Width of ``a.b.c`` where ``a`` is a control parameter."""
        first, *rest = path.split(".")
        type_ = params[first]
        for name in rest:
            if type_.name in ARCHITECTURE_STRUCTS:
                return ARCHITECTURE_STRUCTS[type_.name][name]
            if type_.name in self.headers:
                return dict(self.headers[type_.name])[name]
            type_ = dict(self.structs[type_.name])[name]
        return self.width(type_)

    def layout(self, *headers: str) -> list[tuple[str, str, int]]:
        return [(h, f, w) for h in headers for f, w in self.headers[h]]


class Reader:
    """Recursive descent over the token list; skips what the checks do not need."""

    def __init__(self, tokens: list[str], program: Program) -> None:
        self.tokens = tokens
        self.pos = 0
        self.program = program

    # -- primitives
    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def next(self) -> str:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, tok: str) -> None:
        got = self.next()
        if got != tok:
            raise ValueError(f"expected {tok!r}, got {got!r} near {' '.join(self.tokens[self.pos - 8:self.pos + 8])}")

    def balanced(self) -> list[str]:
        """Consume a bracketed group starting at the current token; return its inside."""
        pairs = {"(": ")", "{": "}", "[": "]", "<": ">"}
        opening = self.next()
        closing, depth, inside = pairs[opening], 1, []
        while True:
            tok = self.next()
            if tok == opening:
                depth += 1
            elif tok == closing:
                depth -= 1
                if depth == 0:
                    return inside
            inside.append(tok)

    def until(self, stop: str) -> list[str]:
        """Tokens up to ``stop`` at bracket depth 0 (``stop`` consumed)."""
        out, depth = [], 0
        while True:
            tok = self.next()
            if tok == stop and depth == 0:
                return out
            depth += (tok in OPENING) - (tok in CLOSING)
            out.append(tok)

    def annotations(self) -> dict[str, list[str]]:
        found = {}
        while self.peek() == "@":
            self.next()
            name = self.next()
            found[name] = self.balanced() if self.peek() == "(" else []
        return found

    def type_ref(self) -> TypeRef:
        name = self.next()
        args: list[TypeRef | str] = []
        if self.peek() == "<":
            self.next()
            while True:
                if self.peek()[0].isdigit():
                    args.append(self.next())
                elif self.peek() == "(":
                    args.append(" ".join(self.balanced()))
                else:
                    args.append(self.type_ref())
                sep = self.next()
                if sep == ">":
                    break
                if sep != ",":
                    raise ValueError(f"bad type arguments of {name}")
        for i, arg in enumerate(args):
            if isinstance(arg, str) and name in ("bit", "int"):
                args[i] = evaluate(tokenize(arg), self.program.consts)
        return TypeRef(name, args)

    @staticmethod
    def split_commas(tokens: list[str]) -> list[list[str]]:
        parts, current, depth = [], [], 0
        for tok in tokens:
            if tok == "," and depth == 0:
                parts.append(current)
                current = []
                continue
            depth += (tok in OPENING) - (tok in CLOSING)
            current.append(tok)
        if current:
            parts.append(current)
        return parts

    def params(self) -> dict[str, TypeRef]:
        result = {}
        for part in self.split_commas(self.balanced()):
            sub = Reader(part, self.program)
            sub.annotations()
            if sub.peek() in ("in", "out", "inout"):
                sub.next()
            type_ = sub.type_ref()
            result[sub.next()] = type_
        return result

    # -- top level
    def program_(self) -> None:
        while self.peek() is not None:
            self.annotations()
            tok = self.peek()
            if tok in ("header", "struct"):
                self.fields()
            elif tok == "const":
                self.next()
                type_ = self.type_ref()
                name = self.next()
                self.expect("=")
                value = self.until(";")
                self.program.consts[name] = evaluate(value, self.program.consts)
                del type_
            elif tok == "typedef":
                self.next()
                type_ = self.type_ref()
                self.program.typedefs[self.next()] = type_
                self.expect(";")
            elif tok == "control":
                self.control()
            elif tok == "parser":
                self.parser()
            else:  # the package instantiation
                self.until(";")

    def fields(self) -> None:
        kind = self.next()
        name = self.next()
        reader = Reader(self.balanced(), self.program)
        members = []
        while reader.peek() is not None:
            reader.annotations()
            type_ = reader.type_ref()
            members.append((reader.next(), type_))
            reader.expect(";")
        if kind == "header":
            self.program.headers[name] = [(f, self.program.width(t)) for f, t in members]
        else:
            self.program.structs[name] = members

    def control(self) -> None:
        self.expect("control")
        name = self.next()
        params = self.params()
        if self.peek() == ";":  # a declaration without a body
            self.next()
            return
        body = Reader(self.balanced(), self.program)
        decl = ControlDecl(name, params, {}, [], [])
        while body.peek() is not None:
            notes = body.annotations()
            tok = body.peek()
            if tok == "apply":
                body.next()
                body.balanced()
            elif tok == "action":
                body.next()
                action = body.next()
                action_params = body.params()
                decl.actions[action] = list(action_params.items())
                body.balanced()
            elif tok == "table":
                body.next()
                decl.tables.append(body.table(body.next()))
            elif tok == "const":
                body.until(";")
            else:
                type_ = body.type_ref()
                if body.peek() == "(":
                    args = self.split_commas(body.balanced())
                    instance = body.next()
                    if body.peek() == "=":  # RegisterAction and the like: an initializer block
                        body.next()
                        body.balanced()
                    body.expect(";")
                    decl.instances.append(Instance(type_, args, instance))
                else:  # a local variable
                    body.until(";")
            del notes
        self.program.controls[name] = decl

    def table(self, name: str) -> TableDecl:
        body = Reader(self.balanced(), self.program)
        table = TableDecl(name, [], [], None, False, None)
        while body.peek() is not None:
            const = body.peek() == "const"
            if const:
                body.next()
            prop = body.next()
            body.expect("=")
            if prop == "key":
                keys = Reader(body.balanced(), self.program)
                while keys.peek() is not None:
                    expression = "".join(keys.until(":"))
                    match_kind = keys.next()
                    notes = keys.annotations()
                    keys.expect(";")
                    p4rt_name = notes["name"][0].strip('"') if "name" in notes else expression
                    table.keys.append(Key(p4rt_name, expression, match_kind))
            elif prop == "actions":
                refs = Reader(body.balanced(), self.program)
                while refs.peek() is not None:
                    notes = refs.annotations()
                    action = refs.next()
                    if refs.peek() == "(":
                        refs.balanced()
                    refs.expect(";")
                    table.actions.append((action, "defaultonly" in notes))
            elif prop == "default_action":
                table.default_action = body.next()
                table.const_default = const
                if body.peek() == "(":
                    body.balanced()
                body.expect(";")
            elif prop == "size":
                table.size = evaluate(body.until(";"), self.program.consts)
            elif prop == "entries":
                body.balanced()
                if body.peek() == ";":
                    body.next()
            else:
                body.until(";")
        return table

    def parser(self) -> None:
        self.expect("parser")
        name = self.next()
        self.params()
        if self.peek() == ";":
            self.next()
            return
        body = Reader(self.balanced(), self.program)
        states: dict[str, State] = {}
        while body.peek() is not None:
            if body.next() != "state":
                continue
            state_name = body.next()
            inside = body.balanced()
            state = State(extracts=[
                "".join(inside[i + 2:i + 2 + inside[i + 2:].index(")")])
                for i, tok in enumerate(inside) if tok == "extract" and inside[i + 1] == "("
            ])
            at = inside.index("transition")
            rest = Reader(inside[at + 1:], self.program)
            if rest.peek() == "select":
                rest.next()
                expressions = ["".join(e) for e in self.split_commas(rest.balanced())]
                cases = Reader(rest.balanced(), self.program)
                select = Select(expressions, [])
                while cases.peek() is not None:
                    keyset = cases.until(":")
                    target = cases.next()
                    cases.expect(";")
                    select.cases.append((self.keyset(keyset, len(expressions)), target))
                state.select = select
            else:
                state.next_state = rest.next()
            states[state_name] = state
        self.program.parsers[name] = states

    def keyset(self, tokens: list[str], arity: int) -> list[tuple[int, int] | None] | None:
        if tokens == ["default"]:
            return None
        if arity > 1:
            if tokens[0] != "(" or tokens[-1] != ")":
                raise ValueError(f"keyset {tokens} for {arity} expressions")
            tokens = tokens[1:-1]
        elements = []
        for part in self.split_commas(tokens):
            if part == ["_"] or part == ["default"]:
                elements.append(None)
            elif "&&&" in part:
                i = part.index("&&&")
                elements.append((evaluate(part[:i], self.program.consts), evaluate(part[i + 1:], self.program.consts)))
            else:
                elements.append((evaluate(part, self.program.consts), -1))
        return elements


def expand(program: Program) -> None:
    """Name every table, action, counter and register the way p4c does for P4Runtime."""
    instantiated = {i.type.name for c in program.controls.values() for i in c.instances}
    for control in program.controls.values():
        if control.name not in instantiated:
            _expand(program, control, control.name)


def _expand(program: Program, control: ControlDecl, prefix: str) -> None:
    def action_name(name: str) -> str:
        return f"{prefix}.{name}" if name in control.actions else name  # NoAction is global

    for name, params in control.actions.items():
        program.actions[f"{prefix}.{name}"] = [(p, program.width(t)) for p, t in params]
    for t in control.tables:
        refs = {action_name(a): default_only for a, default_only in t.actions}
        for ref in refs:
            if ref not in program.actions:
                program.actions[ref] = []  # NoAction
        program.tables[f"{prefix}.{t.name}"] = Table(
            [(k.name, program.path_width(k.expression, control.params), k.match_kind.upper()) for k in t.keys],
            refs, action_name(t.default_action) if t.default_action else None, t.const_default, t.size)
    for inst in control.instances:
        full = f"{prefix}.{inst.name}"
        kind = inst.type.name
        if kind in program.controls:
            _expand(program, program.controls[kind], full)
        elif kind in ("counter", "Counter"):
            unit = COUNTER_UNITS[inst.args[1][-1]]
            program.counters[full] = (evaluate(inst.args[0], program.consts), unit)
        elif kind in ("register", "Register"):
            program.registers[full] = (program.width(inst.type.args[0]), evaluate(inst.args[0], program.consts))


@cache
def read_program(target: str) -> Program:
    program = Program()
    text = preprocess(PROGRAMS[target], program.macros)
    tokens = tokenize(expand_macros(text, program.macros))
    Reader(tokens, program).program_()
    expand(program)
    return program


# ---------------------------------------------------------------------------------------
# P4Info
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def p4info():
    p4info_pb2 = pytest.importorskip("p4.config.v1.p4info_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    return text_format.Parse(P4INFO.read_text(), p4info_pb2.P4Info())


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

def test_p4info_ids_and_aliases_are_those_p4c_assigns(p4info):
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


def test_p4info_tables_are_the_programs(p4info):
    from p4.config.v1 import p4info_pb2

    program = read_program("v1model")
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


def test_p4info_actions_are_the_programs(p4info):
    program = read_program("v1model")
    in_p4info = {a.preamble.name: [(p.name, p.bitwidth) for p in a.params] for a in p4info.actions}
    assert in_p4info == program.actions
    for a in p4info.actions:
        assert [p.id for p in a.params] == list(range(1, len(a.params) + 1)), a.preamble.name


def test_p4info_counters_and_registers_are_the_programs(p4info):
    from p4.config.v1 import p4info_pb2

    program = read_program("v1model")
    counters = {c.preamble.name: (c.size, p4info_pb2.CounterSpec.Unit.Name(c.spec.unit)) for c in p4info.counters}
    assert counters == program.counters
    registers = {r.preamble.name: (r.type_spec.bitstring.bit.bitwidth, r.size) for r in p4info.registers}
    assert registers == program.registers


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
    assert int(program.macros["SWITCHML_K"]) == K
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
def test_v1model_compiles_and_p4c_writes_the_committed_p4info(p4info, tmp_path):
    p4info_pb2 = pytest.importorskip("p4.config.v1.p4info_pb2")
    from google.protobuf import text_format

    out = tmp_path / "p4info.txtpb"  # p4c deprecates the .txt suffix
    result = subprocess.run(
        ["p4c-bm2-ss", "--p4runtime-files", str(out), "-o", str(tmp_path / "switchml.json"), str(PROGRAMS["v1model"])],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    compiled = text_format.Parse(out.read_text(), p4info_pb2.P4Info())
    assert summarize(compiled) == summarize(p4info)


@pytest.mark.skipif(shutil.which("bf-p4c") is None, reason="bf-p4c (Intel P4 Studio) is not on PATH")
def test_tna_compiles(tmp_path):
    result = subprocess.run(
        ["bf-p4c", "--arch", "tna", "-o", str(tmp_path / "build"), str(PROGRAMS["tna"])],
        capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr


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
