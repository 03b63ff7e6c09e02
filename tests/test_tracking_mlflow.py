"""MLflow logger: batched metrics read back exactly, resume continues the run, params masked and bounded."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from open360.credentials import is_secret_key, mask_secrets
from open360.tracking import build_callbacks
from open360.tracking import mlflow_records as mr
from open360.tracking.mlflow_logger import RUN_ID_KEY, MlflowLogger, resolve_tracking_uri
from open360.tracking.params import MAX_PARAM_VALUE_LENGTH, config_params
from open360.train.callbacks import RunInfo

CONFIG = {
    "run_name": "r",
    "model": {"d_model": 64, "n_layers": 2},
    "optim": {"lr": 3e-4, "betas": [0.9, 0.95]},
    "stages": [{"name": "s1", "steps": 5}],
    "services": {"hf_token": "hf_abc", "db": "postgresql://alice:hunter2@db/mlflow"},
    "tokenizer": "bpe",
    "long": "x" * 7000,
}


@pytest.fixture(scope="module")
def db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized mlflow.db (creating the schema takes seconds); each test copies it."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mr.client(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture()
def ws(tmp_path: Path, db_template: Path) -> Path:
    shutil.copy(db_template, tmp_path / "mlflow.db")
    return tmp_path


def info(ws: Path, start: int = 0, extra: dict | None = None) -> RunInfo:
    return RunInfo("r", ws, ws / "checkpoints" / "r", CONFIG, "run_name: r\n", start, extra=extra or {})


def test_params_masking_and_limits() -> None:
    assert is_secret_key("a.hf_token") and is_secret_key("API_KEY") and is_secret_key("x.password")
    # camelCase keys name credentials too (a `${oc.env:HF_TOKEN}` under `hfToken` was published in the clear)
    assert all(is_secret_key(k) for k in ("data.hfToken", "dbPassword", "clientSecret", "wandbApiKey", "myAPIKey",
                                          "ssh.passphrase", "keyPassphrase", "wandb_key", "ssh_key", "db_pass",
                                          "wandbKey", "tracking.mlflow_key", "awsKey"))
    assert config_params({"data": {"hfToken": "hf_abc"}})["data.hfToken"] == "***"
    assert (
        not is_secret_key("tokenizer")
        and not is_secret_key("tokens_seen")
        and not is_secret_key("max_tokens")
        and not is_secret_key("maxTokens")
        and not is_secret_key("tokenizerPath")
        and not any(is_secret_key(k) for k in ("sort_key", "cache_key", "key", "keys", "monkey", "passes", "bypass",
                                               "compass_dir", "num_passes"))
    )
    params = config_params(CONFIG)
    assert params["services.hf_token"] == "***"
    assert params["services.db"] == "postgresql://alice:***@db/mlflow"
    assert params["tokenizer"] == "bpe" and params["optim.betas"] == "[0.9, 0.95]"
    assert params["stages.0.name"] == "s1"
    assert len(params["long"]) == MAX_PARAM_VALUE_LENGTH and "truncated" in params["long"]
    assert "hunter2" not in json.dumps(mask_secrets(CONFIG))
    assert config_params({"secrets": {"db": "x"}})["secrets.db"] == "***"  # a secret group hides all
    from open360.credentials import mask_value

    for uri, masked in (
        ("https://:tok123@host/x", "https://:***@host/x"),  # a token with no user name
        ("postgresql://alice:p@ss@db/x", "postgresql://alice:***@db/x"),  # a password holding '@'
        ("http://host:5000/api", "http://host:5000/api"),
        ("https://hf_TOKEN123@host/x", "https://***@host/x"),  # a token as the user name
        ("http://h/api?token=abc&run=1", "http://h/api?token=***&run=1"),
        ("s3://b/k?X-Amz-Signature=abc123#f", "s3://b/k?X-Amz-Signature=***#f"),
        ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),  # not secrets
        ("https://host/d.parquet?author=bob&keyword=x", "https://host/d.parquet?author=bob&keyword=x"),
        ("postgresql://alice@db/x", "postgresql://alice@db/x"),
    ):
        assert mask_value(uri) == masked
    from open360.credentials import holds_credentials

    # refused as a tracking URI: a password, a token of a known kind, a secret query value; a long user name
    # is masked in logs (it may be a token) but is no reason to refuse a run
    for uri, held in (("http://alice:pw@h:5000", True), ("https://hf_TOKEN123@host/x", True),
                      ("http://h/api?token=abc", True), ("postgresql://mlflow_tracking_service@db.internal/m", False),
                      ("databricks://profile", False), ("file:./mlruns", False), ("sqlite:///mlflow.db", False)):
        assert holds_credentials(uri) is held, uri


def test_an_unreachable_tracking_server_is_one_error_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from open360.tracking.mlflow_logger import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = MlflowLogger("http://alice:s3cr3tPW@127.0.0.1:9", "exp", "r", tmp_path)
    with pytest.raises(TrackingError, match=r"MLflow tracking store http://alice:\*\*\*@127.0.0.1:9 is not reachable") as err:
        logger.on_run_start(info(tmp_path))
    assert "s3cr3tPW" not in str(err.value) and err.value.__cause__ is None


def test_preflight_fails_fast_on_a_server_that_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default HTTP back-off takes minutes; the run's preflight (before shards and model) does not."""
    import time

    from open360.tracking.mlflow_logger import TrackingError

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    logger = MlflowLogger("http://alice:s3cr3tPW@127.0.0.1:9", "exp", "r", tmp_path)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="is not reachable") as err:
        logger.preflight()
    assert time.monotonic() - start < 60 and "s3cr3tPW" not in str(err.value)
    import os

    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the run's later writes keep MLflow's retries


