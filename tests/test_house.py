"""The house rules, kept by CI (`make lint` runs this file; `make test` too).

Each test reads the source tree (by AST, nothing is imported) and fails with a list of
the places that break its rule:

1. no module in `kfac_fast/` or `kernels/` over 400 lines;
2. imports run one way: frontends -> `ops` -> schemas -> router <- backends -> kernels;
   no import circle among kfac_fast modules; every module the rules name exists;
3. a layer's kind is a class, never a string branch outside `kfac_fast/layers/`;
4. every package of the source tree is in the wheel's package list;
5. the public API (ops, the preconditioner, the optimizer) is fully annotated;
6. CI and pre-commit pin the same ruff.

`kernels/` is shipped as `kfac_fast.kernels`, so its modules are named that way here.
"""
from __future__ import annotations

import ast
import functools
import re
import runpy
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# Source directory -> the package name it is shipped as.
SOURCES = {ROOT / "kfac_fast": "kfac_fast", ROOT / "kernels": "kfac_fast.kernels"}


def _module_files() -> tuple[dict[str, Path], list[str]]:
    """Every module of the package, by the dotted name it is imported under, and the names
    that two files claim (`x.py` next to `x/__init__.py`: the package wins, the file is dead)."""
    modules: dict[str, Path] = {}
    clashes = []
    for top, package in SOURCES.items():
        for path in sorted(top.rglob("*.py")):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name in modules:
                clashes.append(f"{name}: {modules[name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
            if name not in modules or path.name == "__init__.py":
                modules[name] = path
    return modules, clashes


MODULES, NAME_CLASHES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(ROOT)}:{line}"


# --- 1. module size ---------------------------------------------------------------------


def test_no_module_over_400_lines():
    too_long = []
    for path in MODULES.values():
        lines = path.read_bytes().count(b"\n")  # what `wc -l` counts
        if lines > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job):\n  " + "\n  ".join(too_long)


# --- 2. import direction ------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    target: str  # a kfac_fast module (the deepest known module the statement names)
    line: int
    module_level: bool  # runs when the importing module is imported (not in a function or TYPE_CHECKING)


def _resolve(name: str) -> str | None:
    """`name` when it is a kfac_fast module (existing or not), None for other packages."""
    return name if name == "kfac_fast" or name.startswith("kfac_fast.") else None


def _base_package(importer: str, level: int) -> str:
    package = importer if _is_package(importer) else importer.rsplit(".", 1)[0]
    for _ in range(level - 1):
        package = package.rsplit(".", 1)[0]
    return package


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(importer: str) -> list[Import]:
    """The kfac_fast modules `importer` imports: import statements anywhere in the file,
    plus `importlib.import_module("...")` calls with a literal name."""
    tree = _tree(MODULES[importer])
    found: list[Import] = []

    def add(name: str, line: int, module_level: bool) -> None:
        target = _resolve(name)
        if target is not None and target != importer:
            found.append(Import(target, line, module_level))

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            module_level = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, module_level)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, module_level)
        elif isinstance(node, ast.ImportFrom):
            base = _base_package(importer, node.level) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                # `from . import ops` imports the module kfac_fast.ops; `from .ops import eigh`
                # imports kfac_fast.ops.
                sub = f"{module}.{alias.name}"
                add(sub if sub in MODULES or sub == "kfac_fast._C" else module, node.lineno, module_level)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
            name = node.args[0].value
            if name.startswith("."):
                level = len(name) - len(name.lstrip("."))
                name = ".".join(p for p in (_base_package(importer, level), name.lstrip(".")) if p)
            add(name, node.lineno, module_level)
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return found


@functools.cache
def _all_imports() -> dict[str, list[Import]]:
    return {name: _imports(name) for name in MODULES}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# The layers below the public op API. Everything else in kfac_fast is a frontend
# (preconditioner, optimizer, tridiag, distributed, integrations, layers, demo, health, ...).
KERNELS = ("kfac_fast.kernels", "kfac_fast._C")
BACKENDS = ("kfac_fast.backends",)
CORE = ("kfac_fast.ops", "kfac_fast._validate", "kfac_fast._guards", "kfac_fast._ops", "kfac_fast._dispatch",
        "kfac_fast._info", "kfac_fast._flags", *BACKENDS, *KERNELS)


