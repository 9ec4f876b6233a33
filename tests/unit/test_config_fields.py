"""Every field of `RunConfig` is read by some code path of `raylign/` (no Ray, nothing run).

A config key that nothing reads is a promise the code does not keep: the user sets it and nothing
changes (`rollout.workers` was one: the rollout group's size came from `resources.rollout_workers`).

The source of `raylign/` is parsed with `ast`. A field `f` of section class `S` counts as read when
  * an attribute access `<expr>.f` (a load, not an assignment) has a receiver `<expr>` that is an `S`.
    Receivers are typed by a small flow-insensitive inference over each file: parameter and variable
    annotations (`cfg: RolloutConfig`), assignments (`ro = config.rollout`, `rl, t = config.rl,
    config.train`, `self.config = RunConfig.model_validate(...)`, `S(...)`, `S.model_validate(...)`,
    `x.model_copy()`, `as_section(S, ...)`), `for` loops and comprehensions over a section's lists
    and dicts (`for name, task in config.multitask.tasks.items()`), `self.<attr>` of any class, and the
    return annotations of raylign's functions (`load_config(...) -> RunConfig`). The name alone is not
    enough: `self.rollout.workers` in the online loop is a `WorkerGroup`'s actors, not the removed
    `rollout.workers` key, and an untyped `x.name` reads nothing;
  * `getattr(<expr>, "f")` / `hasattr(...)` with `<expr>` an `S` or of unknown type;
  * the string `"f"` is used as a key, of any mapping: `d["f"]`, `d.get("f")`, `d.pop("f")`,
    `"f" in d` (config sections travel as `model_dump()` dicts too).
Reads inside `S`'s own class body do not count (a validator checking a field is no consumer), except
in a method of `S` that is not a validator and is called somewhere (`task.gate_parts()` reads `gate`).
"""

from __future__ import annotations

import ast
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import BaseModel

from raylign.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "raylign"

# A type the inference knows: (container, class name). container: "" (an instance), "class" (the
# class itself), "list" or "dict" (values of that class), "iter" (an iterator of them), "items"
# (dict.items() of them), "enum" (enumerate() of them); or ("tuple", (type or None, ...)).
Type = tuple[str, typing.Any]
Schema = dict[str, dict[str, Type | None]]  # section class -> field -> its type (None: a plain value)


# ---- the fields of RunConfig ---------------------------------------------------------------------


