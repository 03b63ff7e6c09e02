"""The one-way data flow of docs/ARCHITECTURE.md, checked on the imports: no stage imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "open360"

# what each stage may import of open360 (itself always); `train` (the composition root), `backends`
# and `analysis` sit at the end of the flow and may import any earlier stage
ALLOWED = {
    "paths": set(),
    "credentials": set(),
    "config": {"paths"},
    "data": {"paths", "credentials", "config"},
    "models": {"config", "data.tokenizer"},  # the HF export records the tokenizer's hash
    "checkpoint": {"paths", "models"},
    "tracking": {"paths", "credentials", "config", "data", "models", "checkpoint", "train.callbacks"},
}


def _imports(path: Path) -> list[tuple[str, ...]]:
    """Each open360 import of a file as the names it may stand for, without `open360.`: `from open360.data
    import tokenizer` is the package `data` or its module `data.tokenizer`; a relative import is taken from
    the file's package, and `importlib.import_module("open360...")` counts as an import."""
    package = ("open360", *path.relative_to(PACKAGE).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) + 1 - node.level]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(module, f"{module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name,) for a in node.names]
        elif isinstance(node, ast.Call) and _literal_import(node):
            found.append((node.args[0].value,))
    return [tuple(n.removeprefix("open360.") for n in names) for names in found if names[-1].startswith("open360.")]


def _literal_import(call: ast.Call) -> bool:
    """`importlib.import_module("...")`, `import_module("...")` or `__import__("...")` of a constant name."""
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
    literal = bool(call.args) and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
    return name in ("import_module", "__import__") and literal


def _allowed(stage: str, name: str) -> bool:
    return any(name == a or name.startswith(f"{a}.") for a in ALLOWED[stage] | {stage})


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_no_stage_imports_a_later_one(stage):
    module = PACKAGE / f"{stage}.py"
    files = [module] if module.exists() else sorted((PACKAGE / stage).rglob("*.py"))
    assert files
    upward = [
        f"{f.relative_to(PACKAGE)}: open360.{names[-1]}"
        for f in files
        for names in _imports(f)
        if not any(_allowed(stage, n) for n in names)
    ]
    assert not upward, upward


@pytest.mark.parametrize(
    "statement",
    [
        "from open360.train.trainer import Trainer",
        "import open360.train.trainer as t",
        "from ..train.trainer import Trainer",
        "from .. import train",
        "importlib.import_module('open360.train.trainer')",
    ],
)
def test_the_check_sees_an_upward_import(tmp_path, monkeypatch, statement):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "leak.py").write_text(f"def f():\n    {statement}\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    with pytest.raises(AssertionError, match=r"open360\.train"):
        test_no_stage_imports_a_later_one("data")


def test_a_relative_import_of_an_allowed_stage_passes(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.py").write_text("from . import tokenizer\nfrom ..config import schema\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    test_no_stage_imports_a_later_one("data")
