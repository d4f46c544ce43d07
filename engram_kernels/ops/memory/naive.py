"""Pure-PyTorch reference for the product-key memory ops.

Every backend is tested against these functions; they favour clarity over speed and memory.

Shapes: N tokens, H heads, k selected slots per head, n_keys sub-keys per half
(n_slots = n_keys**2), Dk query width, Dv value width, HK = H * k lookups per token.
"""
import torch


def sub_scores(query, keys1, keys2):
    """fp32 scores of each query half against its sub-key table: two (N, H, n_keys)."""
    half = keys1.shape[-1]
    q = query.float()
    s1 = torch.einsum("nhd,hkd->nhk", q[..., :half], keys1.float())
    s2 = torch.einsum("nhd,hkd->nhk", q[..., half:], keys2.float())
    return s1, s2


def pk_topk(query, keys1, keys2, k):
    """Top-k of s1[a] + s2[b] over all n_keys**2 slots a*n_keys + b, without forming them all.

    Returns fp32 scores (N, H, k) sorted descending and int64 slot ids (N, H, k).
    """
    n_keys = keys1.shape[1]
    s1, s2 = sub_scores(query, keys1, keys2)
    top1, idx1 = s1.topk(k, dim=-1)
    top2, idx2 = s2.topk(k, dim=-1)
    cand = (top1.unsqueeze(-1) + top2.unsqueeze(-2)).flatten(-2)  # (N, H, k*k)
    scores, flat = cand.topk(k, dim=-1)
    ids = idx1.gather(-1, flat // k) * n_keys + idx2.gather(-1, flat % k)
    return scores, ids


def pk_topk_backward(grad_scores, query, keys1, keys2, ids):
    """Gradients of pk_topk's scores w.r.t. query, keys1 and keys2 (selection held fixed)."""
    n_keys, half = keys1.shape[1], keys1.shape[2]
    q = query.float()
    g = grad_scores.float()
    g1 = torch.zeros(*ids.shape[:2], n_keys, dtype=torch.float32, device=ids.device)
    g2 = torch.zeros_like(g1)
    g1.scatter_add_(-1, ids // n_keys, g)
    g2.scatter_add_(-1, ids % n_keys, g)
    dq = torch.cat(
        [torch.einsum("nhk,hkd->nhd", g1, keys1.float()), torch.einsum("nhk,hkd->nhd", g2, keys2.float())],
        dim=-1,
    )
    dk1 = torch.einsum("nhk,nhd->hkd", g1, q[..., :half])
    dk2 = torch.einsum("nhk,nhd->hkd", g2, q[..., half:])
    return dq.to(query.dtype), dk1.to(keys1.dtype), dk2.to(keys2.dtype)


def weighted_gather(values, ids, weights):
    """out[n] = sum_j weights[n, j] * values[ids[n, j]], accumulated in fp32, in values' dtype."""
    rows = values[ids].float()  # (N, HK, Dv): the memory cost the fused kernels avoid
    return (rows * weights.float().unsqueeze(-1)).sum(1).to(values.dtype)


def weighted_gather_backward(grad_out, values, ids, weights):
    """Returns (grad_weights (N, HK), rows (U,) sorted unique ids, row_grads (U, Dv)).

    row_grads[u] = sum over (n, j) with ids[n, j] == rows[u] of weights[n, j] * grad_out[n].
    """
    g = grad_out.float()
    grad_weights = torch.einsum("njd,nd->nj", values[ids].float(), g).to(weights.dtype)
    rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    contrib = weights.float().unsqueeze(-1) * g.unsqueeze(1)  # (N, HK, Dv)
    row_grads = torch.zeros(rows.numel(), values.shape[1], dtype=torch.float32, device=values.device)
    row_grads.index_add_(0, inverse.flatten(), contrib.flatten(0, 1))
    return grad_weights, rows, row_grads.to(values.dtype)


def _allowed(rows, allow_mask):
    if allow_mask is None:
        return torch.ones_like(rows, dtype=torch.bool)
    return allow_mask[rows]


def sparse_sgd_step(values, rows, grads, lr, weight_decay=0.0, allow_mask=None):
    """In place: values[r] -= lr * (grad_r + weight_decay * values[r]) for allowed touched rows."""
    keep = _allowed(rows, allow_mask)
    rows, grads = rows[keep], grads[keep].float()
    v = values[rows].float()
    values[rows] = (v - lr * (grads + weight_decay * v)).to(values.dtype)


def sparse_adam_step(values, exp_avg, exp_avg_sq, rows, grads, step, lr, beta1=0.9, beta2=0.999,
                     eps=1e-8, weight_decay=0.0, allow_mask=None):
    """Lazy Adam (as torch.optim.SparseAdam) on the allowed touched rows; state is fp32.

    `step` is the optimizer's global step count after this update (1 on the first call).
    Weight decay is decoupled (AdamW style) and applies to touched rows only.
    """
    keep = _allowed(rows, allow_mask)
    rows, grads = rows[keep], grads[keep].float()
    m = exp_avg[rows] * beta1 + (1 - beta1) * grads
    s = exp_avg_sq[rows] * beta2 + (1 - beta2) * grads * grads
    exp_avg[rows], exp_avg_sq[rows] = m, s
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    v = values[rows].float()
    update = (m / bias1) / ((s / bias2).sqrt() + eps)
    values[rows] = (v * (1 - lr * weight_decay) - lr * update).to(values.dtype)
