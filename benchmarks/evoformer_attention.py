"""Evoformer attention fwd+bwd: ds4sci vs naive PyTorch vs SDPA, peak memory and time.

Same as ``ds4sci bench evoformer-attention``; results go to ``benchmarks/results/``
(``evoformer_attention_cpu.{json,csv,png}``). See ``ds4sci.bench.evoformer_attention``.
"""

import sys

from ds4sci.bench.evoformer_attention import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
