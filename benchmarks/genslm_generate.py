"""GenSLM generation speed: ds4sci's KV cache vs no cache vs HF GPT-NeoX's cached generate.

Same as ``ds4sci bench genslm-generate``; results go to ``benchmarks/results/genslm_generate_cpu.*``.
See ``ds4sci.bench.genslm_generate``.
"""

import sys

from ds4sci.bench.genslm_generate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
