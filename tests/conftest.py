"""Test setup: the Triton interpreter on CPU-only machines, and the per-backend `case` fixture.

On a CPU-only machine Triton runs under its interpreter (TRITON_INTERPRET=1, fp32, small shapes).
With ENGRAM_TEST_GPU=1 on a CUDA machine the cuda and triton backends run on the GPU, in bf16 and
fp16 too.
"""
import os

import pytest

import backend_cases
from engram_kernels import backends  # imports no triton: the variable below still takes effect

if not backend_cases.GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

CASES = backend_cases.backend_cases()


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def case(request):
    """Yields (backend, device) with that backend forced for the test."""
    backend, device = request.param
    with backends.use_backend(backend):
        yield backend, device
