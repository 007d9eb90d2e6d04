"""The package's shape: every module imports on its own, no import cycle, imports only go down
the declared floors of rooms, the README's tree is the real one, modules stay small, and only
entry points create process groups."""

import ast
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "medmoe_mcore"


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_on_its_own():
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "medmoe_mcore"}
    failures = []
    try:
        for name in _modules():
            for key in [k for k in sys.modules if k.split(".")[0] == "medmoe_mcore"]:
                del sys.modules[key]
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - reported below, by module
                failures.append(f"{name}: {type(e).__name__}: {e}")
    finally:  # the rest of the session keeps its module objects (class identity)
        for key in [k for k in sys.modules if k.split(".")[0] == "medmoe_mcore"]:
            del sys.modules[key]
        sys.modules.update(saved)
    assert not failures, "\n".join(failures)


def _imports(path: Path, known: set[str]) -> set[str]:
    """medmoe_mcore modules a file imports (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "medmoe_mcore":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def _import_graph() -> dict[str, set[str]]:
    known = set(_modules())
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = _imports(path, known) - {name}
    return graph


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


# The rooms from the ground up. A module imports from its own room or from a room on a lower
# floor; rooms on one floor are independent of each other. `hf` (the transformers classes
# shipped inside every release folder) imports nothing of the package.
FLOORS = (
    ("conventions", "hf"),
    ("config",),  # the config tree, its field kinds, LoRA's node, the named presets
    ("runtime",),  # process groups, the CPU runtime layer
    ("data", "checkpoint"),
    ("models",),  # specs, the Med-MoE layer, LoRA adapters as spec entries, routing counts
    ("router",),  # the modality router's offline life (file, training, domains)
    ("conversion",),  # HF <-> Megatron, upcycling (reads router files), releases, LoRA merge
    ("inference",),
    ("eval",),
    ("training",),
    ("demo",),  # the main job's orchestration and its embedded data
    ("study",),  # scaling studies (may start from the main job's work folder)
)
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _room(module: str) -> str | None:
    """The room of a package module (None for the package root itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        room = _room(module)
        for target in sorted(targets):
            other = _room(target)
            if room is None or other is None or other == room:
                continue
            if FLOOR[other] >= FLOOR[room]:
                out.append(f"{module} imports {target}: room '{other}' is not below '{room}'")
    return out


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms == set(FLOOR), (f"rooms without a floor: {sorted(rooms - set(FLOOR))}; "
                                 f"floors without a room: {sorted(set(FLOOR) - rooms)}")


def test_imports_only_go_down_the_floors():
    violations = layering_violations(_import_graph())
    assert not violations, "\n".join(violations)


def test_the_layering_rule_can_fail():
    planted = {"medmoe_mcore.config.model": {"medmoe_mcore.training.config"},
               "medmoe_mcore.data.records": {"medmoe_mcore.checkpoint.store"}}
    assert len(layering_violations(planted)) == 2


def _readme_tree() -> set[str]:
    """Paths named by the README's layout tree (the block under '## Layout')."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", text, re.S).group(1)
    paths, stack = set(), []
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        stack = stack[:depth]
        if words[0].endswith("/"):
            stack.append(words[0].rstrip("/"))
            paths.add("/".join(stack))
            words = words[1:]
        paths |= {"/".join(stack + [w]) for w in words}
    return paths


def test_readme_tree_matches_the_package():
    tops = ("medmoe_mcore", "tools", "examples")
    named = {p for p in _readme_tree() if p.split("/")[0] in tops}
    real = {str(p.relative_to(ROOT)) for top in tops for p in (ROOT / top).rglob("*")
            if (p.suffix == ".py" and p.name != "__init__.py")
            or (p.is_dir() and p.name != "__pycache__")}
    real |= set(tops)
    assert named == real, (f"in the README only: {sorted(named - real)}; "
                           f"in the package only: {sorted(real - named)}")


def test_modules_stay_small():
    big = [f"{p.relative_to(ROOT)} ({n} lines)" for d in ("medmoe_mcore", "tools", "examples")
           for p in (ROOT / d).rglob("*.py") if (n := len(p.read_text().splitlines())) > 400]
    assert not big, big


def test_only_entry_points_create_process_groups():
    creators = {"init_process_group", "initialize_model_parallel", "initialize"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "parallel.py":  # where `initialize` is defined, for entry points
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in creators:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}()")
    assert not offenders, offenders


def test_unit_tier_starts_no_process():
    """tests/unit runs in one process (subprocess / torchrun tests live in tests/integration)."""
    forbidden = re.compile(r"\b(subprocess|run_tool|torch\.distributed\.run|torchrun)\b")
    offenders = [f"{p.name}:{i}" for p in (ROOT / "tests" / "unit").glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if forbidden.search(line) and p.name != "test_layout.py"]
    assert not offenders, offenders


def test_pyproject_lists_every_package():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert listed == found | {"medmoe_mcore.tools", "medmoe_mcore.examples"}
