"""A small reader of this project's P4 programs, for tests/test_p4_contract.py.

Preprocessor, tokenizer, and a recursive-descent pass over headers, constants, parsers,
controls, tables, actions and extern instances of ``p4/switchml_v1model.p4`` and
``p4/switchml_tna.p4``: enough to check them against the Python contract, not a P4 compiler.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from switchml.pipeline import LEAF_ROLE_DEFINE

ROOT = Path(__file__).resolve().parents[1]
P4_DIR = ROOT / "p4"
PROGRAMS = {"v1model": P4_DIR / "switchml_v1model.p4", "tna": P4_DIR / "switchml_tna.p4"}
#: Other builds of a program, with -D macros: name -> (program, macros).
BUILDS = {"v1model_leaf": ("v1model", {LEAF_ROLE_DEFINE: "1"})}

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
        """Width of ``a.b.c`` where ``a`` is a control parameter, of a slice ``a.b[hi:lo]``, or
        of ``a.b.isValid()`` (a bool)."""
        if path.endswith(".isValid()"):
            return 1
        slice_ = re.fullmatch(r"(.*)\[(\d+):(\d+)\]", path)
        if slice_:
            return int(slice_.group(2)) - int(slice_.group(3)) + 1
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
    """A program of ``PROGRAMS`` or a build of ``BUILDS``, read."""
    program = Program()
    source, defines = BUILDS.get(target, (target, {}))
    program.macros.update(defines)
    text = preprocess(PROGRAMS[source], program.macros)
    tokens = tokenize(expand_macros(text, program.macros))
    Reader(tokens, program).program_()
    expand(program)
    return program
