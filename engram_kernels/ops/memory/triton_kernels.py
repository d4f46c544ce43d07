"""`triton` backend: Triton kernels for the memory ops (CUDA, or CPU tensors under TRITON_INTERPRET=1).

All math is fp32 whatever the storage dtypes; no atomics anywhere, so every result is deterministic.
Block sizes come from small fixed heuristics (no autotuning): a tile of about `_TILE` elements per
program keeps enough independent loads in flight to stream HBM while staying within registers.

Loop bounds are constexpr (k, L, Dv: a recompile per distinct value, few in practice) or, where they
come from memory, a `while` loop: Triton 3.6's interpreter turns a runtime scalar `range()` bound into a
Python int with int() on a 1-element array, which numpy >= 2.4 rejects.
"""
import torch
import triton
import triton.language as tl

from ... import backends
from . import naive

_TILE = 4096  # elements loaded per program per loop step in the streaming kernels
_MAX_BLOCK_D = 256  # 512 bytes of a bf16 row per program: full sectors, several D-blocks for wide rows


def _block_d(dv):
    return min(triton.next_power_of_2(dv), _MAX_BLOCK_D)


def _block_rows(block_d, count):
    """Rows per tile so that a tile holds about _TILE elements, but no more rows than exist."""
    return max(1, min(_TILE // block_d, triton.next_power_of_2(count)))


# ---- product-key top-k -------------------------------------------------------------------------

@triton.jit
def _row_topk(scores_ptr, n_keys, K: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-k (values descending, int32 indices; lowest index first on ties) of one score row.

    Returned as BLOCK_K vectors padded with -inf / 0 past K. K rounds of max + knock-out.
    """
    keys = tl.arange(0, BLOCK_KEYS)
    slots = tl.arange(0, BLOCK_K)
    row = tl.load(scores_ptr + keys, mask=keys < n_keys, other=float("-inf"))
    top = tl.full([BLOCK_K], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_K], tl.int32)
    for i in range(K):
        best, at = tl.max(row, axis=0, return_indices=True, return_indices_tie_break_left=True)
        top = tl.where(slots == i, best, top)
        idx = tl.where(slots == i, at, idx)
        row = tl.where(keys == at, float("-inf"), row)
    return top, idx


@triton.jit
def _pk_select_kernel(s1_ptr, s2_ptr, scores_ptr, ids_ptr, n_keys, K: tl.constexpr,
                      BLOCK_KEYS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (token, head) row: top-k of each half, then top-k of the k*k sums s1top[a] + s2top[b].

    The second stage is a k-way merge: each a has a cursor b (its best unused partner, since s2top is
    sorted); each step takes the best a, emits (a, b) and advances that cursor. That is k steps over
    k-vectors instead of a k*k candidate tile, and gives exactly the values of a full top-k.
    """
    r = tl.program_id(0).to(tl.int64)
    top1, idx1 = _row_topk(s1_ptr + r * n_keys, n_keys, K, BLOCK_KEYS, BLOCK_K)
    top2, idx2 = _row_topk(s2_ptr + r * n_keys, n_keys, K, BLOCK_KEYS, BLOCK_K)
    slots = tl.arange(0, BLOCK_K)
    cursor = tl.zeros([BLOCK_K], tl.int32)
    cand = top1 + tl.max(top2, axis=0)  # partner b = 0 for every a; -inf past k
    out_scores = tl.zeros([BLOCK_K], tl.float32)
    out_ids = tl.zeros([BLOCK_K], tl.int64)
    for i in range(K):
        best, a = tl.max(cand, axis=0, return_indices=True, return_indices_tie_break_left=True)
        is_a = slots == a
        b = tl.sum(tl.where(is_a, cursor, 0), axis=0)
        id1 = tl.sum(tl.where(is_a, idx1, 0), axis=0)
        id2 = tl.sum(tl.where(slots == b, idx2, 0), axis=0)
        out_scores = tl.where(slots == i, best, out_scores)
        out_ids = tl.where(slots == i, id1.to(tl.int64) * n_keys + id2, out_ids)
        next_partner = tl.max(tl.where(slots == b + 1, top2, float("-inf")), axis=0)  # -inf once b+1 == K
        top1_a = tl.max(tl.where(is_a, top1, float("-inf")), axis=0)
        cand = tl.where(is_a, top1_a + next_partner, cand)
        cursor = tl.where(is_a, cursor + 1, cursor)
    keep = slots < K
    tl.store(scores_ptr + r * K + slots, out_scores, mask=keep)
    tl.store(ids_ptr + r * K + slots, out_ids, mask=keep)


def pk_topk(query, keys1, keys2, k):
    n, heads = query.shape[0], query.shape[1]
    n_keys = keys1.shape[1]
    s1, s2 = naive.sub_scores(query, keys1, keys2)  # cuBLAS does the dense part best
    scores = torch.empty(n, heads, k, dtype=torch.float32, device=query.device)
    ids = torch.empty(n, heads, k, dtype=torch.int64, device=query.device)
    if scores.numel() == 0:
        return scores, ids
    block_keys = triton.next_power_of_2(n_keys)
    with backends.on_device(query.device):
        _pk_select_kernel[(n * heads,)](
            s1.contiguous(), s2.contiguous(), scores, ids, n_keys,
            K=k, BLOCK_KEYS=block_keys, BLOCK_K=max(2, triton.next_power_of_2(k)),
            num_warps=max(1, min(8, block_keys // 256)))
    return scores, ids


# ---- weighted gather ---------------------------------------------------------------------------

@triton.jit
def _gather_kernel(values_ptr, ids_ptr, weights_ptr, out_ptr, L: tl.constexpr, Dv,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, d-block] = sum_j weights[n, j] * values[ids[n, j], d-block], BLOCK_L rows per step."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < Dv
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)  # reduced once at the end, not every step
    for start in range(0, L, BLOCK_L):
        j = start + tl.arange(0, BLOCK_L)
        j_ok = j < L
        rows = tl.load(ids_ptr + n * L + j, mask=j_ok, other=0)
        w = tl.load(weights_ptr + n * L + j, mask=j_ok, other=0.0).to(tl.float32)
        tile = tl.load(values_ptr + rows[:, None] * Dv + d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tile * w[:, None]
    tl.store(out_ptr + n * Dv + d, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=d_ok)


def weighted_gather(values, ids, weights):
    n, lookups = ids.shape
    dv = values.shape[1]
    out = torch.empty(n, dv, dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    if lookups == 0:
        return out.zero_()
    block_d = _block_d(dv)
    with backends.on_device(values.device):
        _gather_kernel[(n, triton.cdiv(dv, block_d))](
            values, ids, weights, out, lookups, dv,
            BLOCK_L=_block_rows(block_d, lookups), BLOCK_D=block_d)
    return out


# ---- weighted gather backward ------------------------------------------------------------------

@triton.jit
def _grad_weights_kernel(grad_out_ptr, values_ptr, ids_ptr, grad_weights_ptr, L, Dv: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_weights[n, j] = <values[ids[n, j]], grad_out[n]> for a block of BLOCK_L lookups j."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    j_ok = j < L
    rows = tl.load(ids_ptr + n * L + j, mask=j_ok, other=0)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    for start in range(0, Dv, BLOCK_D):
        d = start + tl.arange(0, BLOCK_D)
        d_ok = d < Dv
        g = tl.load(grad_out_ptr + n * Dv + d, mask=d_ok, other=0.0).to(tl.float32)
        tile = tl.load(values_ptr + rows[:, None] * Dv + d[None, :], mask=j_ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tile * g[None, :]
    grad_weights = tl.sum(acc, axis=1).to(grad_weights_ptr.dtype.element_ty)
    tl.store(grad_weights_ptr + n * L + j, grad_weights, mask=j_ok)


@triton.jit
def _segment_sum_kernel(grad_out_ptr, weights_ptr, order_ptr, bounds_ptr, row_grads_ptr, L, Dv,
                        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """row_grads[u] = sum over the lookups e of segment u of weights[e] * grad_out[e // L].

    `order` lists flat lookup positions sorted by id; segment u is order[bounds[u]:bounds[u + 1]].
    One program owns one (row, d-block), so the sum is deterministic and needs no atomics.
    """
    u = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < Dv
    begin = tl.load(bounds_ptr + u)
    end = tl.load(bounds_ptr + u + 1)
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    start = begin
    while start < end:  # a data-dependent bound, so `while` (see the module docstring)
        pos = start + tl.arange(0, BLOCK_E)
        pos_ok = pos < end
        e = tl.load(order_ptr + pos, mask=pos_ok, other=0)
        w = tl.load(weights_ptr + e, mask=pos_ok, other=0.0).to(tl.float32)
        token = e // L
        tile = tl.load(grad_out_ptr + token[:, None] * Dv + d[None, :], mask=pos_ok[:, None] & d_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tile * w[:, None]
        start += BLOCK_E
    tl.store(row_grads_ptr + u * Dv + d, tl.sum(acc, axis=0).to(row_grads_ptr.dtype.element_ty), mask=d_ok)


def _segments(ids):
    """(sorted unique ids, lookup positions ordered by id, int64 segment bounds of length U + 1)."""
    sorted_ids, order = torch.sort(ids.flatten(), stable=True)  # stable: a fixed summation order
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    bounds = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=bounds[1:])
    return rows, order, bounds


def weighted_gather_backward(grad_out, values, ids, weights):
    n, lookups = ids.shape
    dv = values.shape[1]
    grad_weights = torch.empty_like(weights)
    rows, order, bounds = _segments(ids)
    row_grads = torch.empty(rows.numel(), dv, dtype=values.dtype, device=values.device)
    if ids.numel() == 0:
        return grad_weights, rows, row_grads
    if dv == 0:
        return grad_weights.zero_(), rows, row_grads
    block_d = _block_d(dv)
    block_l = _block_rows(block_d, lookups)
    with backends.on_device(values.device):
        _grad_weights_kernel[(n, triton.cdiv(lookups, block_l))](
            grad_out, values, ids, grad_weights, lookups, dv, BLOCK_L=block_l, BLOCK_D=block_d)
        # Segments are short on average (lookups / unique ids), so a narrower tile wastes fewer lanes.
        _segment_sum_kernel[(rows.numel(), triton.cdiv(dv, block_d))](
            grad_out, weights, order, bounds, row_grads, lookups, dv,
            BLOCK_E=max(1, _TILE // 2 // block_d), BLOCK_D=block_d)
    return grad_weights, rows, row_grads


# ---- fused sparse optimizer steps --------------------------------------------------------------

@triton.jit
def _row_tile(rows_ptr, allow_ptr, U, Dv, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """This program's tile: offsets into the (U, Dv) grads, into the table, and the update mask."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < U
    rows = tl.load(rows_ptr + r, mask=r_ok, other=0)
    if HAS_MASK:
        r_ok = r_ok & (tl.load(allow_ptr + rows, mask=r_ok, other=0) != 0)
    grad_offsets = r[:, None] * Dv + d[None, :]
    table_offsets = rows[:, None] * Dv + d[None, :]
    return grad_offsets, table_offsets, r_ok[:, None] & (d < Dv)[None, :]


@triton.jit
def _sgd_kernel(values_ptr, rows_ptr, grads_ptr, allow_ptr, U, Dv, lr, weight_decay,
                HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    grad_at, table_at, ok = _row_tile(rows_ptr, allow_ptr, U, Dv, HAS_MASK, BLOCK_R, BLOCK_D)
    v = tl.load(values_ptr + table_at, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(grads_ptr + grad_at, mask=ok, other=0.0).to(tl.float32)
    v = v - lr * (g + weight_decay * v)
    tl.store(values_ptr + table_at, v.to(values_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _adam_kernel(values_ptr, exp_avg_ptr, exp_avg_sq_ptr, rows_ptr, grads_ptr, allow_ptr, U, Dv,
                 lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bias1, bias2, eps, decay,
                 HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    grad_at, table_at, ok = _row_tile(rows_ptr, allow_ptr, U, Dv, HAS_MASK, BLOCK_R, BLOCK_D)
    g = tl.load(grads_ptr + grad_at, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(exp_avg_ptr + table_at, mask=ok, other=0.0) * beta1 + one_minus_beta1 * g
    s = tl.load(exp_avg_sq_ptr + table_at, mask=ok, other=0.0) * beta2 + one_minus_beta2 * g * g
    tl.store(exp_avg_ptr + table_at, m, mask=ok)
    tl.store(exp_avg_sq_ptr + table_at, s, mask=ok)
    # IEEE-rounded divide and sqrt (the default ones are approximate on GPUs) to track the reference.
    update = tl.div_rn(tl.div_rn(m, bias1), tl.sqrt_rn(tl.div_rn(s, bias2)) + eps)
    v = tl.load(values_ptr + table_at, mask=ok, other=0.0).to(tl.float32)
    v = v * decay - lr * update
    tl.store(values_ptr + table_at, v.to(values_ptr.dtype.element_ty), mask=ok)


def _step_launch(values, rows, allow_mask):
    """Grid, mask pointer and block sizes shared by the optimizer steps."""
    dv = values.shape[1]
    block_d = _block_d(dv)
    block_r = _block_rows(block_d, rows.numel())
    grid = (triton.cdiv(rows.numel(), block_r), triton.cdiv(dv, block_d))
    allow = rows if allow_mask is None else allow_mask.view(torch.uint8)  # rows: an unread placeholder
    meta = dict(HAS_MASK=allow_mask is not None, BLOCK_R=block_r, BLOCK_D=block_d)
    return grid, allow, meta


def sparse_sgd_step(values, rows, grads, lr, weight_decay, allow_mask):
    if rows.numel() == 0 or values.shape[1] == 0:
        return
    grid, allow, meta = _step_launch(values, rows, allow_mask)
    with backends.on_device(values.device):
        _sgd_kernel[grid](values, rows, grads, allow, rows.numel(), values.shape[1], float(lr),
                          float(weight_decay), **meta)


def sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1, beta2, eps, weight_decay,
                     allow_mask):
    if rows.numel() == 0 or values.shape[1] == 0:
        return
    grid, allow, meta = _step_launch(values, rows, allow_mask)
    # Scalars derived in double precision in Python, exactly as the reference computes them.
    with backends.on_device(values.device):
        _adam_kernel[grid](values, exp_avg, exp_avg_sq, rows, grads, allow, rows.numel(), values.shape[1],
                           float(lr), float(beta1), float(beta2), 1.0 - beta1, 1.0 - beta2,
                           1.0 - beta1**step, 1.0 - beta2**step, float(eps), 1.0 - lr * weight_decay,
                           num_warps=8, **meta)  # four live tiles per program: spread them over more threads