def test_a_database_store_without_its_driver_is_one_error(tmp_path: Path) -> None:
    """postgresql:// with no driver installed: a TrackingError naming what to install, password masked."""
    import importlib.util

    from open360.tracking.mlflow_logger import TrackingError

    if importlib.util.find_spec("psycopg") or importlib.util.find_spec("psycopg2"):
        pytest.skip("a postgresql driver is installed here")
    logger = MlflowLogger("postgresql://alice:s3cr3tPW@127.0.0.1:9/db", "exp", "r", tmp_path)
    with pytest.raises(TrackingError, match="needs a database driver.*psycopg") as err:
        logger.preflight()
    assert "s3cr3tPW" not in str(err.value) and "\n" not in str(err.value) and err.value.__cause__ is None


def test_a_damaged_sqlite_store_is_one_error(tmp_path: Path) -> None:
    from open360.tracking.mlflow_logger import TrackingError

    (tmp_path / "mlflow.db").write_text("garbage, not a database\n")
    logger = MlflowLogger(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "r", tmp_path)
    with pytest.raises(TrackingError, match=r"mlflow.db is not reachable \(DatabaseError: .*not a database"):
        logger.on_run_start(info(tmp_path))


def test_a_store_locked_at_run_start_says_so(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite's busy timeout running out while the run starts is another writer, not a store that is down."""
    from mlflow.exceptions import MlflowException

    from open360.tracking.mlflow_logger import TrackingError

    def locked(self: MlflowLogger, info: RunInfo) -> str:
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(MlflowLogger, "_start_or_resume", locked)
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    with pytest.raises(TrackingError, match=r"mlflow.db stayed locked by another process \(MlflowException: "):
        logger.on_run_start(info(ws))


def test_tracking_uri_resolves_inside_workspace(tmp_path: Path) -> None:
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://server:5000", tmp_path) == "http://server:5000"


def test_metrics_batched_read_back_and_resume(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    batches: list[int] = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kw):  # noqa: ANN001, ANN202
        if metrics:
            batches.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, buffer_steps=10)
    logger.on_run_start(info(ws))
    computed = {}
    for step in range(1, 26):
        metrics = {"loss": 5.0 / step, "lr": 1e-3 * step, "tokens_seen": float(step * 256), "flag": True}
        computed[step] = metrics
        logger.on_step_end(step, metrics)
        if step == 20:
            logger.on_checkpoint_saved(step, ws / "checkpoints/r/step_20", published=True)
    logger.record_checkpoint(
        20, {"path": "checkpoints/r/step_20", "dvc_md5": "abc.dir", "git_revision": "deadbeef"}
    )
    meta = logger.run_metadata()
    logger.on_run_end({"status": "finished"})
    assert logger.errors == []
    # 25 steps x 3 numeric metrics went out in 3 batches (10 + 10 steps, then the end), not 75 calls
    assert batches == [30, 30, 15]
    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    run_id = meta[RUN_ID_KEY]
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, computed[s]["loss"]) for s in range(1, 26)]
    assert "flag" not in client.get_run(run_id).data.metrics
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["services.hf_token"] == "***"
    config_text = client.download_artifacts(run_id, "config/config.yaml", str(ws / "dl"))
    text = Path(config_text).read_text()
    assert "hf_abc" not in text and "hunter2" not in text and "d_model: 64" in text
    assert mr.checkpoint_record(client, run_id, 20)["dvc_md5"] == "abc.dir"
    assert mr.metrics_at(client, run_id, 20)["tokens_seen"] == 20 * 256
    assert (ws / "mlartifacts").is_dir()

    # resume from step 20: the same MLflow run continues; steps 21..25 are re-logged and the latest wins
    resumed = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, buffer_steps=10)
    resumed.on_run_start(info(ws, start=20, extra={RUN_ID_KEY: run_id}))
    assert resumed.run_id == run_id
    for step in range(21, 31):
        resumed.on_step_end(step, {"loss": 1.0 / step})
    resumed.on_run_end({"status": "failed"})
    assert client.get_run(run_id).info.status == "FAILED"
    latest = mr.metric_history(client, run_id)["loss"]
    assert sorted(latest) == list(range(1, 31)) and latest[25] == 1.0 / 25
    # the values at one step (`ckpt lineage`) are read without any metric's full history, latest write first
    monkeypatch.setattr(type(client), "get_metric_history", lambda *a: pytest.fail("read a full metric history"))
    assert mr.metrics_at(client, run_id, 25) == {"loss": 1.0 / 25, "lr": 1e-3 * 25, "tokens_seen": 25.0 * 256}
    assert mr.find_run_id(client, "r") == run_id


