"""The package's structure rules, checked on its source with ``ast`` (fast, no imports run).

What no test guards grows back: the learner's update went from 165 to 197 lines after the
driver redesign. So the rules that keep a change in one place are tests:
- no import cycles inside ``rlhf_dist`` (function-level imports count too);
- no module reaches into another's private names (``_name``), or into a collaborator's;
- the orchestrator stays at most 350 lines, every driver module at most 500;
- no function is longer than 80 lines, but for a short, reasoned allow-list;
- a metric key is spelled only in ``metric_keys.py`` (no literal, no f-string key elsewhere);
- the estimators are named only in ``algo/`` (their facts come from its table);
- the driver sets the policy version in one place.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rlhf_dist import metric_keys as K

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_dist"
FILES = sorted(PACKAGE.rglob("*.py"))

MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS: dict[str, str] = {
    # "module:function": "why it is long and should stay so",
}
MAX_ORCHESTRATOR_LINES = 350
MAX_DRIVER_MODULE_LINES = 500

# Private attributes of other objects that the package may touch, and why.
PRIVATE_ACCESS_ALLOWED = {
    "options._timeout": "torch's ProcessGroupNCCL.Options has no public timeout setter",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


MODULES = {module_name(p): p for p in FILES}


def imports_of(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (a function-level import too)."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES and n != me}
    return out


def test_no_import_cycles():
    graph = {m: imports_of(p) for m, p in MODULES.items()}
    # a package's __init__ importing its own modules is how a package exports: not a cycle
    for m in graph:
        graph[m] = {
            d for d in graph[m] if not (MODULES[m].name == "__init__.py" and d.startswith(m))
        }
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]) if d in path else d)
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(path: Path) -> list[str]:
    """``from rlhf_dist.x import _y``, ``module._y`` on an imported package module, and
    ``self.x._y`` (a collaborator's private), with their lines."""
    t = tree(path)
    package_aliases = set()
    out = []
    for node in ast.walk(t):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_dist"):
            for a in node.names:
                if _private(a.name):
                    out.append(f"{path.name}:{node.lineno} imports {node.module}.{a.name}")
                if f"{node.module}.{a.name}" in MODULES:
                    package_aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rlhf_dist"):
                    package_aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(t):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        owner = node.value
        text = ast.unparse(node)
        if text in PRIVATE_ACCESS_ALLOWED:
            continue
        if isinstance(owner, ast.Name) and owner.id in package_aliases:
            out.append(f"{path.name}:{node.lineno} {text}")
        elif isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name):
            if owner.value.id in ("self", "cls"):
                out.append(f"{path.name}:{node.lineno} {text}")
    return out


def test_no_module_reaches_into_another_ones_private_names():
    found = [r for p in FILES for r in private_reaches(p)]
    assert not found, found


def test_the_checker_sees_a_private_reach():
    """The rule above is not vacuous: it flags the three shapes on a planted example."""
    planted = ROOT / "tests" / "fixtures" / "_planted_private_reach.py"
    planted.write_text(
        "from rlhf_dist.config import _attr\n"
        "from rlhf_dist import weight_sync\n"
        "def f(self):\n"
        "    weight_sync._secret()\n"
        "    return self.learners._pool\n"
    )
    try:
        assert len(private_reaches(planted)) == 3
    finally:
        planted.unlink()


def test_module_sizes():
    orchestrator = len((PACKAGE / "orchestrator.py").read_text().splitlines())
    assert orchestrator <= MAX_ORCHESTRATOR_LINES, orchestrator
    for p in (PACKAGE / "driver").glob("*.py"):
        n = len(p.read_text().splitlines())
        assert n <= MAX_DRIVER_MODULE_LINES, (p.name, n)


def long_functions() -> dict[str, int]:
    out = {}
    for p in FILES:
        for node in ast.walk(tree(p)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{module_name(p)}:{node.name}"] = n
    return out


def test_functions_are_short():
    found = long_functions()
    assert set(found) <= set(LONG_FUNCTIONS), {
        k: v for k, v in found.items() if k not in LONG_FUNCTIONS
    }
    # an allowed entry that is short again leaves the list
    assert set(LONG_FUNCTIONS) <= set(found), set(LONG_FUNCTIONS) - set(found)


NAMESPACES = (*K.PPO_NAMESPACES, *K.SUPERVISED_STAGES)
METRIC = re.compile(rf"^({'|'.join(NAMESPACES)})/")


def metric_strings(path: Path) -> list[str]:
    """String literals that are metric keys, and f-strings that build one."""
    out = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and METRIC.match(str(first.value)):
                out.append(f"{path.name}:{node.lineno} f-string {ast.unparse(node)}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if METRIC.match(node.value) and " " not in node.value:
                out.append(f"{path.name}:{node.lineno} {node.value!r}")
    return out


def test_metric_keys_are_spelled_only_in_metric_keys():
    found = [m for p in FILES if p.name != "metric_keys.py" for m in metric_strings(p)]
    assert not found, found


def test_estimator_names_live_in_the_algo_table():
    from rlhf_dist.algo import ESTIMATORS

    names = re.compile(rf"""["']({"|".join(ESTIMATORS)})["']""")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in FILES
        if "algo" not in p.parts
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if names.search(line)
    ]
    assert not found, found


def test_the_driver_sets_the_policy_version_in_one_place():
    """``driver.outcome.publish`` (the push and the version together); ``RunState`` loads a
    checkpoint's; the weight-sync group records what the generators were verified to hold."""
    sets = []
    for p in [PACKAGE / "orchestrator.py", *sorted((PACKAGE / "driver").glob("*.py"))]:
        t = tree(p)
        inits = [n for n in ast.walk(t) if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
        skip = {id(n) for f in inits for n in ast.walk(f)}  # attributes declared, not set
        for node in ast.walk(t):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and e.attr == "version":
                        sets.append(f"{p.name}:{ast.unparse(e)}")
    assert sorted(sets) == [
        "outcome.py:state.version",
        "run_state.py:self.version",
        "sync_group.py:self.version",
    ]


@pytest.mark.parametrize("path", [p for p in FILES if "roles" in p.parts])
def test_roles_import_no_ray(path):
    assert not [m for m in imports_of(path) if m == "ray"]
    for node in ast.walk(tree(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            assert not any(m == "ray" or m.startswith("ray.") for m in mods), (
                path.name,
                node.lineno,
            )
