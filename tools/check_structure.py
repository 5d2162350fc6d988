"""Check the package's structure rules (issue 16); tests/test_structure.py runs the same checks.

    python tools/check_structure.py [PACKAGE_DIR]        # default: glm_rl; exit 1 and list offenders if any

Rules, each a function returning one message per offender (`path:line: ...`, paths relative to the package's
parent folder):
- `long_files`: no file over MAX_FILE_LINES lines.
- `long_functions`: no function or method (nested ones included, each on its own) over MAX_FUNCTION_LINES lines,
  counted from the `def` line to the last line of its body (decorators excluded).
- `import_cycles`: no import cycle between the package's modules. Every `import` / `from ... import` counts,
  wherever it is (inside functions too), except under `if TYPE_CHECKING:`; relative imports are resolved;
  `from pkg import name` imports the submodule `pkg.name` when there is one, else `pkg`. An import edge points
  at the module named, not at the packages above it. Every import that lies on a cycle is listed.
- `private_imports`: no `from M import _name` where M is another module of the package (type-checking imports
  included: they couple modules just the same).

Only the standard library is used, and nothing is imported from the package: the check reads source files.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. glm_rl.weights.p2p (a package's __init__.py is named after the package)
    path: str  # relative to the package's parent folder, posix, e.g. glm_rl/weights/p2p.py
    is_package: bool
    source: str
    tree: ast.Module


def load(package_dir: Path) -> dict[str, Module]:
    """Every .py file under `package_dir`, parsed, keyed by dotted module name."""
    package_dir = Path(package_dir).resolve()
    base = package_dir.parent
    modules = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = list(file.relative_to(base).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        source = file.read_text(encoding="utf-8")
        rel = file.relative_to(base).as_posix()
        modules[".".join(parts)] = Module(".".join(parts), rel, is_package, source, ast.parse(source, rel))
    return modules


def long_files(modules: dict[str, Module], limit: int = MAX_FILE_LINES) -> list[str]:
    out = []
    for m in modules.values():
        n = len(m.source.splitlines())
        if n > limit:
            out.append(f"{m.path}:1: {n} lines (max {limit})")
    return out


def long_functions(modules: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for m in modules.values():
        for qualname, node in _functions(m.tree, ""):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{m.path}:{node.lineno}: {qualname} is {n} lines (max {limit})")
    return out


def _functions(node: ast.AST, prefix: str):
    """(qualified name, node) of every function and method under `node`, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield name, child
            yield from _functions(child, f"{name}.")
        else:
            yield from _functions(child, prefix)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, skip_type_checking: bool):
    """Every Import / ImportFrom node under `node`, in source order; `if TYPE_CHECKING:` bodies skipped if asked."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = ast.iter_child_nodes(node)
    for child in children:
        yield from _imports(child, skip_type_checking)


def _from_target(m: Module, node: ast.ImportFrom) -> str | None:
    """The absolute dotted name `from X import ...` reads from (relative imports resolved); None if it escapes."""
    if not node.level:
        return node.module
    package = m.name.split(".") if m.is_package else m.name.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(modules: dict[str, Module], name: str) -> str | None:
    """The deepest module of the package that `name` (a dotted module or module.attribute) lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """module -> {imported module of the package: line of its first import}, TYPE_CHECKING imports excluded."""
    graph: dict[str, dict[str, int]] = {}
    for m in modules.values():
        deps: dict[str, int] = {}
        for node in _imports(m.tree, skip_type_checking=True):
            if isinstance(node, ast.Import):
                targets = [_owner(modules, a.name) for a in node.names]
            else:
                source = _from_target(m, node)
                if source is None:
                    continue
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in modules else _owner(modules, source)
                    for a in node.names
                ]
            for t in targets:
                if t is not None and t != m.name:
                    deps.setdefault(t, node.lineno)
        graph[m.name] = deps
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted; components of one module left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def import_cycles(modules: dict[str, Module]) -> list[str]:
    """One message per cycle group (its size and modules), then one per import inside it (each is on a cycle)."""
    graph = import_edges(modules)
    out = []
    for component in _strongly_connected(graph):
        members = set(component)
        out.append(f"import cycle among {len(component)} modules: {', '.join(component)}")
        for v in component:
            for w, line in sorted(graph[v].items(), key=lambda item: item[1]):
                if w in members:
                    out.append(f"  {modules[v].path}:{line}: {v} imports {w}")
    return out


def private_imports(modules: dict[str, Module]) -> list[str]:
    out = []
    for m in modules.values():
        for node in _imports(m.tree, skip_type_checking=False):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _from_target(m, node)
            owner = _owner(modules, source) if source else None
            if owner is None or owner == m.name:
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"{m.path}:{node.lineno}: imports private name {a.name} from {source}")
    return out


CHECKS = {
    f"files over {MAX_FILE_LINES} lines": long_files,
    f"functions over {MAX_FUNCTION_LINES} lines": long_functions,
    "import cycles": import_cycles,
    "imports of private names from other modules": private_imports,
}


def check(package_dir: Path) -> dict[str, list[str]]:
    """{rule: offender messages} for every rule in CHECKS (empty lists where the rule holds)."""
    modules = load(package_dir)
    return {rule: fn(modules) for rule, fn in CHECKS.items()}


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "glm_rl"
    failed = False
    for rule, offenders in check(package_dir).items():
        if offenders:
            failed = True
            print(f"{rule}: {sum(not o.startswith(' ') for o in offenders)}")
            print("\n".join(f"  {o}" for o in offenders))
    if not failed:
        print(f"{package_dir.name}: structure OK")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
