"""Evaluation across checkpoints: per-source held-out loss/perplexity and lm-eval tasks, to parquet, MLflow, plots."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig

from open360.analysis.eval_cli import analysis_dir, report_errors, run_cli
from open360.credentials import mask_value
from open360.paths import replaced_atomically, resolve_repo_path, resolve_workspace_path

DEFAULT_TASK_DIR = "analysis/tasks"
EVAL_PARQUET = "eval.parquet"
EVAL_PLOT = "eval_curves.png"
EVAL_REPORT = "eval.md"
# model_sha256: the weights each row was computed from (a branch replaces a step's checkpoint)
COLUMNS = ["run", "step", "tokens_seen", "kind", "name", "metric", "value", "model_sha256"]


@dataclass
class EvaluateConfig:
    """`python -m open360.analysis.evaluate run=<run> [checkpoints=[...]] [workspace=...]`."""

    run: str = MISSING
    workspace: str = "."
    checkpoints: list[int] = field(default_factory=list)  # steps; empty = every published checkpoint
    max_checkpoints: int = 0  # 0 = all; else an evenly spaced subset (always incl. first and last)
    recipe: str | None = None  # validation data of this recipe; None = the checkpoint's data.recipe
    sources: list[str] = field(default_factory=list)  # empty = every source with a held-out split
    val_sequences: int = 64  # held-out sequences per source (the first N of the split)
    batch_size: int = 8
    device: str = "cpu"
    tasks: list[str] = field(default_factory=lambda: ["open360_python_cloze"])  # [] = no lm-eval
    task_paths: list[str] = field(default_factory=lambda: [DEFAULT_TASK_DIR])  # lm-eval include paths
    task_limit: int | None = None  # documents per task (None = all)
    num_fewshot: int = 0
    mlflow: bool = True  # log eval/* metrics at each checkpoint's step (into the training run)
    out_dir: str | None = None  # default <workspace>/analysis/<run>
    recompute: bool = False  # False: steps already in eval.parquet are kept, not evaluated again
    pull: bool = True  # fetch selected checkpoints that checkpoints.dvc records but this machine lacks


# ----------------------------------------------------------------------------------------------
# Held-out loss
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sequence_nll(model: torch.nn.Module, sequences: np.ndarray | torch.Tensor, batch_size: int = 8,
                 device: str = "cpu") -> torch.Tensor:
    """Per-token next-token NLL [N, T] of packed sequences [N, T+1] (float64 on CPU)."""
    seqs = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise ValueError(f"sequences: expected shape [N, T+1] with T >= 1, got {tuple(seqs.shape)}")
    model.eval()
    out = []
    for i in range(0, seqs.shape[0], batch_size):
        batch = seqs[i : i + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.double().cpu())
    return torch.cat(out)


def validation_metrics(model: torch.nn.Module, val_sets: dict[str, np.ndarray], batch_size: int = 8,
                       device: str = "cpu") -> dict[str, dict[str, float]]:
    """{source: {"loss": mean token NLL, "ppl": exp(loss), "tokens": count}} over each held-out set."""
    result = {}
    for source, seqs in val_sets.items():
        nll = sequence_nll(model, seqs, batch_size, device)
        loss = float(nll.mean())
        result[source] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": float(nll.numel())}
    return result


def load_validation_sets(shard_dir: Path, sources: Sequence[str] = (), max_sequences: int = 64) -> dict[str, np.ndarray]:
    """First `max_sequences` held-out sequences [N, seq_len+1] of each source of a shard folder."""
    from open360.data import ShardSet

    return validation_sets(ShardSet.open(shard_dir), sources, max_sequences)


def validation_sets(shards: Any, sources: Sequence[str] = (), max_sequences: int = 64) -> dict[str, np.ndarray]:
    """`load_validation_sets` of an opened (verified) ShardSet."""
    available = sorted(shards.manifest["validation"])
    if not available:
        raise ValueError(f"{shards.path}: no held-out split (its recipe's validation: gave no rows); raise "
                         "validation.fraction/max_sequences there or pass recipe= with a held-out split")
    wanted = list(sources) or available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"sources={unknown}: no held-out split in {shards.path}; available: {available}")
    return {s: np.asarray(shards.validation(s))[:max_sequences] for s in wanted}


def shard_dir_for(full_cfg: DictConfig, workspace: Path, recipe: str | None = None) -> Path:
    """The (built or existing) shard folder of a run's recipe (or `recipe`), built idempotently."""
    from open360.data import build_shards

    recipe_path = resolve_repo_path(recipe or full_cfg.data.recipe)
    shards_root = resolve_workspace_path(workspace, full_cfg.data.get("shards_dir", "shards"))
    return Path(build_shards(recipe_path, shards_root, seed=full_cfg.data.get("seed"),
                             workers=int(full_cfg.data.get("build_workers", 1))))


