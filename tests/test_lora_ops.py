"""LoRA ops: every available backend against the pure-PyTorch reference, forward and backward;
dropout masks; many adapters with uneven assignment; exact merge round trip; bad input."""
import os
import subprocess
import sys

import pytest
import torch

from backend_cases import GPU, backend_cases, dtypes_for, interpreted, tolerance
from engram_kernels import backends
from engram_kernels.ops.lora import composite, functional, lora_linear, lora_linear_multi, merge_lora, naive, unmerge_lora

CASES = backend_cases("lora")
# (N, in, out, r): ranks 1..64, non-powers of two, a single row, SmolLM2's 576 -> 1536.
SHAPES = [(1, 8, 8, 1), (7, 16, 24, 4), (33, 40, 17, 8), (5, 32, 32, 2), (16, 64, 48, 64), (64, 576, 1536, 16)]
# (N, in, out, r, n_adapters)
MULTI_SHAPES = [(1, 8, 8, 2, 1), (40, 16, 24, 4, 3), (64, 32, 48, 16, 8), (100, 24, 20, 8, 70), (48, 576, 1536, 16, 8)]
INTERPRETER_WORK = 1_000_000  # N * (in + out) * r above this is too slow for the Triton interpreter


@pytest.fixture(params=CASES, ids=[f"{b}-{d}" for b, d in CASES])
def case(request):
    backend, device = request.param
    with backends.use_backend(backend):
        yield backend, device


def _skip_heavy(case, n, d_in, d_out, r):
    if interpreted(*case) and n * (d_in + d_out) * max(r, 16) > INTERPRETER_WORK:
        pytest.skip("too large for the Triton interpreter")


def _dtypes(case):
    return [torch.float32] if interpreted(*case) else dtypes_for(case[1])


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _assert_close(got, expected, dtype, scale=1.0):
    """Absolute tolerance relative to the result's magnitude: low-precision rounding of the stored
    intermediates (u, the outputs) scales with it."""
    tol = tolerance(dtype)
    magnitude = max(1.0, expected.abs().max().item()) if dtype != torch.float32 else 1.0
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol["rtol"], atol=tol["atol"] * scale * magnitude)


def _single_inputs(shape, device, dtype, seed=0, with_bias=True):
    n, d_in, d_out, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    lora_a = torch.randn(r, d_in, generator=gen) / d_in**0.5
    lora_b = torch.randn(d_out, r, generator=gen) / r**0.5
    bias = torch.randn(d_out, generator=gen) if with_bias else None
    grad = torch.randn(n, d_out, generator=gen)
    move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return [move(t) for t in (x, weight, lora_a, lora_b, bias, grad)]


def _reference_grads(x, weight, lora_a, lora_b, bias, grad, scale, p=0.0, seed=0):
    """fp32 autograd of naive.lora_linear on the same (possibly low-precision) inputs."""
    x32, a32, b32 = _leaves(x.float(), lora_a.float(), lora_b.float())
    y = naive.lora_linear(x32, weight.float(), a32, b32, scale, None if bias is None else bias.float(), p, seed)
    return (y, *torch.autograd.grad(y, (x32, a32, b32), grad.float()))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_linear_matches_reference(case, shape, with_bias):
    _skip_heavy(case, *shape)
    for dtype in _dtypes(case):
        x, weight, lora_a, lora_b, bias, grad = _single_inputs(shape, case[1], dtype, with_bias=with_bias)
        xl, al, bl = _leaves(x, lora_a, lora_b)
        y = lora_linear(xl, weight, al, bl, 2.0, bias)
        got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
        expected = _reference_grads(x, weight, lora_a, lora_b, bias, grad, 2.0)
        assert y.dtype == dtype and y.shape == (shape[0], shape[2])
        for g, e, name in zip(got, expected, ("y", "dx", "dA", "dB")):
            assert g.dtype == dtype, name
            _assert_close(g, e, dtype, scale=max(1.0, shape[0] ** 0.5 / 4))


