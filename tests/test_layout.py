"""The layout rules of the README's Layout section, checked on the source: import directions, module and
function sizes (a reader finds each piece on one screen)."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
PACKAGES = ("trainer", "data", "benchmarks")
MAX_MODULE_LINES = 310  # "about 300"
MAX_FUNCTION_LINES = 62  # "about 60"
MAX_PARAMETERS = 9  # "about 8": cached_train_step takes train_step's eight and its chunk size


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("package, forbidden", [("data", ("trainer",)), ("trainer", ("benchmarks", "tests"))])
def test_imports_go_one_way(package, forbidden):
    wrong = [f"{p.relative_to(REPO)} imports {module}" for p in _modules(package) for module, _ in _imports(p)
             if module.split(".")[0] in forbidden]
    assert not wrong


def test_evaluation_uses_training_modules_through_public_names():
    private = [f"{p.relative_to(REPO)}: {module}.{name}" for p in _modules("trainer/evaluation")
               for module, names in _imports(p) for name in names
               if module.startswith("trainer.") and not module.startswith("trainer.evaluation")
               and name.startswith("_")]
    assert not private


def test_modules_and_functions_fit_on_a_screen():
    too_long, too_big = [], []
    for path in _modules(*PACKAGES):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            count = len([p for p in params if p.arg not in ("self", "cls")])
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES or count > MAX_PARAMETERS:
                too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines, {count} params")
    assert not too_long and not too_big


def test_the_check_sees_what_it_checks():
    # a checker that reads nothing passes everything: it must find the modules and their imports
    assert len(_modules(*PACKAGES)) > 50
    assert ("torch", []) in _imports(REPO / "trainer" / "step.py")
    assert any(m == "trainer.evaluation.monitor" for p in _modules("trainer") for m, _ in _imports(p))
