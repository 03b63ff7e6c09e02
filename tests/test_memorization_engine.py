"""Scoring engine: KV-cache greedy equals a cache-free greedy loop, teacher-forced screen, sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from open360.analysis.memorization import (
    MemorizationScorer,
    match_counts,
    sample_rows,
    seen_rows,
)
from open360.models import build_model

TINY = dict(
    name="mem_tiny",
    vocab_size=97,
    n_layers=2,
    d_model=32,
    n_heads=4,
    ffn_dim=64,
    max_seq_len=64,
    init_std=0.3,  # peaked logits: no near-ties for argmax to break differently across code paths
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices run fastest on one thread, and the CPU is shared with other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **over: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({**TINY, **over}).eval()


def naive_greedy(model: torch.nn.Module, prompts: torch.Tensor, cont_len: int) -> torch.Tensor:
    """Reference: re-run the whole sequence without a cache at every step."""
    ids = prompts.clone()
    with torch.no_grad():
        for _ in range(cont_len):
            nxt = model(ids)[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, prompts.shape[1] :]


def test_match_counts_hand_example() -> None:
    pred = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 0, 0, 0]])
    truth = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    matched, prefix = match_counts(pred, truth)
    assert matched.tolist() == [4, 3, 0]
    assert prefix.tolist() == [4, 1, 0]


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"n_kv_heads": 2, "rotary_fraction": 0.5},
        {
            "parallel_block": True,
            "norm": "layernorm",
            "mlp": "gelu",
            "attn_bias": True,
            "mlp_bias": True,
            "lm_head_bias": True,
            "tie_embeddings": True,
        },
    ],
)
def test_kv_cache_greedy_equals_cache_free_loop(over: dict) -> None:
    model = tiny_model(**over)
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, TINY["vocab_size"], (11, 24), generator=gen)
    k, cont = 8, 12
    res = MemorizationScorer(model, k=k, l=cont, batch_size=4, mode="greedy").score(seqs)
    ref = naive_greedy(model, seqs[:, :k], cont)
    assert np.array_equal(res.predicted, ref.numpy())
    truth = seqs[:, k : k + cont]
    assert res.matched.tolist() == (ref == truth).sum(1).tolist()
    assert res.score.dtype == np.float32 and res.mode == "greedy"


def test_batch_size_does_not_change_scores() -> None:
    model = tiny_model()
    seqs = torch.randint(0, TINY["vocab_size"], (13, 20), generator=torch.Generator().manual_seed(2))
    a = MemorizationScorer(model, k=6, l=10, batch_size=5).score(seqs)
    b = MemorizationScorer(model, k=6, l=10, batch_size=64).score(seqs)
    assert np.array_equal(a.predicted, b.predicted)
    assert np.array_equal(a.matched, b.matched)


@pytest.mark.parametrize("mode", ["greedy", "teacher_forced"])
def test_groups_share_batches_and_score_like_each_group_alone(mode: str) -> None:
    model = tiny_model(seed=5)
    seqs = torch.randint(0, TINY["vocab_size"], (26, 20), generator=torch.Generator().manual_seed(6))
    sizes = [5, 0, 13, 7, 1]
    groups = list(zip("abcde", torch.split(seqs, sizes), strict=True))
    scorer = MemorizationScorer(model, k=8, l=8, batch_size=4, mode=mode)
    batches: list[int] = []
    real_batch = scorer._batch
    scorer._batch = lambda tokens: batches.append(len(tokens)) or real_batch(tokens)  # type: ignore[method-assign]
    streamed = list(scorer.score_groups(iter(groups)))
    assert [key for key, _ in streamed] == list("abcde")
    assert batches == [4] * 6 + [2]  # 26 sequences in 7 batches; group by group it takes 9
    for (key, res), (_, group) in zip(streamed, groups, strict=True):
        alone = scorer.score(group)
        assert len(res.matched) == len(group), key
        assert np.array_equal(res.predicted, alone.predicted) and np.array_equal(res.matched, alone.matched)
        assert np.array_equal(res.prefix_match, alone.prefix_match) and res.mode == mode
    total = sum(res.seconds for _, res in streamed)
    assert total > 0 and streamed[1][1].seconds == 0.0  # each group carries its share of the time


def test_groups_are_yielded_as_soon_as_they_are_scored() -> None:
    scorer = MemorizationScorer(tiny_model(seed=7), k=8, l=8, batch_size=4)
    seqs = torch.randint(0, TINY["vocab_size"], (12, 16), generator=torch.Generator().manual_seed(8))
    read: list[str] = []

    def groups() -> Iterator[tuple[str, torch.Tensor]]:
        for key, lo, hi in (("a", 0, 4), ("b", 4, 6), ("c", 6, 12)):
            read.append(key)
            yield key, seqs[lo:hi]

    stream = scorer.score_groups(groups())
    assert next(stream)[0] == "a" and read == ["a"]  # a full batch: scored before "b" is read
    assert [key for key, _ in stream] == ["b", "c"]


def test_loaded_weights_score_like_a_fresh_scorer_and_mismatches_are_refused() -> None:
    seqs = torch.randint(0, TINY["vocab_size"], (9, 16), generator=torch.Generator().manual_seed(9))
    scorer = MemorizationScorer(tiny_model(seed=1), k=8, l=8, batch_size=4)
    first = scorer.score(seqs)
    other = tiny_model(seed=2)
    scorer.load_weights(other.state_dict())
    swapped = scorer.score(seqs)
    assert np.array_equal(swapped.predicted, MemorizationScorer(other, k=8, l=8, batch_size=4).score(seqs).predicted)
    assert not np.array_equal(swapped.predicted, first.predicted)
    wider = tiny_model(seed=3, ffn_dim=96).state_dict()
    with pytest.raises(ValueError, match="other shapes"):
        scorer.load_weights(wider)
    partial = {k: v for k, v in other.state_dict().items() if k != "final_norm.weight"}
    with pytest.raises(ValueError, match=r"missing \['final_norm.weight'\]"):
        scorer.load_weights(partial)
    assert np.array_equal(scorer.score(seqs).predicted, swapped.predicted)  # a refused load changes nothing


def test_auto_batch_size_is_64_on_cpu_and_negative_is_refused() -> None:
    assert MemorizationScorer(tiny_model(), k=8, l=8, batch_size=0).batch_size == 64
    with pytest.raises(ValueError, match="batch_size=-1 must be >= 1, or 0 for auto"):
        MemorizationScorer(tiny_model(), k=8, l=8, batch_size=-1)


def test_teacher_forced_is_exact_for_full_match_and_prefix() -> None:
    model = tiny_model()
    k, cont = 8, 12
    prompts = torch.randint(0, TINY["vocab_size"], (16, k), generator=torch.Generator().manual_seed(3))
    greedy_tail = naive_greedy(model, prompts, cont)
    memorized = torch.cat([prompts, greedy_tail], dim=1)  # the model's own continuation: score 1
    corrupt = memorized.clone()
    corrupt[8:, k + 5] = (corrupt[8:, k + 5] + 1) % TINY["vocab_size"]  # diverge at position 5
    for seqs in (memorized, corrupt):
        g = MemorizationScorer(model, k=k, l=cont, mode="greedy").score(seqs)
        t = MemorizationScorer(model, k=k, l=cont, mode="teacher_forced").score(seqs)
        assert t.mode == "teacher_forced"
        assert np.array_equal(g.matched == cont, t.matched == cont)
        assert np.array_equal(g.prefix_match, t.prefix_match)
    g = MemorizationScorer(model, k=k, l=cont).score(memorized)
    assert g.full_match == 1.0 and g.token_match == 1.0
    g = MemorizationScorer(model, k=k, l=cont).score(corrupt)
    assert g.full_match == 0.5 and (g.prefix_match[8:] == 5).all()


def test_short_sequences_are_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="k\\+l"):
        MemorizationScorer(tiny_model(), k=8, l=8).score(np.zeros((2, 10), dtype=np.int64))


def test_sample_rows_is_analysis360s_datasets_shuffle() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"row": list(range(500))})
    expected = ds.shuffle(seed=42).select(range(100))["row"]
    assert sample_rows(500, 100, seed=42).tolist() == list(expected)
    assert sample_rows(50, 100).tolist() == list(range(50))  # fewer rows than the sample: all


def test_a_seen_sample_is_shared_across_checkpoints_and_equals_the_chunk_sample_once_all_is_seen() -> None:
    """selection=seen with a sample: a checkpoint that has seen more keeps most of an earlier one's draw (a
    fresh permutation of each seen set shared 7 of 200 rows here), and a chunk seen whole is the sample's rows."""
    from open360.analysis.memorization.sampling import sample_seen_rows

    size, sample = 10_000, 200
    early, late = np.arange(6_000), np.arange(8_000)
    a, b = sample_seen_rows(size, early, sample), sample_seen_rows(size, late, sample)
    assert len(a) == len(b) == sample and set(a) <= set(early.tolist()) and set(b) <= set(late.tolist())
    assert len(set(a) & set(b)) >= 0.6 * sample  # 147 here: ~6/8 of b's draw falls in early, drawn as a drew it
    assert sample_seen_rows(size, np.arange(size), sample).tolist() == sample_rows(size, sample).tolist()
    assert sample_seen_rows(size, late[:50], sample).tolist() == list(range(50))  # fewer seen: all, in row order
    assert sample_seen_rows(size, late, 0).tolist() == late.tolist()