def test_metrics_are_in_the_store_before_a_checkpoint_is_written(ws: Path) -> None:
    """A kill right after a checkpoint must not lose the steps before it: a run resumed from it logs
    only later steps, so `on_checkpoint_start` returns once every buffered metric is stored."""
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, buffer_steps=50)
    logger.on_run_start(info(ws))
    for step in range(1, 31):
        logger.on_step_end(step, {"loss": 1.0 / step})
    logger.on_checkpoint_start(30, published=True)
    client = mr.client(logger.tracking_uri)  # read at once, the logger neither waited on nor ended
    assert sorted(m.step for m in client.get_metric_history(logger.run_id, "loss")) == list(range(1, 31))
    logger.on_run_end({"status": "finished"})


def _logger_over_a_store_that_hangs(
    ws: Path, monkeypatch: pytest.MonkeyPatch, write_s: float = 0.0
) -> tuple[MlflowLogger, threading.Event]:
    """A started logger (checkpoints wait 0.5 s) whose later metric writes hang until the returned event is set
    (20 s at most: never hang the suite), then take `write_s` each."""
    import time

    from mlflow.tracking import MlflowClient

    original, server_up = MlflowClient.log_batch, threading.Event()

    def hanging(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        server_up.wait(20)
        time.sleep(write_s)
        return original(self, *args, **kw)

    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, buffer_steps=100)
    logger.on_run_start(info(ws))
    assert logger.wait(60)
    logger.checkpoint_wait_s = 0.5
    monkeypatch.setattr(MlflowClient, "log_batch", hanging)
    return logger, server_up


