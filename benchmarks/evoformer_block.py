"""One EvoformerBlock / ExtraMSABlock training step: ds4sci attention vs naive, memory and time.

Same as ``ds4sci bench evoformer-block``; results go to ``benchmarks/results/``
(``evoformer_block_cpu.{json,csv,png}``). See ``ds4sci.bench.evoformer_block``.
"""

import sys

from ds4sci.bench.evoformer_block import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
