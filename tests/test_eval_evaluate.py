"""Evaluation across checkpoints: held-out loss falls over a tiny run, lm-eval runs the local task, plots and MLflow."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from open360.analysis.eval_cli import UsageError, parse_overrides
from open360.analysis.evaluate import (
    EvaluateConfig,
    evaluate_run,
    export_for_lm_eval,
    lm_eval_tasks,
    main,
    select_checkpoints,
    sequence_nll,
)
from open360.config import compose

RUN = "eval_tiny"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 40-step run of a small amber_tiny with a checkpoint every 10 steps and MLflow on (DVC off)."""
    from open360.train.pipeline import run_training

    ws = tmp_path_factory.mktemp("eval_ws")
    shards = tmp_path_factory.getbasetemp() / "eval_shared_shards"  # shared with the other eval tests
    cfg = compose([
        "+experiment=amber_tiny", f"run_name={RUN}", f"workspace={ws}", f"data.shards_dir={shards}", "model.d_model=64", "model.n_layers=2",
        "model.ffn_dim=128", "trainer.max_steps=40", "checkpoint=every_n", "checkpoint.every=10",
        "schedule.warmup_steps=5", "tracking.dvc=false", "tracking.dvc_push=false", "trainer.progress_bar=false",
    ])
    run_training(cfg, device="cpu")
    return ws


def test_select_checkpoints():
    avail = [(s, Path(f"step_{s}")) for s in (0, 10, 20, 30, 40, 50)]
    assert [s for s, _ in select_checkpoints(avail)] == [0, 10, 20, 30, 40, 50]
    assert [s for s, _ in select_checkpoints(avail, max_checkpoints=3)] == [0, 20, 50]
    assert [s for s, _ in select_checkpoints(avail, steps=[40, 10])] == [10, 40]
    with pytest.raises(ValueError, match="no such step"):
        select_checkpoints(avail, steps=[15])


