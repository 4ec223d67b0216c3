"""Sequence-parallel scaling of genslm-25m training over 1, 2, 4 gloo processes: longest trainable
sequence per process in the budget, step time, attention communication vs theory, ds4sci
Ulysses and ring vs DeepSpeed-Ulysses' DistributedAttention.

Same as ``ds4sci bench parallel-scaling``; results go to ``benchmarks/results/parallel_scaling_cpu.*``.
See ``ds4sci.bench.parallel``.
"""

import sys

from ds4sci.bench.parallel import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
