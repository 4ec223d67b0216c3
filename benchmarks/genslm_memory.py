"""Longest trainable genslm-25m sequence in 20 GiB and tokens/s: ds4sci vs HF GPT-NeoX.

Same as ``ds4sci bench genslm-memory``; results go to ``benchmarks/results/genslm_memory_cpu.*``.
See ``ds4sci.bench.genslm_memory``.
"""

import sys

from ds4sci.bench.genslm_memory import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