def test_a_store_that_hangs_mid_run_costs_one_checkpoint_wait_not_one_per_checkpoint(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that goes down mid-run makes each write take minutes (MLflow's HTTP retries): the checkpoint
    after it waits its time once; later ones go on at once while the writes are still behind."""
    import time

    logger, server_up = _logger_over_a_store_that_hangs(ws, monkeypatch)
    waits = []
    for step in range(1, 31):
        logger.on_step_end(step, {"loss": 1.0 / step})
        if step % 10 == 0:
            start = time.monotonic()
            logger.on_checkpoint_start(step, published=True)
            waits.append(time.monotonic() - start)
    assert 0.4 < waits[0] < 5 and max(waits[1:]) < 0.3, waits
    assert "do not wait for them until" in capsys.readouterr().err
    server_up.set()
    assert logger.wait(60)
    logger.on_checkpoint_start(40, published=True)  # caught up: the checkpoints wait again
    assert not logger._stalled
    logger.on_run_end({"status": "finished"})
    history = mr.client(logger.tracking_uri).get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 31))


def test_once_a_hung_store_caught_up_the_checkpoints_wait_for_their_steps_again(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stall the store recovers, and steps are logged before the next checkpoint: that checkpoint's
    flush queues a write, and the checkpoint waits for it (a kill right after must not lose those steps)."""
    logger, server_up = _logger_over_a_store_that_hangs(ws, monkeypatch, write_s=0.2)  # then a working store
    for step in range(1, 11):
        logger.on_step_end(step, {"loss": 1.0 / step})
    logger.on_checkpoint_start(10, published=True)
    assert logger._stalled
    server_up.set()
    assert logger.wait(60)
    for step in range(11, 21):
        logger.on_step_end(step, {"loss": 1.0 / step})
    logger.checkpoint_wait_s = 30
    logger.on_checkpoint_start(20, published=True)
    history = mr.client(logger.tracking_uri).get_metric_history(logger.run_id, "loss")  # read before the end
    assert not logger._stalled
    logger.on_run_end({"status": "finished"})
    assert sorted(m.step for m in history) == list(range(1, 21))


def test_a_store_failing_mid_run_is_reported_without_its_password_and_a_lock_is_waited_out(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    original, calls = MlflowClient.log_batch, []

    def failing(self, run_id, metrics=(), **kw):  # noqa: ANN001, ANN202
        calls.append(len(metrics))
        if len(calls) <= 2:  # another writer holds the sqlite lock for a while: retried, nothing lost
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        if len(calls) == 4:  # then (the next batch) a server error whose text names the URI with its password
            raise MlflowException("API request to http://alice:s3cr3tPW@host:5000/api/2.0/mlflow/runs/log-batch failed")
        return original(self, run_id, metrics=metrics, **kw)

    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, buffer_steps=2)
    logger.preflight()
    logger.on_run_start(info(ws))
    assert logger.wait(60)  # params and config logged
    monkeypatch.setattr(MlflowClient, "log_batch", failing)
    for step in range(1, 5):
        logger.on_step_end(step, {"loss": 1.0 / step})
    logger.on_run_end({"status": "finished"})
    err = capsys.readouterr().err
    assert "s3cr3tPW" not in err and "Traceback" not in err and "alice:***@host" in err
    assert len(logger.errors) == 1 and "s3cr3tPW" not in logger.errors[0]
    history = mr.client(logger.tracking_uri).get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]  # the locked batch landed; the failed one is reported


def test_the_run_records_its_code_commit_and_data_hashes(ws: Path) -> None:
    shard_dir = ws / "shards" / "tiny-0123"
    shard_dir.mkdir(parents=True)
    (shard_dir / "manifest.json").write_text(json.dumps({"manifest_hash": "m" * 64, "tokenizer": {"sha256": "t" * 64}}))
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    hardware = {"world_size": 2, "device": "cuda", "accelerator": "NVIDIA H200", "cuda": "12.4"}
    logger.on_run_start(info(ws, extra={"shard_dirs": {"main": str(shard_dir)}, "hardware": hardware}))
    later = ws / "shards" / "code-4567"  # a later stage, opened mid-run
    later.mkdir()
    (later / "manifest.json").write_text(json.dumps({"manifest_hash": "n" * 64, "tokenizer": {"sha256": "t" * 64}}))
    logger.on_stage_open("stage2", later)
    logger.on_run_end({"status": "finished"})
    assert logger.errors == []
    tags = mr.client(logger.tracking_uri).get_run(logger.run_id).data.tags
    assert tags["open360.data.main.manifest_hash"] == "m" * 64 and tags["open360.data.main.shard_dir"] == "tiny-0123"
    assert tags["open360.data.main.tokenizer_sha256"] == "t" * 64
    assert tags["open360.data.stage2.manifest_hash"] == "n" * 64 and tags["open360.data.stage2.shard_dir"] == "code-4567"
    from open360.checkpoint.lineage import git_revision

    assert tags.get("mlflow.source.git.commit") == git_revision()["revision"] and "open360.code_dirty" in tags
    assert tags["open360.hardware.from_step_0"] == "2 x NVIDIA H200 (cuda 12.4)"  # a resume adds its own
    from open360.tracking.mlflow_logger import _hardware_tag

    assert _hardware_tag(40, hardware) == {"open360.hardware.from_step_40": "2 x NVIDIA H200 (cuda 12.4)"}
    assert _hardware_tag(40, None) == {}  # a start that recorded none (an older caller) tags nothing


def test_a_lock_that_persists_costs_one_budget_then_writes_fail_at_once() -> None:
    import time

    from open360.tracking.mlflow_logger import LockRetry

    def locked() -> None:
        raise RuntimeError("(sqlite3.OperationalError) database is locked")

    retry = LockRetry(budget_s=1.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="locked"):
        retry(locked)
    assert 0.9 < time.monotonic() - start < 5
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="locked"):
        retry(locked)  # the budget is spent: no second wait (training blocks on these at each checkpoint)
    assert time.monotonic() - start < 0.5
    assert retry(lambda: 7) == 7  # a write that succeeds gives the next lock a fresh budget
    with pytest.raises(ValueError):
        retry(lambda: int("x"))  # anything but a lock is not retried


