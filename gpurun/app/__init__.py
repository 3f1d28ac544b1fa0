"""The workflows: launch, status, logs, checkpoints, teardown, init."""
