"""Tracking callbacks: MLflow metrics, DVC versioning of shards and checkpoints, lineage."""
