"""The package is a house with floors: imports only go down, no cycles, short functions.

From the top: the command line (``cli``) -> experiments -> inference (``infer``) -> the
probabilistic program (``program``) -> foundations (``core``). Imports inside functions count.
"""

import ast
from pathlib import Path

import pyro_vae

ROOT = Path(pyro_vae.__file__).parent
FLOORS = {"cli": 4, "experiments": 3, "infer": 2, "program": 1, "core": 0}
MAX_FUNCTION_LINES = 80


def modules() -> dict:
    """``{"infer.svi": path, ...}`` for every module of the package (packages by their name)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set:
    """The package's modules that ``name`` imports anywhere in its code."""
    parts = name.split(".") if name else []
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyro_vae"):
            target = node.module[len("pyro_vae."):] if node.module != "pyro_vae" else ""
        else:
            continue
        for candidate in [target] + [f"{target}.{a.name}".lstrip(".") for a in node.names]:
            if candidate in known and candidate != name:
                found.add(candidate)
            elif candidate == target:
                assert target in known, f"{name} imports {target!r}, which is no module of the package"
    return found


def graph() -> dict:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def floor(name: str):
    return FLOORS.get(name.split(".")[0])


def test_every_module_lives_on_a_floor():
    loose = [m for m in modules() if floor(m) is None and m not in ("", "__main__")]
    assert not loose, f"modules outside cli/experiments/infer/program/core: {loose}"


def test_imports_only_go_down():
    upward = [(a, b) for a, deps in graph().items() if floor(a) is not None
              for b in deps if floor(b) is None or floor(b) > floor(a)]
    assert not upward, f"imports that go up a floor (or to the package root): {upward}"


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_command_line_parses_flags():
    users = [m for m, path in modules().items() if "argparse" in path.read_text() and floor(m) != FLOORS["cli"]]
    assert not users, f"argparse outside pyro_vae/cli: {users}"


def test_functions_fit_on_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
