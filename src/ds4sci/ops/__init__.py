"""Operators: each one is ``reference.py`` (fp32 truth) + one file per backend + ``dispatch.py``."""
