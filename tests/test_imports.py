"""Which way the imports go (shared/DESIGN.md): model/ imports only itself, dataset/ only itself, inference code
(eval_llm.py, scripts/) only model/ and dataset/, no stage script another, and no module imports itself through a
circle. Every import statement counts, those inside functions too."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "dataset", "trainer", "scripts")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((REPO_ROOT / package).glob("*.py"))}
MODULES["eval_llm"] = REPO_ROOT / "eval_llm.py"


def imported_names(name: str) -> set[str]:
    """Every module name that module ``name`` imports (``from a.b import c`` gives a.b and a.b.c), relative imports
    resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def top(module: str) -> str:
    return module.split(".")[0]


def imported_packages(name: str) -> set[str]:
    return {top(module) for module in imported_names(name)} & set(ALLOWED)


def imported_modules(name: str) -> set[str]:
    """The repo's modules that module ``name`` imports."""
    return {module for module in imported_names(name) if module in MODULES and module != name}


ALLOWED = {"model": {"model"}, "dataset": {"dataset"}, "scripts": {"model", "dataset"},
           "eval_llm": {"model", "dataset"}, "trainer": {"model", "dataset", "trainer"}}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_the_designed_way(name):
    assert imported_packages(name) <= ALLOWED[top(name)]
    if top(name) == "scripts":  # a script does not import another one either
        assert not {module for module in imported_modules(name) if module.startswith("scripts.")}


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name.startswith("trainer.train_")))
def test_no_stage_script_imports_another(name):
    assert not {module for module in imported_modules(name) if module.startswith("trainer.train_")}


def test_no_module_imports_itself_through_a_circle():
    edges = {name: imported_modules(name) for name in MODULES}
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(edges[name]):
            if state.get(other) == "open":
                circles.append(" -> ".join(path[path.index(other):] + [name, other]))
            elif other not in state:
                visit(other, path + [name])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [])
    assert not circles


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    return names


def is_project_file(path: Path) -> bool:
    """Not in a hidden folder (.git, .venv, CI's .ci/venv) nor in an installed package (a venv under any name)."""
    parts = path.relative_to(REPO_ROOT).parts
    return not any(part.startswith(".") or part == "site-packages" for part in parts)


PYTHON_FILES = sorted(path for path in REPO_ROOT.rglob("*.py") if is_project_file(path))


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_names_are_imported_from_the_module_that_defines_them(path):
    """``from trainer.engine import Batch`` works only while engine.py happens to import Batch itself: a name comes
    from the module that defines it (a package's __init__ may gather names; a submodule is imported by its name)."""
    wrong = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES \
                and MODULES[node.module].name != "__init__.py":
            defined = defined_names(MODULES[node.module])
            wrong += [f"line {node.lineno}: {alias.name} from {node.module}" for alias in node.names
                      if alias.name not in defined and f"{node.module}.{alias.name}" not in MODULES]
    assert not wrong
