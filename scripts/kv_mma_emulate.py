"""Lane-level emulation of the tensor-core decode kernel (csrc/cuda/kvcache_decode_mma.cuh) in numpy,
for machines without a GPU: one warp walks the whole packed range and the residual window with the
kernel's fragment layouts (mma.sync m16n8k16 per PTX), channel maps, prmt selectors and MAGIC
algebra, bf16 rounding included, and the result is compared with naive.decode_attention.

    python scripts/kv_mma_emulate.py      (exit status 1 if any case is off by more than 0.05)

It mirrors the kernel by hand: change both together. A selector or channel-map mistake shows up as
errors of the size of the outputs; bf16 operand rounding leaves ~0.005."""
import math
import sys

import numpy as np
import torch

from engram_kernels.ops.kvcache import naive

DT = torch.bfloat16
MAGIC, HB = 128.0, 0x43434343


def rnd(x):
    return float(torch.tensor(x, dtype=torch.float32).to(DT).float())


def prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * k)) & 7] << (8 * k) for k in range(4))


def halves(x):  # uint32 of two 16-bit magic values -> two floats (the bf16 bits read as numbers)
    out = []
    for h in (x & 0xFFFF, x >> 16):
        out.append(float(torch.tensor([h], dtype=torch.int16 if h < 32768 else torch.int32).to(torch.int32)
                         .to(torch.int16).view(DT).float()))
    return out


def pack(lo, hi):
    return (rnd(lo), rnd(hi))


