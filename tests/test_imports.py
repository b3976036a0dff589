"""The package's import graph: no cycle, and methods and adapters never import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "transprune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycle(graph):
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_methods_and_adapters_do_not_import_each_other():
    graph = import_graph()
    for module, edges in graph.items():
        for target in edges:
            pair = (module.split(".")[1:2], target.split(".")[1:2])
            assert pair not in ((["methods"], ["adapters"]), (["adapters"], ["methods"])), f"{module} imports {target}"


def test_library_raises_instead_of_exiting_outside_main():
    """SystemExit belongs to a command line's main(); library functions raise exceptions."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name != "main"):
            for node in ast.walk(function):
                if isinstance(node, ast.Raise) and node.exc is not None and "SystemExit" in ast.unparse(node.exc):
                    assert False, f"{path.name}:{node.lineno} raises SystemExit outside main()"


COMPONENTS = PACKAGE.parent / "components"
COMMAND_LINES = ("transprune.eval", "transprune.bench")   # a CLI's module: the app reads their cores instead


def test_app_core_imports_no_command_line():
    """components/ reads what it shares with a CLI from a library module (transprune.heldout,
    transprune.benchmarking), never the CLI itself, not even inside a function."""
    for path in sorted(COMPONENTS.glob("*.py")) + [PACKAGE.parent / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                assert target not in COMMAND_LINES, f"{path.name}:{node.lineno} imports {target}"


def test_the_app_engine_imports_without_gradio():
    """components.engine (the comparison the tests drive on the oldest transformers, whose venv has no gradio)
    imports nothing of the UI: a blocked `gradio` import must not stop it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['gradio'] = None; "   # `import gradio` now raises ImportError
            "import components.engine, components.frontier; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