def test_lora_linear_keeps_leading_dims_and_frozen_weight(case):
    x, weight, lora_a, lora_b, bias, _ = _single_inputs((12, 16, 24, 4), case[1], torch.float32)
    xl = x.view(3, 4, 16).requires_grad_()
    y = lora_linear(xl, weight, lora_a, lora_b, 0.5, bias)
    assert y.shape == (3, 4, 24)
    y.sum().backward()
    assert xl.grad.shape == (3, 4, 16) and weight.grad is None


def _joined(weight, lora_b, pad=0):
    """W and B as adjacent column blocks of one (out, in + r + pad) buffer, as LoRALinear(join_weights=True)."""
    d_in = weight.shape[1]
    wide = torch.cat([weight, lora_b, weight.new_zeros(weight.shape[0], pad)], 1)
    return wide[:, :d_in], wide[:, d_in:d_in + lora_b.shape[1]]


@pytest.mark.parametrize("shape, pad", [((7, 16, 24, 4), 0), ((33, 40, 17, 8), 3), ((1, 8, 8, 1), 7),
                                        ((64, 576, 1536, 16), 0)], ids=str)
def test_joined_weight_layout_matches_reference(case, shape, pad):
    """W and B in one buffer (the one-GEMM forward on GPUs): same outputs and gradients, no copy of W."""
    _skip_heavy(case, *shape)
    for dtype in _dtypes(case):
        x, weight, lora_a, lora_b, bias, grad = _single_inputs(shape, case[1], dtype)
        w_view, b_view = _joined(weight, lora_b, pad)
        assert composite.joined_weight(w_view, b_view) is not None
        xl, al = _leaves(x, lora_a)
        bl = b_view.requires_grad_()
        y = lora_linear(xl, w_view, al, bl, 2.0, bias)
        got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
        for g, e in zip(got, _reference_grads(x, weight, lora_a, lora_b, bias, grad, 2.0)):
            _assert_close(g, e, dtype, scale=max(1.0, shape[0] ** 0.5 / 4))


@pytest.mark.parametrize("n, k, r", [(1, 8, 1), (37, 130, 5), (64, 256, 16)])
def test_x_and_u_writes_x_and_the_scaled_branch(case, n, k, r):
    """The joined forward's input [x | s·x Aᵀ] (rows padded) and u = x Aᵀ, from each GPU backend's kernel."""
    x_and_u = getattr(functional.backend_module(case[1]), "x_and_u", composite.torch_x_and_u)
    for dtype in _dtypes(case):
        x, _, lora_a, *_ = _single_inputs((n, k, 4, r), case[1], dtype)
        xu = composite.padded_rows(n, k + r, x)
        u = x_and_u(x, lora_a, 0.5, xu)
        expected_u = (x.float() @ lora_a.float().t())
        assert xu.stride(0) * xu.element_size() % 16 == 0 and torch.equal(xu[:, :k], x)
        _assert_close(u, expected_u, dtype)
        _assert_close(xu[:, k:], 0.5 * expected_u, dtype)


def test_joined_weight_recognizes_only_adjacent_blocks():
    weight, lora_b = torch.randn(6, 8), torch.randn(6, 2)
    w_view, b_view = _joined(weight, lora_b)
    assert composite.joined_weight(w_view, b_view).shape == (6, 10)
    assert torch.equal(composite.joined_weight(w_view, b_view), torch.cat([weight, lora_b], 1))
    wide = torch.cat([weight, torch.zeros(6, 1), lora_b], 1)  # a gap between W and B
    assert composite.joined_weight(wide[:, :8], wide[:, 9:]) is None
    assert composite.joined_weight(weight, lora_b) is None
    assert composite.joined_weight(w_view, b_view.clone()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, c, r", [(1, 8, 1), (37, 70, 4), (300, 130, 16), (257, 64, 64), (600, 136, 16),
                                     (1030, 4104, 8)])
