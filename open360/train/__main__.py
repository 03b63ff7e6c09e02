"""`python -m open360.train +experiment=<name>`: compose the config, check resources, train."""

from __future__ import annotations

import errno
import re
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from open360.config import register_configs
from open360.config.schema import resume_is_off
from open360.config.store import ConfigKeyError, check_schema
from open360.credentials import holds_credentials, mask_value
from open360.paths import CONFIGS_DIR
from open360.train.resources import ResourceError, check_resources
from open360.train.validate import check_training_config

register_configs()


def _stop_on_sigterm() -> None:
    """SIGTERM (what schedulers send on preemption) ends the run like Ctrl-C: the callbacks run their end
    (MLflow: buffered metrics written, run marked KILLED), saved checkpoints stay, resume=auto continues."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def check_stage_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """With `stages`, each stage names its own recipe and schedule: a command-line `schedule...` or
    `data`/`data.recipe` override would be ignored without a word (and the published config.yaml would name
    the wrong data), so it is refused, naming the stage keys."""
    if not cfg.stages:
        return
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in ("schedule", "data", "data.recipe") or key.startswith("schedule."):
            raise ValueError(
                f"{override}: this experiment trains in `stages`, each with its own recipe and schedule, so "
                f"{key} would be ignored; override stages.<i>.recipe / stages.<i>.schedule.* instead"
            )


def anchor_relative_paths(cfg: DictConfig) -> None:
    """Under `hydra.job.chdir=true` the job runs in Hydra's output folder: the relative paths of the command
    line (workspace, trainer.init_from, a trainer.resume path) are made absolute against where it was typed."""
    from hydra.utils import get_original_cwd

    def anchored(value: str) -> str:
        path = Path(value).expanduser()
        return value if path.is_absolute() else str(Path(get_original_cwd()) / path)

    cfg.workspace = anchored(str(cfg.workspace))
    if cfg.trainer.init_from:
        cfg.trainer.init_from = anchored(str(cfg.trainer.init_from))
    resume = str(cfg.trainer.resume).strip()
    if not resume_is_off(resume) and resume != "auto" and not resume.isdigit():
        cfg.trainer.resume = anchored(resume)


@hydra.main(config_path=str(CONFIGS_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().job.chdir:
        anchor_relative_paths(cfg)
    try:
        check_schema(cfg)
        check_stage_overrides(cfg, list(HydraConfig.get().overrides.task))
        from open360.models.decoder import as_model_config

        as_model_config(cfg.model)  # model values out of range fail here, before the memory estimate divides by them
        check_training_config(cfg)
        device = check_resources(cfg)
    except (ResourceError, ConfigKeyError, ValueError) as err:
        print(f"open360.train: {err}", file=sys.stderr)
        sys.exit(2)
    from open360.checkpoint import CheckpointError
    from open360.tracking.dvc_versioning import VersioningError
    from open360.tracking.mlflow_logger import TrackingError
    from open360.train.pipeline import run_training
    from open360.train.trainer import TrainingError

    init_from = Path(cfg.trainer.init_from) if cfg.trainer.init_from else None
    _stop_on_sigterm()
    try:
        run_training(cfg, device=device, init_from=init_from)
    except KeyboardInterrupt as err:
        why = "SIGTERM" if str(err).startswith("signal") else "interrupted"
        print(
            f"open360.train: stopped ({why}); saved checkpoints are intact — continue with trainer.resume=auto",
            file=sys.stderr,
        )
        sys.exit(143 if why == "SIGTERM" else 130)
    except (TrainingError, CheckpointError, TrackingError, VersioningError) as err:
        print(f"open360.train: {err}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # a full disk while the shards are built
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"open360.train: no space left on the device ({err}); what was saved is kept — free space and run "
              "again (with trainer.resume=auto if the run saved checkpoints)", file=sys.stderr)
        sys.exit(1)
    except ValueError as err:  # a config value out of range (checkpoint.every=0, schedule.kind=foo, ...)
        print(f"open360.train: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


# Hydra flags that print or inspect without running the job: nothing of theirs is checked here.
NO_RUN_FLAGS = ("-h", "--help", "--hydra-help", "--version", "-i", "--info", "-sc", "--shell-completion",
                "--experimental-rerun")


def check_before_hydra(argv: list[str]) -> None:
    """Run the config checks before Hydra starts: `--cfg job|all` prints the composed config without running
    the job (so without its checks), and a run's Hydra first writes outputs/<run_name>/<time>/ (its .hydra/
    record of the overrides), where a run_name such as ../../x reaches outside the workspace and a
    credential in tracking.mlflow_uri would be saved in the clear. A misspelt key, an out-of-range value or
    a bad run_name fails here, before anything is written."""
    if any(a in NO_RUN_FLAGS for a in argv):
        return
    printing = any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if printing and multirun:
        print("open360.train: --cfg prints one job's config and Hydra takes one of --multirun and --cfg: drop -m "
              "and give one value per key", file=sys.stderr)
        sys.exit(2)
    if multirun:  # Hydra writes each job's .hydra/ (overrides and config) before main() runs: no credential
        # may reach it (the jobs' other checks follow, as for one run)
        secret = next((a for a in argv if holds_credentials(a)), None)
        if secret is not None:
            print(f"open360.train: {mask_value(secret)}: holds credentials, which Hydra would save in the clear "
                  "under multirun/; give the URI without them and set them in the environment", file=sys.stderr)
            sys.exit(2)
    from hydra.errors import HydraException

    from open360.config import compose
    from open360.models.decoder import as_model_config

    takes_value = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                   "--config-dir", "-cd"}
    overrides = [
        a
        for i, a in enumerate(argv)
        if not a.startswith("-") and (i == 0 or argv[i - 1] not in takes_value) and not a.startswith("hydra")
    ]

    def flag(*names: str) -> str | None:  # the value of `-cn x` / `--config-name=x` (the last one given)
        found = None
        for i, a in enumerate(argv):
            for name in names:
                if a == name and i + 1 < len(argv):
                    found = argv[i + 1]
                elif a.startswith(name + "="):
                    found = a.split("=", 1)[1]
        return found

    if flag("--config-path", "-cp") is not None or any(a.startswith("hydra.searchpath") for a in argv):
        return  # a primary config or search path composed only by Hydra itself: main() checks it
    config_dir = flag("--config-dir", "-cd")
    search = [f"hydra.searchpath=[file://{Path(config_dir).expanduser().resolve()}]"] if config_dir else []
    # a sweep: every job is checked now, so a bad value of its third job does not stop it after two trained
    jobs = sweep_jobs(overrides) if multirun else [overrides]
    try:
        for job in jobs:
            cfg = compose(search + job, config_name=flag("--config-name", "-cn") or "config")
            check_stage_overrides(cfg, job)
            as_model_config(cfg.model)
            check_training_config(cfg)
            if not printing:  # `--cfg job` of a full-size experiment prints on any machine
                check_resources(cfg)
    except (HydraException, ConfigKeyError, ResourceError, ValueError) as err:
        message = str(err).strip()
        cause = err.__cause__
        stage = (re.match(r"Error merging override \+?(stages\.(\d+)\.\S+)", message)
                 if isinstance(err, HydraException) else None)
        count = _stage_count(search + job, flag("--config-name", "-cn")) if stage else None
        if count is not None and int(stage.group(2)) >= count:  # OmegaConf: "dict is not a subclass of StageConfig"
            message = (f"{stage.group(1)}: this experiment has no stage {stage.group(2)} "
                       + (f"(its stages are stages.0 to stages.{count - 1})" if count else "(it has no `stages`)"))
        elif isinstance(err, HydraException) and cause is not None and str(cause).strip():
            message += f": {str(cause).strip().splitlines()[0]}"  # the why: "Value '1.5' ... to Integer"
        if multirun and len(jobs) > 1:
            message = f"sweep job {' '.join(job)}: {message}"
        print(f"open360.train: {message}", file=sys.stderr)
        sys.exit(2)


def _stage_count(overrides: list[str], config_name: str | None) -> int | None:
    """The number of stages the experiment of `overrides` has without their `stages.*` ones; None when the
    others do not compose either (the error then names the override Hydra stopped at)."""
    from hydra.errors import HydraException

    from open360.config import compose

    others = [o for o in overrides if not o.lstrip("+~").startswith("stages.")]
    try:
        return len(compose(others, config_name=config_name or "config").stages)
    except HydraException:
        return None


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of each job of a `-m` sweep (`key=a,b` and range(...) expanded as Hydra's basic sweeper
    does); none when a sweep needs more than Hydra's parser (glob, an interval): main() checks its jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    except HydraException:
        return []
    return jobs


if __name__ == "__main__":
    check_before_hydra(sys.argv[1:])
    main()
