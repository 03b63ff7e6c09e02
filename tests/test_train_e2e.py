"""End to end: `python -m open360.train` on the tiny experiments, SIGKILL + resume bitwise, refused resumes."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from open360.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_from_checkpoint,
    read_lineage,
    verify_checkpoint,
)
from open360.paths import REPO_ROOT

# The CPU is shared: one intra-op thread avoids OpenMP oversubscription stalls, and every run of a
# bitwise comparison must use the same thread count anyway.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+)")


@pytest.fixture(scope="module")
def shards_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shards folder for every trainer run of the session (build_shards reuses matching builds)."""
    path = tmp_path_factory.getbasetemp() / "train_shards"
    path.mkdir(exist_ok=True)
    return path


def _cmd(experiment: str, workspace: Path, shards_root: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "open360.train",
        f"+experiment={experiment}",
        f"workspace={workspace}",
        "tracking=off",
        f"data.shards_dir={shards_root}",
        "trainer.log_every=1",
        *overrides,
    ]


def _train(
    experiment: str, workspace: Path, shards_root: Path, *overrides: str
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(experiment, workspace, shards_root, *overrides),
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc


def _losses(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in map(STEP_LINE.match, stdout.splitlines()) if m}


def _assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


def _assert_loss_drops(losses: dict[int, float], drop: float) -> None:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:5]) / 5
    last = sum(losses[s] for s in steps[-5:]) / 5
    assert last < first - drop, f"loss did not drop by {drop}: first steps {first:.3f}, last steps {last:.3f}"


@pytest.mark.slow
def test_amber_tiny_trains_with_per_chunk_checkpoints(tmp_path: Path, shards_root: Path) -> None:
    ws = tmp_path / "ws"
    proc = _train("amber_tiny", ws, shards_root, "trainer.max_steps=60")
    _assert_ok(proc)
    losses = _losses(proc.stdout)
    assert sorted(losses) == list(range(1, 61))
    _assert_loss_drops(losses, 1.0)
    assert "run summary" in proc.stdout
    shard_dir = next(shards_root.glob("embedded_tiny-*"))  # named before training, as the README's commands use it
    assert f"open360.train: stage 'main': shards {shard_dir} (3,840 sequences of 128 tokens in 8 chunks" in proc.stdout
    # embedded_tiny: 8 chunks of 480 sequences, batch 16 -> one chunk every 30 steps
    ckpts = list_checkpoints(ws / "checkpoints" / "amber_tiny")
    assert [s for s, _ in ckpts] == [30, 60]
    for step, path in ckpts:
        lineage = verify_checkpoint(path)
        assert lineage["step"] == step
        assert lineage["data"]["sequences_seen"] == {
            "count": step * 16,
            "min_id": 0,
            "max_id": step * 16 - 1,
            "contiguous": True,
            "epochs": 1,
        }
        assert len(lineage["data"]["manifest_hash"]) == 64 and len(lineage["data"]["tokenizer_hash"]) == 64
        assert lineage["code"]["revision"] and isinstance(lineage["code"]["dirty"], bool)
        assert len(lineage["config_hash"]) == 64
        state = load_checkpoint(path).trainer_state
        assert state["step"] == step and state["tokens_seen"] == step * 16 * 128
        assert state["loss"] == pytest.approx(losses[step], abs=1e-4)
    assert not (ws / "recovery").exists() or not list((ws / "recovery").rglob("step_*"))
    # a published checkpoint loads back as a model with its resolved config
    model, cfg = load_model_from_checkpoint(ckpts[-1][1])
    assert cfg.run_name == "amber_tiny" and cfg.trainer.max_steps == 60
    with torch.no_grad():
        logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, cfg.model.vocab_size)


@pytest.mark.slow
def test_phi15_tiny_trains(tmp_path: Path, shards_root: Path) -> None:
    ws = tmp_path / "ws"
    proc = _train("phi15_tiny", ws, shards_root, "trainer.max_steps=40", "checkpoint.every=20")
    _assert_ok(proc)
    _assert_loss_drops(_losses(proc.stdout), 1.0)
    assert [s for s, _ in list_checkpoints(ws / "checkpoints" / "phi15_tiny")] == [20, 40]


