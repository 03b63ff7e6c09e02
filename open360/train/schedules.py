"""Learning-rate schedules (cosine, linear, constant, warmup-stable-decay) and multi-stage runs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KINDS = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class Schedule:
    """LR multiplier over one stage of `total_steps` optimizer steps (step index 0-based)."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_steps: int | None = None  # linear/cosine: the decay's length after warmup (None: to the stage's end)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.total_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(
                f"schedule: warmup_steps={self.warmup_steps}, total steps={self.total_steps}: "
                "expected total > 0 and warmup >= 0"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(
                f"schedule: min_lr_ratio={self.min_lr_ratio}, decay_fraction={self.decay_fraction}: "
                "both must lie in [0, 1]"
            )
        if self.decay_steps is not None and (self.kind not in ("linear", "cosine") or self.decay_steps <= 0):
            raise ValueError(
                f"schedule: decay_steps={self.decay_steps} with kind={self.kind!r}: the length of a linear or "
                "cosine decay after warmup, > 0 (null: the decay ends with the stage)"
            )

    def factor(self, step: int) -> float:
        """Multiplier of the stage's peak LR for the optimizer step with 0-based index `step`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        floor = self.min_lr_ratio
        if self.kind == "wsd":
            decay_steps = round(self.decay_fraction * self.total_steps)
            if self.decay_fraction > 0:
                decay_steps = max(1, decay_steps)  # a decay phase asked for is at least one step
            if decay_steps == 0:  # decay_fraction 0: warmup-stable, no decay
                return 1.0
            decay_start = max(self.warmup_steps, self.total_steps - decay_steps)
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start + 1) / max(1, self.total_steps - decay_start))
            return 1.0 - (1.0 - floor) * progress
        span = self.decay_steps or max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps + 1) / span)
        if self.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - floor) * progress


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its data recipe, global step range [start, end), peak LR and schedule."""

    index: int
    name: str
    recipe: str
    start: int
    steps: int
    lr: float
    schedule: Schedule
    fresh_optimizer: bool = False  # the optimizer state restarts at the stage's first step

    @property
    def end(self) -> int:
        return self.start + self.steps


STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def build_stages(cfg: object) -> list[Stage]:
    """The run's stages from `cfg.stages`, or one implicit stage from cfg.data/schedule/trainer.max_steps.

    Runs stop at `trainer.max_steps`: stages past it are dropped and the last one is cut short
    (its schedule still spans the stage's configured length, so a cut run matches the full one).
    """
    max_steps = int(cfg.trainer.max_steps)
    if max_steps <= 0:
        raise ValueError(f"trainer.max_steps={max_steps}: must be > 0")
    specs = []
    if cfg.stages:
        names = [str(st.name) for st in cfg.stages]
        for i, name in enumerate(names):
            if not STAGE_NAME.fullmatch(name):  # it goes into MLflow tag keys and messages
                raise ValueError(
                    f"stages.{i}.name={name!r}: use letters, digits, '_', '.' and '-' only (e.g. 'pretrain')"
                )
            if name in names[:i]:  # resume checks, lineage and MLflow stage tags find a stage by its name
                raise ValueError(f"stages.{i}.name={name!r}: stage {names.index(name)} has that name too; names must differ")
        for i, st in enumerate(cfg.stages):
            if int(st.steps) <= 0:
                raise ValueError(f"stages.{i}.steps={st.steps} (stage {st.name!r}): must be > 0")
            lr = float(cfg.optim.lr if st.lr is None else st.lr)
            if not math.isfinite(lr) or lr < 0:
                key = "optim.lr" if st.lr is None else f"stages.{i}.lr"
                raise ValueError(f"{key}={lr} (stage {st.name!r}): the peak learning rate must be >= 0 and finite")
            specs.append((st.name, st.recipe, int(st.steps), lr, st.schedule, bool(st.fresh_optimizer)))
        total = sum(spec[2] for spec in specs)
        if max_steps > total:
            raise ValueError(
                f"trainer.max_steps={max_steps} exceeds the {total} steps of `stages`; the run would stop at "
                f"{total}: set trainer.max_steps<={total} or lengthen a stage"
            )
    else:
        if not math.isfinite(float(cfg.optim.lr)) or float(cfg.optim.lr) < 0:
            raise ValueError(f"optim.lr={cfg.optim.lr}: the peak learning rate must be >= 0 and finite")
        specs.append(("main", cfg.data.recipe, max_steps, float(cfg.optim.lr), cfg.schedule, False))
    stages, start = [], 0
    for i, (name, recipe, steps, lr, sched, fresh_optimizer) in enumerate(specs):
        if start >= max_steps:
            break
        try:
            schedule = Schedule(
                kind=sched.kind,
                total_steps=steps,
                warmup_steps=int(sched.warmup_steps),
                min_lr_ratio=float(sched.min_lr_ratio),
                decay_fraction=float(sched.decay_fraction),
                decay_steps=None if sched.get("decay_steps") is None else int(sched.decay_steps),
            )
        except ValueError as err:  # a stage's own schedule: name its key, not the unused top-level `schedule`
            if not cfg.stages:
                raise
            raise ValueError(f"stages.{i}.{err} (stage {name!r})") from err
        stages.append(Stage(i, name, recipe, start, min(steps, max_steps - start), lr, schedule, fresh_optimizer))
        start += steps
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that runs the optimizer step with 0-based global index `step`."""
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    raise ValueError(f"step {step} lies outside every stage (the run has {stages[-1].end} steps)")


def lr_at(stages: list[Stage], step: int) -> float:
    """Peak-relative LR (before per-group muP scaling) for the 0-based global step `step`."""
    stage = stage_at(stages, step)
    return stage.lr * stage.schedule.factor(step - stage.start)