def trained_shard_dir(lineage: dict[str, Any], full_cfg: DictConfig, workspace: Path, recipe: str | None = None) -> Path:
    """The shard folder a checkpoint's held-out split comes from: with `recipe=`, that recipe's (built or
    reused); else the one the run trained on with its `data.recipe` (the lineage's entry for it: its folder,
    pulled through DVC when this machine lacks it, else rebuilt), which must be the very shards the lineage
    records — a recipe edited since the training would give another held-out split under the run's name.
    When `data.recipe` is none of the stages' recipes (custom `stages`), the first stage's: a recipe the run
    never trained on could hold in its held-out split rows another stage trained on."""
    from open360.checkpoint.lineage import data_history
    from open360.data import ShardSet

    if recipe:
        return shard_dir_for(full_cfg, workspace, recipe)
    history = data_history(lineage)
    entry = next((e for e in history if e.get("recipe") == str(full_cfg.data.recipe)), None)
    entry = entry or (history[0] if history else None)
    if entry is None or not entry.get("shard_dir") or not entry.get("manifest_hash"):
        return shard_dir_for(full_cfg, workspace)  # a lineage that does not record its shards
    recorded = resolve_workspace_path(workspace, entry["shard_dir"])
    if not (recorded / "manifest.json").is_file():
        from open360.tracking import pull_shards

        pull_shards(recorded, workspace, full_cfg)  # a failed pull says so; the build below is checked
    trained_recipe = str(entry.get("recipe") or full_cfg.data.recipe)
    shard_dir = recorded if (recorded / "manifest.json").is_file() else shard_dir_for(full_cfg, workspace, trained_recipe)
    found = ShardSet.open(shard_dir).manifest_hash
    if found != entry["manifest_hash"]:
        raise ValueError(
            f"{shard_dir}: shards {found[:12]}…, but the checkpoint trained on {entry['shard_dir']} "
            f"({entry['manifest_hash'][:12]}…), which is not on this machine and not pulled; the recipe "
            f"{trained_recipe} changed since the training? Restore or `dvc pull` that folder, or pass "
            "recipe= to evaluate on another recipe's held-out split"
        )
    return shard_dir


# ----------------------------------------------------------------------------------------------
# lm-eval-harness on an exported checkpoint
# ----------------------------------------------------------------------------------------------


