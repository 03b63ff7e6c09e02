"""DVC versioning: granular add/push/pull of checkpoint folders, hardlinked cache, faults and retries."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from open360.checkpoint import CheckpointContents, save_checkpoint, verify_checkpoint
from open360.tracking import build_callbacks, pull_checkpoint
from open360.tracking.checkpoints import pull_checkpoints, run_checkpoints
from open360.tracking.dvc_callback import DvcVersioner
from open360.tracking.dvc_versioning import DvcWorkspace, VersioningError, push_pending
from open360.tracking.workspace import init_workspace
from open360.train.callbacks import RunInfo


def write_checkpoint(ws: Path, run: str, step: int, size: int = 4096) -> Path:
    """A real checkpoint folder (open360.checkpoint format) with random weights of `size` floats."""
    gen = torch.Generator().manual_seed(step)
    contents = CheckpointContents(
        model={"w": torch.randn(size, generator=gen)},
        optimizer={"state": {}, "param_groups": []},
        trainer_state={"step": step, "tokens_seen": step * 2048, "loss": 10.0 / (step + 1)},
        rng={"seed": step},
        config_yaml=f"run_name: {run}\n",
        lineage={"run_name": run},
    )
    return save_checkpoint(ws / "checkpoints" / run, step, contents)


@pytest.fixture()
def ws(tmp_path: Path) -> Path:
    return init_workspace(tmp_path / "ws")


def clone(ws: Path, dest: Path) -> Path:
    """A fresh git clone of the workspace (empty DVC cache) pointed at the same remote."""
    subprocess.run(["git", "clone", "-q", str(ws), str(dest)], check=True)
    subprocess.run(["git", "-C", str(ws), "config", "user.email", "t@t"], check=True)
    from dvc.repo import Repo

    with Repo(str(dest)) as repo, repo.config.edit("local") as conf:
        conf["remote"]["local"] = {"url": str(ws / ".dvc-storage")}
    return dest


def commit(ws: Path) -> None:
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "checkpoints"], check=True)


def test_granular_add_hardlinks_and_clone_pulls_exactly_one(ws: Path, tmp_path: Path) -> None:
    store = DvcWorkspace(ws)
    paths = [write_checkpoint(ws, "r", s) for s in (1, 2, 3)]
    md5s = [store.add(p) for p in paths]
    assert len(set(md5s)) == 3 and all(m.endswith(".dir") for m in md5s)
    # hardlink-first caching: the cache holds the same inode, nothing was copied
    weights = paths[1] / "model.safetensors"
    assert os.stat(weights).st_nlink == 2
    tracked = store.tracked_children(ws / "checkpoints" / "r")
    assert sorted(tracked) == ["step_1", "step_2", "step_3"]
    assert tracked["step_2"].md5 == md5s[1]
    assert store.push(paths) > 0
    assert store.missing_on_remote(list(tracked.values())) == {d.path: 0 for d in tracked.values()}
    commit(ws)

    fresh = clone(ws, tmp_path / "clone")
    assert not (fresh / ".dvc" / "cache").exists()
    got = pull_checkpoint(fresh, "r", 2)
    assert got == fresh / "checkpoints" / "r" / "step_2"
    verify_checkpoint(got)
    assert sorted(p.name for p in (fresh / "checkpoints" / "r").iterdir()) == ["step_2"]
    assert (got / "model.safetensors").read_bytes() == weights.read_bytes()
    # only step_2's files came over (a checkpoint of a 7B run is ~80 GB: its siblings must stay on the remote)
    fetched = {p for p in (fresh / ".dvc" / "cache").rglob("*") if p.is_file() and not p.name.endswith(".dir")}
    assert fetched == set(DvcWorkspace(fresh).cache_files(got)), sorted(fetched)
    # the inventory of the clone still knows every step from checkpoints.dvc
    entries = run_checkpoints(fresh, "r")
    assert [(e.step, e.local) for e in entries] == [(1, False), (2, True), (3, False)]
    assert pull_checkpoint(fresh, "r", "~3") == fresh / "checkpoints" / "r" / "step_3"
    assert sorted(p.name for p in (fresh / "checkpoints" / "r").iterdir()) == ["step_2", "step_3"]


def test_callback_adds_and_pushes_in_background(ws: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"run_name": "r", "tracking": {"mlflow": False, "dvc": True, "dvc_push": True, "dvc_remote": None}}
    )
    (versioner,) = build_callbacks(cfg, ws, is_main=True)
    assert build_callbacks(cfg, ws, is_main=False) == []
    assert isinstance(versioner, DvcVersioner)
    versioner.on_run_start(RunInfo("r", ws, ws / "checkpoints" / "r", {}, "", 0))
    for step in (5, 10):
        versioner.on_checkpoint_saved(step, write_checkpoint(ws, "r", step), published=True)
    versioner.on_checkpoint_saved(12, ws / "recovery" / "r" / "step_12", published=False)
    versioner.on_run_end({"status": "finished"})
    assert versioner.errors == []
    assert sorted(versioner.records) == [5, 10]
    assert versioner.records[10]["pushed"] is True
    assert versioner.records[10]["path"] == "checkpoints/r/step_10"
    store = DvcWorkspace(ws)
    assert store.tracked(ws / "checkpoints" / "r" / "step_10").md5 == versioner.records[10]["dvc_md5"]


def test_no_remote_then_retry_completes(ws: Path, tmp_path: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(ws)) as repo, repo.config.edit() as conf:
        del conf["remote"]["local"]
        del conf["core"]["remote"]
    versioner = DvcVersioner(ws)
    versioner.on_run_start(RunInfo("r", ws, ws / "checkpoints" / "r", {}, "", 0))
    path = write_checkpoint(ws, "r", 1)
    versioner.on_checkpoint_saved(1, path, published=True)
    versioner.on_run_end({"status": "finished"})
    (error,) = versioner.errors
    assert "no DVC remote is configured" in error and "dvc remote add" in error
    verify_checkpoint(path)  # the local checkpoint is intact
    assert versioner.records[1]["pushed"] is False
    with Repo(str(ws)) as repo, repo.config.edit() as conf:
        conf["remote"]["local"] = {"url": str(tmp_path / "remote")}
        conf["core"]["remote"] = "local"
    assert push_pending(DvcWorkspace(ws), ws / "checkpoints" / "r") == []  # already added, only pushed
    tracked = DvcWorkspace(ws).tracked(path)
    assert DvcWorkspace(ws).missing_on_remote([tracked]) == {tracked.path: 0}


def test_unreachable_remote_and_disk_full_keep_checkpoint(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo
    from dvc_objects.fs.local import LocalFileSystem

    path = write_checkpoint(ws, "r", 1)
    with Repo(str(ws)) as repo, repo.config.edit() as conf:
        conf["remote"]["down"] = {"url": "http://127.0.0.1:9/store"}
    with pytest.raises(
        VersioningError, match=r"failed to upload.*remote 'down' \(http://127.0.0.1:9/store\)"
    ):
        store = DvcWorkspace(ws, remote="down")
        store.add(path)
        store.push([path])
    verify_checkpoint(path)

    def disk_full(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalFileSystem, "put_file", disk_full)
    with pytest.raises(VersioningError, match="No space left on device"):
        DvcWorkspace(ws).push([path])
    monkeypatch.undo()
    verify_checkpoint(path)
    assert DvcWorkspace(ws).push([path]) > 0  # the retry completes


def test_hand_edited_dvc_file_gives_clear_error(ws: Path) -> None:
    store = DvcWorkspace(ws)
    store.add(write_checkpoint(ws, "r", 1))
    dvc_file = ws / "checkpoints.dvc"
    good = dvc_file.read_text()
    dvc_file.write_text(good.replace(good.split("md5: ")[1][:32], "0" * 32))
    path = write_checkpoint(ws, "r", 2)
    with pytest.raises(VersioningError, match=r"checkpoints.*neither .*cache nor the remote.*git checkout"):
        store.add(path)
    dvc_file.write_text("outs: [unclosed\n")
    with pytest.raises(VersioningError, match=r"checkpoints.dvc.*git checkout"):
        store.add(path)
    verify_checkpoint(path)
    dvc_file.write_text(good)
    assert store.add(path).endswith(".dir")


@pytest.mark.parametrize("forged", ["relpath", "md5"])
def test_a_forged_tree_entry_cannot_reach_outside_the_workspace_on_pull(ws: Path, tmp_path: Path, forged: str) -> None:
    """A published workspace whose checkpoints.dvc tree holds an entry named `r/step_1/../../../../x` (DVC's
    checkout writes x beside the clone) or with the md5 `../../<file>` (joined to the cache: `pull --force`
    deletes that file, its md5 not being the one recorded) must be refused before anything is touched."""
    import hashlib
    import json

    store = DvcWorkspace(ws)
    path = write_checkpoint(ws, "r", 1)
    store.add(path)
    store.push([path])
    storage = ws / ".dvc-storage" / "files" / "md5"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    payload = b"echo pwned\n"
    oid = hashlib.md5(payload).hexdigest()
    (storage / oid[:2]).mkdir(parents=True, exist_ok=True)
    (storage / oid[:2] / oid[2:]).write_bytes(payload)
    dvc_file = ws / "checkpoints.dvc"
    text = dvc_file.read_text()
    old = text.split("md5: ")[1][:32]
    entries = json.loads((storage / old[:2] / f"{old[2:]}.dir").read_text())
    entries.append({"md5": oid, "relpath": "r/step_1/../../../../ESCAPED.sh"} if forged == "relpath" else
                   {"md5": ".." + "/.." * 40 + str(victim), "relpath": "r/step_1/extra.bin"})
    raw = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()
    new = hashlib.md5(raw).hexdigest()
    (storage / new[:2]).mkdir(parents=True, exist_ok=True)
    (storage / new[:2] / f"{new[2:]}.dir").write_bytes(raw)
    dvc_file.write_text(text.replace(old, new))
    commit(ws)
    fresh = clone(ws, tmp_path / "clone")
    with pytest.raises(VersioningError, match=r"checkpoints.dvc: records the entry 'r/step_1/.*forged"):
        pull_checkpoints(fresh, "r", "1", force=True)
    assert victim.read_text() == "precious" and not (tmp_path / "ESCAPED.sh").exists()
    assert not (fresh / "checkpoints" / "r" / "step_1").exists()
    dvc_file.write_text(text.replace(old, ".." + "/.." * 40 + str(victim)[:-4]))  # the tree's own md5 too
    commit(ws)
    with pytest.raises(VersioningError, match=r"checkpoints.dvc: names tree '\.\./.*not <32 hex digits>\.dir"):
        pull_checkpoints(clone(ws, tmp_path / "clone2"), "r", "1")


def test_concurrent_runs_in_one_workspace(ws: Path) -> None:
    paths = {run: write_checkpoint(ws, run, 1) for run in ("a", "b")}
    script = (
        "import sys; from pathlib import Path; from open360.tracking.dvc_versioning import DvcWorkspace; "
        "s = DvcWorkspace(Path(sys.argv[1])); p = Path(sys.argv[2]); s.add(p); s.push([p])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(ws), str(p)]) for p in paths.values()]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = DvcWorkspace(ws)
    for run, path in paths.items():
        assert store.tracked(path).path == f"checkpoints/{run}/step_1"


def test_resumed_run_catches_up_unversioned_checkpoints(ws: Path) -> None:
    early = [write_checkpoint(ws, "r", s) for s in (1, 2)]  # saved by a run that died before versioning
    later = write_checkpoint(ws, "r", 3)  # newer than the resume point: not the catch-up's business
    DvcWorkspace(ws).add(early[0])  # versioned by the killed run, but its record never reached MLflow
    versioner = DvcVersioner(ws)
    versioner.on_run_start(RunInfo("r", ws, ws / "checkpoints" / "r", {}, "", start_step=2))
    versioner.on_run_end({"status": "finished"})
    assert versioner.errors == []
    store = DvcWorkspace(ws)
    tracked = store.tracked_children(ws / "checkpoints" / "r")
    assert sorted(tracked) == ["step_1", "step_2"]
    assert store.missing_on_remote(list(tracked.values())) == {d.path: 0 for d in tracked.values()}
    assert later.is_dir() and all(p.is_dir() for p in early)
    # their records reach the listeners (the MLflow run's checkpoint tags), as a live run's would; also the
    # record of step 1, which the killed run had added already
    assert sorted(versioner.records) == [1, 2]
    assert versioner.records[2]["dvc_md5"] == tracked["step_2"].md5 and versioner.records[2]["pushed"]


def test_a_dead_worker_process_is_replaced_and_catches_up(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """The DVC worker process killed mid-run (OOM killer, SIGKILL): the next checkpoint starts a new one, which
    versions what checkpoints.dvc lacks; training never sees an exception."""
    import signal

    versioner = DvcVersioner(ws)
    versioner.on_run_start(RunInfo("r", ws, ws / "checkpoints" / "r", {}, "", 0))
    versioner.on_checkpoint_saved(1, write_checkpoint(ws, "r", 1), published=True)
    assert versioner.wait(120)
    dead = versioner._worker._process
    os.kill(dead.pid, signal.SIGKILL)
    dead.join(30)
    versioner.on_checkpoint_saved(2, write_checkpoint(ws, "r", 2), published=True)  # raised before
    versioner.on_run_end({"status": "finished"})
    assert versioner.errors == []
    assert sorted(versioner.records) == [1, 2] and versioner.records[2]["pushed"] is True
    tracked = DvcWorkspace(ws).tracked_children(ws / "checkpoints" / "r")
    assert sorted(tracked) == ["step_1", "step_2"]
    assert DvcWorkspace(ws).missing_on_remote(list(tracked.values())) == {d.path: 0 for d in tracked.values()}
    assert "caught up: steps [2] added to checkpoints.dvc" in capsys.readouterr().err


def test_a_branch_moves_the_replaced_checkpoints_records_with_their_folders(ws: Path, tmp_path: Path) -> None:
    from open360.checkpoint.branches import supersede_later_checkpoints, write_pending_branch
    from open360.tracking.checkpoints import finish_pending_branches, superseded_steps

    run_dir = ws / "checkpoints" / "r"
    versioner = DvcVersioner(ws)
    versioner.on_run_start(RunInfo("r", ws, run_dir, {}, "", 0))
    old = {s: write_checkpoint(ws, "r", s) for s in (1, 2, 3, 4)}
    for step, path in old.items():
        versioner.on_checkpoint_saved(step, path, published=True)
    versioner.on_run_end({"status": "finished"})
    old_bytes = {s: (p / "model.safetensors").read_bytes() for s, p in old.items()}
    store = DvcWorkspace(ws)
    old_md5 = {s: store.tracked(p).md5 for s, p in old.items()}
    commit(ws)
    subprocess.run(["git", "-C", str(ws), "add", "-A"], check=True)

    # Resume at step 2 (trainer.resume=2): the branch is journaled, the later folders move aside, and so do
    # their records, also of a step recorded in checkpoints.dvc but not on this disk (as in a partial clone).
    # Killed halfway (the folders moved, not the records), the next look at the run finishes it.
    shutil.rmtree(old[4])
    folder = "from_step_2-20261126T000000Z"
    write_pending_branch(ws / "recovery" / "r", 2, folder)
    assert sorted(supersede_later_checkpoints(2, run_dir, ws / "recovery" / "r", folder)) == [3]
    assert sorted(store.tracked_children(run_dir)) == ["step_1", "step_2", "step_3", "step_4"]  # the kill
    assert [e.step for e in run_checkpoints(ws, "r")] == [1, 2]  # listing the run finishes the branch
    assert not list((ws / "recovery" / "r").glob(".branch-pending-*")) and finish_pending_branches(ws, "r") == {}
    branch = DvcVersioner(ws)
    branch.on_run_start(RunInfo("r", ws, run_dir, {}, "", 2, extra={"branch": {"from_step": 2, "superseded": folder}}))
    new3 = write_checkpoint(ws, "r", 3, size=2048)  # the branch's own step 3
    branch.on_checkpoint_saved(3, new3, published=True)
    branch.on_run_end({"status": "finished"})
    assert branch.errors == []
    tracked = store.tracked_children(run_dir)
    assert sorted(tracked) == ["step_1", "step_2", "step_3", "superseded"]
    assert tracked["step_3"].md5 == store.tracked(new3).md5 != old_md5[3]
    aside = run_dir / "superseded" / folder
    assert {n: d.md5 for n, d in store.tracked_children(aside).items()} == {"step_3": old_md5[3], "step_4": old_md5[4]}
    assert not (aside / "step_4").exists() and superseded_steps(ws, "r") == {3, 4}  # 4: in checkpoints.dvc alone
    store.pull([aside / "step_4"])  # the step that was not on disk comes back at its new place
    assert (aside / "step_4" / "model.safetensors").read_bytes() == old_bytes[4]
    status = subprocess.run(["dvc", "status"], cwd=ws, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # the disk and checkpoints.dvc agree
    assert [e.step for e in run_checkpoints(ws, "r")] == [1, 2, 3]  # analysis sees the branch only
    commit(ws)

    fresh = clone(ws, tmp_path / "clone")  # the records and every file reach a fresh clone
    assert [(e.step, e.local) for e in run_checkpoints(fresh, "r")] == [(1, False), (2, False), (3, False)]
    fresh_aside = fresh / "checkpoints" / "r" / "superseded" / folder
    DvcWorkspace(fresh).pull([fresh_aside / "step_3"])
    assert (fresh_aside / "step_3" / "model.safetensors").read_bytes() == old_bytes[3]
    assert pull_checkpoint(fresh, "r", 3) == fresh / "checkpoints" / "r" / "step_3"
    assert (fresh / "checkpoints" / "r" / "step_3" / "model.safetensors").read_bytes() == (new3 / "model.safetensors").read_bytes()


def test_a_branch_finished_meanwhile_is_not_superseded_again_over_the_new_checkpoints(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ckpt list` (or pull) reads a branch's journal while the training run finishes that branch itself; it then
    waits for the DVC lock, held by the run's worker, which meanwhile versions the branch's own new step 2. The
    late finisher must not move that new record into superseded/ (over the replaced step 2's record there)."""
    from open360.checkpoint.branches import write_pending_branch
    from open360.tracking.checkpoints import finish_pending_branches
    from open360.tracking.dvc_versioning import folder_md5

    run_dir, recovery = ws / "checkpoints" / "r", ws / "recovery" / "r"
    store = DvcWorkspace(ws)
    old = {s: write_checkpoint(ws, "r", s) for s in (1, 2)}
    for path in old.values():
        store.add(path)
    old_md5 = store.tracked(old[2]).md5
    folder = "from_step_1-20261127T000000Z"
    marker = write_pending_branch(recovery, 1, folder)
    aside = run_dir / "superseded" / folder
    real = DvcWorkspace.supersede
    state = {"raced": False}

    def blocked_on_the_lock(self: DvcWorkspace, *args: object, **kwargs: object) -> list[int]:
        if not state["raced"]:  # meanwhile the training run finishes the branch and versions its new step 2
            state["raced"] = True
            assert real(DvcWorkspace(ws), run_dir, 1, aside) == [2]
            marker.unlink()
            store.add(write_checkpoint(ws, "r", 2, size=2048))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DvcWorkspace, "supersede", blocked_on_the_lock)
    finish_pending_branches(ws, "r")
    assert state["raced"]
    tracked = store.tracked_children(run_dir)
    assert sorted(tracked) == ["step_1", "step_2", "superseded"]
    assert tracked["step_2"].md5 == folder_md5(run_dir / "step_2") != old_md5
    assert store.tracked(aside / "step_2").md5 == old_md5  # the replaced checkpoint's record is kept


