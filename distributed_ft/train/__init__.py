"""The training loop, evaluation, prediction and checkpoints."""
