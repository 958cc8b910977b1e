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


# ----------------------------------------------------------------------------- the program contract


def program_classes() -> dict:
    """``{class name: module}`` of the concrete programs of the program layer (the VAE, M2, ...):
    classes with a ``guide`` and a ``model`` that writes ``pyro.sample`` statements itself (not the
    contract's base class, nor an adapter that runs someone else's model)."""
    import importlib
    import inspect

    found = {}
    for name in modules():
        if floor(name) == FLOORS["program"]:
            module = importlib.import_module(f"pyro_vae.{name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and obj.__module__ == module.__name__ and \
                        callable(getattr(obj, "guide", None)) and callable(getattr(obj, "model", None)) and \
                        "pyro.sample(" in inspect.getsource(obj.model):
                    found[obj.__name__] = name
    return found


def _reads_config_model(node) -> bool:
    """``config.model`` or ``<anything>.config.model``: the model's name."""
    if not (isinstance(node, ast.Attribute) and node.attr == "model"):
        return False
    inner = node.value
    return (isinstance(inner, ast.Name) and inner.id == "config") or \
        (isinstance(inner, ast.Attribute) and inner.attr == "config")


def _name_constants(node) -> list:
    """String constants that a comparison, a dict's keys or a subscript use (where a name would dispatch)."""
    if isinstance(node, ast.Compare):
        parts = [node.left, *node.comparators]
    elif isinstance(node, ast.Dict):
        parts = [k for k in node.keys if k is not None]
    elif isinstance(node, ast.Subscript):
        parts = [node.slice]
    else:
        return []
    return [p.value for part in parts for p in ast.walk(part) if isinstance(p, ast.Constant) and isinstance(p.value, str)]


def test_the_inference_layer_knows_no_program_by_class_or_name():
    """``infer/`` works on the program contract alone: no concrete program class (by name or by
    importing its module), no ``config.model``, no model name used to dispatch. Programs say what
    they need through ``capabilities``."""
    from pyro_vae.core.config import MODELS
    from pyro_vae.program.programs import PROGRAMS

    classes = program_classes()
    assert {"VAE", "M2"} <= set(classes), classes
    names, graph_ = set(MODELS) | set(PROGRAMS), graph()
    found = []
    for module, path in modules().items():
        if floor(module) != FLOORS["infer"]:
            continue
        found += [f"{module} imports {dep}" for dep in graph_[module] if dep in classes.values()]
        for node in ast.walk(ast.parse(path.read_text())):
            named = {ast.Name: "id", ast.alias: "name", ast.Attribute: "attr"}.get(type(node))
            if named is not None and getattr(node, named) in classes:
                found.append(f"{module}:{getattr(node, 'lineno', '?')} names the class {getattr(node, named)}")
            if _reads_config_model(node):
                found.append(f"{module}:{node.lineno} reads config.model")
            found += [f"{module}:{node.lineno} dispatches on the model name {c!r}" for c in _name_constants(node)
                      if c in names]
    assert not found, "the inference layer must know programs only by the contract:\n" + "\n".join(found)
