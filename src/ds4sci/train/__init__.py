"""Training: typed config, trainer loop, atomic checkpoints, metrics."""