def test_dy_products_match_reference(case, n, c, r, dtype):
    """The backward's one-pass (dy B, uᵀ dy) where a backend has it: row blocks and column splits
    that do not divide the shapes, ranks 1..64; 16-bit dy on GPUs (the cuda backend's fused kernel
    takes 16-bit dy with C % 8 == 0 and ranks up to 16, the rest falls back to cuBLAS)."""
    module = functional.backend_module(torch.device(case[1]))
    kernel = getattr(getattr(module, "_Kernels", None), "dy_products", None)
    if kernel in (None, composite.gemm_dy_products):
        pytest.skip(f"{case[0]} computes the two products with separate GEMMs")
    if (dtype != torch.float32 or n >= 600) and case != ("cuda", "cuda"):
        pytest.skip("16-bit dy and several 512-row blocks: for the cuda backend's fused kernel")
    gen = torch.Generator().manual_seed(n + c + r)
    grad_y, lora_b, u = (torch.randn(*shape, generator=gen).to(case[1], dtype) for shape in ((n, c), (c, r), (n, r)))
    limits = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.1)
    for got, expected in zip(kernel(grad_y, lora_b, u), naive.dy_products(grad_y, lora_b, u)):
        torch.testing.assert_close(got.cpu().float(), expected.cpu(), **limits)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_mask(case, p):
    shape = (24, 48, 32, 8)
    x, weight, lora_a, lora_b, bias, grad = _single_inputs(shape, case[1], torch.float32)
    xl, al, bl = _leaves(x, lora_a, lora_b)
    y = lora_linear(xl, weight, al, bl, 1.5, bias, dropout=p, seed=1234)
    got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
    expected = _reference_grads(x, weight, lora_a, lora_b, bias, grad, 1.5, p, 1234)
    for g, e in zip(got, expected):
        _assert_close(g, e, torch.float32)


def test_dropout_mask_statistics_and_seeds():
    mask = naive.dropout_mask(256, 512, 0.3, 7, "cpu")
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    assert not torch.equal(mask, naive.dropout_mask(256, 512, 0.3, 8, "cpu"))
    assert torch.equal(mask, naive.dropout_mask(256, 512, 0.3, 7, "cpu"))
    assert (mask.float().mean(0).std() < 0.05) and (mask.float().mean(1).std() < 0.05)  # no striping


def test_dropout_seed_of_any_size_uses_its_low_32_bits():
    x, weight, lora_a, lora_b, _, _ = _single_inputs((8, 16, 16, 4), "cpu", torch.float32)
    big = lora_linear(x, weight, lora_a, lora_b, dropout=0.5, seed=2**70 + 5)
    assert torch.equal(big, lora_linear(x, weight, lora_a, lora_b, dropout=0.5, seed=5))
    negative = lora_linear(x, weight, lora_a, lora_b, dropout=0.5, seed=-3)
    assert torch.equal(negative, lora_linear(x, weight, lora_a, lora_b, dropout=0.5, seed=2**32 - 3))


def test_dropout_seed_none_draws_from_torch_generator():
    x, weight, lora_a, lora_b, _, _ = _single_inputs((8, 16, 16, 4), "cpu", torch.float32)
    torch.manual_seed(3)
    first = lora_linear(x, weight, lora_a, lora_b, dropout=0.5)
    torch.manual_seed(3)
    assert torch.equal(first, lora_linear(x, weight, lora_a, lora_b, dropout=0.5))
    assert not torch.equal(first, lora_linear(x, weight, lora_a, lora_b, dropout=0.5))


# ---- many adapters --------------------------------------------------------------------------------

def _uneven_ids(n, n_adapters, gen):
    """Zipf-like: adapter a drawn with weight 1 / (a + 1), some rows with no adapter (-1)."""
    weights = 1.0 / torch.arange(1, n_adapters + 2, dtype=torch.float64)
    ids = torch.multinomial(weights, n, replacement=True, generator=gen) - 1
    return ids


