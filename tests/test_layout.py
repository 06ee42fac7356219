"""The package's shape (docs/architecture.md): one import root, no import circle, layers that
only point down, no project import hidden in a function body."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

# where each subpackage's source lives (pyproject.toml's package-dir)
SOURCES = {"robust_amo": ROOT / "robust_amo", "robust_amo.attacks": ROOT / "attacks",
           "robust_amo.evaluation": ROOT / "evaluation", "robust_amo.configs": ROOT / "configs"}

# The tiers, bottom first (docs/architecture.md). A module may import its own unit, any unit of a
# lower tier, and a unit of its own tier as long as the units of a tier form no circle; never a
# unit of a higher tier.
TIERS: dict[str, tuple[str, ...]] = {
    # errors, the config schema and the shipped YAML files, seeds and devices, output folders
    # and the run-folder layout, typed job requests
    "foundation": ("errors", "version", "configs", "config", "jobs", "runtime", "outputs",
                   "runs"),
    # tensors and modules that know no algorithm: architectures, datasets, δ hooks, torchrun,
    # torch.compile, pictures, TensorBoard
    "components": ("models", "data", "perturb", "distributed", "compiled", "curves", "tblog"),
    # the papers' algorithms and the checkpoint format
    "algorithms": ("attacks", "checkpoint", "methods", "margins"),
    # what a user runs, as library calls: training, evaluation, studies, robustness
    "workflows": ("resolve", "train", "evaluation", "integrations", "studies", "worker"),
    # flags and the package facade
    "interfaces": ("cli", ""),
}
RANKS = {("robust_amo." + unit).rstrip("."): rank
         for rank, units in enumerate(TIERS.values()) for unit in units}


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out: dict[str, Path] = {}
    for root_name, folder in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([root_name, *parts])
            if root_name == "robust_amo" and len(parts) > 0 and parts[0] in (
                    "attacks", "evaluation", "configs"):
                raise AssertionError(f"{f}: robust_amo/{parts[0]} shadows the mapped folder")
            out[name] = f
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, tree: ast.Module):
    """(imported project module, line, inside a function?) for every import of the module,
    at module level or in a function body; ``if TYPE_CHECKING:`` blocks are skipped."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    yield from visit(c, in_function)
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "robust_amo":
                        yield resolve(a.name), child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] != "robust_amo":
                    continue
                for a in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{mod}.{a.name}"
                    yield (sub if sub in MODULES else resolve(mod)), child.lineno, in_function
            yield from visit(child, inner)

    yield from visit(tree, False)


GRAPH: dict[str, set[str]] = {}
FUNCTION_IMPORTS: list[str] = []
for _name, _file in MODULES.items():
    GRAPH[_name] = set()
    for _target, _line, _in_function in _imports(_name, ast.parse(_file.read_text())):
        if _target is None or _target == _name:
            continue
        GRAPH[_name].add(_target)
        if _in_function:
            FUNCTION_IMPORTS.append(f"{_file.relative_to(ROOT)}:{_line} imports {_target}")


def _unit(name: str) -> str:
    """The ranked unit a module belongs to ("" if none: a module missing from TIERS)."""
    unit = name
    while unit and unit not in RANKS:
        unit = unit.rpartition(".")[0]
    # the facade is the package's __init__ alone, not a home for unlisted modules
    return "" if unit == "robust_amo" and name != "robust_amo" else unit


def test_the_module_walk_sees_the_package():
    assert {"robust_amo.attacks.pgd", "robust_amo.evaluation.runner", "robust_amo.cli.train",
            "robust_amo.integrations.robustness.attacker"} <= set(MODULES)
    assert "robust_amo.attacks.core" in GRAPH["robust_amo.attacks.pgd"]
    assert "robust_amo.methods.registry" in GRAPH["robust_amo.methods.pgd"]


def test_no_import_circle():
    """Every import counts, lazy ones too: a lazy import dodges a circle at run time only."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := dfs(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (cycle := dfs(n)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_layers_only_point_down():
    unranked = sorted(n for n in MODULES if not _unit(n))
    assert not unranked
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if RANKS[_unit(b)] > RANKS[_unit(a)])
    assert upward == []


def test_units_of_a_tier_form_no_circle():
    """Units of one tier may import each other, one way only."""
    units: dict[str, set[str]] = {}
    for a, targets in GRAPH.items():
        units.setdefault(_unit(a), set()).update(_unit(b) for b in targets if _unit(b) != _unit(a))
    state: dict[str, int] = {}

    def dfs(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(units.get(u, ())):
            if state.get(v) == 1:
                return [*path, u, v]
            if v not in state and (cycle := dfs(v, [*path, u])):
                return cycle
        state[u] = 2
        return None

    for u in sorted(units):
        if u not in state and (cycle := dfs(u, [])):
            pytest.fail("units import each other: " + " -> ".join(cycle))


def test_no_project_import_inside_a_function():
    assert FUNCTION_IMPORTS == []


def test_import_robust_amo_loads_no_optional_heavy_package():
    code = ("import sys, robust_amo, robust_amo.cli, robust_amo.evaluation, robust_amo.margins; "
            "bad = [m for m in ('robustness', 'autoattack', 'pyautoattack', 'matplotlib') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.slow
def test_the_wheel_installs_only_robust_amo(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build the wheel offline")
    # from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("robust_amo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        declared = set(z.read(top_level).decode().split())
    assert top == {"robust_amo"} and declared == {"robust_amo"}
    # the mapped folders are inside, under the one root
    assert "robust_amo/attacks/pgd.py" in names and "robust_amo/evaluation/runner.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # the shipped configs and studies are package data: found by name after a wheel install
    shipped = {f.relative_to(ROOT).as_posix() for f in (ROOT / "configs").rglob("*.yaml")}
    assert len(shipped) > 60 and "configs/quickstart.yaml" in shipped
    assert {f"robust_amo/{n}" for n in shipped} <= set(names)
    assert {"robust_amo/configs/__init__.py", "robust_amo/configs/studies/sokolic-table1.yaml",
            "robust_amo/configs/sokolic_table1/mnist_cnn2_256_ce_lm.yaml"} <= set(names)
