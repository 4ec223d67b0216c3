"""One ClimaX training step at 5.625 deg .. 0.25 deg: peak memory and time, ours vs ClimaX's code path.

Same as ``python -m ds4sci.bench.climax_memory``; results go to ``benchmarks/results/climax_memory_*``.
See ``ds4sci.bench.climax_memory``.
"""

import sys

from ds4sci.bench.climax_memory import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