def lm_eval_tasks(hf_dir: Path | str, tasks: Sequence[str], task_paths: Sequence[str] = (DEFAULT_TASK_DIR,),
                  limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
                  device: str = "cpu") -> dict[str, dict[str, float]]:
    """Run lm-eval's `simple_evaluate` with its HF model wrapper on an HF folder; {task: {metric: value}}.

    Task YAMLs are found under `task_paths` (relative to the repository root) and lm-eval's own tasks.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError("lm-eval is not installed: pip install 'lm-eval[hf]>=0.4.13,<0.5'") from err
    paths = [str(resolve_repo_path(p)) for p in task_paths]
    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"task_paths: {p} is not a folder of lm-eval task YAMLs")
    files = task_files_sha256(paths)  # an edited task folder gets a new index
    manager = _task_manager(TaskManager, tuple(paths), False, files)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        broken = unreadable_task_files(paths)
        if broken:
            raise ValueError(f"tasks={missing}: not found in {paths}, whose task YAMLs lm-eval cannot read (it skips "
                             f"them without a word): {'; '.join(broken)}")
        # lm-eval's bundled tasks (may need the hub); indexing them takes tens of seconds: once per process
        manager = _task_manager(TaskManager, tuple(paths), True, files)
        missing = [t for t in tasks if t not in set(manager.all_tasks)]
        if missing:
            raise ValueError(f"tasks={missing}: not found in {paths} nor among lm-eval's tasks")
    try:
        results = _simple_evaluate(lm_eval, hf_dir, tasks, manager, num_fewshot, limit, batch_size, device)
    except OSError as err:  # requests' and datasets' connection errors are OSErrors too
        raise ValueError(
            f"tasks={list(tasks)}: lm-eval could not read a task's data ({type(err).__name__}: {err}); a task "
            "outside task_paths may need the hub, which this machine may not reach"
        ) from err
    return task_metrics(results)


def _free_device_memory() -> None:
    """Give the memory of the objects just dropped back (CUDA's caching allocator keeps it otherwise)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: `acc,none` is `acc`; a metric of a named filter keeps the
    filter's name (gsm8k's `exact_match,strict-match` and `exact_match,flexible-extract` are two numbers:
    `exact_match/strict-match`, `exact_match/flexible-extract`). Standard errors and sample counts are left out."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        values = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric == "sample_len" \
                    or "stderr" in metric:
                continue
            values[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = float(value)
        out[task] = values
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(task_manager: Any, paths: tuple[str, ...], defaults: bool, files_sha256: str) -> Any:
    """lm-eval's task index of `paths` (and its bundled tasks with `defaults`), built once per process for the
    whole sweep, not once per checkpoint; `files_sha256` (of the task files) keys it to their contents."""
    return task_manager(include_path=list(paths), include_defaults=defaults)


def unreadable_task_files(paths: Sequence[str]) -> list[str]:
    """"<file>: <error>" for each task YAML under `paths` that does not parse (lm-eval's own tags such as
    `!function` aside): lm-eval leaves such a file out of its index silently, so its task just seems unknown."""
    import yaml

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    broken = []
    for root in paths:
        for file in sorted(Path(root).rglob("*.yaml")):
            try:
                if not isinstance(yaml.load(file.read_text(encoding="utf-8"), Loader=TaskLoader), dict):
                    broken.append(f"{file}: not a mapping of task keys")
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                broken.append(f"{file}: {' '.join(str(err).split())}")
    return broken


def _simple_evaluate(lm_eval: Any, hf_dir: Path | str, tasks: Sequence[str], manager: Any, num_fewshot: int,
                     limit: int | None, batch_size: int, device: str) -> dict[str, Any]:
    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32", "trust_remote_code": True},
        tasks=list(tasks),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
        bootstrap_iters=0,
    )


def export_for_lm_eval(model: torch.nn.Module, full_cfg: DictConfig, tokenizer_file: Path, out_dir: Path) -> Path:
    """Write the checkpoint's model as an HF folder lm-eval's `hf` model type loads."""
    from open360.models.hf import export_hf

    return Path(export_hf(model, full_cfg.model, tokenizer_file, out_dir))


# ----------------------------------------------------------------------------------------------
# Checkpoint selection and bookkeeping
# ----------------------------------------------------------------------------------------------


def select_checkpoints(available: Sequence[tuple[int, Path]], steps: Sequence[int] = (),
                       max_checkpoints: int = 0) -> list[tuple[int, Path]]:
    """The requested steps (all must exist), or all, thinned to `max_checkpoints` evenly spaced ones."""
    by_step = dict(available)
    if steps:
        absent = sorted(set(steps) - set(by_step))
        if absent:
            raise ValueError(f"checkpoints={absent}: no such step; available steps: {sorted(by_step)}")
        chosen = sorted(set(steps))
    else:
        chosen = sorted(by_step)
    if max_checkpoints and len(chosen) > max_checkpoints:
        idx = np.unique(np.linspace(0, len(chosen) - 1, max_checkpoints).round().astype(int))
        chosen = [chosen[i] for i in idx]
    return [(s, by_step[s]) for s in chosen]


def tokens_seen(ckpt: Path, full_cfg: DictConfig, step: int) -> int:
    """Tokens consumed by the checkpoint, from trainer_state.json (or step x batch x seq_len)."""
    state_file = ckpt / "trainer_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if "tokens_seen" in state:
            return int(state["tokens_seen"])
    return int(step) * int(full_cfg.trainer.global_batch_size) * int(full_cfg.trainer.seq_len)


