"""Acceptance: train amber_tiny with tracking on, then pull one checkpoint into a fresh clone, lineage, export."""

from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import dvc.repo  # noqa: F401 - binds DVC's log handlers to pytest's session streams, not a test's capsys
import pytest
import torch

import open360.tracking
from open360.checkpoint import load_model_from_checkpoint
from open360.tracking import mlflow_records as mr
from open360.tracking.cli import lineage_main, list_main, pull_main
from open360.tracking.release import export_release, hub_upload_plan
from open360.tracking.workspace import init_workspace
from open360.train.callbacks import Callback

pytestmark = pytest.mark.slow  # trains amber_tiny once (~30 s idle, minutes on a loaded 2-core box)

RUN = "amber_tiny"
STEPS = (4, 8, 12)


class Recorder(Callback):
    """Keeps what the trainer computed, to compare with what MLflow stored."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = dict(metrics)



def _run_config(ws: Path, *overrides: str) -> Any:
    """amber_tiny for 12 steps in `ws`, a published checkpoint every 4 steps."""
    from open360.config import compose

    return compose(
        [
            "+experiment=amber_tiny",
            f"workspace={ws}",
            "trainer.max_steps=12",
            "checkpoint=every_n",
            "checkpoint.every=4",
            "trainer.progress_bar=false",
            *overrides,
        ]
    )

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from open360.train.pipeline import run_training

    ws = init_workspace(tmp_path_factory.mktemp("e2e") / "ws")
    recorder = Recorder()
    original = open360.tracking.build_callbacks
    cfg = _run_config(ws, "tracking.metric_buffer_steps=5")
    mp = pytest.MonkeyPatch()
    mp.setattr(open360.tracking, "build_callbacks", lambda *a: [*original(*a), recorder])
    try:
        summary = run_training(cfg, device="cpu")
    finally:
        mp.undo()
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "train amber_tiny"], check=True)
    return {"ws": ws, "recorder": recorder, "summary": summary}


def test_fresh_clone_pulls_exactly_one_checkpoint_with_equal_logits(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ws = trained["ws"]
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    # A remote that is not on this machine (a clone moved elsewhere): the error says so.
    nowhere = str(tmp_path / "nowhere")
    subprocess.run(["dvc", "remote", "modify", "--local", "local", "url", nowhere], cwd=fresh, check=True)
    assert pull_main([RUN, "8", "--workspace", str(fresh)]) == 1
    assert re.search(r"remote 'local' \(.*nowhere\) does not exist on this machine", capsys.readouterr().err)
    subprocess.run(
        ["dvc", "remote", "modify", "--local", "local", "url", str(ws / ".dvc-storage")],
        cwd=fresh,
        check=True,
    )
    assert not (fresh / ".dvc" / "cache").exists() and not (fresh / "checkpoints").exists()
    subprocess.run(["dvc", "pull", "-q", f"checkpoints/{RUN}/step_8"], cwd=fresh, check=True)
    assert sorted(p.name for p in (fresh / "checkpoints" / RUN).iterdir()) == ["step_8"]
    assert not (fresh / "shards").exists()

    pulled, cfg = load_model_from_checkpoint(fresh / "checkpoints" / RUN / "step_8")
    original, _ = load_model_from_checkpoint(ws / "checkpoints" / RUN / "step_8")
    tokens = torch.randint(0, int(cfg.model.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pulled.eval()(tokens), original.eval()(tokens))

    assert pull_main([RUN, "~11", "--workspace", str(fresh)]) == 0
    assert sorted(p.name for p in (fresh / "checkpoints" / RUN).iterdir()) == ["step_12", "step_8"]


def test_a_fresh_clone_resumes_a_pulled_checkpoint_on_the_pulled_shards_bitwise(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The published workspace is all a clone needs: `ckpt pull` one checkpoint, resume from it, and the run
    pulls the versioned shards (no rebuild) and reaches the original run's next checkpoint bit for bit."""
    import open360.data.build
    from open360.checkpoint import load_checkpoint
    from open360.train.pipeline import run_training

    ws = trained["ws"]
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    subprocess.run(
        ["dvc", "remote", "modify", "--local", "local", "url", str(ws / ".dvc-storage")], cwd=fresh, check=True
    )
    assert pull_main([RUN, "8", "--workspace", str(fresh)]) == 0
    assert not (fresh / "shards").exists()

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the shards were rebuilt instead of pulled")

    monkeypatch.setattr(open360.data.build, "_build_locked", no_build)
    summary = run_training(_run_config(fresh, "trainer.resume=auto"), device="cpu")
    assert summary["start_step"] == 8  # resumed: a fresh start from step 0 would reach the same weights too
    assert "pulled the versioned shards" in capsys.readouterr().err
    (shard_dir,) = (fresh / "shards").iterdir()
    assert (shard_dir / "manifest.json").read_bytes() == (ws / "shards" / shard_dir.name / "manifest.json").read_bytes()
    resumed = load_checkpoint(fresh / "checkpoints" / RUN / "step_12")
    original = load_checkpoint(ws / "checkpoints" / RUN / "step_12")
    assert resumed.model.keys() == original.model.keys()
    assert all(torch.equal(resumed.model[k], original.model[k]) for k in original.model)
    moments, original_moments = resumed.optimizer["state"], original.optimizer["state"]
    assert all(torch.equal(moments[i][n], original_moments[i][n]) for i in original_moments for n in original_moments[i])


