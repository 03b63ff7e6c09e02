"""`open360 ckpt` verbs and helpers on hand-made checkpoints: step selection, list, lineage, shards, hub plan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import dvc.repo  # noqa: F401 - binds DVC's log handlers to pytest's session streams, not a test's capsys
import pytest
from omegaconf import OmegaConf

from open360.tracking import version_shards
from open360.tracking.checkpoints import CheckpointEntry, run_checkpoints, select_steps
from open360.tracking.cli import lineage_main, list_main, pull_main, push_main
from open360.tracking.dvc_versioning import DvcWorkspace, VersioningError
from open360.tracking.release import ckpt_names, hub_upload_plan
from open360.tracking.workspace import init_workspace
from tests.test_tracking_dvc import write_checkpoint


def entries(*steps: int) -> list[CheckpointEntry]:
    return [CheckpointEntry(s, Path(f"step_{s}"), True, None) for s in steps]


def test_select_steps() -> None:
    es = entries(0, 10, 20, 40)
    assert [e.step for e in select_steps(es, "all")] == [0, 10, 20, 40]
    assert [e.step for e in select_steps(es, "latest")] == [40]
    assert [e.step for e in select_steps(es, "20")] == [20]
    assert [e.step for e in select_steps(es, "~14")] == [10]
    assert [e.step for e in select_steps(es, "~15")] == [10]  # tie → the earlier step
    assert [e.step for e in select_steps(es, "~1000")] == [40]
    with pytest.raises(ValueError, match=r"run 'r' has no checkpoint at step 15; nearest: \[0, 10, 20\] \(use ~15 for the nearest\)"):
        select_steps(es, "15", "r")
    with pytest.raises(ValueError, match="expected N, ~N, latest or all"):
        select_steps(es, "last")
    with pytest.raises(ValueError, match="has no checkpoints"):
        select_steps([], "latest", "r")


def test_ckpt_names_follow_llm360() -> None:
    assert ckpt_names(3) == ["ckpt_000", "ckpt_001", "ckpt_002"]
    assert ckpt_names(1001)[-1] == "ckpt_1000"


def test_list_shows_tracked_untracked_and_pushed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = init_workspace(tmp_path / "ws")
    store = DvcWorkspace(ws)
    pushed, added, local = (write_checkpoint(ws, "r", s) for s in (1, 2, 3))
    store.add(pushed)
    store.push([pushed])
    store.add(added)
    capsys.readouterr()
    assert list_main(["r", "--workspace", str(ws)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("1", "2,048", "yes"),
        ("2", "4,096", "no:4-missing"),
        ("3", "6,144", "-"),
    ]
    assert rows[2][-2] == "untracked"
    assert list_main(["nope", "--workspace", str(ws)]) == 1
    assert "has no checkpoints" in capsys.readouterr().err
    assert pull_main(["r", "7", "--workspace", str(ws)]) == 1
    assert "no checkpoint at step 7" in capsys.readouterr().err
    assert [e.step for e in run_checkpoints(ws, "r")] == [1, 2, 3]
    (ws / "mlflow.db").write_text("garbage, not a database\n" * 50)
    # every step on disk: trainer_state.json tells tokens and loss, MLflow is not read (at AMBER's step count
    # its full history is millions of rows)
    assert list_main(["r", "--workspace", str(ws)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and "is unreadable" not in err
    shutil.rmtree(added)  # a step known only to checkpoints.dvc: MLflow is asked, and its failure is one line
    assert list_main(["r", "--workspace", str(ws)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4 and "is unreadable" in err and "Traceback" not in err


def test_lineage_without_dvc_or_mlflow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "checkpoints").mkdir()
    ckpt = write_checkpoint(tmp_path, "r", 5)
    assert lineage_main([str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "sha256: 5 files match" in out and "not a DVC repository" in out and "not tracked" in out
    state = ckpt / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:-3])
    assert lineage_main([str(ckpt)]) == 1
    assert "trainer_state.json: sha256" in capsys.readouterr().err
    assert lineage_main([str(tmp_path / "checkpoints")]) == 1
    assert "no lineage.json" in capsys.readouterr().err


def test_version_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = init_workspace(tmp_path / "ws")
    shard_dir = ws / "shards" / "tiny-abc"
    shard_dir.mkdir(parents=True)
    (shard_dir / "manifest.json").write_text(json.dumps({"chunks": 1}))
    (shard_dir / "train_00000.parquet").write_bytes(os.urandom(2048))
    cfg = OmegaConf.create({"tracking": {"dvc": True, "dvc_push": True, "dvc_remote": None}})
    version_shards(shard_dir, ws, cfg)
    version_shards(shard_dir, ws, cfg)  # idempotent
    store = DvcWorkspace(ws)
    tracked = store.tracked(shard_dir)
    assert tracked.nfiles == 2 and (ws / "shards.dvc").is_file()
    assert store.missing_on_remote([tracked]) == {"shards/tiny-abc": 0}
    off = OmegaConf.create({"tracking": {"dvc": False}})
    version_shards(tmp_path / "anywhere", tmp_path, off)  # no-op, no DVC repo needed
    nested = ws / "data" / "shards" / "x"
    nested.mkdir(parents=True)
    with pytest.raises(VersioningError, match="top of the workspace"):
        version_shards(nested, ws, cfg)
    # a remote that is down warns (the push is retried by hand) but does not stop the run that builds them
    from dvc.repo import Repo

    (tmp_path / "not_a_dir").write_text("")
    with Repo(str(ws)) as repo, repo.config.edit("local") as conf:
        conf["remote"]["local"] = {"url": str(tmp_path / "not_a_dir" / "store")}
    (shard_dir / "val_x.parquet").write_bytes(os.urandom(512))
    version_shards(shard_dir, ws, cfg)
    assert "retry with `dvc push shards/tiny-abc`" in capsys.readouterr().err
    assert store.tracked(shard_dir).nfiles == 3
    with pytest.raises(VersioningError, match="git init && dvc init"):
        version_shards(tmp_path / "plain" / "shards" / "x", tmp_path / "plain", cfg)


def test_ckpt_push_also_pushes_the_shards_the_run_trained_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run start whose shard push failed (remote down) only warned: `ckpt push <run>` completes it, from
    DVC's cache when the folder is gone, and says which shards neither the folder nor the cache can supply."""
    import torch

    from open360.checkpoint import CheckpointContents, save_checkpoint

    ws = init_workspace(tmp_path / "ws")
    off = OmegaConf.create({"tracking": {"dvc": True, "dvc_push": False, "dvc_remote": None}})
    for name in ("tiny-abc", "tiny-def"):
        shard_dir = ws / "shards" / name
        shard_dir.mkdir(parents=True)
        (shard_dir / "manifest.json").write_text(json.dumps({"chunks": name}))
        version_shards(shard_dir, ws, off)
    history = [{"stage": "main", "shard_dir": "shards/tiny-abc"}]
    save_checkpoint(ws / "checkpoints" / "r", 2, CheckpointContents(
        model={"w": torch.zeros(4)}, optimizer={"state": {}, "param_groups": []}, trainer_state={"step": 2},
        rng={"seed": 0}, config_yaml="run_name: r\n", lineage={"run_name": "r", "data_history": history},
    ))
    store = DvcWorkspace(ws)
    abc, other = store.tracked(ws / "shards" / "tiny-abc"), store.tracked(ws / "shards" / "tiny-def")
    assert store.missing_on_remote([abc]) == {"shards/tiny-abc": 1}
    shutil.rmtree(ws / "shards" / "tiny-abc")  # gone from the folder, still in DVC's cache
    assert push_main(["r", "--workspace", str(ws)]) == 0
    assert "pushed the shards ['shards/tiny-abc']; remote up to date" in capsys.readouterr().out
    assert store.missing_on_remote([abc]) == {"shards/tiny-abc": 0}

    history.append({"stage": "anneal", "shard_dir": "shards/tiny-def"})  # a later stage, in neither place
    save_checkpoint(ws / "checkpoints" / "r", 4, CheckpointContents(
        model={"w": torch.zeros(4)}, optimizer={"state": {}, "param_groups": []}, trainer_state={"step": 4},
        rng={"seed": 0}, config_yaml="run_name: r\n", lineage={"run_name": "r", "data_history": history},
    ))
    shutil.rmtree(ws / "shards" / "tiny-def")
    for md5 in other.file_md5.values():
        (ws / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    assert push_main(["r", "--workspace", str(ws)]) == 1
    captured = capsys.readouterr()
    assert "added 1 checkpoint(s) to checkpoints.dvc [4] and pushed them" in captured.out
    assert "shard folders ['shards/tiny-def'] lack 1 file(s) on the remote" in captured.err
    assert "Traceback" not in captured.err


def test_ckpt_push_marks_the_mlflow_records_a_failed_push_left_false(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only the record of the folder just pushed (same DVC md5): a record of that step number for another
    folder (a branch's superseded checkpoint) stays `pushed: false`."""
    import torch

    from open360.checkpoint import CheckpointContents, save_checkpoint
    from open360.tracking import mlflow_records as mr
    from open360.tracking.dvc_versioning import folder_md5
    from open360.tracking.mlflow_logger import MlflowLogger
    from open360.train.callbacks import RunInfo

    ws = init_workspace(tmp_path / "ws")
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    logger.on_run_start(RunInfo("r", ws, ws / "checkpoints" / "r", {}, "", 0))
    meta = logger.run_metadata()
    for step in (1, 2):
        save_checkpoint(ws / "checkpoints" / "r", step, CheckpointContents(
            model={"w": torch.full((4,), float(step))}, optimizer={"state": {}, "param_groups": []},
            trainer_state={"step": step}, rng={"seed": 0}, config_yaml="run_name: r\n",
            lineage={"run_name": "r", "callbacks": meta},
        ))
    md5 = folder_md5(ws / "checkpoints" / "r" / "step_1")
    logger.record_checkpoint(1, {"path": "checkpoints/r/step_1", "dvc_md5": md5, "pushed": False})
    logger.record_checkpoint(2, {"path": "checkpoints/r/step_2", "dvc_md5": "superseded.dir", "pushed": False})
    logger.on_run_end({"status": "finished"})
    assert push_main(["r", "--workspace", str(ws)]) == 0
    assert "steps [1] now say pushed" in capsys.readouterr().out
    client = mr.client(logger.tracking_uri)
    assert mr.checkpoint_record(client, logger.run_id, 1)["pushed"] is True
    assert mr.checkpoint_record(client, logger.run_id, 2)["pushed"] is False


def test_a_failed_hub_upload_is_one_line_and_keeps_the_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    from open360.tracking.release import ReleaseError, push_release_to_hub

    class Unauthorized:
        def __init__(self, token: str | None = None) -> None:
            pass

        def create_repo(self, repo_id: str, exist_ok: bool) -> None:
            raise ConnectionError("Max retries exceeded with url: /api/repos/create\n(more lines)")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unauthorized)
    (tmp_path / "README.md").write_text("card\n")
    with pytest.raises(ReleaseError, match=r"to the Hub repo me/r failed at revision main \(ConnectionError: Max retries exceeded[^\n]*\)"):
        push_release_to_hub(tmp_path, "me/r")
    assert (tmp_path / "README.md").is_file()


def test_hub_upload_plan(tmp_path: Path) -> None:
    (tmp_path / "ckpt_000").mkdir()
    (tmp_path / "ckpt_001").mkdir()
    (tmp_path / "checkpoints.json").write_text(
        json.dumps([{"revision": "ckpt_000", "step": 4}, {"revision": "ckpt_001", "step": 8}])
    )
    plan = hub_upload_plan(tmp_path)
    assert plan[0] == ("main", tmp_path, ["ckpt_*/**", "ckpt_*"])
    assert plan[1:] == [("ckpt_000", tmp_path / "ckpt_000", None), ("ckpt_001", tmp_path / "ckpt_001", None)]


def test_dvc_errors_mask_the_credentials_of_the_remote_url(tmp_path: Path) -> None:
    from open360.tracking.dvc_versioning import push_pending

    ws = init_workspace(tmp_path / "ws", remote_url="https://alice:S3cretPW@127.0.0.1:9/store")
    write_checkpoint(ws, "r", 1)
    with pytest.raises(VersioningError) as err:
        push_pending(DvcWorkspace(ws), ws / "checkpoints" / "r")
    assert "S3cretPW" not in str(err.value) and "alice:***@127.0.0.1" in str(err.value)


def test_push_versions_no_step_folder_without_lineage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A `step_N` folder with no lineage.json (a copy, a checkout cut short, a release exported there) is not
    the run's checkpoint: `ckpt push` must not record it in checkpoints.dvc."""
    ws = init_workspace(tmp_path / "ws")
    write_checkpoint(ws, "r", 1)
    stray = ws / "checkpoints" / "r" / "step_50"
    stray.mkdir()
    (stray / "README.md").write_text("not a checkpoint\n")
    assert push_main(["r", "--workspace", str(ws)]) == 0
    assert "have no lineage.json" in capsys.readouterr().err
    assert sorted(DvcWorkspace(ws).tracked_children(ws / "checkpoints" / "r")) == ["step_1"]


def _versioned_checkpoint(tmp_path: Path) -> tuple[Path, DvcWorkspace, Path]:
    """A DVC workspace in tmp_path/ws, its store, and run r's step_1 added to checkpoints.dvc (not pushed)."""
    ws = init_workspace(tmp_path / "ws")
    store = DvcWorkspace(ws)
    path = write_checkpoint(ws, "r", 1)
    store.add(path)
    return ws, store, path


def test_list_says_when_the_remote_lacks_the_tree_checkpoints_dvc_names(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every file pushed, but not the tree object (a branch's record move writes it locally only): a clone
    can pull nothing, which the listing must say."""
    ws, store, path = _versioned_checkpoint(tmp_path)
    store.push([path])
    tree = (ws / "checkpoints.dvc").read_text().split("md5: ")[1].split()[0]
    (ws / ".dvc-storage" / "files" / "md5" / tree[:2] / tree[2:]).unlink()
    capsys.readouterr()
    assert list_main(["r", "--workspace", str(ws)]) == 0
    out, err = capsys.readouterr()
    assert f"remote lacks tree {tree}" in err and "open360 ckpt push r" in err
    assert push_main(["r", "--workspace", str(ws)]) == 0
    capsys.readouterr()
    assert list_main(["r", "--workspace", str(ws)]) == 0
    assert "remote lacks tree" not in capsys.readouterr().err


def _data_checkpoint(ws: Path, tokenizer: bytes, recorded: bytes) -> None:
    """A checkpoint whose lineage names shards/x and the sha256 of `recorded` as its tokenizer."""
    import hashlib

    import torch

    from open360.checkpoint import CheckpointContents, save_checkpoint

    (ws / "shards" / "x").mkdir(parents=True)
    (ws / "shards" / "x" / "tokenizer.json").write_bytes(tokenizer)
    data = {"stage": "main", "shard_dir": "shards/x", "tokenizer_hash": hashlib.sha256(recorded).hexdigest()}
    save_checkpoint(ws / "checkpoints" / "r", 1, CheckpointContents(
        model={"w": torch.zeros(4)}, optimizer={"state": {}, "param_groups": []}, trainer_state={"step": 1},
        rng={"seed": 0}, config_yaml="run_name: r\n", lineage={"run_name": "r", "data": data},
    ))


def test_export_refuses_an_out_folder_inside_checkpoints(tmp_path: Path) -> None:
    from open360.tracking.release import ReleaseError, export_release

    ws = init_workspace(tmp_path / "ws")
    _data_checkpoint(ws, b"{}", b"{}")
    for out in (ws / "checkpoints" / "r" / "step_1" / "release", ws / "checkpoints" / "r" / "step_9"):
        with pytest.raises(ReleaseError, match="inside the workspace's checkpoints/"):
            export_release(ws, "r", out)
        assert not out.exists()
    assert not (ws / "checkpoints" / "r" / "step_1" / "release").exists()


def test_export_refuses_a_tokenizer_other_than_the_one_trained_with(tmp_path: Path) -> None:
    from open360.tracking.release import ReleaseError, export_release

    ws = init_workspace(tmp_path / "ws")
    _data_checkpoint(ws, b'{"rebuilt": true}', b'{"original": true}')
    with pytest.raises(ReleaseError, match="records tokenizer_hash"):
        export_release(ws, "r", tmp_path / "release")
    assert not (tmp_path / "release").exists()


def test_release_metrics_come_from_the_run_the_lineage_names(tmp_path: Path) -> None:
    """Another run of the same name (another workspace on a shared store) is not this release's."""
    import pandas as pd

    from open360.tracking import mlflow_records as mr
    from open360.tracking.release import _metrics_table

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mr.client(uri)
    ids = []
    for name, loss in (("a", 1.0), ("b", 99.0)):  # "b" is the more recent
        exp = client.create_experiment(name)
        run = client.create_run(exp, run_name="r", tags={"open360.run_name": "r"})
        client.log_metric(run.info.run_id, "loss", loss, step=1)
        ids.append(run.info.run_id)
    out = tmp_path / "out"
    out.mkdir()
    assert _metrics_table(tmp_path, "r", uri, out, recorded=ids[0]) == ids[0]
    assert pd.read_parquet(out / "metrics.parquet").value.tolist() == [1.0]
    assert _metrics_table(tmp_path, "r", uri, out, recorded="0" * 32) is None  # not another run's metrics
    assert _metrics_table(tmp_path, "r", uri, out) == ids[1]  # a lineage naming no run: by name


def test_release_metrics_before_a_branch_come_from_the_branch_that_replaced_the_later_steps(tmp_path: Path) -> None:
    """Checkpoint 4's lineage names run A; a branch from step 4 (run B), then one from B at 6 (run C), replaced
    A's later steps: a release of steps <= 4 takes C's metrics (what a full release takes), not A's replaced ones."""
    import pandas as pd

    from open360.tracking import mlflow_records as mr
    from open360.tracking.mlflow_logger import BRANCH_RUN_TAG
    from open360.tracking.release import _metrics_table

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mr.client(uri)
    exp = client.create_experiment("e")
    a, b, c = (client.create_run(exp, tags={"open360.run_name": "r"}).info.run_id for _ in range(3))
    for run_id, first, loss in ((a, 1, 1.0), (b, 5, 2.0), (c, 7, 3.0)):
        for step in range(first, 9):
            client.log_metric(run_id, "loss", loss, step=step)
    client.set_tag(a, BRANCH_RUN_TAG, json.dumps({"run_id": b, "step": 4}))
    client.set_tag(b, BRANCH_RUN_TAG, json.dumps({"run_id": c, "step": 6}))
    out = tmp_path / "out"
    out.mkdir()
    assert _metrics_table(tmp_path, "r", uri, out, recorded=a, step=4) == c
    assert pd.read_parquet(out / "metrics.parquet").value.tolist() == [3.0] * 2  # C's own steps 7, 8
    assert _metrics_table(tmp_path, "r", uri, out, recorded=b, step=5) == c
    assert _metrics_table(tmp_path, "r", uri, out, recorded=c, step=8) == c
    client.delete_run(c)  # a deleted branch took no more writes: the run it branched from went on
    assert _metrics_table(tmp_path, "r", uri, out, recorded=a, step=4) == b
    assert _metrics_table(tmp_path, "r", uri, out, recorded=a, step=6) == a  # a step after the branch: A's own


def test_a_release_exported_from_a_clone_publishes_no_path_of_the_training_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config and lineage record the workspace the run trained in; exported from a clone elsewhere, that
    path must not be published either (nor a path that merely starts with it be mangled)."""
    import torch

    import open360.checkpoint as checkpoint_api
    import open360.models.hf as hf
    from open360.checkpoint import CheckpointContents, save_checkpoint
    from open360.tracking.release import export_release

    trained = "/home/alice/runs/ws"
    ws = tmp_path / "clone"
    (ws / "checkpoints").mkdir(parents=True)
    save_checkpoint(ws / "checkpoints" / "r", 1, CheckpointContents(
        model={"w": torch.zeros(4)}, optimizer={"state": {}, "param_groups": []}, trainer_state={"step": 1},
        rng={"seed": 0}, config_yaml=f"run_name: r\nworkspace: {trained}\ndata:\n  shards_dir: {trained}_data\n",
        lineage={"run_name": "r", "callbacks": {"mlflow_tracking_uri": f"sqlite:///{trained}/mlflow.db"},
                 "resumed_from": {"checkpoint": f"{trained}/checkpoints/r/step_0"}},
    ))
    model_cfg = OmegaConf.create({"model": {k: 1 for k in (
        "name", "n_layers", "d_model", "n_heads", "ffn_dim", "vocab_size", "norm", "mlp", "max_seq_len")}})
    monkeypatch.setattr(checkpoint_api, "load_model_from_checkpoint", lambda *a, **k: (None, model_cfg))
    monkeypatch.setattr(hf, "export_hf", lambda model, cfg, tokenizer, folder: Path(folder).mkdir(parents=True))
    out = export_release(ws, "r", tmp_path / "release")
    lineage = json.loads((out / "ckpt_000" / "open360_lineage.json").read_text())
    config = OmegaConf.load(out / "configs" / "config.yaml")
    assert lineage["callbacks"]["mlflow_tracking_uri"] == "sqlite:///./mlflow.db"
    assert lineage["resumed_from"]["checkpoint"] == "./checkpoints/r/step_0"
    assert config.workspace == "." and config.data.shards_dir == f"{trained}_data"  # another path: as it was
    assert not [p for p in out.rglob("*") if p.is_file() and f"{trained}/" in p.read_text()]
    # a third party checks every file outside the ckpt folders (checkpoints.json then vouches for those)
    from open360.checkpoint.io import sha256_file

    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    outside = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.name != "SHA256SUMS" and p.relative_to(out).parts[0] != "ckpt_000")
    assert sorted(sums) == outside and {"checkpoints.json", "README.md", "configs/config.yaml"} <= set(sums)
    assert all(sha256_file(out / name) == digest for name, digest in sums.items())


def test_a_malformed_or_circular_branch_tag_leaves_the_metrics_with_the_run_it_reached(tmp_path: Path) -> None:
    """A branch tag that is not the JSON the logger writes is no branch; tags that lead back to a run already
    followed (edited by hand) end there rather than loop."""
    from open360.tracking import mlflow_records as mr
    from open360.tracking.mlflow_logger import BRANCH_RUN_TAG

    client = mr.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    a, b = (client.create_run(exp).info.run_id for _ in range(2))
    for tag in ("not json", json.dumps({"run_id": b, "step": None}), json.dumps({"run_id": b, "step": "x"})):
        client.set_tag(a, BRANCH_RUN_TAG, tag)
        assert mr.current_run_id(client, a, 4) == a
    client.set_tag(a, BRANCH_RUN_TAG, json.dumps({"run_id": b, "step": 4}))
    client.set_tag(b, BRANCH_RUN_TAG, json.dumps({"run_id": a, "step": 6}))
    assert mr.current_run_id(client, a, 4) == b


def test_checkpoints_json_says_what_each_checkpoint_had_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per checkpoint: its last step's loss, the code revision that wrote it and the sequences each stage had seen."""
    import torch

    import open360.checkpoint as checkpoint_api
    import open360.models.hf as hf
    from open360.checkpoint import CheckpointContents, save_checkpoint
    from open360.tracking.release import export_release

    ws = tmp_path / "ws"
    for step, dirty in ((2, False), (4, True)):
        seen = {"count": 32 * step, "min_id": 0, "max_id": 32 * step - 1, "contiguous": True, "epochs": 1}
        data = {"stage": "main", "stage_index": 0, "steps": step, "sequences_seen": seen, "recipe": "r.yaml"}
        save_checkpoint(ws / "checkpoints" / "r", step, CheckpointContents(
            model={"w": torch.zeros(4)}, optimizer={"state": {}, "param_groups": []},
            trainer_state={"step": step, "loss": 10.0 / step}, rng={"seed": 0}, config_yaml="run_name: r\n",
            lineage={"run_name": "r", "tokens_seen": 4096 * step, "code": {"revision": "abc123", "dirty": dirty},
                     "data": data, "data_history": [data]},
        ))
    model_cfg = OmegaConf.create({"model": {k: 1 for k in (
        "name", "n_layers", "d_model", "n_heads", "ffn_dim", "vocab_size", "norm", "mlp", "max_seq_len")}})
    monkeypatch.setattr(checkpoint_api, "load_model_from_checkpoint", lambda *a, **k: (None, model_cfg))
    monkeypatch.setattr(hf, "export_hf", lambda model, cfg, tokenizer, folder: Path(folder).mkdir(parents=True))
    index = json.loads((export_release(ws, "r", tmp_path / "release") / "checkpoints.json").read_text())
    assert [(c["step"], c["tokens_seen"], c["loss"], c["code_revision"]) for c in index] == [
        (2, 8192, 5.0, "abc123"), (4, 16384, 2.5, "abc123-dirty")]
    assert index[1]["data_seen"] == [{"stage": "main", "steps": 4, "sequences_seen": {
        "count": 128, "min_id": 0, "max_id": 127, "contiguous": True, "epochs": 1}}]
    assert {"revision", "dvc_md5", "source", "export_files"} <= set(index[0])  # the keys it had before


def test_pull_over_a_modified_file_says_which_and_to_pass_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws, store, path = _versioned_checkpoint(tmp_path)
    store.push([path])
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()  # replaced by another file (the versioned one is a read-only link into the cache)
    weights.write_bytes(good[:-8] + b"\0" * 8)
    capsys.readouterr()
    assert pull_main(["r", "1", "--workspace", str(ws)]) == 1
    err = capsys.readouterr().err
    assert f"{weights} differs from its .dvc record" in err and "--force" in err and "PromptError" not in err
    assert weights.read_bytes() != good  # left as it was
    assert pull_main(["r", "1", "--workspace", str(ws), "--force"]) == 0
    assert weights.read_bytes() == good


def test_pull_keeps_files_a_checkpoint_folder_holds_beyond_its_record(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ws, store, path = _versioned_checkpoint(tmp_path)
    store.push([path])
    (path / "model.safetensors").unlink()  # the pull has something to restore
    notes = path / "evals" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("my evaluation")
    for force in ([], ["--force"]):
        capsys.readouterr()
        assert pull_main(["r", "1", "--workspace", str(ws), *force]) == 1
        err = capsys.readouterr().err
        assert f"['{notes}'] not in its .dvc record" in err and "move them out" in err and "--force" not in err
        assert notes.read_text() == "my evaluation" and not (path / "model.safetensors").exists()
    shutil.move(notes.parent, tmp_path / "evals")
    assert pull_main(["r", "1", "--workspace", str(ws)]) == 0
    assert (path / "model.safetensors").is_file()


def test_a_step_checkpoints_dvc_lacks_and_a_file_its_record_lacks_are_named(tmp_path: Path) -> None:
    """A pull, or the record a memorization fetch reads, of a step on disk but not in checkpoints.dvc says to
    version it first; a fetch of a file the checkpoint's record lacks names that file, not a KeyError."""
    from open360.tracking.checkpoints import pull_checkpoints, recorded_checkpoint

    ws, _, _ = _versioned_checkpoint(tmp_path)
    write_checkpoint(ws, "r", 2)
    for look in (lambda: recorded_checkpoint(ws, "r", 2), lambda: pull_checkpoints(ws, "r", "2")):
        with pytest.raises(VersioningError, match=r"steps \[2\] exist on disk but are not in checkpoints.dvc"):
            look()
    store, entry = recorded_checkpoint(ws, "r", 1)
    with pytest.raises(VersioningError, match=r"\['model.bin'\] not in its .dvc record"):
        store.fetch(entry.path, ["config.yaml", "model.bin"])


def test_list_says_where_tokens_and_loss_of_steps_not_on_disk_were_not_found(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ws, store, path = _versioned_checkpoint(tmp_path)
    shutil.rmtree(path)  # known only to checkpoints.dvc: its tokens and loss can come from MLflow alone
    capsys.readouterr()
    assert list_main(["r", "--workspace", str(ws)]) == 0
    assert f"no MLflow store in {ws} (mlflow.db)" in capsys.readouterr().err
    typo = tmp_path / "mlfow.db"
    assert list_main(["r", "--workspace", str(ws), "--mlflow-uri", f"sqlite:///{typo}"]) == 0
    out, err = capsys.readouterr()
    assert f"no such file {typo}; pass --mlflow-uri" in err and len(out.splitlines()) == 2
    assert not typo.exists()  # reading a mistyped store does not create one


def test_ckpt_push_sends_recorded_checkpoints_whose_folders_are_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.test_tracking_dvc import clone

    ws = init_workspace(tmp_path / "ws")
    store = DvcWorkspace(ws)
    kept, gone = write_checkpoint(ws, "r", 1), write_checkpoint(ws, "r", 2)
    store.add(kept)
    store.add(gone)  # the push failed (remote down)
    shutil.rmtree(gone)  # deleted from the run folder; DVC's cache still holds it
    capsys.readouterr()
    assert push_main(["r", "--workspace", str(ws)]) == 0
    assert "pushed ['checkpoints/r/step_2'] from DVC's cache" in capsys.readouterr().out
    assert store.missing_on_remote([store.tracked(gone)]) == {"checkpoints/r/step_2": 0}
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "r"], check=True)
    assert pull_main(["r", "2", "--workspace", str(clone(ws, tmp_path / "clone"))]) == 0

    own = set(store.tracked(gone).file_md5.values()) - set(store.tracked(kept).file_md5.values())
    for md5 in own:  # in neither place now: the push says so, and fails
        for root in (ws / ".dvc" / "cache", ws / ".dvc-storage"):
            (root / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    assert push_main(["r", "--workspace", str(ws)]) == 1
    assert "the run's checkpoints not on disk ['checkpoints/r/step_2'] lack 4 file(s)" in capsys.readouterr().err



@pytest.mark.parametrize("open360_format", [False, True])
def test_model_card_names_folder_readmes_and_remote_code_only_for_the_open360_format(open360_format: bool) -> None:
    """export_hf writes a README.md and remote code only into open360-format folders (HF_EXPORT.md): the card of
    a Llama/Phi release must not send readers to folder READMEs that do not exist, and the card of an
    open360-format release must say that transformers needs trust_remote_code."""
    from open360.tracking.release import model_card

    cfg = OmegaConf.create({"model": {k: 1 for k in (
        "name", "n_layers", "d_model", "n_heads", "ffn_dim", "vocab_size", "norm", "mlp", "max_seq_len")}})
    index = [{"revision": "ckpt_000", "step": 10, "tokens_seen": 100, "dvc_md5": "x.dir"}]
    card = model_card("r", index, [], {}, None, cfg, open360_format)
    assert ("README" in card.split("## Data")[0]) is open360_format
    assert ("trust_remote_code=True" in card) is open360_format
    assert 'from_pretrained("<repo>", revision="ckpt_000"' in card


def test_release_data_of_a_base_whose_shards_are_elsewhere_is_named_not_an_empty_folder(tmp_path: Path) -> None:
    """A warm start whose base trained on shards this workspace lacks: its data row names the recorded folder
    and says it is not here; no empty data/<name>/ is written beside the run's own copied manifest."""
    from open360.tracking.release import _copy_data

    own = tmp_path / "ws" / "shards" / "own-abc"
    own.mkdir(parents=True)
    (own / "manifest.json").write_text("{}")
    lineage = {"data_history": [{"stage": "main", "shard_dir": "shards/own-abc"}],
               "init_from": {"data_history": [{"stage": "main", "shard_dir": "shards/base-def"}]}}
    rows = _copy_data(tmp_path / "ws", [lineage], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / "data").iterdir()] == ["own-abc"]
    assert [(r["stage"], r["folder"], r["manifest_copied"]) for r in rows] == [
        ("main (base)", "shards/base-def (not in the exporting workspace)", False), ("main", "data/own-abc", True)]
