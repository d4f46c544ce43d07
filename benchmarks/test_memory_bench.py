"""Microbenchmarks of the memory ops: `pytest benchmarks/ --benchmark-only` (not part of CI).

Each benchmark is parametrized by `backend`, `config` and `pass_` and records in extra_info the
bytes it moves (the traffic model below), the achieved GB/s, the % of the device's peak bandwidth
and its memory use (conftest.measure_memory).

Backends: torch|cpu|triton|cuda run the public ops under `use_backend(name)` (torch is the
reference the speedups are measured against); `torch_best` is the fastest stock-PyTorch
composition; `compiled` is torch.compile of the reference functions in naive.py (GPU only).
"""
import contextlib
import dataclasses
import functools
import gc

import pytest
import torch
import torch.nn.functional as F

import engram_kernels as ek
from engram_kernels import backends
from engram_kernels.ops.memory import naive


@dataclasses.dataclass(frozen=True)
class Config:
    n_tokens: int = 4096
    heads: int = 4
    k: int = 32
    n_keys: int = 256
    d_key: int = 256
    d_value: int = 576
    gpu_only: bool = False

    @property
    def n_slots(self):
        return self.n_keys**2

    @property
    def lookups(self):
        """Lookups per token (L = H * k)."""
        return self.heads * self.k


CONFIGS = {
    "smollm2": Config(),
    "large": Config(n_keys=1024, d_value=1024, gpu_only=True),
    "large4096": Config(n_keys=1024, d_value=4096, gpu_only=True),
}
KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKENDS = ("torch", "torch_best", "cpu", "triton", "cuda", "compiled")
PASSES = ("fwd", "bwd", "fwd_bwd")
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
ADAM_STEP = 10  # fixed, so torch.compile does not recompile for each new step count
ID_BYTES = 8
FP32_BYTES = 4


def rounds(device):
    """(warmup rounds, timed rounds): the CPU reference takes seconds per call on 2 cores."""
    return (1, 3)  # on GPUs a round is conftest.GPU_CALLS_PER_ROUND calls


# ---- bytes moved per op -------------------------------------------------------------------------
# bytes_moved, the logical traffic: every looked-up row counts each time it is read, as a kernel
# with no cache reuse reads it. Rows that hit in cache (an H100's 50 MB L2 holds much of smollm2's
# 75 MB bf16 table; on CPUs the caches hold a share of it too) let the GB/s computed from it pass
# the peak. min_bytes, the compulsory traffic: each distinct row read once; GB/s over it cannot
# pass the peak, so its % of peak (pct_roofline) says how close to the hardware limit a kernel is.
# ev, ew, eq: bytes per element of values (and grad_out), weights, query/keys.

def gather_fwd_bytes(c, ev, ew, values_rows):
    lookups = c.n_tokens * c.lookups
    return (values_rows * c.d_value * ev       # values rows read
            + lookups * (ID_BYTES + ew)        # ids and weights read
            + c.n_tokens * c.d_value * ev)     # out written


def gather_bwd_bytes(c, ev, ew, unique_rows, values_rows, grad_out_rows):
    lookups = c.n_tokens * c.lookups
    return (grad_out_rows * c.d_value * ev            # grad_out rows read
            + values_rows * c.d_value * ev            # values rows read, for grad_weights
            + lookups * (ID_BYTES + 2 * ew)           # ids, weights read; grad_weights written
            + unique_rows * (c.d_value * ev + ID_BYTES))  # row_grads and their row ids written


def gather_bytes(c, ev, ew, unique_rows, pass_, minimal):
    """Logical: a values row per lookup (fwd and bwd), and in the bwd a grad_out row per lookup into
    its slot's row sum plus grad_out once for grad_weights. Minimal: every distinct row once."""
    lookups = c.n_tokens * c.lookups
    values_rows = unique_rows if minimal else lookups
    grad_out_rows = c.n_tokens if minimal else c.n_tokens + lookups
    return passes_sum(gather_fwd_bytes(c, ev, ew, values_rows),
                      gather_bwd_bytes(c, ev, ew, unique_rows, values_rows, grad_out_rows), pass_)


def topk_fwd_bytes(c, eq):
    selected = c.n_tokens * c.heads * c.k
    return (c.n_tokens * c.heads * c.d_key * eq        # query read
            + c.heads * c.n_keys * c.d_key * eq        # both sub-key tables read
            + selected * (FP32_BYTES + ID_BYTES))      # scores and ids written


def topk_bwd_bytes(c, eq):
    selected = c.n_tokens * c.heads * c.k
    return (selected * (FP32_BYTES + ID_BYTES)             # grad_scores and ids read
            + 2 * c.n_tokens * c.heads * c.d_key * eq      # query read, grad_query written
            + 2 * c.heads * c.n_keys * c.d_key * eq)       # keys read, grad_keys written


