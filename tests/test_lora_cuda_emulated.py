"""The cuda backend's fused LoRA dy products (csrc/cuda/lora_dy_products.cuh) run on this CPU by the
host warp emulator (csrc/emulation) against the reference: its ldmatrix fragments, swizzles,
cp.async pipeline (copies land only when waited for), row blocks and column splits, and its reads
(every address inside an input). Needs only g++; a GPU run tests the same source compiled by nvcc."""
import os

import pytest
import torch

import host_cuda
from engram_kernels.ops.lora import naive

pytestmark = [pytest.mark.skipif(host_cuda.CXX is None, reason="no C++ compiler"),
              pytest.mark.skipif(os.environ.get("ENGRAM_TEST_GPU") == "1", reason="GPU runs test the compiled kernel")]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return host_cuda.build("lora_dy_products", ["csrc/cuda/lora_dy_products.cuh"], tmp_path_factory.mktemp("host_cuda"))


# (N, C, r, target blocks): one row block or several (512 rows each, the last partial), one column split
# or many (64-column tiles, the last partial; splits of unequal length), ranks 1..16.
CASES = [(1, 8, 1, 1), (5, 8, 16, 264), (37, 64, 16, 4), (300, 136, 4, 3), (513, 200, 8, 64), (600, 72, 1, 2),
         (1100, 392, 16, 7), (64, 1032, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, c, r, blocks", CASES, ids=str)
def test_emulated_fused_dy_products_match_reference(library, n, c, r, blocks, dtype):
    gen = torch.Generator().manual_seed(n + c + r)
    grad_y, lora_b, u = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((n, c), (c, r), (n, r)))
    got = host_cuda.lora_dy_products(library, grad_y, lora_b, u, blocks)
    for value, expected in zip(got, naive.dy_products(grad_y, lora_b, u)):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-3)


def test_emulator_flags_reads_outside_the_inputs(library):
    grad_y, lora_b, u = torch.randn(64, 128).bfloat16(), torch.randn(128, 16).bfloat16(), torch.randn(64, 16).bfloat16()
    with pytest.raises(RuntimeError, match="outside every buffer"):
        host_cuda.lora_dy_products(library, grad_y, lora_b[:100], u, 4)  # the kernel reads B's 128 rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, k, r, blocks", [(1, 8, 1, 1), (37, 64, 16, 4), (600, 136, 5, 3), (513, 200, 16, 64)],
                         ids=str)
def test_emulated_x_products_copy_x_and_match_reference(library, n, k, r, blocks, dtype):
    """The kernel's copy mode (the joined-weight forward's input): u = x Aᵀ, and x written into the
    first k columns of xu's padded rows, nothing else of xu touched."""
    gen = torch.Generator().manual_seed(n + k + r)
    x, lora_a = torch.randn(n, k, generator=gen).to(dtype), torch.randn(r, k, generator=gen).to(dtype)
    ld = -(-(k + r) // 8) * 8
    buffer = torch.full((n * ld + 64,), float("nan"), dtype=dtype)  # NaN guard after the rows
    xu = buffer[:n * ld].view(n, ld)[:, :k + r]
    u = host_cuda.lora_x_products(library, x, lora_a, xu, blocks)
    torch.testing.assert_close(u, x.float() @ lora_a.float().t(), rtol=1e-4, atol=1e-3)
    assert torch.equal(xu[:, :k], x)
    assert buffer.view(-1)[n * ld:].isnan().all() and buffer[:n * ld].view(n, ld)[:, k:].isnan().all()
