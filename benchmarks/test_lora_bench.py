"""Benchmarks of the LoRA ops: `pytest benchmarks/test_lora_bench.py --benchmark-only` (not part of CI).

Parametrized by `backend`, `config` and `pass_` (fwd, bwd, fwd_bwd) like the memory benchmarks;
extra_info holds the shapes, the overhead over `base` and the memory (conftest.measure_memory, plus
`activation_mb`: what a forward leaves allocated for its backward, output included).

Backends: `base` is the frozen linear layer alone (F.linear), the floor a LoRA layer cannot beat;
`torch|cpu|triton|cuda` run the public ops under use_backend(name) (`torch` is the reference);
`peft` is peft's LoRA layer (eager; `adapter_names=` per row for many adapters); `loop` a plain
torch loop over adapters (index, two matmuls, index_add; many adapters only); `compiled` the
reference under torch.compile (GPU, single adapter).

Configs: `smollm2` (576 -> 1536, r 16, 4096 tokens, fp32, CPU only) and `llama8b` (4096 -> 14336,
r 16, 8192 tokens, bf16, GPU only); `multi8` / `multi64` put 8 / 64 adapters on the `smollm2` shapes
on CPU and the `llama8b` shapes on GPU, one adapter per 32-token sequence drawn with Zipf weights
(uneven), sequences in random order. `llama8b_joined` keeps W and B in one buffer, as
LoRALinear(join_weights=True) does, so the GPU backends' forward is one GEMM over [x | s·u]
(`base`, `triton` and `cuda` only). To keep the GPU run near a minute, the many-adapter configs
there skip the `bwd` pass (fwd_bwd minus fwd) and the `torch` reference (`loop` stands in).

    pytest benchmarks/test_lora_bench.py --benchmark-only -k "smollm2 or multi"          # CPU
    pytest benchmarks/test_lora_bench.py --benchmark-only -k "llama8b or multi"          # GPU
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
from engram_kernels.ops.lora import composite, naive


@dataclasses.dataclass(frozen=True)
class Config:
    n_tokens: int = 4096
    d_in: int = 576
    d_out: int = 1536
    r: int = 16
    n_adapters: int = 0      # 0: one plain adapter (lora_linear); n: lora_linear_multi
    devices: tuple = ("cpu", "cuda")
    seq_len: int = 32        # tokens per sequence (one adapter each) in the multi configs
    joined: bool = False     # W and B as column blocks of one buffer (LoRALinear(join_weights=True))


SMOLLM2 = Config(devices=("cpu",))
LLAMA8B = Config(n_tokens=8192, d_in=4096, d_out=14336, devices=("cuda",))
CONFIGS = {"smollm2": SMOLLM2, "llama8b": LLAMA8B, "llama8b_joined": dataclasses.replace(LLAMA8B, joined=True),
           "multi8": Config(n_adapters=8), "multi64": Config(n_adapters=64)}
KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")
BACKENDS = ("base", "torch", "cpu", "triton", "cuda", "peft", "loop", "compiled")
PASSES = ("fwd", "bwd", "fwd_bwd")
ALPHA = 32


def resolved(name, device):
    """The config's shapes on this device: the multi configs take llama8b's shapes on GPUs."""
    c = CONFIGS[name]
    if c.n_adapters and device.type == "cuda":
        return dataclasses.replace(c, n_tokens=LLAMA8B.n_tokens, d_in=LLAMA8B.d_in, d_out=LLAMA8B.d_out)
    return c


def rounds(device):
    return (1, 3) if device.type == "cpu" else (1, 5)  # on GPUs a round is conftest.GPU_CALLS_PER_ROUND calls


# ---- inputs -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    x: torch.Tensor            # (N, in), requires grad
    weight: torch.Tensor       # (out, in), frozen
    lora_a: torch.Tensor       # (r, in) or (n, r, in), requires grad
    lora_b: torch.Tensor       # (out, r) or (n, out, r), requires grad
    grad_y: torch.Tensor       # (N, out)
    adapter_ids: torch.Tensor = None
    scales: torch.Tensor = None


def uneven_ids(c, device, gen):
    """One adapter per c.seq_len-token sequence, Zipf-weighted, sequences in random order."""
    n_seqs = c.n_tokens // c.seq_len
    weights = 1.0 / torch.arange(1, c.n_adapters + 1, dtype=torch.float64)
    per_seq = torch.multinomial(weights, n_seqs, replacement=True, generator=gen)
    return per_seq.repeat_interleave(c.seq_len).to(device)


def make_inputs(c, device, dtype):
    gen = torch.Generator().manual_seed(0)
    stack = (c.n_adapters,) if c.n_adapters else ()

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    x = randn(c.n_tokens, c.d_in).requires_grad_()
    weight = randn(c.d_out, c.d_in, std=c.d_in**-0.5)
    lora_a = randn(*stack, c.r, c.d_in, std=c.d_in**-0.5).requires_grad_()
    lora_b = randn(*stack, c.d_out, c.r, std=0.01)
    if c.joined:
        weight, lora_b = composite.joined_copies(weight, lora_b)
    lora_b.requires_grad_()
    inputs = Inputs(x, weight, lora_a, lora_b, randn(c.n_tokens, c.d_out))
    if c.n_adapters:
        inputs.adapter_ids = uneven_ids(c, device, gen)
        inputs.scales = torch.full((c.n_adapters,), ALPHA / c.r, device=device)
    return inputs


_cached = {}


def inputs_for(name, device):
    key = (name, device.type)
    if key not in _cached:
        _cached.clear()  # one config's tensors at a time (llama8b's weight alone is 117 MB in bf16)
        gc.collect()
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        _cached[key] = make_inputs(resolved(name, device), device, dtype)
    return _cached[key]


def skip_unless_runnable(backend, name, device, pass_):
    c = CONFIGS[name]
    if device.type not in c.devices:
        pytest.skip(f"{name} runs on {' and '.join(c.devices)} only")
    if backend == "compiled" and (device.type != "cuda" or c.n_adapters):
        pytest.skip("torch.compile baseline: GPU, single adapter only")
    if c.joined and backend not in ("base", "triton", "cuda"):
        pytest.skip("the joined layout is timed for the GPU backends that use it")
    if backend == "loop" and not c.n_adapters:
        pytest.skip("the adapter loop is a many-adapter baseline")
    if backend == "triton" and device.type != "cuda":
        pytest.skip("triton on CPU is the interpreter, not worth timing")
    if backend in KERNEL_BACKENDS and not backends.is_available(backend, device.type, "lora"):
        pytest.skip(f"{backend} unavailable on {device.type}: {backends.describe(backend, 'lora')}")
    if backend == "peft":
        pytest.importorskip("peft")
    if device.type == "cuda" and c.n_adapters and (pass_ == "bwd" or backend == "torch"):
        pytest.skip("kept out of the GPU run for time (see the module docstring)")


# ---- the layers, per backend --------------------------------------------------------------------------

def scale_of(c):
    return ALPHA / c.r


@functools.cache
def compiled_reference():
    return torch.compile(naive.lora_linear, dynamic=False)


def peft_layer(c, x):
    """peft's lora.Linear over a Linear sharing x.weight; n adapters named a0..a{n-1}."""
    import peft
    base = torch.nn.Linear(c.d_in, c.d_out, bias=False, device=x.weight.device, dtype=x.weight.dtype)
    base.weight = torch.nn.Parameter(x.weight, requires_grad=False)
    config = peft.LoraConfig(r=c.r, lora_alpha=ALPHA)
    layer = peft.tuners.lora.Linear(base, "a0", config, r=c.r, lora_alpha=ALPHA)
    for a in range(1, max(1, c.n_adapters)):
        layer.update_layer(f"a{a}", c.r, ALPHA, config=config)
    with torch.no_grad():
        for a in range(max(1, c.n_adapters)):
            layer.lora_A[f"a{a}"].weight.copy_(x.lora_a[a] if c.n_adapters else x.lora_a)
            layer.lora_B[f"a{a}"].weight.copy_(x.lora_b[a] if c.n_adapters else x.lora_b)
    params = [p.requires_grad_() for n, p in layer.named_parameters() if "lora_" in n]  # all, not only active
    return layer, params