def topk_flops(c, pass_):
    """Sub-key score matmuls (fwd); grad_query and grad_keys matmuls (bwd). Candidates are negligible."""
    matmul = 2 * c.n_tokens * c.heads * c.n_keys * c.d_key
    return {"fwd": matmul, "bwd": 2 * matmul, "fwd_bwd": 3 * matmul}[pass_]


def softmax_bytes(c, ew):
    """fwd: scores read, weights written; bwd: weights and grad_weights read, grad_scores written."""
    lookups = c.n_tokens * c.lookups
    return lookups * (FP32_BYTES + ew) + lookups * (2 * ew + FP32_BYTES)


def adam_bytes(c, ev, unique_rows):
    """Per touched row: values, exp_avg, exp_avg_sq (fp32) read and written; grads and row id read."""
    return unique_rows * (c.d_value * (2 * ev + 4 * FP32_BYTES + ev) + ID_BYTES)


def passes_sum(fwd, bwd, pass_):
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


# ---- inputs -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    """One config's tensors on one device. ids and weights come from pk_topk on the random query
    and keys, so duplicates occur as they do in a real lookup."""
    query: torch.Tensor        # (N, H, Dk), requires grad
    keys1: torch.Tensor        # (H, n_keys, Dk/2), requires grad
    keys2: torch.Tensor
    values: torch.Tensor       # (n_slots, Dv), requires grad
    scores: torch.Tensor       # (N, H, k) fp32
    ids: torch.Tensor          # (N, L) int64
    weights: torch.Tensor      # (N, L) values dtype, requires grad
    grad_out: torch.Tensor     # (N, Dv)
    grad_scores: torch.Tensor  # (N, H, k) fp32
    rows: torch.Tensor         # (U,) the unique ids: the rows a backward over `ids` returns

    @property
    def unique_rows(self):
        return self.rows.numel()


def make_inputs(c, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(scale).requires_grad_(grad)

    half = c.d_key // 2
    query = randn(c.n_tokens, c.heads, c.d_key, grad=True)
    keys1 = randn(c.heads, c.n_keys, half, scale=half**-0.5, grad=True)
    keys2 = randn(c.heads, c.n_keys, half, scale=half**-0.5, grad=True)
    with torch.no_grad():
        scores, ids = naive.pk_topk(query, keys1, keys2, c.k)
    weights = torch.softmax(scores, -1).flatten(1).to(dtype).requires_grad_(True)
    ids = ids.flatten(1)
    return Inputs(query, keys1, keys2, values=randn(c.n_slots, c.d_value, scale=0.02, grad=True),
                  scores=scores, ids=ids, weights=weights, grad_out=randn(c.n_tokens, c.d_value),
                  grad_scores=torch.randn(scores.shape, generator=gen, device=device),
                  rows=torch.unique(ids))


_cached = {}


def inputs_for(config, device):
    """The config's inputs, built once; only one config is held at a time (large4096 is 8 GB)."""
    key = (config, str(device))
    if key not in _cached:
        _cached.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        _cached[key] = make_inputs(CONFIGS[config], device, dtype)
    return _cached[key]


def skip_unless_runnable(backend, config, device):
    if CONFIGS[config].gpu_only and device.type != "cuda":
        pytest.skip(f"{config} is a GPU config")
    if backend == "compiled" and device.type != "cuda":
        pytest.skip("torch.compile baseline runs on GPU only")
    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton on CPU is the interpreter, not worth timing")
    if backend in KERNEL_BACKENDS and not backends.is_available(backend, device.type):
        pytest.skip(f"{backend} unavailable on {device.type}: {backends.describe(backend)}")


# ---- the ops, per backend -----------------------------------------------------------------------
# Each builder returns (fwd, bwd_of): fwd() runs the forward; bwd_of(out) the backward of one
# forward's output. bwd_of for autograd paths keeps the graph so the bwd pass can repeat it.

@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def grads_of(out, inputs, grad, coalesce=False):
    grads = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return (grads[0].coalesce(), *grads[1:]) if coalesce else grads


def gather_ops(backend, x):
    if backend == "torch_best":
        def fwd():
            return F.embedding_bag(x.ids, x.values, per_sample_weights=x.weights, mode="sum", sparse=True)
        # embedding_bag's sparse grad holds one row per lookup; coalescing makes it one per slot,
        # as the engram backward returns.
        return fwd, lambda out: grads_of(out, (x.values, x.weights), x.grad_out, coalesce=True)
    if backend == "compiled":
        values, weights = x.values.detach(), x.weights.detach()
        return (lambda: compiled(naive.weighted_gather)(values, x.ids, weights),
                lambda out: compiled(naive.weighted_gather_backward)(x.grad_out, values, x.ids, weights))
    return (lambda: ek.weighted_gather(x.values, x.ids, x.weights, check_values=False),
            lambda out: grads_of(out, (x.values, x.weights), x.grad_out))


