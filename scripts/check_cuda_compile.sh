#!/usr/bin/env bash
# Compile and link every CUDA extension (csrc/cuda/<family>.cu + <family>_bindings.cpp ->
# _C_<family>_cuda, and the timing-only csrc/cuda/kvcache_ablation.cu) with nvcc against a CUDA build of
# torch kept in its own venv. Needs no GPU. Exits non-zero on any compile or link error; compiler
# warnings are shown but do not fail the check.
#
# Environment (all optional):
#   VENV                  venv holding a CUDA torch (created if missing)   default /opt/cudatorch
#   TORCH_SPEC            torch requirement for a new venv                 default torch==2.14.1
#   CUDA_HOME             CUDA toolkit root (nvcc = $CUDA_HOME/bin/nvcc)    default /usr/local/cuda
#   TORCH_CUDA_ARCH_LIST  target GPUs                                       default "8.0;9.0"
#   BUILD_DIR             ninja build directory (kept: reruns are incremental) default /tmp/engram_cuda_build
#   MAX_JOBS              parallel compile jobs                             default 2
#   SKIP_ABLATION=1       leave out kvcache_ablation.cu (timing-only kernels: ~4 min on 2 cores)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-/opt/cudatorch}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
BUILD_DIR=${BUILD_DIR:-/tmp/engram_cuda_build}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, ninja" 2>/dev/null; then
  echo "== creating $VENV with $TORCH_SPEC"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install "$TORCH_SPEC" ninja pybind11 setuptools numpy
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "error: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi
export PATH="$VENV/bin:$PATH"  # ninja
mkdir -p "$BUILD_DIR"

start=$(date +%s)
status=0
ROOT="$ROOT" BUILD_DIR="$BUILD_DIR" "$VENV/bin/python" - <<'PY' || status=$?
import os
import sys

import torch
from torch.utils import cpp_extension

root, build_dir = os.environ["ROOT"], os.environ["BUILD_DIR"]
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={cpp_extension.CUDA_HOME}, "
      f"arch list {os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
cuda = os.path.join(root, "csrc/cuda")
builds = {f"_C_{f}_cuda": [f"{f}_bindings.cpp", f"{f}.cu"] for f in ("memory", "lora", "kvcache")
          if os.path.exists(os.path.join(cuda, f"{f}.cu"))}
if os.environ.get("SKIP_ABLATION") != "1" and os.path.exists(os.path.join(cuda, "kvcache_ablation.cu")):
    builds["_C_kvcache_ablation"] = ["kvcache_ablation.cu"]
failed = []
for name, sources in builds.items():
    directory = os.path.join(build_dir, name.removeprefix("_C_").removesuffix("_cuda"))
    os.makedirs(directory, exist_ok=True)
    try:
        # load() compiles both objects, links the module and imports it (import needs no GPU): a
        # missing symbol fails here rather than on the GPU machine.
        module = cpp_extension.load(
            name=name,
            sources=[os.path.join(cuda, source) for source in sources],
            build_directory=directory,
            extra_cflags=["-O3", "-Wall"],
            extra_cuda_cflags=["-O3", "-lineinfo", "-Xptxas=-warn-spills", "-Xcompiler=-Wall"],
            verbose=True,
        )
    except Exception as exc:
        print(f"FAILED {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        failed.append(name)
        continue
    functions = sorted(n for n in dir(module) if not n.startswith("_"))
    print("built", module.__file__, "exporting", ", ".join(functions), flush=True)
sys.exit(1 if failed else 0)
PY
echo "elapsed: $(( $(date +%s) - start )) s"
if [ "$status" -ne 0 ]; then
  echo "check_cuda_compile: FAILED" >&2
  exit "$status"
fi
echo "check_cuda_compile: OK"
