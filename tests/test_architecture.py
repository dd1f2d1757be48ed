"""The layout is the architecture: imports flow one way, and the rules are checked here.

Core (the top-level modules) at the bottom; the wings `theory`, `deploy`, `check` and `training`
above it; the face (`__init__`, `cli`, `commands`) on top. A wing imports the core and the wings
named in `ALLOWED`, never the face or a wing above it. The checks read the source (AST), so an
import inside `if TYPE_CHECKING:` or inside a function counts like any other.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import types
from pathlib import Path

import pytest

import prunebound

SRC = Path(prunebound.__file__).parent
WINGS = ("theory", "deploy", "check", "training", "certified")
FACE = ("cli", "commands")
ALLOWED = {
    "core": {"core"},
    "theory": {"core", "theory"},
    "deploy": {"core", "deploy"},
    "check": {"core", "theory", "check"},
    "training": {"core", "deploy", "training"},
    "certified": {"core", "theory", "training", "certified"},
    "face": {"core", *WINGS, "face"},
}
MAX_LINES = 400
# the only imports inside functions: heavy or optional dependencies loaded on first use
LAZY_IMPORTS = {
    ("prunebound.data", "load_digits"): "scikit-learn: about 1 s of import time, digits only",
    ("prunebound.deploy.kernels", "_numba_kernels"): "numba: optional, and it compiles",
}


def _module_name(path: Path) -> str:
    parts = ["prunebound", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FACE:
        return "face"
    return parts[1] if parts[1] in WINGS else "core"


def _imports(module: str) -> list[tuple[ast.stmt, str, list[str]]]:
    """(statement, imported prunebound module, names taken from it) for each import."""
    tree = ast.parse(FILES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name, []) for a in node.names if a.name.startswith("prunebound")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            assert node.level == 0, f"{module}: relative import (write prunebound.x absolutely)"
            if not base.startswith("prunebound"):
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{base}.{n}" in FILES]
            out += [(node, f"{base}.{n}", []) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((node, base, rest))
    return out


def test_imports_flow_one_way() -> None:
    upward = [
        f"{m} ({_wing(m)}) imports {target} ({_wing(target)})"
        for m in FILES
        for _, target, _ in _imports(m)
        if _wing(target) not in ALLOWED[_wing(m)]
    ]
    assert upward == []


def test_only_the_face_imports_the_package_face() -> None:
    face_users = [
        f"{m} imports {names or 'prunebound'} from the package face"
        for m in FILES
        for _, target, names in _imports(m)
        if target == "prunebound" and _wing(m) != "face"
    ]
    assert face_users == []


def test_no_import_cycles() -> None:
    graph = {m: sorted({t for _, t, _ in _imports(m) if t in FILES and t != m}) for m in FILES}
    state: dict[str, str] = {}  # "open" while on the path, "done" once explored

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if state.get(m) == "done":
            return
        state[m] = "open"
        for t in graph[m]:
            visit(t, [*path, m])
        state[m] = "done"

    for m in FILES:
        visit(m, [])


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{m}: from {target} import {n}"
        for m in FILES
        for _, target, names in _imports(m)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert private == []


def test_no_function_level_imports() -> None:
    found = []
    for m, path in FILES.items():
        if m == "prunebound.methods":  # the score-function protocol: prune passes a Generator
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and (
                (m, fn.name) not in LAZY_IMPORTS
            ):
                found += [
                    f"{m}:{node.lineno} in {fn.name}"
                    for node in ast.walk(fn)
                    if isinstance(node, ast.Import | ast.ImportFrom)
                ]
    assert found == []


def test_modules_stay_under_400_lines() -> None:
    long = {
        m: n for m, path in FILES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def _all_modules() -> list[str]:
    names = ["prunebound"]
    for info in pkgutil.walk_packages(prunebound.__path__, "prunebound."):
        if info.name.endswith("_numba_kernels"):  # needs the optional numba
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("name", [n for n in _all_modules() if n.count(".") >= 1])
def test_no_public_function_shadows_its_module(name: str) -> None:
    module = importlib.import_module(name)
    parent, _, leaf = name.rpartition(".")
    assert getattr(importlib.import_module(parent), leaf) is module, (
        f"{parent}.{leaf} is not the module {name}: a name imported into {parent} shadows it"
    )
    assert isinstance(module, types.ModuleType)


def test_face_docstring_lists_every_export_on_one_screen() -> None:
    doc = prunebound.__doc__ or ""
    listed = set(re.findall(r"\b\w+\b", doc))
    assert [n for n in prunebound.__all__ if n not in listed] == []
    assert len(doc.splitlines()) <= 40


def test_every_subpackage_says_what_it_holds_and_may_import() -> None:
    for wing in ("deploy", "check", "training", "commands"):  # theory: with its re-housing
        doc = importlib.import_module(f"prunebound.{wing}").__doc__ or ""
        assert "import" in doc, f"prunebound.{wing} does not say what it may import"


def test_one_randomness_vocabulary() -> None:
    """Public functions take randomness as `seed: int | Generator | None` (`_check.Seed`), never
    as `generator=` (issue 11: one spelling, one documented default)."""
    found = []
    for m, path in FILES.items():
        if m == "prunebound.methods":  # the score-function protocol: prune passes a Generator
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_"):
                args = [a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)]
                if "generator" in args:
                    found.append(f"{m}.{fn.name}")
    assert found == []