@pytest.mark.slow
def test_crystalcoder_tiny_three_stages(tmp_path: Path, shards_root: Path) -> None:
    ws = tmp_path / "ws"
    proc = _train(
        "crystalcoder_tiny",
        ws,
        shards_root,
        "stages.0.steps=20",
        "stages.1.steps=20",
        "stages.2.steps=20",
        "trainer.max_steps=60",
        "checkpoint.every=20",
    )
    _assert_ok(proc)
    losses = _losses(proc.stdout)
    assert sorted(losses) == list(range(1, 61))
    _assert_loss_drops(losses, 1.0)
    ckpts = dict(list_checkpoints(ws / "checkpoints" / "crystalcoder_tiny"))
    assert sorted(ckpts) == [20, 40, 60]
    stage_names = [read_lineage(ckpts[s])["data"]["stage"] for s in (20, 40, 60)]
    assert stage_names == ["stage1_text", "stage2_text_code_fim", "stage3_code"]
    history = read_lineage(ckpts[60])["data_history"]
    assert [h["steps"] for h in history] == [20, 20, 20]
    assert len({h["manifest_hash"] for h in history}) == 3  # each stage trains on its own shards
    # stage 3 starts from a fresh optimizer (fresh_optimizer, as CrystalCoder's phase 3): AdamW counts its 20 steps
    steps = {int(st["step"]) for st in load_checkpoint(ckpts[60]).optimizer["state"].values()}
    assert steps == {20} and {int(st["step"]) for st in load_checkpoint(ckpts[40]).optimizer["state"].values()} == {40}
    # a resume with an earlier stage made shorter would read stage 2 from the wrong offset: refused
    moved = _train(
        "crystalcoder_tiny", ws, shards_root, "stages.0.steps=10", "stages.1.steps=30", "stages.2.steps=20",
        "trainer.max_steps=60", "checkpoint.every=20", "trainer.resume=40",
    )
    err = moved.stderr
    assert moved.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "stage 'stage1_text' ran 20 steps, the config gives it 10 (stages.0.steps)" in err, err[-3000:]


KILL_OVERRIDES = (
    "trainer.max_steps=16",
    "model.n_layers=2",
    "checkpoint.policy=every_n",
    "checkpoint.every=8",
    "checkpoint.ephemeral_every=2",
    "checkpoint.keep_ephemeral=2",
    "trainer.resume=auto",
)


