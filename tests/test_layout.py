"""Dependency direction (DEVELOPERS.md): core <- services <- applications, and the two applications apart."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "nanochat": {"services", "trainer", "serving", "cli", "ray", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "pyarrow", "jax", "optax"},
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
