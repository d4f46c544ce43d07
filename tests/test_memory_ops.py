"""Every available backend against the pure-PyTorch reference (naive.py), forward and backward."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from backend_cases import dtypes_for, interpreted, tolerance
from engram_kernels import backends
from engram_kernels.ops.memory import naive, pk_topk, sparse_adam_step, sparse_sgd_step, weighted_gather

# (N, H, n_keys, k, Dk): non-powers of two, k == n_keys, a single token and a single head.
TOPK_SHAPES = [(1, 1, 4, 1, 8), (7, 3, 5, 5, 8), (33, 2, 37, 8, 32), (16, 4, 16, 4, 16), (5, 1, 64, 32, 12),
               (64, 4, 100, 16, 64)]
# (N, L, n_slots, Dv): L = H * k lookups per token; tiny n_slots forces duplicates within and across rows.
GATHER_SHAPES = [(1, 1, 1, 1), (4, 8, 3, 7), (16, 12, 50, 64), (9, 32, 300, 576), (33, 5, 1000, 33),
                 (8, 128, 4096, 96)]


def _skip_heavy(case, work, limit):
    backend, device = case
    if interpreted(backend, device) and work > limit:
        pytest.skip("too large for the Triton interpreter")


def _dtype_cases(case):
    backend, device = case
    return [torch.float32] if interpreted(backend, device) else dtypes_for(device)


# ---- pk_topk --------------------------------------------------------------------------------------

def _true_scores(query, keys1, keys2, ids):
    s1, s2 = naive.sub_scores(query, keys1, keys2)
    n_keys = keys1.shape[1]
    return s1.gather(-1, ids // n_keys) + s2.gather(-1, ids % n_keys)


@pytest.mark.parametrize("shape", TOPK_SHAPES, ids=str)
def test_pk_topk_matches_reference(case, shape):
    n, h, n_keys, k, dk = shape
    _skip_heavy(case, n * h * k, 2000)
    _, device = case
    for dtype in _dtype_cases(case):
        gen = torch.Generator().manual_seed(n * 1000 + n_keys)
        query = torch.randn(n, h, dk, generator=gen).to(device, dtype)
        keys1, keys2 = (torch.randn(h, n_keys, dk // 2, generator=gen).to(device, dtype) for _ in range(2))
        scores, ids = pk_topk(query, keys1, keys2, k)
        ref_scores, _ = naive.pk_topk(query, keys1, keys2, k)
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (n, h, k)
        # Compared by value, not by index: ties may legitimately pick different slots.
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_true_scores(query, keys1, keys2, ids), scores, rtol=1e-5, atol=1e-5)
        assert (scores[..., 1:] <= scores[..., :-1]).all(), "scores must be sorted descending"
        assert ((ids >= 0) & (ids < n_keys * n_keys)).all()
        assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k).cpu()), "slots must be distinct"


@pytest.mark.parametrize("shape", TOPK_SHAPES[:4], ids=str)
def test_pk_topk_backward_matches_autograd_of_reference(case, shape):
    _, device = case
    n, h, n_keys, k, dk = shape
    gen = torch.Generator().manual_seed(7)
    leaves = [torch.randn(n, h, dk, generator=gen), torch.randn(h, n_keys, dk // 2, generator=gen),
              torch.randn(h, n_keys, dk // 2, generator=gen)]
    leaves = [t.to(device).requires_grad_() for t in leaves]
    grad = torch.randn(n, h, k, generator=gen).to(device)
    scores, ids = pk_topk(*leaves, k)
    got = torch.autograd.grad(scores, leaves, grad)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    expected = torch.autograd.grad(_true_scores(*ref_leaves, ids), ref_leaves, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


# ---- weighted gather ------------------------------------------------------------------------------

def _gather_inputs(shape, device, dtype, weight_dtype=torch.float32, seed=0):
    n, l, n_slots, dv = shape
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_slots, dv, generator=gen).to(device, dtype)
    ids = torch.randint(0, n_slots, (n, l), generator=gen).to(device)
    weights = torch.rand(n, l, generator=gen).to(device, weight_dtype)
    return values, ids, weights


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_weighted_gather_forward(case, shape):
    _skip_heavy(case, shape[0] * shape[1] * shape[3], 2 * 10**5)
    _, device = case
    for dtype in _dtype_cases(case):
        values, ids, weights = _gather_inputs(shape, device, dtype)
        out = weighted_gather(values, ids, weights)
        assert out.dtype == dtype and out.shape == (shape[0], shape[3])
        torch.testing.assert_close(out, naive.weighted_gather(values, ids, weights), **tolerance(dtype))


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
def test_weighted_gather_backward(case, shape):
    _skip_heavy(case, shape[0] * shape[1] * shape[3], 2 * 10**5)
    _, device = case
    for dtype in _dtype_cases(case):
        values, ids, weights = _gather_inputs(shape, device, dtype, weight_dtype=dtype, seed=1)
        grad_out = torch.randn(shape[0], shape[3], generator=torch.Generator().manual_seed(2)).to(device, dtype)
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        weighted_gather(v, ids, w).backward(grad_out)
        assert v.grad.is_sparse and v.grad._nnz() == ids.unique().numel()
        rv, rw = values.float().requires_grad_(), weights.float().requires_grad_()
        naive.weighted_gather(rv, ids, rw).backward(grad_out.float())
        torch.testing.assert_close(v.grad.to_dense().float(), rv.grad, **tolerance(dtype))
        torch.testing.assert_close(w.grad.float(), rw.grad, **tolerance(dtype))


def test_weighted_gather_backward_returns_sorted_unique_rows(case):
    backend, device = case
    values, ids, weights = _gather_inputs((6, 10, 20, 8), device, torch.float32, seed=3)
    ids[0, :] = 5  # the same slot many times in one row, and in others
    ids[3, 2] = 5
    grad_out = torch.randn(6, 8).to(device)
    module = __import__("engram_kernels.ops.memory.functional", fromlist=["x"]).backend_module(device)
    grad_w, rows, row_grads = module.weighted_gather_backward(grad_out, values, ids, weights)
    ref_w, ref_rows, ref_row_grads = naive.weighted_gather_backward(grad_out, values, ids, weights)
    assert torch.equal(rows.cpu(), ref_rows.cpu())
    torch.testing.assert_close(row_grads, ref_row_grads, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-5)


def test_weighted_gather_non_contiguous_inputs(case):
    _, device = case
    values, ids, weights = _gather_inputs((12, 6, 40, 32), device, torch.float32, seed=4)
    wide = torch.randn(40, 64, device=device)
    strided_values = wide[:, ::2]  # non-contiguous rows
    ids_t, weights_t = ids.t().contiguous().t(), weights.t().contiguous().t()  # column-major
    assert not strided_values.is_contiguous() and not ids_t.is_contiguous()
    out = weighted_gather(strided_values, ids_t, weights_t)
    torch.testing.assert_close(out, naive.weighted_gather(strided_values.contiguous(), ids, weights))


def test_weighted_gather_mixed_weight_dtype(case):
    backend, device = case
    if interpreted(backend, device):
        pytest.skip("interpreter runs fp32 only")
    values, ids, weights = _gather_inputs((10, 16, 64, 40), device, torch.bfloat16, weight_dtype=torch.float32)
    torch.testing.assert_close(weighted_gather(values, ids, weights), naive.weighted_gather(values, ids, weights),
                               **tolerance(torch.bfloat16))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), l=st.integers(1, 40), n_slots=st.integers(1, 70), dv=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_weighted_gather_cpu_backend_property(n, l, n_slots, dv, seed):
    if not backends.is_available("cpu", "cpu"):
        pytest.skip("C++ extension not built")
    values, ids, weights = _gather_inputs((n, l, n_slots, dv), "cpu", torch.float32, seed=seed)
    grad_out = torch.randn(n, dv)
    with backends.use_backend("cpu"):
        out = weighted_gather(values, ids, weights)
        grads = __import__("engram_kernels.ops.memory.cpu_ext", fromlist=["x"]).weighted_gather_backward(
            grad_out, values, ids, weights)
    torch.testing.assert_close(out, naive.weighted_gather(values, ids, weights), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, naive.weighted_gather_backward(grad_out, values, ids, weights)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- fused sparse optimizer steps -----------------------------------------------------------------

def _step_inputs(device, dtype, n_slots=50, dv=24, touched=20, seed=5):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_slots, dv, generator=gen).to(device, dtype)
    rows = torch.randperm(n_slots, generator=gen)[:touched].sort().values.to(device)
    grads = torch.randn(touched, dv, generator=gen).to(device, dtype)
    allow = (torch.rand(n_slots, generator=gen) < 0.5).to(device)
    return values, rows, grads, allow


def _mask(allow, masked):
    """None, the mask, or the same mask as a strided view (the kernels index it row by row)."""
    if masked == "strided":
        return torch.stack([allow, ~allow], 1)[:, 0]
    return allow if masked else None


@pytest.mark.parametrize("masked", [False, True, "strided"])
def test_sparse_sgd_step(case, masked):
    _, device = case
    for dtype in _dtype_cases(case):
        values, rows, grads, allow = _step_inputs(device, dtype)
        mask = _mask(allow, masked)
        expected = values.clone()
        naive.sparse_sgd_step(expected, rows, grads, 0.1, 0.01, mask)
        got = values.clone()
        sparse_sgd_step(got, rows, grads, 0.1, weight_decay=0.01, allow_mask=mask)
        torch.testing.assert_close(got, expected, **tolerance(dtype))
        untouched = torch.ones(values.shape[0], dtype=torch.bool, device=device)
        untouched[rows] = False
        if masked:
            untouched |= ~allow
        assert torch.equal(got[untouched], values[untouched]), "rows outside rows/allow_mask changed"


@pytest.mark.parametrize("masked", [False, True, "strided"])
def test_sparse_adam_steps(case, masked):
    _, device = case
    for dtype in _dtype_cases(case):
        values, rows, grads, allow = _step_inputs(device, dtype)
        mask = _mask(allow, masked)
        state = [torch.zeros(values.shape, device=device) for _ in range(4)]
        got, expected = values.clone(), values.clone()
        for step in (1, 2, 3):
            naive.sparse_adam_step(expected, state[0], state[1], rows, grads * step, step, 1e-2, 0.9, 0.99, 1e-8,
                                   0.1, mask)
            sparse_adam_step(got, state[2], state[3], rows, grads * step, step, 1e-2, 0.9, 0.99, 1e-8, 0.1, mask)
        torch.testing.assert_close(got, expected, **tolerance(dtype))
        torch.testing.assert_close(state[2], state[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[3], state[1], rtol=1e-5, atol=1e-6)
        if masked:
            blocked = ~allow
            assert torch.equal(got[blocked], values[blocked]) and not state[2][blocked].any()


def test_value_checks_do_not_break_a_compiled_graph():
    """With check_values on (the default) the ops still trace into one graph: the scans that read
    the data run in eager calls only."""
    gen = torch.Generator().manual_seed(0)
    query, keys1, keys2 = torch.randn(5, 2, 16, generator=gen), torch.randn(2, 8, 8), torch.randn(2, 8, 8)
    values = torch.randn(64, 8, generator=gen)

    def read(q):
        scores, ids = pk_topk(q, keys1, keys2, 4)
        return weighted_gather(values, ids.reshape(5, -1), scores.reshape(5, -1).softmax(-1), sparse_grad=False)
    compiled = torch.compile(read, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(query), read(query))
