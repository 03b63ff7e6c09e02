"""Memorization reports: merge cell parquets, render PNG figures and a markdown summary, log to MLflow."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from open360.paths import replaced_atomically

SUMMARY_FILE = "summary.parquet"
SCORES_FILE = "scores.parquet"
FIGURES = {
    "distribution": "score_distribution.png",
    "heatmap": "chunk_heatmap.png",
    "lines": "chunk_lines.png",
    "correlation": "checkpoint_correlation.png",
    "progress": "memorized_vs_progress.png",
}


def _cell_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"open360.memorization")
    return json.loads(raw) if raw else {}


def cell_files(out_dir: Path, cells: list[tuple[int, int]] | None = None) -> list[Path]:
    """The cell files of `cells` ((step, chunk) pairs) that exist under `out_dir/cells`; None: every one."""
    if cells is None:
        return sorted((Path(out_dir) / "cells").glob("step_*-chunk_*.parquet"))
    from open360.analysis.memorization.cells import cell_path

    return [p for p in (cell_path(Path(out_dir), s, c) for s, c in sorted(cells)) if p.is_file()]


SCORE_COLUMNS = ["step", "chunk", "row", "seq_id", "matched", "score", "prefix_match", "seen"]
REPORT_COLUMNS = ["step", "seq_id", "matched", "score", "seen"]  # what the figures and tables read


def merge_cells(out_dir: Path, cells: list[tuple[int, int]] | None = None) -> Path | None:
    """Write `summary.parquet` (one row per cell) and `scores.parquet` (all rows) from the cell files of
    `cells` (a job's matrix; None: every cell file in `out_dir`), one cell in memory at a time: LLM360's 360
    checkpoints x 360 chunks x 1000 sequences are 130M rows."""
    import pandas as pd
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    files = cell_files(out_dir, cells)
    if not files:
        return None
    l_val = _cell_meta(files[0]).get("l", 32)
    nan = float("nan")
    rows = []
    with replaced_atomically(out_dir / SCORES_FILE) as tmp:
        writer = None
        try:
            for f in files:
                meta = _cell_meta(f)
                table = pq.read_table(f, columns=SCORE_COLUMNS).replace_schema_metadata(None)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
                score, matched, seen = (table[c].to_numpy(zero_copy_only=False) for c in ("score", "matched", "seen"))
                n = len(score)
                rows.append({
                    **{key: meta.get(key) for key in ("step", "chunk", "mode", "tokens_seen", "seconds", "chunk_size")},
                    "n": n,
                    "token_match": float(score.astype(np.float64).mean()) if n else nan,
                    "full_match": float((matched == l_val).mean()) if n else nan,
                    "seen_fraction": float(seen.mean()) if n else nan,
                })
        finally:
            if writer is not None:
                writer.close()
    summary = pd.DataFrame(rows).sort_values(["step", "chunk"]).reset_index(drop=True)
    if not _same_scores(out_dir / SUMMARY_FILE, summary):  # the report there describes other cells
        for name in REPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    _atomic_parquet(summary, out_dir / SUMMARY_FILE)
    return out_dir / SUMMARY_FILE


# Rendered from summary.parquet and scores.parquet: a merge of other cells or scores removes them (a job that
# renders no report - report=false, or an incomplete matrix - must not leave another matrix's report beside
# its summary).
REPORT_FILES = (*FIGURES.values(), "progress.csv", "report.md")
SUMMARY_KEYS = ["step", "chunk", "n", "token_match", "full_match", "seen_fraction", "tokens_seen"]


def _same_scores(path: Path, summary: Any) -> bool:
    """Whether the summary at `path` holds the same cells and numbers as `summary`."""
    import pandas as pd

    try:
        before = pd.read_parquet(path, columns=SUMMARY_KEYS)
    except Exception:  # absent, damaged or of an older layout: what the report shows is unknown
        return False
    return before.equals(summary[SUMMARY_KEYS])


def _atomic_parquet(df: Any, path: Path) -> None:
    with replaced_atomically(path) as tmp:
        df.to_parquet(tmp, index=False)


def _pick(values: list[int], most: int) -> list[int]:
    """At most `most` values spread evenly over the sorted list (first and last always included)."""
    if len(values) <= most:
        return list(values)
    idx = np.unique(np.linspace(0, len(values) - 1, most).round().astype(int))
    return [values[i] for i in idx]


# Matrix figures grow with their rows and columns up to this many inches a side (at 120 dpi, ~2,400 px):
# uncapped, LLM360's 360 checkpoints x 360 chunks made a 204-megapixel PNG (8 GB to render).
MAX_FIG_INCHES = 20
MAX_TICKS = 40  # labelled rows / columns of a matrix figure; the others are left unlabelled


def _matrix_ticks(ax: Any, columns: list[Any], rows: list[Any], rotate: int = 0) -> None:
    """Label at most MAX_TICKS columns and rows (spread evenly, first and last included) of an imshow."""
    xs, ys = _pick(list(range(len(columns))), MAX_TICKS), _pick(list(range(len(rows))), MAX_TICKS)
    ax.set_xticks(xs, [str(columns[i]) for i in xs], rotation=rotate, fontsize=7)
    ax.set_yticks(ys, [str(rows[i]) for i in ys], fontsize=7)


def plot_distribution(scores: Any, steps: list[int], l_val: int, path: Path, label: str, mode: str = "greedy") -> None:
    """Histogram of per-sequence scores, one step-coloured outline per checkpoint (up to 10)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bins = np.linspace(-0.5 / l_val, 1 + 0.5 / l_val, l_val + 2)
    cmap = plt.get_cmap("viridis")
    chosen = _pick(steps, 10)
    for i, step in enumerate(chosen):
        s = scores.loc[scores.step == step, "score"].to_numpy()
        ax.hist(
            s,
            bins=bins,
            histtype="step",
            density=True,
            color=cmap(i / max(1, len(chosen) - 1)),
            label=f"step {step}",
            linewidth=1.4,
        )
    ax.set_yscale("log")
    ax.set_xlabel(
        "memorization score (fraction of the l continuation tokens reproduced)"
        if mode == "greedy"
        else "teacher-forced screen: fraction of the l tokens predicted from the true prefix"
    )
    ax.set_ylabel("density (log)")
    ax.set_title(f"Score distribution per checkpoint — {label}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(summary: Any, path: Path, label: str) -> None:
    """token_match for every (checkpoint, chunk), with the seen/unseen boundary outlined."""
    import matplotlib.pyplot as plt

    pivot = summary.pivot(index="step", columns="chunk", values="token_match").sort_index()
    seen = summary.pivot(index="step", columns="chunk", values="seen_fraction").reindex_like(pivot)
    width, height = max(5, 0.35 * pivot.shape[1] + 3), max(4, 0.3 * pivot.shape[0] + 2)
    fig, ax = plt.subplots(figsize=(min(width, MAX_FIG_INCHES), min(height, MAX_FIG_INCHES)))
    im = ax.imshow(pivot.to_numpy(), aspect="auto", cmap="magma", origin="lower", interpolation="nearest")
    seen_arr = seen.to_numpy(dtype=float)
    if np.isfinite(seen_arr).any():  # staircase right of the last chunk each checkpoint had seen
        xs, ys = [], []
        for i, row in enumerate(seen_arr):
            seen_cols = np.flatnonzero(np.nan_to_num(row) >= 0.5)
            edge = float(seen_cols.max() + 0.5) if len(seen_cols) else -0.5
            xs += [edge, edge]
            ys += [i - 0.5, i + 0.5]
        ax.plot(xs, ys, color="cyan", linewidth=1.5)
    _matrix_ticks(ax, list(pivot.columns), list(pivot.index))
    ax.set_xlabel("data chunk")
    ax.set_ylabel("checkpoint step")
    ax.set_title(
        f"Mean score per chunk and checkpoint — {label}\n(cyan: chunks seen by the checkpoint)", fontsize=9
    )
    fig.colorbar(im, ax=ax, label="token_match")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(summary: Any, steps: list[int], path: Path, label: str) -> None:
    """token_match against chunk index, one line per checkpoint: is data seen later memorized more?"""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    chosen = _pick(steps, 12)
    for i, step in enumerate(chosen):
        part = summary[summary.step == step].sort_values("chunk")
        ax.plot(
            part.chunk,
            part.token_match,
            marker="o",
            markersize=3,
            color=cmap(i / max(1, len(chosen) - 1)),
            label=f"step {step}",
        )
    ax.set_xlabel("data chunk (training order)")
    ax.set_ylabel("token_match (mean score)")
    ax.set_title(f"Per-chunk memorization at each checkpoint — {label}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_correlation(scores: Any, block: int = 16384) -> Any:
    """Pearson correlation of per-sequence scores between checkpoints, over sequences scored at both (NaN
    where fewer than two are, or where one checkpoint's scores are all equal there). From sums accumulated
    over blocks of `block` sequences (matrix products), not a pivot table: 360 checkpoints x 360k sequences."""
    import pandas as pd

    steps, col = np.unique(scores.step.to_numpy(), return_inverse=True)
    _, row = np.unique(scores.seq_id.to_numpy(), return_inverse=True)
    order = np.argsort(row, kind="stable")
    row, col, value = row[order], col[order], scores.score.to_numpy(dtype=np.float64)[order]
    k = len(steps)
    n, sx, sxx, sxy = (np.zeros((k, k)) for _ in range(4))
    bounds = np.searchsorted(row, np.arange(0, int(row.max(initial=-1)) + 1 + block, block))
    for start, lo, hi in zip(range(0, len(bounds) * block, block), bounds[:-1], bounds[1:], strict=False):
        present, scored = np.zeros((block, k)), np.zeros((block, k))
        present[row[lo:hi] - start, col[lo:hi]] = 1.0
        scored[row[lo:hi] - start, col[lo:hi]] = value[lo:hi]
        n += present.T @ present  # [i, j]: sequences scored at both
        sx += scored.T @ present  # [i, j]: sum of i's scores over the sequences j also scored
        sxx += (scored * scored).T @ present
        sxy += scored.T @ scored
    with np.errstate(invalid="ignore", divide="ignore"):
        var = n * sxx - sx * sx  # [i, j]: n x the variance of i's scores on the sequences shared with j
        corr = (n * sxy - sx * sx.T) / np.sqrt(var * var.T)
    flat = 1e-12 * n * n  # a variance this small is a checkpoint whose scores are all equal there
    corr[(n < 2) | (np.minimum(var, var.T) <= flat)] = np.nan
    labels = pd.Index(steps, name="step")
    return pd.DataFrame(np.clip(corr, -1.0, 1.0), index=labels, columns=labels)


def plot_correlation(corr: Any, path: Path, label: str) -> None:
    """Checkpoint x checkpoint correlation matrix of per-sequence scores."""
    import matplotlib.pyplot as plt

    n = corr.shape[0]
    width, height = max(5, 0.35 * n + 3), max(4, 0.35 * n + 2)
    fig, ax = plt.subplots(figsize=(min(width, MAX_FIG_INCHES), min(height, MAX_FIG_INCHES)))
    im = ax.imshow(corr.to_numpy(dtype=float), vmin=-1, vmax=1, cmap="coolwarm", origin="lower")
    _matrix_ticks(ax, list(corr.columns), list(corr.index), rotate=90)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("checkpoint step")
    ax.set_title(f"Correlation of per-sequence scores between checkpoints — {label}", fontsize=9)
    fig.colorbar(im, ax=ax, label="Pearson r")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def progress_table(scores: Any, summary: Any, l_val: int) -> Any:
    """Per checkpoint: token_match, full_match overall and over seen / unseen sequences, tokens seen."""
    import pandas as pd

    frame = pd.DataFrame({
        "step": scores.step.to_numpy(),
        "seen": scores.seen.to_numpy(dtype=bool),
        "full": (scores.matched.to_numpy() == l_val).astype(np.float64),
        "score": scores.score.to_numpy(dtype=np.float64),
    })
    overall = frame.groupby("step").agg(n=("score", "size"), token_match=("score", "mean"), full_match=("full", "mean"))
    split = frame.groupby(["step", "seen"])[["full", "score"]].mean().unstack("seen")

    def part(column: str, seen: bool) -> Any:
        return split[(column, seen)] if (column, seen) in split.columns else pd.Series(dtype=float)

    tokens = summary.dropna(subset=["tokens_seen"]).groupby("step").tokens_seen.first()
    table = pd.DataFrame(index=pd.Index(sorted(int(s) for s in summary.step.unique()), name="step"))  # every
    # checkpoint, also one with no rows
    table["tokens_seen"] = tokens.astype(float)
    table = table.join(overall)
    table["n"] = table["n"].fillna(0).astype(int)
    for name, column, seen in (("full_match_seen", "full", True), ("full_match_unseen", "full", False),
                               ("token_match_seen", "score", True), ("token_match_unseen", "score", False)):
        table[name] = part(column, seen)
    columns = ["step", "tokens_seen", "n", "token_match", "full_match", "full_match_seen", "full_match_unseen",
               "token_match_seen", "token_match_unseen"]
    return table.reset_index()[columns].astype({c: float for c in columns if c not in ("step", "n")})


def plot_progress(progress: Any, path: Path, label: str) -> None:
    """Memorized fraction (full_match) and token_match against training progress."""
    import matplotlib.pyplot as plt

    use_tokens = progress.tokens_seen.notna().all() and len(progress)
    x = progress.tokens_seen if use_tokens else progress.step
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for column, style, name in (
        ("full_match", {"marker": "o"}, "full_match (k-extractable), all"),
        ("full_match_seen", {"marker": ".", "linestyle": "--"}, "full_match, seen sequences"),
        ("full_match_unseen", {"marker": ".", "linestyle": ":"}, "full_match, not yet seen"),
        ("token_match", {"marker": "s"}, "token_match (mean score)"),
    ):
        if progress[column].notna().any():  # selection=seen scores no unseen sequence: no empty legend entry
            ax.plot(x, progress[column], label=name, **style)
    ax.set_xlabel("tokens seen" if use_tokens else "step")
    ax.set_ylabel("fraction")
    ax.set_title(f"Memorization vs training progress — {label}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _md_table(df: Any) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(
    out_dir: Path,
    run: str,
    workspace: Path | None = None,
    log_mlflow: bool = True,
    cells: list[tuple[int, int]] | None = None,
    mlflow_run: tuple[str, str] | None = None,
    part: tuple[list[int], list[int]] | None = None,
) -> Path:
    """Render the figures and `report.md` of `cells` (a job's matrix; None: every cell) into `out_dir`.

    Returns the path of report.md. When `log_mlflow` and a checkpoint's lineage names an MLflow run
    (and mlflow is importable), the per-checkpoint token_match/full_match are logged to that run as metrics
    at each step under `memorization/<tag>-<dtype>`, with the figures, report and summary as artifacts
    there — or, for a `part` of the run's matrix (its steps, chunks), under `.../part-<hash of the part>`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    out_dir = Path(out_dir)
    if merge_cells(out_dir, cells) is None:
        raise FileNotFoundError(f"{out_dir}/cells: no cell parquet files; run the memorization job first")
    scores = pd.read_parquet(out_dir / SCORES_FILE, columns=REPORT_COLUMNS)  # once, the columns used only
    summary = pd.read_parquet(out_dir / SUMMARY_FILE)
    meta = _cell_meta(cell_files(out_dir, cells)[0])
    l_val, mode = int(meta.get("l", 32)), meta.get("mode", "greedy")
    label = f"{run}, {mode}, k={meta.get('k')} l={l_val}"
    steps = sorted(int(s) for s in summary.step.unique())

    plot_distribution(scores, steps, l_val, out_dir / FIGURES["distribution"], label, mode)
    plot_heatmap(summary, out_dir / FIGURES["heatmap"], label)
    plot_lines(summary, steps, out_dir / FIGURES["lines"], label)
    corr = score_correlation(scores)
    plot_correlation(corr, out_dir / FIGURES["correlation"], label)
    progress = progress_table(scores, summary, l_val)
    plot_progress(progress, out_dir / FIGURES["progress"], label)
    progress.to_csv(out_dir / "progress.csv", index=False)

    mode_note = (
        "**Exact greedy** decoding: each score is the LLM360 memorization score."
        if mode == "greedy"
        else "**Teacher-forced screen** (not the LLM360 score): `full_match` and the matched-prefix length "
        "are exact;"
        " `token_match` is teacher-forced accuracy, an estimate that can exceed the greedy score."
    )
    adjacent = [
        float(corr.loc[a, b]) for a, b in zip(steps, steps[1:], strict=False) if a in corr and b in corr
    ]
    defined = [r for r in adjacent if np.isfinite(r)]
    if len(steps) < 2:
        mean_r = "n/a (one checkpoint)"
    elif not defined:
        mean_r = "undefined (no consecutive pair has varying scores on sequences scored at both)"
    else:
        mean_r = f"{np.mean(defined):.3f}" + (
            f" (over {len(defined)} of {len(steps) - 1} pairs; at the others a checkpoint's scores are all "
            "equal or no sequence was scored at both)" if len(defined) < len(steps) - 1 else ""
        )
    if meta.get("selection") == "seen":  # drawn from the rows the checkpoint had trained on, not the chunk
        sampled = (
            f"per chunk, a sample of up to {meta['sample']} of the sequences the checkpoint had trained on, "
            f"seed {meta.get('seed')} (`numpy.random.default_rng(seed).permutation(chunk_size)` without the "
            "unseen rows, the first `sample`: checkpoints share most of their sample)"
            if meta.get("sample") else "every sequence the checkpoint had trained on"
        )
    else:
        sampled = (
            f"a sample of up to {meta['sample']} per chunk, seed {meta.get('seed')} "
            "(`numpy.random.default_rng(seed).permutation(chunk_size)[:sample]`)"
            if meta.get("sample") else "every sequence of each chunk"
        )
    md = [
        f"# Memorization — {run}",
        "",
        f"{mode_note} Prompt k={meta.get('k')} tokens, continuation l={l_val} tokens; "
        f"selection `{meta.get('selection')}`, {sampled}.",
        "",
        f"{len(steps)} checkpoints x {summary.chunk.nunique()} chunks, {len(scores)} scored sequences.",
        "",
        "## Memorization vs training progress",
        "",
        _md_table(
            progress[["step", "n", "token_match", "full_match", "full_match_seen", "full_match_unseen"]]
        ),
        "",
        f"![progress]({FIGURES['progress']})",
        "",
        "## Score distribution per checkpoint",
        "",
        f"![distribution]({FIGURES['distribution']})",
        "",
        "## Per-chunk mean score at each checkpoint",
        "",
        f"![heatmap]({FIGURES['heatmap']})",
        "",
        f"![lines]({FIGURES['lines']})",
        "",
        "## Correlation of per-sequence scores between checkpoints",
        "",
        f"Mean Pearson r between consecutive checkpoints: {mean_r}.",
        "",
        f"![correlation]({FIGURES['correlation']})",
        "",
        f"Data: `{SUMMARY_FILE}` (one row per cell), `{SCORES_FILE}` (one row per sequence), `cells/`.",
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(md))
    if log_mlflow:
        _log_mlflow(out_dir, run, workspace, progress, summary, meta, mlflow_run, part)
    return report


def mlflow_target(workspace: Path, run: str) -> tuple[str, str] | None:
    """(tracking URI, MLflow run id) named by the newest local checkpoint's lineage, or None."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from open360.checkpoint import list_checkpoints, read_lineage
    from open360.checkpoint.io import CONFIG_FILE, CheckpointError, read_config
    from open360.tracking.checkpoints import run_dirs

    for _, path in reversed(list_checkpoints(run_dirs(workspace, run)[0])):
        try:
            lineage = read_lineage(path)
        except CheckpointError:  # another checkpoint's damage is not this job's: the next one names the run
            continue
        run_id = lineage.get("mlflow_run_id") or (lineage.get("mlflow") or {}).get("run_id")
        if not (isinstance(run_id, str) and run_id):
            continue
        uri = "sqlite:///mlflow.db"
        if (path / CONFIG_FILE).is_file():
            try:
                uri = OmegaConf.select(read_config(path), "tracking.mlflow_uri", default=uri)
            except (CheckpointError, OmegaConfBaseException):
                continue
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
            uri = prefix + str(workspace / uri[len(prefix) :])
        return uri, run_id
    return None


def _log_mlflow(
    out_dir: Path, run: str, workspace: Path | None, progress: Any, summary: Any, meta: dict[str, Any],
    target: tuple[str, str] | None = None,
    part: tuple[list[int], list[int]] | None = None,
) -> None:
    """Log the per-checkpoint scores (as `memorization/<tag>-<dtype>/token_match|full_match`, only for
    checkpoints with every chunk scored) and figures, report and summary (there, or for a `part` of the
    run's matrix in `part-<hash>/` under it) to the run's MLflow run; skipped, with a note, without one.
    The key holds every setting the numbers depend on, so jobs of other settings or dtypes never overwrite
    each other, and a job over part of the matrix never replaces the whole one's report."""
    if workspace is None:
        return
    try:
        import mlflow
    except ImportError:
        return
    target = target or mlflow_target(workspace, run)
    if target is None:
        return
    uri, run_id = target
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file():
        print(f"memorization: not logged to MLflow: no store at {uri} (a clone without the run's mlflow.db)")
        return
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    tag = meta.get("tag") or out_dir.name
    tag = f"{tag}-{meta['dtype']}" if meta.get("dtype") else tag
    artifacts = f"memorization/{tag}"
    if part is not None:
        digest = hashlib.sha256(json.dumps([sorted(part[0]), sorted(part[1])]).encode()).hexdigest()[:8]
        artifacts += f"/part-{digest}"
        print(f"memorization: this job scored part of the run's checkpoints x chunks: its report is logged to "
              f"MLflow under {artifacts}/ (memorization/{tag}/ holds the whole matrix's)")
    try:
        client.get_run(run_id)
        for name in (*FIGURES.values(), "report.md", SUMMARY_FILE, "progress.csv"):
            if (out_dir / name).is_file():
                client.log_artifact(run_id, str(out_dir / name), artifact_path=artifacts)
        # A checkpoint's score is its mean over every chunk: steps scored on some chunks only are not logged.
        every = set(range(int(meta["num_chunks"]))) if meta.get("num_chunks") is not None else None
        whole = {int(s) for s, g in summary.groupby("step") if every is None or set(g.chunk.astype(int)) == every}
        if len(whole) < summary.step.nunique():
            print(f"memorization: metrics logged to MLflow for steps {sorted(whole)} only: the others were "
                  f"scored on some of the {len(every or ())} chunks")
        ts = int(time.time() * 1000)
        metrics = [
            Metric(f"memorization/{tag}/{key}", float(r[key]), ts, int(r["step"]))
            for _, r in progress.iterrows()
            if int(r["step"]) in whole
            for key in ("token_match", "full_match")
        ]
        # A re-run logs only what changed: values already at their step (the latest write) are not repeated.
        from open360.tracking.mlflow_records import latest_metrics

        logged = latest_metrics(client, run_id, {m.key for m in metrics})
        def same(before: Any, value: float) -> bool:  # NaN (a checkpoint with nothing scored) equals NaN
            old = getattr(before, "value", None)
            return old is not None and (old == value or (np.isnan(old) and np.isnan(value)))

        metrics = [m for m in metrics if not same(logged[m.key].get(m.step), m.value)]
        if metrics:
            client.log_batch(run_id, metrics=metrics)
    except MlflowException as err:
        print(f"memorization: not logged to MLflow run {run_id} at {uri}: {str(err).splitlines()[0]}")
