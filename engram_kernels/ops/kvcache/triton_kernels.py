"""`triton` backend: Triton kernels for the KV-cache ops (CUDA, or CPU tensors under TRITON_INTERPRET=1).

fp32 math whatever the storage dtype, except dot operands. Packed codes are unpacked in
registers: each token's bytes are loaded once, contiguously, and split into bit planes, which in
the planar layout are runs of whole channels; codes never pass through memory unpacked.

Decode attention is split-K flash decoding: one program per (batch, KV head, split of the tokens)
handles all query rows of that KV head (GQA heads x query tokens, padded to 16 for tl.dot), the
last split of each head takes the full-precision residual window, and the head's last split to
finish (an atomic counter per head) merges the splits' (max, sum, output) triples, so a call is
one launch. Each bit plane is its own dot (no reshape of the codes into channel order); the key
scale folds into the query and the value scale into the softmax weights, so 16-bit operands take
the codes straight from the bytes (see _codes). The split size is a compile-time number of tiles
(a static loop the compiler can pipeline), timed per shape bucket on a GPU's first call (see
_launch_config).

Other loops whose bounds come from tensors' lengths are `while` loops: Triton 3.6's interpreter
rejects a runtime scalar `range()` bound under numpy >= 2.4. Head dims and value groups must be
powers of two (64, 128, ...), and decode groups multiples of 16 tokens; other shapes take the
reference implementation.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ... import backends
from . import naive

_BLOCK_T = 64  # tokens per tile (quantize, dequantize)
_MIN_ROWS = 16  # tl.dot needs 16 rows


def _pow2(n):
    return n >= 1 and n & (n - 1) == 0


def _supported(head_dim, group_size):
    return _pow2(head_dim) and _pow2(naive.value_group(head_dim, group_size)) and head_dim >= 16


def _precision():
    return "ieee" if os.environ.get("TRITON_INTERPRET") == "1" else "tf32"


@triton.jit
def _unpack(packed_ptr, rows, row_mask, D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Codes (BLOCK, D) as fp32 of the packed rows `rows`. Each row's P bytes are loaded once,
    contiguously, and split into their PER bit planes: in the planar layout (naive.py) plane i
    holds channels i*P .. i*P + P - 1, so planes laid side by side are the channels in order."""
    P: tl.constexpr = D * BITS // 8
    PER: tl.constexpr = 8 // BITS
    j = tl.arange(0, P)
    byte = tl.load(packed_ptr + rows[:, None] * P + j[None, :], mask=row_mask[:, None], other=0).to(tl.int32)
    shifts = (tl.arange(0, PER) * BITS)[None, :, None]
    planes = (byte[:, None, :] >> shifts) & ((1 << BITS) - 1)  # (BLOCK, PER, P)
    return tl.reshape(planes, (BLOCK, D)).to(tl.float32)


