#!/usr/bin/env bash
# Prints a stamp of what a compiled extension depends on: the C++/CUDA sources, setup.py, and the
# Python and torch (version without its +cuXXX tag, CUDA version) of the interpreter given.
#
#   scripts/extension_stamp.sh [PYTHON]       (default python3; from anywhere)
#
# prebuild_gpu_extensions.sh writes it next to the binaries it builds; gpu_check.sh uses those
# binaries only when the stamp it computes on the GPU machine is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  find csrc/cpu csrc/cuda setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name 'setup.py' \) \
    | LC_ALL=C sort | xargs cat
  "${1:-python3}" -c 'import sys, torch; print(sys.version_info[:2], torch.__version__.split("+")[0], torch.version.cuda)'
} | sha256sum | cut -c1-16
