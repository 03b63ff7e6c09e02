"""Checkpoint directory format: atomic save, sha256 verification, listing, tied weights, weights_only loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from open360.checkpoint import (
    CheckpointContents,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_lineage,
    save_checkpoint,
    save_model_weights,
    verify_checkpoint,
)
from open360.checkpoint.io import PAYLOAD_FILES, remove_stale_temp_dirs, sha256_file


def _contents(seed: int = 0) -> CheckpointContents:
    g = torch.Generator().manual_seed(seed)
    model = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(3, generator=g)}
    opt = {
        "state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3, generator=g)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "name": "hidden", "params": ["a.weight"]}],
    }
    return CheckpointContents(
        model=model,
        optimizer=opt,
        trainer_state={"step": 7, "loss": 1.25},
        rng={"torch": torch.get_rng_state(), "python": {"version": 3, "state": [1, 2], "gauss": None}},
        config_yaml="run_name: x\n",
        lineage={"config_hash": "abc"},
    )


def test_save_load_roundtrip_and_lineage(tmp_path: Path) -> None:
    c = _contents()
    path = save_checkpoint(tmp_path / "run", 7, c)
    assert path == tmp_path / "run" / "step_7"
    assert sorted(p.name for p in path.iterdir()) == sorted([*PAYLOAD_FILES, "lineage.json"])
    lineage = read_lineage(path)
    assert lineage["step"] == 7 and lineage["config_hash"] == "abc"
    assert set(lineage["files"]) == set(PAYLOAD_FILES)
    back = load_checkpoint(path)
    for k, v in c.model.items():
        assert torch.equal(back.model[k], v)
    assert torch.equal(
        back.optimizer["state"]["a.weight"]["exp_avg"], c.optimizer["state"]["a.weight"]["exp_avg"]
    )
    assert back.optimizer["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back.rng["torch"], c.rng["torch"])
    assert back.trainer_state == {"step": 7, "loss": 1.25}
    assert back.config_yaml == "run_name: x\n"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run").iterdir())


def test_verify_names_truncated_or_modified_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, _contents())
    verify_checkpoint(path)
    opt = path / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        verify_checkpoint(path)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt.*missing"):
        load_checkpoint(path)


def test_a_folder_whose_name_is_not_its_lineage_step_is_refused(tmp_path: Path) -> None:
    """step_20 holding step 10's files (renamed, or copied over by hand) would resume at the wrong step and
    attribute the wrong seen sequences to checkpoint 20."""
    path = save_checkpoint(tmp_path, 10, _contents())
    path.rename(tmp_path / "step_20")
    with pytest.raises(CheckpointError, match=r"step_20/lineage.json: key 'step' is 10, but the folder is step_20"):
        load_checkpoint(tmp_path / "step_20")
    (tmp_path / "step_20").rename(tmp_path / "hand_picked")
    assert read_lineage(tmp_path / "hand_picked")["step"] == 10  # a folder of another name is not checked


def test_list_ignores_temp_and_incomplete_dirs(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, _contents())
    save_checkpoint(tmp_path, 2, _contents())
    (tmp_path / ".tmp-step_20-123").mkdir()
    (tmp_path / "step_30").mkdir()  # no lineage.json: not complete
    (tmp_path / "notes").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]
    assert list_checkpoints(tmp_path / "missing") == []
    removed = remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in removed] == [".tmp-step_20-123"]


def test_an_old_copy_left_beside_its_replacement_or_cut_short_is_removed_not_restored(tmp_path: Path) -> None:
    """Killed after the new step_5 was renamed in but before the old copy was deleted: the new one stays. An old
    copy without lineage.json is no complete checkpoint: removed, not restored as step_6."""
    save_checkpoint(tmp_path, 5, _contents(1))
    save_checkpoint(tmp_path / "old", 5, _contents(0)).rename(tmp_path / ".old-step_5-999")
    save_checkpoint(tmp_path / "old", 6, _contents(0)).rename(tmp_path / ".old-step_6-999")
    (tmp_path / ".old-step_6-999" / "lineage.json").unlink()
    (tmp_path / "old").rmdir()
    remove_stale_temp_dirs(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]
    assert torch.equal(load_checkpoint(tmp_path / "step_5").model["a.weight"], _contents(1).model["a.weight"])


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, _contents(0))
    save_checkpoint(tmp_path, 5, _contents(1))
    back = load_checkpoint(tmp_path / "step_5")
    assert torch.equal(back.model["a.weight"], _contents(1).model["a.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_tied_weights_stored_once_and_restored(tmp_path: Path) -> None:
    shared = torch.randn(5, 2)
    state = {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": torch.ones(2)}
    save_model_weights(state, tmp_path / "m.safetensors")
    back = load_model_weights(tmp_path / "m.safetensors")
    assert set(back) == set(state)
    assert torch.equal(back["lm_head.weight"], shared)
    assert back["lm_head.weight"].data_ptr() == back["embed.weight"].data_ptr()


@pytest.mark.parametrize("over", [{}, {"tie_embeddings": True, "lm_head_bias": True, "rotary_fraction": 0.5}])
def test_model_from_checkpoint_is_the_saved_model(tmp_path: Path, over: dict) -> None:
    """Built on the meta device and loaded: every weight, the rotary tables and the logits are the saved ones;
    a weights file that lacks a parameter is refused rather than leaving it uninitialized."""
    from omegaconf import OmegaConf

    from open360.checkpoint import load_model_from_checkpoint
    from open360.models import build_model

    cfg = dict(name="t", vocab_size=64, n_layers=2, d_model=32, n_heads=4, ffn_dim=48, max_seq_len=40, **over)
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    contents = _contents()
    contents.model = model.state_dict()
    contents.config_yaml = OmegaConf.to_yaml({"model": cfg})
    path = save_checkpoint(tmp_path / "run", 1, contents)
    loaded, _ = load_model_from_checkpoint(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded.rotary.cos, model.rotary.cos) and torch.equal(loaded.rotary.sin, model.rotary.sin)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    state = model.state_dict()
    state.pop("final_norm.weight")
    save_model_weights(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: sha256 .* does not match lineage.json"):
        load_model_from_checkpoint(path)  # the weights are checked against their lineage hash first
    lineage = json.loads((path / "lineage.json").read_text())
    lineage["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(RuntimeError, match="final_norm.weight"):
        load_model_from_checkpoint(path)


def test_optimizer_and_rng_files_are_weights_only_loadable(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, _contents())
    torch.load(path / "optimizer.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 7


def test_crash_mid_save_leaves_no_complete_looking_dir(tmp_path: Path) -> None:
    """A child process killed while sleeping inside save_checkpoint leaves only a .tmp dir."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, torch\n"
        "from open360.checkpoint import save_checkpoint, CheckpointContents\n"
        "c = CheckpointContents({'w': torch.ones(2)}, {}, {'step': 1}, {}, 'x: 1\\n')\n"
        "save_checkpoint(sys.argv[1], 1, c)\n"
    )
    env = {**os.environ, "OPEN360_CHECKPOINT_SAVE_DELAY_S": "30"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".tmp-step_1") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = [p.name for p in tmp_path.iterdir()]
    assert any(n.startswith(".tmp-step_1-") for n in names), names
    assert list_checkpoints(tmp_path) == []


