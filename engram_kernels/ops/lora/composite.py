"""The LoRA ops as cuBLAS GEMMs plus adapter kernels: shared by the `triton` and `cuda` backends.

The frozen x Wᵀ (and dy W) stay with cuBLAS, which no hand-written kernel beats; the rank-r branch
is accumulated into y / dx in place. A backend module supplies the kernels that are not GEMMs:

    dropout(x, p, seed)                         drop(x), the hash mask of naive.dropout_mask
    shrink(src, perm, offsets, w, scales)       out[i] = src[perm[i]] · w[a(i)]ᵀ (· scales[a(i)]);
                                                w is a (n, r, K) view, out (N, r) in sorted order
    expand_(dst, perm, offsets, small, w, scales)  dst[perm[i]] += scales[a(i)] · small[i] · w[a(i)];
                                                w a (n, r, C) view
    grouped_outer(small, big, perm, offsets)    (n, r, C) fp32: Σ over a's rows of small[i]ᵀ big[perm[i]]
    dy_products(dy, B, u)                       (dy B, uᵀ dy), in fp32 or dy's dtype (gemm_dy_products)
    x_and_u(x, A, scale, xu)                    writes [x | s·x Aᵀ] into xu (N, in + r), returns u = x Aᵀ
                                                (the joined-weight forward; torch_x_and_u without a kernel)
with a(i) the adapter of sorted row i (segments from naive.segments; rows before offsets[1] have none).
"""
import functools

import torch


def joined_weight(weight, lora_b):
    """The (out, in + r) matrix [W | B] when W and B are adjacent column blocks of one row-major buffer
    (LoRALinear(join_weights=True) keeps them so), else None."""
    (out, k), r = weight.shape, lora_b.shape[1]
    ld = weight.stride(0)
    if weight.stride(1) != 1 or lora_b.stride() != (ld, 1) or ld < k + r or lora_b.shape[0] != out:
        return None
    if (weight.untyped_storage().data_ptr() != lora_b.untyped_storage().data_ptr()
            or lora_b.storage_offset() != weight.storage_offset() + k):
        return None
    return weight.as_strided((out, k + r), (ld, 1))


def padded_rows(n, width, like):
    """An (n, width) view of a buffer whose rows are padded to 16 bytes (cuBLAS's fast leading dims)."""
    per_16 = max(1, 16 // like.element_size())
    ld = -(-width // per_16) * per_16
    return like.new_empty(n, ld)[:, :width]


def joined_copies(weight, lora_b):
    """Copies of W and B as the column blocks of one new (out, in + r) buffer with padded rows."""
    k = weight.shape[1]
    wide = padded_rows(weight.shape[0], k + lora_b.shape[1], weight)
    wide[:, :k].copy_(weight)
    wide[:, k:].copy_(lora_b)
    return wide[:, :k], wide[:, k:]


def torch_x_and_u(x, lora_a, scale, xu):
    u = x @ lora_a.t()
    xu[:, :x.shape[1]].copy_(x)
    torch.mul(u, scale, out=xu[:, x.shape[1]:])
    return u


def lora_forward(kernels, x, weight, bias, lora_a, lora_b, scale, p, seed):
    wide = None if p else joined_weight(weight, lora_b)
    if wide is not None:
        # y = [x | s·u] [W | B]ᵀ: one GEMM with K = in + r. Copying x once (read + write N·in) costs
        # less than the separate branch's read and write of y (N·out, 3.5x larger at llama8b).
        xu = padded_rows(x.shape[0], wide.shape[1], x)
        u = kernels.x_and_u(x, lora_a, scale, xu)
        return (torch.addmm(bias, xu, wide.t()) if bias is not None else xu @ wide.t()), u
    u = (kernels.dropout(x, p, seed) if p else x) @ lora_a.t()
    # The rank-r product is written first and the frozen GEMM accumulates onto it in place
    # (beta = 1): y is read once in the epilogue of a compute-bound GEMM, not read and written
    # again by a separate update.
    us = u * scale
    y = torch.addmm(bias, us, lora_b.t()) if bias is not None else us @ lora_b.t()
    return y.addmm_(x, weight.t()), u


def gemm_dy_products(grad_y, lora_b, u):
    """(dy B, uᵀ dy) as two cuBLAS GEMMs, each reading dy: a backend's dy_products without a kernel."""
    return grad_y @ lora_b, u.t() @ grad_y


def lora_backward(kernels, grad_y, x, weight, lora_a, lora_b, u, scale, p, seed):
    lora_b = lora_b.contiguous()  # a column block of [W | B] in the joined layout
    g, db_t = kernels.dy_products(grad_y, lora_b, u)
    g = g.to(grad_y.dtype).mul_(scale)
    dx = g @ lora_a
    if p:
        dx = kernels.dropout(dx, p, seed)
    dx.addmm_(grad_y, weight)  # in place, as in the forward (out-of-place addmm would copy the branch first)
    xd = kernels.dropout(x, p, seed) if p else x
    return dx, g.t() @ xd, (db_t.t() * scale).to(lora_b.dtype).contiguous()


def multi_forward(kernels, x, weight, bias, lora_a, lora_b, scales, perm, offsets):
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    u = kernels.shrink(x, perm, offsets, lora_a, None)
    kernels.expand_(y, perm, offsets, u, lora_b.transpose(1, 2), scales)
    return y, u


def multi_backward(kernels, grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u):
    g = kernels.shrink(grad_y, perm, offsets, lora_b.transpose(1, 2), scales)
    dx = grad_y @ weight
    kernels.expand_(dx, perm, offsets, g, lora_a, None)
    da = kernels.grouped_outer(g, x, perm, offsets, lora_a.shape[0])
    db_t = kernels.grouped_outer(u, grad_y, perm, offsets, lora_a.shape[0])
    db = (db_t * scales.view(-1, 1, 1)).transpose(1, 2)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype).contiguous()


def bind(kernels):
    """(lora_forward, lora_backward, multi_forward, multi_backward) of a GPU backend: the functions
    above with that backend's adapter kernels."""
    return tuple(functools.partial(f, kernels) for f in (lora_forward, lora_backward, multi_forward, multi_backward))
