"""Position Interpolation analysis: rotary scaling, position buckets, passkey scoring, and the (c)<(b)<(a) ordering."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from open360.analysis.long_context import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    bucket_edges,
    check_ordering,
    check_pi_compatible,
    markdown_report,
    passkey_accuracy,
    passkey_trials,
    perplexity_by_position,
    with_rope_interpolation,
)
from open360.config import compose
from open360.models import build_model


def tiny_model(**overrides) -> torch.nn.Module:
    cfg = compose(["+experiment=amber_tiny"]).model
    fields = {**dict(vocab_size=300, n_layers=2, d_model=32, n_heads=2, ffn_dim=64, max_seq_len=64), **overrides}
    for k, v in fields.items():
        cfg[k] = v
    torch.manual_seed(0)
    return build_model(cfg)


def byte_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [PASSKEY_INTRO, PASSKEY_FILLER * 3, "The pass key is 12345. Remember it. What is the pass key?"] * 5
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_interpolated_rotary_maps_long_positions_into_trained_range():
    model = tiny_model()
    pi = with_rope_interpolation(model, 4.0, max_seq_len=256)
    assert pi.cfg.rope_interpolation_factor == 4.0 and pi.cfg.max_seq_len == 256
    pi.rotary.ensure_length(256)
    # position 4p under PI has exactly the angles of position p in the base model
    torch.testing.assert_close(pi.rotary.cos[0:256:4], model.rotary.cos[:64], atol=1e-6, rtol=0)
    torch.testing.assert_close(pi.rotary.sin[0:256:4], model.rotary.sin[:64], atol=1e-6, rtol=0)
    ids = torch.randint(0, 300, (2, 40))
    same = with_rope_interpolation(model, 1.0)
    torch.testing.assert_close(same(ids), model(ids))
    assert not torch.allclose(pi(ids), model(ids))


def test_bucket_edges_and_perplexity_by_position():
    assert bucket_edges(512, 4) == [0, 128, 256, 384, 512]
    with pytest.raises(ValueError, match="buckets"):
        bucket_edges(3, 4)
    model = tiny_model()
    seqs = np.random.default_rng(0).integers(0, 300, size=(3, 97))
    out = perplexity_by_position(model, seqs, context=96, buckets=3, batch_size=2)
    assert set(out) == {"ppl[0,32)", "ppl[32,64)", "ppl[64,96)", "ppl_all", "ppl_at_context"}
    # an untrained model is near uniform over its vocabulary
    assert all(100 < v < 900 for v in out.values())
    # perplexity at the context: the last `stride` positions (default: the last bucket)
    assert out["ppl_at_context"] == out["ppl[64,96)"]
    last10 = perplexity_by_position(model, seqs, context=96, buckets=3, batch_size=2, stride=10)["ppl_at_context"]
    assert last10 != out["ppl_at_context"] and 100 < last10 < 900
    with pytest.raises(ValueError, match="context"):
        perplexity_by_position(model, seqs[:, :50], context=96)
    with pytest.raises(ValueError, match="stride=97"):
        perplexity_by_position(model, seqs, context=96, stride=97)


def test_passkey_prompts_fit_their_length_and_hide_the_key():
    tok = byte_tokenizer()
    trials = passkey_trials(tok, 400, n=6, candidates=5, seed=1)
    assert len(trials) == 6
    for t in trials:
        assert len(t.prompt) + max(len(a) for a in t.answers) <= 400
        assert len(t.prompt) > 300
        assert len(t.answers) == 5 and len({tuple(a) for a in t.answers}) == 5
        text = tok.decode(t.prompt)
        key = tok.decode(t.answers[0]).strip()
        assert f"The pass key is {key}." in text and text.endswith("The pass key is")
    assert len({round(t.depth, 3) for t in trials}) > 1
    with pytest.raises(ValueError, match="too short"):
        passkey_trials(tok, 30, n=1)


def test_passkey_prompts_hold_no_special_tokens_of_a_post_processor():
    """A hub tokenizer such as LLaMA's (AMBER's) adds <s> to every encode: the shards are tokenized without
    it, so the prompt must be too — else <s> sits before every filler piece and before each answer, and
    greedy retrieval would have to predict <s> after the question."""
    from tokenizers import processors

    tok = byte_tokenizer()
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    for t in passkey_trials(tok, 400, n=3, candidates=4, seed=1):
        assert bos not in t.prompt and all(bos not in a for a in t.answers)
        assert tok.decode(t.answers[0], skip_special_tokens=False).strip().isdigit()


def test_teacher_forced_passkey_check_equals_greedy_generation():
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size(), max_seq_len=256)
    trials = passkey_trials(tok, 240, n=4, candidates=3, seed=2)
    # make the model copy: a trial counts as retrieved iff greedy decoding reproduces the key
    for t in trials:
        seq = torch.tensor([t.prompt])
        for _ in range(len(t.answers[0])):
            nxt = model(seq)[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        generated = seq[0, len(t.prompt):].tolist()
        teacher_forced = passkey_accuracy(model, [t])["passkey_greedy"]
        assert teacher_forced == float(generated == t.answers[0])
    # a "model" that always predicts the key's tokens retrieves every key and ranks it first
    key_model = KeyOracle(trials, tok.get_vocab_size())
    scores = passkey_accuracy(key_model, trials)
    assert scores == {"passkey_greedy": 1.0, "passkey_choice": 1.0}
    rows_per_forward = []

    def counted(ids: torch.Tensor) -> torch.Tensor:
        rows_per_forward.append(len(ids))
        return model(ids)

    counted.eval = model.eval
    for batch_size in (1, 2):  # the candidates in batches of batch_size (2: a last partial one): the same scores
        assert passkey_accuracy(key_model, trials, batch_size=batch_size) == scores
        rows_per_forward.clear()
        assert passkey_accuracy(counted, trials, batch_size=batch_size) == passkey_accuracy(model, trials)
        assert max(rows_per_forward) == batch_size and len(rows_per_forward) == len(trials) * -(-3 // batch_size)


class KeyOracle(torch.nn.Module):
    """Logits that put all mass on the true key's next token after each trial's prompt."""

    def __init__(self, trials, vocab: int) -> None:
        super().__init__()
        self.by_prompt = {tuple(t.prompt): t.answers[0] for t in trials}
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*ids.shape, self.vocab)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            for prompt, answer in self.by_prompt.items():
                if tuple(row[: len(prompt)]) == prompt:
                    for j, tok_id in enumerate(answer):
                        out[b, len(prompt) - 1 + j, tok_id] = 10.0
        return out


def test_check_pi_compatible_names_the_differing_field():
    base = dataclasses.asdict(tiny_model().cfg)
    check_pi_compatible(base, {**base, "max_seq_len": 512, "rope_interpolation_factor": 4.0}, "here")
    with pytest.raises(ValueError, match="d_model"):
        check_pi_compatible(base, {**base, "d_model": 64}, "here")


def test_ordering_and_report():
    rows = [dict(variant=v, description="", metric=m, value=x) for v, m, x in [
        ("a", "ppl_at_context", 900.0), ("b", "ppl_at_context", 60.0), ("c", "ppl_at_context", 20.0),
        ("a", "ppl_all", 50.0), ("b", "ppl_all", 60.0), ("c", "ppl_all", 20.0),
        ("a", "ppl[0,64)", 10.0), ("b", "ppl[0,64)", 30.0), ("c", "ppl[0,64)", 12.0),
        ("a", "passkey_greedy@64", 0.5), ("b", "passkey_greedy@64", 0.1), ("c", "passkey_greedy@64", 0.4)]]
    df = pd.DataFrame(rows)
    assert check_ordering(df) and not check_ordering(df, "ppl_all")
    md = markdown_report(df, "base", "ft", 64, 256, 64, 4.0, "12 sequences of `x` (32 asked for: `sequences=`)")
    assert "(rope_interpolation_factor = 4)" in md and "- held-out data: 12 sequences of `x` (32 asked" in md
    assert "(c) < (b) < (a) on ppl_at_context (the claim): **holds**; on ppl_all: does not hold" in md
    assert "(c) PI fine-tuned" in md and "ppl[0,64)" in md and "[192,256), each predicted from >= 192" in md
    df.loc[(df.variant == "b") & (df.metric == "ppl_at_context"), "value"] = 1000.0
    assert not check_ordering(df)


BASE_MODEL = ["model.d_model=64", "model.n_layers=2", "model.ffn_dim=128"]


BASE_STEPS = 600  # long enough that the base leans on its positions (60 steps: extrapolation barely degrades)


@pytest.mark.slow
def test_position_interpolation_ordering_at_the_extended_context(tmp_path_factory):
    """L=128 -> L'=512 on a 2-layer amber_tiny-family base: perplexity at L' is (c) PI fine-tuned < (b) PI
    without fine-tuning < (a) extrapolating, the Position Interpolation paper's ordering."""
    from open360.analysis.long_context import finetune_pi, main
    from open360.train.pipeline import run_training

    ws = tmp_path_factory.mktemp("pi_ws")
    shards = tmp_path_factory.getbasetemp() / "eval_shared_shards"
    common = [f"workspace={ws}", f"data.shards_dir={shards}", "tracking=off", "trainer.progress_bar=false", *BASE_MODEL]
    base_cfg = compose(["+experiment=amber_tiny_pi_base", "run_name=pi_base", f"trainer.max_steps={BASE_STEPS}",
                        f"checkpoint.every={BASE_STEPS}", *common])
    run_training(base_cfg, device="cpu")
    base_ckpt = ws / "checkpoints" / "pi_base" / f"step_{BASE_STEPS}"
    pi_cfg = compose(["+experiment=amber_tiny_pi", "run_name=pi_ft", "checkpoint.every=1000", *common])
    assert pi_cfg.model.rope_interpolation_factor == pi_cfg.trainer.seq_len / base_cfg.trainer.seq_len == 4
    summary = finetune_pi(pi_cfg, base_ckpt, device="cpu")
    steps = int(pi_cfg.trainer.max_steps)
    assert summary["status"] == "finished" and summary["steps"] == steps
    ft_ckpt = ws / "checkpoints" / "pi_ft" / f"step_{steps}"
    lineage = json.loads((ft_ckpt / "lineage.json").read_text())
    assert lineage["init_from"]["checkpoint"] == str(base_ckpt.resolve())

    args = dict(base=str(base_ckpt), finetuned="pi_ft", workspace=str(ws), sequences=16, passkey_trials=3,
                passkey_candidates=4)
    # the CLI's require_ordering=true exits 0 when the ordering holds (one evaluation, read back below)
    assert main([f"{k}={v}" for k, v in args.items()] + ["require_ordering=true"]) == 0
    df = pd.read_parquet(ws / "analysis" / "pi_ft" / "long_context.parquet")
    at = df[df.metric == "ppl_at_context"].set_index("variant").value
    assert check_ordering(df) and at["c"] < at["b"] < at["a"], at.to_dict()
    # the base model extrapolating degrades past its trained length L
    a = df[df.variant == "a"].set_index("metric").value
    assert a["ppl[384,512)"] > 1.3 * a["ppl[0,128)"]
    assert {f"passkey_greedy@{n}" for n in (128, 256, 512)} <= set(df.metric)
    report = (ws / "analysis" / "pi_ft" / "long_context.md").read_text()
    assert "(c) < (b) < (a) on ppl_at_context (the claim): **holds**" in report
    assert (ws / "analysis" / "pi_ft" / "long_context_ppl.png").is_file()


