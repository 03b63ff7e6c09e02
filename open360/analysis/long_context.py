"""Context extension by Position Interpolation: PI fine-tuning, perplexity by position, passkey retrieval."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from open360.analysis.eval_cli import analysis_dir, report_errors, run_cli
from open360.analysis.evaluate import (
    check_device,
    check_trained_tokenizer,
    sequence_nll,
    shard_dir_for,
    trained_shard_dir,
)
from open360.paths import replace_together, resolve_workspace_path

LONG_CONTEXT_PARQUET = "long_context.parquet"
LONG_CONTEXT_REPORT = "long_context.md"
LONG_CONTEXT_PLOT = "long_context_ppl.png"
ORDERING_METRIC = "ppl_at_context"  # the (c) < (b) < (a) claim is about perplexity at L'
VARIANTS = {
    "a": "base, extrapolating (no PI)",
    "b": "base + PI, no fine-tuning",
    "c": "PI fine-tuned",
}

# The passkey prompt of Mohtashami & Jaggi (2023), as used in the Position Interpolation paper.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass
class LongContextConfig:
    """`python -m open360.analysis.long_context base=<ckpt> finetuned=<ckpt>`: the (a)/(b)/(c) comparison."""

    base: str = MISSING  # checkpoint of the model trained at L: a step folder, or a run name (its last step)
    finetuned: str = MISSING  # checkpoint of the PI fine-tuned model (context L'), same forms
    workspace: str = "."
    recipe: str | None = None  # held-out data with sequences >= L'+1; None = the fine-tuned run's recipe
    sequences: int = 32  # held-out sequences evaluated (round-robin over sources)
    buckets: int = 4  # position buckets over [0, L')
    stride: int = 0  # ppl_at_context scores positions [L' - stride, L'); 0 = L (each token sees >= L' - L context)
    passkey_lengths: list[int] = dataclasses.field(default_factory=list)  # prompt lengths; [] = L, 2L, L'
    passkey_trials: int = 20  # per length
    passkey_candidates: int = 10  # the true key and this many - 1 random keys, ranked by likelihood
    batch_size: int = 4  # sequences per forward pass (perplexity), and passkey candidates per forward pass
    device: str = "cpu"
    seed: int = 0
    out_dir: str | None = None  # default <workspace>/analysis/<fine-tuned run>
    require_ordering: bool = False  # exit 1 unless ppl_at_context (c) < (b) < (a) (the report states it either way)


# ----------------------------------------------------------------------------------------------
# Models: the same weights with another RoPE position scale
# ----------------------------------------------------------------------------------------------


def with_rope_interpolation(model: torch.nn.Module, factor: float, max_seq_len: int | None = None) -> torch.nn.Module:
    """A copy of a Decoder whose rotary positions are divided by `factor` (Position Interpolation)."""
    from open360.models import build_model

    cfg = dataclasses.replace(model.cfg, rope_interpolation_factor=float(factor),
                              max_seq_len=int(max_seq_len or model.cfg.max_seq_len))
    new = build_model(cfg)
    new.load_state_dict(model.state_dict())
    return new.to(next(model.parameters()).device)


def resolve_checkpoint(spec: str, workspace: Path) -> Path:
    """A checkpoint folder from a path, or from a run name (its newest published checkpoint)."""
    from open360.checkpoint.io import list_checkpoints

    path = Path(spec).expanduser()
    for candidate in (path, workspace / path, workspace / "checkpoints" / spec):
        if (candidate / "lineage.json").is_file():
            return candidate.resolve()
        found = list_checkpoints(candidate)
        if found:
            return found[-1][1].resolve()
    raise FileNotFoundError(
        f"'{spec}': neither a checkpoint folder (with lineage.json) nor a run with checkpoints under "
        f"{workspace / 'checkpoints'}; pass checkpoints/<run>/step_<N> or a run name"
    )


# ----------------------------------------------------------------------------------------------
# Perplexity by position
# ----------------------------------------------------------------------------------------------


def bucket_edges(context: int, buckets: int) -> list[int]:
    """Equal position buckets [edges[i], edges[i+1]) covering [0, context)."""
    if buckets < 1 or context < buckets:
        raise ValueError(f"buckets={buckets}: need 1 <= buckets <= context ({context})")
    return [int(round(x)) for x in np.linspace(0, context, buckets + 1)]


def perplexity_by_position(model: torch.nn.Module, sequences: np.ndarray, context: int, buckets: int = 4,
                           batch_size: int = 4, device: str = "cpu", stride: int | None = None) -> dict[str, float]:
    """Perplexity of next-token predictions: "ppl[lo,hi)" per position bucket, "ppl_all" over [0, context),
    and "ppl_at_context" over the last `stride` positions [context - stride, context).

    Position p is the prediction of token p+1 from tokens 0..p, so bucket [lo, hi) measures attention
    over contexts of length lo+1..hi. ppl_at_context is perplexity *at* context L' as the Position
    Interpolation paper measures it: a sliding-window evaluation (Press et al.) scores only the last
    `stride` tokens of each L'-token window, each predicted from at least L' - stride tokens.
    """
    if sequences.shape[1] < context + 1:
        raise ValueError(f"sequences have {sequences.shape[1]} tokens, need context+1 = {context + 1}")
    stride = stride or max(1, context // buckets)
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride}: need 1 <= stride <= context ({context})")
    nll = sequence_nll(model, sequences[:, : context + 1], batch_size, device)
    edges = bucket_edges(context, buckets)
    out = {f"ppl[{lo},{hi})": math.exp(float(nll[:, lo:hi].mean())) for lo, hi in zip(edges, edges[1:], strict=False)}
    out["ppl_all"] = math.exp(float(nll.mean()))
    out[ORDERING_METRIC] = math.exp(float(nll[:, context - stride :].mean()))
    return out


# ----------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------


@dataclass
class PasskeyTrial:
    """One prompt of `length` tokens with a key hidden at `depth` (fraction of the filler before it)."""

    prompt: list[int]
    answers: list[list[int]]  # token ids of " <key>" for the true key (index 0) and the distractors
    depth: float


def passkey_trials(tokenizer: Any, length: int, n: int, candidates: int = 10, seed: int = 0) -> list[PasskeyTrial]:
    """`n` passkey prompts of (at most) `length` tokens incl. the answer, keys of 5 digits, random depth."""
    rng = np.random.default_rng([seed, length])

    def enc(text: str) -> list[int]:  # as the shards were tokenized: no BOS/EOS a post-processor would add
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    intro, filler, question = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER), enc(PASSKEY_QUESTION)
    trials = []
    for _ in range(n):
        keys = [int(k) for k in rng.choice(np.arange(10000, 100000), size=candidates, replace=False)]
        answers = [enc(f" {k}") for k in keys]
        line = enc(PASSKEY_LINE.format(key=keys[0]))
        budget = length - len(intro) - len(line) - len(question) - max(len(a) for a in answers)
        n_fill = budget // len(filler)
        if n_fill < 1:
            raise ValueError(f"passkey length {length}: too short for the prompt (needs > {length - budget} tokens)")
        before = int(rng.integers(0, n_fill + 1))
        prompt = intro + filler * before + line + filler * (n_fill - before) + question
        trials.append(PasskeyTrial(prompt=prompt, answers=answers, depth=before / n_fill))
    return trials


@torch.no_grad()
def passkey_accuracy(
    model: torch.nn.Module, trials: Sequence[PasskeyTrial], device: str = "cpu", batch_size: int = 16
) -> dict[str, float]:
    """{"passkey_greedy": exact greedy retrieval rate, "passkey_choice": true key ranked first among candidates}.

    Greedy retrieval is checked teacher-forced: greedy decoding reproduces the key iff the argmax at each
    answer position is the key's next token — the same outcome as `generate(num_beams=1)`, in one pass.
    A trial's candidates go through the model `batch_size` at a time, and only their answer positions are
    normalized (10 candidates x 4k positions x a 32k vocabulary are 5 GB of fp32 log-probabilities).
    """
    model.eval()
    greedy = choice = 0
    for trial in trials:
        p = len(trial.prompt)
        scores = []
        for start in range(0, len(trial.answers), batch_size):
            answers = trial.answers[start : start + batch_size]
            rows = [trial.prompt + a for a in answers]
            batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
            for i, r in enumerate(rows):
                batch[i, : len(r)] = torch.tensor(r)
            logits = model(batch.to(device))
            for i, a in enumerate(answers):
                logp = torch.log_softmax(logits[i, p - 1 : p - 1 + len(a)].float(), dim=-1).cpu()
                key = torch.tensor(a)
                scores.append(float(logp[torch.arange(len(a)), key].sum()))
                if start + i == 0:  # the true key
                    greedy += int(torch.equal(logp.argmax(-1), key))
        choice += int(int(np.argmax(scores)) == 0)
    n = max(len(trials), 1)
    return {"passkey_greedy": greedy / n, "passkey_choice": choice / n}


# ----------------------------------------------------------------------------------------------
# The (a) / (b) / (c) comparison
# ----------------------------------------------------------------------------------------------


def held_out_sequences(shard_dir: Path, n: int, min_len: int) -> np.ndarray:
    """`n` held-out rows, round-robin over the sources, each at least `min_len` tokens."""
    from open360.data import ShardSet

    shards = ShardSet.open(shard_dir)
    per_source = [shards.validation(s) for s in sorted(shards.manifest["validation"])]
    if per_source and per_source[0].shape[1] < min_len:
        raise ValueError(
            f"{shard_dir}: held-out sequences have {per_source[0].shape[1]} tokens but {min_len} are needed; "
            "use a recipe with seq_len >= L' (e.g. data_recipes/embedded_tiny_long.yaml)"
        )
    rows = [s[i] for i in range(max((len(s) for s in per_source), default=0)) for s in per_source if i < len(s)]
    if not rows:
        raise ValueError(f"{shard_dir}: no held-out sequences (its recipe's validation: gave no rows); pass "
                         "recipe= with a held-out split of seq_len >= L'")
    return np.stack(rows[:n])


def evaluation_shards(ft_ckpt: Path, ft_lineage: dict[str, Any], ft_cfg: DictConfig, workspace: Path,
                      recipe: str | None) -> Path:
    """The shard folder whose held-out rows are scored: tokenized as the models were trained, and held out
    of every training the fine-tuned weights saw (the base's included, through `init_from`)."""
    from open360.checkpoint.lineage import trained_data_history
    from open360.data import ShardSet

    shard_dir = trained_shard_dir(ft_lineage, ft_cfg, workspace, recipe)
    shards = ShardSet.open(shard_dir)
    where = f"recipe={recipe or ft_cfg.data.recipe}"
    # recipe= may name shards of another tokenizer: ids of another vocabulary would be scored as text
    check_trained_tokenizer(ft_lineage, shards.tokenizer_hash, where, ft_ckpt,
                            "pass recipe= with the models' tokenizer spec (e.g. data_recipes/embedded_tiny_long.yaml)")
    # A document is held out iff validation_draw(seed, text) < fraction: the rows held out here were held out
    # of a training too iff its shards drew with the same seed and a fraction at least this one's.
    seed, fraction = shards.manifest.get("seed"), float(shards.manifest["recipe"]["validation"]["fraction"])
    for entry in trained_data_history(ft_lineage):
        if entry.get("manifest_hash") == shards.manifest_hash:
            continue
        folder = resolve_workspace_path(workspace, str(entry.get("shard_dir") or ""))
        try:
            trained = json.loads((folder / "manifest.json").read_text())
            trained_fraction = float(trained["recipe"]["validation"]["fraction"])
        except (OSError, ValueError, KeyError, TypeError):
            print(f"open360.analysis.long_context: warning: cannot check that the held-out rows of {shard_dir} were "
                  f"held out of {entry.get('recipe')} ({folder} not readable); pull it to check", file=sys.stderr)
            continue
        if trained.get("seed") != seed or fraction > trained_fraction:
            raise ValueError(
                f"{where}: its held-out split (seed {seed}, validation.fraction {fraction:g}) is not held out of "
                f"{entry.get('recipe')} (seed {trained.get('seed')}, validation.fraction {trained_fraction:g}), "
                f"which {ft_ckpt}'s weights trained on; evaluate on a recipe with that seed and a fraction <= "
                f"{trained_fraction:g}"
            )
    return shard_dir


def compare_variants(base: torch.nn.Module, finetuned: torch.nn.Module, sequences: np.ndarray, tokenizer: Any,
                     base_context: int, context: int, buckets: int = 4, passkey_lengths: Sequence[int] = (),
                     passkey_trials_per_length: int = 20, passkey_candidates: int = 10, batch_size: int = 4,
                     device: str = "cpu", seed: int = 0, stride: int | None = None) -> pd.DataFrame:
    """Rows (variant, metric, value) for (a) base extrapolating, (b) base + PI, (c) PI fine-tuned, at L'.
    (a) keeps the base's own rotary scale; (b) divides positions by a further L'/L on top of it."""
    own = float(base.cfg.rope_interpolation_factor)
    models = {
        "a": with_rope_interpolation(base, own, context),
        "b": with_rope_interpolation(base, own * context / base_context, context),
        "c": finetuned,
    }
    lengths = list(passkey_lengths) or sorted({base_context, 2 * base_context, context})
    trials = {n: passkey_trials(tokenizer, n, passkey_trials_per_length, passkey_candidates, seed) for n in lengths}
    rows = []
    for key, model in models.items():
        metrics = perplexity_by_position(model, sequences, context, buckets, batch_size, device, stride or base_context)
        for n, tr in trials.items():
            for name, value in passkey_accuracy(model, tr, device, batch_size).items():
                metrics[f"{name}@{n}"] = value
        rows += [dict(variant=key, description=VARIANTS[key], metric=m, value=v) for m, v in metrics.items()]
    return pd.DataFrame(rows)


def check_ordering(df: pd.DataFrame, metric: str = ORDERING_METRIC) -> bool:
    """The Position Interpolation claim at L': perplexity (c) < (b) < (a)."""
    v = df[df.metric == metric].set_index("variant")["value"]
    return bool(v["c"] < v["b"] < v["a"])


def markdown_report(df: pd.DataFrame, base_ckpt: Path, finetuned_ckpt: Path, base_context: int, context: int,
                    stride: int, finetuned_factor: float, held_out: str = "") -> str:
    """The comparison table in markdown, variants as rows; `held_out`: which held-out sequences were scored."""
    wide = df.pivot_table(index="variant", columns="metric", values="value", aggfunc="first")
    ppl_cols = [c for c in wide.columns if c.startswith("ppl[")]
    ppl_cols = sorted(ppl_cols, key=lambda c: int(c[4:].split(",")[0])) + ["ppl_all", ORDERING_METRIC]
    pk_cols = sorted((c for c in wide.columns if c.startswith("passkey")),
                     key=lambda c: (c.split("@")[0], int(c.split("@")[1])))
    headers = ["variant", *ppl_cols, *pk_cols]
    lines = [
        f"# Context extension by Position Interpolation: L = {base_context} → L' = {context}",
        "",
        f"- base: `{base_ckpt}`",
        f"- PI fine-tuned: `{finetuned_ckpt}` (rope_interpolation_factor = {finetuned_factor:g})",
        *([f"- held-out data: {held_out}"] if held_out else []),
        "- ppl[lo,hi): perplexity of next-token predictions at positions lo..hi-1 of held-out sequences;",
        f"  {ORDERING_METRIC}: perplexity at L' as the PI paper measures it (sliding window): positions",
        f"  [{context - stride},{context}), each predicted from >= {context - stride} tokens; ppl_all: positions [0,{context})",
        "- passkey_greedy@n: greedy decoding reproduces the key in an n-token prompt; passkey_choice@n: the true",
        "  key is the most likely of the candidate keys",
        f"- ordering (c) < (b) < (a) on {ORDERING_METRIC} (the claim): "
        f"**{'holds' if check_ordering(df) else 'does NOT hold'}**; on ppl_all: "
        f"{'holds' if check_ordering(df, 'ppl_all') else 'does not hold'}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for variant, row in wide.iterrows():
        cells = [f"({variant}) {VARIANTS[variant]}"]
        cells += [f"{row[c]:.4g}" for c in ppl_cols] + [f"{row[c]:.2f}" for c in pk_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ppl_by_position(df: pd.DataFrame, out_png: Path, base_context: int) -> Path:
    """Perplexity per position bucket for the three variants (log scale), the trained length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, g in df[df.metric.str.startswith("ppl[")].groupby("variant"):
        spans = [tuple(int(x) for x in m[4:-1].split(",")) for m in g.metric]
        mids = [(lo + hi) / 2 for lo, hi in spans]
        order = np.argsort(mids)
        ax.plot(np.array(mids)[order], g.value.to_numpy()[order], marker="o", label=f"({variant}) {VARIANTS[variant]}")
    ax.axvline(base_context, color="gray", ls="--", lw=1, label=f"trained length L={base_context}")
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_long_context(cfg: LongContextConfig) -> pd.DataFrame:
    """Load both checkpoints, compare (a)/(b)/(c) at L', write parquet, markdown table and plot."""
    from open360.checkpoint.io import load_model_from_checkpoint, read_lineage

    for key in ("sequences", "buckets", "passkey_trials", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.passkey_candidates < 2:
        raise ValueError(f"passkey_candidates={cfg.passkey_candidates}: must be >= 2 (the true key and a decoy)")
    if cfg.stride < 0:
        raise ValueError(f"stride={cfg.stride}: must be >= 0 (0 = the base's context L)")
    check_device(cfg.device)
    workspace = Path(cfg.workspace).expanduser().resolve()
    base_ckpt, ft_ckpt = resolve_checkpoint(cfg.base, workspace), resolve_checkpoint(cfg.finetuned, workspace)
    check_fine_tuned_from(base_ckpt, ft_ckpt)
    base, base_cfg = load_model_from_checkpoint(base_ckpt, cfg.device)
    finetuned, ft_cfg = load_model_from_checkpoint(ft_ckpt, cfg.device)
    check_pi_compatible(base_cfg.model, ft_cfg.model, f"finetuned={ft_ckpt} against base={base_ckpt}")
    base_context, context = int(base_cfg.trainer.seq_len), int(ft_cfg.trainer.seq_len)
    if context <= base_context:
        raise ValueError(f"{ft_ckpt}: trained at seq_len {context}, not longer than the base's {base_context}")
    ft_factor = float(ft_cfg.model.rope_interpolation_factor)
    expected = float(base_cfg.model.rope_interpolation_factor) * context / base_context
    if not math.isclose(ft_factor, expected, rel_tol=1e-6):
        print(f"open360.analysis.long_context: warning: {ft_ckpt} was fine-tuned with "
              f"rope_interpolation_factor {ft_factor:g}, not L'/L x the base's = {expected:g}; (b) uses "
              f"{expected:g}", file=sys.stderr)
    shard_dir = evaluation_shards(ft_ckpt, read_lineage(ft_ckpt), ft_cfg, workspace, cfg.recipe)
    sequences = held_out_sequences(shard_dir, cfg.sequences, context + 1)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(shard_dir / "tokenizer.json"))
    stride = cfg.stride or base_context
    df = compare_variants(base, finetuned, sequences, tokenizer, base_context, context, cfg.buckets,
                          cfg.passkey_lengths, cfg.passkey_trials, cfg.passkey_candidates, cfg.batch_size,
                          cfg.device, cfg.seed, stride)
    out_dir = analysis_dir(workspace, cfg.out_dir, str(ft_cfg.run_name))
    shown = [p.relative_to(workspace) if p.is_relative_to(workspace) else p for p in (base_ckpt, ft_ckpt)]
    scored = f"{len(sequences)} sequences of `{shard_dir.name}` ({cfg.sequences} asked for: `sequences=`)"
    report = markdown_report(df, *shown, base_context, context, stride, ft_factor, scored)
    replace_together({
        out_dir / LONG_CONTEXT_PARQUET: lambda p: df.to_parquet(p, index=False),
        out_dir / LONG_CONTEXT_PLOT: lambda p: plot_ppl_by_position(df, p, base_context),
        out_dir / LONG_CONTEXT_REPORT: lambda p: p.write_text(report + f"\n![perplexity by position]({LONG_CONTEXT_PLOT})\n"),
    })
    print(report)
    return df


# ----------------------------------------------------------------------------------------------
# PI fine-tuning: the trainer, started from a checkpoint's weights
# ----------------------------------------------------------------------------------------------


def check_fine_tuned_from(base_ckpt: Path, ft_ckpt: Path) -> None:
    """Raise unless the fine-tuned run started from the base checkpoint's weights (its lineage records
    `init_from.model_sha256`) and tokenizes like it: (a)/(b)/(c) compare one model before and after."""
    from open360.checkpoint.io import MODEL_FILE, read_lineage

    base, ft = read_lineage(base_ckpt), read_lineage(ft_ckpt)
    started = (ft.get("init_from") or {}).get("model_sha256")
    weights = (base.get("files") or {}).get(MODEL_FILE)
    if not started:
        raise ValueError(
            f"finetuned={ft_ckpt}: its lineage.json records no init_from — a run trained from scratch, or a "
            "fine-tune resumed by an open360 older than 2026-11-27, which dropped that record — so it cannot be "
            f"shown to be base={base_ckpt} PI fine-tuned; fine-tune with `long_context finetune init=...`"
        )
    if started and weights and started != weights:
        raise ValueError(
            f"finetuned={ft_ckpt} was fine-tuned from {(ft.get('init_from') or {}).get('checkpoint')} (weights "
            f"{started[:12]}…), not from base={base_ckpt} ({weights[:12]}…); pass the checkpoint it started from"
        )
    tokenizers = [(lin.get("data") or {}).get("tokenizer_hash") for lin in (base, ft)]
    if all(tokenizers) and tokenizers[0] != tokenizers[1]:
        raise ValueError(f"{base_ckpt} and {ft_ckpt} were trained with different tokenizers; they cannot be compared")


def check_pi_compatible(base_model_cfg: Any, model_cfg: Any, where: str) -> None:
    """Raise unless the two model configs differ only in max_seq_len and rope_interpolation_factor."""
    a = OmegaConf.to_container(base_model_cfg, resolve=True) if isinstance(base_model_cfg, DictConfig) else base_model_cfg
    b = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else model_cfg
    free = {"max_seq_len", "rope_interpolation_factor", "name", "compile", "activation_checkpointing"}
    diff = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if diff:
        raise ValueError(
            f"{where}: the base checkpoint's model differs in {diff} "
            f"({', '.join(f'{k}: {a.get(k)} vs {b.get(k)}' for k in diff)}); PI fine-tuning may change only "
            "max_seq_len and rope_interpolation_factor"
        )


def finetune_pi(cfg: DictConfig, init_checkpoint: Path | str, device: str = "cpu") -> dict[str, Any]:
    """Train `cfg` (e.g. +experiment=amber_tiny_pi) starting from the weights of `init_checkpoint`.

    Checks that only the context length / PI factor changed and that the fine-tuning data uses the base
    run's tokenizer, then runs the project's trainer (`run_training(..., init_from=...)`): same data order,
    checkpoints, MLflow and DVC callbacks, a fresh optimizer, and the base checkpoint in lineage.json.
    """
    from open360.checkpoint.io import read_config, read_lineage
    from open360.data import ShardSet
    from open360.train.pipeline import run_training

    init = Path(init_checkpoint).expanduser().resolve()
    lineage = read_lineage(init)
    base_cfg = read_config(init)
    check_pi_compatible(base_cfg.model, cfg.model, f"init checkpoint {init}")
    workspace = Path(cfg.workspace).expanduser().resolve()
    check_trained_tokenizer(lineage, ShardSet.open(shard_dir_for(cfg, workspace)).tokenizer_hash, cfg.data.recipe,
                            init, "fine-tune on a recipe with the base run's tokenizer spec "
                            "(see data_recipes/embedded_tiny_long.yaml)")
    given = cfg.trainer.get("init_from")
    if given and Path(str(given)).expanduser().resolve() != init:
        raise ValueError(f"trainer.init_from={given} and init={init_checkpoint} name different checkpoints; give one")
    cfg.trainer.init_from = str(init)  # the run's config (checkpoints, MLflow) records the warm start too
    return run_training(cfg, device, init_from=init)


FINETUNE_USAGE = """usage: python -m open360.analysis.long_context finetune init=<checkpoint> [hydra overrides]

Fine-tune a checkpoint with Position Interpolation, e.g.
  python -m open360.analysis.long_context finetune init=checkpoints/amber_tiny_pi_base/step_2400 +experiment=amber_tiny_pi
"""


def finetune_main(argv: Sequence[str]) -> int:
    """`finetune init=<ckpt> <overrides>`: compose the config and run `finetune_pi`."""
    from open360.config import compose
    from open360.tracking.mlflow_logger import TrackingError
    from open360.train.resources import ResourceError, check_resources
    from open360.train.trainer import TrainingError

    inits = [a for a in argv if a.startswith("init=")]
    if len(inits) != 1 or any(a in ("-h", "--help") for a in argv):
        print(FINETUNE_USAGE, file=sys.stderr if len(inits) != 1 else sys.stdout)
        return 0 if any(a in ("-h", "--help") for a in argv) else 2

    def job() -> int:
        from hydra.errors import HydraException

        try:
            cfg = compose([a for a in argv if not a.startswith("init=")])
            device = check_resources(cfg)
        except (HydraException, ResourceError) as err:  # an unknown key or group, a wrong type, no GPU
            raise ValueError(str(err).strip()) from err
        workspace = Path(cfg.workspace).expanduser().resolve()
        init = resolve_checkpoint(inits[0].split("=", 1)[1], workspace)
        try:
            finetune_pi(cfg, init, device)
        except (TrainingError, TrackingError) as err:  # what open360.train reports in one line too
            raise ValueError(str(err)) from err
        return 0

    return report_errors("open360.analysis.long_context finetune", job)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `finetune ...` fine-tunes with PI; otherwise `base=... finetuned=...` writes the comparison."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["finetune"]:
        return finetune_main(args[1:])
    doc = (f"{__doc__}\n\nFine-tune first: python -m open360.analysis.long_context finetune init=<checkpoint> "
           "[hydra overrides] (`finetune --help`); then compare base and fine-tuned run:")
    cfg = run_cli(LongContextConfig, args, "open360.analysis.long_context", doc)
    if cfg is None:
        return 0

    def job() -> int:
        df = run_long_context(cfg)
        return 1 if cfg.require_ordering and not check_ordering(df) else 0

    return report_errors("open360.analysis.long_context", job)


if __name__ == "__main__":
    sys.exit(main())
