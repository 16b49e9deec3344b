"""Training: an update of one adapter from interactions, its evaluation and its gate (docs/TRAINING.md)."""
