"""CUDA kernel source run on this CPU (csrc/emulation): builds a kernel's host harness with g++ and
calls it through ctypes, so machines without a GPU test the CUDA code itself, not a mirror of it.

Each harness compiles in a few seconds against torch's C++ headers (c10's 16-bit floats only) into
a cache folder keyed by the sources' hash.
"""
import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")


def build(harness, sources, cache):
    """The loaded library of csrc/emulation/<harness>.cpp; `sources` are the files it includes."""
    files = [ROOT / "csrc/emulation" / f"{harness}.cpp", ROOT / "csrc/emulation/host_warps.h"]
    files += [ROOT / s for s in sources]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    library = Path(cache) / f"{harness}-{digest}.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    if not library.exists():
        includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
        # -fno-strict-aliasing: the kernels read 16-bit floats through word-sized loads, as CUDA allows
        command = [CXX, "-O2", "-std=c++20", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wall",
                   "-Wno-unknown-pragmas", *includes, str(files[0]), "-o", str(library)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)}\n{result.stderr[-4000:]}")
    return ctypes.CDLL(str(library))


class _Buffer(ctypes.Structure):  # host_warps::Buffer
    _fields_ = [("data", ctypes.c_void_p), ("bytes", ctypes.c_int64)]


def _pointer(t):
    return ctypes.c_void_p(t.data_ptr())


def _readable(inputs):
    """The (Buffer array, count) arguments that let the kernel read `inputs` and nothing else."""
    buffers = (_Buffer * len(inputs))(*[(t.data_ptr(), t.numel() * t.element_size()) for t in inputs])
    return buffers, ctypes.c_int(len(inputs))


GUARD = 64  # NaN elements past each output: a kernel writing past its output overwrites them


def _guarded(numel, dtype=torch.float32):
    return torch.full((numel + GUARD,), float("nan"), dtype=dtype)


def _checked(error, *outputs):
    """Raises the harness's error, checks the guards; the outputs without them."""
    if error:
        raise RuntimeError(error.decode())
    assert all(t[-GUARD:].isnan().all() for t in outputs), "the kernel wrote past its output"
    return [t[:-GUARD] for t in outputs]


def kv_decode_mma(library, query, packed, residual_keys, residual_values, scale, tokens_per_split,
                  n_splits=None, l2_prefetch=True, fused_merge=True):
    """Runs the tensor-core decode kernel over the packed cache (a PackedKV on the CPU); its last
    block per head merges the split-K partials (fused_merge), or the merge kernel after it. n_splits
    None: as plan_splits makes them, the residual window's split after the packed ones; given: the
    last split also holds packed tokens."""
    b, hq, q_len, d = query.shape
    _, hkv, packed_len, _ = packed.key_codes.shape
    heads, rows, residual_len = b * hkv, hq // hkv * q_len, residual_keys.shape[2]
    if n_splits is None:
        n_splits = -(-packed_len // tokens_per_split) + 1
    stats = heads * n_splits * rows
    part_m, part_l, part_acc = _guarded(stats), _guarded(stats), _guarded(stats * d)
    out, done = _guarded(query.numel(), query.dtype), torch.zeros(heads, dtype=torch.int32)
    inputs = [query, residual_keys, residual_values, *packed.tensors()]
    run = library.engram_kv_decode_mma
    run.restype = ctypes.c_char_p
    error = run(ctypes.c_int(query.dtype == torch.bfloat16), ctypes.c_int(packed.bits), ctypes.c_int(d),
                ctypes.c_int64(heads), ctypes.c_int64(packed_len), ctypes.c_int64(residual_len),
                ctypes.c_int(rows), ctypes.c_int(q_len), ctypes.c_int(packed.group_size), ctypes.c_float(scale),
                ctypes.c_int64(tokens_per_split), ctypes.c_int(n_splits), ctypes.c_int(l2_prefetch),
                *map(_pointer, inputs), _pointer(part_m), _pointer(part_l), _pointer(part_acc), _pointer(out),
                _pointer(done) if fused_merge else None, *_readable(inputs + [part_m, part_l, part_acc]))
    (out,) = _checked(error, out)
    assert not done.any(), "the kernel left its split counters set"
    return out.view(b, hq, q_len, d)


def _dy_products_run(library, dy, b, u, target_blocks, copy_to=None):
    """Plans, then runs the fused dy kernel: its partials (g_part, d_part), the guards checked."""
    n, c = dy.shape
    run = library.engram_lora_dy_products
    run.restype = ctypes.c_char_p
    plan = (ctypes.c_int64 * 3)()
    args = [ctypes.c_int(dy.dtype == torch.bfloat16), _pointer(dy), _pointer(b), None if u is None else _pointer(u)]
    sizes = [ctypes.c_int64(n), ctypes.c_int64(c), ctypes.c_int64(target_blocks), plan]
    copy = [None, ctypes.c_int64(0)] if copy_to is None else [_pointer(copy_to), ctypes.c_int64(copy_to.stride(0))]
    run(*args, None, None, *sizes, None, 0, *copy)
    row_blocks, splits = plan[0], plan[1]
    g_part, d_part = _guarded(splits * n * 16), _guarded(row_blocks * 16 * c)
    error = run(*args, _pointer(g_part), None if u is None else _pointer(d_part), *sizes,
                *_readable([t for t in (dy, b, u) if t is not None]), *copy)
    g_part, d_part = _checked(error, g_part, d_part)
    return g_part.view(splits, n, 16), d_part.view(row_blocks, 16, c)


def lora_dy_products(library, grad_y, lora_b, u, target_blocks):
    """(dy B (N, r), uᵀ dy (r, C)) in fp32 from the fused kernel, its grid planned for about
    `target_blocks` blocks; ranks below 16 zero-padded as the cuda backend pads them."""
    rank = u.shape[1]
    lora_b, u = (torch.nn.functional.pad(t, (0, 16 - rank)).contiguous() for t in (lora_b, u))
    g_part, d_part = _dy_products_run(library, grad_y, lora_b, u, target_blocks)
    return g_part.sum(0)[:, :rank], d_part.sum(0)[:rank]


def lora_x_products(library, x, lora_a, xu, target_blocks):
    """u = x Aᵀ (N, r) in fp32 from the same kernel in its copy mode, which also writes x into xu's
    first columns (xu: a row-major view with padded rows, as composite.padded_rows makes)."""
    rank = lora_a.shape[0]
    a_t = torch.nn.functional.pad(lora_a.t(), (0, 16 - rank)).contiguous()
    g_part, _ = _dy_products_run(library, x, a_t, None, target_blocks, copy_to=xu)
    return g_part.sum(0)[:, :rank]