def _annotation_model(annotation) -> Type | None:
    """The section class inside a pydantic field annotation, with its container."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("", annotation.__name__)
    if origin in (list, tuple, set):
        inner = [_annotation_model(a) for a in typing.get_args(annotation)]
        found = next((t for t in inner if t), None)
        return ("list", found[1]) if found else None
    if origin is dict:
        args = typing.get_args(annotation)
        found = _annotation_model(args[1]) if len(args) == 2 else None
        return ("dict", found[1]) if found else None
    for arg in typing.get_args(annotation):  # Optional / Union
        found = _annotation_model(arg)
        if found:
            return found
    return None


def config_fields(model: type[BaseModel] = RunConfig) -> tuple[list[tuple[str, str, str]], Schema]:
    """[(dotted path, section class, field name)] of every field, recursively, and the schema."""
    fields: list[tuple[str, str, str]] = []
    schema: Schema = {}
    classes: dict[str, type[BaseModel]] = {}

    def walk(cls: type[BaseModel], prefix: str) -> None:
        classes[cls.__name__] = cls
        schema.setdefault(cls.__name__, {})
        for name, info in cls.model_fields.items():
            sub = _annotation_model(info.annotation)
            schema[cls.__name__][name] = sub
            path = f"{prefix}{name}"
            fields.append((path, cls.__name__, name))
            if sub:
                walk(classes.get(sub[1]) or _find_model(info.annotation, sub[1]),
                     path + {"": ".", "list": "[].", "dict": ".<name>."}[sub[0]])

    walk(model, "")
    return fields, schema


def _find_model(annotation, name: str) -> type[BaseModel]:
    if isinstance(annotation, type) and annotation.__name__ == name:
        return annotation
    for arg in typing.get_args(annotation):
        try:
            return _find_model(arg, name)
        except LookupError:
            pass
    raise LookupError(name)


# ---- reads in the source -------------------------------------------------------------------------

VALIDATOR_DECORATORS = {"model_validator", "field_validator", "validator", "root_validator", "computed_field"}
KEY_METHODS = {"get", "pop", "setdefault"}


@dataclass
class Reads:
    """What the source reads: typed reads {(class, field)}, untyped string keys, and own-class reads."""

    typed: set[tuple[str, str]] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    own: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (class, method) -> fields
    attributes: set[str] = field(default_factory=set)  # every attribute name accessed (method calls)


class _Env:
    def __init__(self, parent: _Env | None = None):
        self.names: dict[str, Type] = {}
        self.parent = parent

    def get(self, name: str) -> Type | None:
        env: _Env | None = self
        while env is not None:
            if name in env.names:
                return env.names[name]
            env = env.parent
        return None


class _Analyzer:
    def __init__(self, schema: Schema, trees: dict[str, ast.Module]):
        self.schema = schema
        self.trees = trees
        nodes = [n for tree in trees.values() for n in ast.walk(tree)
                 if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.Assign))]
        class_defs = [n for n in nodes if isinstance(n, ast.ClassDef)]
        self.functions = [n for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        self.classes = set(schema) | {n.name for n in class_defs}
        self.typevars = {t.id for n in nodes if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                         and _call_name(n.value) == "TypeVar" for t in n.targets if isinstance(t, ast.Name)}
        self.scopes: dict[int, list[ast.AST]] = {}  # id(body) -> the nodes of that scope
        self.attrs: dict[str, dict[str, Type]] = {}  # class -> self.<attr> -> type
        self.bases = {n.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in n.bases]
                      for n in class_defs}
        self.returns: dict[str, Type | None] = {}  # function name -> return type (None: ambiguous)
        self.generic: set[str] = set()  # functions returning a TypeVar: f(S, ...) -> S
        self.reads = Reads()
        self.recording = False

    # -- types --
    def annotation(self, node: ast.expr | None) -> Type | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.Name):
            return ("", node.id) if node.id in self.classes else None
        if isinstance(node, ast.Attribute):
            return ("", node.attr) if node.attr in self.classes else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.annotation(node.left) or self.annotation(node.right)
        if isinstance(node, ast.Subscript):
            base = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
            if base in ("Optional", "Union"):
                return next((t for t in map(self.annotation, args) if t), None)
            if base in ("tuple", "Tuple") and not (len(args) == 2 and isinstance(args[1], ast.Constant)):
                return ("tuple", tuple(self.annotation(a) for a in args))  # tuple[A, B]; tuple[A, ...] below
            inner = self.annotation(args[-1])
            if inner and inner[0] == "":
                if base in ("dict", "Dict", "Mapping", "MutableMapping"):
                    return ("dict", inner[1])
                if base in ("list", "List", "Sequence", "Iterable", "tuple", "Tuple", "set", "frozenset",
                            "Iterator"):
                    return ("list", inner[1])
                if base == "type":
                    return ("class", inner[1])
        return None

    def type_of(self, node: ast.expr, env: _Env) -> Type | None:
        if isinstance(node, ast.Name):
            found = env.get(node.id)
            if found is None and node.id in self.classes:
                return ("class", node.id)
            return found
        if isinstance(node, ast.Attribute):
            owner = self.type_of(node.value, env)
            if owner and owner[0] == "":
                if owner[1] in self.schema:
                    return self.schema[owner[1]].get(node.attr)
                return self.attribute(owner[1], node.attr)
            return None
        if isinstance(node, ast.Subscript):
            owner = self.type_of(node.value, env)
            return ("", owner[1]) if owner and owner[0] in ("list", "dict") else None
        if isinstance(node, ast.BoolOp):
            return next((t for t in (self.type_of(v, env) for v in node.values) if t), None)
        if isinstance(node, ast.IfExp):
            return self.type_of(node.body, env) or self.type_of(node.orelse, env)
        if isinstance(node, (ast.NamedExpr, ast.Await)):
            return self.type_of(node.value, env)
        if isinstance(node, ast.Call):
            return self.call_type(node, env)
        return None

    def attribute(self, cls: str, name: str, seen: frozenset[str] = frozenset()) -> Type | None:
        """`self.<name>` of class `cls`, as assigned in its methods or in a base class's."""
        if name in self.attrs.get(cls, {}):
            return self.attrs[cls][name]
        for base in self.bases.get(cls, []):
            if base not in seen:
                found = self.attribute(base, name, seen | {cls})
                if found:
                    return found
        return None

    def call_type(self, node: ast.Call, env: _Env) -> Type | None:
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = self.type_of(func.value, env)
            if owner and owner[0] == "class" and func.attr in ("model_validate", "model_construct", "parse_obj"):
                return ("", owner[1])
            if owner and owner[0] == "" and func.attr in ("model_copy", "copy"):
                return owner
            if owner and owner[0] == "dict":
                return {"values": ("iter", owner[1]), "items": ("items", owner[1]),
                        "get": ("", owner[1])}.get(func.attr)
            name = func.attr
        elif isinstance(func, ast.Name):
            if func.id in self.classes:
                return ("", func.id)
            if func.id == "enumerate" and node.args:
                inner = self.type_of(node.args[0], env)
                return ("enum", inner[1]) if inner and inner[0] in ("list", "iter") else None
            if func.id in ("list", "sorted", "reversed", "iter") and node.args:
                inner = self.type_of(node.args[0], env)
                return ("list", inner[1]) if inner and inner[0] in ("list", "iter") else None
            name = func.id
        else:
            return None
        if name in self.generic and node.args:
            first = self.type_of(node.args[0], env)
            return ("", first[1]) if first and first[0] == "class" else None
        return self.returns.get(name)

    # -- bindings --
    def bind(self, target: ast.expr, value: Type | None, env: _Env) -> None:
        if value is None:
            return
        if isinstance(target, ast.Name):
            env.names[target.id] = value
        elif isinstance(target, ast.Attribute):
            owner = self.type_of(target.value, env)
            if owner and owner[0] == "" and owner[1] not in self.schema:
                self.attrs.setdefault(owner[1], {})[target.attr] = value

    def bind_iteration(self, target: ast.expr, iterable: ast.expr, env: _Env) -> None:
        kind = self.type_of(iterable, env)
        if not kind:
            return
        if kind[0] in ("list", "iter"):
            self.bind(target, ("", kind[1]), env)
        elif kind[0] in ("items", "enum") and isinstance(target, ast.Tuple) and len(target.elts) == 2:
            self.bind(target.elts[1], ("", kind[1]), env)

    def bind_statement(self, node: ast.AST, env: _Env) -> None:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    for t, v in zip(target.elts, node.value.elts, strict=False):
                        self.bind(t, self.type_of(v, env), env)
                elif isinstance(target, ast.Tuple):
                    found = self.type_of(node.value, env)  # a, b = f() with f -> tuple[A, B]
                    if found and found[0] == "tuple":
                        for t, v in zip(target.elts, found[1], strict=False):
                            self.bind(t, v, env)
                else:
                    self.bind(target, self.type_of(node.value, env), env)
        elif isinstance(node, ast.AnnAssign):
            self.bind(node.target, self.annotation(node.annotation)
                      or (self.type_of(node.value, env) if node.value else None), env)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            self.bind_iteration(node.target, node.iter, env)
        elif isinstance(node, ast.NamedExpr):
            self.bind(node.target, self.type_of(node.value, env), env)

    # -- reads --
    def record(self, node: ast.AST, env: _Env, classes: list[str], method: str | None) -> None:
        reads = self.reads
        if isinstance(node, ast.Attribute):
            reads.attributes.add(node.attr)
            if not isinstance(node.ctx, ast.Load):
                return
            owner = self.type_of(node.value, env)
            if owner and owner[0] == "" and node.attr in self.schema.get(owner[1], {}):
                if owner[1] in classes:
                    if method:
                        reads.own.setdefault((owner[1], method), set()).add(node.attr)
                else:
                    reads.typed.add((owner[1], node.attr))
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name in ("getattr", "hasattr") and len(node.args) >= 2 and _is_str(node.args[1]):
                owner = self.type_of(node.args[0], env)
                if owner and owner[0] == "" and owner[1] in self.schema:
                    if owner[1] not in classes:
                        reads.typed.add((owner[1], node.args[1].value))
                elif not classes:  # a getattr on an unknown object, outside any config class
                    reads.keys.add(node.args[1].value)
            elif (isinstance(node.func, ast.Attribute) and node.func.attr in KEY_METHODS and node.args
                  and _is_str(node.args[0]) and not set(classes) & set(self.schema)):
                reads.keys.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_str(node.slice):
            if not set(classes) & set(self.schema):
                reads.keys.add(node.slice.value)
        elif isinstance(node, ast.Compare) and _is_str(node.left) and any(
                isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if not set(classes) & set(self.schema):
                reads.keys.add(node.left.value)

    # -- scopes --
    def scope(self, body: list[ast.stmt], env: _Env, classes: list[str], method: str | None) -> None:
        cached = self.scopes.get(id(body))
        if cached is None:
            own = [n for stmt in body for n in _walk_scope(stmt)]
            cached = self.scopes[id(body)] = (
                [n for n in own if isinstance(n, _BINDERS)], [n for n in own if isinstance(n, _READERS)],
                [n for n in own if isinstance(n, _SCOPES)])
        binders, readers, scopes = cached
        for _ in range(2):  # flow-insensitive: a later binding types an earlier use in a loop
            for node in binders:
                self.bind_statement(node, env)
        if self.recording:
            for node in readers:
                self.record(node, env, classes, method)
        for node in scopes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.function(node, env, classes, method)
            elif isinstance(node, ast.ClassDef):
                self.scope(node.body, _Env(env), classes + [node.name], None)
            elif self.recording:  # a lambda
                inner = _Env(env)
                for sub in ast.walk(node.body):
                    if isinstance(sub, _READERS):
                        self.record(sub, inner, classes, method)

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, env: _Env, classes: list[str],
                 method: str | None) -> None:
        inner = _Env(env)
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        in_class = bool(classes) and method is None  # a method (not a function nested in one)
        for i, arg in enumerate(args):
            found = self.annotation(arg.annotation)
            if found is None and i == 0 and in_class and arg.arg in ("self", "cls"):
                found = ("" if arg.arg == "self" else "class", classes[-1])
            if found:
                inner.names[arg.arg] = found
        decorators = {_call_name(d) if isinstance(d, ast.Call) else getattr(d, "id", getattr(d, "attr", ""))
                      for d in node.decorator_list}
        validator = bool(decorators & VALIDATOR_DECORATORS)
        this_method = (None if validator else node.name) if in_class else method
        self.scope(node.body, inner, classes, this_method)

    def run(self) -> Reads:
        for node in self.functions:  # return annotations, first
            returns = node.returns
            if isinstance(returns, ast.Constant) and isinstance(returns.value, str):
                returns = ast.parse(returns.value, mode="eval").body
            if isinstance(returns, ast.Name) and returns.id in self.typevars:
                self.generic.add(node.name)
                continue
            found = self.annotation(node.returns)
            if found:
                known = self.returns.get(node.name, found)
                self.returns[node.name] = found if known == found else None
        for recording in (False, False, True):  # two passes type self.<attr>, the third records
            self.recording = recording
            for tree in self.trees.values():
                self.scope(tree.body, _Env(), [], None)
        return self.reads


