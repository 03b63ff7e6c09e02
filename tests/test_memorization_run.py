"""Memorization job end to end on CPU: a tiny run with a planted repeated document, trained for real."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from open360.analysis.memorization import MemorizationScorer, parse_args, run_job
from open360.analysis.memorization.cells import cell_path
from open360.analysis.memorization.job import MemorizationJobError, main
from open360.checkpoint import list_checkpoints

SEQ_LEN = 64
STEPS = 160  # 8 chunks x 20 steps of 16 sequences: one published checkpoint per chunk
RUN = "mem_tiny"


def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


def _write_corpus(root: Path) -> tuple[Path, str]:
    rng = random.Random(7)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(400)
    ]
    planted = _words(random.Random(99), 50, vocab)  # one document, repeated: it must be memorized
    with gzip.open(root / "filler.jsonl.gz", "wt") as f:
        for _ in range(900):
            f.write(json.dumps({"text": _words(rng, rng.randint(40, 90), vocab)}) + "\n")
    with gzip.open(root / "planted.jsonl.gz", "wt") as f:
        for _ in range(400):
            f.write(json.dumps({"text": planted}) + "\n")
    recipe = root / "mem_tiny.yaml"
    recipe.write_text(f"""
name: mem_tiny
sources:
  - {{name: filler, type: jsonl, path: {root / "filler.jsonl.gz"}, weight: 0.7}}
  - {{name: planted, type: jsonl, path: {root / "planted.jsonl.gz"}, weight: 0.3, quality: false}}
filters:
  exact_dedup: {{enabled: false}}
  near_dedup: {{enabled: false}}