def test_seen_rows_groups_global_ids_by_chunk() -> None:
    sizes = [4, 5, 3]
    seen = np.array([0, 3, 4, 8, 8, 9, 11, 2])
    assert seen_rows(seen, sizes, 0).tolist() == [0, 2, 3]
    assert seen_rows(seen, sizes, 1).tolist() == [0, 4]
    assert seen_rows(seen, sizes, 2).tolist() == [0, 2]
    with pytest.raises(ValueError, match="chunk 3"):
        seen_rows(seen, sizes, 3)


def test_greedy_equals_transformers_generate_on_the_hf_export(tmp_path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from open360.analysis.memorization.reference import hf_greedy_continuations
    from open360.models.hf import export_hf

    model = tiny_model(seed=4)
    export_hf(model, model.cfg, None, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    seqs = torch.randint(0, TINY["vocab_size"], (20, 32), generator=torch.Generator().manual_seed(5))
    ref = hf_greedy_continuations(hf, seqs, k=16, cont_len=16, batch_size=8)
    ours = MemorizationScorer(model, k=16, l=16, batch_size=6).score(seqs)
    assert np.array_equal(ours.predicted, ref)
    assert np.array_equal(ours.matched, (ref == seqs[:, 16:32].numpy()).sum(1))


@pytest.mark.parametrize("over", [{}, {"n_kv_heads": 2, "rotary_fraction": 0.5}])
def test_sliced_decode_equals_fixed_shape_masked_decode(over: dict) -> None:
    """Int positions (attention over the filled slots only) give the same tokens as the masked path."""
    model = tiny_model(seed=6, **over)
    seqs = torch.randint(0, TINY["vocab_size"], (9, 40), generator=torch.Generator().manual_seed(7))
    kw = dict(k=16, l=16, batch_size=4)
    sliced = MemorizationScorer(model, sliced_decode=True, **kw).score(seqs)
    masked = MemorizationScorer(model, sliced_decode=False, **kw).score(seqs)
    assert np.array_equal(sliced.predicted, masked.predicted)
    assert np.array_equal(sliced.matched, masked.matched)
    assert np.array_equal(sliced.predicted, naive_greedy(model, seqs[:, :16], 16).numpy())


def test_int_start_pos_chunks_match_full_forward() -> None:
    """Decoder with an int start_pos: prompt from slot 0, a multi-token chunk later (masked), single tokens."""
    from open360.models import KVCache

    model = tiny_model(seed=8, n_kv_heads=2)
    ids = torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.allocate(model, 3, 24)
        pieces = [model(ids[:, :7], cache, 0), model(ids[:, 7:12], cache, 7)]
        pieces += [model(ids[:, t : t + 1], cache, t) for t in range(12, 20)]
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_sliced_decode_equals_eager() -> None:
    model = tiny_model(seed=10)
    seqs = torch.randint(0, TINY["vocab_size"], (10, 32), generator=torch.Generator().manual_seed(11))
    kw = dict(k=16, l=16, batch_size=4, device="cuda", dtype="fp32")
    graph = MemorizationScorer(model, cuda_graphs=True, **kw)
    res = graph.score(seqs)
    assert graph.use_graphs and graph.graph_error is None
    eager = MemorizationScorer(model, cuda_graphs=False, sliced_decode=False, **kw).score(seqs)
    assert np.array_equal(res.predicted, eager.predicted)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_matches_sdpa(dtype: torch.dtype) -> None:
    from open360.analysis.memorization.engine import decode_attention, triton

    if triton is None:
        pytest.skip("needs Triton")
    torch.manual_seed(12)
    b, h, d = 5, 4, 64
    qkv = torch.randn(b, 1, 3 * h, d, device="cuda", dtype=dtype)
    q = qkv[:, :, :h].transpose(1, 2)  # the decoder's strided view
    kc, vc = (torch.randn(b, h, 128, d, device="cuda", dtype=dtype) for _ in range(2))
    for length in (1, 7, 33, 63, 128):
        k, v = kc[:, :, :length], vc[:, :, :length]
        out = decode_attention(q, k, v, 0.125)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.125)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert out.shape == ref.shape and (out.float() - ref).abs().max().item() < tol, length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_kernel_gives_the_same_tokens_in_fp32() -> None:
    model = tiny_model(seed=13, n_kv_heads=2)
    seqs = torch.randint(0, TINY["vocab_size"], (10, 40), generator=torch.Generator().manual_seed(14))
    kw = dict(k=16, l=24, batch_size=4, device="cuda", dtype="fp32")
    fast = MemorizationScorer(model, decode_kernel=True, **kw)
    res = fast.score(seqs)
    ref = MemorizationScorer(model, decode_kernel=False, sliced_decode=False, cuda_graphs=False, **kw)
    assert np.array_equal(res.predicted, ref.score(seqs).predicted)
    assert res.info["decode_kernel"] == (fast.decode_kernel is True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_size_fits_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from open360.analysis.memorization.engine import AUTO_BATCH_MAX

    model = tiny_model(seed=15, n_layers=4, d_model=256, n_heads=4, ffn_dim=512)
    seqs = torch.randint(0, TINY["vocab_size"], (300, 64), generator=torch.Generator().manual_seed(16))
    kw = dict(k=32, l=32, device="cuda", dtype="bf16")
    roomy = MemorizationScorer(model, batch_size=0, **kw)
    assert roomy.batch_size == AUTO_BATCH_MAX  # a tiny model fits the cap many times over
    # KV cache: 4 layers x 2 x 256 x 64 positions x 2 bytes = 256 KiB a sequence; 200 MiB free -> < 640
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (200 * 2**20, 80 * 2**30))
    tight = MemorizationScorer(model, batch_size=0, **kw)
    assert tight.batch_size % 64 == 0 and 64 <= tight.batch_size < 1024  # + what the allocator holds
    monkeypatch.undo()
    res = tight.score(seqs)
    assert np.array_equal(res.predicted, MemorizationScorer(model, batch_size=64, **kw).score(seqs).predicted)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weights_loaded_into_a_captured_graph_are_the_ones_it_runs() -> None:
    seqs = torch.randint(0, TINY["vocab_size"], (10, 32), generator=torch.Generator().manual_seed(17))
    kw = dict(k=16, l=16, batch_size=4, device="cuda", dtype="fp32")
    scorer = MemorizationScorer(tiny_model(seed=18), **kw)
    scorer.score(seqs)  # captures the graph with the first weights
    other = tiny_model(seed=19)
    scorer.load_weights(other.state_dict())
    assert scorer.use_graphs and scorer._graph is not None
    assert np.array_equal(scorer.score(seqs).predicted, MemorizationScorer(other, **kw).score(seqs).predicted)


def _write_cells(out, matched: dict, l: int = 4, **meta: object) -> None:  # noqa: E741
    """Cell files of a report from {(step, chunk): per-sequence matched counts} (no model needed)."""
    from open360.analysis.memorization.cells import cell_path, cell_table, write_cell
    from open360.analysis.memorization.engine import ScoreResult
    from open360.analysis.memorization.job_config import MemorizationJobConfig

    settings = {"run": "r", "mode": "greedy", "k": 4, "l": l, "sample": 1000, "seed": 42, "selection": "sample"}
    settings |= meta
    job = MemorizationJobConfig(**{key: settings[key] for key in ("run", "mode", "k", "l", "sample", "seed", "selection")})
    for (step, chunk), counts in matched.items():
        m = np.asarray(counts, dtype=np.int16)
        result = ScoreResult(settings["mode"], 4, l, m, m, np.zeros((len(m), l), np.int32))
        cell_meta = {**settings, "step": step, "chunk": chunk, "dtype": "float32", "num_chunks": 2, "tag": "t"}
        rows = np.arange(len(m))
        table = cell_table(job, step, chunk, rows, 100 * chunk, np.ones(len(m), bool), result, cell_meta)
        write_cell(cell_path(out, step, chunk), table)


def test_report_text_says_what_was_selected_and_when_r_is_undefined(tmp_path) -> None:
    from open360.analysis.memorization.report import render_report

    _write_cells(tmp_path / "seen", {(10, 0): [0, 1, 4]}, selection="seen", sample=0)
    text = render_report(tmp_path / "seen", "r", log_mlflow=False).read_text()
    assert "selection `seen`, every sequence the checkpoint had trained on." in text
    assert "every sequence of each chunk" not in text and "permutation(chunk_size)" not in text
    assert "consecutive checkpoints: n/a (one checkpoint)." in text
    _write_cells(tmp_path / "seen8", {(10, 0): [0, 1, 4]}, selection="seen", sample=8)
    text = render_report(tmp_path / "seen8", "r", log_mlflow=False).read_text()
    assert "a sample of up to 8 of the sequences the checkpoint had trained on, seed 42" in text
    assert "permutation(chunk_size)` without the unseen rows, the first `sample`" in text
    # A checkpoint whose scores are all equal has no correlation with any other: said, not printed as nan.
    _write_cells(tmp_path / "flat", {(10, 0): [0, 0, 0], (20, 0): [1, 2, 4]})
    text = render_report(tmp_path / "flat", "r", log_mlflow=False).read_text()
    assert "consecutive checkpoints: undefined (" in text and "nan." not in text
    assert "seed 42 (`numpy.random.default_rng(seed).permutation(chunk_size)[:sample]`)" in text
    _write_cells(tmp_path / "three", {(10, 0): [0, 0, 0], (20, 0): [1, 2, 4], (30, 0): [1, 3, 4]})
    text = render_report(tmp_path / "three", "r", log_mlflow=False).read_text()
    assert "consecutive checkpoints: 0.929 (over 1 of 2 pairs;" in text


def test_matrix_figures_stay_a_viewable_size_for_hundreds_of_checkpoints_and_chunks(tmp_path) -> None:
    import matplotlib
    import pandas as pd
    from PIL import Image

    from open360.analysis.memorization.report import plot_correlation, plot_heatmap

    matplotlib.use("Agg")
    n = 100  # uncapped: 38 inches, 4,560 px a side (LLM360's 360 x 360: 204 megapixels, 8 GB to render)
    summary = pd.DataFrame([(s, c) for s in range(n) for c in range(n)], columns=["step", "chunk"])
    summary["token_match"] = np.linspace(0, 1, len(summary))
    summary["seen_fraction"] = (summary.chunk <= summary.step).astype(float)
    plot_heatmap(summary, tmp_path / "heat.png", "r")
    steps = list(range(0, 10 * n, 10))
    plot_correlation(pd.DataFrame(np.eye(n), index=steps, columns=steps), tmp_path / "corr.png", "r")
    for name in ("heat.png", "corr.png"):
        assert max(Image.open(tmp_path / name).size) <= 2400  # 20 inches at 120 dpi


def test_a_rerun_logs_no_nan_score_again(tmp_path) -> None:
    """A checkpoint with nothing scored (selection=seen before its data) logs NaN once, not on every re-run."""
    mlflow = pytest.importorskip("mlflow")
    from open360.analysis.memorization.report import render_report

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("x", (tmp_path / "art").as_uri())).info.run_id
    _write_cells(tmp_path / "out", {(10, 0): [], (10, 1): [], (20, 0): [1, 4], (20, 1): [4, 4]}, selection="seen")
    for _ in range(2):
        render_report(tmp_path / "out", "r", workspace=tmp_path, mlflow_run=(f"sqlite:///{tmp_path / 'mlflow.db'}", run_id))
    history = client.get_metric_history(run_id, "memorization/t-float32/token_match")
    assert sorted(m.step for m in history) == [10, 20]


