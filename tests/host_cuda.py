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


def kv_decode_mma(library, query, packed, residual_keys, residual_values, scale, tokens_per_split,
                  n_splits=None, l2_prefetch=True):
    """Runs the tensor-core decode kernel over the packed cache (a PackedKV on the CPU) and merges
    its split-K partials in fp32 as kvcache.cu's merge kernel does. n_splits None: as plan_splits
    makes them, the residual window's split after the packed ones; given: the last split also
    holds packed tokens."""
    b, hq, q_len, d = query.shape
    _, hkv, packed_len, _ = packed.key_codes.shape
    heads, rows, residual_len = b * hkv, hq // hkv * q_len, residual_keys.shape[2]
    if n_splits is None:
        n_splits = -(-packed_len // tokens_per_split) + 1
    parts = torch.full((heads * n_splits * rows * (d + 2) + 64,), float("nan"))  # 64: a guard past the end
    part_m, part_l = parts[:heads * n_splits * rows], parts[heads * n_splits * rows:2 * heads * n_splits * rows]
    part_acc = parts[2 * heads * n_splits * rows:-64]
    inputs = [query, residual_keys, residual_values, *packed.tensors()]
    readable = (_Buffer * len(inputs))(*[(t.data_ptr(), t.numel() * t.element_size()) for t in inputs])
    run = library.engram_kv_decode_mma
    run.restype = ctypes.c_char_p
    error = run(ctypes.c_int(query.dtype == torch.bfloat16), ctypes.c_int(packed.bits), ctypes.c_int(d),
                ctypes.c_int64(heads), ctypes.c_int64(packed_len), ctypes.c_int64(residual_len),
                ctypes.c_int(rows), ctypes.c_int(q_len), ctypes.c_int(packed.group_size), ctypes.c_float(scale),
                ctypes.c_int64(tokens_per_split), ctypes.c_int(n_splits), ctypes.c_int(l2_prefetch),
                *map(_pointer, inputs), _pointer(part_m), _pointer(part_l), _pointer(part_acc),
                readable, ctypes.c_int(len(inputs)))
    if error:
        raise RuntimeError(error.decode())
    assert parts[-64:].isnan().all(), "the kernel wrote past its partials"
    return _merge(part_m.view(heads, n_splits, rows), part_l.view(heads, n_splits, rows),
                  part_acc.view(heads, n_splits, rows, d)).view(b, hq, q_len, d).to(query.dtype)


def _merge(m, l, acc):
    """Split-K partials (max, sum, unnormalized output) -> the softmax-weighted output, fp32."""
    weight = torch.exp(m - m.amax(1, keepdim=True)).nan_to_num_(0.0)  # -inf parts (nothing seen): 0
    return (weight.unsqueeze(-1) * acc).sum(1) / (weight * l).sum(1).unsqueeze(-1)


def lora_dy_products(library, grad_y, lora_b, u, target_blocks):
    """(dy B (N, r), uᵀ dy (r, C)) in fp32 from the fused kernel, its grid planned for about
    `target_blocks` blocks; ranks below 16 zero-padded as the cuda backend pads them."""
    (n, c), rank = grad_y.shape, u.shape[1]
    lora_b, u = (torch.nn.functional.pad(t, (0, 16 - rank)).contiguous() for t in (lora_b, u))
    run = library.engram_lora_dy_products
    run.restype = ctypes.c_char_p
    plan = (ctypes.c_int64 * 3)()
    args = [ctypes.c_int(grad_y.dtype == torch.bfloat16), *map(_pointer, (grad_y, lora_b, u))]
    run(*args, None, None, ctypes.c_int64(n), ctypes.c_int64(c), ctypes.c_int64(target_blocks), plan, None, 0)
    row_blocks, splits = plan[0], plan[1]
    g_part = torch.full((splits * n * 16 + 64,), float("nan"))  # 64: a guard past the end
    d_part = torch.full((row_blocks * 16 * c + 64,), float("nan"))
    inputs = [grad_y, lora_b, u]
    readable = (_Buffer * len(inputs))(*[(t.data_ptr(), t.numel() * t.element_size()) for t in inputs])
    error = run(*args, _pointer(g_part), _pointer(d_part), ctypes.c_int64(n), ctypes.c_int64(c),
                ctypes.c_int64(target_blocks), plan, readable, ctypes.c_int(len(inputs)))
    if error:
        raise RuntimeError(error.decode())
    assert g_part[-64:].isnan().all() and d_part[-64:].isnan().all(), "the kernel wrote past its partials"
    g = g_part[:-64].view(splits, n, 16).sum(0)[:, :rank]
    d = d_part[:-64].view(row_blocks, 16, c).sum(0)[:rank]
    return g, d
