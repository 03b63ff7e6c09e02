"""The `open360` command: dispatches non-training verbs (data, ckpt, analysis) to their modules."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# "<group> <verb>": ("module", "function taking argv"), imported only when used.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data build": ("open360.data.cli", "build_main", "build the token shards of a data recipe"),
    "data batch": ("open360.data.cli", "batch_main", "print the exact token batch of a training step"),
    "data seen": ("open360.data.cli", "seen_main", "sequence ids seen up to a training step"),
    "data verify": ("open360.data.cli", "verify_main", "re-hash a shard folder against its manifest"),
    "ckpt list": ("open360.tracking.cli", "list_main", "list the checkpoints of a run"),
    "ckpt pull": ("open360.tracking.cli", "pull_main", "fetch checkpoints of a run through DVC"),
    "ckpt push": ("open360.tracking.cli", "push_main", "add and push checkpoints missing from the DVC remote"),
    "ckpt lineage": ("open360.tracking.cli", "lineage_main", "print and verify a checkpoint's provenance"),
    "ckpt export": ("open360.tracking.cli", "export_main", "export a run as a release folder (HF format)"),
    "analysis memorization": (
        "open360.analysis.memorization",
        "main",
        "memorization scores over checkpoints x chunks",
    ),
    "analysis evaluate": ("open360.analysis.evaluate", "main", "validation loss and lm-eval tasks per checkpoint"),
    "analysis compare": ("open360.analysis.compare", "main", "loss vs tokens, FLOPs and wall-clock of runs"),
    "analysis long-context": (
        "open360.analysis.long_context",
        "main",
        "PI fine-tuning and long-context perplexity/passkey",
    ),
}


def usage() -> str:
    lines = ["usage: open360 <group> <verb> [args]   (each verb takes --help)", "", "verbs:"]
    lines += [f"  open360 {name:<24} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "training: python -m open360.train +experiment=<name> [overrides]"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    groups = sorted({c.split()[0] for c in COMMANDS})
    if not args or args[0] not in groups:
        what = f"unknown command group '{args[0]}' (groups: {', '.join(groups)})" if args else "no command given"
        print(f"open360: {what}\n\n{usage()}", file=sys.stderr)
        return 2
    if len(args) < 2 or args[1] in ("-h", "--help"):  # `open360 <group> [--help]`: that group's verbs
        text = "\n".join(line for line in usage().splitlines() if not line.startswith("  open360 ")
                         or line.split()[1] == args[0])
        if len(args) < 2:
            print(f"open360 {args[0]}: no verb given\n\n{text}", file=sys.stderr)
            return 2
        print(text)
        return 0
    name = f"{args[0]} {args[1]}"
    if name not in COMMANDS:
        print(f"open360: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(args[2:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
