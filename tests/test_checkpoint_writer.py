"""CheckpointWriter: background saves from a CPU snapshot, recovery pruning, completion reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from open360.checkpoint import CheckpointContents, list_checkpoints, load_checkpoint
from open360.checkpoint.writer import CheckpointWriter, HostSnapshot


def _contents(weight: torch.Tensor, step: torch.Tensor) -> CheckpointContents:
    return CheckpointContents({"w": weight}, {"state": {"w": {"step": step}}}, {"step": 1}, {}, "x: 1\n")


def test_background_save_writes_the_snapshot_not_later_updates(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", keep_ephemeral=1, background=True)
    weight, step = torch.zeros(4), torch.tensor(1.0)
    writer.save(1, _contents(weight, step), published=True)
    weight += 5  # training goes on, in place, while the file is written
    step += 1
    done = writer.close()
    assert [(d.step, d.published) for d in done] == [(1, True)]
    back = load_checkpoint(tmp_path / "pub" / "step_1")
    assert torch.equal(back.model["w"], torch.zeros(4))
    assert back.optimizer["state"]["w"]["step"].item() == 1.0


def test_recovery_checkpoints_are_pruned_to_keep_last(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", keep_ephemeral=2, background=False)
    for step in (2, 4, 6, 8):
        writer.save(step, _contents(torch.ones(2) * step, torch.tensor(float(step))), published=False)
    writer.save(5, _contents(torch.ones(2), torch.tensor(5.0)), published=True)
    reported = writer.poll()
    assert [(d.step, d.published) for d in reported] == [
        (2, False),
        (4, False),
        (6, False),
        (8, False),
        (5, True),
    ]
    assert [s for s, _ in list_checkpoints(tmp_path / "rec")] == [6, 8]
    assert [s for s, _ in list_checkpoints(tmp_path / "pub")] == [5]
    assert writer.poll() == []
    assert not [p.name for p in (tmp_path / "rec").iterdir() if p.name.startswith(".")]


def test_a_pruning_cut_short_leaves_no_half_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Killed while deleting an old recovery checkpoint: that step is no longer listed (resume=auto must not
    pick a folder whose lineage.json survived its weights), and the next start clears the leftover."""
    import shutil

    from open360.checkpoint.io import remove_stale_temp_dirs

    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", keep_ephemeral=1, background=False)
    writer.save(2, _contents(torch.ones(2), torch.tensor(2.0)), published=False)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # noqa: ANN001, ANN202
        if Path(path).exists():
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("open360.checkpoint.writer.shutil.rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        writer.save(4, _contents(torch.ones(2), torch.tensor(4.0)), published=False)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path / "rec")] == [4]
    assert remove_stale_temp_dirs(tmp_path / "rec") == [tmp_path / "rec" / ".tmp-step_2-pruned"]


def test_host_snapshot_copies_nested_tensors() -> None:
    t = torch.ones(2)
    snap = HostSnapshot()({"a": [t, (t, 3)], "b": "x"})
    t += 1
    assert torch.equal(snap["a"][0], torch.ones(2)) and torch.equal(snap["a"][1][0], torch.ones(2))
    assert snap["a"][1][1] == 3 and snap["b"] == "x"


def test_a_snapshot_copies_live_tensors_and_keeps_the_state_dicts_own_copies() -> None:
    """Under FSDP/DDP the gathered state dict is already rank 0's own CPU copy (weights and Adam moments:
    84 GB at 7B); copying it again doubled the host memory and the stall of a save. Tensors training goes on
    writing (parameters, Adam's CPU `step` counts) are still copied."""
    from open360.backends.native import live_storages

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    live = live_storages(model, optimizer)
    adam = optimizer.state[model.weight]
    state = {"w": model.weight, "gathered": model.weight.detach().clone(), "step": adam["step"],
             "exp_avg": adam["exp_avg"]}
    before = {k: v.detach().clone() for k, v in state.items()}
    snap = HostSnapshot()(state, live)
    assert snap["gathered"] is state["gathered"]
    with torch.no_grad():
        model.weight += 1
    optimizer.step()  # Adam's moments and step count move in place
    for key in ("w", "step", "exp_avg"):
        assert snap[key] is not state[key] and torch.equal(snap[key], before[key]), key
    assert HostSnapshot()(state)["gathered"] is not state["gathered"]  # without `live`: every tensor copied


def test_a_snapshot_copies_the_buffers_training_updates_in_place() -> None:
    """Buffers are live too (a norm's running statistics move in place at every forward): kept by reference,
    the background write would save a later step's values under this step's name."""
    from open360.backends.native import live_storages

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3))
    state = dict(model.state_dict())
    before = {k: v.detach().clone() for k, v in state.items()}
    snap = HostSnapshot()(state, live_storages(model, optimizer))
    model(torch.randn(4, 3) + 5)  # running_mean, running_var, num_batches_tracked move in place
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert not torch.equal(state[key], before[key]) and torch.equal(snap[key], before[key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_snapshot_reuses_pinned_buffers_for_cuda_tensors() -> None:
    snapshot = HostSnapshot()
    t = torch.arange(6.0, device="cuda")
    first = snapshot({"w": t})["w"]
    assert first.is_pinned() and torch.equal(first, torch.arange(6.0))
    t += 1
    second = snapshot({"w": t})["w"]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, torch.arange(6.0) + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gathered_tensors_at_one_address_get_their_own_copies() -> None:
    """A save under FSDP frees each gathered tensor once its copy is queued, and the next one may be gathered
    at the same address with the same shape: looked up by address it would get the first one's copy."""
    snapshot = HostSnapshot()
    copy = snapshot.begin(live=frozenset())
    t = torch.ones(4, device="cuda")
    a = copy(("a",), t)
    t.fill_(2.0)  # the next gathered tensor, at the same address
    b = copy(("b",), t)
    snap = snapshot({"a": a, "b": b}, live=frozenset())
    assert snap["a"] is a and snap["b"] is b and a.is_pinned()
    assert torch.equal(a, torch.ones(4)) and torch.equal(b, torch.full((4,), 2.0))


def test_a_state_copied_one_tensor_at_a_time_is_snapshotted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's host copy (the pinned buffers a save gathers into) first waits for the save in flight,
    which reads those buffers; it copies live tensors, and the save that follows keeps its copies."""
    import threading

    from open360.backends.native import live_storages
    from open360.checkpoint import writer as writer_module

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", 1, background=True)
    live = live_storages(model, optimizer)
    released = threading.Event()
    real_save = writer_module.save_checkpoint
    monkeypatch.setattr(writer_module, "save_checkpoint", lambda *a: released.wait(30) and real_save(*a))
    writer.save(1, CheckpointContents({"w": model.weight}, {}, {"step": 1}, {}, "x: 1\n"), True, live)
    threading.Timer(0.3, released.set).start()
    copy = writer.host_copy(live)
    assert (tmp_path / "pub" / "step_1").is_dir()  # step 1 was written before its buffers could be reused
    state = {"w": copy(("w",), model.weight), "gathered": copy(("g",), model.bias.detach().clone())}
    assert state["w"] is not model.weight and torch.equal(state["w"], model.weight)
    with torch.no_grad():
        model.weight += 1
    before = {k: v.clone() for k, v in state.items()}
    writer.save(2, CheckpointContents(state, {}, {"step": 2}, {}, "x: 1\n"), True, live)
    writer.close()
    back = load_checkpoint(tmp_path / "pub" / "step_2").model
    assert all(torch.equal(back[k], before[k]) for k in before)
    assert HostSnapshot()(state, live)["w"] is state["w"]  # a copy already: kept as it is


def test_a_failed_background_save_is_raised_once_and_the_saves_before_it_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 1 finishes while step 2 (started before any poll) fails on a full disk: poll raises the error, and
    close still reports step 1 (the trainer's callbacks version it) and stops the worker, without raising again."""
    import open360.checkpoint.writer as writer_module
    from open360.checkpoint import CheckpointError

    real = writer_module.save_checkpoint

    def full_disk_at_step_2(parent: Path, step: int, contents: CheckpointContents) -> Path:
        if step == 2:
            raise CheckpointError("step_2: could not be written (No space left on device)")
        return real(parent, step, contents)

    monkeypatch.setattr(writer_module, "save_checkpoint", full_disk_at_step_2)
    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", keep_ephemeral=1, background=True)
    writer.save(1, _contents(torch.zeros(2), torch.tensor(1.0)), published=True)
    writer.save(2, _contents(torch.zeros(2), torch.tensor(2.0)), published=True)
    writer._pending[0].exception()  # step 2 is over
    with pytest.raises(CheckpointError, match="step_2"):
        writer.poll()
    assert [(d.step, d.published) for d in writer.close()] == [(1, True)]
    assert writer._pool is not None and writer._pool._shutdown


def test_a_background_save_stores_tied_weights_once_as_a_foreground_one_does(tmp_path: Path) -> None:
    """The snapshot of a background save (every CUDA run) keeps tied tensors one tensor, so model.safetensors
    stores the embedding once with its alias, byte for byte what a save without the snapshot writes (it was
    written twice: a tied vocab x d_model embedding's bytes again in every checkpoint)."""
    w = torch.randn(16, 4)
    files = []
    for background in (False, True):
        writer = CheckpointWriter(tmp_path / f"pub{background}", tmp_path / "rec", 1, background=background)
        writer.save(1, CheckpointContents({"emb.weight": w, "head.weight": w}, {}, {"step": 1}, {}, "x: 1\n"), True)
        writer.close()
        files.append((tmp_path / f"pub{background}" / "step_1" / "model.safetensors").read_bytes())
    assert files[0] == files[1]
    back = load_checkpoint(tmp_path / "pubTrue" / "step_1").model
    assert back["head.weight"] is back["emb.weight"] and torch.equal(back["emb.weight"], w)
    snap = HostSnapshot()({"a": w, "b": w, "c": w[1:], "d": torch.empty(0), "e": torch.empty(0), "r0": w[0], "r1": w[1]})
    assert snap["a"] is snap["b"] and snap["c"] is not snap["a"] and torch.equal(snap["c"], w[1:])
    assert snap["d"] is not snap["e"]  # empty tensors (no storage to share) are not tied
    assert torch.equal(snap["r0"], w[0]) and torch.equal(snap["r1"], w[1])  # views at other offsets: their own


def test_each_save_copies_the_live_tensors_of_its_own_step(tmp_path: Path) -> None:
    """The copies of live tensors are the snapshot's own: a second save through the same writer copies the
    parameters again (kept from the first save, step 2 would be written with step 1's weights)."""
    from open360.backends.native import live_storages

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    writer = CheckpointWriter(tmp_path / "pub", tmp_path / "rec", 1, background=True)
    live = live_storages(model, optimizer)
    expected = {}
    for step in (1, 2):
        copy = writer.host_copy(live)
        state = {"w": copy(("w",), model.weight), "tied": copy(("tied",), model.weight)}
        writer.save(step, CheckpointContents(state, {}, {"step": step}, {}, "x: 1\n"), True, live)
        expected[step] = model.weight.detach().clone()
        with torch.no_grad():
            model.weight += 1
    writer.close()
    for step in (1, 2):
        back = load_checkpoint(tmp_path / "pub" / f"step_{step}").model
        assert torch.equal(back["w"], expected[step]) and back["tied"] is back["w"], step