def test_tracked_children_reads_the_tree_once_for_all_children(tmp_path: Path) -> None:
    """Listing a run's checkpoints walks its .dvc tree once, not once per checkpoint (O(checkpoints^2): 21 s
    for 360 checkpoints of 8 files, and each `ckpt pull` / memorization pull lists them all again)."""
    from types import SimpleNamespace

    entries = [(("r", f"step_{s}", *name.split("/")), None, SimpleNamespace(value=f"{s:04x}{i:028x}"))
               for s in (1, 2, 10) for i, name in enumerate(("lineage.json", "model.safetensors", "hf/config.json"))]
    entries.append((("r", "stray.txt"), None, SimpleNamespace(value="0" * 32)))  # a file, not a child folder
    store = DvcWorkspace(tmp_path)
    reads = []
    store._tree = lambda repo, rel: reads.append(rel) or (entries, tuple(rel.split("/")[1:]))
    store._retry_locked = lambda fn, action, path: fn(None)
    children = store.tracked_children(tmp_path / "checkpoints" / "r")
    assert reads == ["checkpoints/r"]
    assert children == {name: store._tracked_dir(None, f"checkpoints/r/{name}") for name in ("step_1", "step_10", "step_2")}
    assert children["step_2"].file_md5["hf/config.json"] == f"{2:04x}{2:028x}" and children["step_2"].nfiles == 3