def test_a_backfilled_checkpoint_record_fills_a_gap_and_keeps_an_existing_one(ws: Path) -> None:
    """After a kill, the resumed run's DVC catch-up sends every earlier checkpoint's record again, marked
    backfill: it lands where the killed run's record never arrived, and leaves the others as they were."""
    from open360.tracking.mlflow_logger import BACKFILL_KEY

    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    logger.on_run_start(info(ws))
    logger.record_checkpoint(8, {"dvc_md5": "first.dir", "git_revision": "aaa"})
    logger.record_checkpoint(8, {"dvc_md5": "first.dir", "git_revision": "bbb", BACKFILL_KEY: True})
    logger.record_checkpoint(4, {"dvc_md5": "late.dir", "git_revision": "bbb", BACKFILL_KEY: True})
    # a push that failed, then the catch-up of a resume pushed that same folder: the record now says so
    logger.record_checkpoint(12, {"dvc_md5": "m.dir", "git_revision": "aaa", "pushed": False})
    logger.record_checkpoint(12, {"dvc_md5": "m.dir", "git_revision": "bbb", "pushed": True, BACKFILL_KEY: True})
    # a step number now holding another folder (a branch): the record of the old one stays as it was
    logger.record_checkpoint(16, {"dvc_md5": "old.dir", "pushed": False})
    logger.record_checkpoint(16, {"dvc_md5": "new.dir", "pushed": True, BACKFILL_KEY: True})
    logger.on_run_end({"status": "finished"})
    client = mr.client(logger.tracking_uri)
    assert mr.checkpoint_record(client, logger.run_id, 8)["git_revision"] == "aaa"
    assert mr.checkpoint_record(client, logger.run_id, 4) == {"step": 4, "dvc_md5": "late.dir", "git_revision": "bbb"}
    assert mr.checkpoint_record(client, logger.run_id, 12) == {
        "step": 12, "dvc_md5": "m.dir", "git_revision": "aaa", "pushed": True
    }
    assert mr.checkpoint_record(client, logger.run_id, 16) == {"step": 16, "dvc_md5": "old.dir", "pushed": False}


def test_a_checkpoint_record_that_comes_before_the_run_starts_is_written_once_it_has(ws: Path) -> None:
    """A resumed run's DVC catch-up runs in its own process, started first: its records can come back before the
    MLflow run has started (a branch copying a long history, a slow server). They wait for the run, not vanish."""
    from open360.tracking.mlflow_logger import BACKFILL_KEY

    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    logger.record_checkpoint(4, {"dvc_md5": "a.dir", "pushed": True, BACKFILL_KEY: True})
    logger.on_run_start(info(ws, start=4))
    logger.on_run_end({"status": "finished"})
    assert logger.errors == []
    assert mr.checkpoint_record(mr.client(logger.tracking_uri), logger.run_id, 4) == {
        "step": 4, "dvc_md5": "a.dir", "pushed": True
    }


