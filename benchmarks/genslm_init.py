"""Memory per rank to set up a sharded GenSLM: meta-device initialisation vs whole-then-shard.

Same as ``ds4sci bench genslm-init``; results go to ``benchmarks/results/genslm_init_cpu.*``.
See ``ds4sci.bench.genslm_init``.
"""

import sys

from ds4sci.bench.genslm_init import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
