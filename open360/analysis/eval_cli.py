"""Hydra-style `key=value` command lines for analysis jobs, validated against a dataclass schema."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class UsageError(ValueError):
    """A command line names an unknown key, a value of the wrong type, or misses a required key."""


def analysis_dir(workspace: str | Path, out_dir: str | None, name: str) -> Path:
    """Where an analysis writes its report: `out_dir=`, else <workspace>/analysis/<name> (`~` expanded)."""
    return Path(out_dir) if out_dir else Path(workspace).expanduser().resolve() / "analysis" / name


def parse_overrides(schema: type[T], argv: Sequence[str], prog: str) -> T:
    """Merge `key=value` overrides (lists as `[a,b]`) into `schema`'s defaults and return the dataclass.

    Raises UsageError naming the offending key and listing the valid ones.
    """
    base = OmegaConf.structured(schema)
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise UsageError(f"{prog}: expected key=value arguments, got {bad}; valid keys: {sorted(base.keys())}")
    overrides = []
    for arg in argv:  # one at a time, so that a value YAML cannot read (`checkpoints=[1,2`) is named
        try:
            overrides.append(OmegaConf.from_dotlist([arg.lstrip("+")]))
        except yaml.YAMLError as err:
            raise UsageError(f"{prog}: {arg}: the value does not parse ({' '.join(str(err).split())}); "
                             "lists are written [a,b]") from err
    try:
        merged = OmegaConf.merge(base, *overrides)
        missing = sorted(k for k in merged if OmegaConf.is_missing(merged, k))
        if missing:
            raise UsageError(f"{prog}: required key(s) {missing} not given (e.g. {missing[0]}=<value>)")
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise UsageError(f"{prog}: {err}; valid keys: {sorted(base.keys())}") from err


def usage(schema: type[Any], prog: str, doc: str) -> str:
    """A help text listing every key of `schema` with its default."""
    base = OmegaConf.structured(schema)
    lines = [f"usage: python -m {prog} key=value ...", "", doc.strip(), "", "keys (default):"]
    for key in base:
        value = "<required>" if OmegaConf.is_missing(base, key) else OmegaConf.to_container(base)[key]
        lines.append(f"  {key:<20} {value}")
    return "\n".join(lines)


def run_cli(schema: type[T], argv: Sequence[str] | None, prog: str, doc: str) -> T | None:
    """Parse argv (sys.argv[1:] by default); print usage and return None on --help or a usage error."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(usage(schema, prog, doc))
        return None
    try:
        return parse_overrides(schema, args, prog)
    except UsageError as err:
        print(f"{err}\n\n{usage(schema, prog, doc)}", file=sys.stderr)
        raise SystemExit(2) from err


def user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (a missing run or file, an unknown step or source, a damaged checkpoint or
    shard, a DVC failure, a full disk): reported in one line, exit status 2, instead of a traceback."""
    from open360.checkpoint.io import CheckpointError
    from open360.tracking.dvc_versioning import VersioningError

    return (OSError, LookupError, ValueError, CheckpointError, VersioningError)


def report_errors(prog: str, job: Callable[[], int]) -> int:
    """Run `job`; a user error (see `user_errors`) prints `prog: message` on stderr and returns 2, Ctrl-C one
    line and 130 (what a job had finished is on disk: each writes its results as it goes)."""
    try:
        return job()
    except user_errors() as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the results written so far are kept — run it again to go on", file=sys.stderr)
        return 130
