"""phi-1-style quality classifier hook: a small model trained on a labelled sample scores documents."""

from __future__ import annotations

import importlib
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from open360.data.recipe import ClassifierSpec, SourceSpec
from open360.data.sources import SourceError, check_pinned_hash, iter_jsonl, resolve_files

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

Scorer = Callable[[list[str]], Sequence[float]]


class HashedFeatures:
    """L2-normalized log counts of hashed word unigrams and bigrams (crc32: the same on every machine), one row
    per text, stored sparse: each row's distinct feature ids and values. Memory grows with the texts, not with
    texts x num_features (dense, phi-scale labels x 2^18 features would be ~200 GB), and every sum runs in
    a fixed order (numpy's bincount), so scores are the same bits on every machine, unlike a BLAS product."""

    def __init__(self, texts: Sequence[str], num_features: int) -> None:
        ids, values, counts = [], [], []
        for text in texts:
            toks = _WORD.findall(text.lower())
            grams = toks + [a + " " + b for a, b in zip(toks, toks[1:], strict=False)]
            hashed = np.fromiter(
                (zlib.crc32(g.encode("utf-8")) % num_features for g in grams), dtype=np.int64, count=len(grams)
            )
            unique, times = np.unique(hashed, return_counts=True)
            logs = np.log1p(times.astype(np.float64))
            norm = float(np.sqrt(np.dot(logs, logs)))
            ids.append(unique)
            values.append(logs / norm if norm else logs)
            counts.append(len(unique))
        self.num_rows, self.num_features = len(counts), num_features
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self.values = np.concatenate(values) if values else np.zeros(0)
        self.rows = np.repeat(np.arange(self.num_rows), counts)

    def dot(self, w: np.ndarray) -> np.ndarray:
        """x @ w, one value per text."""
        return np.bincount(self.rows, weights=self.values * w[self.ids], minlength=self.num_rows)

    def tdot(self, g: np.ndarray) -> np.ndarray:
        """x.T @ g, one value per feature."""
        return np.bincount(self.ids, weights=self.values * g[self.rows], minlength=self.num_features)


class LogisticQualityModel:
    """Logistic regression on hashed n-grams, trained by full-batch gradient descent (deterministic)."""

    def __init__(self, num_features: int, iterations: int, lr: float = 2.0, l2: float = 1e-3) -> None:
        self.num_features, self.iterations, self.lr, self.l2 = num_features, iterations, lr, l2
        self.w = np.zeros(num_features)
        self.b = 0.0

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> LogisticQualityModel:
        x = HashedFeatures(texts, self.num_features)
        y = np.asarray(labels, dtype=np.float64)
        for _ in range(self.iterations):
            p = 1.0 / (1.0 + np.exp(-(x.dot(self.w) + self.b)))
            g = p - y
            self.w -= self.lr * (x.tdot(g) / len(y) + self.l2 * self.w)
            self.b -= self.lr * float(g.mean())
        return self

    def score(self, texts: list[str]) -> list[float]:
        x = HashedFeatures(texts, self.num_features)
        return (1.0 / (1.0 + np.exp(-(x.dot(self.w) + self.b)))).tolist()


def labels_source(spec: ClassifierSpec) -> SourceSpec:
    """The classifier's labelled sample as a source (so that it is resolved, pinned and fingerprinted as one)."""
    return SourceSpec(name="classifier_labels", type="jsonl", path=spec.labels, sha256=spec.labels_sha256)


def load_labels(spec: ClassifierSpec) -> tuple[list[str], list[int]]:
    """Read the labelled sample (jsonl(.gz), `text` and `label` in {0, 1}); a bad line is an error."""
    src = labels_source(spec)
    check_pinned_hash(src, resolve_files(src))
    texts, labels = [], []
    bad: Counter = Counter()
    for path in resolve_files(src):
        for lineno, row in iter_jsonl(path, bad):
            if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
                raise SourceError(f"{path}:{lineno}: a label row needs 'text' (string) and 'label' (0 or 1)")
            texts.append(row["text"])
            labels.append(int(row["label"]))
    if bad:
        raise SourceError(f"{spec.labels}: unreadable label lines {dict(bad)}; fix the labelled sample")
    if len(set(labels)) < 2:
        raise SourceError(
            f"{spec.labels}: the labelled sample needs both labels 0 and 1; found {sorted(set(labels))}"
        )
    return texts, labels


def build_scorer(spec: ClassifierSpec) -> Scorer:
    """The recipe's scorer: a user `module:function` if given, else the built-in model fit on the labels."""
    if spec.scorer:
        module, _, func = spec.scorer.partition(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise ValueError(
                f"filters.classifier.scorer '{spec.scorer}' cannot be imported: {e}; "
                "give 'package.module:function'"
            ) from e
    texts, labels = load_labels(spec)
    return LogisticQualityModel(spec.num_features, spec.iterations).fit(texts, labels).score