def test_sequence_nll_matches_model_loss():
    from open360.models import build_model

    cfg = compose(["+experiment=amber_tiny", "model.vocab_size=200", "model.n_layers=1", "model.d_model=32"]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    seqs = np.random.default_rng(0).integers(0, 200, size=(5, 17))
    nll = sequence_nll(model, seqs, batch_size=2)
    assert nll.shape == (5, 16)
    t = torch.as_tensor(seqs)
    with torch.no_grad():
        expected = float(model.loss(t[:, :-1], t[:, 1:]))
    assert float(nll.mean()) == pytest.approx(expected, rel=1e-5)


def test_cli_overrides_are_validated():
    cfg = parse_overrides(EvaluateConfig, ["run=x", "checkpoints=[10,20]", "tasks=[]"], "prog")
    assert cfg.run == "x" and cfg.checkpoints == [10, 20] and cfg.tasks == []
    with pytest.raises(UsageError, match="run"):
        parse_overrides(EvaluateConfig, ["checkpoints=[1]"], "prog")
    with pytest.raises(UsageError, match="checkpointz"):
        parse_overrides(EvaluateConfig, ["run=x", "checkpointz=[1]"], "prog")


def test_validation_loss_falls_across_checkpoints_and_plots(tiny_run):
    ws = tiny_run
    cfg = EvaluateConfig(run=RUN, workspace=str(ws), val_sequences=16, task_limit=None, batch_size=8)
    df = evaluate_run(cfg)
    steps = sorted(df.step.unique())
    assert len(steps) >= 4 and steps[-1] == 40
    val = df[(df.kind == "val") & (df.metric == "loss")]
    assert set(val.name) == {"code", "english", "shakespeare"}
    mean_loss = val.groupby("step").value.mean().loc[steps].to_numpy()
    assert np.all(np.diff(mean_loss) < 0), f"held-out loss not decreasing over checkpoints: {mean_loss}"
    for _, g in val.groupby("name"):
        g = g.sort_values("step")
        assert g.value.iloc[-1] < g.value.iloc[0]
    ppl = df[(df.kind == "val") & (df.metric == "ppl")].set_index(["step", "name"]).value
    loss = val.set_index(["step", "name"]).value
    np.testing.assert_allclose(ppl.loc[loss.index], np.exp(loss), rtol=1e-9)
    tokens = df.groupby("step").tokens_seen.first()
    assert tokens.loc[40] == 40 * 16 * 128
    acc = df[(df.kind == "task") & (df.metric == "acc")]
    assert len(acc) == len(steps) and acc.value.between(0, 1).all()

    out = ws / "analysis" / RUN
    assert (out / "eval_curves.png").stat().st_size > 10_000
    assert "| step |" in (out / "eval.md").read_text()
    assert pd.read_parquet(out / "eval.parquet").equals(df)

    from mlflow.tracking import MlflowClient

    run_id = json.loads((ws / "checkpoints" / RUN / "step_40" / "lineage.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    hist = client.get_metric_history(run_id, "eval/val/code/loss")
    assert sorted(m.step for m in hist) == steps
    again = evaluate_run(cfg)  # steps already evaluated are kept, not recomputed
    assert again.equals(df)
    # Other settings never mix into (or silently replace) this table; recompute replaces only what it names.
    other = dataclasses.replace(cfg, val_sequences=4, tasks=[])
    with pytest.raises(ValueError, match=r"other settings .*'val_sequences': \(16, 4\)"):
        evaluate_run(other)
    assert pd.read_parquet(out / "eval.parquet").equals(df)
    one = evaluate_run(dataclasses.replace(cfg, checkpoints=[40], recompute=True))
    assert sorted(one.step.unique()) == steps and one.equals(df)  # the other steps are still there
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/val/code/loss")]
    replaced = evaluate_run(dataclasses.replace(other, recompute=True))
    assert sorted(replaced.step.unique()) == steps and "task" not in set(replaced.kind)
    assert "(val_sequences=4); lm-eval tasks: none" in (out / "eval.md").read_text()
    # MLflow keeps the first evaluation's curves: the replaced table's settings are not logged over them
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/val/code/loss")] == logged
    assert json.loads(client.get_run(run_id).data.tags["open360.eval_settings"])["val_sequences"] == 16


def test_replaced_weights_are_evaluated_again_and_damaged_ones_refused(tiny_run, tmp_path, capsys):
    """A step whose checkpoint now holds other weights than its rows were computed from (a resumed branch
    replaced it) is evaluated again; a checkpoint whose weights fail their lineage hash is refused."""
    import shutil

    from open360.analysis.evaluate import main

    cfg = EvaluateConfig(run=RUN, workspace=str(tiny_run), checkpoints=[10, 20], val_sequences=4, tasks=[],
                         mlflow=False, out_dir=str(tmp_path / "a"))
    first = evaluate_run(cfg)
    counts = (tmp_path / "a" / "eval.md").read_text()
    assert "per source: code 4, english 4, shakespeare 4 (val_sequences=4)" in counts
    table = pd.read_parquet(tmp_path / "a" / "eval.parquet")
    assert table.model_sha256.str.len().eq(64).all()
    table.loc[table.step == 20, "model_sha256"] = "0" * 64  # as if step 20 had been trained on another branch
    table.to_parquet(tmp_path / "a" / "eval.parquet", index=False)
    again = evaluate_run(cfg)
    assert "steps [20] hold other weights than their rows were computed from" in capsys.readouterr().err
    pd.testing.assert_frame_equal(again, first)

    ws = tmp_path / "ws"
    bad = ws / "checkpoints" / "flip" / "step_10"
    shutil.copytree(tiny_run / "checkpoints" / RUN / "step_10", bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert main(["run=flip", f"workspace={ws}", "tasks=[]", "mlflow=false"]) == 2
    err = capsys.readouterr().err
    assert "step_10/model.safetensors: sha256" in err and "does not match lineage.json" in err

    assert main([f"run={RUN}", f"workspace={tiny_run}", "checkpoints=[10]", "tasks=[]", "mlflow=false",
                 "recipe=data_recipes/crystalcoder_tiny_stage1.yaml", f"out_dir={tmp_path / 'cc'}"]) == 2
    assert "but " in (err := capsys.readouterr().err) and "was trained with" in err and "recipe=" in err


def test_steps_done_before_a_failure_or_ctrl_c_are_kept(tiny_run, tmp_path, capsys, monkeypatch):
    """eval.parquet is written after every checkpoint: a damaged later checkpoint or a Ctrl-C loses none of
    the steps already evaluated, and the next run evaluates only the rest."""
    import shutil

    from open360.analysis import evaluate as ev

    ws = tmp_path / "ws"
    shutil.copytree(tiny_run / "checkpoints" / RUN, ws / "checkpoints" / RUN)
    args = [f"run={RUN}", f"workspace={ws}", "checkpoints=[10,20,30]", "tasks=[]", "mlflow=false", "val_sequences=4"]
    weights = ws / "checkpoints" / RUN / "step_20" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100] + bytes([good[-100] ^ 1]) + good[-99:])
    assert ev.main(args) == 2
    assert "step_20/model.safetensors: sha256" in capsys.readouterr().err
    table = ws / "analysis" / RUN / "eval.parquet"
    assert set(pd.read_parquet(table).step) == {10}
    weights.write_bytes(good)

    real = ev.validation_metrics

    def interrupted(model, val_sets, *rest):  # noqa: ANN001, ANN002, ANN202
        if len(interrupted.seen) == 1:
            raise KeyboardInterrupt
        interrupted.seen.append(1)
        return real(model, val_sets, *rest)

    interrupted.seen = []
    monkeypatch.setattr(ev, "validation_metrics", interrupted)
    assert ev.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; the results written so far are kept" in err and "Traceback" not in err
    assert set(pd.read_parquet(table).step) == {10, 20}  # step 20 was done, step 30 interrupted
    monkeypatch.setattr(ev, "validation_metrics", real)
    assert ev.main(args) == 0
    assert "step 10" not in capsys.readouterr().out  # only step 30 was left
    assert set(pd.read_parquet(table).step) == {10, 20, 30}


def test_checkpoints_a_resume_branch_superseded_leave_the_table(tiny_run, tmp_path, capsys):
    import shutil

    from open360.analysis.evaluate import main

    ws = tmp_path / "ws"
    shutil.copytree(tiny_run / "checkpoints" / RUN, ws / "checkpoints" / RUN)
    args = [f"run={RUN}", f"workspace={ws}", "tasks=[]", "mlflow=false", "val_sequences=4"]
    assert main([*args, "checkpoints=[30,40]"]) == 0
    branch = ws / "checkpoints" / RUN / "superseded" / "from_step_30"
    branch.mkdir(parents=True)
    shutil.move(ws / "checkpoints" / RUN / "step_40", branch / "step_40")  # what a branch does
    assert main([*args, "checkpoints=[10]"]) == 0
    assert "no longer has checkpoints [40]" in capsys.readouterr().err
    assert set(pd.read_parquet(ws / "analysis" / RUN / "eval.parquet").step) == {10, 30}


def test_rows_of_a_step_a_branch_replaced_leave_the_table_also_when_it_is_not_selected(tiny_run, tmp_path, capsys):
    """A branch that re-trained step 40 leaves rows of the old weights in the table: an evaluation of other
    steps drops them (it does not evaluate step 40), so no curve or MLflow run shows the old branch's values."""
    import shutil

    from open360.analysis.evaluate import main

    ws = tmp_path / "ws"
    shutil.copytree(tiny_run / "checkpoints" / RUN, ws / "checkpoints" / RUN)
    args = [f"run={RUN}", f"workspace={ws}", "tasks=[]", "mlflow=false", "val_sequences=4"]
    assert main([*args, "checkpoints=[30,40]"]) == 0
    table = ws / "analysis" / RUN / "eval.parquet"
    rows = pd.read_parquet(table)
    rows.loc[rows.step == 40, "model_sha256"] = "0" * 64  # computed from weights the old branch's step 40 held
    rows.to_parquet(table, index=False)
    assert main([*args, "checkpoints=[10]"]) == 0
    assert "steps [40] hold other weights than their rows were computed from" in capsys.readouterr().err
    assert set(pd.read_parquet(table).step) == {10, 30}
    (ws / "checkpoints" / RUN / "step_30" / "lineage.json").write_text("{")  # damaged, and not selected
    assert main([*args, "checkpoints=[10]"]) == 0
    assert set(pd.read_parquet(table).step) == {10, 30}  # its rows are kept as they are


def test_the_held_out_split_is_the_one_the_run_trained_with(tmp_path, capsys):
    """The recipe file edited after training: evaluation still reads the run's own shards (the lineage's
    folder), builds nothing; without that folder it refuses instead of scoring another held-out split."""
    import shutil

    from open360.analysis.evaluate import main
    from open360.paths import resolve_repo_path
    from open360.train.pipeline import run_training

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(resolve_repo_path("data_recipes/embedded_tiny.yaml").read_text())
    ws = tmp_path / "ws"
    run_training(compose([
        "+experiment=amber_tiny", "run_name=edited", f"workspace={ws}", f"data.recipe={recipe}", "model.d_model=64",
        "model.n_layers=2", "model.ffn_dim=128", "trainer.max_steps=2", "checkpoint=every_n", "checkpoint.every=2",
        "tracking.dvc=false", "tracking.mlflow=false", "trainer.progress_bar=false",
    ]), device="cpu")
    args = ["run=edited", f"workspace={ws}", "tasks=[]", "mlflow=false", "val_sequences=4"]
    assert main([*args, f"out_dir={tmp_path / 'before'}"]) == 0
    (trained,) = (ws / "shards").glob("embedded_tiny-*")
    recipe.write_text(recipe.read_text().replace("fraction: 0.06", "fraction: 0.07"))
    assert main([*args, f"out_dir={tmp_path / 'after'}"]) == 0
    assert list((ws / "shards").glob("embedded_tiny-*")) == [trained]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "before" / "eval.parquet"),
                                  pd.read_parquet(tmp_path / "after" / "eval.parquet"))
    shutil.rmtree(trained)
    capsys.readouterr()
    assert main([*args, f"out_dir={tmp_path / 'gone'}"]) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint trained on shards/{trained.name}" in err and "recipe=" in err and "Traceback" not in err


