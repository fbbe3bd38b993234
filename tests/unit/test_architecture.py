"""The house rules of DESIGN.md, checked rather than remembered."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distributed_ft"
ONE_IMPORTER = {
    "deepspeed": "engine/deepspeed_engine.py",
    "ray": ("backends/ray_train.py", "backends/ray_tune.py"),  # Ray Train and Ray Tune, both backends/
    "peft": "modeling/peft.py",
    "mlflow": "runtime/trackers.py",
    "matplotlib": "train/report.py",
    "accelerate": None,  # accelerate is a launcher here; the library never imports it
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("dependency", sorted(ONE_IMPORTER))
def test_each_heavy_dependency_has_one_importer(dependency):
    importers = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if dependency in _imported_roots(p)
    )
    allowed = ONE_IMPORTER[dependency]
    allowed = set(allowed) if isinstance(allowed, tuple) else {allowed}
    only = sorted(allowed - {None})
    assert set(importers) <= allowed, f"{dependency} imported by {importers}; only {only} may"


def test_layers_point_downward():
    """import-linter contracts in pyproject.toml: cli -> backends -> train -> ... -> config."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_and_cli_loads_no_heavy_dependency():
    code = (
        "import sys, distributed_ft, distributed_ft.cli; "
        "heavy = {'torch', 'transformers', 'deepspeed', 'ray', 'peft', 'accelerate'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_optional_task_capabilities_are_declared_protocols():
    """Callers test ``isinstance(task, Capability)``; no ``getattr`` probes for task methods."""
    import importlib

    from distributed_ft.tasks import TASKS
    from distributed_ft.tasks.base import Generates, PreparesTokenizer

    classes = {name: getattr(importlib.import_module(m), c) for name, (m, c) in TASKS.items()}
    generates = {name for name, cls in classes.items() if issubclass(cls, Generates)}
    marks = {name for name, cls in classes.items() if issubclass(cls, PreparesTokenizer)}
    assert generates == {"causal_lm"}
    assert marks == set(TASKS)  # every task takes something from the tokenizer (pad id, markers, template)
    for path in (PACKAGE / "train").glob("*.py"):
        assert 'getattr(task, "' not in path.read_text(), f"{path.name} probes a task with getattr"
