"""Run-level job: the checkpoints x chunks memorization matrix of a run, resumable, one parquet per cell.

    python -m open360.analysis.memorization run=<run> [checkpoints=all|latest|<s1>,<s2>|<a>-<b>] [chunks=all|0-7|0,3]
        [workspace=.] [k=32] [l=32] [sample=1000] [selection=sample|seen] [mode=greedy|teacher_forced]
        [release_local=true] [config=analysis/memorization/<job>.yaml]
    torchrun --nproc-per-node 8 -m open360.analysis.memorization run=<run>   # cells split over ranks

Each (checkpoint, chunk) cell is written atomically to
``<workspace>/analysis/<run>/memorization/<tag>/cells/step_<N>-chunk_<C:05d>.parquet`` (one row per scored
sequence); a cell that reads whole and was scored with this job's settings, shards, dtype and the
checkpoint's current weights is reused, so an interrupted job continues where it stopped (a damaged
cell, or one of replaced weights, is scored again; one of other settings stops the job).
``<tag>`` names the mode and the parameters (``greedy-k32-l32-sample1000-seed42``), so a
teacher-forced screen never mixes with exact greedy scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING

from open360.analysis.memorization.cells import (
    SEEN_BASIS,
    SEEN_SAMPLING,
    cell_is_done,
    cell_path,
    cell_table,
    write_cell,
)
from open360.analysis.memorization.checkpoints import (
    ensure_checkpoint,
    release_checkpoint,
    resolve_steps,
    run_checkpoint_dir,
)
from open360.analysis.memorization.data_view import DataView
from open360.analysis.memorization.job_config import (
    MemorizationJobConfig,
    MemorizationJobError,
    int_list,
    job_tag,
    parse_args,
    validate,
)
from open360.checkpoint.lineage import data_history

__all__ = ["HELP", "JobResult", "MemorizationJobConfig", "MemorizationJobError", "main", "parse_args", "run_job"]

HELP = (
    __doc__
    + "\nKeys (defaults):\n"
    + "\n".join(
        f"  {f.name}={f.default if f.default is not MISSING else '<required>'}"
        for f in dataclasses.fields(MemorizationJobConfig)
    )
)




def _assign(pending: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's cells: whole checkpoints round-robin when there are enough, else cells round-robin."""
    if world == 1:
        return pending
    steps = sorted({s for s, _ in pending})
    if len(steps) >= world:
        mine = set(steps[rank::world])
        return [c for c in pending if c[0] in mine]
    return pending[rank::world]


def _prefetch_share(pending: list[tuple[int, int]], rank: int, world: int, max_cells: int) -> list[int]:
    """The chunks whose samples this rank reads before scoring: a 1/world share of the chunks some rank scores
    (with max_cells, a smoke test or time slice, no other chunk), so each is read once for all ranks."""
    scored = {c for r in range(world) for _, c in _assign(pending, r, world)[: max_cells or None]}
    return sorted(scored)[rank::world]