def _is_frontend(name: str) -> bool:
    return not _under(name, *CORE)


# (who, what it may never import, why)
DIRECTION_RULES = [
    ("frontends", _is_frontend, lambda t: _under(t, *BACKENDS, "kfac_fast.kernels"),
     "frontends reach the implementations only through kfac_fast.ops"),
    ("kernels", lambda m: _under(m, "kfac_fast.kernels"),
     lambda t: _under(t, *BACKENDS, "kfac_fast.ops") or _is_frontend(t),
     "kernels never fall back nor call up: the router decides who serves a call"),
    ("the router", lambda m: m == "kfac_fast._dispatch",
     lambda t: _under(t, *BACKENDS, "kfac_fast.kernels", "kfac_fast.ops", "kfac_fast._ops") or _is_frontend(t),
     "backends register themselves with the router; the router names none of them"),
    ("backends", lambda m: _under(m, *BACKENDS),
     lambda t: _under(t, "kfac_fast.ops") or _is_frontend(t),
     "backends sit below the public op API"),
]


@pytest.mark.parametrize("who, importer_rule, forbidden, why", DIRECTION_RULES, ids=[r[0] for r in DIRECTION_RULES])
def test_import_direction(who, importer_rule, forbidden, why):
    imports = _all_imports()
    wrong = [f"{_where(name, imp.line)}: {name} imports {imp.target}"
             for name in MODULES if importer_rule(name)
             for imp in imports[name] if forbidden(imp.target)]
    assert not wrong, f"{who} import what they must not ({why}):\n  " + "\n  ".join(wrong)


def test_module_groups_name_existing_modules(monkeypatch):
    """A group above that names a module which no longer exists would silently stop guarding
    anything: every name must be a module of the source tree or a compiled module setup.py builds."""
    compiled = {ext.name for ext in _setup_kwargs(monkeypatch)["ext_modules"]}
    groups = {"KERNELS": KERNELS, "BACKENDS": BACKENDS, "CORE": CORE, "TYPED_API": TYPED_API}
    stale = [f"{group}: {name}" for group, names in groups.items() for name in names
             if name not in MODULES and name not in compiled]
    assert not stale, "module groups name modules that do not exist (rename or drop them):\n  " + "\n  ".join(stale)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    components.append(sorted(component))
    return components


def test_no_import_cycle():
    imports = _all_imports()
    # Only imports that run at import time, and only the module named: importing
    # kfac_fast.x.y also runs kfac_fast/__init__.py, but that edge is Python's, not ours.
    graph = {name: {i.target for i in imports[name] if i.module_level and i.target in MODULES} for name in MODULES}
    cycles = _cycles(graph)
    described = []
    for component in cycles:
        edges = [f"{_where(a, i.line)}: {a} -> {i.target}" for a in component
                 for i in imports[a] if i.module_level and i.target in component]
        described.append(" / ".join(component) + "\n    " + "\n    ".join(edges))
    assert not cycles, "import circles among kfac_fast modules:\n  " + "\n  ".join(described)


# --- 3. layer kinds are classes -------------------------------------------------------------

# Compared with anything, these literals are a branch on a layer's kind.
LAYER_KIND_NAMES = {"linear", "conv1d", "conv2d", "conv", "embedding", "layernorm", "layer_norm"}


def _is_kind(node: ast.expr) -> bool:
    """`<anything>.kind`: a layer's kind (a bare `kind` name is too common to mean only that,
    so it counts through the literals above)."""
    return isinstance(node, ast.Attribute) and node.attr == "kind"


