"""The layer rule of docs/ARCHITECTURE.md, checked on the source (no Ray, nothing imported).

Every module of `raylign/` is parsed with `ast`; every import of a `raylign` module counts:
module-level ones, function-local ones (inside functions and methods) and those under
`if TYPE_CHECKING:`. TYPE_CHECKING imports count on purpose: they run only under a type checker,
but they still say "this module depends on that one", and a circle that exists only for the type
checker is the same design smell as a real one. Relative imports are resolved. `from a.b import c`
is an edge to the module `a.b.c` when that is a module, else to `a.b`; the parent packages that
Python imports on the way (`a`, `a.b`'s `__init__`) are not edges, so a package whose `__init__`
re-exports its submodules is no circle by itself. `importlib.import_module("raylign.x")` with a
constant name counts; with an f-string `f"raylign.pkg.{...}"` (the lazy PEP 562 `__getattr__` of a
package) it counts as importing every submodule of `raylign.pkg` whose name is a string constant
in that file (the `_EXPORTS` table).

The layers are read from the ```layers block of docs/ARCHITECTURE.md, so the document and this
test cannot drift. Rules:
  * every module belongs to exactly one layer;
  * a module imports its own layer or lower, never higher; nothing imports `raylign.cli`;
  * no import circles among modules (strongly connected components of the module graph);
  * `raylign/algorithms/` imports only torch, numpy, a short list of stdlib modules and itself.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "raylign"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

# What `raylign/algorithms/` may import: pure math, no I/O, no Ray, no transformers.
ALGORITHMS_MAY_IMPORT = frozenset({
    "torch", "numpy", "__future__", "abc", "collections", "dataclasses", "enum", "functools", "itertools",
    "math", "numbers", "operator", "statistics", "typing", "warnings",
})


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. "raylign.pipelines.online"
    dst: str  # imported module
    file: str  # path of the importing file, relative to the repository
    line: int
    kind: str  # "module-level", "function-local" or "TYPE_CHECKING"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} -> {self.dst} ({self.kind})"


# ---- reading the tree ----------------------------------------------------------------------------


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file for every .py file of the package under `root` (`__init__` = the package)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, kind: str = "module-level"):
    """(node, kind) for every node, with the kind of import a node there would be."""
    for child in ast.iter_child_nodes(node):
        child_kind = kind
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == "module-level":
            child_kind = "function-local"
        if isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body:
            child_kind = "TYPE_CHECKING"
        yield child, child_kind
        yield from _walk(child, child_kind)


def collect_edges(root: Path, package: str) -> tuple[list[Edge], dict[str, list[tuple[str, int, str, str]]]]:
    """All imports of `package` modules as edges, and every module's imports of anything
    (module -> [(imported name, line, kind, file)]) for the purity check of algorithms/."""
    modules = module_files(root, package)
    edges: list[Edge] = []
    external: dict[str, list[tuple[str, int, str, str]]] = {}
    for name, path in modules.items():
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        pkg_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        external[name] = []

        def add(target: str, node: ast.AST, kind: str, _name=name, _rel=rel) -> None:
            external[_name].append((target, node.lineno, kind, _rel))
            if target == package or target.startswith(package + "."):
                # The most specific module that exists: `raylign.models.registry.ModelNotFoundError`
                # (from-import of a name) -> `raylign.models.registry`.
                parts = target.split(".")
                while len(parts) > 1 and ".".join(parts) not in modules:
                    parts.pop()
                edges.append(Edge(_name, ".".join(parts), _rel, node.lineno, kind))

        for node, kind in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node, kind)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    add(sub if sub in modules else mod, node, kind)
            elif (isinstance(node, ast.Call) and node.args
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value, node, kind)
                elif (isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
                      and str(arg.values[0].value).endswith(".")):
                    prefix = str(arg.values[0].value)
                    for sub in sorted(constants):
                        if prefix + sub in modules:
                            add(prefix + sub, node, kind)
    return edges, external


# ---- the layers ----------------------------------------------------------------------------------

_LAYER_LINE = re.compile(r"^\s*(\d+)\s*[^:]*:\s*(.*?)\s*$")


def read_layers(markdown: str) -> list[list[str]]:
    """The ```layers block: one line per layer, bottom first, `N name: entry entry ...`.
    An entry names a package (and everything under it), a module, or `pkg.__init__` (that file only)."""
    blocks = re.findall(r"^```layers\s*\n(.*?)^```", markdown, flags=re.S | re.M)
    assert len(blocks) == 1, "docs/ARCHITECTURE.md must hold exactly one ```layers block"
    layers: list[list[str]] = []
    for line in blocks[0].splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LAYER_LINE.match(line)
        assert match, f"```layers line {line!r} is not 'N name: entry entry ...'"
        assert int(match.group(1)) == len(layers), f"layers must be numbered 0, 1, 2, ... in order: {line!r}"
        layers.append(match.group(2).replace(",", " ").split())
    entries = [e for layer in layers for e in layer]
    assert len(entries) == len(set(entries)), "an entry appears in two layers"
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of the longest entry that covers `module`, None if none does."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for number, entries in enumerate(layers):
        for entry in entries:
            if entry.endswith(".__init__"):
                covers = module == entry[: -len(".__init__")]
            else:
                covers = module == entry or module.startswith(entry + ".")
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), number)
    return None if best is None else best[1]


