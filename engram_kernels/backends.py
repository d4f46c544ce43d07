"""The one place that decides which backend runs an op.

Order of preference per device: on GPUs per op family (GPU_PREFERENCE: cuda first for the memory
ops and the KV cache, triton first for LoRA, as measured), cpu > torch on CPUs.
`ENGRAM_BACKEND=torch|cpu|triton|cuda` (or `use_backend(...)`) forces one; a forced backend that
cannot run on the tensor's device falls back to the best available one with a one-line notice.
Triton runs on CPU tensors only under `TRITON_INTERPRET=1`, and only when forced.

Each op family (`memory`, `lora`, `kvcache`) has its own compiled extensions,
`engram_kernels._C_<family>_cpu` and `_C_<family>_cuda`, so availability is per family.
"""
import contextlib
import functools
import importlib
import logging
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
FAMILIES = ("memory", "lora", "kvcache")
ENV_VAR = "ENGRAM_BACKEND"
log = logging.getLogger("engram_kernels")

_forced = None
_notified = set()
_status = {}


def notice(message):
    """Log `message` once per process (a one-line notice, never an exception)."""
    if message not in _notified:
        _notified.add(message)
        log.warning("engram_kernels: %s", message)


@functools.cache
def extension(name):
    """Import a compiled extension (`_C_memory_cpu`, ...), or None with the reason in `_status`."""
    if name.endswith("_cuda") and not torch.cuda.is_available():
        _status[name] = "unavailable (no CUDA device)"
        return None
    try:
        module = importlib.import_module(f"engram_kernels.{name}")
    except Exception as exc:  # a missing or broken build must degrade, never raise
        _status[name] = f"unavailable ({type(exc).__name__}: {exc})".splitlines()[0]
        return None
    _status[name] = "loaded"
    return module


def require_extension(name):
    """The compiled extension `name`, or a RuntimeError saying why it is unavailable."""
    module = extension(name)
    if module is None:
        raise RuntimeError(f"engram_kernels.{name} is {_status[name]}")
    return module


def triton_available(device_type):
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return device_type in ("cuda", "cpu")


def extension_name(backend, family):
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; choose from {FAMILIES}")
    return f"_C_{family}_{backend}"


def is_available(backend, device_type, family="memory"):
    if backend in ("cpu", "cuda"):
        return device_type == backend and extension(extension_name(backend, family)) is not None
    if backend == "torch":
        return True
    if backend == "triton":
        return triton_available(device_type)
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")


# On GPUs, the faster backend per family as measured on an H200 (benchmarks/results/nvidia-h200-
# 20261126-1137.json and -1144.json): the CUDA gather kernels beat Triton's; for LoRA (llama8b
# fwd+bwd 3.04 vs 3.27 ms, multi64 3.88 vs 10.55 ms) Triton wins; KV decode (-20261127-1447.json):
# the tensor-core CUDA kernel (32k: 0.053 vs 0.158 ms, 128k: 0.170 vs 0.218 ms, int4).
GPU_PREFERENCE = {"memory": ("cuda", "triton", "torch"), "lora": ("triton", "cuda", "torch"),
                  "kvcache": ("cuda", "triton", "torch")}


def preference(device_type, family="memory"):
    return GPU_PREFERENCE[family] if device_type == "cuda" else ("cpu", "torch")


# os.environ.get costs ~1-2 us (Mapping.get, key encoding, value decoding) and a decode step asks once
# per layer, so on POSIX the hot path reads the dict os.environ keeps of its encoded items (present
# since Python 3.2; os.environ.get where it is not).
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_VAR_KEY = os.fsencode(ENV_VAR)


def _forced_name():
    if _forced is not None:
        return _forced
    if isinstance(_ENVIRON_DATA, dict):
        name = _ENVIRON_DATA.get(_ENV_VAR_KEY)
        return os.fsdecode(name) if name else None
    return os.environ.get(ENV_VAR) or None


def forced_backend():
    name = _forced_name()
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; choose from {', '.join(BACKENDS)}")
    return name


def choose(device, family="memory"):
    """Name of the backend that runs `family`'s ops on `device` (a torch.device or its type string)."""
    device_type = torch.device(device).type
    forced = forced_backend()
    if forced is not None:
        if is_available(forced, device_type, family):
            return forced
        notice(f"backend {forced!r} is unavailable for {family} ops on {device_type}; "
               f"{describe(forced, family)}; falling back")
    for name in preference(device_type, family):
        if is_available(name, device_type, family):
            return name
    return "torch"


BACKEND_MODULES = {"torch": "naive", "cpu": "cpu_ext", "triton": "triton_kernels", "cuda": "cuda_ext"}


@functools.cache
def multiprocessors(device):
    """SM count of a CUDA device (cached: launch heuristics ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device):
    """The context that makes `device` current for a Triton launch (Triton launches on the current
    CUDA device), entered only when it is not current already: decode steps launch once per layer."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


_op_modules = {}  # (family, device, forced backend) -> module, where no fallback notice was due


def op_module(family, device):
    """The module of engram_kernels.ops.<family> implementing its ops for the backend chosen on `device`
    (memoized: decode steps call it once per layer and token, so the hit costs a dict lookup)."""
    key = (family, device, _forced_name())
    module = _op_modules.get(key)
    if module is None:
        forced = forced_backend()  # validates the name
        name = choose(device, family)
        module = importlib.import_module(f"engram_kernels.ops.{family}.{BACKEND_MODULES[name]}")
        if forced in (None, name):  # a fallback is looked up again, so that its notice still shows
            _op_modules[key] = module
    return module


def describe(backend, family="memory"):
    if backend in ("cpu", "cuda"):
        name = extension_name(backend, family)
        extension(name)
        return f"{'C++' if backend == 'cpu' else 'CUDA'} extension {name} {_status[name]}"
    if backend == "triton":
        return "triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    return "always available"


@contextlib.contextmanager
def use_backend(name):
    """Force `name` for the ops run inside the block (overrides ENGRAM_BACKEND)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def report():
    """Backend availability per op family and device type, for `python -m engram_kernels`."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"{f} on {d}: chosen={choose(d, f)}; " + ", ".join(
        f"{b}={'yes' if is_available(b, d, f) else 'no'}" for b in BACKENDS) for f in FAMILIES for d in devices]
    lines += [f"{name}: {state}" for name, state in sorted(_status.items())]
    return "\n".join(lines)