def test_figures_label_a_teacher_forced_screen_and_leave_out_empty_lines(tmp_path, monkeypatch) -> None:
    import matplotlib
    import matplotlib.pyplot as plt
    import pandas as pd

    from open360.analysis.memorization.report import plot_distribution, plot_progress

    matplotlib.use("Agg")
    figures: list = []
    monkeypatch.setattr(plt, "close", figures.append)
    scores = pd.DataFrame({"step": [10, 10, 20], "score": [0.0, 0.5, 1.0]})
    plot_distribution(scores, [10, 20], 4, tmp_path / "d.png", "r", mode="teacher_forced")
    assert figures[-1].axes[0].get_xlabel().startswith("teacher-forced screen")
    plot_distribution(scores, [10, 20], 4, tmp_path / "d.png", "r")
    assert figures[-1].axes[0].get_xlabel().startswith("memorization score")
    nan = float("nan")
    progress = pd.DataFrame(  # selection=seen: every scored sequence was seen
        {"step": [10, 20], "tokens_seen": [None, None], "full_match": [0.1, 0.2], "full_match_seen": [0.1, 0.2],
         "full_match_unseen": [nan, nan], "token_match": [0.3, 0.4]}
    )
    plot_progress(progress, tmp_path / "p.png", "r")
    legend = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert "full_match, not yet seen" not in legend and "full_match, seen sequences" in legend
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_a_chunk_seen_whole_is_drawn_once_per_job_not_once_per_checkpoint(monkeypatch) -> None:
    """selection=seen: a chunk every checkpoint has seen whole draws its permutation once (cached, as the
    sample selection does), not at each of the 360 checkpoints (~0.25 s per 1.7M-row chunk and cell)."""
    from types import SimpleNamespace

    from open360.analysis.memorization import data_view, sampling
    from open360.analysis.memorization.data_view import DataView

    draws = []
    for name in ("sample_rows", "sample_seen_rows"):
        real = getattr(sampling, name)
        monkeypatch.setattr(data_view, name, lambda *a, _real=real, _name=name: draws.append(_name) or _real(*a))
    data = object.__new__(DataView)
    data.job = SimpleNamespace(selection="seen", sample=20, seed=42)
    data.chunk_sizes = np.array([100, 100, 100], dtype=np.int64)
    data.offsets = sampling.chunk_offsets(data.chunk_sizes)
    data._orders = {10: SimpleNamespace(steps_per_epoch=30)}
    data._rows, data._seen_cache = {}, {}
    for steps in (20, 25, 30):  # three checkpoints: chunks 0 and 1 seen whole, chunk 2 in part
        for chunk in (0, 1):
            assert data.rows(((10, steps),), chunk).tolist() == sample_rows(100, 20).tolist()
        partial = data.rows(((10, steps),), 2)
        assert partial.tolist() == sampling.sample_seen_rows(100, np.arange(steps * 10 - 200), 20).tolist()
    assert draws.count("sample_rows") + draws.count("sample_seen_rows") == 2 + 3  # once per whole chunk


