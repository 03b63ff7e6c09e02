"""Config → MLflow params: flatten, mask anything that looks like a secret, respect MLflow's size limits."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

MASK = "***"
# MLflow limits (mlflow.utils.validation): keys 250 chars, param values 6000 chars, 100 params per batch.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_TAG_VALUE_LENGTH = 8000

# Matched against each dotted-key component; "token" must stand alone ("hf_token", not "tokenizer"); a bare
# "key" only after a service or key kind ("wandb_key", "ssh_key"; "sort_key", "cache_key" stay visible).
_KEY_OWNERS = (
    r"api|access|private|secret|session|signing|encryption|license|ssh|gpg|pgp|ssl|tls|wandb|hf|huggingface|"
    r"github|gh|gitlab|openai|anthropic|aws|s3|gcs|gcp|azure|mlflow|dvc|comet|neptune|slack"
)
_SECRET_KEY = re.compile(
    r"(^|[_\-.])(password|passwd|passphrase|pass|pwd|secret|secrets|token|auth|authorization|credential|credentials|"
    rf"(?:{_KEY_OWNERS})[_\-]?key)($|[_\-.])",
    re.IGNORECASE,
)
# [user]:password@ inside URIs (database and tracking-server URLs); the password runs to the last '@'
# before the host, so that one holding '@' is hidden whole.
_URI_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^/\s]+)@")
# a token given as the user name alone (https://hf_xxx@host: a known token prefix, or 20+ token characters;
# `git@` or `alice@` stay) and credentials in a query (?token=..., &X-Amz-Signature=...), by whole name
_TOKEN_PREFIXES = r"(?:hf_|ghp_|gho_|ghs_|github_pat_|glpat-|sk-|xox[abp]-)"
_URI_USER_TOKEN = re.compile(
    rf"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?:{_TOKEN_PREFIXES}[^:/@\s]+|[A-Za-z0-9_\-]{{20,}})@"
)
_URI_KNOWN_TOKEN = re.compile(rf"[a-zA-Z][a-zA-Z0-9+.\-]*://{_TOKEN_PREFIXES}[^:/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:token|access_token|auth_token|id_token|refresh_token|api_key|apikey|key|secret|"
    r"client_secret|password|passwd|pwd|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential)=)[^&#\s]+",
    re.IGNORECASE,
)


# a camelCase word boundary (hfToken, dbPassword, clientSecret, myAPIKey): split there as at `_`
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def is_secret_key(key: str) -> bool:
    """True when any component of a dotted key names a credential (password, token, api_key, ...), in
    snake_case, kebab-case or camelCase (`hf_token`, `hf-token`, `hfToken`)."""
    return any(_SECRET_KEY.search(_CAMEL_BOUNDARY.sub("_", part)) for part in key.split("."))


def holds_credentials(value: str) -> bool:
    """A URI password, a token of a known kind as the user name, or a secret query value (a long user name
    alone may be a token: `mask_value` hides it in logs, but it is not taken for a credential here)."""
    return any(p.search(value) for p in (_URI_PASSWORD, _URI_KNOWN_TOKEN, _QUERY_SECRET))


def mask_value(value: str) -> str:
    """Hide the credentials of URIs inside a string: the password of `scheme://user:password@host`, a token
    given as the user name (`scheme://token@host`) and secret-named query values (`?token=...`)."""
    value = _URI_PASSWORD.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
    value = _URI_USER_TOKEN.sub(lambda m: f"{m.group('scheme')}{MASK}@", value)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", value)


def mask_secrets(obj: Any, key: str = "") -> Any:
    """Return a copy of a plain config tree with secret-looking keys and URI passwords masked."""
    if key and is_secret_key(key) and obj is not None and not isinstance(obj, (Mapping, list, tuple)):
        return MASK
    if isinstance(obj, Mapping):
        return {k: mask_secrets(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_secrets(v, key) for v in obj]
    if isinstance(obj, str):
        return mask_value(obj)
    return obj


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
