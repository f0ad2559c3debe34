#!/usr/bin/env bash
# The GPU checks of docs/performance.md (section GPU) in one run, for a machine with an
# NVIDIA GPU and a CUDA build of torch with triton: the Triton kernel tests compiled for the
# GPU, the gpu-marked tests (parity with transformers, CUDA graphs, one sync per step), then
# `tokenmill bench gpu`. Everything it prints is also written to OUTPUT_DIR.
#
#   scripts/gpu_checks.sh [OUTPUT_DIR]      (default: gpu-results)
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/model/test_triton_kernels.py tests/model/test_cuda_gpu.py \
  2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m tokenmill bench gpu --output "$out/performance.md" 2>&1 | tee "$out/bench-gpu.log"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc" | tee -a "$out/versions.txt"
exit $(( tests_rc || bench_rc ))