def test_extra_dirs_move_into_the_checkpoint_and_are_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import open360.checkpoint.io as io

    synced: list[str] = []
    real_fsync_dir = io.fsync_dir
    monkeypatch.setattr(io, "fsync_dir", lambda p: (synced.append(Path(p).name), real_fsync_dir(p)))
    staging = tmp_path / "run" / ".tmp-step_5-megatron"
    (staging / "shards").mkdir(parents=True)
    (staging / "shards" / "0.distcp").write_bytes(b"rank0")
    (staging / "metadata.json").write_text("{}")
    contents = _contents()
    contents.extra_dirs = {"megatron": staging}
    path = save_checkpoint(tmp_path / "run", 5, contents)
    assert not staging.exists()
    assert {"megatron", "shards"} <= set(synced)  # the nested folders' entries are on disk before the rename
    lineage = verify_checkpoint(path)
    assert {"megatron/shards/0.distcp", "megatron/metadata.json"} <= set(lineage["files"])
    (path / "megatron" / "shards" / "0.distcp").write_bytes(b"rank1")
    with pytest.raises(CheckpointError, match="0.distcp"):
        verify_checkpoint(path)


def test_every_file_and_folder_is_on_disk_before_the_step_folder_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """step_N counts as complete by its name alone: every file and folder of it is fsynced before the rename
    that names it, and its parent after (a power cut then never leaves a step_N whose files the disk lost);
    for a new step, and for one that replaces an earlier copy."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    parent = (tmp_path / "run").resolve()
    for _ in range(2):
        staging = tmp_path / "staging"
        (staging / "shards").mkdir(parents=True)
        (staging / "shards" / "0.distcp").write_bytes(b"rank0")
        contents = _contents()
        contents.extra_dirs = {"megatron": staging}
        events.clear()
        final = save_checkpoint(parent, 5, contents)
        named = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
        assert len(named) == 1, events
        tmp = Path(events[named[0]][1])
        synced = {e[1] for e in events[: named[0]] if e[0] == "fsync"}
        entries = {str(tmp / p.relative_to(final)) for p in final.rglob("*")}
        assert len(entries) > len(PAYLOAD_FILES) and entries | {str(tmp)} <= synced, sorted(entries - synced)
        assert ("fsync", str(parent)) in events[named[0] + 1 :]


def test_code_revision_is_dirty_for_code_changes_only(tmp_path: Path) -> None:
    import subprocess

    from open360.checkpoint.lineage import git_revision

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", *args], check=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a\n")
    (tmp_path / "checkpoints.dvc").write_text("outs: []\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".gitignore").write_text("/x\n")
    git("add", ".")
    git("commit", "-qm", "init")
    (tmp_path / "checkpoints.dvc").write_text("outs: [changed]\n")  # what a run's DVC versioning stages
    (tmp_path / "shards" / ".gitignore").write_text("/x\n/y\n")
    assert git_revision(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("b\n")
    assert git_revision(tmp_path)["dirty"] is True


def test_equal_state_gives_equal_bytes_in_any_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from open360.checkpoint import save_model_weights\n"
        "w = torch.arange(6.0).reshape(2, 3)\n"
        "save_model_weights({'embed.weight': w, 'lm_head.weight': w, 'b': torch.ones(2)}, sys.argv[1])\n"
    )
    files = [tmp_path / f"m{i}.safetensors" for i in range(4)]  # the header's metadata order used to vary
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    # the same file with its metadata written in the other order (what the writer sometimes does)
    from open360.checkpoint.io import _sort_metadata

    data = files[0].read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(reversed(list(header["__metadata__"].items())))
    text = json.dumps(header, separators=(",", ":")).encode()
    shuffled = tmp_path / "shuffled.safetensors"
    shuffled.write_bytes(data[:8] + text + b" " * (size - len(text)) + data[8 + size :])
    assert shuffled.read_bytes() != data
    _sort_metadata(shuffled)
    assert shuffled.read_bytes() == data
    back = load_model_weights(files[0])
    assert back["lm_head.weight"] is back["embed.weight"] and torch.equal(back["b"], torch.ones(2))
    listed = _contents()  # a resumed optimizer's state holds betas as a list: saved as the tuple it was
    listed.optimizer["param_groups"][0]["betas"] = [0.9, 0.95]
    a, b = save_checkpoint(tmp_path / "a", 1, _contents()), save_checkpoint(tmp_path / "b", 1, listed)
    assert (a / "optimizer.pt").read_bytes() == (b / "optimizer.pt").read_bytes()


def test_failed_save_and_crash_during_replace_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import open360.checkpoint.io as io

    save_checkpoint(tmp_path, 5, _contents(0))
    real = torch.save

    def full_disk(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"step_6: could not be written .*No space left.*earlier checkpoint is intact"):
        save_checkpoint(tmp_path, 6, _contents(1))
    def full_disk_torch(obj, f, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202 - what torch.save raises
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5805120 vs 5805012")

    monkeypatch.setattr(io.torch, "save", full_disk_torch)
    with pytest.raises(CheckpointError, match=r"step_6: could not be written .*unexpected pos"):
        save_checkpoint(tmp_path, 6, _contents(1))

    def full_disk_safetensors(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise io.SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(io.torch, "save", real)
    monkeypatch.setattr(io, "save_file", full_disk_safetensors)
    with pytest.raises(CheckpointError, match=r"step_6: could not be written .*os error 28"):
        save_checkpoint(tmp_path, 6, _contents(1))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_5"]  # no partial copy left
    (tmp_path / "a_file").write_text("")  # a checkpoint folder that cannot be created: found up front
    with pytest.raises(CheckpointError, match=r"a_file/run: checkpoints cannot be written there"):
        io.check_writable(tmp_path / "a_file" / "run")
    # killed between moving step_5 aside and renaming its replacement in: the old copy comes back
    (tmp_path / "step_5").rename(tmp_path / ".old-step_5-999")
    (tmp_path / ".tmp-step_5-999").mkdir()
    remove_stale_temp_dirs(tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5] and verify_checkpoint(tmp_path / "step_5")
    (tmp_path / "step_5" / "lineage.json").write_text("[]")
    with pytest.raises(CheckpointError, match="a JSON object is expected"):
        verify_checkpoint(tmp_path / "step_5")
    lineage = read_lineage(save_checkpoint(tmp_path, 7, _contents()))
    del lineage["files"]["optimizer.pt"]
    (tmp_path / "step_7" / "lineage.json").write_text(json.dumps(lineage))
    with pytest.raises(CheckpointError, match=r"does not list \['optimizer.pt'\]"):
        verify_checkpoint(tmp_path / "step_7")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (Path.touch, (Path(self.marker),))


def _rehash(path: Path, name: str) -> None:
    lineage = json.loads((path / "lineage.json").read_text())
    lineage["files"][name] = sha256_file(path / name)
    (path / "lineage.json").write_text(json.dumps(lineage))


def test_a_non_utf8_lineage_or_a_foreign_pickle_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    ck = save_checkpoint(tmp_path, 1, _contents())
    marker = tmp_path / "ran"
    torch.save({"state": {}, "x": _RunsCode(str(marker))}, ck / "optimizer.pt")
    _rehash(ck, "optimizer.pt")  # the hashes match: a foreign checkpoint, not a damaged one
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: not loadable .*weights_only=True") as err:
        load_checkpoint(ck)
    assert "weights_only=False (a pickle can run code)" in str(err.value) and not marker.exists()
    (ck / "rng.pt").write_bytes((ck / "rng.pt").read_bytes()[:100])
    _rehash(ck, "rng.pt")
    ck2 = save_checkpoint(tmp_path, 2, _contents())
    (ck2 / "rng.pt").write_bytes(b"\x00" * 10)
    _rehash(ck2, "rng.pt")
    with pytest.raises(CheckpointError, match=r"rng\.pt: not loadable"):
        load_checkpoint(ck2)
    (ck2 / "lineage.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=r"lineage\.json: not valid JSON"):
        read_lineage(ck2)


def test_config_hash_is_the_same_on_every_machine() -> None:
    from open360.checkpoint.lineage import config_hash

    base = {"workspace": "/home/alice/open360", "data": {"shards_dir": "shards", "seed": 1},
            "trainer": {"resume": "none", "init_from": "/home/alice/open360/checkpoints/base/step_4"}}
    moved = {"workspace": "/scratch/bob/ws", "data": {"shards_dir": "/fast/shards", "seed": 1},
             "trainer": {"resume": "auto", "init_from": None}}  # a resume of the warm-started run may leave it out
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash({**base, "data": {"shards_dir": "shards", "seed": 2}})


@pytest.mark.parametrize(
    ("key", "value"),
    [("data", None), ("data", "text"), ("callbacks", None), ("data_history", {}), ("step", "x"), ("init_from", 3)],
)
def test_a_hand_edited_lineage_key_of_the_wrong_type_is_one_error_naming_it(
    tmp_path: Path, key: str, value: object
) -> None:
    ck = save_checkpoint(tmp_path, 1, _contents())
    lineage = read_lineage(ck)
    (ck / "lineage.json").write_text(json.dumps({**lineage, key: value}))
    with pytest.raises(CheckpointError, match=rf"lineage\.json: key '{key}' holds .* is expected"):
        read_lineage(ck)


def test_lineage_files_outside_the_folder_and_malformed_aliases_are_refused(tmp_path: Path) -> None:
    ck = save_checkpoint(tmp_path, 1, _contents())
    lineage = read_lineage(ck)
    for name in ("../step_2/model.safetensors", "/etc/hostname"):
        forged = {**lineage, "files": {**lineage["files"], name: "0" * 64}}
        (ck / "lineage.json").write_text(json.dumps(forged))
        with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
            verify_checkpoint(ck)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(weights), metadata={"aliases": "{not json"})
    with pytest.raises(CheckpointError, match="'aliases' metadata is malformed"):
        load_model_weights(weights)
    save_file({"a": torch.zeros(2)}, str(weights), metadata={"aliases": '{"b": "missing"}'})
    with pytest.raises(CheckpointError, match="'aliases' metadata is malformed"):
        load_model_weights(weights)


def test_n_kv_heads_unset_and_equal_to_n_heads_is_the_same_architecture(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from open360.checkpoint.io import check_architecture

    (tmp_path / "config.yaml").write_text("model:\n  n_heads: 4\n  n_kv_heads: null\n  d_model: 64\n")
    check_architecture(tmp_path, OmegaConf.create({"n_heads": 4, "n_kv_heads": 4, "d_model": 64}), "trainer.resume")
    with pytest.raises(CheckpointError, match=r"'model.n_kv_heads': \(None, 2\)"):
        check_architecture(tmp_path, OmegaConf.create({"n_heads": 4, "n_kv_heads": 2, "d_model": 64}), "x")


def test_an_interpolation_in_a_checkpoint_config_is_refused_unresolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training records its config resolved: a `${oc.env:...}` in a pulled checkpoint's config.yaml was put
    there by hand, and resolving it would copy this machine's secret into an HF export's config.json, a
    log or an error message. Every reader of the file refuses it, naming the key, never the value."""
    from omegaconf import OmegaConf

    from open360.checkpoint import load_model_from_checkpoint
    from open360.checkpoint.io import check_architecture, read_config
    from open360.models import build_model

    monkeypatch.setenv("OPEN360_TEST_SECRET", "hf_leakedleakedleaked")
    cfg = dict(name="t", vocab_size=64, n_layers=1, d_model=32, n_heads=4, ffn_dim=48, max_seq_len=16)
    contents = _contents()
    contents.model = build_model(cfg).state_dict()
    contents.config_yaml = OmegaConf.to_yaml({"model": cfg}).replace("name: t", "name: ${oc.env:OPEN360_TEST_SECRET}")
    path = save_checkpoint(tmp_path / "run", 1, contents)
    arch = OmegaConf.create({**cfg, "n_heads": 2})
    for read in (lambda: read_config(path), lambda: load_model_from_checkpoint(path),
                 lambda: check_architecture(path, arch, "trainer.resume")):
        with pytest.raises(CheckpointError, match=r"config.yaml: key model.name holds the interpolation "
                                                  r"'\$\{oc.env:OPEN360_TEST_SECRET\}'.*refused") as err:
            read()
        assert "leaked" not in str(err.value)


