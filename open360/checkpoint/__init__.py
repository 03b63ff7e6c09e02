"""Checkpoint format, atomic save/load, and cadence policies."""
