"""Which (backend, device) pairs the op tests run, and per-dtype tolerances (imported by tests)."""
import os

import torch

from engram_kernels import backends

GPU = os.environ.get("ENGRAM_TEST_GPU") == "1" and torch.cuda.is_available()


def backend_cases(family="memory"):
    """(backend, device) pairs available here for an op family; interpreter pairs need small shapes."""
    cases = [("torch", "cpu")]
    if backends.is_available("cpu", "cpu", family):
        cases.append(("cpu", "cpu"))
    if not GPU and backends.is_available("triton", "cpu", family):
        cases.append(("triton", "cpu"))
    if GPU:
        cases += [(name, "cuda") for name in ("torch", "cuda", "triton")
                  if backends.is_available(name, "cuda", family)]
    return cases


def dtypes_for(device):
    """bf16/fp16 on CPU run on the compiled and reference paths; Triton's interpreter is fp32-only."""
    return (torch.float32, torch.bfloat16, torch.float16)



def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def tolerance(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
