"""Where the time of a LoRA forward+backward and of a KV decode call goes, kernel by kernel
(torch.profiler): the overhead over `base` / SDPA split into the kernels that make it up.

    python scripts/gpu_profile.py [--lora] [--kv] [--calls N]     (default both, 5 calls each)

On a GPU: LoRA at `llama8b` (bf16; base, triton, cuda, and both again at `llama8b_joined`: W and B
in one buffer, the forward one GEMM over [x | s·u]), KV decode at 32k and 128k (int4; SDPA, cuda,
triton), device time per kernel. Without one: LoRA at `smollm2` (fp32; base, cpu) and KV decode at 8k
(torch SDPA, cpu), CPU time per op, so the script can be checked anywhere (there the compiled
extensions' own calls are not profiled ops and do not show).
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "scripts")]

from engram_kernels import backends  # noqa: E402
from engram_kernels.ops.kvcache import decode_attention  # noqa: E402


def per_call_times(fn, device, calls):
    """[(name, µs per call)] of what `fn` runs, largest first (self time, so nothing counts twice)."""
    for _ in range(3):
        fn()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if gpu:
            torch.cuda.synchronize(device)
    times = []
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if gpu \
            else event.self_cpu_time_total
        if us > 0:
            times.append((event.key, us / calls))
    return sorted(times, key=lambda item: -item[1])


def report(title, fn, device, calls, top=8):
    times = per_call_times(fn, device, calls)
    print(f"{title}: {sum(us for _, us in times):.1f} µs per call")
    for name, us in times[:top]:
        print(f"  {us:9.1f} µs  {name[:110]}")


def profile_lora(device, calls):
    import test_lora_bench as bench
    runs = [("llama8b", "base"), ("llama8b", "triton"), ("llama8b", "cuda"), ("llama8b_joined", "triton"),
            ("llama8b_joined", "cuda")] if device.type == "cuda" else [("smollm2", "base"), ("smollm2", "cpu")]
    for name, backend in runs:
        if backend != "base" and not backends.is_available(backend, device.type, "lora"):
            print(f"lora {name} {backend}: unavailable")
            continue
        config, inputs = bench.resolved(name, device), bench.inputs_for(name, device)
        with bench.backend_scope(backend):
            fwd, grads_of = bench.layer_ops(backend, config, inputs)
            report(f"lora {name} fwd+bwd {backend}", lambda: grads_of(fwd()), device, calls)


def profile_kv(device, calls):
    from kv_decode_probe import make_case
    contexts = (32768, 131072) if device.type == "cuda" else (8192,)
    kernels = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 compute is slow on CPUs
    for context in contexts:
        query, keys, values, packed, rk, rv = make_case(context, device=device, dtype=dtype)
        report(f"kv {context} sdpa", lambda: F.scaled_dot_product_attention(query, keys, values, enable_gqa=True),
               device, calls)
        for backend in kernels:
            if not backends.is_available(backend, device.type, "kvcache"):
                print(f"kv {context} {backend}: unavailable")
                continue
            with backends.use_backend(backend):
                report(f"kv {context} {backend}", lambda: decode_attention(query, packed, rk, rv, check_values=False),
                       device, calls)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--kv", action="store_true")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    both = not (args.lora or args.kv)
    if args.lora or both:
        profile_lora(device, args.calls)
    if args.kv or both:
        profile_kv(device, args.calls)


if __name__ == "__main__":
    main()