def _multi_inputs(shape, device, dtype, seed=0):
    n, d_in, d_out, r, n_adapters = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    weight = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    lora_a = torch.randn(n_adapters, r, d_in, generator=gen) / d_in**0.5
    lora_b = torch.randn(n_adapters, d_out, r, generator=gen) / r**0.5
    scales = torch.rand(n_adapters, generator=gen) + 0.5
    bias = torch.randn(d_out, generator=gen)
    grad = torch.randn(n, d_out, generator=gen)
    ids = _uneven_ids(n, n_adapters, gen)
    move = lambda t: t.to(device, dtype)  # noqa: E731
    return (*[move(t) for t in (x, weight, lora_a, lora_b)], scales.to(device), move(bias), ids.to(device),
            move(grad))


@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=str)
def test_lora_linear_multi_matches_reference(case, shape):
    n, d_in, d_out, r, _ = shape
    _skip_heavy(case, n, d_in, d_out, r)
    for dtype in _dtypes(case):
        x, weight, lora_a, lora_b, scales, bias, ids, grad = _multi_inputs(shape, case[1], dtype)
        xl, al, bl = _leaves(x, lora_a, lora_b)
        y = lora_linear_multi(xl, weight, al, bl, scales, ids, bias)
        got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
        x32, a32, b32 = _leaves(x.float(), lora_a.float(), lora_b.float())
        ref = naive.lora_linear_multi(x32, weight.float(), a32, b32, scales, ids, bias.float())
        expected = (ref, *torch.autograd.grad(ref, (x32, a32, b32), grad.float()))
        for g, e, name in zip(got, expected, ("y", "dx", "dA", "dB")):
            assert g.dtype == dtype, name
            _assert_close(g, e, dtype, scale=max(1.0, n ** 0.5 / 4))


def test_multi_unused_adapters_get_zero_grads(case):
    x, weight, lora_a, lora_b, scales, bias, _, grad = _multi_inputs((20, 16, 24, 4, 5), case[1], torch.float32)
    ids = torch.tensor([1, 3] * 10, device=case[1])
    al, bl = _leaves(lora_a, lora_b)
    y = lora_linear_multi(x, weight, al, bl, scales, ids, bias)
    da, db = torch.autograd.grad(y, (al, bl), grad)
    for a in (0, 2, 4):
        assert not da[a].any() and not db[a].any()
    assert da[1].abs().sum() > 0 and db[3].abs().sum() > 0


def test_multi_with_one_adapter_equals_single(case):
    x, weight, lora_a, lora_b, bias, grad = _single_inputs((30, 24, 40, 8), case[1], torch.float32)
    ids = torch.zeros(30, dtype=torch.int64, device=case[1])
    multi = lora_linear_multi(x, weight, lora_a[None], lora_b[None], 0.75, ids, bias)
    _assert_close(multi, lora_linear(x, weight, lora_a, lora_b, 0.75, bias), torch.float32)


def test_multi_per_sequence_ids_and_no_adapter_rows(case):
    x, weight, lora_a, lora_b, scales, bias, _, _ = _multi_inputs((12, 16, 24, 4, 3), case[1], torch.float32)
    ids = torch.full((3, 4), -1, device=case[1])
    y = lora_linear_multi(x.view(3, 4, 16), weight, lora_a, lora_b, scales, ids, bias)
    _assert_close(y.view(12, 24), x @ weight.t() + bias, torch.float32)
    per_sequence = torch.tensor([2, -1, 0], device=case[1])
    y = lora_linear_multi(x.view(3, 4, 16), weight, lora_a, lora_b, scales, per_sequence, bias)
    per_row = lora_linear_multi(x, weight, lora_a, lora_b, scales, per_sequence.repeat_interleave(4), bias)
    _assert_close(y.view(12, 24), per_row, torch.float32)


