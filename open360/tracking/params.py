"""Config → MLflow params: flatten, mask anything that looks like a secret, respect MLflow's size limits."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from open360.credentials import mask_secrets

# MLflow limits (mlflow.utils.validation): keys 250 chars, param values 6000 chars, 100 params per batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_TAG_VALUE_LENGTH = 8000


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted.key, leaf) pairs; lists of scalars stay one value, lists of mappings get indices."""
    if isinstance(obj, Mapping):
        if not obj and prefix:
            yield prefix, {}
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, obj


def _fit(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[truncated {len(text) - limit} chars, see config.yaml artifact]"
    return text[: limit - len(marker)] + marker


def config_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flattened, secret-masked params of a resolved config, each key and value within MLflow's limits."""
    params: dict[str, str] = {}
    for key, value in flatten(mask_secrets(config)):
        if key.startswith("hydra."):
            continue
        text = "None" if value is None else str(value)
        params[_fit(key, MAX_KEY_LENGTH)] = _fit(text, MAX_PARAM_VALUE_LENGTH)
    return params


def fit_tag(value: str) -> str:
    """Cut a tag value to MLflow's tag length limit."""
    return _fit(value, MAX_TAG_VALUE_LENGTH)