def loop_forward(x, c):
    """The plain many-adapter loop: per adapter, its rows, two matmuls, index_add into y."""
    y = F.linear(x.x, x.weight)
    for a in range(c.n_adapters):
        rows = (x.adapter_ids == a).nonzero().squeeze(1)
        if rows.numel():
            branch = (x.x.index_select(0, rows) @ x.lora_a[a].t()) @ x.lora_b[a].t()
            y = y.index_add(0, rows, branch, alpha=float(x.scales[a]))
    return y


def layer_ops(backend, c, x):
    """(fwd, grads_of): fwd() -> y; grads_of(y) -> gradients for the trainable inputs."""
    trainable = [x.x, x.lora_a, x.lora_b]
    if backend == "base":
        return (lambda: F.linear(x.x, x.weight)), lambda y: grads(y, [x.x], x.grad_y)
    if backend == "peft":
        layer, params = peft_layer(c, x)
        trainable = [x.x, *params]
        if c.n_adapters:
            names = [f"a{a}" for a in x.adapter_ids.tolist()]
            return (lambda: layer(x.x, adapter_names=names)), lambda y: grads(y, trainable, x.grad_y)
        return (lambda: layer(x.x)), lambda y: grads(y, trainable, x.grad_y)
    if backend == "loop":
        return (lambda: loop_forward(x, c)), lambda y: grads(y, trainable, x.grad_y)
    if backend == "compiled":
        return (lambda: compiled_reference()(x.x, x.weight, x.lora_a, x.lora_b, scale_of(c))), \
            lambda y: grads(y, trainable, x.grad_y)
    if c.n_adapters:
        return (lambda: ek.lora_linear_multi(x.x, x.weight, x.lora_a, x.lora_b, x.scales, x.adapter_ids,
                                             check_values=False)), lambda y: grads(y, trainable, x.grad_y)
    return (lambda: ek.lora_linear(x.x, x.weight, x.lora_a, x.lora_b, scale_of(c))), \
        lambda y: grads(y, trainable, x.grad_y)


