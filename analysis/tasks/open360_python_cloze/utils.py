"""lm-eval dataset loader for open360_python_cloze: reads the jsonl beside this file as the test split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

DATA_FILE = Path(__file__).resolve().with_name("python_cloze.jsonl")


def load_docs(**_: Any) -> datasets.DatasetDict:
    """The task's documents as a DatasetDict with one `test` split (lm-eval's custom_dataset hook)."""
    if not DATA_FILE.is_file():
        raise FileNotFoundError(f"{DATA_FILE}: task data missing; regenerate it with make_items.py beside it")
    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})
