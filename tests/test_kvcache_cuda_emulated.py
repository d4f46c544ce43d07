"""The CUDA tensor-core decode kernel (csrc/cuda/kvcache_decode_mma.cuh) run on this CPU by the host
warp emulator (csrc/emulation) against the reference: its fragment layouts, bit tricks, splits,
residual window and key-group staging, and the merge of the splits by the merge kernel (the GPU
default) or by each head's last block (what ENGRAM_KV_MERGE=fused runs on a GPU), plus its reads
(every address inside an input) and its warp operations (reached by every lane). Needs only g++; a
GPU run tests the same source compiled by nvcc."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import host_cuda
from engram_kernels import backends
from engram_kernels.ops.kvcache import naive, quantize_kv

pytestmark = [pytest.mark.skipif(host_cuda.CXX is None, reason="no C++ compiler"),
              pytest.mark.skipif(os.environ.get("ENGRAM_TEST_GPU") == "1", reason="GPU runs test the compiled kernel")]

SOURCES = ["csrc/cuda/kvcache_decode_mma.cuh"]
TOLERANCE = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
# (bits, d, group): the key groups the kernel takes for each packing (value groups whole planes)
LAYOUTS = [(4, 128, 64), (4, 128, 128), (4, 128, 256), (4, 64, 32), (4, 64, 64), (4, 64, 128), (2, 128, 32),
           (2, 128, 64), (2, 128, 128)]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return host_cuda.build("kv_decode_mma", SOURCES, tmp_path_factory.mktemp("host_cuda"))


def _inputs(b, hq, hkv, q_len, d, packed_len, residual_len, bits, group, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, b, hkv, packed_len, d, generator=gen)
    with backends.use_backend("torch"):
        packed = quantize_kv(keys, values, bits, group)
    query = torch.randn(b, hq, q_len, d, generator=gen).to(dtype)
    residual = torch.randn(2, b, hkv, residual_len, d, generator=gen).to(dtype)
    return query, packed, residual[0], residual[1]


def _check(library, shape, layout, dtype, tokens_per_split, n_splits=None, l2_prefetch=True, seed=0,
           fused_merge=False):
    (b, hq, hkv, q_len, packed_len, residual_len), (bits, d, group) = shape, layout
    query, packed, rk, rv = _inputs(b, hq, hkv, q_len, d, packed_len, residual_len, bits, group, dtype, seed)
    out = host_cuda.kv_decode_mma(library, query, packed, rk, rv, d ** -0.5, tokens_per_split, n_splits,
                                  l2_prefetch, fused_merge)
    expected = naive.decode_attention(query, *packed.tensors(), rk, rv, bits, group, d ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


# (B, Hq, Hkv, Tq, packed, residual): GQA 1..8 query rows per KV head, 1-2 query tokens (causal within
# the residual window), packed lengths off the slab and group grid, no residual window, no packed store.
SHAPES = [(1, 4, 1, 1, 256, 16), (1, 8, 2, 1, 300, 5), (2, 4, 2, 2, 200, 0), (1, 8, 1, 1, 130, 130),
          (1, 2, 1, 3, 77, 3), (1, 4, 4, 1, 0, 9), (1, 3, 3, 2, 48, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_emulated_mma_decode_matches_reference(library, shape, layout, dtype):
    _check(library, shape, layout, dtype, tokens_per_split=64)


@pytest.mark.parametrize("fused_merge", [False, True], ids=["merge_kernel", "fused_merge"])
@pytest.mark.parametrize("l2_prefetch", [True, False])
@pytest.mark.parametrize("tokens_per_split,n_splits", [(64, None), (128, None), (192, 4), (576, 1), (64, 10)])
def test_emulated_mma_decode_over_split_plans(library, tokens_per_split, n_splits, l2_prefetch, fused_merge):
    """Warps of a split that get no slab, splits with no tokens (which the merge must skip), the residual
    window in a split that also holds packed tokens (n_splits given), the L2 prefetches off; both merges."""
    _check(library, (1, 8, 2, 1, 570, 20), (4, 128, 128), torch.bfloat16, tokens_per_split, n_splits, l2_prefetch,
           fused_merge=fused_merge)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(layout=st.sampled_from(LAYOUTS), rep=st.integers(1, 4), q_len=st.integers(1, 2), hkv=st.integers(1, 2),
       packed_len=st.integers(0, 400), residual_len=st.integers(0, 40), units=st.integers(1, 4),
       fp16=st.booleans(), seed=st.integers(0, 1000), fused_merge=st.booleans())
def test_emulated_mma_decode_sweep(library, layout, rep, q_len, hkv, packed_len, residual_len, units, fp16, seed,
                                   fused_merge):
    if packed_len + residual_len < q_len:
        residual_len = q_len  # every query row sees at least one token
    _check(library, (1, rep * hkv, hkv, q_len, packed_len, residual_len), layout,
           torch.float16 if fp16 else torch.bfloat16, 64 * units, seed=seed, fused_merge=fused_merge)


def test_emulator_flags_reads_outside_the_inputs(library):
    query, packed, rk, rv = _inputs(1, 4, 1, 1, 128, 128, 8, 4, 64, torch.bfloat16)
    short = packed._replace(value_zero=packed.value_zero[:, :, :100])  # the kernel reads 128 tokens' zeros
    with pytest.raises(RuntimeError, match="outside every buffer"):
        host_cuda.kv_decode_mma(library, query, short, rk, rv, 0.1, 64)