def grads(y, inputs, grad_y):
    return torch.autograd.grad(y, inputs, grad_y, retain_graph=True, allow_unused=True)


def pass_fn(fwd, grads_of, pass_):
    if pass_ == "fwd":
        return fwd
    if pass_ == "bwd":
        y = fwd()
        return lambda: grads_of(y)
    return lambda: grads_of(fwd())


# ---- running and recording ---------------------------------------------------------------------------

def backend_scope(backend):
    return backends.use_backend(backend) if backend in KERNEL_BACKENDS else contextlib.nullcontext()


def activation_bytes(fwd, device):
    """Bytes a forward leaves allocated (its output and what autograd saved), inputs excluded."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        y = fwd()
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - start
        del y
        return held
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = fwd()
    try:  # the allocator's allocation / free events, as conftest.allocator_events reads them
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    del y
    return sum(e.nbytes() for e in events if e.name() == "[memory]" and e.device_type().name == "CPU")


def flops(c, pass_):
    base = 2 * c.n_tokens * c.d_in * c.d_out
    branch = 2 * c.n_tokens * c.r * (c.d_in + c.d_out)
    per_pass = {"fwd": base + branch, "bwd": base + 2 * branch}  # bwd: dx only for the frozen weight
    return per_pass["fwd"] + per_pass["bwd"] if pass_ == "fwd_bwd" else per_pass[pass_]


def parametrize(test):
    for name, values in (("backend", BACKENDS), ("config", list(CONFIGS)), ("pass_", PASSES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@parametrize
def test_lora(benchmark, request, device, backend, config, pass_):
    skip_unless_runnable(backend, config, device, pass_)
    c, x = resolved(config, device), inputs_for(config, device)
    benchmark.group = f"lora {config} {pass_}"
    try:
        with backend_scope(backend):
            fwd, grads_of = layer_ops(backend, c, x)
            fn = pass_fn(fwd, grads_of, pass_)
            warmup, timed = rounds(device)
            timing = request.getfixturevalue("timed")(fn, timed, warmup)
            memory = request.getfixturevalue("memory_of")(fn)
            activation = activation_bytes(fwd, device)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of GPU memory")
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        op="lora", device=str(device), dtype=str(x.x.dtype).removeprefix("torch."), n_tokens=c.n_tokens,
        d_in=c.d_in, d_out=c.d_out, r=c.r, n_adapters=c.n_adapters or 1,
        gflops=round(flops(c, pass_) / seconds / 1e9, 1),
        activation_mb=None if activation is None else round(activation / 2**20, 1), **timing, **memory)