def test_a_resumed_run_without_dvc_records_the_checkpoints_a_kill_left_unrecorded(ws: Path) -> None:
    """Without DVC the logger records each published checkpoint itself, in the background: a run killed right
    after its step-8 checkpoint was written never recorded it. The resumed run sends the record of every
    checkpoint up to its start again (kept where the run has one), as the DVC catch-up does with DVC."""
    run_dir = ws / "checkpoints" / "r"
    for step in (4, 8, 12):  # step 12: a later checkpoint (not this run's history from step 8 on)
        (run_dir / f"step_{step}").mkdir(parents=True)
        (run_dir / f"step_{step}" / "lineage.json").write_text("{}")
    first = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    first.record_local_checkpoints = True
    first.on_run_start(info(ws))
    first.record_checkpoint(4, {"path": "checkpoints/r/step_4", "dvc_md5": None, "git_revision": "kept"})
    first.on_run_end({"status": "interrupted"})  # killed before the record of step 8 was written

    resumed = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    resumed.record_local_checkpoints = True
    resumed.on_run_start(info(ws, start=8, extra={RUN_ID_KEY: first.run_id}))
    resumed.on_run_end({"status": "finished"})
    assert resumed.run_id == first.run_id and resumed.errors == []
    records = mr.checkpoint_records(mr.client(resumed.tracking_uri), resumed.run_id)
    assert sorted(records) == [4, 8]
    assert records[4]["git_revision"] == "kept"
    assert records[8] == {"step": 8, "path": "checkpoints/r/step_8", "dvc_md5": None, "git_revision": None, "pushed": False}


def _ten_steps(ws: Path, run_name: str = "r", start: int = 0, extra: dict | None = None, loss: float = 1.0) -> str:
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", run_name, ws)
    logger.on_run_start(RunInfo(run_name, ws, ws / "checkpoints" / run_name, CONFIG, "", start, extra=extra or {}))
    for step in range(start + 1, 11):
        logger.on_step_end(step, {"loss": loss})
    logger.on_run_end({"status": "finished"})
    assert logger.errors == []
    return str(logger.run_id)


def test_a_start_from_scratch_closes_the_run_a_kill_before_its_first_checkpoint_left_running(ws: Path) -> None:
    """Killed before its first checkpoint, a run stays RUNNING in MLflow and nothing resumes it: the next start
    of that run name in that workspace marks it KILLED, pointing at its successor; another workspace's is kept."""
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    exp = client.create_experiment("exp")
    killed = client.create_run(exp, tags={"open360.run_name": "r", "open360.workspace": str(ws)}).info.run_id
    elsewhere = client.create_run(exp, tags={"open360.run_name": "r", "open360.workspace": "/other"}).info.run_id
    new = _ten_steps(ws)
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(killed).data.tags["open360.superseded_by_run_id"] == new
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(new).info.status == "FINISHED" and mr.find_run_id(client, "r") == new
    assert _ten_steps(ws, start=5, extra={RUN_ID_KEY: new}) == new  # a resume closes nothing
    assert client.get_run(new).info.status == "FINISHED"


def test_a_branch_killed_before_its_first_checkpoint_is_continued_not_the_run_it_replaced(ws: Path) -> None:
    """Branch from step 5, killed before it saves: resume=auto finds checkpoint 5 again, whose lineage names
    the replaced run. The branch's run goes on; the replaced run's steps 6..10 stay as they were."""
    old = _ten_steps(ws)
    branch = _ten_steps(ws, start=5, extra={RUN_ID_KEY: old, "branch": {"from_step": 5, "superseded": "x"}}, loss=2.0)
    resumed = _ten_steps(ws, start=5, extra={RUN_ID_KEY: old}, loss=3.0)
    assert resumed == branch != old
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    assert mr.metric_history(client, old)["loss"] == {s: 1.0 for s in range(1, 11)}
    assert mr.metric_history(client, branch)["loss"] == {s: 1.0 if s <= 5 else 3.0 for s in range(1, 11)}
    assert _ten_steps(ws, start=7, extra={RUN_ID_KEY: old}) == old  # a resume from another step: the run itself
    moved = MlflowLogger("sqlite:///mlflow.db", "renamed_exp", "r", ws)  # tracking.experiment changed since
    moved.on_run_start(info(ws, 10, {RUN_ID_KEY: old}))
    moved.on_run_end({"status": "finished"})
    assert moved.run_metadata()["mlflow_experiment_id"] == client.get_run(old).info.experiment_id