def _device(job: MemorizationJobConfig, local_rank: int, world: int = 1) -> str:
    import torch

    if job.device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if job.device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise MemorizationJobError(f"device={job.device} but no CUDA device is visible; use device=cpu or auto")
    if job.device != "cuda" and world > 1:
        raise MemorizationJobError(
            f"device={job.device} under torchrun would put every rank on one GPU; use device=cuda (rank r takes "
            "cuda:<LOCAL_RANK>)"
        )
    index = local_rank if job.device == "cuda" else int(job.device.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise MemorizationJobError(
            f"device={job.device}: cuda:{index} is not visible ({torch.cuda.device_count()} CUDA devices)"
        )
    return f"cuda:{index}"


@dataclass
class JobResult:
    """What a job did: where its files are and which cells it computed or found done."""

    out_dir: Path
    steps: list[int]
    chunks: list[int]
    computed: list[tuple[int, int]]
    skipped: list[tuple[int, int]]
    complete: bool
    report: Path | None = None


def _dist_info() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def run_job(job: MemorizationJobConfig) -> JobResult:
    """Compute every missing cell of the checkpoints x chunks matrix (this rank's share under torchrun)."""
    import torch

    validate(job)
    rank, world, local_rank = _dist_info()
    device = _device(job, local_rank, world)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # graphs and streams use the current device
    own_group = world > 1 and not torch.distributed.is_initialized()
    if own_group:  # its collectives are host-side (barriers, gathering cell lists): gloo, waiting as long as
        # the slowest rank's pulls and cells take (an uneven share can finish hours later than the others)
        from open360.backends.native import HOST_WAIT_TIMEOUT

        torch.distributed.init_process_group("gloo", timeout=HOST_WAIT_TIMEOUT)
    try:
        return _run_cells(job, rank, world, device)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _scorer_for(
    job: MemorizationJobConfig, path: Path, device: str, current: tuple[Any, dict[str, Any]] | None
) -> tuple[Any, dict[str, Any]]:
    """A scorer holding checkpoint `path`'s weights, with its model config. The current scorer when the
    architecture is unchanged (the usual case within a run), its weights swapped in place: no model
    build, compile or CUDA graph capture per checkpoint. Else a new scorer (the old one is released).
    The weights and config are checked against the sha256 lineage.json records before they are read:
    a damaged file must not score silently."""
    from omegaconf import OmegaConf

    from open360.analysis.memorization.engine import MemorizationScorer
    from open360.checkpoint.io import (
        CONFIG_FILE,
        MODEL_FILE,
        load_model_weights,
        read_config,
        verify_checkpoint,
    )
    from open360.models import model_with_weights

    verify_checkpoint(path, only=(MODEL_FILE, CONFIG_FILE))
    model_cfg = OmegaConf.to_container(read_config(path).model, resolve=True)
    weights = load_model_weights(path / MODEL_FILE)
    if current is not None and current[1] == model_cfg:
        current[0].load_weights(weights)
        return current
    if current is not None:
        current[0].release()
    scorer = MemorizationScorer(
        model_with_weights(model_cfg, weights),
        k=job.k,
        l=job.l,
        batch_size=job.batch_size,
        mode=job.mode,
        device=device,
        dtype=job.dtype,
        cuda_graphs=job.cuda_graphs,
        compile=job.compile,
    )
    return scorer, model_cfg


def _chunk_sequences(
    data: DataView, consumption: tuple[tuple[int, int], ...], chunks: list[int]
) -> Iterator[tuple[tuple[int, np.ndarray], np.ndarray]]:
    """((chunk, selected rows), their sequences) per chunk, read only when the scorer asks for them
    (about one batch is held at a time)."""
    for chunk in chunks:
        rows = data.rows(consumption, chunk)
        yield (chunk, rows), data.sequences(chunk, rows)


def _run_cells(job: MemorizationJobConfig, rank: int, world: int, device: str) -> JobResult:
    workspace = Path(job.workspace).expanduser().resolve()
    out_dir = (
        Path(job.out_dir) if job.out_dir else workspace / "analysis" / job.run / "memorization" / job_tag(job)
    )
    from open360.tracking.checkpoints import known_checkpoints

    known_steps = [step for step, _ in known_checkpoints(workspace, job.run, "memorization")]  # DVC-recorded too
    steps = resolve_steps(job, workspace, known_steps)
    if not job.pull:
        from open360.checkpoint.io import MODEL_FILE, step_dir_name

        run_dir = run_checkpoint_dir(workspace, job.run)
        missing = [s for s in steps if not (run_dir / step_dir_name(s) / MODEL_FILE).is_file()]
        if missing:
            raise MemorizationJobError(
                f"run {job.run!r}: checkpoints {missing} are not under {run_dir} and pull=false; "
                "set pull=true to fetch them through DVC, or choose other checkpoints="
            )

    pulled_here: dict[int, tuple[Path, list[Path]]] = {}  # step -> (its scoring copy, the cache files fetched)
    try:
        return _score_matrix(job, rank, world, device, workspace, out_dir, steps, known_steps, pulled_here)
    except BaseException:  # an error, Ctrl-C: a rerun would take what this job pulled for local, and keep it
        if job.release_local:
            _release_pulled(workspace, pulled_here)
        raise


def _release_pulled(workspace: Path, pulled: dict[int, tuple[Path, list[Path]]]) -> None:
    """Delete the checkpoints `pulled` (step -> (its scoring copy, the cache files fetched for it))."""
    for step in sorted(pulled):
        release_checkpoint(workspace, *pulled[step])


def _note_pulled(pulled: dict[int, tuple[Path, list[Path]]], step: int, path: Path, fetched: list[Path] | None) -> None:
    """Record what `ensure_checkpoint` fetched for `step` (its metadata, later its weights: one copy)."""
    if fetched is not None:
        pulled[step] = (path, sorted({*pulled.get(step, (path, []))[1], *fetched}))


def _score_matrix(
    job: MemorizationJobConfig,
    rank: int,
    world: int,
    device: str,
    workspace: Path,
    out_dir: Path,
    steps: list[int],
    known_steps: list[int],
    pulled_here: dict[int, tuple[Path, list[Path]]],
) -> JobResult:
    """Score this rank's pending cells of `steps` x the job's chunks; the checkpoints it pulls go into
    `pulled_here` as they are pulled."""
    import torch
    from tqdm.auto import tqdm

    from open360.checkpoint import read_lineage
    from open360.checkpoint.io import MODEL_FILE
    from open360.tracking.checkpoints import trainer_state

    # The data view comes from the first checkpoint's config and lineage (all of a run share them).
    first_path, first_fetched = ensure_checkpoint(job, workspace, steps[0], weights=False)
    _note_pulled(pulled_here, steps[0], first_path, first_fetched)
    from open360.checkpoint.io import read_config

    lineage = read_lineage(first_path)
    data = DataView(job, workspace, read_config(first_path), lineage, samples_root=out_dir)
    from open360.analysis.memorization.report import mlflow_target

    mlflow_run = mlflow_target(workspace, job.run) if job.mlflow else None  # before release_local
    seq_len = int(data.shards.seq_len)
    if job.k + job.l > seq_len + 1:
        raise MemorizationJobError(
            f"k + l = {job.k + job.l} exceeds the sequence length {seq_len} of {data.shard_dir} "
            "(+1 target token); lower k or l"
        )
    trained_with = {entry.get("tokenizer_hash") for entry in data_history(lineage)} - {None}
    if trained_with and data.shards.tokenizer_hash not in trained_with:
        raise MemorizationJobError(
            f"{data.shard_dir}: tokenized with {data.shards.tokenizer_hash[:12]}, but run {job.run!r} was "
            f"trained with {sorted(h[:12] for h in trained_with)}; pass shards= of this run"
        )
    chunks = int_list(job.chunks, "chunks")
    chunks = list(range(data.num_chunks)) if chunks is None else chunks
    bad = [c for c in chunks if not 0 <= c < data.num_chunks]
    if bad:
        raise MemorizationJobError(
            f"chunks={job.chunks!r}: {bad[:8]}{' ...' if len(bad) > 8 else ''} out of range; the shards have "
            f"{data.num_chunks} (0-{data.num_chunks - 1})"
        )
    cells = [(s, c) for s in steps for c in chunks]
    # What the numbers depend on besides the job's keys: the shards read and the dtype scored in.
    from open360.analysis.memorization.engine import resolve_dtype

    scored_on = {
        "manifest_hash": data.shards.manifest_hash,
        "dtype": str(resolve_dtype(job.dtype, torch.device(device))).removeprefix("torch."),
    }
    if job.selection == "seen" and job.sample > 0:  # cells of the earlier per-checkpoint draw are scored again
        scored_on["seen_sampling"] = SEEN_SAMPLING
    done = [cell for cell in cells if cell_is_done(job, cell_path(out_dir, *cell), workspace, scored_on)]
    done_set = set(done)
    pending = [cell for cell in cells if cell not in done_set]
    if world > 1:  # the split below needs the same `pending` on every rank: no cell is written before this
        if job.selection == "sample":  # every rank scores every chunk of its checkpoints: each reads a share
            data.prefetch_samples(_prefetch_share(pending, rank, world, job.max_cells))
        torch.distributed.barrier()
    mine = _assign(pending, rank, world)
    shared_steps = {s for s, _ in pending} - _whole_steps(pending, set(mine))
    if job.max_cells:
        mine = mine[: job.max_cells]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "job.json").write_text(json.dumps(dataclasses.asdict(job), indent=2, default=str) + "\n")

    computed: list[tuple[int, int]] = []
    by_step: dict[int, list[int]] = {}
    for s, c in mine:
        by_step.setdefault(s, []).append(c)
    bar = tqdm(
        total=len(mine),
        desc=f"memorization[{rank}]" if world > 1 else "memorization",
        unit="cell",
        disable=not job.progress,
        position=rank if world > 1 else None,
    )
    scoring: tuple[Any, dict[str, Any]] | None = None  # the scorer and its model config, kept across steps
    try:
        for step, step_chunks in by_step.items():
            path, fetched = ensure_checkpoint(job, workspace, step)
            _note_pulled(pulled_here, step, path, fetched)
            scoring = _scorer_for(job, path, device, scoring)
            scorer = scoring[0]
            lineage = read_lineage(path)
            state = trainer_state(path)
            consumption = data.consumption(lineage)
            # The chunks of one checkpoint share batches (score_groups): only its last batch is padded.
            for (chunk, rows), result in scorer.score_groups(_chunk_sequences(data, consumption, step_chunks)):
                bar.set_postfix_str(f"step {step} chunk {chunk}")
                meta = {
                    "run": job.run,
                    "step": step,
                    "chunk": chunk,
                    "tag": job_tag(job),
                    "mode": job.mode,
                    "k": job.k,
                    "l": job.l,
                    "sample": job.sample,
                    "seed": job.seed,
                    "selection": job.selection,
                    "seconds": result.seconds,
                    "engine": result.info,
                    "tokens_seen": state.get("tokens_seen"),
                    **scored_on,  # the shards actually read (shards= may name another folder), the dtype
                    "model_sha256": (lineage.get("files") or {}).get(MODEL_FILE),
                    "seen_basis": SEEN_BASIS,
                    "chunk_size": int(data.chunk_sizes[chunk]),
                    "num_chunks": data.num_chunks,
                    "rank": rank,
                    "world_size": world,
                }
                seen = data.seen_mask(consumption, chunk, rows)
                write_cell(
                    cell_path(out_dir, step, chunk),
                    cell_table(job, step, chunk, rows, int(data.offsets[chunk]), seen, result, meta),
                )
                computed.append((step, chunk))
                bar.update(1)
            if job.release_local and step in pulled_here and step not in shared_steps:
                release_checkpoint(workspace, *pulled_here.pop(step))
    finally:
        bar.close()
        if scoring is not None:
            scoring[0].release()
        scoring = None
    if world > 1:
        torch.distributed.barrier()
    if job.release_local:  # the rest this rank pulled (split across ranks, or pulled for metadata only)
        _release_pulled(workspace, pulled_here)
    # Cells left damaged or stale (max_cells, another rank's failure) are neither complete nor merged.
    valid = set(done) | set(computed)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, sorted(valid))
        valid = {tuple(c) for part in gathered for c in part}
    valid_cells = [cell for cell in cells if cell in valid]
    complete = len(valid_cells) == len(cells)
    report = None
    if rank == 0:
        from open360.analysis.memorization.report import merge_cells, render_report

        if complete and job.report:  # the report merges the job's cells first
            whole = set(steps) == set(known_steps) and len(chunks) == data.num_chunks
            report = render_report(out_dir, run=job.run, workspace=workspace, log_mlflow=job.mlflow, cells=cells,
                                   mlflow_run=mlflow_run, part=None if whole else (steps, chunks))
        else:
            merge_cells(out_dir, valid_cells)  # this job's matrix only: other cells in out_dir may be stale
    return JobResult(out_dir, steps, chunks, computed, done, complete, report)


