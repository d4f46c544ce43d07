"""Input validation, run before any kernel so bad input fails with a clear Python error."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int64, torch.int32)


def _fail(op, message):
    raise ValueError(f"{op}: {message}")


def check_float(op, name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:  # None: any number of dimensions
        _fail(op, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_ids(op, ids, ndim, n_slots, check_values):
    if not isinstance(ids, torch.Tensor) or ids.dtype not in ID_DTYPES:
        raise TypeError(f"{op}: ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.dim() != ndim:
        _fail(op, f"ids must have {ndim} dimensions, got shape {tuple(ids.shape)}")
    if check_values and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n_slots:
            raise IndexError(f"{op}: ids must lie in [0, {n_slots}), found values in [{lo}, {hi}]")


def check_same_device(op, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        _fail(op, "all tensors must be on one device, got " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_finite(op, **tensors):
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            _fail(op, f"{name} contains NaN or Inf")


def check_pk_topk(query, keys1, keys2, k, check_values=True):
    op = "pk_topk"
    check_float(op, "query", query, 3)
    check_float(op, "keys1", keys1, 3)
    check_float(op, "keys2", keys2, 3)
    check_same_device(op, query=query, keys1=keys1, keys2=keys2)
    if keys1.shape != keys2.shape:
        _fail(op, f"keys1 {tuple(keys1.shape)} and keys2 {tuple(keys2.shape)} must have one shape")
    n, heads, dk = query.shape
    if keys1.shape[0] != heads or 2 * keys1.shape[2] != dk:
        _fail(op, f"query (N, H, Dk)={tuple(query.shape)} needs keys of shape (H, n_keys, Dk/2)="
                  f"({heads}, n_keys, {dk / 2:g}), got {tuple(keys1.shape)}")
    if not isinstance(k, int) or not 1 <= k <= keys1.shape[1]:
        _fail(op, f"k must be an int in [1, n_keys={keys1.shape[1]}], got {k!r}")
    if check_values:
        check_finite(op, query=query, keys1=keys1, keys2=keys2)


def check_weighted_gather(values, ids, weights, check_values=True):
    op = "weighted_gather"
    check_float(op, "values", values, 2)
    check_float(op, "weights", weights, 2)
    check_ids(op, ids, 2, values.shape[0], check_values)
    check_same_device(op, values=values, ids=ids, weights=weights)
    if weights.shape != ids.shape:
        _fail(op, f"weights {tuple(weights.shape)} must match ids {tuple(ids.shape)}")
    if check_values:
        check_finite(op, weights=weights)


def check_sparse_step(op, values, rows, grads, allow_mask, states=(), check_values=True):
    check_float(op, "values", values, 2)
    check_float(op, "grads", grads, 2)
    check_ids(op, rows, 1, values.shape[0], check_values)
    check_same_device(op, values=values, rows=rows, grads=grads, allow_mask=allow_mask,
                      **{f"state{i}": s for i, s in enumerate(states)})
    if grads.shape != (rows.shape[0], values.shape[1]):
        _fail(op, f"grads must have shape (len(rows), Dv)=({rows.shape[0]}, {values.shape[1]}), "
                  f"got {tuple(grads.shape)}")
    if not values.is_contiguous():
        _fail(op, "values must be contiguous (it is updated in place)")
    for state in states:
        if state.dtype != torch.float32 or state.shape != values.shape or not state.is_contiguous():
            _fail(op, f"optimizer state must be contiguous float32 of shape {tuple(values.shape)}, "
                      f"got {state.dtype} {tuple(state.shape)}")
    if allow_mask is not None and (allow_mask.dtype != torch.bool or allow_mask.shape != values.shape[:1]):
        _fail(op, f"allow_mask must be a bool tensor of shape ({values.shape[0]},), "
                  f"got {allow_mask.dtype} {tuple(allow_mask.shape)}")
    if check_values:
        check_finite(op, grads=grads)
        if rows.numel() > 1 and torch.unique(rows).numel() != rows.numel():
            _fail(op, "rows must be unique (sum the gradients of a repeated row first)")
