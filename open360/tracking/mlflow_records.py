"""Reading back what the MLflow logger wrote: a run by id or name, metrics at a step, checkpoint records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from open360.credentials import mask_value
from open360.tracking.mlflow_logger import (
    BRANCH_RUN_TAG,
    CHECKPOINT_TAG_PREFIX,
    checkpoint_tag,
    resolve_tracking_uri,
)

DEFAULT_URI = "sqlite:///mlflow.db"


def workspace_uri(workspace: Path, uri: str | None = None) -> str | None:
    """The tracking URI to read: `uri` if given, else the workspace's mlflow.db when it exists."""
    if uri:
        return resolve_tracking_uri(uri, workspace)
    return resolve_tracking_uri(DEFAULT_URI, workspace) if (Path(workspace) / "mlflow.db").is_file() else None


def client(uri: str) -> Any:
    """An MlflowClient for `uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class StoreUnreadable(RuntimeError):
    """The MLflow store cannot be read (a corrupt or locked sqlite file, a server that is down)."""


def missing_sqlite_file(uri: str) -> str | None:
    """The file a `sqlite:///` URI names when it does not exist (opening it would create an empty store)."""
    prefix = "sqlite:///"
    file = uri[len(prefix) :] if uri.startswith(prefix) else ":memory:"
    return None if file == ":memory:" or Path(file).is_file() else file


def read_store(uri: str, fn: Any) -> Any:
    """`fn(client)` on the store at `uri`; any failure becomes one StoreUnreadable line (URI masked), and so
    does a sqlite file that does not exist (a mistyped --mlflow-uri: reading must not create a store)."""
    if file := missing_sqlite_file(uri):
        raise StoreUnreadable(
            f"MLflow store {mask_value(uri)}: no such file {file}; pass --mlflow-uri naming the run's store"
        )
    try:
        return fn(client(uri))
    except Exception as err:  # noqa: BLE001 - MlflowException, SQLAlchemy errors, OSError
        first = mask_value(str(err)).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise StoreUnreadable(
            f"MLflow store {mask_value(uri)} is unreadable ({type(err).__name__}: {first}); repair or "
            "unlock it, or pass --mlflow-uri"
        ) from None


def lineage_run_id(lineage: dict[str, Any]) -> str | None:
    """The MLflow run a checkpoint's lineage names (None for an untracked run)."""
    run_id = lineage.get("mlflow_run_id") or (lineage.get("callbacks") or {}).get("mlflow_run_id")
    return str(run_id) if run_id else None


def current_run_id(mlflow: Any, run_id: str, step: int) -> str:
    """The run that holds the current history of a checkpoint at `step` whose lineage names `run_id`: a branch
    made from that run at `step` or later replaced the run's steps after the branch (`BRANCH_RUN_TAG`), so the
    branch's run holds them, and so on through the branches made from it; `run_id` itself when no live branch
    was made at or after `step`."""
    seen = {run_id}
    while True:
        try:
            branch = json.loads(mlflow.get_run(run_id).data.tags[BRANCH_RUN_TAG])
            later, branch_id = int(branch["step"]) >= step, str(branch["run_id"])
        except (KeyError, TypeError, ValueError):
            return run_id
        if not later or branch_id in seen or not _active(mlflow, branch_id):
            return run_id
        run_id = branch_id
        seen.add(run_id)


def _active(mlflow: Any, run_id: str) -> bool:
    """The run exists and is not deleted (a deleted branch took no more writes: the run it replaced went on)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def find_run_id(mlflow: Any, run_name: str) -> str | None:
    """The most recent run whose open360 run name is `run_name`, over all experiments."""
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiments:
        return None
    runs = mlflow.search_runs(
        experiments,
        filter_string=f"tags.`open360.run_name` = '{run_name}'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def latest_metrics(mlflow: Any, run_id: str, keys: Any = None) -> dict[str, dict[int, Any]]:
    """key → {step: the MLflow Metric}, for `keys` (default: every metric of the run); where a step was
    logged twice (a resumed run), the latest write wins."""
    out: dict[str, dict[int, Any]] = {}
    for key in mlflow.get_run(run_id).data.metrics if keys is None else keys:
        ordered = sorted(mlflow.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        out[key] = {m.step: m for m in ordered}
    return out


def metric_history(mlflow: Any, run_id: str, keys: Any = None) -> dict[str, dict[int, float]]:
    """key → {step: value} for `keys` (default: every metric); where a step was logged twice (a resumed
    run), the latest write wins."""
    return {key: {s: m.value for s, m in steps.items()} for key, steps in latest_metrics(mlflow, run_id, keys).items()}


def _history_at(mlflow: Any, run_id: str, key: str, step: int) -> list[Any]:
    """The writes of metric `key` at `step`: a database store selects those rows alone (a full history is
    ~275k rows per metric at AMBER's step count, minutes to read); another store reads the history."""
    store = getattr(getattr(mlflow, "_tracking_client", None), "store", None)
    if store is None or not hasattr(store, "get_metric_history_bulk_interval_from_steps"):
        return [m for m in mlflow.get_metric_history(run_id, key) if m.step == step]
    return list(store.get_metric_history_bulk_interval_from_steps(run_id, key, [step], 10_000))


def metrics_at(mlflow: Any, run_id: str, step: int) -> dict[str, float]:
    """Every metric's value at exactly `step`; where it was logged twice (a resumed run), the latest write."""
    out = {}
    for key in mlflow.get_run(run_id).data.metrics:
        writes = sorted(_history_at(mlflow, run_id, key, step), key=lambda m: m.timestamp)
        if writes:
            out[key] = writes[-1].value
    return out


def checkpoint_records(mlflow: Any, run_id: str) -> dict[int, dict[str, Any]]:
    """step → checkpoint record (path, dvc_md5, git_revision, pushed) attached to the run."""
    tags = mlflow.get_run(run_id).data.tags
    return {
        int(k[len(CHECKPOINT_TAG_PREFIX) :]): json.loads(v)
        for k, v in tags.items()
        if k.startswith(CHECKPOINT_TAG_PREFIX)
    }


def checkpoint_record(mlflow: Any, run_id: str, step: int) -> dict[str, Any] | None:
    """The record of the checkpoint at `step`, or None."""
    value = mlflow.get_run(run_id).data.tags.get(checkpoint_tag(step))
    return json.loads(value) if value else None
