"""Release export: a run as one self-contained folder (HF checkpoints `ckpt_XXX`, data, metrics, model card)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from open360.checkpoint.lineage import data_history, inherited_data_history, trained_data_history
from open360.credentials import mask_secrets
from open360.paths import temp_sibling
from open360.tracking.checkpoints import (
    CheckpointEntry,
    is_dvc_workspace,
    run_checkpoints,
    select_steps,
    trainer_state,
)
from open360.tracking.dvc_versioning import DvcWorkspace
from open360.tracking.mlflow_records import lineage_run_id


class ReleaseError(RuntimeError):
    """The release folder cannot be built; the message names the checkpoint/file and what to do."""


def publishable(obj: Any, workspace: Path, roots: Any = ()) -> Any:
    """A config or lineage tree fit to publish: secrets masked, and this machine's workspace path (in a
    local MLflow store URI, say) written as `.` so that no local path leaves the machine; so are `roots`, the
    paths the checkpoints were trained in (another machine's, for a release exported from a clone)."""
    paths = sorted({str(Path(workspace).resolve()), *map(str, roots)} - {"/", ""}, key=len, reverse=True)
    if not paths:
        return mask_secrets(obj)
    # a whole path only: the workspace /data/run is not the start of /data/run_base
    pattern = re.compile("(?:" + "|".join(map(re.escape, paths)) + r")(?![\w.-])")

    def local(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        return pattern.sub(".", value) if isinstance(value, str) else value

    return local(mask_secrets(obj))


def trained_in(config: dict[str, Any], lineage: dict[str, Any]) -> set[str]:
    """The absolute paths of the workspace a checkpoint was trained in, as its config (`workspace`) and its
    lineage (the workspace's default MLflow store, `sqlite:///<workspace>/mlflow.db`) record them."""
    roots = set()
    workspace = config.get("workspace")
    if isinstance(workspace, str) and Path(workspace).is_absolute():
        roots.add(workspace.rstrip("/"))
    uri = str((lineage.get("callbacks") or {}).get("mlflow_tracking_uri") or "")
    if uri.startswith("sqlite:////") and uri.endswith("/mlflow.db"):
        roots.add(uri[len("sqlite:///") : -len("/mlflow.db")])
    return roots


def ckpt_names(n: int) -> list[str]:
    """LLM360's revision names: ckpt_000 … ckpt_<n-1>, zero-padded to at least 3 digits. A release names
    each checkpoint by its place among all the run's checkpoints, so that a partial export and a full
    one give a step the same revision."""
    width = max(3, len(str(max(n - 1, 0))))
    return [f"ckpt_{i:0{width}d}" for i in range(n)]


def _choose(entries: list[CheckpointEntry], steps: str, run: str) -> list[CheckpointEntry]:
    if steps in ("all", "latest"):
        return select_steps(entries, steps, run)
    chosen = []
    for part in steps.split(","):
        chosen += select_steps(entries, part.strip(), run)
    return sorted({e.step: e for e in chosen}.values(), key=lambda e: e.step)


def _metrics_table(
    workspace: Path, run: str, mlflow_uri: str | None, out: Path, recorded: str | None = None, step: int = 0
) -> str | None:
    """Write metrics.parquet from the MLflow run `recorded` (the one the lineage of the checkpoint at `step`
    names), or from the branch that since replaced that run's steps after `step` (`current_run_id`: a release
    of the checkpoints before a branch gives the run's current metrics, as a full release does); only a lineage
    that names none falls back to the latest run tagged with the run name (another workspace on a shared
    server may have trained a run of the same name: its metrics are not this release's)."""
    from open360.tracking import mlflow_records as mr

    uri = mr.workspace_uri(workspace, mlflow_uri)
    if uri is None:
        return None

    def read(c: Any) -> tuple[str | None, dict[str, Any]]:
        rid = recorded or mr.find_run_id(c, run)
        if rid and recorded:
            from mlflow.exceptions import MlflowException

            try:
                c.get_run(rid)
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return None, {}  # not in this store: no metrics rather than another run's
            rid = mr.current_run_id(c, rid, step)
        return rid, mr.latest_metrics(c, rid) if rid else {}

    try:
        run_id, latest = mr.read_store(uri, read)
    except mr.StoreUnreadable as err:
        raise ReleaseError(f"metrics of run {run!r}: {err}") from None
    if run_id is None:
        return None
    import pandas as pd

    rows = [  # one value per step: where a resumed run logged a step twice, the latest write
        {"key": key, "step": m.step, "value": m.value, "timestamp": m.timestamp}
        for key, steps in latest.items()
        for m in steps.values()
    ]
    frame = pd.DataFrame(rows, columns=["key", "step", "value", "timestamp"]).sort_values(
        ["key", "step", "timestamp"]
    )
    frame.to_parquet(out / "metrics.parquet", index=False)
    return run_id


def _copy_data(workspace: Path, lineages: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Copy each shard folder's manifest and tokenizer into `data/` once; one row per (folder, whose):
    the run's own stages, and a warm start's base (marked "(base)"), also when both used one folder."""
    rows: dict[tuple[str, bool], dict[str, Any]] = {}
    for lineage in lineages:
        entries = [(d, True) for d in inherited_data_history(lineage)] + [(d, False) for d in data_history(lineage)]
        for data, inherited in entries:
            shard_dir = data.get("shard_dir")
            if not shard_dir or (shard_dir, inherited) in rows:
                continue
            src = workspace / shard_dir
            dst = out / "data" / Path(shard_dir).name
            present = [name for name in ("manifest.json", "tokenizer.json") if (src / name).is_file()]
            if present and not dst.is_dir():
                dst.mkdir(parents=True)
                for name in present:
                    shutil.copy2(src / name, dst / name)
            rows[(shard_dir, inherited)] = {  # shards not in this workspace (a warm start's base): no empty folder
                **{k: data.get(k) for k in ("recipe", "manifest_hash", "tokenizer_hash")},
                "stage": f"{data.get('stage')} (base)" if inherited else data.get("stage"),
                "folder": f"data/{dst.name}" if dst.is_dir() else f"{shard_dir} (not in the exporting workspace)",
                "manifest_copied": (dst / "manifest.json").is_file(),
            }
    return list(rows.values())


def _verify(workspace: Path, entry: CheckpointEntry) -> tuple[dict[str, Any], Path | None]:
    """Check one checkpoint before anything is written; return its lineage and its shards' tokenizer file."""
    from open360.checkpoint import CheckpointError, verify_checkpoint
    from open360.tracking.dvc_versioning import dvc_mismatches

    try:
        lineage = verify_checkpoint(entry.path)
    except CheckpointError as err:
        raise ReleaseError(f"checkpoint step {entry.step} failed verification: {err}") from err
    if entry.tracked is not None:  # the files must be the versioned ones the release names by DVC md5
        bad = dvc_mismatches(entry.path, entry.tracked.file_md5)
        if bad:
            raise ReleaseError(f"checkpoint step {entry.step} differs from checkpoints.dvc: {bad[0]}"
                               f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}")
    shard_dir = (lineage.get("data") or {}).get("shard_dir")
    tokenizer = workspace / shard_dir / "tokenizer.json" if shard_dir else None
    if tokenizer is not None and not tokenizer.is_file():
        raise ReleaseError(
            f"{tokenizer}: the tokenizer step {entry.step} was trained with is not in this workspace; fetch it and "
            f"the manifest alone (`dvc pull {shard_dir}/tokenizer.json {shard_dir}/manifest.json`, not the shards) "
            "or build the shards (`open360 data build`), then export again"
        )
    return lineage, tokenizer


def _absent_data_files(workspace: Path, chosen: list[CheckpointEntry]) -> list[Path]:
    """The manifest.json and tokenizer.json of each shard folder the chosen checkpoints trained on (their base's
    included) that this workspace lacks (a fresh clone, whose shards were never pulled)."""
    from open360.checkpoint import CheckpointError, read_lineage

    absent: dict[Path, None] = {}
    for entry in chosen:
        try:
            lineage = read_lineage(entry.path)
        except CheckpointError:  # reported, naming the checkpoint, by its verification
            continue
        for data in trained_data_history(lineage):
            shard_dir = data.get("shard_dir")
            for name in ("manifest.json", "tokenizer.json") if shard_dir else ():
                file = workspace / shard_dir / name
                if not file.is_file() and file.resolve().is_relative_to(workspace):
                    absent[file] = None
    return list(absent)


def _check_data_files(workspace: Path, lineages: list[tuple[int, dict[str, Any]]]) -> None:
    """The manifest and tokenizer files a release copies from the workspace's shard folders must be the
    ones each checkpoint's lineage names (its manifest and tokenizer sha256), not a rebuilt or damaged copy.
    Each file is hashed once, however many checkpoints share it."""
    from open360.data.shards import manifest_hash_of
    from open360.data.tokenizer import tokenizer_bytes_hash

    checks = (("tokenizer.json", "tokenizer_hash", lambda f: tokenizer_bytes_hash(f.read_bytes())),
              ("manifest.json", "manifest_hash", lambda f: manifest_hash_of(json.loads(f.read_text()))))
    digests: dict[Path, str] = {}
    for step, lineage in lineages:
        for data in trained_data_history(lineage):
            shard_dir = data.get("shard_dir")
            for name, key, digest in checks if shard_dir else ():
                file, expected = workspace / shard_dir / name, data.get(key)
                if not expected or not file.is_file():
                    continue
                if file not in digests:
                    try:
                        digests[file] = digest(file)
                    except (OSError, ValueError, AttributeError) as err:
                        digests[file] = f"unreadable ({err})"
                actual = digests[file]
                if actual != expected:
                    raise ReleaseError(
                        f"{file}: {actual} but checkpoint step {step} records {key} {expected}; the shard folder "
                        f"was rebuilt or damaged — restore it (`dvc pull {shard_dir} --force`), then export again"
                    )


def file_hashes(folder: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its path relative to it (what a user re-checks); files and
    folders named in `skip` at its top level are left out, unread."""
    from open360.checkpoint.io import sha256_file

    files = sorted(f for f in Path(folder).rglob("*") if f.is_file() and f.relative_to(folder).parts[0] not in skip)
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in files}


def _export_checkpoint(
    workspace: Path,
    entry: CheckpointEntry,
    lineage: dict[str, Any],
    tokenizer: Path | None,
    folder: Path,
    roots: set[str],
) -> tuple[dict[str, str], Any]:
    """Write one verified checkpoint (`lineage`: its lineage.json as `_verify` read it) as an HF folder plus
    its published lineage; return the written files' sha256 and the checkpoint's config."""
    from open360.checkpoint import load_model_from_checkpoint
    from open360.models.hf import export_hf

    model, cfg = load_model_from_checkpoint(entry.path, device="cpu", verify=False)  # verified by _verify
    export_hf(model, cfg.model, tokenizer, folder)
    published = publishable(lineage, workspace, roots)
    (folder / "open360_lineage.json").write_text(json.dumps(published, indent=2, sort_keys=True) + "\n")
    return file_hashes(folder), cfg


def _trained_so_far(entry: CheckpointEntry, lineage: dict[str, Any]) -> dict[str, Any]:
    """What a verified checkpoint records of its training: the loss of its last step (trainer_state.json), the
    code revision that wrote it, and per data stage the steps trained and the sequence ids seen (its lineage)."""
    code = lineage.get("code") or {}
    revision = code.get("revision")
    return {
        "loss": trainer_state(entry.path).get("loss"),
        "code_revision": revision and revision + ("-dirty" if code.get("dirty") else ""),
        "data_seen": [
            {k: d.get(k) for k in ("stage", "steps", "sequences_seen")} for d in data_history(lineage)
        ],
    }


def _write_release(
    workspace: Path,
    run: str,
    checked: list[tuple[CheckpointEntry, dict[str, Any], Path | None]],
    revision: dict[int, str],
    mlflow_uri: str | None,
    out: Path,
) -> None:
    """Write the release of the verified checkpoints `checked` into the (empty, temporary) folder `out`."""
    index, lineages = [], []
    configs = [OmegaConf.to_container(OmegaConf.load(e.path / "config.yaml"), resolve=False) for e, _, _ in checked]
    roots = set().union(*(trained_in(c, lineage) for c, (_, lineage, _) in zip(configs, checked, strict=True)))
    for entry, lineage, tokenizer in checked:
        name = revision[entry.step]
        export_files, cfg = _export_checkpoint(workspace, entry, lineage, tokenizer, out / name, roots)
        index.append(
            {
                "revision": name,
                "step": entry.step,
                "tokens_seen": lineage.get("tokens_seen"),
                **_trained_so_far(entry, lineage),
                "dvc_md5": entry.tracked.md5 if entry.tracked else None,
                "source": f"checkpoints/{run}/step_{entry.step}",
                "export_files": export_files,
            }
        )
        lineages.append(lineage)
    (out / "configs").mkdir(exist_ok=True)
    published = publishable(configs[-1], workspace, roots)
    (out / "configs" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(published)))
    data = _copy_data(workspace, lineages, out)
    run_id = _metrics_table(workspace, run, mlflow_uri, out, lineage_run_id(lineages[-1]), index[-1]["step"])
    (out / "checkpoints.json").write_text(json.dumps(index, indent=2) + "\n")
    open360_format = (out / index[-1]["revision"] / "modeling_open360.py").is_file()
    (out / "README.md").write_text(model_card(run, index, data, lineages[-1], run_id, cfg, open360_format))
    write_checksums(out, frozenset(c["revision"] for c in index))


SHA256SUMS = "SHA256SUMS"


def write_checksums(out: Path, checkpoint_folders: frozenset[str]) -> None:
    """`SHA256SUMS` (`sha256sum -c` format) of every release file outside the `ckpt_XXX` folders: the data
    files, config, metrics, model card and `checkpoints.json`, whose `export_files` cover the checkpoints (on
    the Hub those are other branches, so a download of `main` checks whole). The checkpoint folders, hashed
    when exported, are not read again."""
    sums = file_hashes(out, skip=checkpoint_folders | {SHA256SUMS})
    (out / SHA256SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))


def _refuse_nonempty(out: Path) -> None:
    """Raise unless `out` is absent or an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} exists and is not an empty folder; choose a new --out folder")


def _refuse_inside_tracked(workspace: Path, out: Path) -> None:
    """Raise when `out` lies in the workspace's checkpoints/, recovery/ or a DVC-tracked top-level folder
    (shards/): a release written there would become part of a versioned checkpoint (which then fails its
    checks) or look like one (`step_N`) that `ckpt push` versions."""
    from open360.tracking.checkpoints import CHECKPOINTS_DIR, RECOVERY_DIR

    try:
        top = out.relative_to(workspace).parts[0]
    except (ValueError, IndexError):
        return  # outside the workspace, or the workspace itself (refused as not empty)
    if top in (CHECKPOINTS_DIR, RECOVERY_DIR) or (workspace / f"{top}.dvc").is_file():
        raise ReleaseError(
            f"{out}: inside the workspace's {top}/, which holds versioned checkpoints or data; choose an --out "
            "folder outside it (e.g. release/<run>)"
        )


def export_release(
    workspace: Path,
    run: str,
    out: Path,
    steps: str = "all",
    pull: bool = False,
    mlflow_uri: str | None = None,
    remote: str | None = None,
) -> Path:
    """Write the release folder of `run` to `out` and return it (refuses a non-empty `out`); `pull` fetches
    the chosen checkpoints not on disk from the DVC `remote` (default: the default remote) first.

    All or nothing: every checkpoint is verified before anything is written, and the release is built in
    a temporary sibling folder renamed to `out` when complete; on any failure (Ctrl-C too) it is removed."""
    workspace = Path(workspace).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    _refuse_nonempty(out)
    _refuse_inside_tracked(workspace, out)
    # in a clone, the tree object that checkpoints.dvc names may be on `remote` only
    store = DvcWorkspace(workspace, remote=remote) if is_dvc_workspace(workspace) else None
    entries = run_checkpoints(workspace, run, store)
    revision = dict(zip((e.step for e in entries), ckpt_names(len(entries)), strict=True))
    chosen = _choose(entries, steps, run)
    absent = [e for e in chosen if not e.local]
    if absent and pull and store is not None:  # one DVC fetch for them all (absent ones are DVC-recorded)
        store.pull([entry.path for entry in absent])
        for entry in absent:
            entry.local = True
    elif absent:
        raise ReleaseError(
            f"steps {[e.step for e in absent]} of run {run!r} are not on disk; pass --pull "
            f"(or run `open360 ckpt pull {run} all`)"
        )
    if pull and store is not None:  # the tokenizers and manifests the release copies, not their shards
        store.pull_files(_absent_data_files(workspace, chosen))
    checked = [(entry, *_verify(workspace, entry)) for entry in chosen]  # before anything is written
    _check_data_files(workspace, [(entry.step, lineage) for entry, lineage, _ in checked])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)  # unique per host and process: a killed export's leftover never blocks a retry
    try:
        tmp.mkdir()
        _write_release(workspace, run, checked, revision, mlflow_uri, tmp)
        _refuse_nonempty(out)  # filled while this export ran
        os.replace(tmp, out)  # atomic; replaces `out` only if it is an empty folder
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReleaseError(f"{out}: the release could not be written ({err}); nothing was left there") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _warm_start(lineage: dict[str, Any], m: Any) -> str:
    """The model card's note on where a warm-started run's weights came from (and its rotary scaling)."""
    init = lineage.get("init_from") or {}
    factor = float(m.get("rope_interpolation_factor", 1.0) or 1.0)
    text = f", rotary positions scaled by 1/{factor:g} (position interpolation)" if factor != 1.0 else ""
    if init:
        text += (f". Warm-started from `{Path(str(init.get('checkpoint'))).parent.name}/step_{init.get('step')}` "
                 f"(weights sha256 `{init.get('model_sha256')}`): its data is listed below as (base)")
    return text


def model_card(
    run: str,
    index: list[dict[str, Any]],
    data: list[dict[str, Any]],
    lineage: dict[str, Any],
    run_id: str | None,
    cfg: Any,
    open360_format: bool,
) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for the release folder. `open360_format`: the
    checkpoint folders are in open360's own format (export_hf wrote remote code and a README.md into them)."""
    m = cfg.model
    if open360_format:
        load = (f'`AutoModelForCausalLM.from_pretrained("<repo>", revision="{index[-1]["revision"]}", '
                "trust_remote_code=True)` with open360 installed, or `open360.models.hf.import_hf(folder)`;\n"
                "each folder's README.md gives the loading recipe and the exact computation.")
    else:
        load = (f'`AutoModelForCausalLM.from_pretrained("<repo>", revision="{index[-1]["revision"]}")`\n'
                "(or `open360.models.hf.import_hf(folder)`, which gives open360's `Decoder`).")
    code = lineage.get("code", {})
    rows = "\n".join(
        f"| `{c['revision']}` | {c['step']} | {c['tokens_seen']} | `{c['dvc_md5']}` |" for c in index
    )
    data_rows = "\n".join(
        f"| {d['stage']} | `{d['recipe']}` | `{d['manifest_hash']}` | `{d['tokenizer_hash']}` | `{d['folder']}` |"
        for d in data
    )
    return f"""---
library_name: transformers
tags: [open360, llm360-style, fully-open]
---
# {run}

A fully open release produced by open360: every intermediate checkpoint, the data manifest, the
configuration and the training metrics. Each checkpoint is a Hugging Face folder named like LLM360's
revisions; on the Hub each one is the branch of the same name.

## Model
{m.name}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads, FFN {m.ffn_dim}, vocab {m.vocab_size},
{m.norm}, {m.mlp}, max sequence length {m.max_seq_len}{_warm_start(lineage, m)}.

## Checkpoints
| revision | step | tokens seen | DVC md5 |
|---|---|---|---|
{rows}

Load one: {load}

## Data
| stage | recipe | manifest sha256 | tokenizer sha256 | files |
|---|---|---|---|---|
{data_rows}

## Provenance
- code revision: `{code.get("revision")}`{" (dirty working tree)" if code.get("dirty") else ""}
- config sha256: `{lineage.get("config_hash")}` (full config in `configs/config.yaml`)
- {f"MLflow run: `{run_id}`; all metrics per step in `metrics.parquet` (key, step, value, timestamp)"
   if run_id else "MLflow: no tracked run was found when this release was exported; no `metrics.parquet`"}
- every checkpoint folder carries `open360_lineage.json` (sha256 of each original file), and
  `checkpoints.json` lists under `export_files` the sha256 of every file in each folder as released;
  `SHA256SUMS` holds the sha256 of every other file (`checkpoints.json` included): `sha256sum -c SHA256SUMS`
"""


def hub_upload_plan(folder: Path) -> list[tuple[str, Path, list[str] | None]]:
    """What `push_release_to_hub` uploads: (revision, local folder, ignore patterns), main branch first."""
    folder = Path(folder)
    index = json.loads((folder / "checkpoints.json").read_text())
    plan: list[tuple[str, Path, list[str] | None]] = [("main", folder, ["ckpt_*/**", "ckpt_*"])]
    plan += [(c["revision"], folder / c["revision"], None) for c in index]
    return plan


def push_release_to_hub(folder: Path, repo_id: str, token: str | None = None) -> None:
    """Upload the release: everything but the `ckpt_XXX` folders to `main`, each `ckpt_XXX` folder to the branch
    `ckpt_XXX` (`hub_upload_plan`)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    revision = "main"
    try:
        api.create_repo(repo_id, exist_ok=True)
        for revision, local, ignore in hub_upload_plan(folder):
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(local),
                revision=revision,
                ignore_patterns=ignore,
                commit_message=f"open360 release: {revision}",
            )
    except Exception as err:  # network, authentication, quota: the hub's own errors, one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ReleaseError(
            f"upload of {folder} to the Hub repo {repo_id} failed at revision {revision} ({type(err).__name__}: "
            f"{first}); the release folder is kept — export again into a new --out with --push-to-hub (the Hub "
            "skips files it already holds)"
        ) from err