def _rows(run: str, step: int, tokens: int, kind: str, name: str, metrics: dict[str, float],
          model_sha256: str | None) -> list[dict]:
    return [dict(run=run, step=step, tokens_seen=tokens, kind=kind, name=name, metric=m, value=float(v),
                 model_sha256=model_sha256) for m, v in metrics.items()]


# ----------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------


EVAL_SETTINGS_TAG = "open360.eval_settings"


def log_to_mlflow(df: pd.DataFrame, full_cfg: DictConfig, workspace: Path, run_id: str | None,
                  settings: dict[str, Any] | None = None) -> str | None:
    """Log `eval/<kind>/<name>/<metric>` at each step into the training run (the branch that replaced its steps
    after the table's last one, if any; else a new `<run>` run).

    The run records the evaluation `settings` as a tag; a run whose eval/* metrics came from other
    settings is left as it is (one metric key, one evaluation), with a warning: eval.parquet has the rows."""
    if df.empty:
        return None
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from open360.tracking.mlflow_logger import resolve_tracking_uri
    from open360.tracking.mlflow_records import current_run_id

    tracking = full_cfg.get("tracking") or {}
    uri = resolve_tracking_uri(str(tracking.get("mlflow_uri", "sqlite:///mlflow.db")), workspace)
    client = MlflowClient(tracking_uri=uri)
    run_name = str(df["run"].iloc[0])
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            run_id = None
        else:  # a branch from a later step replaced the run's history after it: the branch's run holds it now
            run_id = current_run_id(client, run_id, int(df["step"].max()))
    if run_id is None:
        exp_name = str(tracking.get("experiment", "open360"))
        exp = client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
        found = client.search_runs([exp_id], f"tags.mlflow.runName = '{run_name}'", max_results=1)
        run_id = found[0].info.run_id if found else client.create_run(
            exp_id, run_name=run_name, tags={"open360.run_name": run_name, "open360.kind": "eval"}).info.run_id
    if settings is not None:
        wanted = json.dumps(settings, sort_keys=True)
        tagged = client.get_run(run_id).data.tags.get(EVAL_SETTINGS_TAG)
        try:  # an older tag lacks the keys added since: those count as now
            then = {**settings, **json.loads(tagged)} if tagged is not None else settings
        except (ValueError, TypeError):
            then = {"unreadable": tagged}
        if json.dumps(then, sort_keys=True) != wanted:
            print(f"open360.evaluate: MLflow run {run_id} holds eval/* metrics computed with other settings "
                  f"({tagged}); these ({wanted}) are not logged there, so that no curve mixes two evaluations "
                  "— they are in eval.parquet", file=sys.stderr)
            return None
        client.set_tag(run_id, EVAL_SETTINGS_TAG, wanted)
    now = int(pd.Timestamp.now().timestamp() * 1000)
    logged: dict[str, dict[int, float]] = {}
    metrics = []
    for r in df.itertuples():
        key = f"eval/{r.kind}/{r.name}/{r.metric}"
        if key not in logged:  # what the run already holds: rows evaluated before a failure may be missing
            logged[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        if logged[key].get(int(r.step)) != float(r.value):
            metrics.append(Metric(key=key, value=float(r.value), timestamp=now, step=int(r.step)))
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    return run_id


# ----------------------------------------------------------------------------------------------
# Plots and report
# ----------------------------------------------------------------------------------------------


def plot_eval_curves(df: pd.DataFrame, out_png: Path, title: str = "") -> Path:
    """LLM360-style eval curves: one panel per metric, every source/task a line vs tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, m) for k, m in df[["kind", "metric"]].drop_duplicates().itertuples(index=False)
              if m != "tokens"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (kind, metric) in zip(axes.flat, panels, strict=False):
        sub = df[(df.kind == kind) & (df.metric == metric)]
        for name, g in sub.groupby("name"):
            g = g.sort_values("tokens_seen")
            ax.plot(g.tokens_seen / 1e6, g.value, marker="o", ms=3, label=name)
        ax.set_xlabel("tokens seen (M)")
        ax.set_ylabel(metric)
        ax.set_title(f"{'validation' if kind == 'val' else kind}: {metric}")
        if kind == "val" and metric == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def markdown_table(df: pd.DataFrame) -> str:
    """Steps as rows, `kind/name/metric` as columns, in markdown."""
    wide = df[df.metric != "tokens"].pivot_table(index=["step", "tokens_seen"], columns=["kind", "name", "metric"],
                                                 values="value", aggfunc="first")
    headers = ["step", "tokens seen"] + ["/".join(c) for c in wide.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (step, tokens), row in wide.iterrows():
        cells = [str(step), f"{tokens:,}"] + [f"{v:.4g}" for v in row.values]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def held_out_counts(df: pd.DataFrame, seq_len: int | None, asked: int) -> str:
    """"code 32, english 7, ..." — the sequences each source's loss was taken over (a split may hold
    fewer than `val_sequences`), from the token counts of the newest step."""
    tokens = df[(df.kind == "val") & (df.metric == "tokens")]
    if tokens.empty or not seq_len:
        return f"up to {asked}"
    last = tokens[tokens.step == tokens.step.max()]
    return ", ".join(f"{r.name} {int(r.value) // seq_len}" for r in last.sort_values("name").itertuples()) + \
        f" (val_sequences={asked})"


def check_trained_tokenizer(lineage: dict[str, Any], tokenizer_hash: str, data: Any, ckpt: Any, hint: str) -> None:
    """Raise TokenizerMismatchError unless `data` (shards) was tokenized as the checkpoint was trained."""
    from open360.data import TokenizerMismatchError

    trained_with = (lineage.get("data") or {}).get("tokenizer_hash")
    if trained_with and trained_with != tokenizer_hash:
        raise TokenizerMismatchError(
            f"{data}: tokenized with tokenizer {tokenizer_hash[:12]}…, but {ckpt} was trained with "
            f"{trained_with[:12]}…; {hint}"
        )


def check_device(device: str) -> None:
    """Refuse a device this machine cannot run on, before any checkpoint is read."""
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device}: not a torch device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: no CUDA GPU is visible on this machine; use device=cpu")


TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".py")  # what defines a task and its items


def task_files_sha256(task_paths: Sequence[str]) -> str:
    """sha256 over the task definitions and items under `task_paths` (names and contents): an edited task
    is another evaluation."""
    digest = hashlib.sha256()
    for task_path in task_paths:
        root = resolve_repo_path(task_path)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TASK_FILE_SUFFIXES) if root.is_dir() else []
        for file in files:
            digest.update(f"{task_path}/{file.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def eval_settings(cfg: EvaluateConfig) -> dict[str, Any]:
    """What makes two evaluations comparable: the data, the sources, the sample and the tasks (named, and
    their files' contents)."""
    keys = ("recipe", "sources", "val_sequences", "tasks", "task_limit", "num_fewshot")
    settings = {key: getattr(cfg, key) for key in keys}
    settings["task_files"] = task_files_sha256(cfg.task_paths) if cfg.tasks else None
    return settings


def settings_file(parquet: Path) -> Path:
    """The settings eval.parquet's rows were computed with, beside it."""
    return parquet.with_suffix(".settings.json")


def read_settings(file: Path) -> dict[str, Any]:
    """The settings recorded beside eval.parquet; a damaged file is named, not a bare JSON error."""
    redo = f"delete it and {file.name.replace('.settings.json', '.parquet')} beside it to evaluate again"
    try:
        settings = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not readable JSON ({err}); {redo}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{file}: expected a JSON object of settings, got {type(settings).__name__}; {redo}")
    return settings


def previous_results(parquet: Path, cfg: EvaluateConfig, selected: list[int],
                     weights: dict[int, str | None] | None = None, steps: set[int] | None = None,
                     superseded: Any = None) -> pd.DataFrame:
    """The rows of eval.parquet this evaluation keeps: all of them, less the selected steps when
    `recompute`, less the steps whose checkpoint now holds other weights than the rows were computed
    from (`weights`: step -> model sha256; a resumed branch replaced it), and less the steps the run no
    longer has (`steps`: its checkpoints now; a branch moved the later ones to superseded/); none when
    `recompute` and the settings (or the run) changed. Other settings, or another run's rows, without
    `recompute` are an error (one table must not mix two evaluations, and nothing is dropped unasked)."""
    if not parquet.is_file():
        return pd.DataFrame(columns=COLUMNS)
    file = settings_file(parquet)
    now = json.loads(json.dumps(eval_settings(cfg)))
    before = {**now, **read_settings(file)} if file.is_file() else now  # older tables: what they lack, as now
    if before != now:
        if not cfg.recompute:
            differ = {k: (before.get(k), now[k]) for k in now if before.get(k) != now[k]}
            raise ValueError(
                f"{parquet} holds an evaluation with other settings (then, now: {differ}); give this one "
                "its own out_dir=, or recompute=true to replace that table"
            )
        return pd.DataFrame(columns=COLUMNS)
    previous = pd.read_parquet(parquet)
    others = sorted(set(previous["run"].astype(str)) - {cfg.run})
    if others:  # its steps would count as done, its rows would join this run's curves and MLflow run
        if not cfg.recompute:
            raise ValueError(f"{parquet} holds the evaluation of run(s) {others}, not '{cfg.run}'; give this run "
                             "its own out_dir=, or recompute=true to replace that table")
        return pd.DataFrame(columns=COLUMNS)
    if "model_sha256" not in previous:  # a table from before the column: the weights are unknown
        previous["model_sha256"] = None
    replaced = sorted(
        {int(r.step) for r in previous.itertuples()
         if (weights or {}).get(int(r.step)) and r.model_sha256 and r.model_sha256 != weights[int(r.step)]}
    )
    if replaced:
        print(f"open360.evaluate: {parquet}: the checkpoints of steps {replaced} hold other weights than "
              "their rows were computed from (a resumed branch replaced them); their rows are dropped and the "
              "selected ones evaluated again", file=sys.stderr)
    gone = sorted({int(step) for step in previous["step"]} - steps) if steps is not None else []
    lost = [step for step in gone if superseded is not None and not superseded(step)]
    if lost:  # removed by hand, not moved by a branch: the rows are the only record left; keep them
        print(f"open360.evaluate: {parquet}: checkpoints {lost} are gone from the run but not superseded by a "
              "branch; their rows are kept", file=sys.stderr)
        gone = [step for step in gone if step not in lost]
    if gone:
        print(f"open360.evaluate: {parquet}: the run no longer has checkpoints {gone} (a resume branched before "
              "them: they are in superseded/); their rows are dropped", file=sys.stderr)
    drop = set(replaced) | set(gone) | (set(selected) if cfg.recompute else set())
    return previous[~previous["step"].isin(drop)]


def write_table(previous: pd.DataFrame, rows: list[dict], parquet: Path, cfg: EvaluateConfig) -> pd.DataFrame:
    """eval.parquet (and its settings) as `previous` plus the new `rows`, replaced atomically: written after
    every checkpoint, so that a later failure or Ctrl-C loses none that were done."""
    new = pd.DataFrame(rows, columns=COLUMNS)
    frames = [f for f in (previous, new) if not f.empty]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else new)
    df = df.sort_values(["step", "kind", "name", "metric"]).reset_index(drop=True)
    # the table first: the settings replaced and then a full disk for the table left the old rows under the new
    # settings, which the next run took for done
    with replaced_atomically(parquet) as tmp:
        df.to_parquet(tmp, index=False)
    with replaced_atomically(settings_file(parquet)) as tmp:
        tmp.write_text(json.dumps(eval_settings(cfg), indent=1, sort_keys=True) + "\n")
    return df


