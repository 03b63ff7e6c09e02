"""Credentials in configs and locations: recognise secret-named keys and URI/query credentials, and mask them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

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
