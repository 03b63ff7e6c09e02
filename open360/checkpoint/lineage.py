"""Provenance recorded in every checkpoint's lineage.json: code revision, config and data hashes."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from open360.paths import REPO_ROOT

# Keys that may differ between an original run and its resumption, or between machines (where the workspace
# and its shards live), without changing what is trained.
# trainer.init_from is a path of this machine, and a resume may leave it out: the lineage's `init_from` record
# (the base checkpoint's run, step and weights sha256) says what the run started from
_CONFIG_HASH_EXCLUDED = (
    ("trainer", "resume"), ("trainer", "progress_bar"), ("trainer", "init_from"), ("workspace",), ("data", "shards_dir")
)


def git_revision(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """`{"revision": sha or None, "dirty": bool or None}` of the code that runs (dirty: a tracked file
    other than DVC's `*.dvc` and `.gitignore` files differs from the commit)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        status = subprocess.run(  # DVC's own files (*.dvc, the .gitignores it writes) are data, not code
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude,glob)**/*.dvc", ":(exclude,glob)**/.gitignore"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev, "dirty": bool(status.strip())}


def hardware_record(device: torch.device, world_size: int) -> dict[str, Any]:
    """What runs the steps: the process count, the device kind and model (on CPU the instruction set torch's
    kernels use, and its thread count), and torch's CUDA version. The weights are bitwise reproducible on one
    kind of hardware, not across kinds, world sizes or (on CPU) kernel instruction sets."""
    cuda = device.type == "cuda"
    return {
        "world_size": int(world_size),
        "device": device.type,
        "accelerator": torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}",
        "cuda": torch.version.cuda if cuda else None,
        "cpu_threads": None if cuda else torch.get_num_threads(),
    }


def describe_hardware(hardware: dict[str, Any]) -> str:
    """`2 x NVIDIA H200 (cuda 12.4)`, `1 x x86_64 AVX512 (cpu, 2 threads)`."""
    detail = f" {hardware['cuda']}" if hardware.get("cuda") else ""
    detail += f", {hardware['cpu_threads']} threads" if hardware.get("cpu_threads") else ""
    return f"{hardware.get('world_size')} x {hardware.get('accelerator')} ({hardware.get('device')}{detail})"


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved config as canonical JSON, ignoring keys that only steer resumption."""
    cfg = json.loads(json.dumps(config, sort_keys=True, default=str))
    for *groups, key in _CONFIG_HASH_EXCLUDED:
        node = cfg
        for group in groups:
            node = node.get(group) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def data_history(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint lineage's data entries, one per stage it trained (older lineages hold one `data`)."""
    return lineage.get("data_history") or ([lineage["data"]] if lineage.get("data") else [])


def inherited_data_history(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """The data entries of the checkpoint a warm-started run began from (`init_from`), its own warm start's
    first: what the weights had trained on before this run. Each entry carries its run's global batch size."""
    return list((lineage.get("init_from") or {}).get("data_history") or [])


def trained_data_history(lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """Every data entry the checkpoint's weights trained on: inherited through warm starts, then its own."""
    return [*inherited_data_history(lineage), *data_history(lineage)]


def history_to_inherit(lineage: dict[str, Any], global_batch_size: int) -> list[dict[str, Any]]:
    """What a run warm-started from a checkpoint with this lineage records as inherited: the checkpoint's
    inherited entries and its own, each with the global batch size its order was replayed with."""
    own = [{"global_batch_size": int(global_batch_size), **entry} for entry in data_history(lineage)]
    return [*inherited_data_history(lineage), *own]
