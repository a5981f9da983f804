"""Import rules: components never import each other; the core imports none of them except on its top floor
(``kiln.cli`` and ``kiln.local``, inside functions); the operator stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kiln

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {"kiln_operator": ROOT / "operator", "kiln_trainer": ROOT / "trainer", "kiln_serving": ROOT / "serving"}
HEAVY = ("torch", "onnxruntime", "kopf", "torchvision", "onnx")
# The `kiln` command, `kiln run` and the metrics reference: the only core modules that may reach a
# component, and only inside functions.
TOP_FLOOR = {"kiln/cli.py", "kiln/local.py", "kiln/metrics_reference.py"}


def _imported_top_levels(folder: Path, module_level_only: bool) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_a_component_never_imports_another_component(component: str) -> None:
    imported = _imported_top_levels(COMPONENTS[component] / component, module_level_only=False)
    for other in COMPONENTS.keys() - {component}:
        assert other not in imported, f"{component} imports {other} in {sorted(imported[other])}"


def test_kiln_core_never_imports_a_component_or_heavy_library_at_module_level() -> None:
    imported = _imported_top_levels(ROOT / "kiln", module_level_only=True)
    for name in (*COMPONENTS, *HEAVY):
        assert name not in imported, f"kiln imports {name} at module level in {sorted(imported[name])}"


def test_below_its_top_floor_the_core_imports_no_component_or_heavy_library_even_inside_functions() -> None:
    imported = _imported_top_levels(ROOT / "kiln", module_level_only=False)
    for name in (*COMPONENTS, *HEAVY):
        below = sorted(set(imported.get(name, ())) - TOP_FLOOR)
        assert not below, f"{name} is imported by {below}, below the top floor {sorted(TOP_FLOOR)}"


def test_source_roots_have_no_init_file_that_could_shadow_the_standard_library() -> None:
    for root in COMPONENTS.values():
        assert not (root / "__init__.py").exists(), f"{root}/__init__.py would make '{root.name}' a package"


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("kiln_operator", ("torch", "onnxruntime")),
        ("kiln_operator.handlers", ("torch", "onnxruntime")),
        ("kiln.cli", ("torch", "onnxruntime", "kopf")),
        ("kiln_serving", ("torch",)),
    ],
)
def test_importing_a_light_module_loads_no_heavy_library(module: str, forbidden: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import {module} loaded {out}"


def test_kiln_help_is_answered_without_any_component() -> None:
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("crd", "train", "compile", "serve", "operator", "run"):
        assert command in out.stdout


def test_kiln_version_names_the_version() -> None:
    code = "import kiln.cli; kiln.cli.main(['--version'])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"kiln {kiln.__version__}", run.stdout + run.stderr
