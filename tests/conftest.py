"""Test setup: which (backend, device) pairs run, and shared helpers.

On a CPU-only machine Triton runs under its interpreter (TRITON_INTERPRET=1, fp32, small shapes).
With ENGRAM_TEST_GPU=1 on a CUDA machine the cuda and triton backends run on the GPU, in bf16 and
fp16 too.
"""
import os

import torch

GPU = os.environ.get("ENGRAM_TEST_GPU") == "1" and torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402

from engram_kernels import backends  # noqa: E402


def backend_cases():
    """(backend, device) pairs available here; the interpreter pairs are marked for small shapes."""
    cases = [("torch", "cpu")]
    if backends.is_available("cpu", "cpu"):
        cases.append(("cpu", "cpu"))
    if not GPU and backends.is_available("triton", "cpu"):
        cases.append(("triton", "cpu"))
    if GPU:
        cases += [(name, "cuda") for name in ("torch", "cuda", "triton") if backends.is_available(name, "cuda")]
    return cases


def dtypes_for(device):
    """bf16/fp16 on CPU run on the compiled and reference paths; Triton's interpreter is fp32-only."""
    return (torch.float32, torch.bfloat16, torch.float16)


CASES = backend_cases()
CASE_IDS = [f"{b}-{d}" for b, d in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    """Yields (backend, device) with that backend forced for the test."""
    backend, device = request.param
    with backends.use_backend(backend):
        yield backend, device


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def tolerance(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