def test_a_chunks_sampled_tokens_are_read_once_per_job_not_once_per_checkpoint() -> None:
    """The sampled rows of a chunk are the same at every checkpoint: their k+l tokens are read from the shards
    once per job (1,000 rows of a 1.7M-row chunk touch ~760 row groups, ~6 GB decoded and hashed per read)."""
    from types import SimpleNamespace

    from open360.analysis.memorization import sampling
    from open360.analysis.memorization.data_view import DataView

    table = np.arange(300 * 65, dtype=np.int64).reshape(300, 65)  # 3 chunks of 100 rows of seq_len+1 = 65
    reads = []
    data = object.__new__(DataView)
    data.shards = SimpleNamespace(sequences=lambda ids: reads.append(len(ids)) or table[ids])
    data.chunk_sizes = np.array([100, 100, 100], dtype=np.int64)
    data.offsets = sampling.chunk_offsets(data.chunk_sizes)
    data._orders = {10: SimpleNamespace(steps_per_epoch=30)}
    data._rows, data._seen_cache, data._tokens, data.samples_dir = {}, {}, {}, None
    for selection in ("sample", "seen"):
        data.job = SimpleNamespace(selection=selection, sample=20, seed=42, k=8, l=4)
        data._rows, data._tokens, reads[:] = {}, {}, []
        for steps in (20, 25, 30):  # three checkpoints (selection=seen: chunks 0, 1 seen whole, chunk 2 in part)
            for chunk in (0, 1, 2):
                rows = data.rows(((10, steps),), chunk)
                got = data.sequences(chunk, rows)
                assert np.array_equal(got[:, :12], table[rows + data.offsets[chunk], :12]), (selection, steps, chunk)
        # selection=sample: one read per chunk; seen: chunks 0, 1 once, chunk 2 at each checkpoint (its rows move)
        assert len(reads) == (3 if selection == "sample" else 2 + 3), (selection, reads)


