"""Memorization analysis (LLM360 / Pythia): greedy k-extractability over checkpoints x data chunks."""

from open360.analysis.memorization.engine import (
    MODES,
    MemorizationScorer,
    ScoreResult,
    greedy_continuation,
    match_counts,
    teacher_forced_predictions,
)
from open360.analysis.memorization.job import MemorizationJobConfig, main, parse_args, run_job
from open360.analysis.memorization.sampling import chunk_offsets, sample_rows, seen_rows

__all__ = [
    "MODES",
    "MemorizationJobConfig",
    "MemorizationScorer",
    "ScoreResult",
    "chunk_offsets",
    "greedy_continuation",
    "main",
    "match_counts",
    "parse_args",
    "run_job",
    "sample_rows",
    "seen_rows",
    "teacher_forced_predictions",
]
