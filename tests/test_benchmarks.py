"""The benchmark scripts (``benchmarks/``) are not run by the suite, but every name they import from ``hevc_vit``
must exist: a module that moved or a name that was renamed breaks a script silently otherwise."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.rglob("*.py") if "onevision_encoder" not in p.parts)  # not the vendored code


def _hevc_vit_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` for every ``import hevc_vit...`` / ``from hevc_vit... import name`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hevc_vit"):
            found += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("hevc_vit")]
    return found


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(BENCHMARKS).as_posix())
def test_every_hevc_vit_name_a_benchmark_imports_exists(script):
    missing = []
    for line, module, name in _hevc_vit_imports(script):
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_check_catches_a_name_that_is_gone(tmp_path):
    script = tmp_path / "b.py"
    script.write_text("from hevc_vit.packing import patchify, no_such_name\n")
    names = [(m, n) for _, m, n in _hevc_vit_imports(script)]
    assert names == [("hevc_vit.packing", "patchify"), ("hevc_vit.packing", "no_such_name")]
    assert not hasattr(importlib.import_module("hevc_vit.packing"), "no_such_name")
