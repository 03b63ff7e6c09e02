"""MLflow logging as a trainer callback: params + config artifact, buffered batch metrics, checkpoint records."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from open360.credentials import mask_secrets, mask_value
from open360.tracking.params import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    config_params,
    fit_tag,
)
from open360.tracking.worker import BackgroundWorker
from open360.train.callbacks import Callback, RunInfo

RUN_ID_KEY = "mlflow_run_id"  # key in RunInfo.extra (resume) and in run_metadata() (checkpoint lineage)
CHECKPOINT_TAG_PREFIX = "open360.checkpoint.step_"
BACKFILL_KEY = "backfill"  # in a checkpoint record: set the run tag only where the run has none
CONFIG_ARTIFACT = "config/config.yaml"
BRANCH_RUN_TAG = "open360.branch_run"  # on a run a branch replaced after a step: {"run_id", "step"} (JSON)


def resolve_tracking_uri(uri: str, workspace: Path) -> str:
    """`sqlite:///relative.db` → an absolute sqlite URI inside the workspace; other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        rest = uri[len(prefix) :]
        if not rest.startswith("/") and rest != ":memory:":
            return prefix + str(Path(workspace).expanduser().resolve() / rest)
    return uri


def checkpoint_tag(step: int) -> str:
    """Run tag that holds the JSON record of the checkpoint saved at `step`."""
    return f"{CHECKPOINT_TAG_PREFIX}{step}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


class LockRetry:
    """Runs MLflow writes, retrying while a sqlite store reports "database is locked" (another writer, a
    reader holding a transaction): a lock that clears costs a wait, not the metrics. One budget for all
    writes: a lock that persists costs the run at most `budget_s` once; after that each write fails at once
    (reported) until one succeeds."""

    def __init__(self, budget_s: float = 60.0) -> None:
        self.budget_s = budget_s
        self._deadline: float | None = None

    def __call__(self, fn: Any) -> Any:
        delay = 0.5
        while True:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - MlflowException or SQLAlchemy OperationalError
                now = time.monotonic()
                if "database is locked" not in str(err):
                    raise
                if self._deadline is None:
                    self._deadline = now + self.budget_s
                if now >= self._deadline:
                    raise
                time.sleep(min(delay, self._deadline - now))
                delay = min(delay * 2, 10.0)
            else:
                self._deadline = None
                return result


@contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """MLflow environment settings for the duration of a block, each only where the user has not set it."""
    added = [key for key in values if key not in os.environ]
    os.environ.update({key: values[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# while the run starts, MLflow's HTTP retries are cut to one with a 15 s timeout (a server that is down fails fast)
STARTUP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# MLflow prints "View run ... at: <tracking URI>/..." when a run ends, password and all; open360 prints it masked
NO_URL_PRINT = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _code_tags() -> dict[str, str]:
    """The code commit (MLflow's own `mlflow.source.git.commit`) and whether the tree was dirty."""
    from open360.checkpoint.lineage import git_revision

    code = git_revision()
    tags = {"open360.code_dirty": str(code["dirty"])}
    if code["revision"]:
        tags["mlflow.source.git.commit"] = code["revision"]
    return tags


def _stage_tags(stage: str, folder: str | Path) -> dict[str, str]:
    """A stage's shard folder with its manifest and tokenizer hashes (none if its manifest is unreadable)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return {
        f"open360.data.{stage}.shard_dir": Path(folder).name,
        f"open360.data.{stage}.manifest_hash": str(manifest.get("manifest_hash")),
        f"open360.data.{stage}.tokenizer_sha256": str((manifest.get("tokenizer") or {}).get("sha256")),
    }


def _hardware_tag(start_step: int, hardware: dict[str, Any] | None, existing: Any = ()) -> dict[str, str]:
    """One tag per start of the run (a resume may run on other hardware): `from_step_N`, and for a later start
    from the same step N (the one before was killed before its first checkpoint, so no lineage.json records
    its hardware) `from_step_N.start_K`, K = 2, 3, ...; `existing`: the run's tags, none of them replaced."""
    from open360.checkpoint.lineage import describe_hardware

    if not hardware:
        return {}
    base = f"open360.hardware.from_step_{start_step}"
    key, start = base, 1
    while key in existing:
        start += 1
        key = f"{base}.start_{start}"
    return {key: describe_hardware(hardware)}


class TrackingError(RuntimeError):
    """The tracking store cannot be used (a server that is down); the message has the URI masked."""


class MlflowLogger(Callback):
    """Logs one run to MLflow from rank 0; every MLflow call after the run starts is on a background thread."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        workspace: Path,
        buffer_steps: int = 50,
        system_metrics: bool = False,
    ) -> None:
        if buffer_steps < 1:
            raise ValueError(f"tracking.metric_buffer_steps={buffer_steps}: must be >= 1")
        self.workspace = Path(workspace).expanduser().resolve()
        self.tracking_uri = resolve_tracking_uri(tracking_uri, self.workspace)
        self.experiment = experiment
        self.run_name = run_name
        self.buffer_steps = buffer_steps
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: Any = None
        self._buffer: list[Any] = []
        self._last_flush_step = 0
        self._worker: BackgroundWorker | None = None
        # records that reach the logger before its run starts (a resumed run's DVC catch-up can finish first)
        self._early_records: list[tuple[int, dict[str, Any]]] = []
        self._start_lock = threading.Lock()  # the DVC versioner delivers records from its result thread
        self._monitor: Any = None
        self._continued = False  # True once _start_or_resume continues an existing run
        self._lock_retry = LockRetry()
        self.checkpoint_wait_s = 600.0  # the most a checkpoint waits for the writes before it
        self._caught_up: threading.Event | None = None  # set by the worker once the writes of a timed-out wait ran
        # Without DVC, published checkpoints are recorded here (no md5); with DVC, the versioner records them.
        self.record_local_checkpoints = False

    # --- trainer hooks -------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Open the store and its experiment before the run builds anything; a server that is down fails in
        seconds (one retry) rather than after MLflow's default back-off of several minutes."""
        with _env_defaults(STARTUP_RETRIES):
            self._connect(lambda: None)

    def on_run_start(self, info: RunInfo) -> None:
        self._connect(lambda: setattr(self, "run_id", self._start_or_resume(info)))
        self._last_flush_step = info.start_step
        with self._start_lock:
            self._worker = BackgroundWorker(f"mlflow[{self.run_name}]")
            self._submit(self._log_config, info)
            self._submit(self._tag_hardware, info)
            for step, record in self._early_records:
                self._submit(self._log_checkpoint_record, step, record)
            self._early_records = []
        if self.record_local_checkpoints and info.start_step > 0:
            self._backfill_local_records(info.checkpoint_dir, info.start_step)
        if self.system_metrics:
            self._start_system_metrics()

    def on_stage_open(self, stage: str, shard_dir: Path) -> None:
        """A later stage's shards as run tags (those open at the start are tagged by on_run_start)."""
        if self._worker is not None:
            self._submit(self._set_tags, _stage_tags(stage, shard_dir))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._buffer.append(Metric(key=key, value=float(value), timestamp=now, step=step))
        if step - self._last_flush_step >= self.buffer_steps:
            self.flush(step)

    def on_checkpoint_start(self, step: int, published: bool) -> None:
        # A run resumed from this checkpoint logs from step + 1 on: steps up to here must be in the store
        # before the checkpoint can exist (a kill right after the save would otherwise lose them).
        self.flush(step)
        if self._worker is None:
            return
        if self._stalled:  # a store that hangs costs one wait, not one per checkpoint
            return
        self._caught_up = None
        if not self._worker.drain(timeout=self.checkpoint_wait_s):
            # behind until the writes queued so far have run, then the checkpoints wait again (pending() is no
            # measure of that: each checkpoint's flush above queues one more write first)
            self._caught_up = threading.Event()
            self._worker.submit(self._caught_up.set)
            print(
                f"open360.tracking: MLflow writes up to step {step} did not finish in {self.checkpoint_wait_s:g} s "
                "before the checkpoint; a kill now may lose them. Later checkpoints do not wait for them until "
                f"the store {mask_value(self.tracking_uri)} catches up",
                file=sys.stderr,
            )

    @property
    def _stalled(self) -> bool:
        """A checkpoint's wait ran out and the writes queued before it have not all run yet."""
        return self._caught_up is not None and not self._caught_up.is_set()

    def on_checkpoint_saved(self, step: int, path: Path, published: bool) -> None:
        self.flush(step)
        if published and self.record_local_checkpoints:
            self.record_checkpoint(step, self._local_record(path))

    def _local_record(self, path: Path) -> dict[str, Any]:
        """The record of a published checkpoint of a run without DVC: its folder, no md5, not pushed."""
        try:
            rel = Path(path).resolve().relative_to(self.workspace).as_posix()
        except ValueError:
            rel = str(path)
        return {"path": rel, "dvc_md5": None, "git_revision": None, "pushed": False}

    def _backfill_local_records(self, checkpoint_dir: Path, start_step: int) -> None:
        """A resumed run without DVC: a killed run may have saved a published checkpoint whose record (written
        in the background) never reached the store; each one up to `start_step` is sent again, kept where the
        run has it (the DVC versioner's catch-up does the same for a run with DVC)."""
        from open360.checkpoint.io import list_checkpoints  # imports torch: not at module import (DVC worker)

        for step, path in list_checkpoints(checkpoint_dir):
            if step <= start_step:
                self.record_checkpoint(step, {**self._local_record(path), BACKFILL_KEY: True})

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self._worker is None:
            return
        self.flush(self._last_flush_step)
        status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(str(summary.get("status")), "FAILED")
        self._submit(self._finish, summary, status)
        if not self._worker.close(timeout=600):
            print(
                f"open360.tracking: MLflow writes for run {self.run_id} did not finish in 600 s "
                f"(store {mask_value(self.tracking_uri)}); some metrics may be missing",
                file=sys.stderr,
            )

    def run_metadata(self) -> dict[str, Any]:
        if self.run_id is None:
            return {}
        return {
            RUN_ID_KEY: self.run_id,
            "mlflow_experiment_id": self.experiment_id,
            "mlflow_tracking_uri": mask_value(self.tracking_uri),
        }

    # --- called by other tracking components ---------------------------------------------------------
    def flush(self, step: int) -> None:
        """Hand the buffered metrics to the background writer (one `log_batch` per 1000 metrics)."""
        self._last_flush_step = step
        if not self._buffer or self._worker is None:
            return
        batch, self._buffer = self._buffer, []
        self._submit(self._log_metrics, batch)

    def record_checkpoint(self, step: int, record: dict[str, Any]) -> None:
        """Attach the record of a published checkpoint (path, DVC md5, git revision) to the run at `step` (kept
        until the run starts when it comes first)."""
        with self._start_lock:
            if self._worker is None:
                self._early_records.append((step, dict(record)))
                return
        self._submit(self._log_checkpoint_record, step, dict(record))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued MLflow write is done (tests, benchmarks)."""
        return self._worker.drain(timeout) if self._worker is not None else True

    @property
    def errors(self) -> list[str]:
        """Messages of MLflow writes that failed (also printed to stderr when they happened)."""
        return list(self._worker.errors) if self._worker is not None else []

    def _connect(self, then: Any) -> None:
        """Open the client and the experiment (once), then `then()`; a failure is one TrackingError, URI masked."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        try:
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.tracking_uri)  # a sqlite store is opened here
                self.experiment_id = self._experiment_id()
            then()
        except ImportError as err:  # a database store whose driver is not installed (postgresql://, mysql://)
            self._client = None
            raise TrackingError(
                f"MLflow tracking store {mask_value(self.tracking_uri)} needs a database driver that is not "
                f"installed ({type(err).__name__}: {err}); install it (e.g. `pip install psycopg` for "
                "postgresql://, `pip install pymysql` for mysql://), or run with tracking=off"
            ) from None
        except (MlflowException, OSError, SQLAlchemyError) as err:  # a server down, a store that cannot be opened
            self._client = None
            cause = f"{type(err).__name__}: {mask_value(str(err)).splitlines()[0][:300]}"
            if "database is locked" in str(err):  # sqlite's busy timeout ran out: another process holds a write
                raise TrackingError(
                    f"MLflow tracking store {mask_value(self.tracking_uri)} stayed locked by another process "
                    f"({cause}); let that writer finish or stop it, then start the run again"
                ) from None
            raise TrackingError(
                f"MLflow tracking store {mask_value(self.tracking_uri)} is not reachable ({cause}); start it, "
                "fix tracking.mlflow_uri, or run with tracking=off"
            ) from None

    # --- background work -----------------------------------------------------------------------------
    def _submit(self, fn: Any, *args: Any) -> None:
        """Queue an MLflow call; its error (whose text may hold the tracking URI) is reported masked."""

        def job() -> None:
            try:
                # retried whole; each job is idempotent (params not yet logged, tags, the same metric values)
                self._lock_retry(lambda: fn(*args))
            except Exception as err:  # noqa: BLE001 - the worker reports it; never the URI's password
                raise RuntimeError(mask_value(f"{type(err).__name__}: {err}").splitlines()[0][:500]) from None

        assert self._worker is not None
        self._worker.submit(job)

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = (self.workspace / "mlartifacts").as_uri() if _is_local_store(self.tracking_uri) else None
        from mlflow.exceptions import MlflowException

        try:
            return self._client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another run
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _start_or_resume(self, info: RunInfo) -> str:
        from mlflow.exceptions import MlflowException

        previous = info.extra.get(RUN_ID_KEY)
        tags = {"open360.run_name": info.run_name, "open360.workspace": str(self.workspace)}
        if previous:
            try:
                run = self._client.get_run(previous)
            except MlflowException:
                print(
                    f"open360.tracking: resumed checkpoint names MLflow run {previous}, which is not in "
                    f"{mask_value(self.tracking_uri)}; starting a new run that records it as "
                    "tag open360.resumed_from_run_id",
                    file=sys.stderr,
                )
                tags["open360.resumed_from_run_id"] = str(previous)
            else:
                if run.info.lifecycle_stage != "active":  # deleted: it takes no writes (until restored)
                    print(
                        f"open360.tracking: resumed checkpoint names MLflow run {previous}, which was deleted; "
                        "starting a new run that holds its metrics and checkpoint records up to step "
                        f"{info.start_step} (tags open360.resumed_from_run_id/_step)",
                        file=sys.stderr,
                    )
                    tags |= {
                        "open360.resumed_from_run_id": run.info.run_id,
                        "open360.resumed_from_step": str(info.start_step),
                    }
                    return self._start_branch(run.info.run_id, info.start_step, tags, records=True, mark=False)
                if run.data.tags.get("open360.run_name", info.run_name) != info.run_name:
                    # another run's checkpoint resumed under this run_name: a run of its own, which holds the
                    # metrics up to here (its weights' history), not the other run's checkpoint records
                    tags |= {
                        "open360.resumed_from_run_id": run.info.run_id,
                        "open360.resumed_from_step": str(info.start_step),
                    }
                    return self._start_branch(run.info.run_id, info.start_step, tags, records=False, mark=False)
                if info.extra.get("branch"):
                    tags |= {
                        "open360.branched_from_run_id": run.info.run_id,
                        "open360.branched_at_step": str(info.start_step),
                    }
                    return self._start_branch(run.info.run_id, info.start_step, tags)
                run = self._branch_of(run, info.start_step)
                self._continued = True
                self.experiment_id = run.info.experiment_id  # where the run is, whatever tracking.experiment says now
                self._client.update_run(run.info.run_id, status="RUNNING")
                self._client.set_tag(run.info.run_id, "open360.resumed_at_step", str(info.start_step))
                return run.info.run_id
        run = self._client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
        if not previous:
            try:
                self._close_abandoned_runs(info.run_name, run.info.run_id)
            except MlflowException as err:  # housekeeping: the new run is started either way
                print(f"open360.tracking: could not close earlier RUNNING runs of {info.run_name!r}: "
                      f"{mask_value(str(err))}", file=sys.stderr)
        return run.info.run_id

    def _close_abandoned_runs(self, run_name: str, new_run_id: str) -> None:
        """A start from scratch replaces any run of this name and workspace still marked RUNNING: one killed
        before its first checkpoint, which nothing will resume. It is marked KILLED, pointing at its successor
        (else the store shows two live runs of one name, the newest of which `find_run_id` picks)."""
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        stale = self._client.search_runs(
            experiments,
            filter_string=f"tags.`open360.run_name` = '{run_name}' and attributes.status = 'RUNNING'",
        )
        for run in stale:
            if run.info.run_id == new_run_id or run.data.tags.get("open360.workspace") != str(self.workspace):
                continue
            self._client.set_tag(run.info.run_id, "open360.superseded_by_run_id", new_run_id)
            self._client.set_terminated(run.info.run_id, status="KILLED")

    def _start_branch(
        self, previous: str, step: int, tags: dict[str, str], records: bool = True, mark: bool = True
    ) -> str:
        """A resume at an earlier step (a new branch) gets its own MLflow run: tagged with the run it branches
        from, holding that run's metrics and checkpoint records up to `step`, so the branch's history is
        complete and the replaced run's later steps stay as they were, in their own run. The replaced run
        names the branch (`BRANCH_RUN_TAG`, `mark`): a resume from `step` before the branch's first checkpoint
        (whose lineage names the replaced run) continues the branch, not the replaced run. Also a run_name
        resumed from another's checkpoint (not its checkpoint `records`) and a checkpoint of a deleted run
        (which takes no mark)."""
        from open360.tracking.mlflow_records import latest_metrics

        run_id = self._client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
        inherited = [m for steps in latest_metrics(self._client, previous).values() for s, m in steps.items() if s <= step]
        self._log_metrics_to(run_id, inherited)
        for key, value in self._client.get_run(previous).data.tags.items() if records else ():
            if key.startswith(CHECKPOINT_TAG_PREFIX) and int(key[len(CHECKPOINT_TAG_PREFIX) :]) <= step:
                self._client.set_tag(run_id, key, value)
        if mark:
            self._client.set_tag(previous, BRANCH_RUN_TAG, json.dumps({"run_id": run_id, "step": step}))
        return run_id

    def _branch_of(self, run: Any, step: int) -> Any:
        """The run to continue from `step`: the branch made at `step` from `run` when there is one (see
        `_start_branch`), else `run` (also when the branch's run was deleted: it takes no more writes)."""
        from mlflow.exceptions import MlflowException

        try:
            branch = json.loads(run.data.tags[BRANCH_RUN_TAG])
            if int(branch["step"]) == step:
                found = self._client.get_run(str(branch["run_id"]))
                return found if found.info.lifecycle_stage == "active" else run
        except (KeyError, TypeError, ValueError, MlflowException):
            pass
        return run

    def _log_config(self, info: RunInfo) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in config_params(info.config).items() if k not in existing]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
        import yaml

        masked_yaml = yaml.safe_dump(mask_secrets(info.config), sort_keys=False)
        # a run's own config is config/config.yaml (a branch's run too, though it starts at a later step);
        # a continued run adds the config it was resumed with beside it
        name = f"config/config_resume_step_{info.start_step}.yaml" if self._continued else CONFIG_ARTIFACT
        self._client.log_text(self.run_id, masked_yaml, name)
        tags = _code_tags()
        for stage, folder in sorted((info.extra.get("shard_dirs") or {}).items()):  # the stages open so far
            tags.update(_stage_tags(stage, folder))
        self._set_tags(tags)

    def _tag_hardware(self, info: RunInfo) -> None:
        """This start's hardware, beside the earlier starts'. A job of its own whose one write comes last: retried
        after a lock, it cannot take a tag it wrote itself for an earlier start's."""
        existing = self._client.get_run(self.run_id).data.tags
        self._set_tags(_hardware_tag(info.start_step, info.extra.get("hardware"), existing))

    def _set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def _log_metrics(self, batch: list[Any]) -> None:
        self._log_metrics_to(self.run_id, batch)

    def _log_metrics_to(self, run_id: str, batch: list[Any]) -> None:
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch[i : i + MAX_METRICS_PER_BATCH])

    def _log_checkpoint_record(self, step: int, record: dict[str, Any]) -> None:
        record = {"step": step, **record}
        if record.pop(BACKFILL_KEY, False):  # sent again after a resume, in case a killed run's never arrived
            existing = self._client.get_run(self.run_id).data.tags.get(checkpoint_tag(step))
            if existing is not None:  # it did; keep it, unless the catch-up has since pushed that same folder
                try:
                    kept = json.loads(existing)
                except json.JSONDecodeError:
                    return
                same_folder = kept.get("dvc_md5") == record.get("dvc_md5")
                if not (record.get("pushed") and kept.get("pushed") is False and same_folder):
                    return
                record = {**kept, "pushed": True}
        self._client.set_tag(self.run_id, checkpoint_tag(step), fit_tag(json.dumps(record, sort_keys=True)))

    def _finish(self, summary: dict[str, Any], status: str) -> None:
        if self._monitor is not None:
            self._monitor.finish()
        with _env_defaults(NO_URL_PRINT):
            self._client.set_terminated(self.run_id, status=status)
        if self.tracking_uri.startswith(("http://", "https://")) and self.experiment_id is not None:
            url = f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            print(f"open360.tracking: MLflow run at {mask_value(url)}")

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # resume_logging: a continued run's samples go on after the earlier segments' (their steps count
            # samples from 0), rather than writing over them
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001 - optional feature; the run goes on without it
            print(f"open360.tracking: system metrics unavailable ({err}); install psutil", file=sys.stderr)
            self._monitor = None