def test_a_data_recipe_no_stage_trained_on_is_not_the_held_out_split(tiny_run):
    """Custom `stages` need not include `data.recipe`: the held-out split then comes from the first stage the
    run trained on, not from a recipe it never trained on (whose held-out rows may be another stage's)."""
    from open360.analysis.evaluate import trained_shard_dir
    from open360.checkpoint import read_lineage
    from open360.checkpoint.io import read_config
    from open360.checkpoint.lineage import data_history

    step = tiny_run / "checkpoints" / RUN / "step_40"
    lineage, cfg = read_lineage(step), read_config(step)
    trained = trained_shard_dir(lineage, cfg, tiny_run)
    assert trained.resolve() == (tiny_run / data_history(lineage)[0]["shard_dir"]).resolve()
    cfg.data.recipe = "data_recipes/no_stage_trained_on_this.yaml"
    assert trained_shard_dir(lineage, cfg, tiny_run) == trained


def test_the_held_out_split_of_a_multi_stage_run_is_its_first_stages_and_is_rebuilt_from_it(tiny_run):
    """Stages trained on recipes other than `data.recipe`: the first trained stage's split, not a later stage's;
    a folder no longer on this machine is rebuilt from that stage's recipe (the lineage records it), not from
    `data.recipe`, which the run never trained on."""
    from open360.analysis.evaluate import trained_shard_dir
    from open360.checkpoint import read_lineage
    from open360.checkpoint.io import read_config
    from open360.checkpoint.lineage import data_history

    step = tiny_run / "checkpoints" / RUN / "step_40"
    lineage, cfg = read_lineage(step), read_config(step)
    first = data_history(lineage)[0]
    trained = trained_shard_dir(lineage, cfg, tiny_run)
    cfg.data.recipe = "data_recipes/no_stage_trained_on_this.yaml"
    later = {**first, "recipe": "data_recipes/a_later_stage.yaml", "shard_dir": "shards/a_later_stage",
             "manifest_hash": "0" * 64}
    assert trained_shard_dir({"data_history": [first, later]}, cfg, tiny_run) == trained
    moved = {**first, "shard_dir": "shards/moved_away"}  # not on this machine: built again, idempotently
    assert trained_shard_dir({"data_history": [moved, later]}, cfg, tiny_run).resolve() == trained.resolve()


