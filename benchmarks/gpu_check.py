"""Evoformer attention on a GPU: correctness at real sizes, then fwd+bwd time and memory of
the Triton and torch backends, naive PyTorch, SDPA and compiled FlexAttention.

Results: ``benchmarks/results/evoformer_attention_gpu.{json,csv,md,png}``. See
``ds4sci.bench.gpu_check``; ``benchmarks/gpu_check.sh`` also runs the unit tests on CUDA.
"""

import sys

from ds4sci.bench.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
