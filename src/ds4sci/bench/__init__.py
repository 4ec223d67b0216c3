"""Benchmarks shipped with the package (``ds4sci bench ...``); scripts in ``benchmarks/`` call these."""
