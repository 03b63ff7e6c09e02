"""Settings of a memorization job: the keys, their parsing from key=value / YAML, and their checks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from open360.analysis.memorization.engine import DTYPES, MODES

SELECTIONS = ("sample", "seen")
DTYPE_CHOICES = ("auto", *DTYPES)


class MemorizationJobError(RuntimeError):
    """The job cannot run as configured; the message says which key or file and what to do."""


@dataclass
class MemorizationJobConfig:
    """Settings of one memorization job (key=value on the command line, or a YAML via config=)."""

    run: str = MISSING  # checkpoints/<run>/ under the workspace
    workspace: str = "."
    checkpoints: Any = "all"  # all | latest | list of steps | "s1,s2"
    chunks: Any = "all"  # all | list of chunk indices | "a-b" | "a,b"
    k: int = 32  # prompt tokens
    l: int = 32  # noqa: E741 - continuation tokens (LLM360's k and l)
    sample: int = 1000  # sequences per chunk (seeded); 0 = every sequence of the selection
    seed: int = (
        42  # numpy default_rng(seed).permutation(chunk_size)[:sample] (Analysis360's datasets shuffle)
    )
    selection: str = (
        "sample"  # sample: rows of the whole chunk | seen: only rows seen by the checkpoint (Pythia)
    )
    mode: str = "greedy"  # greedy (exact) | teacher_forced (screen: exact full_match, estimated token_match)
    batch_size: int = 0  # 0 = auto: as many as fit in GPU memory (<= 4096), 64 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:<index>
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    cuda_graphs: bool = True
    compile: bool = False
    shards: str | None = None  # shard folder; default: the one the checkpoint's lineage names
    pull: bool = True  # fetch checkpoints missing locally through DVC
    release_local: bool = False  # delete checkpoints this job pulled once their cells are scored
    save_tokens: bool = False  # also store each greedy continuation (l int32 per row)
    out_dir: str | None = None  # default <workspace>/analysis/<run>/memorization/<tag>
    report: bool = True  # render PNGs + report.md when the matrix is complete
    mlflow: bool = True  # log the report to the run's MLflow run when lineage names one
    progress: bool = True
    max_cells: int = 0  # stop after scoring this many cells (0 = all); for smoke tests and time slices


def parse_args(argv: Sequence[str]) -> MemorizationJobConfig:
    """key=value overrides (Hydra style) on top of an optional `config=<yaml>` and the defaults."""
    schema = OmegaConf.structured(MemorizationJobConfig)
    overrides = []
    for arg in argv:
        if "=" not in arg:
            raise MemorizationJobError(f"argument {arg!r} is not key=value; try --help for the keys")
        key, value = arg.split("=", 1)
        if key.lstrip("+") in ("checkpoints", "chunks") and not value.strip():
            raise MemorizationJobError(f"{arg!r} selects nothing; use all, latest (checkpoints), 3, 0-7 or 1,5,9")
        if key.lstrip("+") == "config":
            path = Path(value).expanduser()
            if not path.is_file():
                from open360.paths import resolve_repo_path

                path = resolve_repo_path(value)
            if not path.is_file():
                raise MemorizationJobError(f"config={value}: no such file (relative paths: cwd or repo root)")
            try:
                schema = OmegaConf.merge(schema, OmegaConf.load(path))
            except (OmegaConfBaseException, yaml.YAMLError) as err:
                raise MemorizationJobError(f"{path}: " + " ".join(str(err).split())) from err
        else:
            overrides.append(f"{key.lstrip('+')}={value}")
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.from_dotlist(overrides))
        job = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise MemorizationJobError("bad memorization argument: " + " ".join(str(err).split())) from err
    assert isinstance(job, MemorizationJobConfig)
    validate(job)
    return job


def validate(job: MemorizationJobConfig) -> None:
    """Raise MemorizationJobError naming the key when a value is out of range."""
    from open360.paths import check_run_name

    try:
        check_run_name(job.run, new=False)
    except ValueError as err:
        raise MemorizationJobError(str(err)) from None
    if job.mode not in MODES:
        raise MemorizationJobError(f"mode={job.mode!r}: expected one of {MODES}")
    if job.selection not in SELECTIONS:
        raise MemorizationJobError(f"selection={job.selection!r}: expected one of {SELECTIONS}")
    if job.k < 1 or job.l < 1:
        raise MemorizationJobError(f"k={job.k}, l={job.l}: both must be >= 1")
    if job.sample < 0:
        raise MemorizationJobError(f"sample={job.sample}: must be >= 0 (0 = all sequences)")
    if job.batch_size < 0:
        raise MemorizationJobError(f"batch_size={job.batch_size}: must be >= 0 (0 = auto)")
    if job.max_cells < 0:
        raise MemorizationJobError(f"max_cells={job.max_cells}: must be >= 0 (0 = all cells)")
    if not 0 <= job.seed < 2**63:
        raise MemorizationJobError(f"seed={job.seed}: must be >= 0 and < 2**63")
    if job.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", job.device):
        raise MemorizationJobError(f"device={job.device!r}: expected auto, cpu, cuda or cuda:<index>")
    if job.dtype not in DTYPE_CHOICES:
        raise MemorizationJobError(f"dtype={job.dtype!r}: expected one of {DTYPE_CHOICES}")
    int_list(job.chunks, "chunks")  # its syntax now, not after pulling a checkpoint and the shards (the range: then)


def job_tag(job: MemorizationJobConfig) -> str:
    """Folder name that identifies what a cell file holds: mode, k, l, selection, sample size, seed (and
    the shard folder when `shards=` names one)."""
    size = f"{job.sample}" if job.sample else "all"
    tag = f"{job.mode}-k{job.k}-l{job.l}-{job.selection}{size}-seed{job.seed}"
    return f"{tag}-{Path(job.shards).name}" if job.shards else tag  # one stage's shards of several


# A range of chunks (or of checkpoints named one by one) longer than this is a typo, not a selection.
MAX_RANGE = 1_000_000


def is_all(value: Any) -> bool:
    """Whether a checkpoints= / chunks= value selects everything."""
    return value is None or (isinstance(value, str) and value.strip().lower() == "all")


def range_bounds(text: str, key: str, value: Any) -> tuple[int, int]:
    """(lo, hi) of the item "a-b" (inclusive) or "a" (a, a) of `key` (as given in `value`), checked."""
    try:
        lo, hi = (int(x) for x in text.split("-", 1)) if "-" in text.lstrip("-") else (int(text), int(text))
    except ValueError as err:
        raise MemorizationJobError(
            f"{key}={value!r}: {text!r} is not an integer or a range a-b; use all, 3, 0-7 or 1,5,9"
        ) from err
    if hi < lo:
        raise MemorizationJobError(f"{key}={value!r}: the range {text} runs backwards; write {hi}-{lo}")
    return lo, hi


def int_list(value: Any, key: str) -> list[int] | None:
    """None for "all"; otherwise a list of ints from an int, a list, "a,b,c" or "a-b" (inclusive)."""
    if is_all(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool):  # chunks=true is a typo, not chunk 1
        return [value]
    items: list[Any] = list(value) if isinstance(value, list | tuple) else str(value).split(",")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if text:
            lo, hi = range_bounds(text, key, value)
            if hi - lo >= MAX_RANGE:
                raise MemorizationJobError(f"{key}={value!r}: the range {text} holds more than {MAX_RANGE} values")
            out.extend(range(lo, hi + 1))
    if not out:
        raise MemorizationJobError(f"{key}={value!r} selects nothing; use all, 3, 0-7 or 1,5,9")
    return sorted(set(out))


