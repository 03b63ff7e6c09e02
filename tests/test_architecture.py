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
    import tokenizer` is the package `data` or its module `data.tokenizer`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name,) for a in node.names]
    return [tuple(n.removeprefix("open360.") for n in names) for names in found if names[-1].startswith("open360.")]


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


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "leak.py").write_text("def f():\n    from open360.train.trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    with pytest.raises(AssertionError, match="open360.train.trainer"):
        test_no_stage_imports_a_later_one("data")
