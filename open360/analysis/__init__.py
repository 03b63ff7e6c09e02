"""Analysis across checkpoints: memorization, evaluation curves, run comparison."""
