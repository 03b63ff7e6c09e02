"""RNG capture/restore, resume target selection, refusal of mismatched data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from open360.checkpoint import CheckpointContents, CheckpointError, read_lineage, save_checkpoint
from open360.train.state import (
    capture_rng_state,
    check_resume_compatible,
    check_resume_recipe,
    find_resume_checkpoint,
    restore_rng_state,
)


def test_rng_roundtrip_through_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian around
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert expected[:3] == got[:3]
    assert torch.equal(expected[3], got[3])


def _save(parent: Path, step: int, data: dict | None = None) -> Path:
    c = CheckpointContents(
        {"w": torch.zeros(1)}, {}, {"step": step}, {}, "x: 1\n", lineage={"data": data or {}}
    )
    return save_checkpoint(parent, step, c)


def test_find_resume(tmp_path: Path) -> None:
    pub, rec = tmp_path / "checkpoints" / "r", tmp_path / "recovery" / "r"
    assert find_resume_checkpoint("auto", pub, rec) is None
    assert find_resume_checkpoint("none", pub, rec) is None
    _save(pub, 10)
    _save(rec, 15)
    _save(pub, 5)
    assert find_resume_checkpoint("auto", pub, rec) == rec / "step_15"
    assert find_resume_checkpoint("5", pub, rec) == pub / "step_5"
    assert find_resume_checkpoint(str(pub / "step_10"), pub, rec) == pub / "step_10"
    with pytest.raises(CheckpointError, match=r"no complete checkpoint for step 7.*5, 10, 15"):
        find_resume_checkpoint("7", pub, rec)
    with pytest.raises(CheckpointError, match="not a complete checkpoint directory"):
        find_resume_checkpoint(str(tmp_path / "nope"), pub, rec)
    # a fresh start would overwrite the run's checkpoints one by one: refused, with the ways on
    with pytest.raises(CheckpointError, match=r"run 'r' already has checkpoints \(steps \[5, 10, 15\]\).*resume=auto"):
        find_resume_checkpoint("none", pub, rec)


def test_resume_refuses_other_manifest_or_tokenizer(tmp_path: Path) -> None:
    path = _save(tmp_path, 4, {"stage": "main", "manifest_hash": "m1", "tokenizer_hash": "t1"})
    check_resume_compatible(path, read_lineage(path), "main", "m1", "t1")
    with pytest.raises(
        CheckpointError, match=r"refusing to resume.*data manifest hash m1 in the checkpoint, m2 now"
    ):
        check_resume_compatible(path, read_lineage(path), "main", "m2", "t1")
    with pytest.raises(CheckpointError, match=r"tokenizer hash t1 in the checkpoint, t9 now"):
        check_resume_compatible(path, read_lineage(path), "main", "m1", "t9")
    with pytest.raises(CheckpointError, match=r"checkpoint is in stage 'main', the config puts its step in 'code'"):
        check_resume_compatible(path, read_lineage(path), "code", "m1", "t1")  # stages renamed or reordered: not the same data


def test_a_resume_whose_recipe_names_another_shard_folder_is_refused_before_any_build(tmp_path: Path) -> None:
    """The shard folder's name carries the recipe hash (and data.seed): another name is other shards, refused
    before they are built; the same name under another shards root (a moved shards_dir) is the same data."""
    path = _save(tmp_path, 4, {"stage": "main", "shard_dir": "/old/shards/tiny-aaaa", "manifest_hash": "m1"})
    check_resume_recipe(path, read_lineage(path), "main", "r.yaml", tmp_path / "moved" / "tiny-aaaa")
    with pytest.raises(CheckpointError, match=r"refusing to resume .*stage 'main' trained on shards tiny-aaaa, "
                       r"its recipe r\.yaml \(with data\.seed\) now makes tiny-bbbb"):
        check_resume_recipe(path, read_lineage(path), "main", "r.yaml", tmp_path / "tiny-bbbb")
    # another stage's shards: not comparable (check_resume_compatible names the stage mismatch)
    check_resume_recipe(path, read_lineage(path), "code", "r.yaml", tmp_path / "tiny-bbbb")
    # a checkpoint recording no shard folder: left to the manifest hash check after the build
    old = _save(tmp_path / "old", 4, {"stage": "main", "manifest_hash": "m1"})
    check_resume_recipe(old, read_lineage(old), "main", "r.yaml", tmp_path / "tiny-bbbb")


_TRAINER_STATE = {
    "step": 2, "tokens_seen": 64, "loss": 7.5, "loss_ema": 7.6, "loss_spikes": 0, "world_size": 1,
    "stage": {"index": 0, "name": "main", "step_in_stage": 2}, "loader": {}, "global_batch_size": 4, "seq_len": 8,
    "data_history": [{"stage_index": 0, "steps": 2}],
}


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: [s], "a JSON object is expected, found list"),
        (lambda s: {k: v for k, v in s.items() if k != "seq_len"}, "key 'seq_len' is missing, int expected"),
        (lambda s: {**s, "step": "two"}, "key 'step' is str 'two', int expected"),
        (lambda s: {**s, "stage": 0}, "key 'stage' is int '0', dict expected"),
        (lambda s: {**s, "stage": {"name": "main"}}, "key 'stage.index' is missing"),
        (lambda s: {**s, "data_history": [{"steps": 2}]}, r"key 'data_history\[0\].stage_index' is missing"),
    ],
)
def test_a_trainer_state_of_the_wrong_shape_is_one_error_naming_the_file_and_key(
    tmp_path: Path, edit: object, named: str
) -> None:
    """A trainer_state.json whose sha256 matches lineage.json (a foreign or hand-edited checkpoint) but that
    lacks a key a resume reads, or holds another type there, is refused naming it, not with a KeyError."""
    from types import SimpleNamespace

    from open360.backends.native import DistEnv
    from open360.train.pipeline import resume
    from open360.train.schedules import Schedule, Stage

    contents = CheckpointContents({"w": torch.zeros(1)}, {}, edit(dict(_TRAINER_STATE)), {}, "model: {}\n")
    path = save_checkpoint(tmp_path, 2, contents)
    trainer = SimpleNamespace(
        env=DistEnv(), backend="native", stages=[Stage(0, "main", "r.yaml", 0, 4, 1e-3, Schedule("constant", 4))]
    )
    with pytest.raises(CheckpointError, match=rf"step_2/trainer_state\.json: {named}"):
        resume(trainer, path)


def test_a_second_run_of_the_same_run_name_in_one_workspace_is_refused_while_the_first_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one run_name started together (a double submit, a sweep launched without a new run_name) both
    find the folder empty, so the resume check lets both train; they then replace each other's step_N folders and
    both report them as their own. The first holds the run's lock: the second stops before touching anything, the
    lock is held while the run trains and is free again when it ends (also when it fails)."""
    from open360.config import compose
    from open360.train import pipeline

    cfg = compose(["+experiment=amber_tiny", f"workspace={tmp_path}", "tracking=off"])
    inside: list[bool] = []

    def fake_run(cfg, device, env, init_from):  # the run's body: the lock is held meanwhile
        with pytest.raises(CheckpointError, match=r"run 'amber_tiny' is being trained now by pid \d+ on "):
            pipeline.lock_run(tmp_path / "recovery" / "amber_tiny", "amber_tiny")
        inside.append(True)
        return {"status": "finished"}

    monkeypatch.setattr(pipeline, "_run", fake_run)
    assert pipeline.run_training(cfg, "cpu") == {"status": "finished"} and inside == [True]
    held = pipeline.lock_run(tmp_path / "recovery" / "amber_tiny", "amber_tiny")  # free after the run
    assert held is not None
    with pytest.raises(CheckpointError, match=r"being trained now by .*another run_name"):
        pipeline.run_training(cfg, "cpu")
    assert inside == [True]  # the second run never started
    held.close()
    monkeypatch.setattr(pipeline, "_run", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_training(cfg, "cpu")
    pipeline.lock_run(tmp_path / "recovery" / "amber_tiny", "amber_tiny").close()  # released after a failure


@pytest.mark.parametrize(
    ("rng", "named"),
    [
        ({}, r"no per-rank RNG states"),
        ({"ranks": "x"}, r"no per-rank RNG states"),
        ({"ranks": [{"python": {"version": 3, "state": [1, 2], "gauss": None}}]}, r"the RNG state of rank 0 cannot be restored \(ValueError"),
        ("ranks", r"no per-rank RNG states"),
    ],
)
def test_an_rng_file_of_the_wrong_shape_is_one_error_naming_the_file(tmp_path: Path, rng: object, named: str) -> None:
    """An rng.pt whose sha256 matches lineage.json (a foreign or re-hashed copy) but whose states cannot be
    restored is refused naming the file before anything is loaded, not with a KeyError or an OverflowError;
    the RNGs are left as they were."""
    from types import SimpleNamespace

    from open360.backends.native import DistEnv
    from open360.train.pipeline import resume
    from open360.train.schedules import Schedule, Stage

    path = save_checkpoint(tmp_path, 2, CheckpointContents({"w": torch.zeros(1)}, {}, dict(_TRAINER_STATE), rng, "model: {}\n"))
    trainer = SimpleNamespace(
        env=DistEnv(), backend="native", stages=[Stage(0, "main", "r.yaml", 0, 4, 1e-3, Schedule("constant", 4))]
    )
    before = capture_rng_state()
    with pytest.raises(CheckpointError, match=rf"step_2/rng\.pt: {named}"):
        resume(trainer, path)
    after = capture_rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
