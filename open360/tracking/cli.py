"""`open360 ckpt list|pull|lineage|export` (and `push`, the retry of failed DVC pushes)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from open360.checkpoint.lineage import data_history, describe_hardware, inherited_data_history
from open360.credentials import mask_value
from open360.tracking.checkpoints import (
    find_workspace,
    folder_size,
    is_dvc_workspace,
    pull_checkpoints,
    run_checkpoints,
    run_dirs,
    trainer_state,
)
from open360.tracking.dvc_versioning import (
    DvcWorkspace,
    VersioningError,
    dvc_mismatches,
    folder_md5,
    local_steps,
    push_pending,
)


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", "-w", default=".", help="the run's workspace (default: current dir)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fail(prog: str, err: BaseException) -> int:
    print(f"{prog}: {err}", file=sys.stderr)
    return 1


LIST_METRICS = ("tokens_seen", "loss")  # what `ckpt list` shows of a checkpoint not on disk


def _mlflow_metrics(workspace: Path, run: str, uri: str | None) -> dict[str, dict[int, float]]:
    """key -> {step: value} of the listing's metrics only (the full history of every metric is ~2.5M rows at
    AMBER's step count: minutes to read)."""
    from open360.tracking import mlflow_records as mr

    resolved = mr.workspace_uri(workspace, uri)
    if resolved is None:
        print(f"open360 ckpt list: no MLflow store in {workspace} (mlflow.db); tokens/loss of steps not on disk "
              "are unknown: pass --mlflow-uri naming the run's store", file=sys.stderr)
        return {}

    def read(client: Any) -> dict[str, dict[int, float]] | None:
        run_id = mr.find_run_id(client, run)
        return mr.metric_history(client, run_id, LIST_METRICS) if run_id else None

    try:
        metrics = mr.read_store(resolved, read)
    except mr.StoreUnreadable as err:  # the listing needs MLflow only for steps not on disk
        print(f"open360 ckpt list: {err}; tokens/loss shown from trainer_state.json only", file=sys.stderr)
        return {}
    if metrics is None:
        print(f"open360 ckpt list: no MLflow run named {run!r} in {mask_value(resolved)}; tokens/loss shown from "
              "trainer_state.json only", file=sys.stderr)
    return metrics or {}