def test_unknown_run_exits_with_one_line(tmp_path, capsys):
    from open360.analysis.long_context import main

    assert main(["base=no_such_run", "finetuned=other", f"workspace={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("open360.analysis.long_context: ") and "no_such_run" in err


@pytest.mark.parametrize("arg,says", [
    ("sequences=-3", "sequences=-3: must be >= 1"),
    ("passkey_trials=0", "passkey_trials=0: must be >= 1"),
    ("passkey_candidates=1", "passkey_candidates=1: must be >= 2"),
    ("batch_size=0", "batch_size=0: must be >= 1"),
])
def test_counts_out_of_range_name_their_key(tmp_path, capsys, arg, says):
    from open360.analysis.long_context import main

    assert main(["base=a", "finetuned=b", f"workspace={tmp_path}", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("open360.analysis.long_context: ") and says in err and "Traceback" not in err


def test_the_variants_must_come_from_one_base(tmp_path):
    """(a)/(b)/(c) compare one model before and after PI fine-tuning: a fine-tuned run started from other
    weights, or tokenizing otherwise, is refused before any model is loaded."""
    from open360.analysis.long_context import check_fine_tuned_from

    def ckpt(name: str, lineage: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "lineage.json").write_text(json.dumps(lineage))
        return d

    base = ckpt("base", {"files": {"model.safetensors": "a" * 64}, "data": {"tokenizer_hash": "t1"}})
    ft = ckpt("ft", {"init_from": {"checkpoint": "/x/step_9", "model_sha256": "a" * 64}, "data": {"tokenizer_hash": "t1"}})
    check_fine_tuned_from(base, ft)
    other = ckpt("other", {"init_from": {"checkpoint": "/x/step_5", "model_sha256": "b" * 64}})
    with pytest.raises(ValueError, match=r"was fine-tuned from /x/step_5 .* not from base="):
        check_fine_tuned_from(base, other)
    retok = ckpt("retok", {"init_from": {"model_sha256": "a" * 64}, "data": {"tokenizer_hash": "t2"}})
    with pytest.raises(ValueError, match="different tokenizers"):
        check_fine_tuned_from(base, retok)
    scratch = ckpt("scratch", {"data": {"tokenizer_hash": "t1"}})  # trained at L' from scratch: no init_from
    with pytest.raises(ValueError, match="records no init_from"):
        check_fine_tuned_from(base, scratch)


def test_finetune_bad_input_exits_with_one_line(tmp_path, capsys):
    from open360.analysis.long_context import main

    for args, says in (
        (["init=checkpoints/nope/step_5"], "'checkpoints/nope/step_5': neither a checkpoint folder"),
        (["init=checkpoints/nope/step_5", "model.d_modle=64"], "d_modle"),
    ):
        assert main(["finetune", *args, "+experiment=amber_tiny_pi", f"workspace={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("open360.analysis.long_context finetune: ") and says in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("error", ["training", "tracking"])
def test_finetune_training_and_tracking_errors_exit_with_one_line(tmp_path, capsys, monkeypatch, error):
    """What `open360.train` reports in one line (a TrainingError, a TrackingError) is one line here too."""
    import open360.analysis.long_context as long_context
    from open360.tracking.mlflow_logger import TrackingError
    from open360.train.trainer import TrainingError

    raised = {"training": TrainingError, "tracking": TrackingError}[error](f"the {error} stage says no")

    def fail(cfg, init, device):
        assert init == tmp_path / "base" / "step_4"
        raise raised

    monkeypatch.setattr(long_context, "resolve_checkpoint", lambda spec, workspace: tmp_path / spec)
    monkeypatch.setattr(long_context, "finetune_pi", fail)
    assert long_context.main(["finetune", "init=base/step_4", "+experiment=amber_tiny_pi", f"workspace={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"open360.analysis.long_context finetune: the {error} stage says no", err


def test_a_shard_folder_without_held_out_split_is_named_not_a_max_error(monkeypatch):
    import open360.data
    from open360.analysis.long_context import held_out_sequences

    class NoValidation:
        manifest = {"validation": {}}

    monkeypatch.setattr(open360.data.ShardSet, "open", staticmethod(lambda path: NoValidation()))
    with pytest.raises(ValueError, match=r"shards/x: no held-out sequences .*recipe="):
        held_out_sequences(Path("shards/x"), 4, 513)


def test_evaluation_shards_must_tokenize_like_the_models_and_be_held_out_of_their_trainings(tmp_path, monkeypatch,
                                                                                             capsys):
    """recipe= names the held-out rows scored: rows of another tokenizer, or of documents the base trained on
    (another seed, or a larger validation fraction, draws another held-out split), are refused, not scored."""
    import open360.analysis.long_context as long_context
    import open360.data
    from open360.data import TokenizerMismatchError

    def manifest(folder: str, seed: int, fraction: float) -> dict:
        m = {"seed": seed, "recipe": {"validation": {"fraction": fraction}}, "manifest_hash": folder}
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "manifest.json").write_text(json.dumps(m))
        return m

    manifest("base_shards", 1234, 0.06)
    evaluated = {}

    class Shards:
        def __init__(self, m: dict, tok: str) -> None:
            self.manifest, self.manifest_hash, self.tokenizer_hash = m, m["manifest_hash"], tok

    monkeypatch.setattr(long_context, "trained_shard_dir", lambda *a: tmp_path / "eval_shards")
    monkeypatch.setattr(open360.data.ShardSet, "open", staticmethod(lambda path: evaluated["shards"]))
    lineage = {"data_history": [{"recipe": "long.yaml", "shard_dir": "ft_shards", "manifest_hash": "ft_shards"}],
               "data": {"tokenizer_hash": "t1"},
               "init_from": {"data_history": [{"recipe": "base.yaml", "shard_dir": "base_shards",
                                               "manifest_hash": "base_shards"}]}}
    cfg = OmegaConf.create({"data": {"recipe": "long.yaml"}})

    def evaluate(seed: int, fraction: float, tok: str = "t1", name: str = "eval_shards") -> Path:
        evaluated["shards"] = Shards({**manifest(name, seed, fraction), "manifest_hash": name}, tok)
        return long_context.evaluation_shards(tmp_path / "ft", lineage, cfg, tmp_path, "other.yaml")

    assert evaluate(1234, 0.06, name="ft_shards") == tmp_path / "eval_shards"  # the fine-tune's own recipe
    assert evaluate(1234, 0.03) == tmp_path / "eval_shards"  # a subset of the base's held-out documents
    with pytest.raises(TokenizerMismatchError, match="recipe=other.yaml: tokenized with tokenizer t2"):
        evaluate(1234, 0.06, tok="t2")
    with pytest.raises(ValueError, match=r"seed 99, .* not held out of base.yaml \(seed 1234"):
        evaluate(99, 0.06)
    with pytest.raises(ValueError, match=r"validation.fraction 0.1\) is not held out of base.yaml"):
        evaluate(1234, 0.1)
    for folder in ("base_shards", "ft_shards"):  # not on this machine: said, not checked
        (tmp_path / folder / "manifest.json").unlink()
    assert evaluate(99, 0.06) == tmp_path / "eval_shards"
    assert "cannot check that the held-out rows" in capsys.readouterr().err


def test_finetune_records_its_init_checkpoint_in_the_run_config(tmp_path, monkeypatch):
    """`long_context finetune init=X` trains as `open360.train trainer.init_from=X` does: the run's config
    (config.yaml of every checkpoint, MLflow's params and config artifact) names X, not init_from: null."""
    import open360.analysis.long_context as long_context
    import open360.data
    import open360.train.pipeline

    cfg = compose(["+experiment=amber_tiny_pi", f"workspace={tmp_path}"])
    init = tmp_path / "base" / "step_4"
    init.mkdir(parents=True)
    base = compose(["+experiment=amber_tiny_pi_base"])
    (init / "config.yaml").write_text(OmegaConf.to_yaml(base))
    (init / "lineage.json").write_text(json.dumps({"step": 4, "data": {"tokenizer_hash": "t1"}}))
    trained = {}
    monkeypatch.setattr(long_context, "shard_dir_for", lambda *a: tmp_path)
    monkeypatch.setattr(open360.data.ShardSet, "open", staticmethod(lambda path: type("S", (), {"tokenizer_hash": "t1"})))
    monkeypatch.setattr(open360.train.pipeline, "run_training",
                        lambda c, device, init_from: trained.update(config=c.trainer.init_from, arg=init_from))
    long_context.finetune_pi(cfg, init)
    assert trained == {"config": str(init.resolve()), "arg": init.resolve()}
    cfg.trainer.init_from = str(tmp_path / "other")
    with pytest.raises(ValueError, match="name different checkpoints"):
        long_context.finetune_pi(cfg, init)


def test_a_failure_while_writing_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    """long_context.parquet, the plot and long_context.md are one comparison: a failure (or Ctrl-C) while they
    were written left the new table beside the previous run's report; now they replace the old ones together."""
    import open360.analysis.long_context as long_context
    import open360.checkpoint.io

    configs = {"base": compose(["+experiment=amber_tiny_pi_base"]), "ft": compose(["+experiment=amber_tiny_pi"])}
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(long_context, "resolve_checkpoint", lambda spec, workspace: tmp_path / spec)
    monkeypatch.setattr(long_context, "check_fine_tuned_from", lambda base, ft: None)
    monkeypatch.setattr(open360.checkpoint.io, "load_model_from_checkpoint", lambda p, device: (None, configs[p.name]))
    monkeypatch.setattr(open360.checkpoint.io, "read_lineage", lambda p: {})
    monkeypatch.setattr(long_context, "evaluation_shards", lambda *args: tmp_path)
    monkeypatch.setattr(long_context, "held_out_sequences", lambda *args: np.zeros((1, 513), dtype=np.int64))
    ppl = {"a": 900.0, "b": 60.0, "c": 20.0}
    monkeypatch.setattr(long_context, "compare_variants", lambda *args: pd.DataFrame(
        [dict(variant=v, description="", metric=m, value=x) for v, x in ppl.items()
         for m in ("ppl[0,512)", "ppl_all", "ppl_at_context")]))
    cfg = long_context.LongContextConfig(base="base", finetuned="ft", workspace=str(tmp_path), out_dir=str(tmp_path / "out"))
    long_context.run_long_context(cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert set(before) == {"long_context.parquet", "long_context_ppl.png", "long_context.md"}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    ppl["c"] = 2000.0
    monkeypatch.setattr(long_context, "plot_ppl_by_position", interrupted)
    with pytest.raises(KeyboardInterrupt):
        long_context.run_long_context(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
