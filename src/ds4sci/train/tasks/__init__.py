"""The built-in training tasks (``train.task``): one module per model family."""
