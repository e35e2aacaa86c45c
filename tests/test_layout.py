"""Dependency direction: core <- services <- applications, the two applications apart, no import cycles, and
inside trainer/ the worker side (what runs in Ray workers) never reaching for the driver side (trainer/pipeline/)."""

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "nanochat": {"services", "trainer", "serving", "cli", "ray", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "pyarrow", "jax", "optax", "torchao"},
    "services": {"trainer", "serving", "cli"},
    "trainer": {"serving", "cli"},
    "serving": {"trainer", "cli"},
}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every absolute import in a module, wherever it stands (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_import_scanner_sees_lazy_and_from_imports():
    source = "import os\ndef f():\n    from ray.train import report\n    import boto3.session\nfrom . import sibling\n"
    assert imported_modules(source) == {"os", "ray", "boto3"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path.read_text()) & FORBIDDEN[package])
    ]
    assert not violations, "\n".join(violations)


def test_importing_the_core_loads_no_service_frameworks():
    modules = [f"nanochat.{p.stem}" for p in sorted((ROOT / "nanochat").glob("*.py")) if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(' '.join(sorted(n for n in ('ray', 'fastapi', 'boto3', 'pyarrow', 'services', 'trainer', 'serving') if n in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


PRODUCT = ("nanochat", "services", "trainer", "serving", "cli")
DRIVER = "trainer.pipeline"  # runs in the command-line process; everything else in trainer/ may run in workers


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))}


def imported_product_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The product modules a file imports, wherever the import stands (lazy ones too): `from a.b import c`
    counts as a.b.c when that is a module, else as a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: imported_product_modules(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[list[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                yield from visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                yield sorted(group)

    for node in sorted(graph):
        if node not in index:
            yield from visit(node)


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert list(cycles(graph)) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_product():
    found = list(cycles(import_graph()))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(group) for group in found)


def test_worker_code_never_imports_the_driver_side():
    """trainer/data, evals, tasks, stages, jaxgpt, optim.py and worker.py run inside Ray workers; the driver
    side (trainer/pipeline/: jobs, speedrun, sweeps, report, progress) may import them, never the reverse."""
    violations = [
        f"{name} imports {target}"
        for name, targets in sorted(import_graph().items())
        if name.startswith("trainer.") and not name.startswith(DRIVER)
        for target in sorted(targets)
        if target == DRIVER or target.startswith(DRIVER + ".")
    ]
    assert not violations, "\n".join(violations)