# ---- the rules (pure functions of a graph, tested on a synthetic one below) -----------------------


def upward_imports(edges: list[Edge], layer: dict[str, int], names: dict[int, str]) -> list[str]:
    """One line per import of a higher layer."""
    out = []
    for e in edges:
        if e.dst in layer and e.src in layer and layer[e.dst] > layer[e.src]:
            out.append(f"{e}: layer {layer[e.src]} ({names[layer[e.src]]}) imports layer {layer[e.dst]} "
                       f"({names[layer[e.dst]]})")
    return out


def import_circles(edges: list[Edge]) -> list[str]:
    """One entry per strongly connected component of more than one module (or a module importing
    itself), listing the modules and every import between them."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for component in components:
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        members = set(component)
        inner = sorted({str(e) for e in edges if e.src in members and e.dst in members})
        out.append(f"circle {' <-> '.join(component)}:\n      " + "\n      ".join(inner))
    return out


def impure_algorithm_imports(external: dict[str, list[tuple[str, int, str, str]]], package: str) -> list[str]:
    out = []
    for module, imports in sorted(external.items()):
        if not (module == f"{package}.algorithms" or module.startswith(f"{package}.algorithms.")):
            continue
        for target, line, kind, file in imports:
            if target.split(".")[0] in ALGORITHMS_MAY_IMPORT or target == f"{package}.algorithms" or (
                    target.startswith(f"{package}.algorithms.")):
                continue
            out.append(f"{file}:{line} imports {target} ({kind}); algorithms/ may import only "
                       f"{package}.algorithms and {', '.join(sorted(ALGORITHMS_MAY_IMPORT))}")
    return out


def _report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


# ---- the tests on raylign/ -----------------------------------------------------------------------

@dataclass
class Tree:
    layers: list[list[str]]
    modules: dict[str, Path]
    edges: list[Edge]
    external: dict[str, list[tuple[str, int, str, str]]]


@pytest.fixture(scope="module")
def tree() -> Tree:
    edges, external = collect_edges(REPO, PACKAGE)
    return Tree(read_layers(ARCHITECTURE.read_text(encoding="utf-8")), module_files(REPO, PACKAGE), edges,
                external)


def test_every_module_is_in_a_layer(tree):
    missing = sorted(m for m in tree.modules if layer_of(m, tree.layers) is None)
    if missing:
        pytest.fail(_report("modules in no layer of the ```layers block of docs/ARCHITECTURE.md: add each to "
                            "its layer", missing), pytrace=False)


def test_no_module_imports_a_higher_layer(tree):
    layer = {m: layer_of(m, tree.layers) for m in tree.modules}
    names = {i: " ".join(entries) for i, entries in enumerate(tree.layers)}
    bad = upward_imports(tree.edges, {m: n for m, n in layer.items() if n is not None}, names)
    bad += [f"{e}: nothing imports the command line" for e in tree.edges
            if e.dst == f"{PACKAGE}.cli" and e.src != e.dst]
    if bad:
        pytest.fail(_report("imports of a higher layer (docs/ARCHITECTURE.md, 'Layers')", bad), pytrace=False)


def test_no_import_circles(tree):
    circles = import_circles(tree.edges)
    if circles:
        pytest.fail(_report("import circles (module-level, function-local and TYPE_CHECKING imports)", circles),
                    pytrace=False)


def test_algorithms_import_only_torch_numpy_and_math(tree):
    bad = impure_algorithm_imports(tree.external, PACKAGE)
    if bad:
        pytest.fail(_report("imports that make raylign/algorithms/ less than pure math", bad), pytrace=False)


def test_the_graph_is_really_read(tree):
    """Guards the checker against reading nothing: known edges of each kind are found."""
    kinds = {e.kind for e in tree.edges}
    assert kinds >= {"module-level", "function-local"}, kinds  # TYPE_CHECKING: the synthetic test below
    assert any(e.src == "raylign.pipelines.online" and e.dst == "raylign.rundir" for e in tree.edges)
    assert len(tree.modules) > 50 and len(tree.edges) > 100


# ---- the checker itself can fail -----------------------------------------------------------------

FAKE_FILES = {
    "fake/__init__.py": "from fake import low\n",
    "fake/low.py": (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "if TYPE_CHECKING:\n"
        "    from fake.mid import Thing\n"  # line 4: TYPE_CHECKING, upward
        "def f():\n"
        "    from .high import g\n"  # line 6: function-local, relative, upward
        "    return g\n"
    ),
    "fake/mid.py": "import importlib\nimportlib.import_module('fake.low')\n",  # low <-> mid circle
    "fake/high.py": "from . import low\nfrom fake.mid import X\ng = 1\n",  # low <-> high circle
}
FAKE_LAYERS = """
```layers
0 ground: fake.__init__ fake.low
1 middle: fake.mid
2 top: fake.high
```
"""


def _fake_tree(tmp_path: Path) -> tuple[list[Edge], dict]:
    for rel, text in FAKE_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return collect_edges(tmp_path, "fake")


def test_checker_reports_upward_imports_and_circles(tmp_path):
    edges, _ = _fake_tree(tmp_path)
    assert {(e.src, e.dst, e.line, e.kind) for e in edges} == {
        ("fake", "fake.low", 1, "module-level"),
        ("fake.low", "fake.mid", 4, "TYPE_CHECKING"),
        ("fake.low", "fake.high", 6, "function-local"),
        ("fake.mid", "fake.low", 2, "module-level"),
        ("fake.high", "fake.low", 1, "module-level"),
        ("fake.high", "fake.mid", 2, "module-level"),
    }
    layers = read_layers(FAKE_LAYERS)
    layer = {m: layer_of(m, layers) for m in ("fake", "fake.low", "fake.mid", "fake.high")}
    assert layer == {"fake": 0, "fake.low": 0, "fake.mid": 1, "fake.high": 2}
    up = upward_imports(edges, layer, {0: "ground", 1: "middle", 2: "top"})
    assert up == [
        "fake/low.py:4 -> fake.mid (TYPE_CHECKING): layer 0 (ground) imports layer 1 (middle)",
        "fake/low.py:6 -> fake.high (function-local): layer 0 (ground) imports layer 2 (top)",
    ]
    (circle,) = import_circles(edges)
    assert circle.startswith("circle fake.high <-> fake.low <-> fake.mid:")
    for edge in ("fake/low.py:6 -> fake.high", "fake/high.py:1 -> fake.low", "fake/mid.py:2 -> fake.low"):
        assert edge in circle
    assert "fake/__init__.py" not in circle  # the package importing its submodule is not in the circle


def test_checker_reports_impure_algorithms(tmp_path):
    file = "raylign/algorithms/x.py"
    external = {"raylign.algorithms.x": [("torch.nn", 1, "module-level", file),
                                         ("raylign.algorithms.kl", 2, "module-level", file),
                                         ("raylign.config", 3, "module-level", file),
                                         ("ray", 7, "function-local", file)]}
    bad = impure_algorithm_imports(external, "raylign")
    assert [b.split(";")[0] for b in bad] == [f"{file}:3 imports raylign.config (module-level)",
                                              f"{file}:7 imports ray (function-local)"]


def test_layers_block_errors_are_clear():
    with pytest.raises(AssertionError, match="exactly one"):
        read_layers("no block here")
    with pytest.raises(AssertionError, match="numbered"):
        read_layers("```layers\n1 x: a\n```\n")
    with pytest.raises(AssertionError, match="two layers"):
        read_layers("```layers\n0 x: a\n1 y: a\n```\n")
