"""Scientific models: plain PyTorch ``model.py`` + ``config.py``; parallelism lives elsewhere."""
