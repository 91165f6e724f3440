"""The layout's import rules, read from every import statement (ast: module level, inside functions and under
TYPE_CHECKING alike), and the import diet the start-up path and the bare-loop GPU script rely on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / package).rglob("*.py")}


KNOWN = {**_modules("orchestrator"), **_modules("methods")}


def _imports(path: Path) -> set[str]:
    """Every project module `path` imports (`from a.b import c` counts as a.b.c when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in KNOWN}
    return {name for name in found if name.split(".")[0] in ("orchestrator", "methods")}


GRAPH = {name: _imports(path) for name, path in KNOWN.items()}


def _violations(importer_prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{src} imports {dst}" for src, deps in GRAPH.items() if src.startswith(importer_prefix)
                  for dst in deps if dst.startswith(forbidden))


def test_the_graph_sees_function_level_and_type_checking_imports() -> None:
    assert "orchestrator.experiment.teachers" in GRAPH["orchestrator.experiment.runner"]  # module level
    assert "orchestrator.study.report" in GRAPH["orchestrator.study.outputs"]  # inside a function
    assert "orchestrator.study.results" in GRAPH["orchestrator.study.display"]  # under TYPE_CHECKING


def test_wings_import_one_way() -> None:
    assert _violations("methods", ("orchestrator",)) == []
    assert _violations("orchestrator.experiment", ("orchestrator.search", "orchestrator.study")) == []
    assert _violations("orchestrator.search", ("orchestrator.study",)) == []
    wings = ("orchestrator.experiment", "orchestrator.search", "orchestrator.study", "orchestrator.errors")
    assert _violations(wings, ("orchestrator.cli",)) == []


def test_no_import_circles_inside_orchestrator() -> None:
    graph = {src: {d for d in deps if d in GRAPH and d.startswith("orchestrator.") and d != src}
             for src, deps in GRAPH.items() if src.startswith("orchestrator")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep.count(".") == 1 and dep in ("orchestrator.experiment", "orchestrator.search", "orchestrator.study"):
                continue  # a wing's __init__ holds only its docstring
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_orchestrator_file_is_over_300_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "orchestrator").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}


_SWEEP_IMPORTS = """
import importlib, pkgutil, sys
import orchestrator.cli, orchestrator.search
for module in pkgutil.iter_modules(orchestrator.search.__path__, "orchestrator.search."):
    importlib.import_module(module.name)  # every module a sweep's driver and its trials can load
print(sorted(m for m in sys.modules if m.startswith("orchestrator.study")))
"""


def test_kdo_sweep_loads_nothing_of_the_study_wing() -> None:
    done = subprocess.run([sys.executable, "-c", _SWEEP_IMPORTS], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


_BLOCKED = """
import sys
for name in ("ray", "mlflow", "optuna"):
    sys.modules[name] = None  # importing it now raises ImportError, as if it were not installed
import orchestrator.experiment.config, orchestrator.experiment.data, orchestrator.experiment.loop
from orchestrator.experiment.config import load_config
cfg = load_config({"student": {"architecture": "mlp"}, "method": {"name": "kd"},
                   "teacher": {"architecture": "cnn"}})
print(cfg.method.name)
"""


def test_the_loop_config_and_data_run_without_ray_mlflow_or_optuna() -> None:
    done = subprocess.run([sys.executable, "-c", _BLOCKED], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "kd"


def test_importing_orchestrator_loads_no_ray_mlflow_optuna_or_matplotlib() -> None:
    code = ("import sys, orchestrator; print(sorted(m for m in ('ray', 'mlflow', 'optuna', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


_CONFIG_ERRORS = """
import sys
for name in ("ray", "mlflow", "optuna", "matplotlib", "torchvision", "scipy.stats"):
    sys.modules[name] = None  # importing it now raises ImportError: a config error must not need it
from typer.testing import CliRunner
from orchestrator.cli import app
bad, study = sys.argv[1:]
for args in (["run", bad], ["sweep", bad], ["sweep", "digits_kd", "--set", "training.epochs=x"], ["study", study]):
    result = CliRunner().invoke(app, args)
    print(result.exit_code, result.output.strip().splitlines()[-1])
"""


def test_config_errors_need_no_ray_mlflow_optuna_matplotlib_or_scipy(tmp_path: Path) -> None:
    """`kdo run|sweep|study` refuse a bad config before importing what only a launch needs (their start-up)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: kd}\n")
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nconfig: {bad}\nmethods: {{kd: null}}\n")
    done = subprocess.run([sys.executable, "-c", _CONFIG_ERRORS, str(bad), str(study)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines == ["2 error: student: required field is missing"] * 2 + [
        "2 error: training.epochs: Input should be a valid integer, unable to parse string as an integer (got 'x')",
        "2 error: student: required field is missing"], lines
