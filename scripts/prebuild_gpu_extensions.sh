#!/usr/bin/env bash
# Builds the compiled extensions for the lent GPU machine here, without a GPU, so that
# scripts/gpu_check.sh can skip its build (~2 of its 15 minutes): Python 3.12, torch 2.11.0 (CUDA
# 13.0, what that machine has), sm_90, CPU code for x86-64-v3 (AVX2). Output: prebuilt/ (git-ignored;
# the device tool carries it with `carry: ["prebuilt"]`) with the six _C_*.so files, the timing-only
# _C_kvcache_ablation (scripts/kv_decode_probe.py --ablation; setup.py ENGRAM_KV_ABLATION=1) and STAMP
# (scripts/extension_stamp.sh). gpu_check.sh rebuilds there when the stamp or an import disagrees
# (without the ablation kernels: the probe then skips them).
#
#   scripts/prebuild_gpu_extensions.sh        (~10 min on 2 cores)
#
# Environment: VENV (default /opt/gpu211, created with PYTHON312 and torch==2.11.0 if missing),
# PYTHON312 (default the pyenv 3.12), CUDA_HOME (default /usr/local/cuda-13.0), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/opt/gpu211}
PYTHON312=${PYTHON312:-/root/.pyenv/versions/3.12.1/bin/python3.12}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0} TORCH_CUDA_ARCH_LIST=9.0 ENGRAM_CPU_ARCH=x86-64-v3
export MAX_JOBS=${MAX_JOBS:-2} PATH="$VENV/bin:$PATH"

if ! "$VENV/bin/python" -c "import torch, ninja, pybind11" 2>/dev/null; then
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 ninja pybind11 setuptools numpy
fi
rm -rf prebuilt build/prebuilt-*
mkdir -p prebuilt
for family in memory lora kvcache; do
  ENGRAM_FAMILIES=$family "$VENV/bin/python" setup.py -q build_ext \
    --build-temp "build/prebuilt-temp-$family" --build-lib "build/prebuilt-lib-$family"
done  # setup.py reports a failed extension and goes on: the count below catches it
ENGRAM_KV_ABLATION=1 "$VENV/bin/python" setup.py -q build_ext \
  --build-temp build/prebuilt-temp-ablation --build-lib build/prebuilt-lib-ablation
cp build/prebuilt-lib-*/engram_kernels/_C_*.so prebuilt/
strip --strip-debug prebuilt/*.so
n=$(ls prebuilt/*.so | wc -l)
[ "$n" -eq 7 ] || { echo "prebuild: $n of 7 extensions built" >&2; exit 1; }
scripts/extension_stamp.sh "$VENV/bin/python" >prebuilt/STAMP
ls -la prebuilt
echo "prebuilt: stamp $(cat prebuilt/STAMP), $(du -sh prebuilt | cut -f1)"