# ---- merge ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 2.0, 300.0])
def test_merge_unmerge_round_trip_is_exact(dtype, scale):
    _, weight, lora_a, lora_b, _, _ = _single_inputs((1, 96, 80, 8), "cpu", dtype)
    weight = weight * 0.02
    original = weight.clone()
    residual = merge_lora(weight, lora_a, lora_b, scale)
    _assert_close(weight, original.float() + scale * lora_b.float() @ lora_a.float(), dtype, scale=scale)
    unmerge_lora(weight, lora_a, lora_b, scale, residual)
    assert torch.equal(weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       original.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_merged_weight_gives_the_fused_output():
    x, weight, lora_a, lora_b, bias, _ = _single_inputs((16, 32, 24, 4), "cpu", torch.float32)
    fused = lora_linear(x, weight, lora_a, lora_b, 2.0, bias)
    merge_lora(weight, lora_a, lora_b, 2.0)
    _assert_close(x @ weight.t() + bias, fused, torch.float32)


# ---- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def no_kernel_may_run(monkeypatch):
    def refuse(device):
        raise AssertionError("a kernel ran before the input was rejected")
    monkeypatch.setattr(functional, "backend_module", refuse)


def _single_args():
    x, weight, lora_a, lora_b, bias, _ = _single_inputs((6, 8, 10, 2), "cpu", torch.float32)
    return dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scale=1.0, bias=bias)