def _run_until_killed(ws: Path, shards_root: Path, kill_at_step: int | None, delay_save: bool) -> int:
    """Start a trainer; SIGKILL it once it logs `kill_at_step`, or while a checkpoint is half written."""
    env = {**ENV, "OPEN360_CHECKPOINT_SAVE_DELAY_S": "60"} if delay_save else ENV
    proc = subprocess.Popen(
        _cmd("amber_tiny", ws, shards_root, *KILL_OVERRIDES),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    last = -1
    try:
        if delay_save:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if list(ws.glob("*/amber_tiny/.tmp-step_*")):
                    time.sleep(0.5)  # well inside the save: weights written, rename not done
                    break
                time.sleep(0.05)
        else:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = STEP_LINE.match(line)
                if m and int(m.group(1)) >= kill_at_step:
                    last = int(m.group(1))
                    break
        assert proc.poll() is None, "the trainer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return last


def _published_state(ws: Path) -> dict[int, dict]:
    out = {}
    for step, path in list_checkpoints(ws / "checkpoints" / "amber_tiny"):
        c = load_checkpoint(path)
        out[step] = {"model": c.model, "optimizer": c.optimizer, "loss": c.trainer_state["loss"]}
    return out


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path: Path, shards_root: Path) -> None:
    ref_ws, ws = tmp_path / "ref", tmp_path / "killed"
    ref = _train("amber_tiny", ref_ws, shards_root, *KILL_OVERRIDES)
    _assert_ok(ref)
    reference = _published_state(ref_ws)
    assert sorted(reference) == [8, 16]

    rng = random.Random(20261125)
    first = rng.randint(1, 5)
    assert _run_until_killed(ws, shards_root, first, delay_save=False) >= first
    _run_until_killed(ws, shards_root, None, delay_save=True)  # killed in the middle of a save
    for run_dir in (ws / "checkpoints" / "amber_tiny", ws / "recovery" / "amber_tiny"):
        for _, path in list_checkpoints(run_dir):
            verify_checkpoint(path)  # whatever looks complete is complete
    done = [s for d in ("checkpoints", "recovery") for s, _ in list_checkpoints(ws / d / "amber_tiny")]
    resumed_from = max(done, default=0)  # no complete checkpoint yet: the next run starts over
    third = min(15, resumed_from + rng.randint(2, 4))
    _run_until_killed(ws, shards_root, third, delay_save=False)

    final = _train("amber_tiny", ws, shards_root, *KILL_OVERRIDES)
    _assert_ok(final)
    assert "resumed from" in final.stdout
    resumed = _published_state(ws)
    assert sorted(resumed) == [8, 16]
    for step in (8, 16):
        _assert_same(reference[step], resumed[step], f"step_{step}")
    ref_losses, final_losses = _losses(ref.stdout), _losses(final.stdout)
    assert final_losses and all(final_losses[s] == ref_losses[s] for s in final_losses)
    assert len(list_checkpoints(ws / "recovery" / "amber_tiny")) <= 2  # keep_ephemeral


def test_resume_with_other_data_or_tokenizer_is_refused(tmp_path: Path, shards_root: Path) -> None:
    ws = tmp_path / "ws"
    _assert_ok(_train("amber_tiny", ws, shards_root, "trainer.max_steps=2", "checkpoint.policy=every_n"))
    other = _train(
        "amber_tiny",
        ws,
        shards_root,
        "trainer.max_steps=4",
        "checkpoint.policy=every_n",
        "trainer.resume=auto",
        "data.recipe=data_recipes/phi15_tiny.yaml",
        f"data.shards_dir={tmp_path / 'other_shards'}",
    )
    assert other.returncode == 1, other.stderr[-3000:]
    assert "refusing to resume" in other.stderr
    assert "trained on shards embedded_tiny-" in other.stderr and "now makes phi15_tiny-" in other.stderr
    assert "Traceback" not in other.stderr
    # refused before the other recipe's shards were built (hours at LLM360 size); a build of the same recipe
    # name with other contents is refused by its manifest hash (tests/test_train_state.py)
    assert not list((tmp_path / "other_shards").glob("phi15_tiny-*"))