def topk_ops(backend, x, k):
    keys = (x.query, x.keys1, x.keys2)
    if backend == "torch_best":  # no stock op does this: the reference composition under autograd
        return lambda: naive.pk_topk(*keys, k), lambda out: grads_of(out[0], keys, x.grad_scores)
    if backend == "compiled":
        detached = [t.detach() for t in keys]
        return (lambda: compiled(naive.pk_topk)(*detached, k),
                lambda out: compiled(naive.pk_topk_backward)(x.grad_scores, *detached, out[1]))
    return (lambda: ek.pk_topk(*keys, k, check_values=False),
            lambda out: grads_of(out[0], keys, x.grad_scores))


def reference_lookup_forward(query, keys1, keys2, values, k):
    scores, ids = naive.pk_topk(query, keys1, keys2, k)
    weights = torch.softmax(scores, -1)
    return naive.weighted_gather(values, ids.flatten(1), weights.flatten(1).to(values.dtype)), ids, weights


def reference_lookup_backward(grad_out, query, keys1, keys2, values, ids, weights):
    grad_w, rows, row_grads = naive.weighted_gather_backward(
        grad_out, values, ids.flatten(1), weights.flatten(1).to(values.dtype))
    grad_w = grad_w.float().view_as(weights)
    grad_scores = weights * (grad_w - (grad_w * weights).sum(-1, keepdim=True))  # softmax backward
    return (*naive.pk_topk_backward(grad_scores, query, keys1, keys2, ids), rows, row_grads)


def lookup_step(backend, x, k):
    """One fwd_bwd of pk_topk -> softmax over each head's k -> weighted_gather."""
    keys = (x.query, x.keys1, x.keys2)
    if backend == "compiled":
        query, keys1, keys2, values = (t.detach() for t in (*keys, x.values))

        def step():
            out, ids, weights = compiled(reference_lookup_forward)(query, keys1, keys2, values, k)
            return compiled(reference_lookup_backward)(x.grad_out, query, keys1, keys2, values, ids, weights)
        return step
    topk = naive.pk_topk if backend == "torch_best" else functools.partial(ek.pk_topk, check_values=False)

    def step():
        scores, ids = topk(*keys, k)
        weights = torch.softmax(scores, -1).flatten(1).to(x.values.dtype)
        if backend == "torch_best":
            out = F.embedding_bag(ids.flatten(1), x.values, per_sample_weights=weights, mode="sum", sparse=True)
        else:
            out = ek.weighted_gather(x.values, ids.flatten(1), weights, check_values=False)
        return grads_of(out, (x.values, *keys), x.grad_out, coalesce=backend == "torch_best")
    return step


def adam_step(backend, x, row_grads):
    """One optimizer update of the rows a backward over x.ids touched; state fp32 (n_slots, Dv),
    except torch.optim.SparseAdam, which keeps it in the parameter's dtype."""
    values = x.values.detach()
    if backend == "torch_best":
        param = torch.nn.Parameter(values)  # shares storage
        param.grad = torch.sparse_coo_tensor(x.rows.unsqueeze(0), row_grads, values.shape, is_coalesced=True,
                                             check_invariants=False)
        optimizer = torch.optim.SparseAdam([param], lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]),
                                           eps=ADAM["eps"])
        return optimizer.step
    exp_avg = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    if backend == "compiled":
        return lambda: compiled(naive.sparse_adam_step)(values, exp_avg, exp_avg_sq, x.rows, row_grads,
                                                        ADAM_STEP, **ADAM)
    return lambda: ek.sparse_adam_step(values, exp_avg, exp_avg_sq, x.rows, row_grads, ADAM_STEP, **ADAM,
                                       check_values=False)


def pass_fn(fwd, bwd_of, pass_):
    """The callable to time. bwd times the backward of one forward made here, outside the timing."""
    if pass_ == "fwd":
        return fwd
    if pass_ == "bwd":
        out = fwd()
        return lambda: bwd_of(out)
    return lambda: bwd_of(fwd())


# ---- running and recording ----------------------------------------------------------------------

def backend_scope(backend):
    """Forces a kernel backend; torch_best and compiled call no engram op."""
    return backends.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