def test_a_second_start_from_one_step_keeps_the_first_starts_hardware(ws: Path) -> None:
    """A branch from step 5 on one machine, killed before its first checkpoint (so no lineage.json records its
    hardware), resumed from step 5 on another: the branch's run holds both starts' hardware, the first unchanged."""
    old = _ten_steps(ws, extra={"hardware": {"world_size": 1, "device": "cpu", "accelerator": "x86_64 AVX2"}})
    h200 = {"world_size": 8, "device": "cuda", "accelerator": "NVIDIA H200", "cuda": "12.4"}
    a100 = {"world_size": 2, "device": "cuda", "accelerator": "NVIDIA A100", "cuda": "12.1"}
    branch = _ten_steps(ws, start=5, extra={RUN_ID_KEY: old, "branch": {"from_step": 5, "superseded": "x"},
                                            "hardware": h200})
    assert _ten_steps(ws, start=5, extra={RUN_ID_KEY: old, "hardware": a100}) == branch
    assert _ten_steps(ws, start=5, extra={RUN_ID_KEY: old, "hardware": h200}) == branch
    tags = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws)).get_run(branch).data.tags
    assert {k: v for k, v in tags.items() if k.startswith("open360.hardware.")} == {
        "open360.hardware.from_step_5": "8 x NVIDIA H200 (cuda 12.4)",
        "open360.hardware.from_step_5.start_2": "2 x NVIDIA A100 (cuda 12.1)",
        "open360.hardware.from_step_5.start_3": "8 x NVIDIA H200 (cuda 12.4)",
    }


def test_a_branch_whose_mlflow_run_was_deleted_does_not_stop_the_resume(ws: Path) -> None:
    """The branch killed before its first checkpoint, its MLflow run deleted (it was junk): resuming from the
    branch step continues the replaced run, as before there was a branch, instead of failing to start."""
    old = _ten_steps(ws)
    branch = _ten_steps(ws, start=5, extra={RUN_ID_KEY: old, "branch": {"from_step": 5, "superseded": "x"}})
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    client.delete_run(branch)
    assert _ten_steps(ws, start=5, extra={RUN_ID_KEY: old}, loss=3.0) == old


def test_a_checkpoint_resumed_under_another_run_name_gets_a_run_of_its_own(ws: Path) -> None:
    old = _ten_steps(ws)
    other = _ten_steps(ws, "other", start=5, extra={RUN_ID_KEY: old}, loss=2.0)
    assert other != old
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    assert mr.find_run_id(client, "other") == other and mr.find_run_id(client, "r") == old
    assert mr.metric_history(client, old)["loss"] == {s: 1.0 for s in range(1, 11)}
    assert mr.metric_history(client, other)["loss"] == {s: 1.0 if s <= 5 else 2.0 for s in range(1, 11)}
    tags = client.get_run(other).data.tags
    assert tags["open360.resumed_from_run_id"] == old and tags["open360.resumed_from_step"] == "5"


def test_a_continued_run_appends_its_system_metrics(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """System metrics count samples from step 0: a resumed segment must go on after the first one's samples,
    not write the same steps again (the latest write per step would hide the first segment's)."""
    import time

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    key, run_id = "system/cpu_utilization_percentage", None
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    for start in (0, 5):
        logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws, system_metrics=True)
        logger.on_run_start(info(ws, start, {RUN_ID_KEY: run_id} if run_id else None))
        run_id = logger.run_id
        before = len(client.get_metric_history(run_id, key))
        deadline = time.monotonic() + 30
        while len(client.get_metric_history(run_id, key)) <= before and time.monotonic() < deadline:
            time.sleep(0.2)
        logger.on_run_end({"status": "finished"})
    steps = [m.step for m in client.get_metric_history(run_id, key)]
    assert len(steps) >= 2 and len(set(steps)) == len(steps), steps


def test_a_checkpoint_whose_mlflow_run_was_deleted_resumes_into_a_new_run_with_its_history(ws: Path) -> None:
    """A deleted run takes no writes (the store refuses them): the resume starts a run that holds the deleted
    run's metrics and checkpoint records up to the resume step, instead of failing to start."""
    old = _ten_steps(ws)
    client = mr.client(resolve_tracking_uri("sqlite:///mlflow.db", ws))
    for step in (5, 10):
        client.set_tag(old, mr.checkpoint_tag(step), json.dumps({"dvc_md5": f"{step}.dir"}))
    client.delete_run(old)
    new = _ten_steps(ws, start=5, extra={RUN_ID_KEY: old}, loss=2.0)
    assert new != old and client.get_run(old).info.lifecycle_stage == "deleted"
    assert mr.metric_history(client, new)["loss"] == {s: 1.0 if s <= 5 else 2.0 for s in range(1, 11)}
    assert set(mr.checkpoint_records(client, new)) == {5}
    tags = client.get_run(new).data.tags
    assert tags["open360.resumed_from_run_id"] == old and tags["open360.resumed_from_step"] == "5"


