#!/usr/bin/env bash
# One command on a CUDA machine (< 15 minutes on an H100/H200), from anywhere in the repo:
#   1. the Triton backend's unit tests compiled on CUDA (tiny shapes, every case; <= 150 s),
#   2. correctness at DeepSpeed's test shapes vs the fp64 truth, then the fwd+bwd benchmark of
#      triton / torch backend / naive / SDPA / compiled FlexAttention in bf16 and fp16
#      (starts no new case after --budget-s; results in benchmarks/results/evoformer_attention_gpu.*),
#   3. every other CUDA-only test of the suite (skipped on CPU machines; <= 120 s), among them
#      the force-field MD step replayed as a CUDA graph vs eager (test_cuda_graph_step_equals_eager),
#   4. DiG's protein-scale sampling/training steps on the GPU at 256 and 1,024 residues, bf16
#      (benchmarks/results/gpu/dig_cuda.*; written for a GPU session, not yet run on one),
#   5. DiG sampling throughput and quality on alanine dipeptide on the GPU: the committed v3
#      checkpoint, 20,000 samples, bf16 autocast + compiled step replayed as a CUDA graph, Heun-10
#      and EDM-10 (benchmarks/results/gpu/dig_ala2_samplers_cuda.*; not yet run on a GPU).
# Extra arguments go to step 2 (e.g. --shapes ds-test-256 --dtypes bfloat16).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 2
status=0
timeout 150 python3 -m pytest -q tests/test_evoformer_attention_triton.py -k "cuda" -p no:cacheprovider
rc=$?
if [ $rc -eq 124 ]; then
  echo "gpu_check: unit tests cut off after 150 s (kernel compilation); run them alone:" \
       "python3 -m pytest -q tests/test_evoformer_attention_triton.py -k cuda"
elif [ $rc -ne 0 ]; then
  status=1
fi
python3 -m ds4sci.bench.gpu_check --budget-s 240 "$@" || status=1
timeout 120 python3 -m pytest -q tests -k "cuda" --ignore=tests/test_evoformer_attention_triton.py -p no:cacheprovider
rc=$?
[ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1   # 5: nothing selected
timeout 300 python3 -m ds4sci.bench.dig --device cuda --residues 256 1024 --timeout 120 --out benchmarks/results/gpu || status=1
timeout 240 python3 -m ds4sci.bench.dig_quality \
  --checkpoint benchmarks/results/dig_ala2_cpu_v3/dig_ala2.pt --device cuda --bf16 --compile \
  --settings heun:10 edm:10 --num-samples 20000 --batch-size 10000 --md-seconds 0 \
  --out benchmarks/results/gpu --stem dig_ala2_samplers_cuda || status=1
exit $status
