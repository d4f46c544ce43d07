"""Bad input fails with a clear Python error before any backend code runs."""
import pytest
import torch

from engram_kernels.ops.memory import functional, pk_topk, sparse_adam_step, sparse_sgd_step, weighted_gather


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch):
    def refuse(device):
        raise AssertionError("a kernel ran before the input was rejected")
    monkeypatch.setattr(functional, "backend_module", refuse)


def gather_inputs():
    return torch.randn(10, 4), torch.randint(0, 10, (3, 5)), torch.rand(3, 5)


@pytest.mark.parametrize("mutate, error, message", [
    (lambda v, i, w: (v, i + 10, w), IndexError, r"ids must lie in \[0, 10\)"),
    (lambda v, i, w: (v, i - 11, w), IndexError, r"ids must lie in"),
    (lambda v, i, w: (v, i.float(), w), TypeError, "ids must be an int64 or int32"),
    (lambda v, i, w: (v.long(), i, w), TypeError, "values must be float32, bfloat16 or float16"),
    (lambda v, i, w: (v, i, w.double()), TypeError, "weights must be float32"),
    (lambda v, i, w: (v[0], i, w), ValueError, "values must have 2 dimensions"),
    (lambda v, i, w: (v, i, w[:, :4]), ValueError, r"weights \(3, 4\) must match ids \(3, 5\)"),
    (lambda v, i, w: (v, i, w.masked_fill(w > -1, float("nan"))), ValueError, "weights contains NaN"),
    (lambda v, i, w: (v, i.flatten(), w), ValueError, "ids must have 2 dimensions"),
    (lambda v, i, w: (v.to("meta"), i, w), ValueError, "one device"),
])
def test_weighted_gather_rejects(mutate, error, message):
    with pytest.raises(error, match=message):
        weighted_gather(*mutate(*gather_inputs()))


def topk_inputs():
    return torch.randn(4, 2, 8), torch.randn(2, 6, 4), torch.randn(2, 6, 4)


@pytest.mark.parametrize("mutate, k, error, message", [
    (lambda q, a, b: (q, a, b), 7, ValueError, r"k must be an int in \[1, n_keys=6\]"),
    (lambda q, a, b: (q, a, b), 0, ValueError, "k must be an int"),
    (lambda q, a, b: (q[..., :6], a, b), 2, ValueError, r"needs keys of shape \(H, n_keys, Dk/2\)"),
    (lambda q, a, b: (q[:, :1], a, b), 2, ValueError, "needs keys of shape"),
    (lambda q, a, b: (q, a, b[:, :5]), 2, ValueError, "must have one shape"),
    (lambda q, a, b: (q.int(), a, b), 2, TypeError, "query must be float32"),
    (lambda q, a, b: (q * float("nan"), a, b), 2, ValueError, "query contains NaN"),
    (lambda q, a, b: (q, a * float("inf"), b), 2, ValueError, "keys1 contains NaN or Inf"),
    (lambda q, a, b: (q[0], a, b), 2, ValueError, "query must have 3 dimensions"),
])
def test_pk_topk_rejects(mutate, k, error, message):
    with pytest.raises(error, match=message):
        pk_topk(*mutate(*topk_inputs()), k)


def test_sparse_steps_reject_bad_input():
    values, rows, grads = torch.randn(10, 4), torch.tensor([1, 3]), torch.randn(2, 4)
    with pytest.raises(IndexError, match="ids must lie"):
        sparse_sgd_step(values, torch.tensor([1, 10]), grads, 0.1)
    with pytest.raises(ValueError, match=r"grads must have shape \(len\(rows\), Dv\)"):
        sparse_sgd_step(values, rows, grads[:, :3], 0.1)
    with pytest.raises(ValueError, match="allow_mask must be a bool tensor"):
        sparse_sgd_step(values, rows, grads, 0.1, allow_mask=torch.ones(10))
    with pytest.raises(ValueError, match="grads contains NaN"):
        sparse_sgd_step(values, rows, grads * float("nan"), 0.1)
    with pytest.raises(ValueError, match="values must be contiguous"):
        sparse_sgd_step(torch.randn(4, 10).t(), rows, grads, 0.1)
    state = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="optimizer state must be contiguous float32"):
        sparse_adam_step(values, state.half(), state, rows, grads, 1, 0.1)
    with pytest.raises(ValueError, match="step counts updates and starts at 1"):
        sparse_adam_step(values, state, state.clone(), rows, grads, 0, 0.1)
    with pytest.raises(ValueError, match="rows must be unique"):
        sparse_sgd_step(values, torch.tensor([3, 1, 3]), torch.randn(3, 4), 0.1)
