"""lm-eval dataset loader for open360_python_cloze: reads the jsonl beside this file as the test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA_FILE = Path(__file__).resolve().with_name("python_cloze.jsonl")


def load_docs(**_: Any) -> datasets.DatasetDict:
    """The task's documents as a DatasetDict with one `test` split (lm-eval's custom_dataset hook)."""
    if not DATA_FILE.is_file():
        raise FileNotFoundError(f"{DATA_FILE}: task data missing; regenerate it with make_items.py beside it")
    # built in memory, not through load_dataset("json"), which pings the hub's download counter
    rows = [item(line, n) for n, line in enumerate(DATA_FILE.read_text(encoding="utf-8").splitlines(), 1)
            if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def item(line: str, n: int) -> dict[str, Any]:
    """Line `n` of the data file as a checked item: lm-eval scores a label outside the choices as wrong, with a
    warning only, so a damaged item would lower the accuracy silently."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{DATA_FILE}:{n}: not a JSON object ({err}); regenerate it with make_items.py") from err
    choices, label = (row.get("choices"), row.get("label")) if isinstance(row, dict) else (None, None)
    if not (isinstance(row, dict) and isinstance(row.get("context"), str) and isinstance(choices, list)
            and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
            and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
        raise ValueError(f"{DATA_FILE}:{n}: expected {{\"context\": str, \"choices\": [>= 2 str], \"label\": index "
                         f"into choices}}, got {line.strip()[:200]}; regenerate it with make_items.py")
    return row