tokenizer: {{kind: train, vocab_size: 512}}
seq_len: {SEQ_LEN}
num_chunks: 8
chunk_multiple: 16
mix: {{total_sequences: {STEPS * 16}, allow_repeat: true}}
validation: {{fraction: 0.0, max_sequences: 0}}
""")
    return recipe, planted


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Train the tiny run once (real data pipeline and trainer), shared by the tests of this module."""
    from open360.config import compose
    from open360.train.pipeline import run_training

    root = tmp_path_factory.mktemp("memorization_ws")
    recipe, planted = _write_corpus(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and the CPU is shared
    cfg = compose(
        [
            "+experiment=amber_tiny",
            f"run_name={RUN}",
            f"workspace={root}",
            "tracking=off",
            f"data.recipe={recipe}",
            "model.vocab_size=512",
            "model.d_model=128",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.ffn_dim=256",
            f"model.max_seq_len={SEQ_LEN}",
            f"trainer.seq_len={SEQ_LEN}",
            "trainer.global_batch_size=16",
            "trainer.micro_batch_size=16",
            f"trainer.max_steps={STEPS}",
            "trainer.progress_bar=false",
            "optim.lr=0.01",
            "schedule.warmup_steps=10",
            "data.build_workers=1",
        ]
    )
    try:
        run_training(cfg, device="cpu")
        yield root, planted
    finally:
        torch.set_num_threads(threads)


def _job(root: Path, *extra: str) -> list[str]:
    return [f"run={RUN}", f"workspace={root}", "sample=24", "batch_size=32", "progress=false", *extra]


def test_matrix_completes_resumes_and_renders(trained_run: tuple[Path, str]) -> None:
    root, _ = trained_run
    from open360.checkpoint import list_checkpoints

    steps = [s for s, _ in list_checkpoints(root / "checkpoints" / RUN)]
    assert len(steps) >= 8
    # Interrupted after 5 cells: those files exist, nothing else does.
    first = run_job(parse_args(_job(root, "max_cells=5", "report=false")))
    assert len(first.computed) == 5 and not first.complete and first.report is None
    for cell in first.computed:
        assert cell_path(first.out_dir, *cell).is_file()
    stamps = {c: cell_path(first.out_dir, *c).stat().st_mtime_ns for c in first.computed}
    # Resumed: only the missing cells are computed, the finished ones are left untouched.
    second = run_job(parse_args(_job(root)))
    assert second.complete and len(second.steps) >= 8 and len(second.chunks) == 8
    assert set(second.skipped) == set(first.computed)
    assert len(second.computed) == len(second.steps) * 8 - 5
    assert all(cell_path(first.out_dir, *c).stat().st_mtime_ns == t for c, t in stamps.items())
    # A third run has nothing to do.
    assert run_job(parse_args(_job(root, "report=false"))).computed == []

    import pandas as pd

    summary = pd.read_parquet(second.out_dir / "summary.parquet")
    assert len(summary) == len(second.steps) * 8 and (summary.n == 24).all()
    assert summary.token_match.between(0, 1).all()
    # Per-chunk checkpoints: checkpoint i has seen chunks 0..i and nothing after.
    for i, step in enumerate(sorted(second.steps)[:8]):
        part = summary[summary.step == step].set_index("chunk").seen_fraction
        assert (part.loc[:i] == 1.0).all() and (part.loc[i + 1 :] == 0.0).all()
    assert second.report is not None and second.report.is_file()
    text = second.report.read_text()
    for png in (
        "score_distribution.png",
        "chunk_heatmap.png",
        "chunk_lines.png",
        "checkpoint_correlation.png",
        "memorized_vs_progress.png",
    ):
        assert (second.out_dir / png).stat().st_size > 5000
        assert png in text
    assert "Exact greedy" in text


def test_each_checkpoint_is_scored_with_its_own_weights(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """One scorer serves all checkpoints (weights swapped in place): cells equal a fresh load's scores."""
    import pyarrow.parquet as pq

    from open360.checkpoint import load_model_from_checkpoint
    from open360.data.shards import ShardSet

    root, _ = trained_run
    result = run_job(parse_args(_job(root, "checkpoints=20,160", "chunks=0-1", "sample=8", f"out_dir={tmp_path}")))
    assert result.complete and len(result.computed) == 4
    shards = ShardSet.open(next((root / "shards").glob("mem_tiny-*")))
    matched = {}
    for step in (20, 160):
        model, _ = load_model_from_checkpoint(root / "checkpoints" / RUN / f"step_{step}")
        scorer = MemorizationScorer(model, k=32, l=32, batch_size=32)
        for chunk in (0, 1):
            cell = pq.read_table(cell_path(tmp_path, step, chunk)).to_pandas()
            fresh = scorer.score(shards.sequences(cell.seq_id.to_numpy()))
            assert cell.matched.tolist() == fresh.matched.tolist(), (step, chunk)
            matched[step, chunk] = cell.matched.tolist()
    assert matched[20, 0] != matched[160, 0]  # the two checkpoints really differ on these sequences


def test_planted_sequences_score_one_and_match_transformers(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    root, planted = trained_run
    from transformers import AutoModelForCausalLM

    from open360.analysis.memorization.reference import hf_greedy_continuations
    from open360.checkpoint import list_checkpoints, load_model_from_checkpoint
    from open360.data.shards import ShardSet
    from open360.models.hf import export_hf

    step, path = list_checkpoints(root / "checkpoints" / RUN)[-1]
    model, cfg = load_model_from_checkpoint(path)
    shard_dir = next((root / "shards").glob("mem_tiny-*"))
    shards = ShardSet.open(shard_dir)
    everything = shards.sequences(np.arange(shards.num_sequences))
    doc = shards.tokenizer().encode(planted).ids
    stream = np.array((doc + [shards.eos_id]) * (SEQ_LEN // len(doc) + 3))
    windows = {tuple(stream[i : i + SEQ_LEN + 1]) for i in range(len(doc) + 1)}
    planted_ids = np.flatnonzero([tuple(s) in windows for s in everything])
    assert len(planted_ids) >= 100  # the repeated document fills many training sequences
    other_ids = np.setdiff1d(np.arange(len(everything)), planted_ids)[::10]
    seqs = everything[np.concatenate([planted_ids[:96], other_ids])]
    is_planted = np.arange(len(seqs)) < min(96, len(planted_ids))
    res = MemorizationScorer(model, k=32, l=32, batch_size=128).score(seqs)
    assert (res.score[is_planted] == 1.0).all()  # memorized: every planted window is k-extractable
    assert res.score[~is_planted].mean() < 0.2  # sequences seen once are not
    assert res.full_match < 0.5

    # Per sequence, equal to transformers generate on the HF export of the same checkpoint.
    assert step == STEPS
    export_hf(model, cfg.model, shards.tokenizer_path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    pick = np.concatenate([np.flatnonzero(is_planted)[:16], np.flatnonzero(~is_planted)[:48]])
    ref = hf_greedy_continuations(hf, seqs[pick], k=32, cont_len=32, batch_size=32)
    assert np.array_equal(res.predicted[pick], ref)
    ref_score = (ref == seqs[pick, 32:64]).mean(axis=1)
    assert np.allclose(res.score[pick], ref_score)


def test_bad_arguments_fail_with_the_key(
    trained_run: tuple[Path, str], capsys: pytest.CaptureFixture
) -> None:
    root, _ = trained_run
    with pytest.raises(MemorizationJobError, match="mode"):
        parse_args(_job(root, "mode=beam"))
    with pytest.raises(MemorizationJobError, match="chunks"):
        run_job(parse_args(_job(root, "chunks=0-99")))
    with pytest.raises(MemorizationJobError, match="exceeds"):
        run_job(parse_args(_job(root, "k=40", "l=40")))
    assert main(_job(root, "checkpoints=12345", "pull=false")) == 2
    assert "no checkpoint at steps [12345]" in capsys.readouterr().err


def _copy_workspace(trained_run: tuple[Path, str], tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(trained_run[0], root, ignore=shutil.ignore_patterns("analysis"))
    return root


def _only_in_remote(root: Path, stash: Path, steps: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Move `steps` out of the workspace into a stand-in DVC remote; the job's fetches copy the files they name
    into a stand-in cache (never optimizer.pt); the steps whose weights were fetched are the list returned."""
    import shutil
    from types import SimpleNamespace

    import open360.tracking.checkpoints as tracking_checkpoints

    for step in steps:
        shutil.move(root / "checkpoints" / RUN / f"step_{step}", stash / f"step_{step}")
    tracked = sorted({s for s, _ in list_checkpoints(root / "checkpoints" / RUN)} | set(steps))
    pulled: list[int] = []
    cache = stash / "cache"

    class Store:
        def fetch(self, path: Path, names: list[str]) -> tuple[dict[str, Path], list[Path]]:
            assert "optimizer.pt" not in names and path.parent == root / "checkpoints" / RUN
            pulled.extend([int(path.name.removeprefix("step_"))] if "model.safetensors" in names else [])
            where = {name: cache / path.name / name for name in names}
            added = [file for file in where.values() if not file.is_file()]
            for name, file in where.items():
                file.parent.mkdir(parents=True, exist_ok=True)
                if not file.is_file():
                    shutil.copyfile(stash / path.name / name, file)
            return where, added

    def recorded(workspace: Path, run: str, step: int) -> tuple[Store, Any]:
        assert Path(workspace) == root and run == RUN and step in steps
        tracked_dir = SimpleNamespace(md5=f"{step:012d}.dir")
        return Store(), SimpleNamespace(step=step, path=root / "checkpoints" / RUN / f"step_{step}", tracked=tracked_dir)

    monkeypatch.setattr(tracking_checkpoints, "recorded_checkpoint", recorded)
    listed = [(s, root / "checkpoints" / RUN / f"step_{s}") for s in tracked]  # what DVC lists
    monkeypatch.setattr(tracking_checkpoints, "known_checkpoints", lambda ws, run, who="": listed)
    return pulled


def _nothing_fetched_left(root: Path, stash: Path) -> bool:
    """No scoring copy of a fetched checkpoint and no cache file a fetch added is left."""
    from open360.analysis.memorization.checkpoints import pulled_root

    copies = list(pulled_root(root, RUN).glob("step_*"))
    return not copies and not [f for f in (stash / "cache").rglob("*") if f.is_file()]


def test_a_fetched_copy_is_one_of_the_recorded_checkpoint_not_of_a_step_a_branch_replaced(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scoring copy left by a job without release_local is reused only for the checkpoint DVC records now: a
    branch that since replaced step 40 (another record md5) gets a copy of its own, not the old weights."""
    import open360.tracking.checkpoints as tracking_checkpoints
    from open360.analysis.memorization.checkpoints import ensure_checkpoint

    root = _copy_workspace(trained_run, tmp_path)
    pulled = _only_in_remote(root, tmp_path / "remote", (40,), monkeypatch)
    job = parse_args(_job(root, "checkpoints=40"))
    first, fetched = ensure_checkpoint(job, root, 40)
    assert fetched and pulled == [40] and ensure_checkpoint(job, root, 40) == (first, None)  # reused as it is
    recorded = tracking_checkpoints.recorded_checkpoint

    def replaced(workspace: Path, run: str, step: int) -> Any:
        store, entry = recorded(workspace, run, step)
        entry.tracked.md5 = "b" * 12 + ".dir"
        return store, entry

    monkeypatch.setattr(tracking_checkpoints, "recorded_checkpoint", replaced)
    second, _ = ensure_checkpoint(job, root, 40)
    assert second != first and second.name == "step_40-bbbbbbbbbbbb" and pulled == [40, 40]


def _with_mlflow_run(root: Path) -> tuple[Any, str]:
    """(client, run id) of an MLflow run in the workspace's store that every checkpoint's lineage names,
    as the MLflow callback records it."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("open360", artifact_location=(root / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    for _, path in list_checkpoints(root / "checkpoints" / RUN):
        lineage = json.loads((path / "lineage.json").read_text())
        (path / "lineage.json").write_text(json.dumps({**lineage, "mlflow_run_id": run_id}))
    return client, run_id


def test_missing_checkpoints_are_pulled_and_released(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy_workspace(trained_run, tmp_path)
    pulled = _only_in_remote(root, tmp_path / "remote", (40, 80), monkeypatch)
    args = _job(root, "checkpoints=20,40,80", "chunks=0-1", "sample=8", "report=false")
    with pytest.raises(MemorizationJobError, match="pull=false"):
        run_job(parse_args([*args, "pull=false"]))
    result = run_job(parse_args([*args, "release_local=true"]))
    assert result.complete and len(result.computed) == 6 and sorted(pulled) == [40, 80]
    assert _nothing_fetched_left(root, tmp_path / "remote")  # fetched, scored, released
    assert not (root / "checkpoints" / RUN / "step_40").exists()  # no partial folder there
    assert (root / "checkpoints" / RUN / "step_20").is_dir()  # was local: never deleted



def test_release_local_frees_what_a_failed_or_interrupted_job_pulled(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release_local=true: a job that stops (a bad key found once the shards are open, Ctrl-C while scoring)
    deletes the checkpoints it pulled. Left on disk, a rerun takes them for local ones and never frees them."""
    import open360.analysis.memorization.job as job_module

    root = _copy_workspace(trained_run, tmp_path)
    pulled = _only_in_remote(root, tmp_path / "remote", (40, 80), monkeypatch)
    args = _job(root, "checkpoints=40,80", "sample=4", "report=false", "release_local=true")
    with pytest.raises(MemorizationJobError, match="out of range"):
        run_job(parse_args([*args, "chunks=99"]))  # known only once step 40's metadata and the shards are open
    assert pulled == [] and _nothing_fetched_left(root, tmp_path / "remote")  # its metadata fetched and freed
    write_cell, writes = job_module.write_cell, []

    def interrupted_at_the_second_cell(path: Path, table: Any) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise KeyboardInterrupt
        write_cell(path, table)

    monkeypatch.setattr(job_module, "write_cell", interrupted_at_the_second_cell)
    with pytest.raises(KeyboardInterrupt):
        run_job(parse_args([*args, "chunks=0-1"]))
    assert pulled == [40] and _nothing_fetched_left(root, tmp_path / "remote")
    monkeypatch.setattr(job_module, "write_cell", write_cell)
    assert run_job(parse_args([*args, "chunks=0-1"])).complete  # fetches again what it needs
    assert pulled == [40, 40, 80] and _nothing_fetched_left(root, tmp_path / "remote")


def test_release_local_frees_a_scoring_copy_whose_files_were_cached_and_one_it_only_read_metadata_from(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that found every file in the cache still made the scoring copy: release_local deletes it (and
    keeps the cache files, not the job's); a rerun with nothing left to score fetches the first step's metadata
    and frees that copy too. Without release_local a job that stops keeps its copy for the rerun."""
    import shutil

    from open360.analysis.memorization.checkpoints import pulled_root

    root = _copy_workspace(trained_run, tmp_path)
    stash = tmp_path / "remote"
    _only_in_remote(root, stash, (40,), monkeypatch)
    shutil.copytree(stash / "step_40", stash / "cache" / "step_40", ignore=shutil.ignore_patterns("optimizer.pt"))
    cached = sorted((stash / "cache").rglob("*"))
    args = _job(root, "checkpoints=40", "chunks=0", "sample=4", "report=false")
    for _ in range(2):  # scored, then nothing left to score
        assert run_job(parse_args([*args, "release_local=true"])).complete
        assert not list(pulled_root(root, RUN).glob("step_*")) and sorted((stash / "cache").rglob("*")) == cached
    with pytest.raises(MemorizationJobError, match="out of range"):
        run_job(parse_args([*_job(root, "checkpoints=40", "chunks=99"), "release_local=false"]))
    assert [p.name for p in pulled_root(root, RUN).glob("step_*")] == ["step_40-000000000040"]


def test_a_scoring_copy_links_the_cache_files_or_copies_them_never_a_symbolic_link(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scoring copy holds hard links to the fetched cache files (no second copy on disk); where the cache is
    on another filesystem, copies: a symbolic link would dangle once a release of another step that fetched the
    same file (a config.yaml) deletes it."""
    import errno
    import os

    from open360.analysis.memorization import checkpoints as memorization_checkpoints
    from open360.analysis.memorization.checkpoints import ensure_checkpoint

    root = _copy_workspace(trained_run, tmp_path)
    stash = tmp_path / "remote"
    _only_in_remote(root, stash, (40, 80), monkeypatch)
    job = parse_args(_job(root, "checkpoints=40,80"))
    view, _ = ensure_checkpoint(job, root, 40)
    cached = stash / "cache" / "step_40" / "model.safetensors"
    assert os.path.samefile(view / "model.safetensors", cached)

    def cross_device(source: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(memorization_checkpoints.os, "link", cross_device)
    view, fetched = ensure_checkpoint(job, root, 80)
    for file in fetched:
        file.unlink()  # released by another step's job
    assert not any(f.is_symlink() for f in view.iterdir())
    assert (view / "model.safetensors").read_bytes() == (stash / "step_80" / "model.safetensors").read_bytes()

def _dvc_clone(root: Path, tmp_path: Path, steps: tuple[int, ...]) -> Path:
    """A git clone of a DVC workspace holding (and having pushed) checkpoints `steps`: none of them local."""
    import shutil
    import subprocess

    from dvc.repo import Repo

    from open360.tracking.dvc_versioning import DvcWorkspace
    from open360.tracking.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    paths = [ws / "checkpoints" / RUN / f"step_{s}" for s in steps]
    for path in paths:
        shutil.copytree(root / "checkpoints" / RUN / path.name, path)
        DvcWorkspace(ws).add(path)
    DvcWorkspace(ws).push(paths)
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "checkpoints"], check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    with Repo(str(clone)) as repo, repo.config.edit("local") as conf:
        conf["remote"]["local"] = {"url": str(ws / ".dvc-storage")}
    shutil.copytree(root / "shards", clone / "shards")
    return clone


def test_release_local_frees_the_dvc_cache_files_its_pulls_added(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """In a clone of a DVC workspace, release_local=true deletes what the job pulled: the folders and the
    cache files their pulls added (DVC links or copies every pulled file into .dvc/cache, so deleting the
    folder alone freed no disk). Cache files that were there before the job are kept."""
    import shutil

    from open360.tracking import pull_checkpoint
    from open360.tracking.dvc_versioning import DvcWorkspace

    root, _ = trained_run
    clone = _dvc_clone(root, tmp_path, (20, 40, 60))
    shutil.rmtree(pull_checkpoint(clone, RUN, 40))  # its files stay in the clone's cache: not the job's
    objects = clone / ".dvc" / "cache" / "files" / "md5"
    cache = {
        step: [objects / md5[:2] / md5[2:] for md5 in DvcWorkspace(clone).tracked(path).file_md5.values()]
        for step, path in ((s, clone / "checkpoints" / RUN / f"step_{s}") for s in (20, 40, 60))
    }
    others = set(cache[20] + cache[60]) - set(cache[40])  # config.yaml is one file for all three
    assert all(f.is_file() for f in cache[40]) and others and not any(f.exists() for f in others)
    job = [f"run={RUN}", f"workspace={clone}", "checkpoints=20,40,60", "chunks=0", "sample=4", "batch_size=32",
           "progress=false", "report=false", "release_local=true"]
    assert run_job(parse_args(job)).complete
    assert not list((clone / "checkpoints" / RUN).glob("step_*"))
    assert not any(f.exists() for f in others)  # freed: the remote holds them
    assert all(f.is_file() for f in cache[40])


def test_a_release_waits_for_a_pull_beside_it_that_found_a_shared_file_cached(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 pulls step 40 while rank 0 releases step 20: 40's config.yaml is 20's, already in the cache, so
    the pull checks it out only after transferring the rest. The release must not delete it in between."""
    import threading

    from dvc_data.hashfile import transfer as dvc_transfer

    from open360.analysis.memorization.checkpoints import ensure_checkpoint, release_checkpoint
    from open360.tracking.dvc_versioning import DvcWorkspace

    root, _ = trained_run
    clone = _dvc_clone(root, tmp_path, (20, 40))
    job = parse_args([f"run={RUN}", f"workspace={clone}", "checkpoints=20,40"])
    path20, fetched20 = ensure_checkpoint(job, clone, 20)
    assert fetched20 and path20.parent == clone / "analysis" / RUN / "memorization" / ".pulled"
    assert sorted(p.name for p in path20.iterdir()) == ["config.yaml", "lineage.json", "model.safetensors",
                                                       "trainer_state.json"]  # no optimizer state fetched
    optimizer_md5 = DvcWorkspace(clone).tracked(clone / "checkpoints" / RUN / "step_20").file_md5["optimizer.pt"]
    assert not (clone / ".dvc" / "cache" / "files" / "md5" / optimizer_md5[:2] / optimizer_md5[2:]).exists()
    assert not (clone / "checkpoints" / RUN / "step_20").exists()  # no partial checkpoint folder there
    real, releases = dvc_transfer.transfer, []

    def transfer_beside_a_release(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = real(*args, **kwargs)
        releases.append(threading.Thread(target=release_checkpoint, args=(clone, path20, fetched20)))
        releases[-1].start()  # rank 0, done with step 20
        releases[-1].join(1.0)
        return result

    monkeypatch.setattr(dvc_transfer, "transfer", transfer_beside_a_release)
    path40, _ = ensure_checkpoint(job, clone, 40)
    releases[0].join(60)
    assert set(fetched20) & set(DvcWorkspace(clone).cache_files(clone / "checkpoints" / RUN / "step_40"))  # config
    assert not path20.exists() and not any(f.exists() for f in fetched20)  # released once the pull was done
    assert (path40 / "config.yaml").read_text() == (root / "checkpoints" / RUN / "step_40" / "config.yaml").read_text()


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_torchrun_splits_cells_across_ranks(trained_run: tuple[Path, str], tmp_path: Path, device: str) -> None:
    import subprocess
    import sys

    import pyarrow.parquet as pq

    root, _ = trained_run
    common = _job(root, "checkpoints=20,40,60", "chunks=0-3", "sample=8", f"device={device}")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29617",
        "-m",
        "open360.analysis.memorization",
        *common,
        f"out_dir={tmp_path / 'dist'}",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 cells computed" not in proc.stdout  # each rank did its share, not everything
    single = run_job(parse_args([*common, f"out_dir={tmp_path / 'single'}", "report=false"]))
    ranks = set()
    for step, chunk in single.computed:
        dist = pq.read_table(cell_path(tmp_path / "dist", step, chunk))
        ranks.add(json.loads(dist.schema.metadata[b"open360.memorization"])["rank"])
        one = pq.read_table(cell_path(tmp_path / "single", step, chunk))
        assert dist.column("matched").to_pylist() == one.column("matched").to_pylist()
    assert ranks == {0, 1}
    # the ranks read the sampled tokens of the 4 chunks once between them, and kept them for the other
    assert len(list((tmp_path / "dist").glob("samples-*/chunk_*.npz"))) == 4
    assert (tmp_path / "dist" / "report.md").is_file() and (tmp_path / "dist" / "summary.parquet").is_file()


def test_torchrun_with_max_cells_reads_the_samples_of_the_scored_chunks_only(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    """max_cells bounds a smoke test or a time slice: its ranks read the sampled tokens of the chunks they
    score, not those of every pending cell (360 chunks of ~6 GB decoded each at LLM360 size)."""
    import subprocess
    import sys

    root, _ = trained_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29618",
           "-m", "open360.analysis.memorization",
           *_job(root, "checkpoints=20", "chunks=0-3", "sample=8", "device=cpu", "max_cells=1", "report=false"),
           f"out_dir={tmp_path}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = sorted(p.name.split("-chunk_")[1].split(".")[0] for p in (tmp_path / "cells").glob("*.parquet"))
    assert scored == ["00000", "00001"]  # one cell per rank
    assert sorted(p.stem.removeprefix("chunk_") for p in tmp_path.glob("samples-*/chunk_*.npz")) == scored


def test_seen_selection_scores_only_what_the_checkpoint_trained_on(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    import pandas as pd

    root, _ = trained_run
    args = _job(
        root,
        "checkpoints=40",
        "chunks=0-3",
        "selection=seen",
        "sample=8",
        f"out_dir={tmp_path}",
        "report=false",
    )
    result = run_job(parse_args(args))
    assert result.complete
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    per_chunk = scores.groupby("chunk").size().to_dict()
    assert per_chunk == {0: 8, 1: 8}  # step 40 = 2 chunks of 20 steps; chunks 2, 3 hold nothing seen
    assert scores.seen.all()
    assert cell_path(tmp_path, 40, 3).is_file()  # an empty cell is still recorded as done
    # A matrix with nothing seen (Pythia-style selection before the data arrives) still gets its report.
    empty = run_job(parse_args([*args[:-1], "chunks=5", "report=true"]))
    assert empty.report is not None and "| 40 | 0 | nan |" in empty.report.read_text()


def test_teacher_forced_screen_is_labelled_and_exact_on_full_match(trained_run: tuple[Path, str]) -> None:
    import pandas as pd

    root, _ = trained_run
    args = _job(root, "checkpoints=40,160", "chunks=0-2", "sample=16")
    screen = run_job(parse_args([*args, "mode=teacher_forced"]))
    exact = run_job(parse_args([*args, "report=false"]))
    assert screen.out_dir.name.startswith("teacher_forced-") and exact.out_dir.name.startswith("greedy-")
    assert screen.out_dir != exact.out_dir
    assert screen.report is not None and "Teacher-forced screen" in screen.report.read_text()
    tf = pd.read_parquet(screen.out_dir / "scores.parquet").set_index(["step", "seq_id"]).sort_index()
    gr = pd.read_parquet(exact.out_dir / "scores.parquet").set_index(["step", "seq_id"]).sort_index()
    assert ((tf.matched == 32) == (gr.matched == 32)).all()
    assert (tf.prefix_match == gr.prefix_match).all()
    assert (gr.matched == 32).any()  # the planted document makes full matches to compare


def test_report_is_logged_to_the_runs_mlflow_run(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """Keys hold the settings and the dtype; a job over part of the run's matrix logs its report beside the
    whole matrix's, never over it."""
    root = _copy_workspace(trained_run, tmp_path)
    client, run_id = _with_mlflow_run(root)
    whole = run_job(parse_args(_job(root, "sample=8")))  # every checkpoint x every chunk
    key = f"{whole.out_dir.name}-float32"
    logged = {a.path for a in client.list_artifacts(run_id, f"memorization/{key}")}
    assert f"memorization/{key}/report.md" in logged and f"memorization/{key}/chunk_heatmap.png" in logged
    history = client.get_metric_history(run_id, f"memorization/{key}/full_match")
    assert sorted(m.step for m in history) == whole.steps
    report = client.download_artifacts(run_id, f"memorization/{key}/report.md", str(tmp_path / "dl1"))
    whole_report = Path(report).read_text()

    part = run_job(parse_args(_job(root, "checkpoints=20,160", "chunks=0-1", "sample=8", f"out_dir={tmp_path / 'p'}")))
    assert part.report is not None  # same settings and dtype as the whole job: the same key
    parts = [a.path for a in client.list_artifacts(run_id, f"memorization/{key}") if "/part-" in a.path]
    assert len(parts) == 1 and f"{parts[0]}/report.md" in {a.path for a in client.list_artifacts(run_id, parts[0])}
    report = client.download_artifacts(run_id, f"memorization/{key}/report.md", str(tmp_path / "dl2"))
    assert Path(report).read_text() == whole_report  # the whole matrix's report is still the one there
    # Two of the chunks are not a checkpoint's score: no metric value is added for them.
    assert len(client.get_metric_history(run_id, f"memorization/{key}/full_match")) == len(whole.steps)
    other = run_job(parse_args(_job(root, "checkpoints=20", "sample=4")))  # another sample: its own key
    assert other.out_dir.name != whole.out_dir.name
    run_job(parse_args(_job(root, "sample=8")))  # a re-run repeats no value
    assert len(client.get_metric_history(run_id, f"memorization/{key}/full_match")) == len(whole.steps)
    assert len(client.get_metric_history(run_id, f"memorization/{other.out_dir.name}-float32/full_match")) == 1
    # A clone without the run's mlflow.db: the report is written, logging is skipped, no store is made.
    (root / "mlflow.db").unlink()
    clone = run_job(parse_args(_job(root, "checkpoints=20", "sample=2")))
    assert clone.report is not None and not (root / "mlflow.db").exists()


def test_seen_fast_path_equals_data_order(trained_run: tuple[Path, str]) -> None:
    """The seen set of every consumption — one order within or past its first epoch, or several orders of
    other batch sizes (a warm start's base and the fine-tune) — equals the union of `DataOrder.seen_ids`."""
    from omegaconf import OmegaConf

    from open360.analysis.memorization.data_view import DataView
    from open360.checkpoint import list_checkpoints, read_lineage
    from open360.data import DataOrder

    root, _ = trained_run
    _, path = list_checkpoints(root / "checkpoints" / RUN)[0]
    job = parse_args(_job(root, "selection=seen", "sample=0"))
    data = DataView(job, root, OmegaConf.load(path / "config.yaml"), read_lineage(path))
    epoch = DataOrder(data.shards, data.shards.seed, 16).steps_per_epoch
    # the last two are in epoch 1: slow path; the mixed ones join a prefix and ids of another batch size
    for consumption in ((), ((16, 7),), ((16, 40),), ((16, STEPS),), ((16, epoch + 5),), ((8, 30), (16, 7)),
                        ((8, 2 * epoch + 3), (16, 20))):
        truth = set()
        for batch, steps in consumption:
            truth |= set(DataOrder(data.shards, data.shards.seed, batch).seen_ids(steps).tolist())
        for chunk in (0, 3, 7):
            rows = np.arange(data.chunk_sizes[chunk])
            ids = rows + data.offsets[chunk]
            assert data.seen_mask(consumption, chunk, rows).tolist() == [int(i) in truth for i in ids]
            assert sorted(data.rows(consumption, chunk).tolist()) == [
                int(r) for r in rows if int(r + data.offsets[chunk]) in truth
            ]


def test_a_warm_started_run_has_seen_what_its_base_saw(trained_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """A fine-tune (trainer.init_from) records its base's data history; its memorization cells flag as seen
    what the base had trained on, as the base's own cells of that checkpoint do."""
    import pandas as pd

    from open360.checkpoint import list_checkpoints, read_lineage
    from open360.config import compose
    from open360.train.pipeline import run_training

    root, _ = trained_run
    step, base = list_checkpoints(root / "checkpoints" / RUN)[-1]
    lineage = read_lineage(base)
    cfg = compose([
        "+experiment=amber_tiny", "run_name=warm", f"workspace={root}", "tracking=off",
        f"data.recipe={lineage['data']['recipe']}", "model.vocab_size=512", "model.d_model=128", "model.n_layers=2",
        "model.n_heads=4", "model.ffn_dim=256", f"model.max_seq_len={SEQ_LEN}", f"trainer.seq_len={SEQ_LEN}",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.max_steps=2",
        "trainer.progress_bar=false", "schedule.warmup_steps=1", "checkpoint=every_n", "checkpoint.every=2",
    ])
    run_training(cfg, device="cpu", init_from=base)
    warm = read_lineage(root / "checkpoints" / "warm" / "step_2")
    inherited = warm["init_from"]["data_history"]
    assert [(e["manifest_hash"], e["steps"], e["global_batch_size"]) for e in inherited] == [
        (lineage["data"]["manifest_hash"], step, 16)
    ]
    args = ["sample=24", "batch_size=32", "progress=false", "report=false", "mlflow=false", "chunks=0-3"]
    run_job(parse_args([f"run={RUN}", f"workspace={root}", f"checkpoints={step}", f"out_dir={tmp_path / 'base'}", *args]))
    run_job(parse_args(["run=warm", f"workspace={root}", "checkpoints=2", f"out_dir={tmp_path / 'warm'}", *args]))
    base_cells, warm_cells = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("base", "warm"))
    assert warm_cells.seq_id.tolist() == base_cells.seq_id.tolist()
    assert warm_cells.seen.tolist() == base_cells.seen.tolist() and warm_cells.seen.any()

    # A cell an older open360 wrote (no seen_basis: the base's data not counted) is scored again.
    import json

    import pyarrow.parquet as pq

    old = tmp_path / "warm" / "cells" / "step_2-chunk_00001.parquet"
    table = pq.read_table(old)
    meta = json.loads(table.schema.metadata[b"open360.memorization"])
    del meta["seen_basis"]
    pq.write_table(table.replace_schema_metadata({"open360.memorization": json.dumps(meta)}), old)
    warm_args = ["run=warm", f"workspace={root}", "checkpoints=2", f"out_dir={tmp_path / 'warm'}", *args]
    with pytest.warns(UserWarning, match="leave out what the warm start's base trained on"):
        again = run_job(parse_args(warm_args))
    assert again.computed == [(2, 1)]

    from open360.tracking.cli import lineage_main
    from open360.tracking.release import export_release

    lineage_main([str(root / "checkpoints" / "warm" / "step_2")])
    shown = capsys.readouterr().out
    assert f"warm-started from: {base}" in shown and f"data [main, base]: shards {lineage['data']['shard_dir']}" in shown
    card = (export_release(root, "warm", tmp_path / "release") / "README.md").read_text()
    assert f"Warm-started from `{RUN}/step_{step}`" in card and "| main (base) | `" in card and "| main | `" in card


def test_resume_reuses_only_cells_of_this_job_and_these_weights(
    trained_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    import shutil

    import pandas as pd

    from open360.analysis.memorization.job import MemorizationJobError

    root = tmp_path / "ws"
    shutil.copytree(trained_run[0], root, ignore=shutil.ignore_patterns("analysis"))
    out = tmp_path / "cells_here"
    args = _job(root, "checkpoints=20,40", "chunks=0-1", "sample=4", f"out_dir={out}", "report=false")
    run_job(parse_args(args))
    scores = pd.read_parquet(out / "scores.parquet")
    cell = out / "cells" / "step_20-chunk_00001.parquet"
    cell.write_bytes(cell.read_bytes()[:100])  # damaged
    with pytest.warns(UserWarning, match="unreadable cell"):
        again = run_job(parse_args(args))
    assert again.computed == [(20, 1)] and len(again.skipped) == 3
    assert pd.read_parquet(out / "scores.parquet").equals(scores)
    data = bytearray(cell.read_bytes())  # damaged inside, the footer intact: found by reading it whole
    data[8:200] = bytes(192)
    cell.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="unreadable cell"):
        assert run_job(parse_args(args)).computed == [(20, 1)]
    with pytest.raises(MemorizationJobError, match=r"'dtype': \('float32', 'bfloat16'\).*pass dtype=fp32"):
        run_job(parse_args([*args, "dtype=bf16"]))  # fp32 cells (dtype=auto on a CPU) are not mixed in
    import pyarrow.parquet as pq

    other = out / "cells" / "step_40-chunk_00000.parquet"  # as if scored on other shards
    table = pq.read_table(other)
    meta = json.loads(table.schema.metadata[b"open360.memorization"])
    pq.write_table(table.replace_schema_metadata(
        {"open360.memorization": json.dumps({**meta, "manifest_hash": "f" * 64})}), other)
    with pytest.raises(MemorizationJobError, match=r"'manifest_hash': \('f{64}', '[0-9a-f]{64}'\)"):
        run_job(parse_args(args))
    other.unlink()
    # A job's summary and report cover its own matrix, not every cell left in the folder.
    only = run_job(parse_args([*args[:-1], "checkpoints=40", "report=true"]))
    assert set(pd.read_parquet(out / "summary.parquet").step) == {40}
    assert only.report is not None and "1 checkpoints x 2 chunks" in only.report.read_text()
    with pytest.raises(MemorizationJobError, match=r"scored with other settings .*'sample': \(4, 5\)"):
        run_job(parse_args([*args, "sample=5"]))
    for chunk in (0, 1):  # as if scored before the run was retrained (other weights at step 40)
        stale = cell_path(out, 40, chunk)
        table = pq.read_table(stale)
        meta = json.loads(table.schema.metadata[b"open360.memorization"])
        pq.write_table(table.replace_schema_metadata(
            {"open360.memorization": json.dumps({**meta, "model_sha256": "0" * 64})}), stale)
    with pytest.warns(UserWarning, match="other weights than checkpoint step 40"):
        retrained = run_job(parse_args(args))
    assert sorted(retrained.computed) == [(40, 0), (40, 1)]
    weights = root / "checkpoints" / RUN / "step_20" / "model.safetensors"  # truncated weights: one line
    weights.write_bytes(weights.read_bytes()[:1000])
    from open360.analysis.memorization.job import main

    assert main(_job(root, "checkpoints=20", "chunks=0", f"out_dir={tmp_path / 'fresh'}", "report=false")) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: sha256" in err and "does not match lineage.json" in err and "Traceback" not in err


def test_cells_of_other_settings_stop_the_job_before_any_reason_to_score_them_again(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    """save_tokens=true scores again cells written without continuations, but only cells of this job's
    settings: a cell of another sample in the same out_dir stops the job and is left as it was."""
    root, _ = trained_run
    args = _job(root, "checkpoints=20", "chunks=0", "sample=4", f"out_dir={tmp_path}", "report=false")
    run_job(parse_args(args))
    cell = cell_path(tmp_path, 20, 0)
    before = cell.read_bytes()
    with pytest.raises(MemorizationJobError, match=r"scored with other settings .*'sample': \(4, 5\)"):
        run_job(parse_args([*args, "sample=5", "save_tokens=true"]))
    assert cell.read_bytes() == before


def test_bad_selections_and_keys_exit_with_one_line(trained_run: tuple[Path, str], capsys) -> None:
    from open360.analysis.memorization.job import main

    root, _ = trained_run
    for extra, says in (
        ("checkpoints=999", "no checkpoint at steps [999]"),
        ("checkpoints=1-5", "no checkpoint in 1-5"),
        ("device=tpu", "device='tpu'"),
        ("dtype=int8", "dtype='int8'"),
        ("shards=nope", "shards='nope': no folder"),
        ("checkpoints=", "selects nothing"),
        ("checkpoints=40-20", "the range 40-20 runs backwards"),
        ("chunks=[0,1", "bad memorization argument"),
        ("seed=-1", "seed=-1: must be >= 0"),
        ("max_cells=-1", "max_cells=-1: must be >= 0"),  # mine[:-1] scored all cells but one
        ("device=cuda:x", "device='cuda:x': expected auto, cpu, cuda or cuda:<index>"),
        ("device=cuda:99", "device=cuda:99"),  # no CUDA here, or not that many GPUs: one line either way
    ):
        assert main(_job(root, extra, "chunks=0", "report=false")) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    assert main(_job(root, "checkpoints=20", "chunks=true", "report=false")) == 2  # not chunk 1
    assert "chunks=True: 'True' is not an integer" in capsys.readouterr().err
    within = run_job(parse_args(_job(root, "checkpoints=15-25", "chunks=0", "sample=2", "report=false")))
    assert within.steps == [20]  # a range picks the run's checkpoints inside it
    from open360.analysis.memorization.job_config import job_tag

    assert job_tag(parse_args(_job(root, "shards=shards/stage_b"))).endswith("-seed42-stage_b")


def test_a_malformed_chunks_value_stops_the_job_before_anything_is_pulled() -> None:
    """chunks= is parsed with the other keys: a typo must not first pull a checkpoint and the run's shards
    (the range is checked against the shards once they are open)."""
    for value, says in (("1.5", "'1.5' is not an integer"), ("3-1", "runs backwards"), ("0-9999999", "more than")):
        with pytest.raises(MemorizationJobError, match=f"chunks=.*{says}"):
            parse_args([f"run={RUN}", f"chunks={value}"])

def test_an_explicit_gpu_is_checked_and_not_shared_by_torchrun_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=cuda:N names a GPU that must exist; under torchrun every rank would take that one GPU."""
    from open360.analysis.memorization.job import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    job = parse_args([f"run={RUN}", "device=cuda:1"])
    assert _device(job, 0) == "cuda:1"
    with pytest.raises(MemorizationJobError, match="every rank on one GPU; use device=cuda"):
        _device(job, 1, world=2)
    assert _device(parse_args([f"run={RUN}", "device=cuda"]), 1, world=2) == "cuda:1"
    with pytest.raises(MemorizationJobError, match=r"device=cuda:2: cuda:2 is not visible \(2 CUDA devices\)"):
        _device(parse_args([f"run={RUN}", "device=cuda:2"]), 0)


def test_wide_ranges_are_not_expanded(trained_run: tuple[Path, str], capsys) -> None:
    """checkpoints=100000-999999999 ("from 100000 on") picks the run's steps inside it without listing every
    integer of it (that took gigabytes); a range of chunks far past the shards is one short line."""
    from open360.analysis.memorization.checkpoints import resolve_steps

    root, _ = trained_run
    job = parse_args(_job(root, "checkpoints=100-999999999999,20"))
    assert resolve_steps(job, root, [20, 40, 100, 160]) == [20, 100, 160]
    for chunks, says in (("0-999999999999", "holds more than 1000000 values"),
                         ("0-99", "[8, 9, 10, 11, 12, 13, 14, 15] ... out of range; the shards have 8 (0-7)")):
        assert main(_job(root, "checkpoints=20", f"chunks={chunks}", "report=false")) == 2
        err = capsys.readouterr().err
        assert says in err and len(err) < 300 and "Traceback" not in err


def test_a_damaged_checkpoint_is_named_not_scored(trained_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """A weights file that no longer matches its lineage.json (one flipped byte) stops the job before
    it is scored, naming the file; no cell is written for it."""
    from open360.analysis.memorization.job import main

    root, _ = trained_run
    weights = root / "checkpoints" / RUN / "step_20" / "model.safetensors"
    original = weights.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    try:
        weights.write_bytes(bytes(damaged))
        assert main(_job(root, "checkpoints=20", "chunks=0", f"out_dir={tmp_path}", "report=false")) == 2
    finally:
        weights.write_bytes(original)
    err = capsys.readouterr().err
    assert f"{weights}: sha256" in err and "does not match lineage.json" in err and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.parquet"))
    # a lineage.json damaged after its cells were scored: the re-run names it (it used to raise JSONDecodeError)
    lineage = weights.parent / "lineage.json"
    kept = lineage.read_bytes()
    job = _job(root, "checkpoints=20", "chunks=0", "sample=2", f"out_dir={tmp_path / 'ok'}", "report=false")
    assert main(job) == 0
    try:
        lineage.write_text("{bad")
        assert main(job) == 2
    finally:
        lineage.write_bytes(kept)
    err = capsys.readouterr().err
    assert f"{lineage}: not valid JSON" in err and "Traceback" not in err


def test_a_damaged_checkpoint_the_job_does_not_score_does_not_stop_it(
    trained_run: tuple[Path, str], tmp_path: Path
) -> None:
    """The MLflow run is looked up in the newest checkpoints: a damaged lineage.json or config.yaml there
    (steps 160, 140) is skipped, not an error of a job over step 20; the report still reaches the run."""
    root = _copy_workspace(trained_run, tmp_path)
    client, run_id = _with_mlflow_run(root)
    (root / "checkpoints" / RUN / "step_160" / "lineage.json").write_text("{bad")
    (root / "checkpoints" / RUN / "step_140" / "config.yaml").write_text("tracking: [unclosed\n")
    assert main(_job(root, "checkpoints=20", "chunks=0", "sample=2")) == 0
    key = "memorization/greedy-k32-l32-sample2-seed42-float32"
    assert any("/part-" in a.path for a in client.list_artifacts(run_id, key))


def test_stale_cells_left_by_max_cells_are_not_complete_nor_merged(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """A time slice (max_cells) leaves damaged cells damaged: the matrix is incomplete, the summary skips
    them; save_tokens=true scores again cells written without continuations."""
    import pandas as pd

    root, _ = trained_run
    out = tmp_path / "slice"
    args = _job(root, "checkpoints=20", "chunks=0-2", "sample=2", f"out_dir={out}", "report=false")
    run_job(parse_args(args))
    for chunk in (0, 1):
        cell = cell_path(out, 20, chunk)
        cell.write_bytes(cell.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable cell"):
        part = run_job(parse_args([*args, "max_cells=1"]))
    assert part.computed == [(20, 0)] and not part.complete
    assert sorted(pd.read_parquet(out / "summary.parquet").chunk) == [0, 2]
    with pytest.warns(UserWarning, match="without continuations"):
        tokens = run_job(parse_args([*args, "save_tokens=true"]))
    assert len(tokens.computed) == 3 and tokens.complete


def test_a_summary_of_other_cells_never_sits_beside_an_older_report(trained_run: tuple[Path, str], tmp_path: Path) -> None:
    """A job that renders no report (report=false, or an incomplete matrix) but merges other cells removes
    the report, figures and progress.csv an earlier job rendered from other cells; the same cells keep it."""
    import pandas as pd

    root, _ = trained_run
    args = _job(root, "checkpoints=20", "chunks=0-1", "sample=2", f"out_dir={tmp_path}")
    assert run_job(parse_args(args)).report is not None
    rendered = {p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".png", ".csv")}
    assert {"report.md", "progress.csv", "chunk_heatmap.png"} <= rendered
    run_job(parse_args([*args, "report=false"]))  # the same cells: the report still describes them
    assert {p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".png", ".csv")} == rendered
    run_job(parse_args([*args, "chunks=0", "report=false"]))
    assert len(pd.read_parquet(tmp_path / "summary.parquet")) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".md", ".png", ".csv")]


def test_released_checkpoints_still_log_the_report_to_their_run(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every checkpoint pulled, scored and released, the report still reaches the run's MLflow run
    (found while a checkpoint was on disk)."""
    pytest.importorskip("mlflow")
    root = _copy_workspace(trained_run, tmp_path)
    client, run_id = _with_mlflow_run(root)
    pulled = _only_in_remote(root, tmp_path / "remote", (20, 160), monkeypatch)
    result = run_job(parse_args(_job(root, "checkpoints=20,160", "chunks=0-1", "sample=4", "release_local=true")))
    assert result.report is not None and sorted(pulled) == [20, 160]
    assert _nothing_fetched_left(root, tmp_path / "remote")
    key = f"memorization/{result.out_dir.name}-float32"
    (part,) = [a.path for a in client.list_artifacts(run_id, key) if "/part-" in a.path]  # 2 chunks of the run's
    assert f"{part}/report.md" in {a.path for a in client.list_artifacts(run_id, part)}


def test_a_full_disk_and_an_interrupt_keep_the_cells_written(
    trained_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A cell that cannot be written (ENOSPC) is one line naming it; the cells before it stay, no temp
    file is left, and the same command finishes the matrix. Ctrl-C is one line too."""
    import errno

    import pyarrow.parquet as pq

    root, _ = trained_run
    args = _job(root, "checkpoints=20", "chunks=0-2", "sample=2", f"out_dir={tmp_path}", "report=false")
    write_table, writes = pq.write_table, []

    def disk_fills_up(table: Any, where: Any, **kwargs: Any) -> None:
        writes.append(where)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_table(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", disk_fills_up)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "could not write the cell" in err and "No space left on device" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "cells").iterdir()] == ["step_20-chunk_00000.parquet"]
    monkeypatch.setattr(pq, "write_table", write_table)
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == [f"step_20-chunk_0000{c}.parquet" for c in range(3)]

    import open360.analysis.memorization.job as job_module

    def interrupted(job: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(job_module, "run_job", interrupted)
    assert main(args) == 130
    assert "interrupted; the cells written so far are kept" in capsys.readouterr().err


def test_a_summary_the_full_disk_cuts_short_names_its_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """summary.parquet cannot be written (ENOSPC): the error names it (pyarrow's names no file), the summary
    before stays, and no half-written temporary file is left holding the space."""
    import errno

    import pandas as pd
    import pyarrow as pa

    from open360.analysis.memorization.cells import write_cell
    from open360.analysis.memorization.report import merge_cells

    columns = {"step": [20], "chunk": [0], "row": [0], "seq_id": [0], "matched": [32], "score": [1.0],
               "prefix_match": [32], "seen": [True]}
    cell = pa.table(columns).replace_schema_metadata({"open360.memorization": json.dumps({"step": 20, "chunk": 0})})
    write_cell(cell_path(tmp_path, 20, 0), cell)
    summary = merge_cells(tmp_path)
    assert summary is not None
    before = summary.read_bytes()
    write_cell(cell_path(tmp_path, 20, 1), cell.replace_schema_metadata({"open360.memorization": json.dumps({"step": 20, "chunk": 1})}))

    def disk_full(self: Any, path: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(OSError, match=f"{summary}: could not be written .*No space left on device"):
        merge_cells(tmp_path)
    assert summary.read_bytes() == before and not list(tmp_path.glob(".tmp*"))


def test_shards_are_matched_by_content_and_tokenizer(trained_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    """A copy of the run's shards elsewhere (a clone) is the run's data: what a checkpoint saw is found by
    manifest hash, not folder path. Shards of another tokenizer are refused. Two stages over the same
    shards replay one order from its start: a checkpoint has seen the longest of them, not their sum."""
    import shutil

    import pandas as pd
    from omegaconf import OmegaConf

    from open360.analysis.memorization.data_view import DataView
    from open360.checkpoint import read_lineage
    from open360.data import build_shards

    root, _ = trained_run
    shards = next((root / "shards").glob("mem_tiny-*"))
    copy = tmp_path / "elsewhere" / shards.name
    shutil.copytree(shards, copy)
    args = _job(root, "checkpoints=40", "chunks=0-3", "selection=seen", "sample=8", "report=false")
    run_job(parse_args([*args, f"out_dir={tmp_path / 'here'}"]))
    run_job(parse_args([*args, f"out_dir={tmp_path / 'copy'}", f"shards={copy}"]))
    here, there = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("here", "copy"))
    assert len(there) == 16 and there.seq_id.tolist() == here.seq_id.tolist()

    recipe = tmp_path / "other.yaml"
    recipe.write_text(
        "name: other\nsources:\n  - {name: s, type: jsonl, path: data_recipes/corpus/shakespeare.jsonl.gz, "
        "max_docs: 200}\ntokenizer: {kind: train, vocab_size: 300}\nseq_len: 64\nnum_chunks: 2\n"
        "validation: {fraction: 0.0, max_sequences: 0}\n"
    )
    other = build_shards(recipe, tmp_path / "other_shards")
    assert main(_job(root, "checkpoints=40", "chunks=0", f"shards={other}", f"out_dir={tmp_path / 'o'}")) == 2
    err = capsys.readouterr().err
    assert "tokenized with" in err and "pass shards= of this run" in err

    _, path = list_checkpoints(root / "checkpoints" / RUN)[0]
    lineage = read_lineage(path)
    view = DataView(parse_args(_job(root)), root, OmegaConf.load(path / "config.yaml"), lineage)
    entry = lineage["data_history"][0]
    twice = view.consumption({"data_history": [{**entry, "steps": 30}, {**entry, "steps": 20}]})
    assert twice == ((16, 20), (16, 30))
    # another stage's shards (CrystalCoder's stage 1 when these are stage 2's) consumed none of these rows
    foreign = {**entry, "manifest_hash": "0" * 64, "shard_dir": "shards/another_stage", "steps": 50}
    assert view.consumption({"data_history": [foreign, {**entry, "steps": 20}]}) == ((16, 20),)
    assert view.consumption({"data_history": [foreign]}) == ()
    rows = np.arange(view.chunk_sizes[0])
    assert view.seen_mask(twice, 0, rows).tolist() == (rows < 30 * 16).tolist()
    # chunk 0 (20 steps) is seen either way: the next chunk tells the longest (30 steps) from the sum (50)
    rows = np.arange(view.chunk_sizes[1])
    seen = view.seen_mask(twice, 1, rows)
    assert seen.tolist() == (rows + view.offsets[1] < 30 * 16).tolist() and 0 < seen.sum() < len(rows)


def test_the_score_correlation_equals_pandas_pairwise_pearson() -> None:
    """The checkpoint x checkpoint correlation comes from matrix sums (a pivot table of LLM360's 130M rows
    does not fit); it must equal pandas' pairwise-complete Pearson, NaN where pandas has NaN (a checkpoint
    whose scores are all equal, checkpoints sharing fewer than two sequences)."""
    import pandas as pd

    from open360.analysis.memorization.report import score_correlation

    rng = np.random.default_rng(0)
    parts = []
    for step in range(0, 60, 10):
        score = rng.integers(0, 33, size=200) / 32
        if step == 30:
            score[:] = 0.5
        parts.append(pd.DataFrame({"step": step, "seq_id": rng.choice(300, size=200, replace=False),
                                   "score": score.astype(np.float32)}))
    parts.append(pd.DataFrame({"step": 60, "seq_id": [1000, 1001], "score": np.float32([0.1, 0.2])}))
    scores = pd.concat(parts, ignore_index=True)
    want = scores.pivot_table(index="seq_id", columns="step", values="score").corr(method="pearson", min_periods=2)
    for block in (7, 16384):  # sums over many blocks of sequences, or one
        got = score_correlation(scores, block=block)
        assert list(got.index) == list(want.index) == list(got.columns)
        assert np.array_equal(np.isnan(got.to_numpy()), np.isnan(want.to_numpy()))
        assert np.allclose(got.to_numpy(), want.to_numpy(), atol=1e-12, equal_nan=True)


def test_default_shards_are_the_first_stages_whichever_checkpoint_comes_first(tmp_path: Path) -> None:
    """A multi-stage run (CrystalCoder) is scored on its first stage's shards by default, whichever checkpoints
    are chosen: a lineage's `data` is the stage the checkpoint was in, so `checkpoints=latest` (a stage-3
    checkpoint) read stage 3's shards into the folder (tag) that `checkpoints=all` fills with stage 1's."""
    from open360.analysis.memorization.data_view import DataView

    history = [{"stage": f"s{i}", "shard_dir": f"shards/stage{i}", "steps": 10} for i in (1, 2, 3)]
    late = {"data": history[-1], "data_history": history}  # a checkpoint in stage 3
    job = parse_args([f"run={RUN}", f"workspace={tmp_path}"])
    assert DataView._shard_path(job, tmp_path, late) == tmp_path / "shards" / "stage1"
    old = {"data": history[0]}  # a lineage from before data_history: its one `data`
    assert DataView._shard_path(job, tmp_path, old) == tmp_path / "shards" / "stage1"
    with pytest.raises(MemorizationJobError, match=r"data_history\[0\]"):
        DataView._shard_path(job, tmp_path, {"data_history": [{"stage": "s1"}]})