def recorded_weights(ckpt: Path) -> str | None:
    """The sha256 of the weights a checkpoint's lineage records; None when its lineage is unreadable (a
    checkpoint not selected must not stop the evaluation: its rows are then kept as they are)."""
    from open360.checkpoint.io import MODEL_FILE, CheckpointError, read_lineage

    try:
        return (read_lineage(ckpt).get("files") or {}).get(MODEL_FILE)
    except CheckpointError:
        return None


def evaluate_run(cfg: EvaluateConfig) -> pd.DataFrame:
    """Evaluate the selected checkpoints of `cfg.run`; write eval.parquet, eval_curves.png, eval.md."""
    from open360.checkpoint.io import (
        CONFIG_FILE,
        MODEL_FILE,
        load_model_from_checkpoint,
        read_config,
        read_lineage,
    )
    from open360.checkpoint.lineage import data_history
    from open360.data import ShardSet

    for key in ("batch_size", "val_sequences"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 1")
    for key in ("max_checkpoints", "num_fewshot"):  # max_checkpoints=-1 failed in numpy's linspace, unnamed
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 0")
    if cfg.task_limit is not None and cfg.task_limit < 1:
        raise ValueError(f"task_limit={cfg.task_limit} must be >= 1 (null = every document)")
    check_device(cfg.device)
    workspace = Path(cfg.workspace).expanduser().resolve()
    from open360.tracking.checkpoints import known_checkpoints, run_dirs, superseded_steps
    from open360.tracking.mlflow_records import lineage_run_id

    run_dir = run_dirs(workspace, cfg.run)[0]
    available = known_checkpoints(workspace, cfg.run, "open360.evaluate")
    if not available:
        raise FileNotFoundError(
            f"{run_dir}: no complete checkpoints of run '{cfg.run}'; train it first "
            f"(python -m open360.train ... run_name={cfg.run} workspace={workspace}) or pull them (open360 ckpt pull)"
        )
    selected = select_checkpoints(available, cfg.checkpoints, cfg.max_checkpoints)
    absent = {step for step, ckpt in selected if not (ckpt / "lineage.json").is_file()}  # recorded in DVC only
    out_dir = analysis_dir(workspace, cfg.out_dir, cfg.run)
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet = out_dir / EVAL_PARQUET
    lineages = {step: read_lineage(ckpt) for step, ckpt in selected if step not in absent}
    weights = {step: (lin.get("files") or {}).get(MODEL_FILE) for step, lin in lineages.items()}
    # the steps not selected too: a branch that replaced one leaves rows of the old weights in the table
    weights |= {step: recorded_weights(ckpt) for step, ckpt in available if step not in weights}
    aside = functools.cache(lambda: superseded_steps(workspace, cfg.run))  # read once, only if a step is gone
    previous = previous_results(parquet, cfg, [step for step, _ in selected], weights, {step for step, _ in available},
                                lambda step: step in aside())
    done = set(previous["step"].astype(int)) if not previous.empty else set()
    to_pull = sorted(absent - done)  # a step evaluated before is not fetched again to be skipped
    if to_pull and not cfg.pull:
        raise FileNotFoundError(f"checkpoints {to_pull} of run '{cfg.run}' are recorded in checkpoints.dvc but not "
                                "on this machine and pull=false; set pull=true or choose other checkpoints=")
    if to_pull:
        from open360.tracking import pull_checkpoint

        for step in to_pull:
            lineages[step] = read_lineage(pull_checkpoint(workspace, cfg.run, step))
            weights[step] = (lineages[step].get("files") or {}).get(MODEL_FILE)

    rows: list[dict] = []
    df = None  # the table as last written
    val_cache: dict[Path, tuple[dict[str, np.ndarray], Path, str]] = {}
    shard_dirs: dict[tuple[str, ...], Path] = {}  # one resolution (pull, build, verify) per data history
    full_cfg = None
    row_len = None
    run_id = None
    for step, ckpt in selected:
        if step in done:
            continue
        model, full_cfg = load_model_from_checkpoint(ckpt, cfg.device)
        lineage = lineages[step]
        run_id = lineage_run_id(lineage) or run_id
        tokens = tokens_seen(ckpt, full_cfg, step)
        data_key = (str(full_cfg.data.recipe), *(str(e.get("manifest_hash")) for e in data_history(lineage)))
        if data_key not in shard_dirs:
            shard_dirs[data_key] = trained_shard_dir(lineage, full_cfg, workspace, cfg.recipe)
        shard_dir = shard_dirs[data_key]
        if shard_dir not in val_cache:
            shards = ShardSet.open(shard_dir)
            val_cache[shard_dir] = (validation_sets(shards, cfg.sources, cfg.val_sequences),
                                    shard_dir / "tokenizer.json", shards.tokenizer_hash)
        val_sets, tokenizer_file, shards_tokenizer = val_cache[shard_dir]
        check_trained_tokenizer(lineage, shards_tokenizer, shard_dir, ckpt,
                                "its losses there would mean nothing — give recipe= a recipe with the run's tokenizer")
        row_len = next((v.shape[1] - 1 for v in val_sets.values()), None)
        if row_len is not None and row_len > int(full_cfg.model.max_seq_len):
            raise ValueError(f"{shard_dir}: held-out rows of {row_len} tokens, longer than the {ckpt} model's context "
                             f"{int(full_cfg.model.max_seq_len)}; pass recipe= with seq_len <= it "
                             "(long_context measures loss past the trained length)")
        for source, metrics in validation_metrics(model, val_sets, cfg.batch_size, cfg.device).items():
            rows += _rows(cfg.run, step, tokens, "val", source, metrics, weights[step])
        if cfg.tasks:
            with tempfile.TemporaryDirectory(prefix="open360-eval-") as tmp:
                hf_dir = export_for_lm_eval(model, full_cfg, tokenizer_file, Path(tmp) / "hf")
                model = None  # lm-eval loads its own fp32 copy: this one leaves the device first (7B: 28 GB each)
                _free_device_memory()
                task_results = lm_eval_tasks(hf_dir, cfg.tasks, cfg.task_paths, cfg.task_limit, cfg.num_fewshot,
                                             cfg.batch_size, cfg.device)
            for task, metrics in task_results.items():
                rows += _rows(cfg.run, step, tokens, "task", task, metrics, weights[step])
        print(f"open360.evaluate: {cfg.run} step {step}: " + ", ".join(
            f"{r['name']}/{r['metric']}={r['value']:.4g}" for r in rows if r["step"] == step and r["metric"] != "tokens"))
        del model
        df = write_table(previous, rows, parquet, cfg)

    if df is None:  # nothing evaluated now: the table may still lose rows (superseded or replaced steps)
        df = write_table(previous, rows, parquet, cfg)
    if df.empty:
        return df
    plot_eval_curves(df, out_dir / EVAL_PLOT, title=f"{cfg.run}: evaluation across checkpoints")
    seq_len = row_len  # tokens per held-out row actually scored (recipe= may differ from trainer.seq_len)
    (out_dir / EVAL_REPORT).write_text(
        f"# Evaluation of `{cfg.run}` across checkpoints\n\n"
        f"Held-out sequences per source: {held_out_counts(df, seq_len, cfg.val_sequences)}; "
        f"lm-eval tasks: {', '.join(cfg.tasks) or 'none'}.\n\n"
        f"![eval curves]({EVAL_PLOT})\n\n{markdown_table(df)}\n"
    )
    if full_cfg is None and selected and (selected[-1][1] / CONFIG_FILE).is_file():  # nothing new: backfill only
        full_cfg = read_config(selected[-1][1])
        run_id = next((rid for lin in lineages.values() if (rid := lineage_run_id(lin))), None)
    tracked = full_cfg is not None and bool((full_cfg.get("tracking") or {}).get("mlflow", False))
    if cfg.mlflow and tracked:  # only runs that were tracked in MLflow
        # the whole table: steps evaluated before a failure or Ctrl-C were never logged (only missing or
        # changed values are sent)
        try:
            log_to_mlflow(df, full_cfg, workspace, run_id, json.loads(json.dumps(eval_settings(cfg))))
        except Exception as err:  # noqa: BLE001 - nothing new computed: the table is complete, MLflow can wait
            if rows:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"open360.evaluate: MLflow not updated ({type(err).__name__}: {mask_value(first)}); "
                  f"{parquet} is complete — run again to send its rows", file=sys.stderr)
    return df


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see EvaluateConfig for the keys."""
    cfg = run_cli(EvaluateConfig, argv, "open360.analysis.evaluate", __doc__ or "")
    if cfg is None:
        return 0

    def job() -> int:
        df = evaluate_run(cfg)
        out = analysis_dir(cfg.workspace, cfg.out_dir, cfg.run)
        print(f"open360.evaluate: {df['step'].nunique()} checkpoints -> {out / EVAL_PARQUET}, {out / EVAL_PLOT}, {out / EVAL_REPORT}")
        return 0

    return report_errors("open360.analysis.evaluate", job)


__all__ = [
    "EvaluateConfig", "evaluate_run", "export_for_lm_eval", "lm_eval_tasks", "load_validation_sets",
    "plot_eval_curves", "select_checkpoints", "sequence_nll", "validation_metrics",
]

if __name__ == "__main__":
    sys.exit(main())
