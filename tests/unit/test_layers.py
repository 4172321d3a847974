"""The package's layers, read from the source with `ast`: imports go only downward and never in a cycle.

Every import counts: module level, function-local and `TYPE_CHECKING` ones. `import a.b` imports
`a.b`; `from a.b import c` imports `a.b` (a package's `__init__` when `a.b` is a package) and
`a.b.c` when that is a module. Layers, bottom first; a module may import its own layer or lower ones.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

LAYERS = [
    # base: no pipeline imports but these
    ["pipeline", "pipeline.errors", "pipeline.config_tree", "pipeline.config", "pipeline.fs", "pipeline.logs"],
    ["pipeline.data"],  # data sets, partition, subjects, canaries
    ["pipeline.core"],  # the training core without Ray
    ["pipeline.storage"],  # the run directory and its owners: ledger, receipts
    ["pipeline.sisa"],  # the SISA service on Ray: shards, erasure queue, coordinator
    ["pipeline.evaluation"],  # attacks, LiRA, yardsticks, audit bounds
    ["pipeline.tracking"],  # MLflow runs, registry, pyfunc
    ["pipeline.verbs"],  # what the commands do
    ["pipeline.baselines", "pipeline.sweep"],
    ["pipeline.cli"],  # parser, formatting, demo
]
MAX_LINES = 350  # issue 18: no module over 350 lines
MAX_CLI_LOG_PARAMETERS = 5  # issue 18: `log` parameters only at the CLI edge; modules log to logging.getLogger(__name__)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (prefix != "pipeline" and module.startswith(prefix + "."))
            if inside and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no layer: add its package to LAYERS"
    return rank


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_modules_import_only_their_own_layer_or_lower_ones():
    upward = sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                    for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a))
    assert upward == []


def test_every_module_belongs_to_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def log_parameters() -> dict[str, list[str]]:
    """module → the functions (`name:line`) that take a parameter named `log` (a progress callback)."""
    found: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                if any(arg.arg == "log" for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]):
                    found.setdefault(name, []).append(f"{getattr(node, 'name', 'lambda')}:{node.lineno}")
    return found


def test_progress_goes_through_module_loggers_not_log_parameters():
    found = log_parameters()
    outside_cli = {m: f for m, f in found.items() if not m.startswith("pipeline.cli")}
    assert outside_cli == {}
    assert sum(len(f) for m, f in found.items() if m.startswith("pipeline.cli")) <= MAX_CLI_LOG_PARAMETERS