def test_bad_input_exits_with_one_line(tiny_run, capsys):
    from open360.analysis.evaluate import main

    for args, says in (
        (["run=no_such_run"], "no complete checkpoints of run 'no_such_run'"),
        ([f"run={RUN}", "checkpoints=[999]"], "999"),
        ([f"run={RUN}", "sources=[nope]", "tasks=[]"], "nope"),
        ([f"run={RUN}", "batch_size=0"], "batch_size=0 must be >= 1"),
        ([f"run={RUN}", "val_sequences=-1"], "val_sequences=-1 must be >= 1"),
        ([f"run={RUN}", "device=cpux"], "device=cpux: not a torch device"),
        *([] if torch.cuda.is_available() else [([f"run={RUN}", "device=cuda"], "no CUDA GPU is visible")]),
    ):
        assert main([*args, f"workspace={tiny_run}", f"out_dir={tiny_run / 'bad'}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("open360.analysis.evaluate: ") and says in err and "Traceback" not in err


def test_counts_out_of_range_name_their_key(tmp_path, capsys):
    from open360.analysis.evaluate import main

    avail = [(s, Path(f"step_{s}")) for s in (0, 10, 20)]
    with pytest.raises(ValueError, match="Number of samples"):  # what max_checkpoints=-1 met before
        select_checkpoints(avail, max_checkpoints=-1)
    for arg, says in (("max_checkpoints=-1", "max_checkpoints=-1 must be >= 0"),
                      ("num_fewshot=-2", "num_fewshot=-2 must be >= 0"),
                      ("task_limit=0", "task_limit=0 must be >= 1")):
        assert main(["run=r", arg, f"workspace={tmp_path}", "mlflow=false"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("open360.analysis.evaluate: ") and says in err, err


def test_lm_eval_local_task_on_exported_checkpoint(tiny_run, tmp_path):
    from open360.checkpoint.io import load_model_from_checkpoint

    ckpt = tiny_run / "checkpoints" / RUN / "step_40"
    model, full_cfg = load_model_from_checkpoint(ckpt)
    tokenizer = next((tiny_run.parent / "eval_shared_shards").glob("embedded_tiny-*/tokenizer.json"))
    hf_dir = export_for_lm_eval(model, full_cfg, tokenizer, tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    results = lm_eval_tasks(hf_dir, ["open360_python_cloze"], limit=12, batch_size=4)
    assert set(results) == {"open360_python_cloze"}
    assert 0.0 <= results["open360_python_cloze"]["acc"] <= 1.0
    assert "acc_norm" in results["open360_python_cloze"]
    with pytest.raises(ValueError, match="not found"):
        lm_eval_tasks(hf_dir, ["open360_no_such_task"], limit=1)


def test_lm_eval_loads_the_remote_code_export_of_crystalcoder(tiny_run, tmp_path):
    """CrystalCoder exports as a remote-code folder (muP multipliers, LayerNorm, partial rotary): lm-eval
    loads the folder open360 itself just wrote, with its modeling file."""
    from open360.config import compose
    from open360.models import build_model

    cfg = compose(["+experiment=crystalcoder_tiny"])
    torch.manual_seed(0)
    tokenizer = next((tiny_run.parent / "eval_shared_shards").glob("embedded_tiny-*/tokenizer.json"))
    hf_dir = export_for_lm_eval(build_model(cfg.model), cfg, tokenizer, tmp_path / "hf")
    assert "auto_map" in json.loads((hf_dir / "config.json").read_text())
    results = lm_eval_tasks(hf_dir, ["open360_python_cloze"], limit=4, batch_size=4)
    assert 0.0 <= results["open360_python_cloze"]["acc"] <= 1.0


def test_an_empty_held_out_split_is_an_error():
    from open360.analysis.evaluate import validation_sets

    class NoHeldOut:
        path = Path("shards/x")
        manifest = {"validation": {}}

    with pytest.raises(ValueError, match=r"shards/x: no held-out split"):
        validation_sets(NoHeldOut())


def test_rows_of_a_removed_checkpoint_are_kept_unless_a_branch_superseded_it(tmp_path, capsys):
    from open360.analysis.evaluate import COLUMNS, previous_results, write_table

    cfg = EvaluateConfig(run="r", tasks=[])
    parquet = tmp_path / "eval.parquet"
    rows = [dict(zip(COLUMNS, ["r", s, s * 10, "val", "code", "loss", 1.0, None], strict=True)) for s in (10, 20, 30)]
    write_table(pd.DataFrame(columns=COLUMNS), rows, parquet, cfg)
    kept = previous_results(parquet, cfg, [], {}, {20}, superseded=lambda step: step == 30)
    assert sorted(kept.step) == [10, 20]  # 10 removed by hand: kept; 30 moved by a branch: dropped
    assert "checkpoints [10] are gone from the run but not superseded" in capsys.readouterr().err


def test_mlflow_gets_the_steps_a_failed_sweep_never_logged(tmp_path):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from open360.analysis.evaluate import COLUMNS, log_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full_cfg = OmegaConf.create({"tracking": {"mlflow_uri": uri, "experiment": "e"}})
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e"), run_name="r").info.run_id
    df = pd.DataFrame([dict(zip(COLUMNS, ["r", s, s, "val", "code", "loss", 5.0 - s / 10, None], strict=True))
                       for s in (10, 20, 30)])
    log_to_mlflow(df[df.step == 30], full_cfg, tmp_path, run_id, {"s": 1})  # only what a resumed sweep computed
    log_to_mlflow(df, full_cfg, tmp_path, run_id, {"s": 1})
    log_to_mlflow(df, full_cfg, tmp_path, run_id, {"s": 1})  # nothing new: nothing logged twice
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/val/code/loss"))
    assert hist == [(10, 4.0), (20, 3.0), (30, 2.0)]


def test_eval_metrics_of_steps_before_a_branch_go_to_the_branch_that_holds_the_runs_history(tmp_path):
    """Checkpoints at or before a branch's step name the replaced run in their lineage; that run's history after
    the step is not current, the branch's run is (it inherited the steps before): the eval metrics go there."""
    import json

    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from open360.analysis.evaluate import COLUMNS, log_to_mlflow
    from open360.tracking.mlflow_logger import BRANCH_RUN_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full_cfg = OmegaConf.create({"tracking": {"mlflow_uri": uri, "experiment": "e"}})
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("e")
    replaced, branch = (client.create_run(experiment, run_name="r").info.run_id for _ in range(2))
    client.set_tag(replaced, BRANCH_RUN_TAG, json.dumps({"run_id": branch, "step": 20}))
    df = pd.DataFrame([dict(zip(COLUMNS, ["r", s, s, "val", "code", "loss", 1.0, None], strict=True)) for s in (10, 20)])
    assert log_to_mlflow(df, full_cfg, tmp_path, replaced, {"s": 1}) == branch
    assert [m.step for m in client.get_metric_history(branch, "eval/val/code/loss")] == [10, 20]
    assert client.get_metric_history(replaced, "eval/val/code/loss") == []
    later = pd.DataFrame([dict(zip(COLUMNS, ["r", 30, 30, "val", "code", "loss", 1.0, None], strict=True))])
    assert log_to_mlflow(later, full_cfg, tmp_path, replaced, {"s": 1}) == replaced  # after the branch step: its own


def test_an_edited_task_file_is_another_evaluation(tmp_path):
    """Task definitions and items are part of the settings (other files beside them are not); a table
    written before they were recorded counts as made with the files as they are now."""
    from open360.analysis.evaluate import COLUMNS, previous_results, settings_file, write_table

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: t\n")
    (tasks / "README.md").write_text("about t\n")
    cfg = EvaluateConfig(run="r", tasks=["t"], task_paths=[str(tasks)])
    parquet = tmp_path / "eval.parquet"
    row = dict(zip(COLUMNS, ["r", 10, 100, "task", "t", "acc", 0.5, None], strict=True))
    write_table(pd.DataFrame(columns=COLUMNS), [row], parquet, cfg)
    (tasks / "README.md").write_text("about t, reworded\n")
    assert len(previous_results(parquet, cfg, [])) == 1
    (tasks / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")
    with pytest.raises(ValueError, match="other settings.*task_files"):
        previous_results(parquet, cfg, [])
    older = json.loads(settings_file(parquet).read_text())
    del older["task_files"]
    settings_file(parquet).write_text(json.dumps(older))
    assert len(previous_results(parquet, cfg, [])) == 1


def test_metrics_of_two_filters_stay_two_numbers(monkeypatch):
    """gsm8k reports exact_match under two filters: each keeps its own value, stderr and counts are dropped."""
    from open360.analysis import evaluate

    results = {"results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.11, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.25, "exact_match_stderr,flexible-extract": 0.02},
        "open360_python_cloze": {"acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.6, "sample_len": 40},
    }}
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: results)
    assert evaluate.lm_eval_tasks("unused", ["open360_python_cloze"]) == {
        "gsm8k": {"exact_match/strict-match": 0.11, "exact_match/flexible-extract": 0.25},
        "open360_python_cloze": {"acc": 0.5, "acc_norm": 0.6},
    }


@pytest.mark.parametrize("damage, says", [
    ('{"id": 4, "context": "x", "choices": [', ":5: not a JSON object"),
    ('{"id": 4, "context": "x", "choices": ["a", "b"], "label": 2}', ':5: expected {"context"'),  # scored 0, silently
    ('{"id": 4, "context": "x", "choices": "ab", "label": 0}', ':5: expected {"context"'),
])
def test_a_damaged_task_item_is_named_by_file_and_line(tmp_path, damage, says):
    import importlib.util
    import shutil

    from open360.paths import resolve_repo_path

    task = tmp_path / "open360_python_cloze"
    shutil.copytree(resolve_repo_path("analysis/tasks/open360_python_cloze"), task)
    data = task / "python_cloze.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines[:4], damage, *lines[5:]]) + "\n")
    spec = importlib.util.spec_from_file_location("cloze_utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    with pytest.raises(ValueError, match=re.escape(f"{data}{says}")):
        utils.load_docs()


def test_a_task_yaml_lm_eval_cannot_read_is_named_not_unknown(tmp_path):
    """lm-eval skips a task YAML it cannot parse without a word: its task must not just seem unknown (nor
    send the lookup through lm-eval's whole bundled index)."""
    import shutil

    from open360.paths import resolve_repo_path

    tasks = tmp_path / "tasks"
    shutil.copytree(resolve_repo_path("analysis/tasks"), tasks)
    yaml_file = tasks / "open360_python_cloze" / "open360_python_cloze.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("output_type: multiple_choice", "output_type: [multiple_choice"))
    with pytest.raises(ValueError, match=re.escape(f"cannot read (it skips them without a word): {yaml_file}: ")):
        lm_eval_tasks("unused", ["open360_python_cloze"], [str(tasks)])


def test_the_task_index_is_built_once_per_sweep_not_per_checkpoint(monkeypatch, tmp_path):
    import lm_eval.tasks

    from open360.analysis import evaluate

    built = []

    class CountingTaskManager:
        def __init__(self, include_path, include_defaults=True):
            built.append(include_defaults)
            self.all_tasks = ["open360_python_cloze"] + (["hellaswag"] if include_defaults else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountingTaskManager)
    monkeypatch.setattr(evaluate, "_simple_evaluate", lambda *args: {"results": {"hellaswag": {"acc,none": 0.3}}})
    for _ in range(3):  # three checkpoints
        assert evaluate.lm_eval_tasks("unused", ["hellaswag"]) == {"hellaswag": {"acc": 0.3}}
    assert built == [False, True]


def test_the_checkpoints_model_is_freed_before_lm_eval_loads_its_own_copy(tiny_run, monkeypatch, tmp_path):
    """lm-eval loads the exported checkpoint again (fp32): the model evaluate_run loaded must be gone by then,
    or the device holds two copies (2 x 28 GB at 7B)."""
    import weakref

    from open360.analysis import evaluate as ev
    from open360.checkpoint import io

    loaded: list[weakref.ref] = []
    real_load = io.load_model_from_checkpoint

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        model, cfg = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, cfg

    def tasks(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        assert loaded and loaded[-1]() is None, "the checkpoint's model is still alive while lm-eval runs"
        return {"open360_python_cloze": {"acc": 0.5}}

    monkeypatch.setattr(io, "load_model_from_checkpoint", load)
    monkeypatch.setattr(ev, "lm_eval_tasks", tasks)
    cfg = EvaluateConfig(run=RUN, workspace=str(tiny_run), checkpoints=[40], val_sequences=4, batch_size=8,
                         out_dir=str(tmp_path / "out"), mlflow=False)
    df = evaluate_run(cfg)
    assert len(loaded) == 1 and set(df[df.kind == "task"].value) == {0.5}


def test_a_table_of_another_run_is_not_taken_for_this_ones(tmp_path):
    """out_dir= shared by two runs: the other run's steps must not count as done (nor its rows join the curves)."""
    from open360.analysis.evaluate import COLUMNS, previous_results, write_table

    parquet = tmp_path / "eval.parquet"
    rows = [dict(zip(COLUMNS, ["a", s, s * 10, "val", "code", "loss", 1.0, None], strict=True)) for s in (10, 20)]
    write_table(pd.DataFrame(columns=COLUMNS), rows, parquet, EvaluateConfig(run="a", tasks=[]))
    with pytest.raises(ValueError, match=re.escape(f"{parquet} holds the evaluation of run(s) ['a'], not 'b'")):
        previous_results(parquet, EvaluateConfig(run="b", tasks=[]), [10])
    assert previous_results(parquet, EvaluateConfig(run="b", tasks=[], recompute=True), [10]).empty
    assert len(previous_results(parquet, EvaluateConfig(run="a", tasks=[]), [10])) == 2


def test_a_full_disk_keeps_the_table_and_its_settings_as_they_were(tmp_path, monkeypatch, capsys):
    """eval.parquet cannot be written (ENOSPC) by a recompute=true with other settings: the table and its settings
    stay as last written together (the new settings beside the old rows made the next run take those rows, computed
    with the old settings, for done), no temporary file is left, and the command says which file, in one line."""
    import errno

    from open360.analysis import evaluate as ev
    from open360.analysis.eval_cli import report_errors

    parquet = tmp_path / "eval.parquet"
    row = dict(zip(ev.COLUMNS, ["r", 10, 100, "val", "code", "loss", 1.0, None], strict=True))
    ev.write_table(pd.DataFrame(columns=ev.COLUMNS), [row], parquet, EvaluateConfig(run="r", tasks=[]))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = EvaluateConfig(run="r", tasks=[], val_sequences=8, recompute=True)

    def disk_full(self, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    rows = [{**row, "value": 2.0}]
    assert report_errors("prog", lambda: ev.write_table(pd.DataFrame(columns=ev.COLUMNS), rows, parquet, other)) == 2
    err = capsys.readouterr().err
    assert f"prog: [Errno 28] {parquet}: could not be written" in err and "No space left" in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other settings"):  # not taken for rows of val_sequences=8
        ev.previous_results(parquet, dataclasses.replace(other, recompute=False), [10])


@pytest.mark.parametrize("text", ['{"recipe": nu', "[]"])
def test_a_damaged_settings_file_is_named(tmp_path, text):
    from open360.analysis.evaluate import COLUMNS, previous_results, settings_file, write_table

    cfg = EvaluateConfig(run="r", tasks=[])
    parquet = tmp_path / "eval.parquet"
    row = dict(zip(COLUMNS, ["r", 10, 100, "val", "code", "loss", 1.0, None], strict=True))
    write_table(pd.DataFrame(columns=COLUMNS), [row], parquet, cfg)
    settings_file(parquet).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{settings_file(parquet)}: ")):
        previous_results(parquet, cfg, [])


def test_a_branch_a_crash_left_pending_is_finished_before_the_steps_are_listed(tmp_path):
    """A resume from step 10 journaled its branch and crashed before moving step 20 aside: the listing must not
    offer step 20 at the folder the branch is about to move it out of."""
    from open360.checkpoint.branches import write_pending_branch
    from open360.tracking.checkpoints import known_checkpoints

    for step in (10, 20):
        (tmp_path / "checkpoints" / "r" / f"step_{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / "r" / f"step_{step}" / "lineage.json").write_text("{}")
    write_pending_branch(tmp_path / "recovery" / "r", 10, "from_step_10")
    listed = known_checkpoints(tmp_path, "r")
    assert [step for step, _ in listed] == [10] and all((path / "lineage.json").is_file() for _, path in listed)


def test_every_analysis_writes_and_names_one_folder_with_home_expanded(tmp_path):
    """evaluate, compare and long_context take their folder from analysis_dir: evaluate printed
    <cwd>/~/ws/analysis/<run> for workspace=~/ws while it wrote under $HOME (compare did too)."""
    from open360.analysis.eval_cli import analysis_dir

    assert analysis_dir("~/ws", None, "r") == Path.home().resolve() / "ws" / "analysis" / "r"
    assert analysis_dir("~/ws", str(tmp_path / "o"), "r") == tmp_path / "o"


def test_a_value_that_does_not_parse_is_a_usage_error_naming_it(capsys):
    assert parse_overrides(EvaluateConfig, ["+run=x", "checkpoints=[1,2]"], "prog").run == "x"  # Hydra's `+key=`
    with pytest.raises(UsageError, match=r"checkpoints=\[1,2: the value does not parse"):
        parse_overrides(EvaluateConfig, ["run=x", "checkpoints=[1,2"], "prog")
    with pytest.raises(SystemExit) as exit_:
        main(["run=x", "checkpoints=[1,2"])
    assert exit_.value.code == 2 and "checkpoints=[1,2" in capsys.readouterr().err
