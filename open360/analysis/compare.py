"""Compute-aware run comparison from MLflow: loss vs tokens, vs training FLOPs, vs wall-clock; power-law fit."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import MISSING

from open360.analysis.eval_cli import analysis_dir, report_errors, run_cli
from open360.credentials import mask_value
from open360.paths import replace_together

COMPARE_PARQUET = "compare.parquet"
COMPARE_SUMMARY = "compare_summary.parquet"
COMPARE_PLOT = "compare.png"
COMPARE_REPORT = "compare.md"
CONFIG_ARTIFACT = "config/config.yaml"


@dataclass
class CompareConfig:
    """`python -m open360.analysis.compare runs=[a,b,c] [workspace=...]`."""

    runs: list[str] = MISSING  # MLflow run names (= run_name of the training config)
    workspace: str = "."
    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths resolve in the workspace
    experiment: str = "open360"
    loss_metric: str = "loss"
    tokens_metric: str = "tokens_seen"
    step_time_metric: str = "step_time_s"  # summed for wall-clock; MLflow timestamps when absent
    devices: int = 1  # devices per run, for device-hours
    smooth: int = 1  # moving-average window over logged steps for the curves (1 = raw)
    fit: bool = True  # fit final loss = a * C^-b over the runs (needs >= 2 runs)
    name: str = "compare"  # output folder <workspace>/analysis/<name>/
    out_dir: str | None = None


# ----------------------------------------------------------------------------------------------
# Reading runs from MLflow
# ----------------------------------------------------------------------------------------------


def _client(tracking_uri: str, workspace: Path) -> Any:
    from mlflow.tracking import MlflowClient

    from open360.tracking.mlflow_logger import resolve_tracking_uri
    from open360.tracking.mlflow_records import missing_sqlite_file

    uri = resolve_tracking_uri(tracking_uri, workspace)
    if file := missing_sqlite_file(uri):  # opening it would create an empty store
        raise FileNotFoundError(
            f"{file}: no MLflow store there (tracking_uri={tracking_uri}, workspace={workspace}); "
            "give the workspace the runs were trained in, or their tracking_uri="
        )
    mlflow_log = logging.getLogger("mlflow")  # it logs the tracebacks of a damaged store before raising
    level = mlflow_log.level
    mlflow_log.setLevel(logging.CRITICAL)
    try:  # a damaged or locked sqlite file, a store MLflow refuses to open: one line, before any run is read
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MlflowException, SQLAlchemy errors, OSError
        first = mask_value(str(err)).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ValueError(
            f"tracking_uri={mask_value(tracking_uri)}: the MLflow store {mask_value(uri)} is unreadable "
            f"({type(err).__name__}: {first}); repair or unlock it, or give the runs' tracking_uri="
        ) from None
    finally:
        mlflow_log.setLevel(level)
    return client


def find_run(client: Any, experiment: str, run_name: str) -> Any:
    """The newest MLflow run named `run_name` in `experiment`."""
    if "'" in run_name or "\\" in run_name:
        raise ValueError(f"runs: '{run_name}' is not a run name (no quotes or backslashes)")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"MLflow experiment '{experiment}' not found in {client.tracking_uri}; train a run first")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        names = sorted({r.info.run_name for r in client.search_runs([exp.experiment_id], max_results=200)})
        raise LookupError(f"no MLflow run named '{run_name}' in experiment '{experiment}'; runs there: {names}")
    return runs[0]


def run_config(client: Any, run: Any) -> dict[str, Any]:
    """The run's resolved config: the logged config artifact, else rebuilt from the flattened params."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT, tmp)
            return yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - artifact store unavailable: fall back to params
        cfg: dict[str, Any] = {}
        for key, value in run.data.params.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = _param_value(value)
        return cfg


def _param_value(text: str) -> Any:
    """A logged param's value: None is logged as "None"; and `str(1e-06)` is "1e-06", which YAML 1.1 (safe_load)
    reads as a string, not a float."""
    if text in ("", "None"):
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