def test_a_damaged_pickle_stream_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    """Bytes flipped inside optimizer.pt's pickle (its sha256 re-recorded: a foreign or re-hashed copy) can fail
    inside torch's weights_only unpickler with a KeyError, IndexError or TypeError: each is the same
    CheckpointError naming the file as any other damage, not a bare `KeyError: 88`."""
    ck = save_checkpoint(tmp_path, 1, _contents())
    data = (ck / "optimizer.pt").read_bytes()
    at = data.index(b"\x80\x02}q\x00")  # the pickle opens with a dict memoized as 0 ...
    (ck / "optimizer.pt").write_bytes(data[:at] + b"\x80\x02}hX" + data[at + 5 :])  # ... now fetches memo 88
    _rehash(ck, "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step_1/optimizer\.pt: not loadable as tensors with weights_only=True"):
        load_checkpoint(ck)
    # a storage type that became an int (`BINGET 7` -> `BININT1 7`): an AttributeError inside torch.load
    torch.save({"state": {0: {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}}, ck / "optimizer.pt")
    data = (ck / "optimizer.pt").read_bytes()
    at = data.index(b"((h\x06h\x07")  # the second tensor's persistent id: ('storage', FloatStorage, ...)
    (ck / "optimizer.pt").write_bytes(data[:at] + b"((h\x06K\x07" + data[at + 6 :])
    _rehash(ck, "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step_1/optimizer\.pt: not loadable as tensors with weights_only=True"):
        load_checkpoint(ck)


def test_the_optimizer_state_is_read_through_a_private_memory_map(tmp_path: Path) -> None:
    """Loading maps optimizer.pt instead of reading it into this process's memory (ranks of one machine share
    the page cache on resume), and the optimizer's in-place updates never reach the checkpoint's file."""
    contents = _contents()
    contents.optimizer["state"]["a.weight"]["exp_avg"] = torch.zeros(64 * 2**20 // 4)  # 64 MiB
    ck = save_checkpoint(tmp_path, 1, contents)
    before = sha256_file(ck / "optimizer.pt")

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    start = resident_mib()
    exp_avg = load_checkpoint(ck).optimizer["state"]["a.weight"]["exp_avg"]
    assert resident_mib() - start < 16  # a plain torch.load adds the whole 64 MiB here
    exp_avg.add_(1.0)  # Adam's update, in place: copy-on-write
    assert float(exp_avg.sum()) == exp_avg.numel() and sha256_file(ck / "optimizer.pt") == before
    verify_checkpoint(ck)


def test_a_branch_journal_and_its_moves_reach_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal of a branch is fsynced (file and folder) before anything moves, as a checkpoint's files are:
    a power cut after the moves must not leave an empty journal entry, which pending_branches skips as junk,
    so that resume=auto would continue the half-replaced branch. The moves are on disk before it goes."""
    from open360.checkpoint.branches import supersede_later_checkpoints, write_pending_branch

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    published, recovery = (tmp_path / "checkpoints" / "r").resolve(), (tmp_path / "recovery" / "r").resolve()
    for step in (2, 4):
        save_checkpoint(published, step, _contents())
    synced.clear()
    marker = write_pending_branch(recovery, 2, "from_step_2-x")
    assert [Path(p).name.endswith(marker.name) for p in synced] == [True, False] and synced[1] == str(recovery)
    synced.clear()
    supersede_later_checkpoints(2, published, recovery, "from_step_2-x")
    assert synced == [str(published / "superseded" / "from_step_2-x"), str(published)]


def test_a_config_that_is_not_text_or_missing_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    """A config.yaml whose sha256 matches lineage.json but that is not UTF-8 (a foreign or re-hashed copy), or
    one missing from a folder read without verification, is refused naming the file, not a UnicodeDecodeError."""
    ck = save_checkpoint(tmp_path, 1, _contents())
    (ck / "config.yaml").write_bytes(b"model: \xff\n")
    _rehash(ck, "config.yaml")
    with pytest.raises(CheckpointError, match=r"step_1/config\.yaml: not readable as UTF-8 text"):
        load_checkpoint(ck)
    (ck / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"step_1/config\.yaml: not readable as UTF-8 text"):
        load_checkpoint(ck, verify=False)


def test_a_lineage_listing_a_file_twice_or_with_a_history_of_non_objects_is_refused(tmp_path: Path) -> None:
    """JSON keeps the last of two equal keys: a lineage.json listing model.safetensors twice, a wrong sha256
    first, would verify (and another reader would see the wrong one). A data history whose entries are not
    objects fails later with a TypeError (a warm start's inherited history, memorization): named here."""
    from open360.checkpoint.lineage import history_to_inherit

    ck = save_checkpoint(tmp_path, 1, _contents())
    lineage = read_lineage(ck)
    text = json.dumps(lineage, indent=2).replace('"files": {', '"files": {\n"model.safetensors": "' + "0" * 64 + '",', 1)
    (ck / "lineage.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"lineage\.json: key 'model.safetensors' appears twice"):
        verify_checkpoint(ck)
    for edit, named in (
        ({"data_history": [1]}, r"key data_history\[0\] holds int"),
        ({"init_from": {"data_history": 3}}, r"key 'init_from.data_history' holds int"),
        ({"init_from": {"data_history": ["x"]}}, r"key init_from.data_history\[0\] holds str"),
    ):
        (ck / "lineage.json").write_text(json.dumps({**lineage, **edit}))
        with pytest.raises(CheckpointError, match=rf"step_1/lineage\.json: {named}"):
            history_to_inherit(read_lineage(ck), 8)


def test_a_branch_folder_is_one_no_earlier_branch_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Branches from one step within one second: a folder already under either superseded/, or journaled and
    not yet moved (a crash before its first move), is taken; the next free `-<n>` suffix of the stamp is used."""
    import time

    from open360.checkpoint.branches import branch_folder, write_pending_branch

    frozen = time.gmtime()
    monkeypatch.setattr("open360.checkpoint.branches.time.gmtime", lambda *args: frozen)
    published, recovery = tmp_path / "checkpoints" / "r", tmp_path / "recovery" / "r"
    stamp = f"from_step_2-{time.strftime('%Y%m%dT%H%M%SZ', frozen)}"
    assert branch_folder(2, published, recovery) == stamp
    write_pending_branch(recovery, 2, stamp)  # journaled, nothing moved yet
    assert branch_folder(2, published, recovery) == f"{stamp}-2"
    (recovery / "superseded" / f"{stamp}-2").mkdir(parents=True)  # only the recovery folder had later steps
    assert branch_folder(2, published, recovery) == f"{stamp}-3"
    (published / "superseded" / f"{stamp}-3").mkdir(parents=True)  # only the published one
    assert branch_folder(2, published, recovery) == f"{stamp}-4"
    assert branch_folder(4, published, recovery) == f"from_step_4-{time.strftime('%Y%m%dT%H%M%SZ', frozen)}"


def test_resume_from_a_step_a_crash_left_mid_replace_passes_the_check_and_is_restored(tmp_path: Path) -> None:
    """trainer.resume=N, where a crash while replacing step_N left only `.old-step_N-<pid>`: the config check
    (before anything is written) lets it through, since the start restores that copy before looking; a step
    with no copy at all (a junk `.old-` name, or none) is still refused naming it."""
    from omegaconf import OmegaConf

    from open360.train.validate import check_resume_step

    published = tmp_path / "checkpoints" / "r"
    save_checkpoint(published, 2, _contents()).rename(published / ".old-step_2-999")
    cfg = OmegaConf.create({"workspace": str(tmp_path), "run_name": "r", "trainer": {"resume": 2}})
    check_resume_step(cfg)
    remove_stale_temp_dirs(published)
    assert [s for s, _ in list_checkpoints(published)] == [2]
    save_checkpoint(tmp_path / "x", 4, _contents()).rename(published / ".old-step_4-x")  # no save's name: not restored
    cfg.trainer.resume = 4
    with pytest.raises(ValueError, match="4"):
        check_resume_step(cfg)


def test_pending_branches_come_oldest_first(tmp_path: Path) -> None:
    """Two unfinished branches are finished in the order they began (stamp, then same-second suffix), not by
    name: from_step_10 sorts before from_step_4 as text, and finishing the later branch first would move the
    earlier one's checkpoints into the later one's superseded folder."""
    from open360.checkpoint.branches import pending_branches, write_pending_branch

    for step, folder in ((4, "from_step_4-20261128T100000Z"), (10, "from_step_10-20261128T100001Z"),
                         (2, "from_step_2-20261128T100001Z-2"), (3, "from_step_3-20261128T100001Z-10")):
        write_pending_branch(tmp_path, step, folder)
    (tmp_path / ".branch-pending-junk.json").write_text("{}")
    assert [entry.get("from_step") for _, entry in pending_branches(tmp_path)] == [None, 4, 10, 2, 3]


def test_the_hardware_record_names_what_ran_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size, device kind and model, and (on CUDA) torch's CUDA version or (on CPU) the kernels'
    instruction set and thread count: weights are bitwise reproducible only on the same."""
    import platform

    from open360.checkpoint.lineage import describe_hardware, hardware_record

    cpu = hardware_record(torch.device("cpu"), 1)
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu == {"world_size": 1, "device": "cpu", "accelerator": f"{platform.machine()} {capability}",
                   "cuda": None, "cpu_threads": torch.get_num_threads()}
    assert describe_hardware({**cpu, "cpu_threads": 2}) == f"1 x {platform.machine()} {capability} (cpu, 2 threads)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    gpu = hardware_record(torch.device("cuda", 0), 8)
    assert gpu == {"world_size": 8, "device": "cuda", "accelerator": "NVIDIA H200", "cuda": "12.4", "cpu_threads": None}
    assert describe_hardware(gpu) == "8 x NVIDIA H200 (cuda 12.4)"
    assert hardware_record(torch.device("cpu"), 2)["cuda"] is None  # a CUDA build's version, unused on CPU