def test_resume_with_unknown_run_id_starts_new_run(ws: Path) -> None:
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    logger.on_run_start(info(ws, start=5, extra={RUN_ID_KEY: "0123456789abcdef"}))
    logger.on_run_end({"status": "finished"})
    client = mr.client(logger.tracking_uri)
    assert client.get_run(logger.run_id).data.tags["open360.resumed_from_run_id"] == "0123456789abcdef"


def test_build_callbacks_off_and_rank(tmp_path: Path) -> None:
    off = OmegaConf.create({"run_name": "r", "tracking": {"mlflow": False, "dvc": False}})
    assert build_callbacks(off, tmp_path, is_main=True) == []
    on = OmegaConf.create(
        {
            "run_name": "r",
            "tracking": {
                "mlflow": True,
                "mlflow_uri": "sqlite:///mlflow.db",
                "experiment": "e",
                "metric_buffer_steps": 5,
                "system_metrics": False,
                "dvc": False,
                "dvc_push": False,
                "dvc_remote": None,
            },
        }
    )
    assert build_callbacks(on, tmp_path, is_main=False) == []
    (logger,) = build_callbacks(on, tmp_path, is_main=True)
    assert isinstance(logger, MlflowLogger) and logger.record_local_checkpoints
    assert logger.buffer_steps == 5 and logger.tracking_uri.endswith(f"{tmp_path}/mlflow.db")


def test_release_trees_are_published_without_secrets_or_local_paths(tmp_path: Path) -> None:
    from open360.tracking.release import publishable

    tree = {
        "tracking": {"mlflow_uri": "postgresql://alice:s3cret@db.example.org/mlflow", "hf_token": "hf_abc"},
        "callbacks": {"mlflow_tracking_uri": f"sqlite:///{tmp_path.resolve()}/mlflow.db"},
        "steps": [1, 2],
    }
    assert publishable(tree, tmp_path) == {
        "tracking": {"mlflow_uri": "postgresql://alice:***@db.example.org/mlflow", "hf_token": "***"},
        "callbacks": {"mlflow_tracking_uri": "sqlite:///./mlflow.db"},
        "steps": [1, 2],
    }


def test_the_run_link_printed_at_the_end_hides_the_password(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """MLflow prints "View run ... at: <tracking URI>" when an HTTP store's run ends; open360 turns that off
    and prints the link masked (the training log is published)."""
    import os

    from open360.tracking.cli import _mlflow_lines

    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    seen = {}

    class Client:
        def set_terminated(self, run_id: str, status: str) -> None:
            seen["suppressed"] = os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    logger._client, logger.run_id, logger.experiment_id = Client(), "abc", "7"
    logger.tracking_uri = "http://alice:S3cr3tPW@127.0.0.1:5055"
    logger._finish({}, "FINISHED")
    out = capsys.readouterr().out
    assert seen["suppressed"] == "true" and "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    assert "MLflow run at http://alice:***@127.0.0.1:5055/#/experiments/7/runs/abc" in out and "S3cr3t" not in out

    class Run:
        info = type("Info", (), {"run_name": "r", "experiment_id": "7"})

    monkeypatch.setattr(mr, "read_store", lambda uri, read: (Run(), {}, None))
    lines, _ = _mlflow_lines({"mlflow_run_id": "abc"}, 4, None, "http://alice:S3cr3tPW@127.0.0.1:5055")
    assert "in http://alice:***@127.0.0.1:5055" in lines[0] and "S3cr3t" not in "\n".join(lines)


def test_a_failed_close_of_earlier_runs_is_reported_without_the_password(
    ws: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """MLflow's HTTP errors quote the request URL, the tracking URI's password included: the note that the earlier
    RUNNING runs of the name could not be closed masks it, as every open360 message does."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def down(*args: object, **kwargs: object) -> None:
        raise MlflowException("API request to http://alice:S3cr3tPW@127.0.0.1:5055/api/2.0/mlflow/runs/search "
                              "failed with exception ConnectionError")

    monkeypatch.setattr(MlflowClient, "search_runs", down)
    logger = MlflowLogger("sqlite:///mlflow.db", "exp", "r", ws)
    logger.on_run_start(info(ws))
    logger.on_run_end({"status": "finished"})
    err = capsys.readouterr().err
    assert "could not close earlier RUNNING runs of 'r'" in err and "http://alice:***@" in err and "S3cr3t" not in err
