"""Checkpoint cadence: which completed steps get a published checkpoint, and which a recovery one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("every_n", "per_chunk", "log_spaced", "list")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class CadencePolicy:
    """Decides, for a count of completed optimizer steps, whether to save and where.

    `chunk_end_steps` (global step counts at which a data chunk has just been consumed) feed the
    `per_chunk` policy; the trainer adds each stage's boundaries when the stage opens. `save_final` publishes
    the run's last step and the last step of each stage in `stage_end_steps` (a multi-stage run such as
    CrystalCoder's keeps its stage transitions whatever the grid).
    """

    policy: str
    every: int = 1000
    log_spaced_until: int = 512
    steps: frozenset[int] = frozenset()
    ephemeral_every: int = 0
    keep_ephemeral: int = 1
    save_final: bool = True
    chunk_end_steps: set[int] = field(default_factory=set)
    stage_end_steps: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"checkpoint.policy={self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.policy in ("every_n", "log_spaced") and self.every <= 0:
            raise ValueError(f"checkpoint.every={self.every}: must be > 0 for policy={self.policy}")
        if self.log_spaced_until < 0 or any(s < 0 for s in self.steps):
            raise ValueError(
                f"checkpoint.log_spaced_until={self.log_spaced_until}, checkpoint.steps={sorted(self.steps)}: "
                "steps are counts of completed optimizer steps, >= 0"
            )
        if self.ephemeral_every < 0 or self.keep_ephemeral < 1:
            raise ValueError(
                f"checkpoint.ephemeral_every={self.ephemeral_every}, keep_ephemeral={self.keep_ephemeral}: "
                "expected ephemeral_every >= 0 (0 = off) and keep_ephemeral >= 1"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> CadencePolicy:
        """Build from a `checkpoint` config group (CheckpointConfig)."""
        return cls(
            policy=cfg.policy,
            every=int(cfg.every),
            log_spaced_until=int(cfg.log_spaced_until),
            steps=frozenset(int(s) for s in cfg.steps),
            ephemeral_every=int(cfg.ephemeral_every),
            keep_ephemeral=int(cfg.keep_ephemeral),
            save_final=bool(cfg.save_final),
        )

    def add_chunk_ends(self, steps: Iterable[int]) -> None:
        """Register global steps that end a data chunk (used by the per_chunk policy)."""
        self.chunk_end_steps.update(int(s) for s in steps)

    def is_published(self, step: int, final_step: int | None = None) -> bool:
        """True when completed step `step` gets a published checkpoint (`final_step`: the run's last)."""
        if self.save_final and (step == final_step or step in self.stage_end_steps):
            return True
        if self.policy == "every_n":
            return step > 0 and step % self.every == 0
        if self.policy == "per_chunk":
            return step in self.chunk_end_steps
        if self.policy == "log_spaced":
            if step == 0 or (step <= self.log_spaced_until and _is_power_of_two(step)):
                return True
            return step % self.every == 0
        return step in self.steps

    def is_ephemeral(self, step: int) -> bool:
        """True when completed step `step` gets a crash-recovery checkpoint (if not published anyway)."""
        return self.ephemeral_every > 0 and step > 0 and step % self.ephemeral_every == 0

    def published_steps(self, first: int, last: int) -> list[int]:
        """All published steps in [first, last], with `last` as the run's final step."""
        return [s for s in range(first, last + 1) if self.is_published(s, final_step=last)]