def list_main(argv: Sequence[str]) -> int:
    """`open360 ckpt list <run>`: steps, tokens seen, loss, size, on disk, pushed."""
    parser = argparse.ArgumentParser(prog="open360 ckpt list", description=list_main.__doc__)
    parser.add_argument("run")
    _workspace_arg(parser)
    parser.add_argument(
        "--mlflow-uri", default=None, help="tracking URI (default: the workspace's mlflow.db)"
    )
    parser.add_argument("--remote", default=None, help="DVC remote to check (default: the default remote)")
    args = parser.parse_args(list(argv))
    workspace = Path(args.workspace).expanduser().resolve()
    try:
        store = DvcWorkspace(workspace, remote=args.remote) if is_dvc_workspace(workspace) else None
        entries = run_checkpoints(workspace, args.run, store)
        if not entries:
            raise ValueError(f"run {args.run!r} has no checkpoints in {workspace / 'checkpoints' / args.run}")
        states = {e.step: trainer_state(e.path) if e.local else {} for e in entries}
        # MLflow only for what trainer_state.json cannot tell (a step not on disk, a damaged state file)
        needed = any(not all(k in states[e.step] for k in LIST_METRICS) for e in entries)
        metrics = _mlflow_metrics(workspace, args.run, args.mlflow_uri) if needed else {}
        missing: dict[str, int] = {}
        remote_note = ""
        tracked = [e.tracked for e in entries if e.tracked is not None]
        tree_missing = None
        if store is not None and tracked:
            try:
                missing = store.missing_on_remote(tracked)
                tree_missing = store.tree_missing_on_remote(entries[0].path.parent)
            except VersioningError as err:
                remote_note = f"(remote not checked: {err})"
        if tree_missing:
            remote_note = (
                f"the remote lacks tree {tree_missing} that checkpoints.dvc names: a clone can pull none of "
                f"these checkpoints; run `open360 ckpt push {args.run}`"
            )
    except (VersioningError, ValueError, FileNotFoundError) as err:
        return _fail("open360 ckpt list", err)
    rows = [("step", "tokens_seen", "loss", "size", "on_disk", "dvc", "pushed")]
    for e in entries:
        state = states[e.step]
        tokens = state.get("tokens_seen", metrics.get("tokens_seen", {}).get(e.step))
        loss = state.get("loss", metrics.get("loss", {}).get(e.step))
        if e.tracked is None:
            pushed = "-"
        elif e.tracked.path in missing:
            pushed = "yes" if missing[e.tracked.path] == 0 else f"no:{missing[e.tracked.path]}-missing"
        else:
            pushed = "?"
        rows.append(
            (
                str(e.step),
                "-" if tokens is None else f"{int(tokens):,}",
                "-" if loss is None else f"{float(loss):.4f}",
                _human(folder_size(e.path)) if e.local else "-",
                ("damaged" if "unreadable" in state else "yes") if e.local else "no",
                e.tracked.md5[:12] if e.tracked else "untracked",
                pushed,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for step, state in states.items():
        if "unreadable" in state:
            print(f"step {step} is damaged ({state['unreadable']}); check it with open360 ckpt lineage", file=sys.stderr)
    if remote_note:
        print(remote_note, file=sys.stderr)
    return 0


def pull_main(argv: Sequence[str]) -> int:
    """`open360 ckpt pull <run> <step|latest|all|~N>`: fetch exactly those checkpoints through DVC."""
    parser = argparse.ArgumentParser(prog="open360 ckpt pull", description=pull_main.__doc__)
    parser.add_argument("run")
    parser.add_argument("which", help="a step N, ~N (nearest to N), latest or all")
    _workspace_arg(parser)
    parser.add_argument("--remote", default=None, help="DVC remote (default: the default remote)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace local files that differ from checkpoints.dvc (repairs a damaged checkpoint)",
    )
    args = parser.parse_args(list(argv))
    try:
        paths = pull_checkpoints(Path(args.workspace), args.run, args.which, remote=args.remote, force=args.force)
    except (VersioningError, ValueError) as err:
        return _fail("open360 ckpt pull", err)
    for p in paths:
        print(p)
    return 0


def push_main(argv: Sequence[str]) -> int:
    """`python -m open360.tracking.cli push <run>`: add checkpoints missing from DVC, push what the remote lacks."""
    parser = argparse.ArgumentParser(prog="open360 ckpt push", description=push_main.__doc__)
    parser.add_argument("run")
    _workspace_arg(parser)
    parser.add_argument("--remote", default=None, help="DVC remote (default: the default remote)")
    args = parser.parse_args(list(argv))
    workspace = Path(args.workspace).expanduser().resolve()
    try:
        run_dir = run_dirs(workspace, args.run)[0]
    except ValueError as err:
        return _fail("open360 ckpt push", str(err))
    if not run_dir.is_dir():
        runs = sorted(p.name for p in (workspace / "checkpoints").iterdir() if p.is_dir()) \
            if (workspace / "checkpoints").is_dir() else []
        return _fail("open360 ckpt push", f"{run_dir}: no such run; runs here: {runs}")
    try:
        store = DvcWorkspace(workspace, remote=args.remote)
        added = push_pending(store, run_dir)
        lineages = _local_lineages(run_dir)
        shards = _recorded_shard_dirs(store, lineages)
        # recorded in checkpoints.dvc but not on disk (a folder deleted after a failed push): in DVC's cache
        gone = [(e.path, e.tracked) for e in run_checkpoints(workspace, args.run, store) if e.tracked and not e.local]
    except VersioningError as err:
        return _fail("open360 ckpt push", err)
    print(f"added {len(added)} checkpoint(s) to checkpoints.dvc {added} and pushed them")
    errors = []
    try:  # a run start whose shard push failed (remote down) only warned; DVC pushes them from its cache
        store.push([folder for folder, _ in shards])
    except VersioningError as err:
        errors.append(str(err))
    try:
        store.push_recorded([tracked for _, tracked in gone])
    except VersioningError as err:
        errors.append(str(err))
    cache_error = f" ({'; '.join(errors)})" if errors else ""
    try:
        missing = store.missing_on_remote([tracked for _, tracked in gone + shards]) if gone + shards else {}
    except VersioningError as err:
        return _fail("open360 ckpt push", f"checkpoints pushed, but the remote could not be checked: {err}")
    names = [tracked.path for _, tracked in shards]
    incomplete = {path: n for path, n in missing.items() if n}
    if incomplete:
        lacking = [f"{what} {found}" for what, found in (
            ("the run's checkpoints not on disk", sorted(p for p in incomplete if p not in names)),
            ("the run's shard folders", sorted(p for p in incomplete if p in names)),
        ) if found]
        return _fail(
            "open360 ckpt push",
            f"{' and '.join(lacking)} lack {sum(incomplete.values())} file(s) on the remote, which neither the "
            f"folders nor this workspace's DVC cache hold{cache_error}; push them from the workspace that wrote "
            "them (`dvc push <folder>`)",
        )
    if gone:
        print(f"pushed {[tracked.path for _, tracked in gone]} from DVC's cache (their folders are not on disk)")
    print(f"pushed the shards {names}; remote up to date")
    marked = _mark_pushed(workspace, lineages, {n: d.md5 for n, d in store.tracked_children(run_dir).items()})
    if marked:
        print(f"MLflow checkpoint records of steps {sorted(set(marked))} now say pushed")
    return 0


def _mark_pushed(workspace: Path, lineages: dict[int, dict[str, Any]], pushed_md5: dict[str, str]) -> list[int]:
    """Set `pushed` in the run's MLflow checkpoint records that a failed push left false, for the checkpoints
    just pushed (the MLflow run named by their lineage, in the workspace's store); a store that cannot be read
    is a warning: DVC, not the record, holds the truth (`ckpt list`)."""
    import json

    from open360.tracking import mlflow_records as mr
    from open360.tracking.mlflow_logger import RUN_ID_KEY, checkpoint_tag
    from open360.tracking.params import fit_tag

    uri = mr.workspace_uri(workspace)
    steps = set(lineages)
    run_ids = {str(i) for lin in lineages.values() if (i := (lin.get("callbacks") or {}).get(RUN_ID_KEY))}
    if uri is None or not run_ids:
        return []

    def update(client: Any) -> list[int]:
        marked = []
        for run_id in sorted(run_ids):
            for step, record in sorted(mr.checkpoint_records(client, run_id).items()):
                # only the record of the checkpoint just pushed: a superseded branch's record of the same
                # step number (another md5) stays as it was
                if (
                    record.get("pushed") is False
                    and step in steps
                    and record.get("dvc_md5") == pushed_md5.get(f"step_{step}")
                ):
                    value = fit_tag(json.dumps({**record, "pushed": True}, sort_keys=True))
                    client.set_tag(run_id, checkpoint_tag(step), value)
                    marked.append(step)
        return marked

    try:
        return mr.read_store(uri, update)
    except mr.StoreUnreadable as err:
        print(f"open360 ckpt push: warning: {err}; the records of a failed push still say pushed: false",
              file=sys.stderr)
        return []


def _local_lineages(run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> lineage of the run's local checkpoints (a damaged one is left out; `ckpt lineage` reports it)."""
    from open360.checkpoint import CheckpointError, read_lineage

    lineages = {}
    for step, path in local_steps(run_dir).items():
        try:
            lineages[step] = read_lineage(path)
        except CheckpointError:
            continue
    return lineages


def _recorded_shard_dirs(store: DvcWorkspace, lineages: dict[int, dict[str, Any]]) -> list[tuple[Path, Any]]:
    """(folder, DVC record) of the shard folders the run's local checkpoints trained on (a warm start's base
    included) that DVC records, whether or not they are still on this machine (DVC pushes from its cache)."""
    folders: set[Path] = set()
    for lineage in lineages.values():
        for entry in data_history(lineage) + inherited_data_history(lineage):
            if entry.get("shard_dir"):
                folders.add(store.workspace / entry["shard_dir"])
    recorded = []
    for folder in sorted(folders):
        try:
            recorded.append((folder, store.tracked(folder)))
        except VersioningError:  # not versioned (tracking.dvc was off, or another workspace's folder)
            continue
    return recorded


def lineage_report(path: Path, mlflow_uri: str | None = None) -> tuple[list[str], list[str], bool]:
    """(provenance lines, verification errors, anchored) of one checkpoint folder. lineage.json lists the
    sha256 of the other files, so it vouches only for itself: `anchored` says whether the folder was also
    matched against a record kept elsewhere (its DVC md5 in checkpoints.dvc, or the MLflow run's record)."""
    from open360.checkpoint import CheckpointError, read_lineage, verify_checkpoint

    path = Path(path).expanduser().resolve()
    errors: list[str] = []
    lines: list[str] = [f"checkpoint: {path}"]
    try:
        lineage = read_lineage(path)
    except CheckpointError as err:
        return lines, [str(err)], False
    try:
        verify_checkpoint(path)
        lines.append(f"sha256: {len(lineage.get('files', {}))} files match lineage.json")
    except CheckpointError as err:
        errors.append(str(err))
    code = lineage.get("code", {})
    lines += [
        f"run: {lineage.get('run_name')}   step: {lineage.get('step')}   tokens_seen: {lineage.get('tokens_seen')}",
        f"code revision: {code.get('revision')}{' (dirty)' if code.get('dirty') else ''}",
        f"config sha256: {lineage.get('config_hash')}   torch: {lineage.get('torch_version')}",
    ]
    if hardware := lineage.get("hardware"):
        lines.append(f"hardware (since the run last started): {describe_hardware(hardware)}")
    init = lineage.get("init_from") or {}
    if init:
        lines.append(f"warm-started from: {init.get('checkpoint')} (step {init.get('step')}, weights "
                     f"sha256 {init.get('model_sha256')})")
    for data in inherited_data_history(lineage):
        lines.append(
            f"data [{data.get('stage')}, base]: shards {data.get('shard_dir')}  manifest {data.get('manifest_hash')}  "
            f"steps {data.get('steps')} x batch {data.get('global_batch_size')}"
        )
    for data in data_history(lineage) or [{}]:
        lines.append(
            f"data [{data.get('stage')}]: shards {data.get('shard_dir')}  manifest {data.get('manifest_hash')}  "
            f"tokenizer {data.get('tokenizer_hash')}  steps {data.get('steps')}"
        )
    step = lineage.get("step")
    dvc_md5, anchored = None, False
    try:
        workspace = find_workspace(path)
        if is_dvc_workspace(workspace):
            tracked = DvcWorkspace(workspace).tracked(path)
            dvc_md5 = tracked.md5
            bad = dvc_mismatches(path, tracked.file_md5)
            errors += bad
            anchored = not bad
            lines.append(
                f"dvc md5: {dvc_md5} ({'verified' if not bad else 'MISMATCH'}, {tracked.nfiles} files)"
            )
        else:
            lines.append("dvc md5: - (workspace is not a DVC repository)")
    except (VersioningError, FileNotFoundError) as err:
        lines.append(f"dvc md5: - ({err})")
        workspace = None
    mlflow_lines, recorded = _mlflow_lines(lineage, step, workspace, mlflow_uri)
    lines += mlflow_lines
    if recorded:  # without a DVC record, what the files on disk hash to (computed only when needed)
        actual = dvc_md5 or folder_md5(path)
        if actual == recorded:
            anchored = anchored or not errors
        else:
            errors.append(
                f"the MLflow run records dvc_md5 {recorded} for step {step}, but the folder's files "
                f"(checkpoints.dvc, or the files on disk where it has no record) give {actual}: the "
                "checkpoint was re-saved or modified (lineage.json included) since it was logged"
            )
    return lines, errors, anchored


def _mlflow_lines(
    lineage: dict[str, Any], step: Any, workspace: Path | None, uri: str | None
) -> tuple[list[str], str | None]:
    """(lines on the checkpoint's MLflow run, the DVC md5 its checkpoint record holds, if any)."""
    from open360.tracking import mlflow_records as mr

    run_id = mr.lineage_run_id(lineage)
    if not isinstance(step, int):
        return [f"mlflow: - (lineage.json records no step: {step!r})"], None
    if not run_id:
        return ["mlflow: - (no mlflow_run_id in lineage.json; the run was not tracked)"], None
    recorded_uri = lineage.get("callbacks", {}).get("mlflow_tracking_uri")
    resolved = mr.workspace_uri(workspace, uri) if workspace is not None else uri
    resolved = resolved or (recorded_uri if recorded_uri and "***" not in recorded_uri else None)
    if resolved is None:
        return [f"mlflow: run {run_id} (no tracking store found; pass --mlflow-uri)"], None
    try:
        run, metrics, record = mr.read_store(
            resolved,
            lambda c: (c.get_run(run_id), mr.metrics_at(c, run_id, int(step)), mr.checkpoint_record(c, run_id, int(step))),
        )
    except mr.StoreUnreadable as err:
        return [f"mlflow: run {run_id} not readable: {err}"], None
    shown = "  ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))
    lines = [
        f"mlflow: run {run_id} ({run.info.run_name}, experiment {run.info.experiment_id}) in {mask_value(resolved)}",
        f"metrics at step {step}: {shown or '-'}",
    ]
    if record:
        lines.append(f"mlflow checkpoint record: {record}")
    return lines, (record or {}).get("dvc_md5")


def lineage_main(argv: Sequence[str]) -> int:
    """`open360 ckpt lineage <path>`: print a checkpoint's provenance and verify every hash."""
    parser = argparse.ArgumentParser(prog="open360 ckpt lineage", description=lineage_main.__doc__)
    parser.add_argument("path", help="a checkpoints/<run>/step_<N> folder")
    parser.add_argument(
        "--mlflow-uri", default=None, help="tracking URI (default: the workspace's mlflow.db)"
    )
    args = parser.parse_args(list(argv))
    lines, errors, anchored = lineage_report(Path(args.path), args.mlflow_uri)
    print("\n".join(lines))
    for err in errors:
        print(f"open360 ckpt lineage: FAILED: {err}", file=sys.stderr)
    if not errors:
        print(
            "verified: all hashes match"
            if anchored
            else "verified: the files match lineage.json only — no DVC record or MLflow checkpoint record was "
            "found to check lineage.json itself against (a rewritten lineage.json would pass); run it in the "
            "workspace, or pass --mlflow-uri"
        )
    return 1 if errors else 0


def export_main(argv: Sequence[str]) -> int:
    """`open360 ckpt export <run> --out DIR`: release folder (HF checkpoints ckpt_XXX, data, metrics, card)."""
    from open360.tracking.release import ReleaseError, export_release, push_release_to_hub

    parser = argparse.ArgumentParser(prog="open360 ckpt export", description=export_main.__doc__)
    parser.add_argument("run")
    parser.add_argument("--out", required=True, help="release folder to create")
    _workspace_arg(parser)
    parser.add_argument("--steps", default="all", help="all (default), latest, or comma-separated steps")
    parser.add_argument("--pull", action="store_true", help="dvc-pull checkpoints not on disk first")
    parser.add_argument("--remote", default=None, help="DVC remote --pull uses (default: the default remote)")
    parser.add_argument(
        "--mlflow-uri", default=None, help="tracking URI (default: the workspace's mlflow.db)"
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", default=None, help="upload to the Hugging Face Hub"
    )
    args = parser.parse_args(list(argv))
    try:
        out = export_release(
            Path(args.workspace),
            args.run,
            Path(args.out),
            args.steps,
            pull=args.pull,
            mlflow_uri=args.mlflow_uri,
            remote=args.remote,
        )
        print(f"release folder: {out}")
        if args.push_to_hub:
            push_release_to_hub(out, args.push_to_hub)
            print(f"uploaded to https://huggingface.co/{args.push_to_hub}")
    except (ReleaseError, VersioningError, ValueError) as err:
        return _fail("open360 ckpt export", err)
    return 0


if __name__ == "__main__":
    verbs = {
        "list": list_main,
        "pull": pull_main,
        "push": push_main,
        "lineage": lineage_main,
        "export": export_main,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in verbs:
        print(f"usage: python -m open360.tracking.cli {{{','.join(verbs)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(verbs[sys.argv[1]](sys.argv[2:]))