@triton.jit
def _pack_store(packed_ptr, codes, rows, row_mask, D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Stores int32 codes (BLOCK, D) planar-packed into (BLOCK, D*BITS/8) bytes."""
    P: tl.constexpr = D * BITS // 8
    PER: tl.constexpr = 8 // BITS
    planes = tl.reshape(codes, (BLOCK, PER, P))
    shifts = (tl.arange(0, PER) * BITS)[None, :, None]
    packed = tl.sum(planes << shifts, axis=1)  # disjoint bit fields: the sum is an or
    j = tl.arange(0, P)
    tl.store(packed_ptr + rows[:, None] * P + j[None, :], packed.to(tl.uint8), mask=row_mask[:, None])


@triton.jit
def _codes_of(x, lo, hi, BITS: tl.constexpr):
    """(codes int32, scale fp16, zero fp16) of x against per-element lo/hi (broadcast)."""
    levels = (1 << BITS) - 1
    scale = ((hi - lo) / levels).to(tl.float16)
    zero = lo.to(tl.float16)
    safe = tl.where(scale.to(tl.float32) > 0, scale.to(tl.float32), 1.0)
    codes = tl.floor((x - zero.to(tl.float32)) / safe + 0.5)
    codes = tl.minimum(tl.maximum(codes, 0.0), levels).to(tl.int32)
    return codes, scale, zero


@triton.jit
def _quantize_keys_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, t_len, n_groups, G: tl.constexpr,
                          D: tl.constexpr, BITS: tl.constexpr, BLOCK_G: tl.constexpr):
    # a 1-D grid (axes 1 and 2 stop at 65535) of (head, group); 64-bit offsets: a cache may hold
    # more than 2**31 elements
    pid = tl.program_id(0).to(tl.int64)
    head, group = pid // n_groups, pid % n_groups
    j = tl.arange(0, BLOCK_G)
    c = tl.arange(0, D)
    tok = group * G + j
    ok = (j < G) & (tok < t_len)
    x = tl.load(x_ptr + (head * t_len + tok)[:, None] * D + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    lo = tl.min(tl.where(ok[:, None], x, float("inf")), axis=0)
    hi = tl.max(tl.where(ok[:, None], x, float("-inf")), axis=0)
    codes, scale, zero = _codes_of(x, lo[None, :], hi[None, :], BITS)
    at = (head * n_groups + group) * D + c
    tl.store(scale_ptr + at, tl.reshape(scale, (D,)))
    tl.store(zero_ptr + at, tl.reshape(zero, (D,)))
    _pack_store(codes_ptr, codes, head * t_len + tok, ok, D, BITS, BLOCK_G)


@triton.jit
def _quantize_values_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, n_rows, D: tl.constexpr, GV: tl.constexpr,
                            BITS: tl.constexpr, BLOCK: tl.constexpr):
    NG: tl.constexpr = D // GV
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    c = tl.arange(0, D)
    x = tl.load(x_ptr + rows[:, None] * D + c[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    grouped = tl.reshape(x, (BLOCK, NG, GV))
    lo, hi = tl.min(grouped, axis=2), tl.max(grouped, axis=2)
    codes, scale, zero = _codes_of(grouped, lo[:, :, None], hi[:, :, None], BITS)
    g = tl.arange(0, NG)
    at = rows[:, None] * NG + g[None, :]
    tl.store(scale_ptr + at, tl.reshape(scale, (BLOCK, NG)), mask=ok[:, None])
    tl.store(zero_ptr + at, tl.reshape(zero, (BLOCK, NG)), mask=ok[:, None])
    _pack_store(codes_ptr, tl.reshape(codes, (BLOCK, D)), rows, ok, D, BITS, BLOCK)


@triton.jit
def _dequantize_key_tile(codes, scale_ptr, zero_ptr, head, t0, tok, ok, n_groups, G: tl.constexpr,
                         D: tl.constexpr, BLOCK: tl.constexpr):
    """codes (BLOCK, D) of tokens `tok` = t0 + 0..BLOCK-1 -> keys. A tile starting on a multiple of
    BLOCK lies in one group when BLOCK divides G: one (D,) scale/zero row serves it. Otherwise each
    token gathers its group's row."""
    c = tl.arange(0, D)
    if G % BLOCK == 0:
        at = (head * n_groups + t0 // G) * D + c
        s = tl.load(scale_ptr + at).to(tl.float32)
        z = tl.load(zero_ptr + at).to(tl.float32)
        return codes * s[None, :] + z[None, :]
    at = (head * n_groups + tok // G)[:, None] * D + c[None, :]
    s = tl.load(scale_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    return codes * s + z


@triton.jit
def _dequantize_value_tile(codes, scale_ptr, zero_ptr, rows, ok, D: tl.constexpr, GV: tl.constexpr,
                           BLOCK: tl.constexpr):
    """codes (BLOCK, D) of rows `rows` -> values: one scale/zero per token per GV channels,
    loaded once and broadcast over the group's channels."""
    NG: tl.constexpr = D // GV
    at = rows[:, None] * NG + tl.arange(0, NG)[None, :]
    s = tl.load(scale_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    grouped = tl.reshape(codes, (BLOCK, NG, GV))
    return tl.reshape(grouped * s[:, :, None] + z[:, :, None], (BLOCK, D))


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, t_len, n_groups, KEYS: tl.constexpr,
                       G: tl.constexpr, GV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid, n_tiles = tl.program_id(0).to(tl.int64), tl.cdiv(t_len, BLOCK)  # as in _quantize_keys_kernel
    head, t0 = pid // n_tiles, (pid % n_tiles) * BLOCK
    tok = t0 + tl.arange(0, BLOCK)
    ok = tok < t_len
    rows = head * t_len + tok
    codes = _unpack(codes_ptr, rows, ok, D, BITS, BLOCK)
    if KEYS:
        x = _dequantize_key_tile(codes, scale_ptr, zero_ptr, head, t0, tok, ok, n_groups, G, D, BLOCK)
    else:
        x = _dequantize_value_tile(codes, scale_ptr, zero_ptr, rows, ok, D, GV, BLOCK)
    c = tl.arange(0, D)
    tl.store(out_ptr + rows[:, None] * D + c[None, :], x.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _codes(byte, i: tl.constexpr, BITS: tl.constexpr, MAGIC_BITS: tl.constexpr, OPERAND: tl.constexpr,
           ASM: tl.constexpr):
    """Bit plane i of packed bytes (uint8) as dot operands. With MAGIC_BITS (16-bit operands) a
    code becomes the low mantissa bits of a constant whose mantissa unit is 1 (bf16 0x4300 = 128,
    fp16 0x6400 = 1024): MAGIC + code, with no int-to-float conversion; callers subtract MAGIC times
    their operand sums. On GPUs `ASM` (see _plane_asm) does it four bytes per instruction; the
    interpreter takes the same bits one element at a time. Without MAGIC_BITS: the plain code."""
    # one return: Triton checks every return's type, including those of branches it does not compile
    if ASM != "":
        if MAGIC_BITS == 0x4300:  # a literal dtype: inline_asm_elementwise takes no constexpr-wrapped one
            out = tl.inline_asm_elementwise(ASM, "=r,=r,r", [byte], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(ASM, "=r,=r,r", [byte], dtype=tl.float16, is_pure=True, pack=4)
    else:
        code = (byte.to(tl.int16) >> (i * BITS)) & ((1 << BITS) - 1)
        if MAGIC_BITS:
            out = (code | MAGIC_BITS).to(tl.int16).to(OPERAND, bitcast=True)
        else:
            out = code.to(OPERAND)
    return out


@triton.jit
def _softmax_step(s, m, l):
    """Online softmax: scores s (ROWS, BLOCK) into running max m and sum l -> (p, m, l, corr)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    corr = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return p, m_new, l * corr + tl.sum(p, axis=1), corr


@triton.jit
def _packed_scores(s, bias, q, kbytes, ks_ptr, kz_ptr, group_row, valid, i: tl.constexpr, P: tl.constexpr,
                   BITS: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, OPERAND: tl.constexpr,
                   ASM: tl.constexpr, PRECISION: tl.constexpr):
    """Adds plane i's part of q . k for a key tile in one group: q . (c s + z) = (q s) . c + q . z,
    so the per-channel scale folds into the query (rows x P, fp32: the plane's channels) and the
    codes go into the dot as they are. The row constants (q . z, minus MAGIC times the operand's
    sum) gather in `bias` (rows x P), reduced once per tile."""
    cp = tl.arange(0, P)
    scale = tl.load(ks_ptr + group_row + i * P + cp, mask=valid & (cp < P), other=0.0).to(tl.float32)
    zero = tl.load(kz_ptr + group_row + i * P + cp, mask=valid & (cp < P), other=0.0).to(tl.float32)
    qs = (q * scale[None, :]).to(OPERAND)
    s += tl.dot(qs, tl.trans(_codes(kbytes, i, BITS, MAGIC_BITS, OPERAND, ASM)), input_precision=PRECISION)
    return s, bias + q * zero[None, :] - MAGIC * qs.to(tl.float32)


@triton.jit
def _packed_values(acc, corr, p, vbytes, vs_ptr, vz_ptr, rows, ok, i: tl.constexpr, P: tl.constexpr,
                   GV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, MAGIC_BITS: tl.constexpr,
                   MAGIC: tl.constexpr, OPERAND: tl.constexpr, ASM: tl.constexpr, PRECISION: tl.constexpr):
    """acc (ROWS, P) of plane i (channels i*P ..) <- corr * acc + p . values. When the plane lies in
    one value group, p . (c s + z) = (p s) . c + p . z: the token's scale folds into p. Otherwise
    (groups narrower than a plane) the values are dequantized per channel first."""
    NG: tl.constexpr = D // GV
    acc = acc * corr[:, None]
    if GV >= P:
        at = rows * NG + (i * P) // GV
        scale = tl.load(vs_ptr + at, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(vz_ptr + at, mask=ok, other=0.0).to(tl.float32)
        ps = (p * scale[None, :]).to(OPERAND)
        acc += tl.dot(ps, _codes(vbytes, i, BITS, MAGIC_BITS, OPERAND, ASM), input_precision=PRECISION)
        return acc + tl.sum(p * zero[None, :] - MAGIC * ps.to(tl.float32), axis=1)[:, None]
    at = rows[:, None] * NG + ((i * P + tl.arange(0, P)) // GV)[None, :]
    scale = tl.load(vs_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(vz_ptr + at, mask=ok[:, None], other=0.0).to(tl.float32)
    v = _codes(vbytes, i, BITS, 0, tl.float32, "") * scale + zero
    return acc + tl.dot(p.to(OPERAND), v.to(OPERAND), input_precision=PRECISION)


@triton.jit
def _residual_scores(q, rk_ptr, at, ok, i: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
    k = tl.load(rk_ptr + at + i * P, mask=ok[:, None], other=0.0)
    return tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION)


@triton.jit
def _residual_step(acc, corr, p, rv_ptr, at, ok, i: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
    v = tl.load(rv_ptr + at + i * P, mask=ok[:, None], other=0.0)
    return acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)


@triton.jit
def _merge_splits(scratch_ptr, out_ptr, head, n_splits, ROWS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    """out rows of `head` from every split's (acc, max, sum) in scratch: run by the head's last split."""
    c = tl.arange(0, D)
    row = head * 0
    while row < ROWS:
        m_run = tl.full([1], float("-inf"), tl.float32)
        l_run = tl.zeros([1], tl.float32)
        o = tl.zeros([D], tl.float32)
        s0 = head * 0
        while s0 < n_splits:
            sp = s0 + tl.arange(0, CHUNK)
            ok = sp < n_splits
            at = ((head * n_splits + sp) * ROWS + row) * (D + 2)
            # volatile: other programs wrote these rows; never serve them from this SM's L1
            m = tl.load(scratch_ptr + at + D, mask=ok, other=float("-inf"), volatile=True)
            l = tl.load(scratch_ptr + at + D + 1, mask=ok, other=0.0, volatile=True)
            acc = tl.load(scratch_ptr + at[:, None] + c[None, :], mask=ok[:, None], other=0.0, volatile=True)
            m_new = tl.maximum(m_run, tl.max(m, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m_run - m_safe)
            w = tl.exp(m - m_safe)
            l_run = l_run * a + tl.sum(w * l, axis=0)
            o = o * a + tl.sum(acc * w[:, None], axis=0)
            m_run = m_new
            s0 += CHUNK
        tl.store(out_ptr + (head * ROWS + row) * D + c, (o / l_run).to(out_ptr.dtype.element_ty))
        row += 1


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, rk_ptr, rv_ptr, scratch_ptr, counter_ptr,
                   out_ptr, packed_len, residual_len, n_groups, n_splits, scale, TILES: tl.constexpr,
                   N_REP: tl.constexpr, Q_LEN: tl.constexpr, ROWS_PAD: tl.constexpr, G: tl.constexpr,
                   GV: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                   MAGIC_BITS: tl.constexpr, MAGIC: tl.constexpr, ASM0: tl.constexpr, ASM1: tl.constexpr,
                   ASM2: tl.constexpr, ASM3: tl.constexpr, MERGE_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    head, split = tl.program_id(0), tl.program_id(1)  # head = b * Hkv + kv head
    ROWS: tl.constexpr = N_REP * Q_LEN
    P: tl.constexpr = D * BITS // 8  # bytes per token = channels per bit plane
    PER: tl.constexpr = 8 // BITS
    # The head's own rows, from 64-bit offsets (a batch's cache may pass 2**31 bytes); offsets
    # within one head stay 32-bit.
    h64 = head.to(tl.int64)
    kc_ptr += h64 * packed_len * P
    vc_ptr += h64 * packed_len * P
    vs_ptr += h64 * packed_len * (D // GV)
    vz_ptr += h64 * packed_len * (D // GV)
    ks_ptr += h64 * n_groups * D
    kz_ptr += h64 * n_groups * D
    rk_ptr += h64 * residual_len * D
    rv_ptr += h64 * residual_len * D
    OPERAND = rk_ptr.dtype.element_ty  # the query's dtype: dot operands, fp32 accumulators
    r = tl.arange(0, ROWS_PAD)
    cp = tl.arange(0, P)
    j = tl.arange(0, BLOCK)
    real = r < ROWS
    # The KV head's query rows are contiguous in (B, Hq, Tq, D): N_REP heads x Q_LEN tokens. Padding
    # rows read row 0 (in bounds, results never stored). Each plane's channels of the queries are
    # loaded once, in fp32, with the softmax scale in them (int2's planes 2 and 3 only with 4 planes).
    q_rows = q_ptr + (head * ROWS + tl.where(real, r, 0))[:, None] * D + cp[None, :]
    q0 = tl.load(q_rows).to(tl.float32) * scale
    q1 = tl.load(q_rows + P).to(tl.float32) * scale
    q2 = q0
    q3 = q1
    if PER == 4:
        q2 = tl.load(q_rows + 2 * P).to(tl.float32) * scale
        q3 = tl.load(q_rows + 3 * P).to(tl.float32) * scale
    limit = packed_len + residual_len - Q_LEN + r % Q_LEN  # last position each row may see
    m = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l = tl.zeros([ROWS_PAD], tl.float32)
    # one accumulator per bit plane (channels i*P .. i*P + P - 1); int2 has four
    acc0 = tl.zeros([ROWS_PAD, P], tl.float32)
    acc1 = tl.zeros([ROWS_PAD, P], tl.float32)
    acc2 = tl.zeros([ROWS_PAD, P], tl.float32)
    acc3 = tl.zeros([ROWS_PAD, P], tl.float32)

    # A constant trip count (tiles past the end are masked off) lets the compiler pipeline the loads.
    start = split * (TILES * BLOCK)
    for t in range(TILES):
        t0 = start + t * BLOCK
        tok = t0 + j
        ok = tok < packed_len
        group_row = (t0 // G) * D
        valid = t0 < packed_len  # a split's tail tiles lie past the last group
        kbytes = tl.load(kc_ptr + tok[:, None] * P + cp[None, :], mask=ok[:, None], other=0)
        s = tl.zeros([ROWS_PAD, BLOCK], tl.float32)
        bias = tl.zeros([ROWS_PAD, P], tl.float32)
        s, bias = _packed_scores(s, bias, q0, kbytes, ks_ptr, kz_ptr, group_row, valid, 0, P, BITS, MAGIC_BITS,
                                 MAGIC, OPERAND, ASM0, PRECISION)
        s, bias = _packed_scores(s, bias, q1, kbytes, ks_ptr, kz_ptr, group_row, valid, 1, P, BITS, MAGIC_BITS,
                                 MAGIC, OPERAND, ASM1, PRECISION)
        if PER == 4:
            s, bias = _packed_scores(s, bias, q2, kbytes, ks_ptr, kz_ptr, group_row, valid, 2, P, BITS, MAGIC_BITS,
                                     MAGIC, OPERAND, ASM2, PRECISION)
            s, bias = _packed_scores(s, bias, q3, kbytes, ks_ptr, kz_ptr, group_row, valid, 3, P, BITS, MAGIC_BITS,
                                     MAGIC, OPERAND, ASM3, PRECISION)
        s += tl.sum(bias, axis=1)[:, None]
        s = tl.where(ok[None, :] & (tok[None, :] <= limit[:, None]), s, float("-inf"))
        p, m, l, corr = _softmax_step(s, m, l)
        vbytes = tl.load(vc_ptr + tok[:, None] * P + cp[None, :], mask=ok[:, None], other=0)
        acc0 = _packed_values(acc0, corr, p, vbytes, vs_ptr, vz_ptr, tok, ok, 0, P, GV, D, BITS, MAGIC_BITS,
                              MAGIC, OPERAND, ASM0, PRECISION)
        acc1 = _packed_values(acc1, corr, p, vbytes, vs_ptr, vz_ptr, tok, ok, 1, P, GV, D, BITS, MAGIC_BITS,
                              MAGIC, OPERAND, ASM1, PRECISION)
        if PER == 4:
            acc2 = _packed_values(acc2, corr, p, vbytes, vs_ptr, vz_ptr, tok, ok, 2, P, GV, D, BITS, MAGIC_BITS,
                                  MAGIC, OPERAND, ASM2, PRECISION)
            acc3 = _packed_values(acc3, corr, p, vbytes, vs_ptr, vz_ptr, tok, ok, 3, P, GV, D, BITS, MAGIC_BITS,
                                  MAGIC, OPERAND, ASM3, PRECISION)

    t0 = 0
    r_end = tl.where(split == n_splits - 1, residual_len, 0)  # the last split takes the residual window
    while t0 < r_end:
        tok = t0 + j
        ok = tok < r_end
        at = tok[:, None] * D + cp[None, :]
        s = _residual_scores(q0, rk_ptr, at, ok, 0, P, PRECISION)
        s += _residual_scores(q1, rk_ptr, at, ok, 1, P, PRECISION)
        if PER == 4:
            s += _residual_scores(q2, rk_ptr, at, ok, 2, P, PRECISION)
            s += _residual_scores(q3, rk_ptr, at, ok, 3, P, PRECISION)
        s = tl.where(ok[None, :] & ((packed_len + tok)[None, :] <= limit[:, None]), s, float("-inf"))
        p, m, l, corr = _softmax_step(s, m, l)
        acc0 = _residual_step(acc0, corr, p, rv_ptr, at, ok, 0, P, PRECISION)
        acc1 = _residual_step(acc1, corr, p, rv_ptr, at, ok, 1, P, PRECISION)
        if PER == 4:
            acc2 = _residual_step(acc2, corr, p, rv_ptr, at, ok, 2, P, PRECISION)
            acc3 = _residual_step(acc3, corr, p, rv_ptr, at, ok, 3, P, PRECISION)
        t0 += BLOCK

    # scratch rows (head, split, query row) hold acc (D), m, l; only the real query rows are kept
    out = ((head * n_splits + split) * ROWS + r) * (D + 2)
    tl.store(scratch_ptr + out[:, None] + cp[None, :], acc0, mask=real[:, None])
    tl.store(scratch_ptr + out[:, None] + P + cp[None, :], acc1, mask=real[:, None])
    if PER == 4:
        tl.store(scratch_ptr + out[:, None] + 2 * P + cp[None, :], acc2, mask=real[:, None])
        tl.store(scratch_ptr + out[:, None] + 3 * P + cp[None, :], acc3, mask=real[:, None])
    tl.store(scratch_ptr + out + D, m, mask=real)
    tl.store(scratch_ptr + out + D + 1, l, mask=real)
    # The head's last split to finish merges all of them (one launch instead of two). The barrier
    # orders every thread's stores before the counter's release; the counter goes back to 0.
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + head, 1) == n_splits - 1:
        tl.atomic_xchg(counter_ptr + head, 0)
        _merge_splits(scratch_ptr, out_ptr, head, n_splits, ROWS, D, MERGE_CHUNK)


# ---- host side ----------------------------------------------------------------------------------

def quantize_keys(keys, bits, group_size):
    b, h, t, d = keys.shape
    if not _supported(d, group_size):
        return naive.quantize_keys(keys, bits, group_size)
    n_groups = triton.cdiv(t, group_size)
    codes = keys.new_empty(b, h, t, d * bits // 8, dtype=torch.uint8)
    scale = keys.new_empty(b, h, n_groups, d, dtype=naive.SCALE_DTYPE)
    zero = torch.empty_like(scale)
    if codes.numel():
        with backends.on_device(keys.device):
            _quantize_keys_kernel[(b * h * n_groups,)](keys, codes, scale, zero, t, n_groups, group_size, d, bits,
                                                       triton.next_power_of_2(group_size))
    return codes, scale, zero


def quantize_values(values, bits, group_size):
    b, h, t, d = values.shape
    if not _supported(d, group_size):
        return naive.quantize_values(values, bits, group_size)
    gv = naive.value_group(d, group_size)
    codes = values.new_empty(b, h, t, d * bits // 8, dtype=torch.uint8)
    scale = values.new_empty(b, h, t, d // gv, dtype=naive.SCALE_DTYPE)
    zero = torch.empty_like(scale)
    n_rows = b * h * t
    if n_rows:
        block = min(_BLOCK_T, triton.next_power_of_2(n_rows))
        with backends.on_device(values.device):
            _quantize_values_kernel[(triton.cdiv(n_rows, block),)](values, codes, scale, zero, n_rows, d, gv, bits,
                                                                   block)
    return codes, scale, zero


def _dequantize(codes, scale, zero, bits, group_size, dtype, keys):
    b, h, t, p = codes.shape
    d = p * 8 // bits
    if not _supported(d, group_size):
        fn = naive.dequantize_keys if keys else naive.dequantize_values
        return fn(codes, scale, zero, bits, group_size, dtype)
    out = codes.new_empty(b, h, t, d, dtype=dtype)
    if out.numel():
        with backends.on_device(codes.device):
            _dequantize_kernel[(b * h * triton.cdiv(t, _BLOCK_T),)](
                codes, scale, zero, out, t, triton.cdiv(t, group_size), keys, group_size,
                naive.value_group(d, group_size), d, bits, _BLOCK_T)
    return out


def dequantize_keys(codes, scale, zero, bits, group_size, dtype):
    return _dequantize(codes, scale, zero, bits, group_size, dtype, True)


def dequantize_values(codes, scale, zero, bits, group_size, dtype):
    return _dequantize(codes, scale, zero, bits, group_size, dtype, False)


# Decode launches: (tiles per split, num_warps, num_stages). Long caches on a GPU time a few
# candidates on their first call and keep the fastest per shape bucket (as triton.autotune would,
# but the split count also sizes the scratch buffers); short caches and the interpreter take the
# heuristic of about four programs per SM.
TUNE_MIN_TOKENS = 8192  # below this a launch is short and not worth timing
DECODE_TIMINGS = {}  # bucket -> {launch: ms} measured on its first call; the fastest is used


def _programs(device, per_sm):
    if device.type != "cuda":
        return 4
    return per_sm * backends.multiprocessors(device)


def _tiles(blocks, heads, programs):
    """Tiles per split for about `programs` programs over `heads` heads; a power of two, so few
    distinct values (each is a compile)."""
    return triton.next_power_of_2(triton.cdiv(blocks, max(1, triton.cdiv(programs, heads))))


def _candidates(device, heads, blocks):
    tiles = sorted({_tiles(blocks, heads, _programs(device, per_sm)) for per_sm in (2, 8)})
    return [(t, warps, stages) for t in tiles for warps in (4, 8) for stages in (3, 4)]


def _elapsed_ms(fn, reps=5):
    fn()  # compiles on first use
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _launch_config(device, heads, tokens, blocks, bucket, run):
    if bucket in DECODE_TIMINGS:
        timings = DECODE_TIMINGS[bucket]
        return min(timings, key=timings.get)
    heuristic = (max(1, _tiles(blocks, heads, _programs(device, 4))), 4, 3)
    if device.type != "cuda" or tokens < TUNE_MIN_TOKENS or torch.cuda.is_current_stream_capturing():
        return heuristic
    with backends.on_device(device):
        DECODE_TIMINGS[bucket] = {launch: _elapsed_ms(lambda: run(launch))
                                  for launch in _candidates(device, heads, blocks)}
    return _launch_config(device, heads, tokens, blocks, bucket, run)


def _decode_block(group_size):
    """Tokens per decode tile: the largest of 64, 32, 16 dividing the group, so that each tile has
    one row of key scales to fold into the query (None: the reference handles the group size)."""
    return next((block for block in (64, 32, 16) if group_size % block == 0), None)


# A 16-bit code c or-ed into these bits reads as MAGIC + c (see _codes); fp32 operands take plain codes.
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _plane_asm(bits, plane, magic_bits):
    """PTX for inline_asm_elementwise(pack=4): four packed bytes in $2 -> their plane-`plane` codes
    as four 16-bit magic + code values, elements 0, 1 in $0 and 2, 3 in $1 (low half first)."""
    mask = ((1 << bits) - 1) * 0x01010101
    high = (magic_bits >> 8) * 0x01010101
    return ("{ .reg .b32 t, h; "
            f"shr.b32 t, $2, {plane * bits}; and.b32 t, t, {mask:#x}; mov.b32 h, {high:#x}; "
            "prmt.b32 $0, t, h, 0x5140; prmt.b32 $1, t, h, 0x7362; }")


USE_PTX = os.environ.get("ENGRAM_KV_PTX", "1") != "0"  # 0: the bit path the interpreter checks, on GPUs too


def _asm(bits, magic_bits, device):
    """The four planes' PTX strings ("" = no inline PTX: the interpreter, fp32 operands, unused planes)."""
    if not (magic_bits and device.type == "cuda" and USE_PTX):
        return ("",) * 4
    return _planes_asm(bits, magic_bits)


@functools.cache
def _planes_asm(bits, magic_bits):
    return tuple(_plane_asm(bits, i, magic_bits) if i < 8 // bits else "" for i in range(4))


_MERGE_CHUNK = 32  # splits the merge reads per step
_COUNTERS = {}  # device -> int32 zeros, one per (batch, KV head): splits finished in the running call


def _counters(device, heads):
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < heads:
        counters = _COUNTERS[device] = torch.zeros(max(heads, 64), dtype=torch.int32, device=device)
    return counters


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                     residual_values, bits, group_size, scale):
    b, hq, tq, d = query.shape
    block = _decode_block(group_size)
    if not _supported(d, group_size) or block is None or d * bits // 8 < _MIN_ROWS:
        return naive.decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                      residual_keys, residual_values, bits, group_size, scale)
    hkv, packed_len, residual_len = key_codes.shape[1], key_codes.shape[2], residual_keys.shape[2]
    n_rep, heads = hq // hkv, b * hkv
    rows = n_rep * tq
    blocks = triton.cdiv(packed_len, block)
    out = torch.empty_like(query)
    counters = _counters(query.device, heads)  # shared by calls on one device: one stream at a time
    magic_bits, magic = _MAGIC.get(query.dtype, (0, 0.0))
    asm = _asm(bits, magic_bits, query.device)

    def run(launch):
        tiles, warps, stages = launch
        n_splits = triton.cdiv(blocks, tiles) + 1  # + the residual split
        scratch = query.new_empty(heads, n_splits, rows, d + 2, dtype=torch.float32)
        _decode_kernel[(heads, n_splits)](
            query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
            residual_values, scratch, counters, out, packed_len, residual_len, triton.cdiv(packed_len, group_size),
            n_splits, scale, tiles, n_rep, tq, max(_MIN_ROWS, triton.next_power_of_2(rows)), group_size,
            naive.value_group(d, group_size), d, bits, block, magic_bits, magic, *asm, _MERGE_CHUNK,
            _precision(), num_warps=warps, num_stages=stages)

    bucket = (query.device.index, query.dtype, heads, rows, blocks.bit_length(), d, bits, group_size, asm[0] != "")
    launch = _launch_config(query.device, heads, packed_len, blocks, bucket, run)
    with backends.on_device(query.device):
        run(launch)
    return out