@pytest.mark.parametrize("change, error, message", [
    (dict(lora_b=torch.randn(10, 3)), ValueError, r"rank mismatch: lora_a \(2, 8\) has r=2"),
    (dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a must have shape \(r, in_features\)=\(r, 8\)"),
    (dict(x=torch.randn(6, 9)), ValueError, "x's last dimension must be in_features=8"),
    (dict(x=torch.randn(6, 8).double()), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(lora_a=torch.randn(2, 8).bfloat16()), TypeError, "one dtype"),
    (dict(weight=torch.randn(10, 8, device="meta")), ValueError, "one device"),
    (dict(bias=torch.randn(11)), ValueError, r"bias must have shape \(out_features,\)=\(10,\)"),
    (dict(lora_b=torch.randn(10)), ValueError, "lora_b must have 2 dimensions"),
    (dict(scale=torch.tensor(1.0)), TypeError, "scale must be a Python number"),
    (dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
    (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
    (dict(x=[[1.0] * 8]), TypeError, "x must be a torch.Tensor"),
])
def test_lora_linear_rejects(no_kernel_may_run, change, error, message):
    with pytest.raises(error, match=message):
        lora_linear(**{**_single_args(), **change})


def _multi_args():
    x, weight, lora_a, lora_b, scales, bias, ids, _ = _multi_inputs((6, 8, 10, 2, 3), "cpu", torch.float32)
    return dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, scales=scales, adapter_ids=ids, bias=bias)


@pytest.mark.parametrize("change, error, message", [
    (dict(adapter_ids=torch.tensor([0, 1, 2, 3, 0, 0])), IndexError, r"adapter_ids must lie in \[-1, 3\)"),
    (dict(adapter_ids=torch.tensor([0, -2, 0, 0, 0, 0])), IndexError, r"found values in \[-2, 0\]"),
    (dict(adapter_ids=torch.zeros(6)), TypeError, "adapter_ids must be an int64 or int32"),
    (dict(adapter_ids=torch.zeros(5, dtype=torch.int64)), ValueError, r"one id per row"),
    (dict(lora_b=torch.randn(3, 10, 4)), ValueError, "rank mismatch"),
    (dict(lora_b=torch.randn(2, 10, 2)), ValueError, "rank mismatch"),
    (dict(scales=torch.ones(2)), ValueError, r"scales must have shape \(n_adapters,\)=\(3,\)"),
    (dict(lora_a=torch.randn(2, 8)), ValueError, "lora_a must have 3 dimensions"),
    (dict(adapter_ids=torch.zeros(6, dtype=torch.int64, device="meta")), ValueError, "one device"),
    (dict(x=torch.randn(6, 8).half()), TypeError, "one dtype"),
    (dict(adapter_ids=[0, 1, 2, 0, 1, 2]), TypeError, "adapter_ids must be an int64 or int32 tensor, got <class"),
    (dict(scales=torch.ones(3, requires_grad=True)), ValueError, "scales must not require grad"),
    (dict(scales=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "scales contains NaN or Inf"),
])
def test_lora_linear_multi_rejects(no_kernel_may_run, change, error, message):
    with pytest.raises(error, match=message):
        lora_linear_multi(**{**_multi_args(), **change})


def test_merge_rejects_mismatched_adapter():
    with pytest.raises(ValueError, match="needs lora_a"):
        merge_lora(torch.randn(10, 8), torch.randn(2, 8), torch.randn(10, 3))
    with pytest.raises(ValueError, match="scale must be finite"):
        merge_lora(torch.randn(10, 8), torch.randn(2, 8), torch.randn(10, 2), float("nan"))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("threads", [2, 16])
def test_threaded_cpu_paths_match_reference(p, threads):
    """Several threads: the cpu backend's one-block-per-thread single-adapter path (dropout keyed by
    global rows) and its segment-parallel many-adapter path (CI runs with OMP_NUM_THREADS=1). With
    16 threads over 37 rows, 3 rows per block leave three threads without rows; memory freed full
    of NaN just before makes any unwritten per-thread partial gradient show."""
    if not backends.is_available("cpu", "cpu", "lora"):
        pytest.skip("cpu backend not built")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use_backend("cpu"):
            poison = [torch.full((threads, 8, 24), float("nan")) for _ in range(4)]
            del poison
            x, weight, lora_a, lora_b, bias, grad = _single_inputs((37, 24, 40, 8), "cpu", torch.float32)
            xl, al, bl = _leaves(x, lora_a, lora_b)
            y = lora_linear(xl, weight, al, bl, 2.0, bias, dropout=p, seed=9)
            got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
            for g, e in zip(got, _reference_grads(x, weight, lora_a, lora_b, bias, grad, 2.0, p, 9)):
                _assert_close(g, e, torch.float32)
            x, weight, lora_a, lora_b, scales, bias, ids, grad = _multi_inputs((90, 16, 24, 4, 12), "cpu",
                                                                               torch.float32)
            xl, al, bl = _leaves(x, lora_a, lora_b)
            y = lora_linear_multi(xl, weight, al, bl, scales, ids, bias)
            got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
            x32, a32, b32 = _leaves(x, lora_a, lora_b)
            ref = naive.lora_linear_multi(x32, weight, a32, b32, scales, ids, bias)
            for g, e in zip(got, (ref, *torch.autograd.grad(ref, (x32, a32, b32), grad))):
                _assert_close(g, e, torch.float32)
    finally:
        torch.set_num_threads(saved_threads)


def test_custom_op_registrations_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the
    torch.library ops that torch.compile sees."""
    x, weight, lora_a, lora_b, bias, _ = _single_inputs((6, 8, 10, 2), "cpu", torch.float32)
    x, lora_a, lora_b = _leaves(x, lora_a, lora_b)
    for args in ((x, weight, bias, lora_a, lora_b, 2.0, 0.0, 0), (x, weight, None, lora_a, lora_b, 2.0, 0.3, 5)):
        torch.library.opcheck(functional._lora_op, args)
    x, weight, lora_a, lora_b, scales, bias, ids, _ = _multi_inputs((6, 8, 10, 2, 3), "cpu", torch.float32)
    perm, offsets = naive.segments(ids, 3)
    torch.library.opcheck(functional._multi_op, (x, weight, bias, *_leaves(lora_a, lora_b), scales, perm, offsets))


def test_compiles_with_fullgraph():
    x, weight, lora_a, lora_b, bias, grad = _single_inputs((6, 8, 10, 2), "cpu", torch.float32)
    xl, al, bl = _leaves(x, lora_a, lora_b)
    layer = torch.compile(lambda x, a, b: lora_linear(x, weight, a, b, 2.0, bias), fullgraph=True)
    y = layer(xl, al, bl)
    got = (y, *torch.autograd.grad(y, (xl, al, bl), grad))
    for g, e in zip(got, _reference_grads(x, weight, lora_a, lora_b, bias, grad, 2.0)):
        _assert_close(g, e, torch.float32)


_HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram_kernels.ops.lora import triton_kernels as tk

ints = dict.fromkeys(("n_adapters", "R", "w_sa", "w_sj", "w_sk"), "i32")
segments = dict(tile_ends_ptr="*i64", offsets_ptr="*i64", perm_ptr="*i64", **ints)
blocks = dict(BM="constexpr", R_PAD="constexpr", A_BLOCK="constexpr", PRECISION="constexpr")
for dtype in ("bf16", "fp16", "fp32"):
    shape = dict(BM=32, R_PAD=16, A_BLOCK=64, PRECISION="ieee" if dtype == "fp32" else "tf32")
    kernels = [
        (tk._shrink_kernel, dict(src_ptr="*T", w_ptr="*T", scales_ptr="*fp32", out_ptr="*T", K="i32", src_stride="i32",
                                 BK="constexpr", **segments, **blocks), dict(BK=64, **shape)),
        (tk._expand_kernel, dict(dst_ptr="*T", small_ptr="*T", w_ptr="*T", scales_ptr="*fp32", C="i32",
                                 dst_stride="i32", BN="constexpr", **segments, **blocks), dict(BN=64, **shape)),
        (tk._grouped_outer_kernel, dict(small_ptr="*T", big_ptr="*T", out_ptr="*fp32", C="i32", big_stride="i32",
                                        TILE_ROWS="constexpr", BN="constexpr", **segments, **blocks),
         dict(TILE_ROWS=256, BN=64, **shape)),
        (tk._dropout_kernel, dict(x_ptr="*T", out_ptr="*T", n_cols="i32", seed="i64", threshold="i32", inv_keep="fp32",
                                  BLOCK="constexpr"), dict(BLOCK=1024)),
        (tk._dy_products_kernel, dict(dy_ptr="*T", b_ptr="*T", u_ptr="*T", g_part_ptr="*fp32", db_part_ptr="*fp32",
                                      N="i32", C="i32", R="i32", BN="constexpr", TILES="constexpr", **blocks),
         dict(BM=256, BN=64, TILES=8, R_PAD=16, PRECISION=shape["PRECISION"])),
        (tk._x_and_u_kernel, dict(x_ptr="*T", a_ptr="*T", xu_ptr="*T", u_ptr="*T", N="i32", K="i32", R="i32",
                                  ld_xu="i32", scale="fp32", BK="constexpr", K_TILES="constexpr", **blocks),
         dict(BM=32, BK=128, K_TILES=32, R_PAD=16, PRECISION=shape["PRECISION"])),
    ]
    for kernel, signature, constants in kernels:
        ordered = {name: signature[name].replace("T", dtype) for name in kernel.arg_names}
        triton.compile(ASTSource(fn=kernel, signature=ordered, constexprs=constants), target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


@pytest.mark.skipif(GPU, reason="GPU runs compile and run the kernels for real")
def test_triton_kernels_compile_for_hopper():
    """The Triton kernels compile to sm_90 code in every dtype, no GPU needed: what the interpreter
    cannot check (tl.dot and atomic lowering, loop-carried types). In a subprocess, since this
    process runs Triton's interpreter."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