def metric_history(client: Any, run_id: str, key: str) -> pd.DataFrame:
    """(step, value, timestamp) of one metric, one row per step (the last value logged for a step)."""
    hist = client.get_metric_history(run_id, key)
    df = pd.DataFrame([(m.step, m.value, m.timestamp) for m in hist], columns=["step", "value", "timestamp"])
    return df.sort_values(["step", "timestamp"]).drop_duplicates("step", keep="last").reset_index(drop=True)


def run_tokenizer(run: Any) -> str | None:
    """The sha256 of the tokenizer a run's shards were tokenized with (its stages' tags, joined), if tagged."""
    tags = run.data.tags
    found = sorted({v for k, v in tags.items() if k.startswith("open360.data.") and k.endswith(".tokenizer_sha256")})
    return ",".join(found) or None


def tokenizer_warning(summaries: pd.DataFrame) -> str | None:
    """What makes the runs' losses incomparable: nats per token of different vocabularies or tokenizers."""
    vocabs = summaries.set_index("run")["vocab_size"]
    toks = summaries.dropna(subset=["tokenizer"]).set_index("run")["tokenizer"]
    if vocabs.nunique() > 1:
        differ = f"vocab_size {vocabs.to_dict()}"
    elif toks.nunique() > 1:
        differ = "tokenizers " + ", ".join(f"{r}: {t[:12]}…" for r, t in toks.items())
    else:
        return None
    return (f"the runs tokenize differently ({differ}): loss is per token of each run's tokenizer, so loss "
            "curves, final losses and the power-law fit do not compare the models")