def test_shards_that_cannot_be_pulled_are_built_instead(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A clone whose remote is not reachable says so and falls back to the build (the same shards)."""
    ws = trained["ws"]
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    subprocess.run(["dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "nowhere")], cwd=fresh, check=True)
    (shard_dir,) = (ws / "shards").glob("embedded_tiny-*")
    cfg = _run_config(fresh)
    assert open360.tracking.pull_shards(fresh / "shards" / shard_dir.name, fresh, cfg) is False
    err = capsys.readouterr().err
    assert f"could not pull {fresh / 'shards' / shard_dir.name}" in err and "building it from the recipe instead" in err
    assert "does not exist on this machine" in err
    assert open360.tracking.pull_shards(fresh / "shards" / "other-000000000000", fresh, cfg) is False  # not recorded
    off = _run_config(fresh, "tracking.dvc=false")
    assert open360.tracking.pull_shards(fresh / "shards" / shard_dir.name, fresh, off) is False
    assert not (fresh / "shards" / shard_dir.name).exists()
    from open360.data import ShardSet, build_shards

    built = build_shards(cfg.data.recipe, fresh / "shards", cfg.data.seed)  # what the run does next
    assert built == fresh / "shards" / shard_dir.name
    assert ShardSet.open(built).manifest_hash == ShardSet.open(shard_dir).manifest_hash


def test_evaluate_in_a_fresh_clone_pulls_the_checkpoints_and_shards_it_needs(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`evaluate` selects among the steps checkpoints.dvc records (not only those on disk), pulls them and
    the run's shards, and gives the numbers the trained workspace gives."""
    import pandas as pd

    from open360.analysis.evaluate import main

    ws = trained["ws"]
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    subprocess.run(
        ["dvc", "remote", "modify", "--local", "local", "url", str(ws / ".dvc-storage")], cwd=fresh, check=True
    )
    args = [f"run={RUN}", "tasks=[]", "mlflow=false", "val_sequences=4"]
    assert main([*args, f"workspace={fresh}", "checkpoints=[8]", "pull=false"]) == 2
    assert "checkpoints [8] of run 'amber_tiny' are recorded in checkpoints.dvc but not on this machine" in capsys.readouterr().err
    assert main([*args, f"workspace={fresh}"]) == 0
    assert {p.name for p in (fresh / "checkpoints" / RUN).iterdir()} == {f"step_{s}" for s in STEPS}
    assert main([*args, f"workspace={ws}", f"out_dir={tmp_path / 'here'}"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(fresh / "analysis" / RUN / "eval.parquet"),
                                  pd.read_parquet(tmp_path / "here" / "eval.parquet"))


def test_mlflow_history_equals_trainer_and_records_resolve(trained: dict) -> None:
    ws, recorder = trained["ws"], trained["recorder"]
    client = mr.client(mr.workspace_uri(ws))
    run_id = mr.find_run_id(client, RUN)
    lineage = json.loads((ws / "checkpoints" / RUN / "step_12" / "lineage.json").read_text())
    assert lineage["mlflow_run_id"] == run_id
    for key in ("loss", "lr", "grad_norm", "tokens_seen"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [
            (s, recorder.metrics[s][key]) for s in sorted(recorder.metrics)
        ]
    assert len(recorder.metrics) == 12
    records = mr.checkpoint_records(client, run_id)
    assert sorted(records) == list(STEPS)
    from open360.tracking.dvc_versioning import DvcWorkspace

    store = DvcWorkspace(ws)
    for step, record in records.items():
        assert record["path"] == f"checkpoints/{RUN}/step_{step}" and record["pushed"] is True
        assert store.tracked(ws / record["path"]).md5 == record["dvc_md5"]
        state = json.loads((ws / record["path"] / "trainer_state.json").read_text())
        assert state["loss"] == mr.metrics_at(client, run_id, step)["loss"]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_list_and_lineage_detect_corruption(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ws = trained["ws"]
    assert list_main([RUN, "--workspace", str(ws)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["step", "tokens_seen", "loss", "size", "on_disk", "dvc", "pushed"]
    assert [row.split()[0] for row in table[1:]] == [str(s) for s in STEPS]
    assert all(row.split()[-1] == "yes" for row in table[1:])

    ckpt = ws / "checkpoints" / RUN / "step_4"
    assert lineage_main([str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "manifest" in out and "tokenizer" in out and "dvc md5:" in out and "metrics at step 4: " in out
    assert "verified: all hashes match" in out
    cpu = f"1 x {platform.machine()} {torch.backends.cpu.get_cpu_capability()} (cpu, {torch.get_num_threads()} threads)"
    assert f"hardware (since the run last started): {cpu}" in out

    # work on a copy: the originals are hardlinked read-only into the DVC cache
    copy = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(ws), str(copy)], check=True)
    bad = copy / "checkpoints" / RUN / "step_4"
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    assert lineage_main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: sha256" in err and "md5 differs from checkpoints.dvc" in err
    state = bad / "trainer_state.json"
    state.chmod(0o644)
    state.write_bytes(state.read_bytes()[:-10])
    weights.write_bytes(bytes(data[:100]))
    assert lineage_main([str(bad)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_export_release_folder(trained: dict, tmp_path: Path) -> None:
    import pandas as pd
    from transformers import AutoModelForCausalLM

    ws = trained["ws"]
    out = export_release(ws, RUN, tmp_path / "release")
    index = json.loads((out / "checkpoints.json").read_text())
    assert [c["revision"] for c in index] == ["ckpt_000", "ckpt_001", "ckpt_002"]
    assert [c["step"] for c in index] == list(STEPS)
    for c in index:
        assert (out / c["revision"] / "config.json").is_file()
        assert (out / c["revision"] / "open360_lineage.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / "ckpt_001")
    ours, cfg = load_model_from_checkpoint(ws / "checkpoints" / RUN / "step_8")
    tokens = torch.randint(0, int(cfg.model.vocab_size), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.eval()(tokens), rtol=1e-4, atol=1e-4)
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert set(metrics.columns) == {"key", "step", "value", "timestamp"}
    assert len(metrics[metrics.key == "loss"]) == 12
    manifests = list((out / "data").glob("*/manifest.json"))
    assert len(manifests) == 1 and (manifests[0].parent / "tokenizer.json").is_file()
    assert (out / "configs" / "config.yaml").is_file()
    published = [p for p in out.rglob("*") if p.suffix in (".json", ".yaml", ".md")]
    leaks = [p for p in published if str(ws.resolve()) in p.read_text() or str(ws) in p.read_text()]
    assert not leaks  # no path of this machine in what is published (e.g. the local MLflow store)
    card = (out / "README.md").read_text()
    assert "ckpt_002" in card and index[2]["dvc_md5"] in card
    plan = hub_upload_plan(out)
    assert plan[0][0] == "main" and [p[0] for p in plan[1:]] == ["ckpt_000", "ckpt_001", "ckpt_002"]
    with pytest.raises(Exception, match="not an empty folder"):
        export_release(ws, RUN, out)
    part = json.loads((export_release(ws, RUN, tmp_path / "part", steps="8") / "checkpoints.json").read_text())
    assert [(c["revision"], c["step"]) for c in part] == [("ckpt_001", 8)]  # its place among all the run's


def test_a_fresh_clone_exports_with_pull_from_the_remote_it_names(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ckpt export --pull --remote R`: a clone whose default remote is not on this machine fetches the
    chosen checkpoints (only them, in one DVC pull) and their shards' tokenizer and manifest (not the shards)
    from R, and the release holds the trained weights and that tokenizer."""
    from open360.tracking.cli import export_main
    from open360.tracking.dvc_versioning import DvcWorkspace

    ws = trained["ws"]
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    for name, url in (("local", tmp_path / "nowhere"), ("mirror", ws / ".dvc-storage")):
        verb = ["modify", "--local", name, "url"] if name == "local" else ["add", "--local", name]
        subprocess.run(["dvc", "remote", *verb, str(url)], cwd=fresh, check=True)
    shard_dir = json.loads((ws / "checkpoints" / RUN / "step_8" / "lineage.json").read_text())["data"]["shard_dir"]
    argv = [RUN, "--workspace", str(fresh), "--steps", "4,8", "--pull"]
    assert export_main([*argv, "--out", str(tmp_path / "r1")]) == 1  # the default remote
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    pulls: list[list[str]] = []
    real_pull = DvcWorkspace.pull
    monkeypatch.setattr(DvcWorkspace, "pull", lambda self, paths, **kw: (pulls.append([p.name for p in paths]),
                                                                         real_pull(self, paths, **kw))[1])
    assert export_main([*argv, "--out", str(tmp_path / "r2"), "--remote", "mirror"]) == 0, capsys.readouterr().err
    assert pulls == [["step_4", "step_8"]]
    assert sorted(p.name for p in (fresh / "checkpoints" / RUN).iterdir()) == ["step_4", "step_8"]
    released = json.loads((tmp_path / "r2" / "checkpoints.json").read_text())
    assert [(c["revision"], c["step"]) for c in released] == [("ckpt_000", 4), ("ckpt_001", 8)]
    for step in ("step_4", "step_8"):
        pulled, original = (w / "checkpoints" / RUN / step / "model.safetensors" for w in (fresh, ws))
        assert pulled.read_bytes() == original.read_bytes()
    assert sorted(p.name for p in (fresh / shard_dir).iterdir()) == ["manifest.json", "tokenizer.json"]
    released_tok = tmp_path / "r2" / "data" / Path(shard_dir).name / "tokenizer.json"
    assert released_tok.read_bytes() == (ws / shard_dir / "tokenizer.json").read_bytes()


def test_export_records_the_sha256_of_every_released_file(trained: dict, tmp_path: Path) -> None:
    from open360.checkpoint.io import sha256_file

    out = export_release(trained["ws"], RUN, tmp_path / "release", steps="4,12")
    index = json.loads((out / "checkpoints.json").read_text())
    for c in index:
        assert {"revision", "step", "tokens_seen", "dvc_md5", "source"} <= set(c)
        folder = out / c["revision"]
        on_disk = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
        assert sorted(c["export_files"]) == on_disk  # every file of the folder, nothing else
        assert {"model.safetensors", "config.json", "open360_lineage.json"} <= set(on_disk)
        assert all(sha256_file(folder / name) == digest for name, digest in c["export_files"].items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _release_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-") or p.name == "release")


def test_export_is_all_or_nothing(
    trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A checkpoint that fails verification is found before anything is written: no release folder, no
    temporary one, and once it is repaired the same command succeeds; an interrupted write leaves none."""
    from open360.tracking import release
    from open360.tracking.cli import export_main

    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained["ws"]), str(ws)], check=True)
    parent = tmp_path / "out"
    parent.mkdir()
    argv = [RUN, "--out", str(parent / "release"), "--workspace", str(ws)]
    weights = ws / "checkpoints" / RUN / "step_12" / "model.safetensors"  # the last: the others come first
    good = weights.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))  # in place: the cache's hardlink is repaired with it below
    assert export_main(argv) == 1
    assert "checkpoint step 12 failed verification" in capsys.readouterr().err
    assert _release_leftovers(parent) == []
    weights.write_bytes(good)
    assert export_main(argv) == 0
    index = json.loads((parent / "release" / "checkpoints.json").read_text())
    assert [c["step"] for c in index] == list(STEPS) and (parent / "release" / "README.md").is_file()
    assert _release_leftovers(parent) == ["release"]

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    empty = parent / "again"
    empty.mkdir()  # an empty --out is allowed, and stays as it was
    monkeypatch.setattr(release, "_metrics_table", interrupted)  # after every checkpoint was written
    with pytest.raises(KeyboardInterrupt):
        export_release(ws, RUN, empty)
    assert empty.is_dir() and not any(empty.iterdir())
    assert not [p for p in parent.iterdir() if p.name.startswith(".tmp-")]
    (parent / ".tmp-deadhost-1-0000-again").mkdir()  # a killed export's leftover does not block a retry
    monkeypatch.undo()
    assert (export_release(ws, RUN, empty, steps="8") / "ckpt_001" / "model.safetensors").is_file()


def _tamper(ckpt: Path) -> None:
    """Rewrite a checkpoint's weights and the sha256 lineage.json records for them (self-consistent)."""
    from open360.checkpoint.io import load_model_weights, save_model_weights, sha256_file

    weights = load_model_weights(ckpt / "model.safetensors")
    weights["lm_head.weight"] = -weights["lm_head.weight"]
    (ckpt / "model.safetensors").unlink()  # hardlinked read-only into the DVC cache: a new file
    save_model_weights(weights, ckpt / "model.safetensors")
    lineage = json.loads((ckpt / "lineage.json").read_text())
    lineage["files"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "lineage.json").unlink()
    (ckpt / "lineage.json").write_text(json.dumps(lineage))


def test_a_rewritten_lineage_is_caught_by_the_records_kept_elsewhere(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """lineage.json vouches only for itself: a checkpoint rewritten with a matching lineage.json fails
    against checkpoints.dvc, or (outside the DVC workspace) against the MLflow run's record, and export
    refuses it; with neither record, lineage says the check stopped at lineage.json."""
    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained["ws"]), str(ws)], check=True)
    ckpt = ws / "checkpoints" / RUN / "step_8"
    _tamper(ckpt)
    assert lineage_main([str(ckpt)]) == 1
    assert "md5 differs from checkpoints.dvc" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"step 8 differs from checkpoints.dvc: .*lineage.json: md5 differs .*\(and 1 more\)"):
        export_release(ws, RUN, tmp_path / "rel", steps="8")

    alone = tmp_path / "elsewhere" / "checkpoints" / RUN / "step_8"  # no DVC workspace around it
    alone.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ckpt), str(alone)], check=True)
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    assert lineage_main([str(alone), "--mlflow-uri", uri]) == 1
    assert "records dvc_md5" in capsys.readouterr().err
    honest = tmp_path / "elsewhere" / "checkpoints" / RUN / "step_4"
    subprocess.run(["cp", "-r", str(ws / "checkpoints" / RUN / "step_4"), str(honest)], check=True)
    assert lineage_main([str(honest), "--mlflow-uri", uri]) == 0
    assert "verified: all hashes match" in capsys.readouterr().out
    untracked = json.loads((honest / "lineage.json").read_text())
    untracked.pop("mlflow_run_id", None)
    untracked.pop("callbacks", None)
    (honest / "lineage.json").write_text(json.dumps(untracked))
    assert lineage_main([str(honest)]) == 0  # no DVC or MLflow record to anchor it: said so
    assert "the files match lineage.json only" in capsys.readouterr().out
    renamed = honest.with_name("step_999")
    honest.rename(renamed)
    assert lineage_main([str(renamed)]) == 1
    assert "key 'step' is 4, but the folder is step_999" in capsys.readouterr().err


def test_pull_refuses_a_remote_missing_a_file_and_force_repairs_a_damaged_one(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from open360.tracking.cli import push_main

    ws = trained["ws"]
    storage = tmp_path / "storage"
    subprocess.run(["cp", "-a", str(ws / ".dvc-storage"), str(storage)], check=True)
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(fresh)], check=True)
    subprocess.run(["dvc", "remote", "modify", "--local", "local", "url", str(storage)], cwd=fresh, check=True)
    from open360.tracking.dvc_versioning import DvcWorkspace

    md5 = DvcWorkspace(ws).tracked(ws / "checkpoints" / RUN / "step_12").file_md5["model.safetensors"]
    (lost,) = [p for p in storage.rglob("*") if p.is_file() and md5[2:] in p.name]
    lost.unlink()
    assert pull_main([RUN, "12", "--workspace", str(fresh)]) == 1
    err = capsys.readouterr().err
    assert "['model.safetensors'] could not be fetched (absent or damaged)" in err and "nothing was checked out" in err
    assert not (fresh / "checkpoints" / RUN / "step_12").exists()

    assert pull_main([RUN, "4", "--workspace", str(fresh)]) == 0
    capsys.readouterr()
    weights = fresh / "checkpoints" / RUN / "step_4" / "model.safetensors"
    good = weights.read_bytes()
    weights.unlink()  # a new, truncated file (the checked-out one is a read-only link into the DVC cache)
    weights.write_bytes(good[: len(good) // 2])
    assert lineage_main([str(weights.parent)]) == 1
    assert "open360 ckpt pull <run> <step> --force" in capsys.readouterr().err
    assert pull_main([RUN, "4", "--workspace", str(fresh), "--force"]) == 0
    assert weights.read_bytes() == good
    with open(weights, "r+b") as f:  # damaged in place: through the hardlink, DVC's cache object too
        f.seek(100)
        f.write(b"\0" * 64)
    assert pull_main([RUN, "4", "--workspace", str(fresh), "--force"]) == 0
    assert weights.read_bytes() == good
    capsys.readouterr()

    state = fresh / "checkpoints" / RUN / "step_4" / "trainer_state.json"
    state.chmod(0o644)
    state.unlink()
    state.write_text('{"step": 4, "loss":')
    assert list_main([RUN, "--workspace", str(fresh)]) == 0
    out, err = capsys.readouterr()
    assert [row.split()[-3] for row in out.splitlines() if row.split()[0] == "4"] == ["damaged"]
    assert "step 4 is damaged" in err
    assert push_main(["no_such_run", "--workspace", str(fresh)]) == 1
    assert "no such run; runs here: ['amber_tiny']" in capsys.readouterr().err


def test_resume_continues_mlflow_run_and_reversions(trained: dict, tmp_path: Path) -> None:
    from open360.tracking.dvc_versioning import DvcWorkspace
    from open360.train.pipeline import run_training

    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained["ws"]), str(ws)], check=True)
    subprocess.run(["rm", "-rf", str(ws / "checkpoints" / RUN / "step_12")], check=True)
    cfg = _run_config(ws, "trainer.resume=auto")
    run_training(cfg, device="cpu")
    run_ids = {
        json.loads((ws / "checkpoints" / RUN / f"step_{s}" / "lineage.json").read_text())["mlflow_run_id"]
        for s in STEPS
    }
    assert len(run_ids) == 1
    client = mr.client(mr.workspace_uri(ws))
    (run_id,) = run_ids
    run = client.get_run(run_id)
    assert run.data.tags["open360.resumed_at_step"] == "8" and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert sorted(mr.metric_history(client, run_id)["loss"]) == list(range(1, 13))
    record = mr.checkpoint_records(client, run_id)[12]
    assert record["pushed"] and DvcWorkspace(ws).tracked(ws / record["path"]).md5 == record["dvc_md5"]


def test_resuming_the_newest_step_by_number_continues_the_run(trained: dict, tmp_path: Path) -> None:
    """trainer.resume=<newest step> (what the divergence message suggests) replaces nothing: the same
    MLflow run goes on, no branch is made, nothing moves aside."""
    from open360.train.pipeline import run_training

    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained["ws"]), str(ws)], check=True)
    run_dir = ws / "checkpoints" / RUN
    old_id = json.loads((run_dir / "step_12" / "lineage.json").read_text())["mlflow_run_id"]
    run_training(_run_config(ws, "trainer.resume=12", "trainer.max_steps=16"), device="cpu")
    assert json.loads((run_dir / "step_16" / "lineage.json").read_text())["mlflow_run_id"] == old_id
    assert not (run_dir / "superseded").exists()
    client = mr.client(mr.workspace_uri(ws))
    assert len(client.search_runs([client.get_run(old_id).info.experiment_id])) == 1


def test_a_branch_gets_its_own_mlflow_run_and_moves_the_replaced_dvc_records(trained: dict, tmp_path: Path) -> None:
    from open360.tracking.dvc_versioning import DvcWorkspace
    from open360.train.pipeline import run_training

    ws = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained["ws"]), str(ws)], check=True)
    run_dir = ws / "checkpoints" / RUN
    store = DvcWorkspace(ws)
    old_md5 = {s: store.tracked(run_dir / f"step_{s}").md5 for s in STEPS}
    client = mr.client(mr.workspace_uri(ws))
    old_id = json.loads((run_dir / "step_12" / "lineage.json").read_text())["mlflow_run_id"]
    old_history = mr.metric_history(client, old_id)

    run_training(_run_config(ws, "trainer.resume=4", "optim.lr=1e-4"), device="cpu")  # back to 4, other lr
    (folder,) = (run_dir / "superseded").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["step_12", "step_8"]
    assert sorted(store.tracked_children(run_dir)) == ["step_12", "step_4", "step_8", "superseded"]
    aside = store.tracked_children(folder)
    assert {n: d.md5 for n, d in aside.items()} == {"step_8": old_md5[8], "step_12": old_md5[12]}
    assert store.tracked(run_dir / "step_8").md5 != old_md5[8] and store.tracked(run_dir / "step_4").md5 == old_md5[4]

    new_id = json.loads((run_dir / "step_12" / "lineage.json").read_text())["mlflow_run_id"]
    assert new_id != old_id
    branch = client.get_run(new_id)
    assert branch.data.tags["open360.branched_from_run_id"] == old_id
    assert branch.data.tags["open360.branched_at_step"] == "4" and branch.data.params["optim.lr"] == "0.0001"
    # the branch's run carries its own config/config.yaml (what compare reads), a continued run does not
    from open360.analysis.compare import run_config

    assert {a.path for a in client.list_artifacts(new_id, "config")} == {"config/config.yaml"}
    assert run_config(client, branch)["optim"]["lr"] == 0.0001
    history = mr.metric_history(client, new_id)
    assert sorted(history["loss"]) == list(range(1, 13))  # the inherited steps 1..4, then the branch's own
    assert all(history["loss"][s] == old_history["loss"][s] for s in range(1, 5))
    assert any(history["loss"][s] != old_history["loss"][s] for s in range(5, 13))
    assert mr.metric_history(client, old_id) == old_history  # the replaced run is left as it was
    records = mr.checkpoint_records(client, new_id)
    assert sorted(records) == [4, 8, 12] and records[4] == mr.checkpoint_records(client, old_id)[4]
    assert records[8]["dvc_md5"] == store.tracked(run_dir / "step_8").md5
    # a release of step 4 alone (whose lineage names the replaced run) has the branch's metrics, not the replaced
    import pandas as pd

    part = export_release(ws, RUN, tmp_path / "part", steps="4")
    released = pd.read_parquet(part / "metrics.parquet").query("key == 'loss'").set_index("step")["value"]
    assert released.to_dict() == history["loss"] and f"MLflow run: `{new_id}`" in (part / "README.md").read_text()


def test_tracking_leaves_the_training_rngs_and_weights_as_a_run_without_it(trained: dict, tmp_path: Path) -> None:
    """Same config and seed, tracking=off: every checkpoint holds the same weights and the same RNG states as
    the tracked run's (MLflow's random run names draw from Python's `random`; a random draw in training, e.g.
    dropout, would otherwise take other values with tracking on)."""
    from open360.train.pipeline import run_training

    run_training(_run_config(tmp_path, "tracking=off", f"data.shards_dir={trained['ws'] / 'shards'}"), device="cpu")
    for step in STEPS:
        tracked, untracked = (w / "checkpoints" / RUN / f"step_{step}" for w in (trained["ws"], tmp_path))
        assert (tracked / "model.safetensors").read_bytes() == (untracked / "model.safetensors").read_bytes()
        a, b = (torch.load(d / "rng.pt", weights_only=True)["ranks"][0] for d in (tracked, untracked))
        assert a["python"] == b["python"], step
        assert torch.equal(a["numpy"]["keys"], b["numpy"]["keys"]) and a["numpy"]["pos"] == b["numpy"]["pos"]
        assert torch.equal(a["torch"], b["torch"]), step