def mma(c, a, b):
    """c[lane][4] += A B with per-lane fragments a[lane] = 4 pairs, b[lane] = 2 pairs (floats)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (r, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[r, k], A[r, k + 1] = a[lane][reg]
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            B[k, g], B[k + 1, g] = b[lane][reg]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for e, (r, n) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            c[lane][e] += C[r, n]


def plane(word, i, bits):
    return (word >> (i * bits)) & (((1 << bits) - 1) * 0x01010101)


def words(byts):
    return [int.from_bytes(bytes(byts[4 * i:4 * i + 4]), "little") for i in range(len(byts) // 4)]


def run(bits, d, rows, group, packed_len, residual_len, q_len=1):
    P, PER = d * bits // 8, 8 // bits
    KSTEPS, KWORDS, VBYTES = d // 16, P // 16, P // 8
    MTILES = d // 16
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, packed_len, d, generator=gen)
    values = torch.randn(1, 1, packed_len, d, generator=gen)
    query = torch.randn(1, rows // q_len, q_len, d, generator=gen).to(DT)
    rk = torch.randn(1, 1, residual_len, d, generator=gen).to(DT)
    rv = torch.randn(1, 1, residual_len, d, generator=gen).to(DT)
    kc, ks, kz = naive.quantize_keys(keys, bits, group)
    vc, vs, vz = naive.quantize_values(values, bits, group)
    scale = d ** -0.5
    expected = naive.decode_attention(query, kc, ks, kz, vc, vs, vz, rk, rv, bits, group, scale).float()
    kc, vc = kc[0, 0].numpy(), vc[0, 0].numpy()
    ks, kz, vs, vz = (x[0, 0].float().numpy() for x in (ks, kz, vs, vz))
    qf = query.float().reshape(rows, d).numpy() * scale
    width = min(group, d)

    def key_channel(kk, t, e):
        return (kk // KWORDS) * P + t * (P // 4) + (kk % KWORDS) * 4 + e

    def out_channel(mm, r):
        return (mm // (VBYTES // 2)) * P + (r % 8) * VBYTES + 2 * (mm % (VBYTES // 2)) + r // 8

    lanes = range(32)
    o = [[[0.0] * 4 for _ in range(MTILES)] for _ in lanes]
    m = [-math.inf] * 32
    l = [0.0] * 32
    zsum = [[0.0] * PER for _ in lanes]
    last = [packed_len + residual_len - q_len + ((lane // 4) % q_len) for lane in lanes]
    state = {}

    def quad(vals, lane):
        return sum(vals[(lane // 4) * 4 + u] for u in range(4))

    def set_group(gidx):
        qa, part = [], []
        for lane in lanes:
            g, t = lane // 4, lane % 4
            frags, acc = [], 0.0
            for kk in range(KSTEPS):
                qs = []
                for e in range(4):
                    c = key_channel(kk, t, e)
                    qv = qf[g, c] if g < rows else 0.0
                    sc, z = (ks[gidx, c], kz[gidx, c]) if gidx is not None else (1.0, 0.0)
                    qs.append(qv * sc)
                    acc += qv * z - MAGIC * rnd(qv * sc)
                frags.append([pack(qs[0], qs[1]), (0.0, 0.0), pack(qs[2], qs[3]), (0.0, 0.0)])
            qa.append(frags)
            part.append(acc)
        state["qa"] = qa
        state["bias"] = [quad(part, lane) if gidx is not None else 0.0 for lane in lanes]

    def softmax(s, pos0, valid):
        mx = [-math.inf] * 32
        for lane in lanes:
            t = lane % 4
            for nt in range(2):
                for e in range(2):
                    tok = 8 * nt + 2 * t + e
                    v = s[lane][nt][e]
                    v = v + state["bias"][lane] if (tok < valid and pos0 + tok <= last[lane]) else -math.inf
                    s[lane][nt][e] = v
                    mx[lane] = max(mx[lane], v)
        alpha = [0.0] * 32
        for lane in lanes:
            qmx = max(mx[(lane // 4) * 4 + u] for u in range(4))
            m_new = max(m[lane], qmx)
            m_safe = 0.0 if m_new == -math.inf else m_new
            alpha[lane] = math.exp(m[lane] - m_safe) if m[lane] != -math.inf else 0.0
            m[lane] = m_new
            tot = 0.0
            for nt in range(2):
                for e in range(2):
                    v = s[lane][nt][e]
                    s[lane][nt][e] = math.exp(v - m_safe) if v != -math.inf else 0.0
                    tot += s[lane][nt][e]
            l[lane] = l[lane] * alpha[lane] + tot
            for i in range(PER):
                zsum[lane][i] *= alpha[lane]
        for lane in lanes:
            t = lane % 4
            a0, a1 = alpha[8 * t], alpha[8 * t + 4]
            for mm in range(MTILES):
                o[lane][mm][0] *= a0; o[lane][mm][1] *= a1; o[lane][mm][2] *= a0; o[lane][mm][3] *= a1

    def p_fragment(lane, s, f, add, codes):
        v = [s[lane][k // 2][k % 2] * f[k] for k in range(4)]
        pb = [pack(v[0], v[1]), pack(v[2], v[3])]
        zs = sum(s[lane][k // 2][k % 2] * add[k] - MAGIC * rnd(v[k]) for k in range(4)) if codes else 0.0
        return pb, zs

    def scores(s, b_of):  # b_of(lane, nt, kk) -> (b0 pair, b1 pair)
        for nt in range(2):
            for kk in range(KSTEPS):
                mma([s[lane][nt] for lane in lanes], [state["qa"][lane][kk] for lane in lanes],
                    [b_of(lane, nt, kk) for lane in lanes])

    for tok0 in range(0, packed_len, 16):
        valid = min(16, packed_len - tok0)
        if tok0 % group == 0:
            set_group(tok0 // group)
        s = [[[0.0] * 4 for _ in range(2)] for _ in lanes]

        def kb(lane, nt, kk):
            g, t = lane // 4, lane % 4
            tok = 8 * nt + g
            byts = kc[tok0 + tok, t * (P // 4):(t + 1) * (P // 4)] if tok < valid else [0] * (P // 4)
            x = plane(words(list(byts))[kk % KWORDS], kk // KWORDS, bits)
            return halves(prmt(x, HB, 0x5140)), halves(prmt(x, HB, 0x7362))
        scores(s, kb)
        softmax(s, tok0, valid)
        pbs = []
        for lane in lanes:
            t = lane % 4
            slot = [2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9]
            pb_l = []
            for i in range(PER):
                gi = i * P // width
                if i > 0 and gi == (i - 1) * P // width:
                    pb_l.append(pb_l[-1])
                    continue
                f = [vs[tok0 + st, gi] if st < valid else 0.0 for st in slot]
                add = [vz[tok0 + st, gi] if st < valid else 0.0 for st in slot]
                pb, zs = p_fragment(lane, s, f, add, True)
                pb_l.append(pb)
                zsum[lane][i] += zs
            pbs.append(pb_l)
        for mm in range(MTILES):
            i, byte = mm // (VBYTES // 2), 2 * (mm % (VBYTES // 2))
            frags = []
            for lane in lanes:
                g, t = lane // 4, lane % 4
                slot = [2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9]
                vw = [words(list(vc[tok0 + st, g * VBYTES:(g + 1) * VBYTES]) if st < valid else [0] * VBYTES)
                      for st in slot]
                fr = [None] * 4
                for h in range(2):
                    lo, hi = plane(vw[2 * h][byte // 4], i, bits), plane(vw[2 * h + 1][byte // 4], i, bits)
                    for r in range(2):
                        j = byte % 4 + r
                        fr[2 * h + r] = halves((prmt(lo, hi, j | ((j + 4) << 8)) & 0x00FF00FF) | (HB & 0xFF00FF00))
                frags.append(fr)
            mma([o[lane][mm] for lane in lanes], frags, [pbs[lane][i] for lane in lanes])
    if residual_len:
        set_group(None)
        rkf, rvf = rk[0, 0].float().numpy(), rv[0, 0].float().numpy()
        for tok0 in range(0, residual_len, 16):
            valid = min(16, residual_len - tok0)
            s = [[[0.0] * 4 for _ in range(2)] for _ in lanes]

            def rb(lane, nt, kk):
                g, t = lane // 4, lane % 4
                tok = 8 * nt + g
                c = key_channel(kk, t, 0)
                kv = rkf[tok0 + tok, c:c + 4] if tok < valid else [0.0] * 4
                return (kv[0], kv[1]), (kv[2], kv[3])
            scores(s, rb)
            softmax(s, packed_len + tok0, valid)
            pbs = [p_fragment(lane, s, [1.0] * 4, [1.0] * 4, False)[0] for lane in lanes]
            for mm in range(MTILES):
                frags = []
                for lane in lanes:
                    g, t = lane // 4, lane % 4
                    slot = [2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9]
                    fr = [None] * 4
                    for h in range(2):
                        for r in range(2):
                            c = out_channel(mm, g + 8 * r)
                            fr[2 * h + r] = tuple(rvf[tok0 + slot[2 * h + u], c] if slot[2 * h + u] < valid else 0.0
                                                  for u in range(2))
                    frags.append(fr)
                mma([o[lane][mm] for lane in lanes], frags, pbs)
    out = np.zeros((rows, d))
    for lane in lanes:
        g, t = lane // 4, lane % 4
        for e in range(2):
            row = 2 * t + e
            if row >= rows:
                continue
            src = 8 * t + 4 * e  # a lane of quad `row`
            lt = quad(l, src)
            zt = [quad([zsum[x][i] for x in lanes], src) for i in range(PER)]
            for mm in range(MTILES):
                i = mm // (VBYTES // 2)
                first = (i * P // width) * width // P
                for r in range(2):
                    out[row, out_channel(mm, g + 8 * r)] = (o[lane][mm][2 * r + e] + zt[first]) / lt
    got = torch.tensor(out).reshape(expected.shape)
    err = (got - expected).abs().max().item()
    print(f"bits {bits} d {d} rows {rows} group {group} packed {packed_len} residual {residual_len} q_len {q_len}: "
          f"max err {err:.4f} (|expected| max {expected.abs().max():.3f})")
    return err


if __name__ == "__main__":
    cases = [(4, 128, 4, 64, 80, 20), (2, 128, 4, 64, 40, 0), (4, 64, 3, 32, 50, 7), (4, 128, 8, 64, 33, 5, 4),
             (2, 128, 6, 32, 64, 16, 2), (4, 128, 1, 128, 150, 3)]
    worst = max(run(*c) for c in cases)
    sys.exit(0 if worst < 0.05 else 1)