def warm_start_cost(config: dict[str, Any], workspace: Path, run_name: str) -> tuple[float, float]:
    """(tokens, training FLOPs) already in the weights a run started from (`trainer.init_from`, e.g. a PI
    fine-tune's base), through its own warm starts: what the run's axes add to its own. (0, 0) from scratch."""
    tokens = flops = 0.0
    init, seen = (config.get("trainer") or {}).get("init_from"), set()
    while init and str(init) not in seen:
        seen.add(str(init))
        folder = Path(str(init)).expanduser()
        folder = folder if folder.is_absolute() else workspace / folder
        try:
            lineage = json.loads((folder / "lineage.json").read_text())
            base = yaml.safe_load((folder / "config.yaml").read_text())
            seen_tokens = float(lineage["tokens_seen"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"open360.analysis.compare: warning: run '{run_name}' started from {folder}, which is not "
                  f"readable here ({type(err).__name__}); its axes leave that checkpoint's compute out", file=sys.stderr)
            break
        tokens += seen_tokens
        flops += seen_tokens * flops_per_token(base["model"], int(base["trainer"]["seq_len"]))
        init = (base.get("trainer") or {}).get("init_from")
    return tokens, flops


def flops_per_token(model_cfg: dict[str, Any], seq_len: int) -> float:
    """Training FLOPs per token of the run's model, from open360.models.flops."""
    from open360.models import training_flops_per_token
    from open360.models.decoder import as_model_config

    return float(training_flops_per_token(as_model_config(model_cfg), seq_len))


def load_run_curve(client: Any, cfg: CompareConfig, run_name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One run's curve (step, tokens, flops, wall_s, loss) and a summary of its size and cost."""
    run = find_run(client, cfg.experiment, run_name)
    config = run_config(client, run)
    if "model" not in config or "trainer" not in config:
        raise LookupError(f"MLflow run '{run_name}' ({run.info.run_id}): no model/trainer config logged")
    loss = metric_history(client, run.info.run_id, cfg.loss_metric)
    if loss.empty:
        raise LookupError(f"MLflow run '{run_name}': no '{cfg.loss_metric}' metric logged")
    seq_len = int(config["trainer"]["seq_len"])
    fpt = flops_per_token(config["model"], seq_len)
    tokens = metric_history(client, run.info.run_id, cfg.tokens_metric)
    df = loss.rename(columns={"value": "loss"})
    if tokens.empty:
        per_step = int(config["trainer"]["global_batch_size"]) * seq_len
        df["tokens"] = df["step"] * per_step
    else:
        df = df.merge(tokens[["step", "value"]].rename(columns={"value": "tokens"}), on="step", how="left")
    step_time = metric_history(client, run.info.run_id, cfg.step_time_metric)
    if not step_time.empty:
        wall = step_time.set_index("step")["value"].cumsum()
        df["wall_s"] = df["step"].map(wall)
    else:
        df["wall_s"] = (df["timestamp"] - df["timestamp"].min()) / 1000.0
    df["flops"] = df["tokens"] * fpt
    start_tokens, start_flops = warm_start_cost(config, Path(cfg.workspace).expanduser().resolve(), run_name)
    df["tokens"] += start_tokens  # a fine-tune's weights hold its base's training too
    df["flops"] += start_flops
    df.insert(0, "run", run_name)
    from open360.models import count_parameters
    from open360.models.decoder import as_model_config

    summary = {
        "run": run_name,
        "run_id": run.info.run_id,
        "params": count_parameters(as_model_config(config["model"])),
        "flops_per_token": fpt,
        "steps": int(df["step"].max()),
        "tokens": float(df["tokens"].iloc[-1]),
        "flops": float(df["flops"].iloc[-1]),
        "wall_s": float(df["wall_s"].iloc[-1]),
        "final_loss": float(df["loss"].tail(max(1, cfg.smooth)).mean()),
        "vocab_size": int(config["model"]["vocab_size"]),
        "tokenizer": run_tokenizer(run),
    }
    return df.drop(columns=["timestamp"]), summary


# ----------------------------------------------------------------------------------------------
# Power law and plots
# ----------------------------------------------------------------------------------------------


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> dict[str, float]:
    """Least-squares fit of loss = a * C^-b in log-log space: {"a", "b", "r2"}."""
    c, l_ = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
    if len(c) < 2 or np.ptp(c) == 0:
        raise ValueError("power-law fit needs at least two runs with different compute")
    slope, intercept = np.polyfit(c, l_, 1)
    pred = intercept + slope * c
    ss_res, ss_tot = float(((l_ - pred) ** 2).sum()), float(((l_ - l_.mean()) ** 2).sum())
    return {"a": float(math.exp(intercept)), "b": float(-slope), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def _smooth(y: pd.Series, window: int) -> pd.Series:
    return y.rolling(window, min_periods=1).mean() if window > 1 else y


def plot_race(curves: pd.DataFrame, summaries: pd.DataFrame, out_png: Path, smooth: int = 1,
              fit: dict[str, float] | None = None, devices: int = 1) -> Path:
    """The race view: loss vs tokens, vs training FLOPs, vs wall-clock; plus final loss vs compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    views = [("tokens", "tokens seen", False), ("flops", "training FLOPs", True),
             ("wall_s", f"wall-clock (s) x {devices} device(s)", False)]
    for run, g in curves.groupby("run", sort=False):
        y = _smooth(g["loss"], smooth)
        for ax, (col, label, logx) in zip(axes, views, strict=False):
            x = g[col] * (devices if col == "wall_s" else 1)
            ax.plot(x, y, label=run, lw=1.3)
            ax.set_xlabel(label)
            if logx:
                ax.set_xscale("log")
    for ax, title in zip(axes, ["loss vs tokens", "loss vs compute", "loss vs wall-clock"], strict=False):
        ax.set_title(title)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[3]
    ax.scatter(summaries["flops"], summaries["final_loss"], zorder=3)
    for r in summaries.itertuples():
        ax.annotate(f"{r.run}\n{r.params / 1e6:.2f}M", (r.flops, r.final_loss), fontsize=7)
    if fit is not None:
        xs = np.geomspace(summaries["flops"].min(), summaries["flops"].max(), 50)
        ax.plot(xs, fit["a"] * xs ** (-fit["b"]), "--", color="gray",
                label=f"L = {fit['a']:.3g} C^-{fit['b']:.3f} (R²={fit['r2']:.2f})")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final loss")
    ax.set_title("final loss vs compute")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def markdown_report(summaries: pd.DataFrame, fit: dict[str, float] | None, devices: int) -> str:
    """Per-run size/cost/final-loss table and the power-law fit."""
    lines = [
        "# Run comparison: loss against what it cost",
        "",
        f"![race view]({COMPARE_PLOT})",
        "",
        "| run | params | FLOPs/token | steps | tokens | training FLOPs | device-hours | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summaries.itertuples():
        lines.append(f"| {r.run} | {r.params:,} | {r.flops_per_token:.4g} | {r.steps} | {r.tokens:,.0f} | "
                     f"{r.flops:.4g} | {r.wall_s * devices / 3600:.4g} | {r.final_loss:.4f} |")
    if fit is not None:
        lines += ["", f"Power-law fit of final loss vs compute: L(C) = {fit['a']:.4g} · C^-{fit['b']:.4f} "
                      f"(R² = {fit['r2']:.3f}, {len(summaries)} runs)."]
    return "\n".join(lines) + "\n"


def compare_runs(cfg: CompareConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the runs from MLflow, write compare.parquet, compare.png and compare.md; (curves, summaries)."""
    if not cfg.runs:
        raise ValueError("runs=[...]: name at least one MLflow run")
    twice = sorted({run for run in cfg.runs if cfg.runs.count(run) > 1})
    if twice:  # its curve drawn twice, its row twice in the table and the power-law fit
        raise ValueError(f"runs={list(cfg.runs)}: {twice} named more than once")
    for key in ("devices", "smooth"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)}: must be >= 1")
    workspace = Path(cfg.workspace).expanduser().resolve()
    client = _client(cfg.tracking_uri, workspace)
    parts, rows = [], []
    for name in cfg.runs:
        curve, summary = load_run_curve(client, cfg, name)
        parts.append(curve)
        rows.append(summary)
    curves, summaries = pd.concat(parts, ignore_index=True), pd.DataFrame(rows)
    warning = tokenizer_warning(summaries)
    if warning:
        print(f"open360.analysis.compare: warning: {warning}", file=sys.stderr)
    fit = None
    if cfg.fit and len(summaries) >= 2 and summaries["flops"].nunique() >= 2:
        fit = fit_power_law(summaries["flops"], summaries["final_loss"])
    out_dir = analysis_dir(cfg.workspace, cfg.out_dir, cfg.name)
    report = markdown_report(summaries, fit, cfg.devices) + (f"\n**Warning**: {warning}.\n" if warning else "")
    replace_together({
        out_dir / COMPARE_PARQUET: lambda p: curves.to_parquet(p, index=False),
        out_dir / COMPARE_SUMMARY: lambda p: summaries.to_parquet(p, index=False),
        out_dir / COMPARE_PLOT: lambda p: plot_race(curves, summaries, p, cfg.smooth, fit, cfg.devices),
        out_dir / COMPARE_REPORT: lambda p: p.write_text(report),
    })
    return curves, summaries


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see CompareConfig for the keys."""
    cfg = run_cli(CompareConfig, argv, "open360.analysis.compare", __doc__ or "")
    if cfg is None:
        return 0

    def job() -> int:
        _, summaries = compare_runs(cfg)
        out = analysis_dir(cfg.workspace, cfg.out_dir, cfg.name)
        print(summaries.to_string(index=False))
        print(f"open360.compare: {out / COMPARE_PLOT}, {out / COMPARE_REPORT}")
        return 0

    return report_errors("open360.analysis.compare", job)


__all__ = ["CompareConfig", "compare_runs", "find_run", "fit_power_law", "load_run_curve", "plot_race"]

if __name__ == "__main__":
    sys.exit(main())