@contextlib.contextmanager
def skip_on_oom():
    """large4096 runs only where memory allows; stock ops lacking a dtype (embedding_bag's
    per-sample-weights backward has no bf16 CUDA kernel in torch 2.11) are skipped, not failed."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of GPU memory")
    except NotImplementedError as exc:
        pytest.skip(f"not implemented in this torch: {str(exc).splitlines()[0]}")


def run_benchmark(benchmark, request, inputs, fn, nbytes, min_bytes, flops=None):
    """Times fn, measures its memory once more outside the timing, and fills extra_info."""
    device, peak_gbps = request.getfixturevalue("device"), request.getfixturevalue("peak_gbps")
    params = request.node.callspec.params
    c, x = inputs
    op = request.node.originalname.removeprefix("test_")
    benchmark.group = f"{op} {params['config']} {params['pass_']}"
    warmup, timed_rounds = rounds(device)
    timing = request.getfixturevalue("timed")(fn, timed_rounds, warmup)
    memory = request.getfixturevalue("memory_of")(fn)
    seconds = benchmark.stats.stats.mean
    ev = x.values.element_size()
    benchmark.extra_info.update(
        op=op, device=str(device), dtype=str(x.values.dtype).removeprefix("torch."),
        bytes_moved=nbytes, gbps=round(nbytes / seconds / 1e9, 2),
        pct_peak=round(100 * nbytes / seconds / 1e9 / peak_gbps, 1), peak_gbps=peak_gbps,
        min_bytes=min_bytes, pct_roofline=round(100 * min_bytes / seconds / 1e9 / peak_gbps, 1),
        n_slots=c.n_slots, unique_rows=x.unique_rows,
        dense_grad_mb=round(c.n_slots * c.d_value * ev / 2**20, 1),
        row_grads_mb=round(x.unique_rows * c.d_value * ev / 2**20, 1),
        **timing, **memory)
    if flops is not None:
        benchmark.extra_info["gflops"] = round(flops / seconds / 1e9, 1)


def parametrize(passes):
    """backend, config and pass_ as separate parameters, so each lands in the JSON's params."""
    def apply(test):
        for name, values in (("backend", BACKENDS), ("config", list(CONFIGS)), ("pass_", passes)):
            test = pytest.mark.parametrize(name, values)(test)
        return test
    return apply


@pytest.fixture
def inputs(device, backend, config):
    """(Config, Inputs) for the test's parameters; skips what cannot run on this machine."""
    skip_unless_runnable(backend, config, device)
    with skip_on_oom():
        return CONFIGS[config], inputs_for(config, device)


@parametrize(PASSES)
def test_gather(benchmark, request, inputs, backend, pass_):
    c, x = inputs
    ev, ew = x.values.element_size(), x.weights.element_size()
    nbytes, min_bytes = (gather_bytes(c, ev, ew, x.unique_rows, pass_, minimal) for minimal in (False, True))
    with skip_on_oom(), backend_scope(backend):
        run_benchmark(benchmark, request, inputs, pass_fn(*gather_ops(backend, x), pass_), nbytes, min_bytes)


@parametrize(PASSES)
def test_topk(benchmark, request, inputs, backend, pass_):
    c, x = inputs
    eq = x.query.element_size()
    nbytes = passes_sum(topk_fwd_bytes(c, eq), topk_bwd_bytes(c, eq), pass_)
    with skip_on_oom(), backend_scope(backend):
        run_benchmark(benchmark, request, inputs, pass_fn(*topk_ops(backend, x, c.k), pass_), nbytes, nbytes,
                      flops=topk_flops(c, pass_))


@parametrize(("fwd_bwd",))
def test_lookup(benchmark, request, inputs, backend, pass_):
    c, x = inputs
    ev, eq = x.values.element_size(), x.query.element_size()
    topk_softmax = topk_fwd_bytes(c, eq) + topk_bwd_bytes(c, eq) + softmax_bytes(c, ev)
    nbytes, min_bytes = (topk_softmax + gather_bytes(c, ev, ev, x.unique_rows, pass_, minimal)
                         for minimal in (False, True))
    with skip_on_oom(), backend_scope(backend):
        run_benchmark(benchmark, request, inputs, lookup_step(backend, x, c.k), nbytes, min_bytes,
                      flops=topk_flops(c, pass_))


# The optimizer step has no backward of its own: "fwd" is the step itself.
@parametrize(("fwd",))
def test_adam_step(benchmark, request, inputs, backend, pass_):
    c, x = inputs
    nbytes = adam_bytes(c, x.values.element_size(), x.unique_rows)
    with skip_on_oom(), backend_scope(backend):
        row_grads = torch.randn(x.unique_rows, c.d_value, device=x.values.device, dtype=x.values.dtype).mul_(1e-3)
        run_benchmark(benchmark, request, inputs, adam_step(backend, x, row_grads), nbytes, nbytes)
