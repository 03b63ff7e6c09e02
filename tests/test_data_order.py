"""DataOrder: exact batches, epochs, seen ids, chunk ends, checkpointable fingerprint, CLI batch viewer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from open360.data import DataOrder, DataOrderMismatchError, ShardSet, TokenizerMismatchError, build_shards
from open360.data.cli import batch_main, seen_main


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return ShardSet.open(
        build_shards("data_recipes/embedded_tiny.yaml", tmp_path_factory.mktemp("s"), seed=1234)
    )


def test_epoch0_walks_chunks_in_order(shards: ShardSet) -> None:
    o = DataOrder(shards, seed=42, global_batch_size=16)
    assert o.steps_per_epoch == shards.num_sequences // 16
    assert np.array_equal(o.batch_ids(0), np.arange(16))
    assert np.array_equal(o.batch_ids(7), np.arange(112, 128))
    ends = o.chunk_end_steps()
    assert ends == [30 * (k + 1) for k in range(8)]
    for k, step in enumerate(ends):
        seen_chunks = set(np.unique(shards.chunk_of(o.seen_ids(step))).tolist())
        assert seen_chunks == set(range(k + 1))  # checkpoint after chunk k has seen exactly chunks 0..k
    assert len(o.seen_ids(ends[2])) == sum(shards.chunk_sizes[:3])


def test_batch_is_pure_and_later_epochs_are_seeded_permutations(shards: ShardSet) -> None:
    o1, o2 = DataOrder(shards, 42, 16), DataOrder(shards, 42, 16)
    spe = o1.steps_per_epoch
    assert np.array_equal(o1.batch(spe + 3), o2.batch(spe + 3))
    epoch1 = np.concatenate([o1.batch_ids(spe + i) for i in range(spe)])
    assert sorted(epoch1.tolist()) == list(range(spe * 16))  # a permutation of everything
    assert not np.array_equal(epoch1, np.arange(spe * 16))
    assert not np.array_equal(DataOrder(shards, 7, 16).batch_ids(spe), o1.batch_ids(spe))
    rows = o1.batch(5)
    assert rows.dtype == np.int64 and rows.shape == (16, 129)
    assert np.array_equal(rows, shards.sequences(o1.batch_ids(5)))
    assert len(o1.seen_ids(spe + 2)) == shards.num_sequences  # a full epoch seen


def test_state_dict_fingerprint_refuses_mismatch(shards: ShardSet) -> None:
    o = DataOrder(shards, 42, 16)
    state = json.loads(json.dumps(o.state_dict()))  # survives a JSON round trip
    DataOrder(shards, 42, 16).load_state_dict(state)
    with pytest.raises(DataOrderMismatchError, match="global_batch_size"):
        DataOrder(shards, 42, 32).load_state_dict(state)
    with pytest.raises(DataOrderMismatchError, match="seed"):
        DataOrder(shards, 43, 16).load_state_dict(state)
    state["fingerprint"]["manifest_hash"] = "0" * 64
    with pytest.raises(DataOrderMismatchError, match="manifest_hash"):
        o.load_state_dict(state)


def test_cli_batch_equals_trainer_batch(shards: ShardSet, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--shards", str(shards.path), "--step", "37", "--seed", "42", "--global-batch-size", "16"]
    assert batch_main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    o = DataOrder(shards, 42, 16)
    assert out["ids"] == o.batch_ids(37).tolist()
    assert np.array_equal(np.array(out["tokens"]), o.batch(37))
    assert batch_main([*args, "--decode"]) == 0
    text = capsys.readouterr().out
    assert "step 37" in text and str(int(o.batch_ids(37)[0])) in text


def test_cli_seen(shards: ShardSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seen.npy"
    assert (
        seen_main(
            ["--shards", str(shards.path), "--step", "31", "--global-batch-size", "16", "--out", str(out)]
        )
        == 0
    )
    assert np.array_equal(np.load(out), np.arange(31 * 16))
    assert "496 distinct" in capsys.readouterr().out


def test_tokenizer_mismatch_refused(shards: ShardSet, tmp_path: Path) -> None:
    with pytest.raises(TokenizerMismatchError, match="expected"):
        ShardSet.open(shards.path, expected_tokenizer_hash="f" * 64)
    ShardSet.open(shards.path, expected_tokenizer_hash=shards.tokenizer_hash)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in shards.path.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "</s>"  # the EOS swap
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerMismatchError, match="replaced"):
        ShardSet.open(copy)


def test_cli_build_data_name_reuses_folder_and_prints_table(
    shards: ShardSet, capsys: pytest.CaptureFixture[str]
) -> None:
    from open360.data.cli import build_main

    assert build_main(["data=embedded_tiny", "--shards-root", str(shards.path.parent), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(shards.path) in out  # the recipe's seed (1234; data.seed unset) → the same folder, not rebuilt
    for col in ("source", "exact", "near", "quality", "code", "english", "shakespeare", "3,840 training"):
        assert col in out
    with pytest.raises(SystemExit):
        build_main(["data=no_such_recipe"])


def test_the_recipe_seed_rules_unless_data_seed_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from open360.data import cli
    from open360.paths import resolve_repo_path

    recipe = tmp_path / "seed42.yaml"
    recipe.write_text(resolve_repo_path("data_recipes/embedded_tiny.yaml").read_text().replace("seed: 1234", "seed: 42"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s42.yaml").write_text(f"recipe: {recipe}\n")
    (tmp_path / "data" / "s7.yaml").write_text(f"recipe: {recipe}\nseed: 7\n")
    monkeypatch.setattr(cli, "CONFIGS_DIR", tmp_path)
    assert cli._recipe_from_data_arg("data=s7") == (str(recipe), 7)
    (tmp_path / "data" / "typo.yaml").write_text(f"recipe: {recipe}\nseeed: 7\n")
    with pytest.raises(SystemExit, match=r"typo.yaml: Key 'seeed' not in 'DataConfig'"):
        cli._recipe_from_data_arg("data=typo")
    (tmp_path / "data" / "norecipe.yaml").write_text("seed: 7\n")
    with pytest.raises(SystemExit, match=r"norecipe.yaml: Missing mandatory value: recipe"):
        cli._recipe_from_data_arg("data=norecipe")
    (tmp_path / "data" / "alist.yaml").write_text("- recipe\n")
    with pytest.raises(SystemExit, match=r"alist.yaml: a mapping of data keys"):
        cli._recipe_from_data_arg("data=alist")
    assert cli.build_main(["data=s42", "--shards-root", str(tmp_path / "shards"), "--no-progress"]) == 0
    built = ShardSet.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert built.seed == 42 and built.manifest["recipe"]["seed"] == 42
    # `data batch` orders later epochs with the seed the shards were built with, like the trainer
    args = ["--shards", str(built.path), "--global-batch-size", "16", "--json"]
    last_epoch_step = 2 * (built.num_sequences // 16) - 1
    assert cli.batch_main([*args, "--step", str(last_epoch_step)]) == 0
    ids = json.loads(capsys.readouterr().out)["ids"]
    assert ids == DataOrder(built, 42, 16).batch_ids(last_epoch_step).tolist()


def _seen_by_union(o: DataOrder, step: int) -> np.ndarray:
    """seen_ids by definition: the union of every batch of steps 0..step-1."""
    if step == 0:
        return np.empty(0, np.int64)
    return np.unique(np.concatenate([o.batch_ids(s) for s in range(step)]))


@pytest.mark.parametrize("n,b", [(10, 3), (12, 4), (7, 7), (50, 8)])
def test_seen_ids_is_the_union_of_batches_and_fast_for_long_runs(n: int, b: int) -> None:
    from types import SimpleNamespace

    fake = SimpleNamespace(num_sequences=n, path=Path("fake"))
    o = DataOrder(fake, seed=5, global_batch_size=b)  # type: ignore[arg-type]
    for step in range(0, 6 * o.steps_per_epoch + 2):
        assert np.array_equal(o.seen_ids(step), _seen_by_union(o, step)), step
    drawn = []
    real = o._permutation

    def counted(epoch: int) -> np.ndarray:  # a step far in a multi-epoch run: not one permutation per epoch
        drawn.append(epoch)
        assert len(drawn) <= 64, "seen_ids draws on past the epoch where every id is seen"
        return real(epoch)

    o._permutation = counted  # type: ignore[method-assign]
    assert len(o.seen_ids(10**12)) == n


def test_an_epoch_0_batch_builds_no_array_of_every_id() -> None:
    """At LLM360 scale (~615M sequences) an array of every id is ~5 GB: a batch of epoch 0 must not build
    one (it did, at every step, in the prefetch thread of every rank)."""
    import tracemalloc
    from types import SimpleNamespace

    fake = SimpleNamespace(num_sequences=10_000_000, path=Path("fake"))
    o = DataOrder(fake, seed=5, global_batch_size=2240)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        ids = o.batch_ids(1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(ids, np.arange(2240 * 1000, 2240 * 1001)) and ids.dtype == np.int64
    assert peak < 1_000_000, peak  # bytes: the batch's ids, not 80 MB of every id
    last = o.steps_per_epoch - 1
    assert np.array_equal(o.batch_ids(last), o.epoch_order(0)[last * 2240 : (last + 1) * 2240])


def test_a_later_epochs_order_is_built_without_a_second_copy() -> None:
    """Epoch >= 1 permutes every id once: the int64 permutation is kept as drawn, not copied (4.9 GB more
    at the peak for LLM360's 615M sequences); seen_ids past epoch 0 likewise returns its ids uncopied."""
    import tracemalloc
    from types import SimpleNamespace

    n = 1_000_000
    order = DataOrder(SimpleNamespace(num_sequences=n, path="fake"), seed=3, global_batch_size=1000)
    tracemalloc.start()
    perm = order.epoch_order(1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert perm.dtype == np.int64
    assert np.array_equal(perm, np.random.default_rng([3, 1]).permutation(n))
    assert peak < 1.5 * 8 * n, f"peak {peak / 2**20:.1f} MiB for {8 * n / 2**20:.1f} MiB of ids"
    tracemalloc.start()
    seen = order.seen_ids(order.steps_per_epoch + 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(seen) == n and peak < 1.5 * 8 * n + n, f"peak {peak / 2**20:.1f} MiB"


def test_a_rank_reads_only_its_part_of_the_batch(shards: ShardSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of N data-parallel ranks reads (and hashes) its 1/N of the global batch, not all of it (at AMBER
    scale, 2240 rows per step on every rank); the parts, in rank order, are the batch."""
    o = DataOrder(shards, 42, 16)
    for step in (5, o.steps_per_epoch + 3):  # epoch 0 and a shuffled later epoch
        whole = o.batch(step)
        asked: list[int] = []
        read = shards.sequences
        monkeypatch.setattr(shards, "sequences", lambda ids, read=read, asked=asked: asked.append(len(ids)) or read(ids))
        parts = [o.batch(step, (i, 4)) for i in range(4)]
        monkeypatch.undo()
        assert asked == [4, 4, 4, 4] and np.array_equal(np.concatenate(parts), whole)


def test_a_checkpoints_seen_ids_does_not_evict_the_order_the_next_batch_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In epoch >= 2, each checkpoint's seen_ids needs epoch 1's order too: it must not drop the current
    epoch's cached order, or every next batch (the prefetch thread) draws a 615M-id permutation again."""
    from types import SimpleNamespace

    fake = SimpleNamespace(num_sequences=1003, path=Path("fake"))
    o = DataOrder(fake, seed=5, global_batch_size=10)  # type: ignore[arg-type]
    spe = o.steps_per_epoch
    checkpoints = range(2 * spe + 1, 3 * spe, 10)  # the third epoch, a checkpoint after every 10th step
    expected = {s: _seen_by_union(DataOrder(fake, 5, 10), s) for s in checkpoints}  # type: ignore[arg-type]
    draws: list[tuple[int, int]] = []
    real = np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda s: draws.append(tuple(s)) or real(s))
    for step in range(2 * spe, 3 * spe):
        o.batch_ids(step)
        if step + 1 in expected:
            assert np.array_equal(o.seen_ids(step + 1), expected[step + 1])
    assert draws.count((5, 2)) == 1  # the batches' order, drawn once
    assert draws.count((5, 1)) == len(expected)  # epoch 1's, for each checkpoint's seen ids, never kept
