"""`triton` backend: Triton kernels for the adapter side of the LoRA ops (CUDA, or CPU tensors under
TRITON_INTERPRET=1); the frozen GEMMs go to cuBLAS (see composite.py).

Many adapters run as SGMV segments: rows sorted by adapter (naive.segments) are cut into tiles that
never straddle two adapters, and a program finds its tile's adapter from the running tile count per
adapter — computed on the device, so nothing waits for the host. Each kernel reads its rows through
`perm`, so x and dy are never copied into sorted order. tl.dot accumulates in fp32 (IEEE for fp32
inputs, so fp32 results match the reference); the per-adapter gradient sums add their row tiles
with fp32 atomics.
"""
import torch
import triton
import triton.language as tl

from ... import backends
from . import composite, naive

_BLOCK_ROWS = 32      # rows per shrink / expand tile
_OUTER_ROWS = 256     # rows per grouped-outer tile (looped in _BLOCK_ROWS steps)
_BLOCK_K = 64
_BLOCK_COLS = 64
_DROPOUT_BLOCK = 1024
_ADAPTER_BLOCK = 64   # adapters scanned per step when a program looks up its tile's adapter
_M32 = 0xFFFFFFFF


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_pad(r):
    return max(16, triton.next_power_of_2(r))


def _tile_ends(offsets, block_rows):
    """Inclusive running count of row tiles per adapter, (n,) on the device."""
    counts = offsets[2:] - offsets[1:-1]
    return ((counts + block_rows - 1) // block_rows).cumsum(0)


def _max_tiles(n_rows, n_adapters, block_rows):
    """A grid that covers every tile without reading the tile count back from the device."""
    return triton.cdiv(n_rows, block_rows) + n_adapters


# ---- dropout ----------------------------------------------------------------------------------------

@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["seed", "threshold"])  # a new seed every step must not recompile
def _dropout_kernel(x_ptr, out_ptr, n_cols, seed, threshold, inv_keep, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = _fmix32(((row * 0x9E3779B1) & 0xFFFFFFFF) ^ seed)
    h = _fmix32((h + cols.to(tl.int64)) & 0xFFFFFFFF)
    keep = (h >> 8) < threshold
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = tl.where(keep, x * inv_keep, 0.0)
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def dropout(x, p, seed):
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        grid = (x.shape[0], triton.cdiv(x.shape[1], _DROPOUT_BLOCK))
        with backends.on_device(x.device):
            _dropout_kernel[grid](x, out, x.shape[1], seed & _M32, naive.keep_threshold(p), 1.0 / (1.0 - p),
                                  BLOCK=_DROPOUT_BLOCK)
    return out


# ---- segments ---------------------------------------------------------------------------------------

@triton.jit
def _locate(tile_ends_ptr, offsets_ptr, n_adapters, tile, BM: tl.constexpr, A_BLOCK: tl.constexpr):
    """(adapter, first row, end row) of sorted-row tile `tile`; first == end past the last tile.

    The adapter is the number of adapters whose tiles all end at or before `tile`, counted
    A_BLOCK at a time (a fixed block: no recompile per adapter count)."""
    adapter = tile * 0  # int32 zeros, so the loop-carried values keep one type
    start = tile * 0
    while start < n_adapters:
        idx = start + tl.arange(0, A_BLOCK)
        ends = tl.load(tile_ends_ptr + idx, mask=idx < n_adapters, other=2**40)
        adapter += tl.sum((ends <= tile).to(tl.int32), axis=0)
        start += A_BLOCK
    valid = adapter < n_adapters
    before = tl.load(tile_ends_ptr + adapter - 1, mask=valid & (adapter > 0), other=0)
    seg_start = tl.load(offsets_ptr + adapter + 1, mask=valid, other=0)
    seg_end = tl.load(offsets_ptr + adapter + 2, mask=valid, other=0)
    first = seg_start + (tile - before) * BM
    return adapter, first, tl.where(valid, seg_end, first)


@triton.jit(do_not_specialize=["n_adapters", "R"])
def _shrink_kernel(src_ptr, perm_ptr, w_ptr, scales_ptr, out_ptr, tile_ends_ptr, offsets_ptr, n_adapters, K, R,
                   src_stride, w_sa, w_sj, w_sk, BM: tl.constexpr, BK: tl.constexpr,
                   R_PAD: tl.constexpr, A_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    adapter, first, end = _locate(tile_ends_ptr, offsets_ptr, n_adapters, tl.program_id(0), BM, A_BLOCK)
    if first < end:
        rows = first + tl.arange(0, BM)
        row_mask = rows < end
        src_rows = tl.load(perm_ptr + rows, mask=row_mask, other=0)
        j = tl.arange(0, R_PAD)
        j_mask = j < R
        w_base = w_ptr + adapter.to(tl.int64) * w_sa
        acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        k0 = tl.program_id(0) * 0
        while k0 < K:  # not range(): the interpreter rejects a runtime bound there (numpy >= 2.4)
            k = k0 + tl.arange(0, BK)
            k_mask = k < K
            x = tl.load(src_ptr + src_rows[:, None] * src_stride + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + k[:, None] * w_sk + j[None, :] * w_sj, mask=k_mask[:, None] & j_mask[None, :],
                        other=0.0)
            acc += tl.dot(x, w, input_precision=PRECISION)
            k0 += BK
        acc = acc * tl.load(scales_ptr + adapter)
        tl.store(out_ptr + rows[:, None] * R + j[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & j_mask[None, :])


@triton.jit(do_not_specialize=["n_adapters", "R"])
def _expand_kernel(dst_ptr, perm_ptr, small_ptr, w_ptr, scales_ptr, tile_ends_ptr, offsets_ptr, n_adapters, C, R,
                   dst_stride, w_sa, w_sj, w_sk, BM: tl.constexpr, BN: tl.constexpr,
                   R_PAD: tl.constexpr, A_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    adapter, first, end = _locate(tile_ends_ptr, offsets_ptr, n_adapters, tl.program_id(0), BM, A_BLOCK)
    if first < end:
        rows = first + tl.arange(0, BM)
        row_mask = rows < end
        dst_rows = tl.load(perm_ptr + rows, mask=row_mask, other=0)
        j = tl.arange(0, R_PAD)
        j_mask = j < R
        c = tl.program_id(1) * BN + tl.arange(0, BN)
        c_mask = c < C
        small = tl.load(small_ptr + rows[:, None] * R + j[None, :], mask=row_mask[:, None] & j_mask[None, :],
                        other=0.0)
        w = tl.load(w_ptr + adapter.to(tl.int64) * w_sa + j[:, None] * w_sj + c[None, :] * w_sk,
                    mask=j_mask[:, None] & c_mask[None, :], other=0.0)
        acc = tl.dot(small, w, input_precision=PRECISION)
        acc = acc * tl.load(scales_ptr + adapter)
        ptrs = dst_ptr + dst_rows[:, None] * dst_stride + c[None, :]
        mask = row_mask[:, None] & c_mask[None, :]
        old = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (old + acc).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_adapters", "R"])
def _grouped_outer_kernel(small_ptr, big_ptr, perm_ptr, out_ptr, tile_ends_ptr, offsets_ptr, n_adapters, C, R,
                          big_stride, TILE_ROWS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          R_PAD: tl.constexpr, A_BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    adapter, first, end = _locate(tile_ends_ptr, offsets_ptr, n_adapters, tl.program_id(0), TILE_ROWS, A_BLOCK)
    if first < end:
        j = tl.arange(0, R_PAD)
        j_mask = j < R
        c = tl.program_id(1) * BN + tl.arange(0, BN)
        c_mask = c < C
        acc = tl.zeros((R_PAD, BN), dtype=tl.float32)
        for step in range(0, TILE_ROWS, BM):
            rows = first + step + tl.arange(0, BM)
            row_mask = rows < end
            small_t = tl.load(small_ptr + rows[None, :] * R + j[:, None], mask=j_mask[:, None] & row_mask[None, :],
                              other=0.0)
            big_rows = tl.load(perm_ptr + rows, mask=row_mask, other=0)
            big = tl.load(big_ptr + big_rows[:, None] * big_stride + c[None, :],
                          mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            acc += tl.dot(small_t, big, input_precision=PRECISION)
        out = out_ptr + adapter.to(tl.int64) * R * C + j[:, None] * C + c[None, :]
        tl.atomic_add(out, acc, mask=j_mask[:, None] & c_mask[None, :])


@triton.jit
def _dy_products_kernel(dy_ptr, b_ptr, u_ptr, g_part_ptr, db_part_ptr, N, C, R, BM: tl.constexpr,
                        BN: tl.constexpr, TILES: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """One pass over a (BM rows) x (TILES * BN columns) block of dy for both products: dy B, summed
    over the block's columns into g_part[split] (N, R), and uᵀ dy, summed over its rows into
    db_part[row block] (R, C); the caller adds the partials up."""
    rb, split = tl.program_id(0), tl.program_id(1)
    rows = rb * BM + tl.arange(0, BM)
    row_mask = rows < N
    j = tl.arange(0, R_PAD)
    j_mask = j < R
    u_t = tl.load(u_ptr + rows[None, :] * R + j[:, None], mask=j_mask[:, None] & row_mask[None, :], other=0.0)
    g = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for t in range(TILES):  # a constant trip count (tail columns masked) lets the loads pipeline
        cols = (split * TILES + t) * BN + tl.arange(0, BN)
        col_mask = cols < C
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * C + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * R + j[None, :], mask=col_mask[:, None] & j_mask[None, :], other=0.0)
        g += tl.dot(dy, b, input_precision=PRECISION)
        db = tl.dot(u_t, dy, input_precision=PRECISION)
        tl.store(db_part_ptr + (rb * R + j[:, None]).to(tl.int64) * C + cols[None, :], db,
                 mask=j_mask[:, None] & col_mask[None, :])
    tl.store(g_part_ptr + (split * N + rows[:, None]).to(tl.int64) * R + j[None, :], g,
             mask=row_mask[:, None] & j_mask[None, :])


_DY_ROWS = 256  # rows per program: the row-block partials of uᵀ dy cost 4 * r * out bytes each
_DY_COLS = 64


def dy_products(grad_y, lora_b, u):
    """(dy B, uᵀ dy) in fp32 from one read of dy (the two cuBLAS products read it twice)."""
    n, c = grad_y.shape
    rank = u.shape[1]
    if n == 0 or c == 0:
        return grad_y.new_zeros(n, rank, dtype=torch.float32), grad_y.new_zeros(rank, c, dtype=torch.float32)
    row_blocks = triton.cdiv(n, _DY_ROWS)
    sms = backends.multiprocessors(grad_y.device) if grad_y.is_cuda else 4
    # at most one wave (the kernel fills an SM's registers with one program of 8 warps)
    splits = max(1, min(triton.cdiv(c, _DY_COLS), sms // row_blocks))
    # column tiles per program: a compile-time count (pipelined loop), a power of two so that batches of
    # varying length compile a few kernels, not one per length
    tiles = triton.next_power_of_2(triton.cdiv(triton.cdiv(c, _DY_COLS), splits))
    splits = triton.cdiv(c, tiles * _DY_COLS)
    g_part = grad_y.new_empty(splits, n, rank, dtype=torch.float32)
    db_part = grad_y.new_empty(row_blocks, rank, c, dtype=torch.float32)
    with backends.on_device(grad_y.device):
        _dy_products_kernel[(row_blocks, splits)](
            grad_y, lora_b, u, g_part, db_part, n, c, rank, BM=_DY_ROWS, BN=_DY_COLS, TILES=tiles,
            R_PAD=_rank_pad(rank), PRECISION=_precision(grad_y.dtype), num_warps=8)
    return g_part.sum(0), db_part.sum(0)


def _scales_or_ones(scales, n_adapters, device):
    """One kernel for both: a unit scale where the caller has none (fewer Triton compiles)."""
    return torch.ones(n_adapters, device=device) if scales is None else scales


def _segment_args(offsets, n_adapters, block_rows):
    return _tile_ends(offsets, block_rows), offsets, n_adapters


def shrink(src, perm, offsets, w, scales):
    n_adapters, rank, k = w.shape
    out = torch.zeros(src.shape[0], rank, dtype=src.dtype, device=src.device)
    if src.shape[0] == 0:
        return out
    grid = (_max_tiles(src.shape[0], n_adapters, _BLOCK_ROWS),)
    with backends.on_device(src.device):
        _shrink_kernel[grid](src, perm, w, _scales_or_ones(scales, n_adapters, src.device), out,
                             *_segment_args(offsets, n_adapters, _BLOCK_ROWS), k, rank, src.stride(0), *w.stride(),
                             BM=_BLOCK_ROWS, BK=_BLOCK_K, R_PAD=_rank_pad(rank),
                             A_BLOCK=_ADAPTER_BLOCK, PRECISION=_precision(src.dtype))
    return out


def expand_(dst, perm, offsets, small, w, scales):
    n_adapters, rank, cols = w.shape
    if dst.shape[0] == 0:
        return dst
    grid = (_max_tiles(dst.shape[0], n_adapters, _BLOCK_ROWS), triton.cdiv(cols, _BLOCK_COLS))
    with backends.on_device(dst.device):
        _expand_kernel[grid](dst, perm, small, w, _scales_or_ones(scales, n_adapters, dst.device),
                             *_segment_args(offsets, n_adapters, _BLOCK_ROWS), cols, rank, dst.stride(0), *w.stride(),
                             BM=_BLOCK_ROWS, BN=_BLOCK_COLS, R_PAD=_rank_pad(rank),
                             A_BLOCK=_ADAPTER_BLOCK, PRECISION=_precision(dst.dtype))
    return dst


def grouped_outer(small, big, perm, offsets, n_adapters):
    rank, cols = small.shape[1], big.shape[1]
    out = torch.zeros(n_adapters, rank, cols, dtype=torch.float32, device=big.device)
    if big.shape[0] == 0:
        return out
    grid = (_max_tiles(big.shape[0], n_adapters, _OUTER_ROWS), triton.cdiv(cols, _BLOCK_COLS))
    with backends.on_device(big.device):
        _grouped_outer_kernel[grid](small, big, perm, out, *_segment_args(offsets, n_adapters, _OUTER_ROWS), cols,
                                    rank, big.stride(0), TILE_ROWS=_OUTER_ROWS, BM=_BLOCK_ROWS, BN=_BLOCK_COLS,
                                    R_PAD=_rank_pad(rank), A_BLOCK=_ADAPTER_BLOCK,
                                    PRECISION=_precision(big.dtype))
    return out


# ---- the joined-weight forward's input: [x | s·x Aᵀ] ------------------------------------------------------

@triton.jit(do_not_specialize=["scale"])
def _x_and_u_kernel(x_ptr, a_ptr, xu_ptr, u_ptr, N, K, R, ld_xu, scale, BM: tl.constexpr, BK: tl.constexpr,
                    K_TILES: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Rows of x copied into xu's first K columns while u = x Aᵀ accumulates, one read of x; then u
    into u_ptr and s·u into xu's last R columns, both rounded once from fp32."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < N
    j = tl.arange(0, R_PAD)
    j_mask = j < R
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for t in range(K_TILES):  # a compile-time trip count (one per layer width): the loads pipeline
        cols = t * BK + tl.arange(0, BK)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
        tl.store(xu_ptr + rows[:, None].to(tl.int64) * ld_xu + cols[None, :], x, mask=mask)
        a_t = tl.load(a_ptr + j[None, :] * K + cols[:, None], mask=j_mask[None, :] & (cols < K)[:, None], other=0.0)
        acc += tl.dot(x, a_t, input_precision=PRECISION)
    out_mask = row_mask[:, None] & j_mask[None, :]
    tl.store(u_ptr + rows[:, None].to(tl.int64) * R + j[None, :], acc.to(u_ptr.dtype.element_ty), mask=out_mask)
    tl.store(xu_ptr + rows[:, None].to(tl.int64) * ld_xu + K + j[None, :], (acc * scale).to(xu_ptr.dtype.element_ty),
             mask=out_mask)


_X_AND_U_ROWS = 32  # 256 programs at 8,192 rows: about two per SM on an H100
_X_AND_U_COLS = 128


def x_and_u(x, lora_a, scale, xu):
    n, k = x.shape
    rank = lora_a.shape[0]
    u = x.new_empty(n, rank)
    if n:
        with backends.on_device(x.device):
            _x_and_u_kernel[(triton.cdiv(n, _X_AND_U_ROWS),)](
                x, lora_a, xu, u, n, k, rank, xu.stride(0), float(scale), BM=_X_AND_U_ROWS, BK=_X_AND_U_COLS,
                K_TILES=triton.cdiv(k, _X_AND_U_COLS), R_PAD=_rank_pad(rank), PRECISION=_precision(x.dtype), num_warps=4)
    return u


# ---- the backend interface (functional.py) ---------------------------------------------------------

class _Kernels:
    dropout = staticmethod(dropout)
    dy_products = staticmethod(dy_products)
    shrink = staticmethod(shrink)
    expand_ = staticmethod(expand_)
    grouped_outer = staticmethod(grouped_outer)
    x_and_u = staticmethod(x_and_u)


lora_forward, lora_backward, multi_forward, multi_backward = composite.bind(_Kernels)