def test_init_from_checkpoint_starts_from_its_weights(tmp_path: Path, shards_root: Path) -> None:
    from open360.config import compose
    from open360.train.pipeline import run_training

    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1"]
    ws = tmp_path / "ws"
    run_training(
        compose([*base, f"workspace={ws}", "trainer.max_steps=2", "checkpoint.policy=every_n"]), "cpu"
    )
    init = ws / "checkpoints" / "amber_tiny" / "step_2"
    cfg = compose(
        [*base, f"workspace={ws}", "run_name=ft", "trainer.max_steps=1", "optim.lr=0", "trainer.resume=auto"]
    )
    summary = run_training(cfg, "cpu", init_from=init)
    assert summary["steps"] == 1
    lineage = read_lineage(ws / "checkpoints" / "ft" / "step_1")
    assert lineage["init_from"]["step"] == 2 and lineage["init_from"]["checkpoint"] == str(init)
    before, after = load_checkpoint(init).model, load_checkpoint(ws / "checkpoints" / "ft" / "step_1").model
    for name in before:  # lr 0: one step leaves the initial weights as they were
        assert torch.equal(before[name], after[name]), name
    # resuming the warm-started run keeps its warm start on record, without trainer.init_from and even with
    # the base folder gone; an init_from naming other weights is refused
    from open360.train.trainer import TrainingError

    moved = init.rename(tmp_path / "base_step_2")
    run_training(compose([*base, f"workspace={ws}", "run_name=ft", "trainer.max_steps=2", "trainer.resume=auto"]), "cpu")
    resumed = read_lineage(ws / "checkpoints" / "ft" / "step_2")
    assert resumed["init_from"] == lineage["init_from"]
    assert resumed["init_from"]["data_history"]  # what the base weights saw, which memorization's `seen` reads
    again = compose([*base, f"workspace={ws}", "run_name=ft", "trainer.max_steps=3", "trainer.resume=auto"])
    run_training(again, "cpu", init_from=init)  # the recorded path: accepted though it is gone
    assert read_lineage(ws / "checkpoints" / "ft" / "step_3")["init_from"] == lineage["init_from"]
    further = compose([*base, f"workspace={ws}", "run_name=ft", "trainer.max_steps=4", "trainer.resume=auto"])
    with pytest.raises(TrainingError, match=r"started from .*step_2 \(step 2\); resume it without trainer.init_from"):
        run_training(further, "cpu", init_from=ws / "checkpoints" / "ft" / "step_3")  # trained on: other weights
    run_training(further, "cpu", init_from=moved)  # the same weights elsewhere (same sha256): accepted


def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path: Path, shards_root: Path) -> None:
    from open360.checkpoint import CheckpointError
    from open360.config import compose
    from open360.train.pipeline import run_training

    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1"]
    ws = tmp_path / "ws"
    run_training(compose([*base, f"workspace={ws}", "trainer.max_steps=2", "checkpoint.policy=every_n"]), "cpu")
    init = ws / "checkpoints" / "amber_tiny" / "step_2"
    wider = compose([*base, f"workspace={ws}", "run_name=ft", "trainer.max_steps=1", "model.n_layers=2"])
    with pytest.raises(CheckpointError, match=r"another architecture .*'model.n_layers': \(1, 2\).*init_from"):
        run_training(wider, "cpu", init_from=init)
    resumed = compose([*base, f"workspace={ws}", "trainer.max_steps=4", "model.d_model=96", "trainer.resume=auto"])
    with pytest.raises(CheckpointError, match=r"'model.d_model': \(\d+, 96\).*trainer.resume"):
        run_training(resumed, "cpu")
    from open360.train.trainer import TrainingError

    shorter = compose([*base, f"workspace={ws}", "trainer.max_steps=1", "trainer.resume=2"])
    with pytest.raises(TrainingError, match="checkpoint of step 2, beyond the 1 steps this config trains"):
        run_training(shorter, "cpu")
    bad = _train("amber_tiny", ws, shards_root, "run_name=other", "trainer.max_steps=2", "schedule.kind=foo")
    assert bad.returncode == 2 and "schedule.kind='foo'" in bad.stderr and "Traceback" not in bad.stderr
    zero = _train("amber_tiny", ws, shards_root, "run_name=other", "trainer.max_steps=2", "trainer.micro_batch_size=0")
    assert zero.returncode == 2 and "trainer.micro_batch_size=0: must be >= 1" in zero.stderr
    assert "Traceback" not in zero.stderr


