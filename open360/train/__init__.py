"""Training: the Hydra entry point, the trainer, optimizer groups, LR schedules and resume state."""