def _whole_steps(pending: list[tuple[int, int]], mine: set[tuple[int, int]]) -> set[int]:
    """Steps all of whose pending cells are this rank's: only those may be released by it."""
    split = {s for s, c in pending if (s, c) not in mine}
    return {s for s, _ in mine} - split


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m open360.analysis.memorization` and `open360 analysis memorization`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    from open360.checkpoint.io import CheckpointError
    from open360.data import ShardError
    from open360.tracking.dvc_versioning import VersioningError

    try:
        job = parse_args(args)
        started = time.perf_counter()
        result = run_job(job)
    except (MemorizationJobError, ShardError, VersioningError, CheckpointError, OSError) as err:
        print(f"open360 analysis memorization: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("open360 analysis memorization: interrupted; the cells written so far are kept - run the same "
              "command again to continue", file=sys.stderr)
        return 130
    rank = _dist_info()[0]
    if rank == 0:
        state = "complete" if result.complete else "incomplete (run again to continue)"
        print(
            f"memorization: {len(result.computed)} cells computed, {len(result.skipped)} already done, "
            f"matrix {len(result.steps)} checkpoints x {len(result.chunks)} chunks {state} "
            f"in {time.perf_counter() - started:.1f}s -> {result.out_dir}"
        )
        if result.report:
            print(f"report: {result.report}")
    return 0