_BINDERS = (ast.Assign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.comprehension, ast.NamedExpr)
_READERS = (ast.Attribute, ast.Call, ast.Subscript, ast.Compare)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _walk_scope(node: ast.AST) -> Iterable[ast.AST]:
    """Nodes of one scope: stop at nested functions, classes and lambdas (yielded, not entered)."""
    yield node
    if isinstance(node, _SCOPES):
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk_scope(child)


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def read_fields(schema: Schema, sources: dict[str, str]) -> Reads:
    """What `sources` (file name -> text) read, per the module docstring."""
    trees = {name: ast.parse(text, filename=name) for name, text in sources.items()}
    return _Analyzer(schema, trees).run()


def unread(fields: list[tuple[str, str, str]], reads: Reads) -> list[str]:
    """The dotted paths of the fields nothing reads, in field order."""
    read = set(reads.typed)
    for (cls, method), names in reads.own.items():
        if method in reads.attributes:
            read |= {(cls, n) for n in names}
    return [path for path, cls, name in fields if (cls, name) not in read and name not in reads.keys]


def unread_fields(fields: list[tuple[str, str, str]], schema: Schema, sources: dict[str, str]) -> list[str]:
    return unread(fields, read_fields(schema, sources))


def raylign_sources() -> dict[str, str]:
    return {str(p.relative_to(REPO)): p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py"))}


# ---- the tests -----------------------------------------------------------------------------------


# `rollout.workers`, removed in 2f19a3d because nothing read it, put back as a fake field: the checker
# must flag it on today's source, where `self.rollout.workers` (the rollout WorkerGroup's actors) remains.
REMOVED = ("rollout.workers", "RolloutConfig", "workers")


@pytest.fixture(scope="module")
def raylign_reads() -> tuple[list[tuple[str, str, str]], Reads]:
    fields, schema = config_fields()
    schema["RolloutConfig"] = {**schema["RolloutConfig"], REMOVED[2]: None}  # a plain value: types nothing
    return fields, read_fields(schema, raylign_sources())


def test_every_config_field_is_read(raylign_reads):
    fields, reads = raylign_reads
    missing = unread(fields, reads)
    if missing:
        pytest.fail(f"config fields that no code in raylign/ reads ({len(missing)}): remove each or make it "
                    "do what it says:\n  " + "\n  ".join(missing), pytrace=False)


def test_checker_catches_rollout_workers_in_raylign(raylign_reads):
    _, reads = raylign_reads
    assert any(".rollout.workers" in text for text in raylign_sources().values())
    assert unread([REMOVED], reads) == ["rollout.workers"]


def test_the_walk_covers_every_section():
    fields, schema = config_fields()
    paths = {p for p, _, _ in fields}
    assert {"model.lora.r", "reward.sources[].source", "multitask.tasks.<name>.data.kind",
            "multitask.tasks.<name>.gate", "reference.path", "rollout.n_samples"} <= paths
    assert {"LoraConfig", "TaskConfig", "RewardSourceConfig", "DataConfig"} <= set(schema)


SYNTHETIC_SCHEMA: Schema = {
    "RunConfig": {"rollout": ("", "RolloutConfig"), "tasks": ("dict", "TaskConfig")},
    "RolloutConfig": {"n_samples": None, "workers": None, "top_k": None, "top_p": None, "seed": None},
    "TaskConfig": {"weight": None, "gate": None, "ratio": None, "loss": None},
}
SYNTHETIC_FIELDS = [(p, c, n) for c, names in SYNTHETIC_SCHEMA.items() for n in names
                    for p in [f"{c}.{n}"]]
SYNTHETIC_SOURCE = '''
from config import RunConfig, RolloutConfig, TaskConfig

class Group:
    def __init__(self):
        self.workers = []

class Run:
    def __init__(self, config: RunConfig):
        self.config = config
        self.rollout = Group()

    def go(self):
        parts = [w for w in self.rollout.workers]      # a Group's workers: no read of rollout.workers
        ro = self.config.rollout
        return ro.n_samples, parts                      # read through an alias

def sample(sampling: dict):
    cfg = RolloutConfig.model_validate(sampling)
    x.top_p                                             # untyped: reads nothing
    return cfg.top_k, sampling["seed"]                  # typed read; a string key

def tasks(config: RunConfig):
    for name, task in config.tasks.items():
        print(task.weight, task.gate_parts())

class TaskConfig:
    def gate_parts(self):
        return self.gate                                # own class, called elsewhere: counts

    def unused(self):
        return self.ratio                               # own class, never called: does not count
'''


def test_checker_flags_unread_fields():
    """The checker can fail: `workers` is only a WorkerGroup's attribute here, `top_p` is read on an
    untyped object, `ratio` only by an uncalled method of its own class, `loss` nowhere."""
    flagged = unread_fields(SYNTHETIC_FIELDS, SYNTHETIC_SCHEMA, {"fake.py": SYNTHETIC_SOURCE})
    assert flagged == ["RolloutConfig.workers", "RolloutConfig.top_p", "TaskConfig.ratio", "TaskConfig.loss"]