def _scoring_job(fresh: Path) -> object:
    from open360.analysis.memorization import parse_args

    return parse_args(["run=r", f"workspace={fresh}", "checkpoints=1,2"])


def _pushed_steps_1_and_2(ws: Path) -> tuple[DvcWorkspace, list[Path]]:
    """Checkpoints 1 and 2 of run r versioned, pushed and committed."""
    store = DvcWorkspace(ws)
    paths = [write_checkpoint(ws, "r", s) for s in (1, 2)]
    for path in paths:
        store.add(path)
    store.push(paths)
    commit(ws)
    return store, paths


def _cache_objects(fresh: Path) -> set[Path]:
    return {p for p in (fresh / ".dvc" / "cache").rglob("*") if p.is_file() and not p.name.endswith(".dir")}


def test_a_fetch_the_remote_cannot_complete_leaves_the_cache_as_it_was(ws: Path, tmp_path: Path) -> None:
    """The remote lacks step 2's trainer_state.json (a push cut short): the memorization fetch is refused naming
    it, and the weights it had transferred do not stay in the cache (its caller, told nothing of them, could not
    free them with release_local; a later fetch would take them for files cached before the job)."""
    from open360.analysis.memorization.checkpoints import ensure_checkpoint, pulled_root

    store, paths = _pushed_steps_1_and_2(ws)
    md5 = store.tracked(paths[1]).file_md5["trainer_state.json"]
    (ws / ".dvc-storage" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    fresh = clone(ws, tmp_path / "clone")
    shutil.rmtree(pull_checkpoint(fresh, "r", 1))  # step 1's files stay cached: not the fetch's to delete
    before = _cache_objects(fresh)
    with pytest.raises(VersioningError, match=r"\['trainer_state.json'\] could not be fetched"):
        ensure_checkpoint(_scoring_job(fresh), fresh, 2)
    assert _cache_objects(fresh) == before
    assert not list(pulled_root(fresh, "r").glob("step_*"))


def test_a_scoring_copy_is_ignored_by_git_and_a_failed_copy_leaves_nothing(
    ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scoring copies live under analysis/<run>/, beside reports that are committed: git ignores them. Where
    the cache is on another filesystem they are copies; a disk that fills during one leaves no partial weights
    file (a later job would take the copy for whole) and none of the cache files the fetch added."""
    import open360.analysis.memorization.checkpoints as checkpoints

    _pushed_steps_1_and_2(ws)
    fresh = clone(ws, tmp_path / "clone")
    view, fetched = checkpoints.ensure_checkpoint(_scoring_job(fresh), fresh, 1)
    assert fetched and (view / "model.safetensors").is_file()
    status = subprocess.run(["git", "-C", str(fresh), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert "analysis" not in status, status
    before = _cache_objects(fresh)

    link, copyfile, copies = os.link, shutil.copyfile, checkpoints.pulled_root(fresh, "r")

    def cross_device(source: Path, target: Path) -> None:  # into the scoring copy (not DVC's own links)
        if not Path(target).is_relative_to(copies):
            return link(source, target)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def full_disk(source: Path, target: Path) -> None:
        if not Path(target).is_relative_to(copies) or Path(source).stat().st_size < 1000:
            return copyfile(source, target)
        Path(target).write_bytes(Path(source).read_bytes()[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "link", cross_device)
    monkeypatch.setattr(checkpoints.shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="could not be written"):
        checkpoints.ensure_checkpoint(_scoring_job(fresh), fresh, 2)
    assert _cache_objects(fresh) == before
    assert not list(checkpoints.pulled_root(fresh, "r").glob("step_2-*"))