def test_sampled_tokens_are_kept_in_the_jobs_folder_for_other_ranks_and_reruns(tmp_path: Path, capsys) -> None:
    """Each rank of a torchrun job scores every chunk of its checkpoints, and a rerun (more checkpoints, a
    resume) reads the same samples again: ~2.3 TB decoded per reader at LLM360 size. The sampled tokens are
    kept in the job's folder: read from the shards once per job; a damaged file is read again, not trusted."""
    from types import SimpleNamespace

    from open360.analysis.memorization import sampling
    from open360.analysis.memorization.data_view import DataView
    from open360.analysis.memorization.sample_cache import load_sample, sample_file

    table = np.arange(300 * 65, dtype=np.int64).reshape(300, 65)
    reads: list[int] = []

    def reader() -> DataView:  # another rank, or a later job with the same folder: nothing in memory
        data = object.__new__(DataView)
        data.shards = SimpleNamespace(sequences=lambda ids: reads.append(len(ids)) or table[ids])
        data.chunk_sizes = np.array([100, 100, 100], dtype=np.int64)
        data.offsets = sampling.chunk_offsets(data.chunk_sizes)
        data.job = SimpleNamespace(selection="sample", sample=20, seed=42, k=8, l=4)
        data._rows, data._seen_cache, data._tokens = {}, {}, {}
        data.samples_dir = tmp_path / "samples-m"
        return data

    def scored(data: DataView) -> None:
        for chunk in (0, 1, 2):
            rows = data.rows((), chunk)
            assert np.array_equal(data.sequences(chunk, rows), table[rows + 100 * chunk, :12]), chunk

    reader().prefetch_samples([0, 2])  # rank 0 of 2 (chunks 0 and 2 of 3); rank 1 would read chunk 1
    assert len(reads) == 2 and sorted(p.name for p in (tmp_path / "samples-m").iterdir()) == [
        "chunk_00000.npz", "chunk_00002.npz"]
    scored(reader())
    assert len(reads) == 3  # chunk 1 only
    scored(reader())
    assert len(reads) == 3  # a rerun reads no shard
    kept = sample_file(tmp_path / "samples-m", 0)
    blob = bytearray(kept.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped bit in the tokens: the zip member's CRC-32 no longer matches
    kept.write_bytes(bytes(blob))
    scored(reader())
    assert len(reads) == 4 and "unreadable" in capsys.readouterr().err
    scored(reader())
    assert len(reads) == 4  # kept again, whole
    assert load_sample(kept, np.arange(20), 12) is None  # other rows: not these tokens


def test_a_kept_sample_damaged_anywhere_is_read_again_not_a_crash(tmp_path: Path, capsys) -> None:
    """A damaged zip header can name a compression method, flag or version zipfile does not handle
    (NotImplementedError, RuntimeError), and another writer's file can be no zip at all: each is read from
    the shards again, as a bad CRC is, not the end of the job."""
    from open360.analysis.memorization.sample_cache import load_sample, save_sample

    rows, tokens = np.arange(20, dtype=np.int64), np.arange(240, dtype=np.int32).reshape(20, 12)
    path = tmp_path / "chunk_00000.npz"
    save_sample(path, rows, tokens)
    good = path.read_bytes()
    central = good.index(b"PK\x01\x02")  # the first member's central directory entry
    for offset, value in ((central + 10, 99), (central + 8, 0x41), (central + 6, 0xFF)):  # method, flags, version
        blob = bytearray(good)
        blob[offset] = value
        path.write_bytes(bytes(blob))
        assert load_sample(path, rows, 12) is None, offset
    with path.open("wb") as f:  # a plain .npy under the name
        np.save(f, tokens)
    assert load_sample(path, rows, 12) is None
    assert capsys.readouterr().err.count("unreadable") == 4
    path.write_bytes(good)
    assert np.array_equal(load_sample(path, rows, 12), tokens)


def test_keeping_a_sample_touches_no_other_writers_temp_file_and_a_failure_only_warns(
    tmp_path: Path, capsys
) -> None:
    """Ranks on other hosts (a shared filesystem; containers number their processes alike) can write the same
    chunk's file with the same pid: one's temp file must not be truncated and renamed by another. A folder
    that cannot be made (nor its temp file removed) leaves the tokens unkept, with a warning, not a crash."""
    import os

    from open360.analysis.memorization.sample_cache import load_sample, save_sample

    rows, tokens = np.arange(20, dtype=np.int64), np.arange(240, dtype=np.int32).reshape(20, 12)
    path = tmp_path / "chunk_00000.npz"
    other = path.with_name(f".tmp-{path.name}-{os.getpid()}")  # another host's writer, halfway through
    other.write_bytes(b"PK\x03\x04half")
    save_sample(path, rows, tokens)
    assert other.read_bytes() == b"PK\x03\x04half"
    assert np.array_equal(load_sample(path, rows, 12), tokens)
    (tmp_path / "file").write_text("")
    save_sample(tmp_path / "file" / "samples" / path.name, rows, tokens)
    assert "could not keep the sampled tokens" in capsys.readouterr().err


def test_only_a_chunks_job_sample_is_kept_on_disk(tmp_path: Path) -> None:
    """The kept file is the chunk's job sample (the rows every checkpoint that saw the chunk whole scores): the
    seen rows of a partly trained chunk must not replace it (the next reader would read the shards again), and
    sample=0 (whole chunks: ~435 MB a chunk of 1.7M rows at k=l=32) keeps nothing on disk."""
    from types import SimpleNamespace

    from open360.analysis.memorization import sampling
    from open360.analysis.memorization.data_view import DataView
    from open360.analysis.memorization.sample_cache import sample_file

    table = np.arange(300 * 65, dtype=np.int64).reshape(300, 65)
    reads: list[int] = []

    def reader(sample: int) -> DataView:
        data = object.__new__(DataView)
        data.shards = SimpleNamespace(sequences=lambda ids: reads.append(len(ids)) or table[ids])
        data.chunk_sizes = np.array([100, 100, 100], dtype=np.int64)
        data.offsets = sampling.chunk_offsets(data.chunk_sizes)
        data.job = SimpleNamespace(selection="seen", sample=sample, seed=42, k=8, l=4)
        data._rows, data._seen_cache, data._tokens = {}, {}, {}
        data.samples_dir = tmp_path / f"samples-{sample}"
        return data

    data = reader(20)
    data.sequences(1, data.sample_rows(1))
    kept = sample_file(tmp_path / "samples-20", 1)
    before = kept.read_bytes()
    partial = np.sort(data.sample_rows(1)[:7])  # the seen rows of a chunk a checkpoint trained on in part
    assert np.array_equal(reader(20).sequences(1, partial), table[partial + 100, :12])
    assert kept.read_bytes() == before and sorted(p.name for p in kept.parent.iterdir()) == [kept.name]
    data = reader(0)
    assert np.array_equal(data.sequences(2, data.sample_rows(2)), table[200:, :12])
    assert not (tmp_path / "samples-0").exists()


def test_kept_samples_belong_to_their_shard_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's folder can see other shards (a rebuilt recipe, shards=): same chunk sizes and seed draw the same
    rows, so the kept tokens are filed under the shard set's manifest hash, never served for another's."""
    from types import SimpleNamespace

    from open360.analysis.memorization.data_view import DataView
    from open360.data import ShardSet

    tables = {name: np.arange(300 * 65, dtype=np.int64).reshape(300, 65) * k for k, name in ((1, "a"), (3, "b"))}
    sets = {name: SimpleNamespace(manifest_hash=name * 64, chunk_sizes=[100, 100, 100],
                                  sequences=lambda ids, t=table: t[ids]) for name, table in tables.items()}
    monkeypatch.setattr(ShardSet, "open", staticmethod(lambda folder: sets[Path(folder).name]))
    job = SimpleNamespace(pull=False, selection="sample", sample=20, seed=42, k=8, l=4)
    for name in ("a", "b", "a"):
        monkeypatch.setattr(DataView, "_shard_path", staticmethod(lambda *args, n=name: tmp_path / n))
        data = DataView(job, tmp_path, None, {}, samples_root=tmp_path / "job")
        rows = data.rows((), 0)
        assert np.array_equal(data.sequences(0, rows), tables[name][rows, :12]), name
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["samples-" + "a" * 16, "samples-" + "b" * 16]


def test_a_kept_sample_is_on_disk_before_its_name_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash (power loss) after the rename must not leave a named file whose bytes never reached the disk: the
    temp file is fsynced before it is renamed into place."""
    import open360.analysis.memorization.sample_cache as sample_cache
    import open360.paths as paths  # its atomic writer (replaced_atomically)

    events: list[str] = []
    real_fsync, real_replace = paths.fsync_file, paths.os.replace
    monkeypatch.setattr(paths, "fsync_file", lambda p: (events.append(f"fsync {Path(p).name}"), real_fsync(p)))
    monkeypatch.setattr(paths.os, "replace", lambda a, b: (events.append(f"rename {Path(a).name}"),
                                                          real_replace(a, b)))
    path = tmp_path / "chunk_00000.npz"
    sample_cache.save_sample(path, np.arange(20, dtype=np.int64), np.zeros((20, 12), dtype=np.int32))
    assert len(events) == 2 and events[0].startswith("fsync .tmp-") and events[1] == "rename" + events[0][5:]
    assert path.is_file()


def test_seen_flags_past_a_first_epoch_cost_no_pass_over_every_id(monkeypatch) -> None:
    """Past its first epoch a run's seen ids are kept as one sorted array of most of its sequences (phi-1.5
    trains ~5 epochs): a cell's seen flags and seen rows are binary searches in it, not np.isin / np.unique over
    all of it (seconds per cell at 15M ids, more than scoring the cell)."""
    from types import SimpleNamespace

    from open360.analysis.memorization import sampling
    from open360.analysis.memorization.data_view import DataView

    data = object.__new__(DataView)
    data.job = SimpleNamespace(selection="seen", sample=50, seed=42)
    data.chunk_sizes = np.full(40, 2_000, dtype=np.int64)
    data.offsets = sampling.chunk_offsets(data.chunk_sizes)
    rng = np.random.default_rng(0)
    extra = np.flatnonzero(rng.random(int(data.chunk_sizes.sum())) < 0.9)  # 90% seen, sorted unique
    consumption = ((16, 10**9),)
    data._rows, data._seen_cache = {}, {consumption: (0, extra)}
    truth = np.zeros(int(data.chunk_sizes.sum()), dtype=bool)
    truth[extra] = True

    def refuse_whole(fn):  # a pass over every seen id of the run (not one chunk's slice of it) fails the test
        def wrapped(a, *args, **kwargs):
            assert np.size(a) < len(extra), f"{fn.__name__} over {np.size(a)} ids"
            return fn(a, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(np, "isin", refuse_whole(np.isin))
    monkeypatch.setattr(np, "unique", refuse_whole(np.unique))
    rows = np.arange(0, 2_000, 7)
    for chunk in (0, 17, 39, 0):
        ids = rows + data.offsets[chunk]
        assert data.seen_mask(consumption, chunk, rows).tolist() == truth[ids].tolist()
        chosen = data.rows(consumption, chunk)
        assert len(chosen) == 50 and truth[chosen + data.offsets[chunk]].all()


def test_each_chunk_scored_under_torchrun_is_prefetched_by_exactly_one_rank() -> None:
    """Ranks split the chunks to read before scoring (each chunk's sample read once for all of them), and with
    max_cells read only chunks of the cells some rank scores."""
    from open360.analysis.memorization.job import _assign, _prefetch_share

    pending = [(s, c) for s in (10, 20, 30) for c in range(5)]
    for world in (2, 3, 4):
        shares = [_prefetch_share(pending, r, world, 0) for r in range(world)]
        assert sorted(c for share in shares for c in share) == list(range(5)), world
        capped = [_prefetch_share(pending, r, world, 2) for r in range(world)]
        scored = {c for r in range(world) for _, c in _assign(pending, r, world)[:2]}
        assert sorted(c for share in capped for c in share) == sorted(scored), world
