"""Optimizers for memory value tables: one fused kernel updates only the touched rows (and their
state), optionally restricted to an allow-mask of rows (the slots a trainer lets change). The
touched rows are those of a sparse gradient (ProductKeyMemory's default, sparse_grad=True); with a
dense gradient every row counts as touched, weight decay included."""
import torch

from ..ops.memory import sparse_adam_step, sparse_sgd_step


def _rows_and_grads(param):
    """Unique touched row ids and their gradients, from a sparse or dense gradient."""
    grad = param.grad
    if grad.is_sparse:
        rows = grad._indices()[0]
        # Autograd drops the coalesced flag of the gradients weighted_gather makes; strictly increasing
        # rows are unique, so those need no coalescing. Accumulated gradients (several backwards) do.
        if grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
        return grad._indices()[0], grad._values()
    if grad.dim() != 2:
        raise ValueError("fused sparse optimizers update 2-D tables (rows x width)")
    return torch.arange(grad.shape[0], device=grad.device), grad


class _AllowMaskMixin:
    def set_allow_mask(self, param, mask):
        """Only rows where `mask` (bool, one per row) is True may change; None lifts the limit."""
        if mask is not None and (mask.dtype != torch.bool or mask.shape != param.shape[:1]):
            raise ValueError(f"allow mask must be bool of shape ({param.shape[0]},)")
        self.state[param]["allow_mask"] = mask

    def allow_mask(self, param):
        return self.state[param].get("allow_mask")

    def load_state_dict(self, state_dict):
        """As torch's, but the state keeps its own dtypes: torch casts every state tensor to its
        parameter's dtype, which would turn the fp32 moments of a bf16 table into bf16 and the bool
        allow-mask into floats."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in saved.items():
            state = self.state[params[index]]
            for key, value in entry.items():
                if torch.is_tensor(value):
                    state[key] = value.to(params[index].device).contiguous()


class FusedSparseSGD(_AllowMaskMixin, torch.optim.Optimizer):
    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grads = _rows_and_grads(p)
                sparse_sgd_step(p, rows, grads, group["lr"], group["weight_decay"], self.allow_mask(p),
                                check_values=False)
        return loss


class FusedSparseAdam(_AllowMaskMixin, torch.optim.Optimizer):
    """Lazy Adam (as torch.optim.SparseAdam) with decoupled weight decay and fp32 state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                rows, grads = _rows_and_grads(p)
                sparse_adam_step(p, state["exp_avg"], state["exp_avg_sq"], rows, grads, state["step"], group["lr"],
                                 beta1, beta2, group["eps"], group["weight_decay"], self.allow_mask(p),
                                 check_values=False)
        return loss