def test_resuming_an_earlier_step_branches_and_auto_follows_the_branch(
    tmp_path: Path, shards_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from open360.config import compose
    from open360.train.pipeline import run_training

    ws = tmp_path / "ws"
    base = [
        "+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
        f"workspace={ws}", "checkpoint=every_n", "checkpoint.every=2", "checkpoint.ephemeral_every=3",
    ]
    run_training(compose([*base, "trainer.max_steps=8"]), "cpu")
    published, recovery = ws / "checkpoints" / "amber_tiny", ws / "recovery" / "amber_tiny"
    assert [s for s, _ in list_checkpoints(published)] == [2, 4, 6, 8]
    assert [s for s, _ in list_checkpoints(recovery)] == [3]  # (6 is a published step)
    # Back to step 2 with another learning rate (what the divergence message advises), stopped at step 5.
    branch = compose([*base, "trainer.max_steps=5", "optim.lr=1e-4", "trainer.resume=2", "checkpoint.save_final=false"])
    capsys.readouterr()
    run_training(branch, "cpu")
    err = capsys.readouterr().err
    assert "warning: at step 3 the learning rate is" in err and "under this config" in err, err
    assert [s for s, _ in list_checkpoints(published)] == [2, 4]  # the new step 4; the old 4..8 kept aside
    assert [s for s, _ in list_checkpoints(recovery)] == [3]  # the branch's own recovery point
    aside = sorted(p.name for p in (published / "superseded").glob("from_step_2-*/step_*"))
    assert aside == ["step_4", "step_6", "step_8"]
    assert [p.name for p in (recovery / "superseded").glob("from_step_2-*/step_*")] == ["step_3"]
    resumed_from = json.loads((published / "step_4" / "lineage.json").read_text())["resumed_from"]
    assert (resumed_from["run_name"], resumed_from["step"]) == ("amber_tiny", 2) and len(resumed_from["model_sha256"]) == 64
    summary = run_training(compose([*base, "trainer.max_steps=6", "optim.lr=1e-4", "trainer.resume=auto"]), "cpu")
    assert summary["start_step"] == 4 and summary["steps"] == 6  # the branch's step 4, not the superseded 8
    replaced = next(published.glob("superseded/from_step_2-*/step_6"))  # its history is not this folder's
    with pytest.raises(CheckpointError, match=r"from outside .*continue it under another run_name"):
        run_training(compose([*base, "trainer.max_steps=8", f"trainer.resume={replaced}"]), "cpu")
    revived = run_training(compose([*base, "trainer.max_steps=7", f"trainer.resume={replaced}", "run_name=revived"]), "cpu")
    assert revived["start_step"] == 6 and [s for s, _ in list_checkpoints(ws / "checkpoints" / "revived")] == [7]


def test_sigterm_ends_the_mlflow_run_as_killed_with_its_metrics(tmp_path: Path, shards_root: Path) -> None:
    """What a scheduler sends on preemption: the run stops like Ctrl-C (exit 143, one line), MLflow gets
    the buffered metrics and status KILLED, and resume=auto continues from the saved checkpoint."""
    from open360.tracking import mlflow_records as mr

    ws = tmp_path / "ws"
    cmd = [
        *[c for c in _cmd("amber_tiny", ws, shards_root) if c != "tracking=off"],
        "tracking.dvc=false", "tracking.dvc_push=false", "tracking.system_metrics=false", "model.n_layers=1",
        "trainer.max_steps=400", "checkpoint=every_n", "checkpoint.every=2", "trainer.progress_bar=false",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = STEP_LINE.match(line)
            if m and int(m.group(1)) >= 5:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "stopped (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    client = mr.client(mr.workspace_uri(ws))
    run_id = mr.find_run_id(client, "amber_tiny")
    assert client.get_run(run_id).info.status == "KILLED"
    logged = sorted(mr.metric_history(client, run_id)["loss"])
    saved = max(s for s, _ in list_checkpoints(ws / "checkpoints" / "amber_tiny"))
    assert logged[0] == 1 and logged == list(range(1, len(logged) + 1)) and len(logged) >= saved >= 4


def test_a_workspace_without_dvc_is_one_line(tmp_path: Path, shards_root: Path) -> None:
    """tracking=local versions shards and checkpoints with DVC: in a folder that is no DVC repository the
    run stops with one line saying so, not a traceback."""
    cmd = [c if c != "tracking=off" else "tracking=local" for c in _cmd("amber_tiny", tmp_path, shards_root)]
    proc = subprocess.run([*cmd, "trainer.max_steps=1"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not a DVC repository" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EACCES"])
def test_a_full_disk_while_the_shards_are_built_is_one_line_naming_the_file(tmp_path: Path, code: str) -> None:
    """The main job on a disk that fills up (or a quota that runs out) while it writes its first shard: one line
    naming that file, not pyarrow's traceback that names none, and no half-written shard left. Another OSError is
    not called a full disk."""
    fill_up = (
        "import errno, runpy, sys\n"
        "import pyarrow.parquet as pq\n"
        "class DiskFull(pq.ParquetWriter):\n"
        "    def write_table(self, *args, **kwargs):\n"
        f"        raise OSError(errno.{code}, 'Error writing bytes to file')\n"
        "pq.ParquetWriter = DiskFull\n"
        "sys.argv[0] = 'open360.train'\n"
        "runpy.run_module('open360.train', run_name='__main__')\n"
    )
    cmd = _cmd("amber_tiny", tmp_path, tmp_path / "shards", "data.build_workers=1")
    proc = subprocess.run([sys.executable, "-c", fill_up, *cmd[3:]], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    (shard_dir,) = (tmp_path / "shards").glob("embedded_tiny-*")
    named = f"[Errno {getattr(errno, code)}] {shard_dir / 'train_00000.parquet'}: could not be written"
    assert proc.returncode == 1 and named in proc.stderr, proc.stderr[-3000:]
    assert ("no space left on the device" in proc.stderr) == (code != "EACCES"), proc.stderr[-3000:]
    assert ("Traceback" in proc.stderr) == (code == "EACCES"), proc.stderr[-3000:]
    assert list(shard_dir.iterdir()) == []


def test_a_branch_journal_left_by_a_crash_is_finished_before_a_run_without_dvc(tmp_path: Path, shards_root: Path) -> None:
    """A crash right after journaling a branch from step 2: the next run (tracking off) first moves the
    replaced checkpoints aside, then resumes from step 2, not from the replaced step 6."""
    from open360.checkpoint.branches import write_pending_branch
    from open360.config import compose
    from open360.train.pipeline import run_training

    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
            f"workspace={tmp_path}", "checkpoint.policy=every_n", "checkpoint.every=2"]
    run_training(compose([*base, "trainer.max_steps=6"]), "cpu")
    run_dir = tmp_path / "checkpoints" / "amber_tiny"
    write_pending_branch(tmp_path / "recovery" / "amber_tiny", 2, "from_step_2-crash")
    run_training(compose([*base, "trainer.max_steps=8", "trainer.resume=auto"]), "cpu")
    assert sorted(p.name for p in (run_dir / "superseded" / "from_step_2-crash").iterdir()) == ["step_4", "step_6"]
    assert read_lineage(run_dir / "step_8")["resumed_from"]["step"] == 2


@pytest.mark.parametrize("pulled", [(2, 4, 6), (2,)], ids=["all-on-disk", "clone-with-step-2"])
def test_a_branch_with_tracking_off_moves_the_replaced_records_of_a_dvc_workspace(
    tmp_path: Path, shards_root: Path, pulled: tuple[int, ...]
) -> None:
    """tracking=off in a workspace whose checkpoints.dvc records the run (versioned by an earlier run): a branch
    from step 2 moves the later records with their folders, else they stay listed as the run's checkpoints and
    `ckpt pull` brings a replaced one back; also in a clone that pulled step 2 only (no later folder on disk)."""
    import shutil

    from open360.config import compose
    from open360.tracking.checkpoints import run_checkpoints, superseded_steps
    from open360.tracking.dvc_versioning import DvcWorkspace
    from open360.tracking.workspace import init_workspace
    from open360.train.pipeline import run_training

    ws = init_workspace(tmp_path / "ws")
    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
            f"workspace={ws}", "checkpoint.policy=every_n", "checkpoint.every=2"]
    run_training(compose([*base, "trainer.max_steps=6"]), "cpu")
    run_dir = ws / "checkpoints" / "amber_tiny"
    for step in (2, 4, 6):
        DvcWorkspace(ws).add(run_dir / f"step_{step}")
    for step in {2, 4, 6} - set(pulled):  # recorded, not pulled
        shutil.rmtree(run_dir / f"step_{step}")
    run_training(compose([*base, "trainer.max_steps=3", "trainer.resume=2", "checkpoint.save_final=false"]), "cpu")
    assert [e.step for e in run_checkpoints(ws, "amber_tiny")] == [2]
    assert superseded_steps(ws, "amber_tiny") == {4, 6}
    if len(pulled) == 3:  # the replaced folders moved with their records
        aside = DvcWorkspace(ws).tracked_children(next((run_dir / "superseded").iterdir()))
        assert sorted(aside) == ["step_4", "step_6"]


def test_two_branches_from_one_step_within_one_second_keep_apart(
    tmp_path: Path, shards_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two resumes from step 2 in the same second (the folder name's resolution): the second branch moves the
    first one's step 4 into a folder of its own, not onto the first branch's replaced step 4, where the move
    failed and, its journal left, failed again at every later start of the run."""
    from open360.config import compose
    from open360.train.pipeline import run_training

    frozen = time.gmtime()
    monkeypatch.setattr("open360.checkpoint.branches.time.gmtime", lambda *args: frozen)
    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
            f"workspace={tmp_path}", "checkpoint.policy=every_n", "checkpoint.every=2"]
    run_training(compose([*base, "trainer.max_steps=6"]), "cpu")
    run_training(compose([*base, "trainer.max_steps=4", "trainer.resume=2"]), "cpu")
    run_training(compose([*base, "trainer.max_steps=4", "trainer.resume=2"]), "cpu")
    run_dir = tmp_path / "checkpoints" / "amber_tiny"
    aside = {p.name: sorted(s.name for s in p.iterdir()) for p in (run_dir / "superseded").iterdir()}
    first = f"from_step_2-{time.strftime('%Y%m%dT%H%M%SZ', frozen)}"
    assert aside == {first: ["step_4", "step_6"], f"{first}-2": ["step_4"]}
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]


def test_a_branch_cut_short_without_dvc_is_finished_before_resume_auto(
    tmp_path: Path, shards_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the branch moved the published checkpoints aside but before the recovery ones (tracking
    off): the next resume=auto finishes the move and follows the branch, not the replaced recovery step 5."""
    import open360.train.pipeline as pipeline
    from open360.checkpoint.branches import supersede_later_checkpoints
    from open360.config import compose

    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
            f"workspace={tmp_path}", "checkpoint.policy=every_n", "checkpoint.every=2",
            "checkpoint.ephemeral_every=1", "trainer.max_steps=6"]
    pipeline.run_training(compose(base), "cpu")
    published, recovery = tmp_path / "checkpoints" / "amber_tiny", tmp_path / "recovery" / "amber_tiny"
    assert [s for s, _ in list_checkpoints(recovery)] == [5]

    def killed(step: int, pub: Path, rec: Path, folder: str) -> dict:
        supersede_later_checkpoints(step, pub, tmp_path / "elsewhere", folder)  # the published ones only
        raise KeyboardInterrupt

    monkeypatch.setattr("open360.checkpoint.branches.supersede_later_checkpoints", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_training(compose([*base, "trainer.resume=2"]), "cpu")
    monkeypatch.undo()
    summary = pipeline.run_training(compose([*base, "trainer.resume=auto"]), "cpu")
    assert summary["start_step"] == 2 and read_lineage(published / "step_6")["resumed_from"]["step"] == 2
    assert [p.name for p in (recovery / "superseded").glob("from_step_2-*/step_*")] == ["step_5"]


def test_a_branch_cut_short_is_still_a_branch_when_started_again(
    tmp_path: Path, shards_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after a resume from step 2 moved the later checkpoints aside but before the tracking started the
    branch (or while they moved: its journal left): the run started again from step 2 is still that branch, so
    MLflow starts the branch's own run instead of continuing the replaced one, whose history after step 2
    would silently take this branch's values."""
    import open360.train.pipeline as pipeline
    from open360.checkpoint.branches import pending_branches, write_pending_branch
    from open360.config import compose
    from open360.train.callbacks import Callback, RunInfo

    class Killed(Exception):
        pass

    class Tracker(Callback):
        kill = False
        branches: list = []

        def on_run_start(self, info: RunInfo) -> None:
            self.branches.append(info.extra["branch"])
            if self.kill:
                raise Killed

    tracker = Tracker()
    monkeypatch.setattr(pipeline, "_build_callbacks", lambda cfg, workspace, env: [tracker])
    base = ["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
            f"workspace={tmp_path}", "checkpoint.policy=every_n", "checkpoint.every=2", "trainer.max_steps=6"]
    recovery = tmp_path / "recovery" / "amber_tiny"
    pipeline.run_training(compose(base), "cpu")
    tracker.kill = True
    with pytest.raises(Killed):  # the checkpoints after step 2 are moved aside, the branch's run not started
        pipeline.run_training(compose([*base, "trainer.resume=2"]), "cpu")
    made = tracker.branches[-1]
    assert made["from_step"] == 2 and len(pending_branches(recovery)) == 1
    tracker.kill = False
    pipeline.run_training(compose([*base, "trainer.resume=2", "trainer.max_steps=4"]), "cpu")
    assert tracker.branches[-1] == made and not pending_branches(recovery)

    write_pending_branch(recovery, 2, "from_step_2-crash")  # killed while a second branch from step 2 moved
    pipeline.run_training(compose([*base, "trainer.resume=auto"]), "cpu")
    assert tracker.branches[-1] == {"from_step": 2, "superseded": "from_step_2-crash"}
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "amber_tiny" / "superseded" / "from_step_2-crash").iterdir()) == ["step_4"]


def test_a_callback_that_fails_to_start_ends_the_ones_started_before_it(
    tmp_path: Path, shards_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """build_callbacks starts the DVC versioner (its catch-up in a worker process) before the MLflow logger:
    when a later start fails, the earlier ones end the run as failed (their workers drained and stopped)
    instead of being killed at exit; the failing one ends as far as it got; the start's error is raised."""
    import open360.train.pipeline as pipeline
    from open360.config import compose
    from open360.train.callbacks import Callback, RunInfo

    ended: list[tuple[str, dict]] = []

    class Started(Callback):
        def on_run_end(self, summary: dict) -> None:
            ended.append(("started", summary))

    class Fails(Callback):
        def on_run_start(self, info: RunInfo) -> None:
            raise RuntimeError("tracking store refused the run")

        def on_run_end(self, summary: dict) -> None:
            raise AttributeError("never started")

    class Later(Callback):
        def on_run_end(self, summary: dict) -> None:
            ended.append(("later", summary))

    monkeypatch.setattr(pipeline, "_build_callbacks", lambda cfg, workspace, env: [Started(), Fails(), Later()])
    cfg = compose(["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", "model.n_layers=1",
                   f"workspace={tmp_path}", "trainer.max_steps=2"])
    with pytest.raises(RuntimeError, match="tracking store refused the run"):
        pipeline.run_training(cfg, "cpu")
    assert [(who, s["status"]) for who, s in ended] == [("started", "failed")]
    assert "tracking store refused the run" in ended[0][1]["error"]
    assert "Fails could not end the run after that: AttributeError: never started" in capsys.readouterr().err


def test_a_missing_init_from_is_named_at_a_fresh_start_under_resume_auto(tmp_path: Path, shards_root: Path) -> None:
    """resume=auto with nothing to resume is a fresh start: the warm start's folder must exist, and the
    error comes before any model is built (validate.py skips the check for resumes, which need not it)."""
    from open360.config import compose
    from open360.train.pipeline import run_training

    missing = tmp_path / "nowhere" / "step_4"
    cfg = compose(["+experiment=amber_tiny", "tracking=off", f"data.shards_dir={shards_root}", f"workspace={tmp_path}",
                   "trainer.resume=auto", f"trainer.init_from={missing}"])
    with pytest.raises(ValueError, match=r"nowhere/step_4: not a checkpoint folder \(no lineage.json\)"):
        run_training(cfg, "cpu", init_from=missing)
