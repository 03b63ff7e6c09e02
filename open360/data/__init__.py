"""Data recipes to deterministic token shards, and the loader that replays their exact order."""