def _strings(node: ast.expr) -> set[str] | None:
    """The string literals `node` is made of, or None when it is not all string literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        parts = [_strings(e) for e in node.elts]
        if all(p is not None for p in parts):
            return set().union(*parts)  # type: ignore[arg-type]
    return None


def _kind_branches(path: Path) -> list[str]:
    tree = _tree(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for a, b in zip(operands, operands[1:]):
                for x, y in ((a, b), (b, a)):
                    strings = _strings(y)
                    if strings is not None and (_is_kind(x) or strings & LAYER_KIND_NAMES):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Match) and _is_kind(node.subject):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: match {ast.unparse(node.subject)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and _is_kind(node.func.value)):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def test_no_string_branch_on_layer_kind_outside_layers():
    layers = ROOT / "kfac_fast" / "layers"
    found = [hit for path in MODULES.values() if layers not in path.parents for hit in _kind_branches(path)]
    assert not found, ("string branches on a layer's kind outside kfac_fast/layers/ (give the layer class a "
                       "method instead):\n  " + "\n  ".join(found))


# --- 4. packaging ---------------------------------------------------------------------------


def _setup_kwargs(monkeypatch) -> dict:
    """What setup.py passes to setuptools.setup(), without building anything."""
    import setuptools

    captured: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_every_package_is_in_the_wheel(monkeypatch):
    assert not NAME_CLASHES, "a module and a package of the same name:\n  " + "\n  ".join(NAME_CLASHES)
    source_dirs = {path.parent for path in MODULES.values()}
    not_packages = sorted(str(d.relative_to(ROOT)) for d in source_dirs if not (d / "__init__.py").is_file())
    assert not not_packages, ("directories holding modules without an __init__.py (a wheel leaves them out):\n  "
                              + "\n  ".join(not_packages))
    kwargs = _setup_kwargs(monkeypatch)
    packages = {name for name in MODULES if _is_package(name)}
    listed = set(kwargs["packages"])
    assert packages - listed == set(), f"packages missing from setup.py's package list: {sorted(packages - listed)}"
    assert listed - packages == set(), f"setup.py lists packages that do not exist: {sorted(listed - packages)}"
    assert kwargs["package_dir"].get("kfac_fast.kernels") == "kernels"
    assert "py.typed" in kwargs.get("package_data", {}).get("kfac_fast", [])
    assert (ROOT / "kfac_fast" / "py.typed").is_file()


# --- 5. annotations on the public API -------------------------------------------------------

TYPED_API = ("kfac_fast.ops", "kfac_fast.preconditioner", "kfac_fast.optimizer")


def _unannotated(path: Path) -> list[str]:
    tree = _tree(path)
    where = path.relative_to(ROOT)
    missing = []

    def check(fn: ast.FunctionDef | ast.AsyncFunctionDef, owner: str) -> None:
        args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs, fn.args.vararg, fn.args.kwarg]
        if owner and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list):
            args = args[1:]  # self / cls
        names = [a.arg for a in args if a is not None and a.annotation is None]
        if names:
            missing.append(f"{where}:{fn.lineno}: {owner}{fn.name}: parameters {', '.join(names)}")
        if fn.returns is None and fn.name != "__init__":
            missing.append(f"{where}:{fn.lineno}: {owner}{fn.name}: return type")

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            check(node, "")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name == "__init__"):
                    check(item, f"{node.name}.")
    return missing


def test_public_api_is_annotated():
    paths = [path for name, path in MODULES.items() if _under(name, *TYPED_API)
             and not any(part.startswith("_") and part != "__init__" for part in name.split(".")[1:])]
    assert paths, "no module of the typed public API found"
    missing = [m for path in paths for m in _unannotated(path)]
    assert not missing, "public functions without full annotations:\n  " + "\n  ".join(missing)


# --- 6. one ruff version ---------------------------------------------------------------------


def test_ruff_pins_agree():
    """The Makefile (CI) and pre-commit run the same ruff: a rule that passes one passes both."""
    makefile = re.search(r"ruff==([0-9.]+)", (ROOT / "Makefile").read_text())
    hook = re.search(r"ruff-pre-commit\s+rev:\s*v([0-9.]+)", (ROOT / ".pre-commit-config.yaml").read_text())
    assert makefile and hook, "ruff must be pinned in the Makefile and in .pre-commit-config.yaml"
    assert makefile.group(1) == hook.group(1), f"Makefile pins ruff {makefile.group(1)}, pre-commit {hook.group(1)}"
