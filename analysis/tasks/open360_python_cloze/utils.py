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
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
