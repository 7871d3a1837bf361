"""The shape of ``src/hevc_vit`` (issue 21), from an ast scan of its files (fast; no import-linter needed):
no import cycle, no function-level import but of an optional dependency (with its reason on the line), no module
over 400 lines, no package of more than 10 modules, at most 8 rooms at the top of ``encode``, and nothing outside
``encode`` importing it but ``cli``, ``bench`` and ``moved``. ``lint-imports`` (pyproject.toml) checks the layers.

Each check is a function of a scanned tree returning its problems, one line naming the module each; the
``test_*_catches_*`` tests run it on a small tree written to ``tmp_path`` that breaks its rule, so a check that
could never fail would fail there.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400
MAX_PACKAGE_MODULES = 10
MAX_ENCODE_ROOMS = 8
# deferred imports allowed inside a function: optional dependencies (an extra, or not a dependency at all)
OPTIONAL = {"ray", "pyarrow", "av", "datasets", "fsspec", "aiohttp", "requests", "torchcodec", "psutil"}
OPTIONAL |= {"flash_attn", "accelerate", "deepspeed", "cv2"}
# modules of a core dependency that only some of its versions have (imported where that is tried)
VERSION_GATED = ("transformers.core_model_loading", "transformers.conversion_mapping")
ABOVE_ENCODE = ("hevc_vit.cli", "hevc_vit.bench", "hevc_vit.moved", "hevc_vit.__main__")  # may import encode


@dataclass(frozen=True)
class Import:
    target: str  # the imported module (``from m import name``: ``m.name`` when that is a module, else ``m``)
    line: int
    in_function: bool
    text: str  # the source line (for its comment)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int
    imports: list[Import] = field(default_factory=list)


def scan(src: Path, package: str = "hevc_vit") -> dict[str, Module]:
    """Every module under ``src/package`` with its imports (module-level, in ``if``/``try`` blocks, and inside
    functions), each resolved to a module name."""
    modules: dict[str, Module] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, is_package, len(text.splitlines()))
    for module in modules.values():
        text = module.path.read_text(encoding="utf-8")
        source_lines = text.splitlines()
        tree = ast.parse(text)
        in_function = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for node in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node, modules):
                    line = source_lines[node.lineno - 1]
                    module.imports.append(Import(target, node.lineno, id(node) in in_function, line))
    return modules


def _targets(module: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def internal_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (any kind of import)."""
    return {
        name: {i.target for i in m.imports if i.target in modules and i.target != name} for name, m in modules.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def cycle_problems(modules: dict[str, Module]) -> list[str]:
    edges = internal_edges(modules)
    return [
        f"import cycle among {', '.join(c)}: " + "; ".join(f"{m} -> {sorted(edges[m] & set(c))}" for m in c)
        for c in cycles(edges)
    ]


def _reason(line: str) -> str:
    """The words of a line's comment, less any ``noqa`` code."""
    comment = line.partition("#")[2]
    return re.sub(r"noqa(:\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*)?", "", comment).strip(" ()-—:;,")


def function_import_problems(modules: dict[str, Module]) -> list[str]:
    problems = []
    for name, module in sorted(modules.items()):
        for i in module.imports:
            if not i.in_function:
                continue
            optional = i.target.split(".")[0] in OPTIONAL or i.target.startswith(VERSION_GATED)
            if not optional:
                problems.append(f"{name}:{i.line} imports {i.target} inside a function; import it at module level")
            elif not _reason(i.text):
                problems.append(f"{name}:{i.line} defers {i.target} without a reason comment on its line")
    return problems


def size_problems(modules: dict[str, Module], root: str = "hevc_vit") -> list[str]:
    problems = [
        f"{name} has {m.lines} lines; at most {MAX_LINES}: split it by concept"
        for name, m in sorted(modules.items())
        if m.lines > MAX_LINES
    ]
    for package in sorted(n for n, m in modules.items() if m.is_package):
        inside = sorted(n for n, m in modules.items() if n.rpartition(".")[0] == package and not m.is_package)
        count = len(inside) + 1  # its __init__
        if count > MAX_PACKAGE_MODULES:  # the top level too: the model core, the rest in packages
            problems.append(f"package {package} has {count} modules; at most {MAX_PACKAGE_MODULES}")
    encode = f"{root}.encode"
    rooms = sorted(n for n in modules if n.rpartition(".")[0] == encode)
    if len(rooms) > MAX_ENCODE_ROOMS:
        problems.append(f"{encode} has {len(rooms)} rooms at its top ({', '.join(rooms)}); at most {MAX_ENCODE_ROOMS}")
    return problems


def encode_import_problems(modules: dict[str, Module], root: str = "hevc_vit") -> list[str]:
    encode = f"{root}.encode"
    above = tuple(a.replace("hevc_vit", root, 1) for a in ABOVE_ENCODE)
    return [
        f"{name}:{i.line} imports {i.target}; only {', '.join(above)} may import {encode}"
        for name, m in sorted(modules.items())
        if not (name == encode or name.startswith(encode + ".") or name in above or name.startswith(above))
        for i in m.imports
        if i.target == encode or i.target.startswith(encode + ".")
    ]


# --------------------------------------------------------------------------------------------------
# the package
# --------------------------------------------------------------------------------------------------

MODULES = scan(SRC)


def test_no_import_cycle():
    problems = cycle_problems(MODULES)
    assert not problems, "\n".join(problems)


def test_function_level_imports_are_optional_dependencies_with_a_reason():
    problems = function_import_problems(MODULES)
    assert not problems, "\n".join(problems)


def test_modules_and_packages_keep_their_size():
    problems = size_problems(MODULES)
    assert not problems, "\n".join(problems)


def test_only_cli_bench_and_moved_import_encode_from_outside():
    problems = encode_import_problems(MODULES)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# each check fails on a tree that breaks its rule
# --------------------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(tmp_path, "pkg")


def test_cycle_check_catches_a_cycle_through_a_function_level_import(tmp_path):
    modules = _tree(
        tmp_path,
        {"__init__.py": "", "a.py": "from pkg.b import x\n", "b.py": "def f():\n    from pkg import a\nx = 1\n"},
    )
    assert cycle_problems(modules) == ["import cycle among pkg.a, pkg.b: pkg.a -> ['pkg.b']; pkg.b -> ['pkg.a']"]


def test_function_import_check_catches_core_imports_and_missing_reasons(tmp_path):
    body = (
        "def f():\n    import numpy\n    import ray\n    import av  # noqa: F401\n    import fsspec  # optional: data\n"
    )
    modules = _tree(tmp_path, {"__init__.py": "", "m.py": body})
    assert function_import_problems(modules) == [
        "pkg.m:2 imports numpy inside a function; import it at module level",
        "pkg.m:3 defers ray without a reason comment on its line",
        "pkg.m:4 defers av without a reason comment on its line",
    ]


def test_size_check_catches_long_modules_full_packages_and_crowded_encode(tmp_path):
    files = {"__init__.py": "", "encode/__init__.py": "", "big.py": "x = 1\n" * (MAX_LINES + 1)}
    files |= {f"full/m{i}.py": "" for i in range(MAX_PACKAGE_MODULES)} | {"full/__init__.py": ""}
    files |= {f"encode/room{i}.py": "" for i in range(MAX_ENCODE_ROOMS + 1)}
    files |= {f"top{i}.py": "" for i in range(MAX_PACKAGE_MODULES)}  # with big.py and __init__: 2 over
    problems = size_problems(_tree(tmp_path, files), root="pkg")
    assert f"pkg.big has {MAX_LINES + 1} lines; at most {MAX_LINES}: split it by concept" in problems
    assert f"package pkg.full has {MAX_PACKAGE_MODULES + 1} modules; at most {MAX_PACKAGE_MODULES}" in problems
    assert any(p.startswith(f"pkg.encode has {MAX_ENCODE_ROOMS + 1} rooms") for p in problems)
    assert f"package pkg has {MAX_PACKAGE_MODULES + 2} modules; at most {MAX_PACKAGE_MODULES}" in problems


def test_encode_check_catches_an_import_from_below(tmp_path):
    files = {"__init__.py": "", "encode/__init__.py": "", "encode/x.py": "", "cli.py": "import pkg.encode\n"}
    files["codec.py"] = "def f():\n    from pkg.encode.x import y\n"
    assert encode_import_problems(_tree(tmp_path, files), root="pkg") == [
        "pkg.codec:2 imports pkg.encode.x; only pkg.cli, pkg.bench, pkg.moved, pkg.__main__ may import pkg.encode"
    ]
