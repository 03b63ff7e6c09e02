"""Run comparison: a 3-size Hydra multirun sweep read back from MLflow renders the race views; FLOPs check out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from open360.analysis.compare import CompareConfig, compare_runs, fit_power_law
from open360.paths import REPO_ROOT

SIZES = (32, 48, 64)
RUNS = [f"scaling_tiny_d{d}_l1" for d in SIZES]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python -m open360.train -m +experiment=scaling_tiny model.d_model=32,48,64` (1 layer, 8 steps)."""
    ws = tmp_path_factory.mktemp("compare_ws")
    shards = tmp_path_factory.getbasetemp() / "eval_shared_shards"
    cmd = [
        sys.executable, "-m", "open360.train", "-m", "+experiment=scaling_tiny",
        f"model.d_model={','.join(map(str, SIZES))}", "model.n_layers=1", "trainer.max_steps=8",
        "checkpoint.every=1000", f"workspace={ws}", f"data.shards_dir={shards}", "tracking.dvc=false",
        "tracking.dvc_push=false", "trainer.progress_bar=false", "trainer.log_every=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


def test_power_law_fit_recovers_exponent():
    c = np.array([1e12, 1e13, 1e14, 1e15])
    fit = fit_power_law(c, 7.0 * c ** -0.05)
    assert fit["b"] == pytest.approx(0.05, abs=1e-9) and fit["a"] == pytest.approx(7.0, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two runs"):
        fit_power_law([1e12], [3.0])


def test_sweep_renders_race_views_with_model_flops(sweep):
    from open360.config import compose
    from open360.models import build_model, training_flops_per_token

    out = sweep / "analysis" / "race"
    curves, summaries = compare_runs(CompareConfig(runs=RUNS, workspace=str(sweep), out_dir=str(out)))
    assert list(summaries.run) == RUNS
    assert (out / "compare.png").stat().st_size > 20_000
    report = (out / "compare.md").read_text()
    assert all(r in report for r in RUNS) and "Power-law fit" in report
    assert pd.read_parquet(out / "compare.parquet").shape == curves.shape

    for d, run in zip(SIZES, RUNS, strict=True):
        g = curves[curves.run == run].sort_values("step")
        assert list(g.step) == list(range(1, 9))
        # the three x axes of the race view: tokens, FLOPs, wall-clock, all increasing
        for col in ("tokens", "flops", "wall_s"):
            assert np.all(np.diff(g[col].to_numpy()) > 0), (run, col)
        np.testing.assert_array_equal(g.tokens.to_numpy(), np.arange(1, 9) * 16 * 128)
        # FLOPs = tokens x the model's training FLOPs per token, and that is 6N + 12·L·D·S for the
        # parameter count of the model actually built from the run's config
        cfg = compose(["+experiment=scaling_tiny", f"model.d_model={d}", "model.n_layers=1"])
        n_params = build_model(cfg.model).num_parameters()
        fpt = 6 * n_params + 12 * 1 * d * 128
        assert training_flops_per_token(cfg.model, 128) == pytest.approx(fpt)
        np.testing.assert_allclose(g.flops.to_numpy(), g.tokens.to_numpy() * fpt, rtol=1e-12)
        s = summaries.set_index("run").loc[run]
        assert s.params == n_params and s.flops == pytest.approx(8 * 16 * 128 * fpt)
    # bigger models cost more per token
    assert summaries.flops_per_token.is_monotonic_increasing


def test_unknown_run_is_named(sweep, capsys):
    with pytest.raises(LookupError, match="no_such_run"):
        compare_runs(CompareConfig(runs=["no_such_run"], workspace=str(sweep), out_dir=str(sweep / "x")))
    from open360.analysis.compare import main

    assert main(["runs=[no_such_run]", f"workspace={sweep}", f"out_dir={sweep / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("open360.analysis.compare: ") and "no_such_run" in err and "Traceback" not in err


def test_devices_out_of_range_is_named(sweep, capsys):
    from open360.analysis.compare import main

    assert main(["runs=[a]", "devices=-1", f"workspace={sweep}", f"out_dir={sweep / 'neg'}"]) == 2
    assert "devices=-1: must be >= 1" in capsys.readouterr().err and not (sweep / "neg").exists()


def test_a_run_named_twice_is_refused_before_any_store_is_read(tmp_path, capsys):
    from open360.analysis.compare import main

    assert main(["runs=[a,b,a]", f"workspace={tmp_path}", f"out_dir={tmp_path / 'out'}"]) == 2
    assert "['a'] named more than once" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_wrong_workspace_or_run_name_is_named_and_creates_nothing(sweep, tmp_path, capsys):
    from open360.analysis.compare import main, run_config

    nowhere = tmp_path / "no_such_ws"
    assert main(["runs=[a]", f"workspace={nowhere}"]) == 2
    err = capsys.readouterr().err
    assert "mlflow.db: no MLflow store there" in err and not nowhere.exists()
    assert main(["runs=[it's]", f"workspace={sweep}", f"out_dir={sweep / 'x'}"]) == 2
    assert "'it's' is not a run name" in capsys.readouterr().err

    class Run:  # a run whose config artifact is unreachable: rebuilt from params, where None is "None"
        info = type("I", (), {"run_id": "r"})()
        data = type("D", (), {"params": {"model.n_kv_heads": "None", "model.d_model": "64", "name": ""}})()

    class NoArtifacts:
        def download_artifacts(self, *args):
            raise OSError("no artifact store")

    assert run_config(NoArtifacts(), Run()) == {"model": {"n_kv_heads": None, "d_model": 64}, "name": None}


def test_a_damaged_mlflow_store_is_named_in_one_line_and_left_as_it_was(tmp_path, capsys):
    """A mlflow.db that is not an SQLite file (a truncated copy, a bad download) was a SQLAlchemy traceback."""
    from open360.analysis.compare import main

    damaged = bytes(range(256)) * 20
    (tmp_path / "mlflow.db").write_bytes(damaged)
    assert main(["runs=[a]", f"workspace={tmp_path}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("open360.analysis.compare: tracking_uri=sqlite:///mlflow.db: the MLflow store ")
    assert "mlflow.db is unreadable (DatabaseError" in err and "Traceback" not in err
    assert (tmp_path / "mlflow.db").read_bytes() == damaged and not (tmp_path / "out").exists()


def test_a_config_rebuilt_from_params_reads_exponent_floats_and_gives_the_flops():
    """MLflow params hold str(value): norm_eps 1e-06 is "1e-06", which YAML 1.1 reads as a string; the
    rebuilt model config then failed FLOP counting with a TypeError."""
    from omegaconf import OmegaConf

    from open360.analysis.compare import flops_per_token, run_config
    from open360.config import compose
    from open360.models import training_flops_per_token
    from open360.tracking.params import config_params

    cfg = compose(["+experiment=crystalcoder_tiny"])

    class Run:
        info = type("I", (), {"run_id": "r"})()
        data = type("D", (), {"params": config_params(OmegaConf.to_container(cfg, resolve=True))})()

    class NoArtifacts:
        def download_artifacts(self, *args):
            raise OSError("no artifact store")

    rebuilt = run_config(NoArtifacts(), Run())
    assert (rebuilt["model"]["norm_eps"], rebuilt["optim"]["eps"], rebuilt["optim"]["lr"]) == (1e-5, 1e-9, 1e-2)
    assert rebuilt["run_name"] == "crystalcoder_tiny" and rebuilt["model"]["n_kv_heads"] is None
    assert flops_per_token(rebuilt["model"], 128) == training_flops_per_token(cfg.model, 128)


def test_runs_of_different_tokenizers_are_compared_with_a_warning(tmp_path, monkeypatch, capsys):
    """Loss is nats per token of each run's tokenizer: runs of another vocabulary or tokenizer are flagged
    in the report and on stderr, not silently put on one loss axis and one power-law fit."""
    import open360.analysis.compare as compare
    from open360.analysis.compare import run_tokenizer

    class Run:
        def __init__(self, tags: dict) -> None:
            self.data = type("D", (), {"tags": tags})()

    assert run_tokenizer(Run({"open360.data.main.tokenizer_sha256": "abc", "open360.data.main.shard_dir": "x"})) == "abc"
    assert run_tokenizer(Run({})) is None

    runs = {"a": (4096, "t1", 1e12, 3.0), "b": (4096, "t1", 1e13, 2.5), "c": (4096, "t2", 1e14, 2.0),
            "d": (50304, None, 1e15, 1.5)}

    def curve(client, cfg, name):
        vocab, tok, flops, loss = runs[name]
        df = pd.DataFrame({"run": name, "step": [1], "loss": [loss], "tokens": [1e6], "flops": [flops], "wall_s": [1.0]})
        return df, {"run": name, "run_id": name, "params": 10**6, "flops_per_token": flops / 1e6, "steps": 1,
                    "tokens": 1e6, "flops": flops, "wall_s": 1.0, "final_loss": loss, "vocab_size": vocab,
                    "tokenizer": tok}

    monkeypatch.setattr(compare, "_client", lambda uri, ws: None)
    monkeypatch.setattr(compare, "load_run_curve", curve)
    for names, says in ((["a", "b"], None), (["a", "b", "c"], "tokenizers a: t1…, b: t1…, c: t2…"),
                        (["a", "d"], "vocab_size {'a': 4096, 'd': 50304}")):
        out = tmp_path / "_".join(names)
        compare_runs(CompareConfig(runs=names, workspace=str(tmp_path), out_dir=str(out)))
        report, err = (out / "compare.md").read_text(), capsys.readouterr().err
        if says is None:
            assert "Warning" not in report and "warning" not in err
        else:
            assert f"the runs tokenize differently ({says})" in report and says in err


def two_runs(monkeypatch) -> None:
    """Runs "a" and "b" of one tokenizer, read from no MLflow store."""
    import open360.analysis.compare as compare

    def curve(client, cfg, name):
        flops, loss = {"a": (1e12, 3.0), "b": (1e13, 2.5)}[name]
        df = pd.DataFrame({"run": name, "step": [1], "loss": [loss], "tokens": [1e6], "flops": [flops], "wall_s": [1.0]})
        return df, {"run": name, "run_id": name, "params": 10**6, "flops_per_token": flops / 1e6, "steps": 1,
                    "tokens": 1e6, "flops": flops, "wall_s": 1.0, "final_loss": loss, "vocab_size": 4096,
                    "tokenizer": None}

    monkeypatch.setattr(compare, "_client", lambda uri, ws: None)
    monkeypatch.setattr(compare, "load_run_curve", curve)


def test_the_printed_report_path_is_where_the_report_is(tmp_path, monkeypatch, capsys):
    """workspace=~/ws: the report went to $HOME/ws/analysis/compare, but the CLI printed <cwd>/~/ws/... ."""
    from open360.analysis.compare import main

    two_runs(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["runs=[a,b]", "workspace=~/ws"]) == 0
    report = tmp_path / "ws" / "analysis" / "compare" / "compare.md"
    assert report.is_file() and f", {report}\n" in capsys.readouterr().out


def test_a_failure_while_writing_leaves_the_previous_outputs_whole(tmp_path, monkeypatch):
    """compare.parquet, its summary, the plot and compare.md are one result: a failure (or Ctrl-C) while they
    are written left a new table beside the old report; now they replace the previous ones together."""
    import open360.analysis.compare as compare

    two_runs(monkeypatch)
    out = tmp_path / "out"
    compare_runs(CompareConfig(runs=["a", "b"], workspace=str(tmp_path), out_dir=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"compare.parquet", "compare_summary.parquet", "compare.png", "compare.md"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "plot_race", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_runs(CompareConfig(runs=["a"], workspace=str(tmp_path), out_dir=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_while_the_plot_is_written_names_the_plot_alone(tmp_path, monkeypatch, capsys):
    """replace_together nests one atomic replacement per file: the plot's error went out through the table's and
    the summary's too, each wrapping it again, so the line began `compare.parquet: could not be written`."""
    import errno

    import open360.analysis.compare as compare

    two_runs(monkeypatch)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(compare, "plot_race", full_disk)
    out = tmp_path / "out"
    assert compare.main(["runs=[a,b]", f"workspace={tmp_path}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"open360.analysis.compare: [Errno 28] {out / 'compare.png'}: could not be written "
                   "([Errno 28] No space left on device)"), err
    assert list(out.iterdir()) == []


def test_a_fine_tune_is_placed_at_its_base_compute_plus_its_own(tmp_path, capsys):
    """A run warm-started from a checkpoint (a PI fine-tune) holds its base's training: its tokens and FLOPs
    axes start where the base's ended (through a chain of warm starts), each part at its own model/seq_len."""
    import json

    import yaml
    from omegaconf import OmegaConf

    from open360.analysis.compare import flops_per_token, warm_start_cost
    from open360.config import compose

    def ckpt(name: str, tokens: int, seq_len: int, init: str | None) -> dict:
        cfg = OmegaConf.to_container(compose(["+experiment=amber_tiny", f"trainer.seq_len={seq_len}",
                                              f"model.max_seq_len={seq_len}"]), resolve=True)
        cfg["trainer"]["init_from"] = init
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(cfg))
        (tmp_path / name / "lineage.json").write_text(json.dumps({"tokens_seen": tokens}))
        return cfg

    first = ckpt("first", 1000, 128, None)
    second = ckpt("second", 300, 256, str(tmp_path / "first"))  # relative names resolve in the workspace too
    run = {"trainer": {"init_from": "second"}}
    tokens, flops = warm_start_cost(run, tmp_path, "ft")
    assert tokens == 1300
    assert flops == pytest.approx(1000 * flops_per_token(first["model"], 128) + 300 * flops_per_token(second["model"], 256))
    assert warm_start_cost({"trainer": {"init_from": None}}, tmp_path, "scratch") == (0.0, 0.0)
    assert warm_start_cost({"trainer": {"init_from": "gone"}}, tmp_path, "ft") == (0.0, 0.0)
    assert "run 'ft' started from" in capsys.readouterr().err


def test_an_unreadable_store_is_named_without_its_password(tmp_path):
    """The store's own error and its URI are shown masked: the line goes to logs and terminals."""
    from open360.analysis.compare import _client

    with pytest.raises(ValueError, match=r"the MLflow store postgresql://u:\*\*\*@127\.0\.0\.1:1/db is unreadable") as err:
        _client("postgresql://u:hunter2@127.0.0.1:1/db", tmp_path)
    assert "hunter2" not in str(err.value)


def test_a_store_with_a_damaged_table_is_one_line_without_mlflows_tracebacks(tmp_path, capfd):
    """An SQLite store of the current schema whose experiments table lost a column: MLflow's own logger printed
    two tracebacks before open360's one-line message."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from open360.analysis.compare import main

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("ALTER TABLE experiments RENAME COLUMN name TO damaged")
    capfd.readouterr()
    assert main(["runs=[a]", f"workspace={tmp_path}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capfd.readouterr().err
    assert "mlflow.db is unreadable" in err and "Traceback" not in err, err
