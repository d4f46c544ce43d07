"""ProductKeyMemory: a sparse key-value memory layer (Lample et al. 2019; Berges et al. 2024)."""
import math

import torch
from torch import nn

from ..ops.memory import pk_topk, weighted_gather


class SlotMemory(nn.Module):
    """What every memory layer shares: a value table read at the slots `lookup(x)` picks, access
    hooks, an optional silu gate and an output projection when value_dim != dim."""

    def _add_value_table(self, n_slots, gated, factory):
        self.access_hooks = []  # callables receiving the (N, reads) slot ids of every forward
        self.values = nn.Parameter(torch.empty(n_slots, self.value_dim, **factory))
        self.gate = nn.Linear(self.dim, self.value_dim, bias=False, **factory) if gated else None
        self.out = nn.Linear(self.value_dim, self.dim, bias=False, **factory) if self.value_dim != self.dim else None

    def forward(self, x):
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}(dim={self.dim}) takes (..., {self.dim}) inputs, got "
                             f"{tuple(x.shape)}")
        ids, weights = self.lookup(x)
        for hook in self.access_hooks:
            hook(ids)
        mem = weighted_gather(self.values, ids, weights, sparse_grad=self.sparse_grad, check_values=False)
        mem = mem.to(x.dtype)
        if self.gate is not None:
            mem = mem * nn.functional.silu(self.gate(x.reshape(-1, self.dim)))
        if self.out is not None:
            mem = self.out(mem)
        return mem.reshape(x.shape)


class ProductKeyMemory(SlotMemory):
    """x (..., dim) -> (..., dim): each head picks `k` of `n_keys**2` value rows by product keys.

    Per head: query = RMSNorm(W_q x) (Dk wide), top-k slots over the product of two sub-key tables,
    softmax over the k scores; all heads' picks share one value table (n_keys**2, value_dim) and are
    summed. Optionally gated by silu(W_g x) and projected back to `dim` when value_dim != dim.

    Defaults suit retrofitting a pretrained model: values start at zero, so the layer outputs
    zeros and changes nothing until trained. `sparse_grad=True` gives the value table a sparse
    gradient holding only the touched rows (for FusedSparseAdam / FusedSparseSGD or SparseAdam).

    A pretrained model's hidden states share a large common direction, so a random query projection
    sends most tokens to the same few sub-keys; `calibrate_queries` centers and whitens the query
    input on sample activations so that tokens spread over the slots (see its docstring).
    """

    addressing = "product_keys"

    def __init__(self, dim, heads=4, k=32, n_keys=256, key_dim=256, value_dim=None, gated=True,
                 value_init="zeros", sparse_grad=True, dtype=None, device=None):
        super().__init__()
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (it splits into two halves), got {key_dim}")
        if not 1 <= k <= n_keys:
            raise ValueError(f"k must be in [1, n_keys={n_keys}], got {k}")
        if value_init not in ("zeros", "normal"):
            raise ValueError(f"value_init must be 'zeros' or 'normal', got {value_init!r}")
        factory = {"dtype": dtype, "device": device}
        self.dim, self.heads, self.k, self.n_keys, self.key_dim = dim, heads, k, n_keys, key_dim
        self.value_dim = value_dim or dim
        self.sparse_grad, self.value_init = sparse_grad, value_init
        self.query = nn.Linear(dim, heads * key_dim, bias=False, **factory)
        self.query_norm = nn.RMSNorm(key_dim, **factory)
        self.register_buffer("query_center", torch.zeros(dim, **factory))  # see calibrate_queries
        self.keys1 = nn.Parameter(torch.empty(heads, n_keys, key_dim // 2, **factory))
        self.keys2 = nn.Parameter(torch.empty(heads, n_keys, key_dim // 2, **factory))
        self._add_value_table(n_keys * n_keys, gated, factory)
        self.reset_parameters()

    @property
    def n_slots(self):
        return self.n_keys * self.n_keys

    def config(self):
        """Constructor arguments, JSON-serializable (saved beside the weights)."""
        return {"dim": self.dim, "heads": self.heads, "k": self.k, "n_keys": self.n_keys,
                "key_dim": self.key_dim, "value_dim": self.value_dim, "gated": self.gate is not None,
                "value_init": self.value_init, "sparse_grad": self.sparse_grad}

    @torch.no_grad()
    def reset_parameters(self):
        bound = 1 / math.sqrt(self.key_dim // 2)
        nn.init.uniform_(self.keys1, -bound, bound)
        nn.init.uniform_(self.keys2, -bound, bound)
        if self.value_init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=self.value_dim ** -0.5)
        self.query_norm.reset_parameters()
        self.query_center.zero_()

    @torch.no_grad()
    def calibrate_queries(self, inputs, shrinkage=0.1):
        """Center and whiten the query input on sample activations `inputs` (..., dim), e.g. the
        layer's inputs on ordinary text: query(x) becomes W C^-1/2 (x - mean) with C the inputs'
        covariance, its eigenvalues raised by `shrinkage` x their mean (so directions the sample
        barely spans are not blown up). Whitened inputs are isotropic, so the random projection and
        keys spread tokens over the slots by what distinguishes them rather than by the direction
        all hidden states share: on SmolLM2 this halves how many slot reads unrelated facts share.
        Whitens the current projection: call once, on a fresh memory (it changes which slots every
        token reads, so trained values would no longer be found)."""
        x = inputs.reshape(-1, self.dim).double()
        if x.shape[0] < 2 or not torch.isfinite(x).all():
            raise ValueError(f"calibrate_queries needs at least 2 finite input rows, got {x.shape[0]}")
        if shrinkage <= 0:
            raise ValueError(f"shrinkage must be positive, got {shrinkage}")
        mean = x.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((x - mean).T))
        eigenvalues = eigenvalues.clamp(min=0)
        eigenvalues = eigenvalues + shrinkage * eigenvalues.mean().clamp(min=torch.finfo(torch.float32).tiny)
        whiten = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        self.query.weight.copy_(self.query.weight.double() @ whiten.to(self.query.weight.device))
        self.query_center.copy_(mean)

    def lookup(self, x):
        """Slot ids (N, H*k) and softmax weights (N, H*k) for the flattened tokens of x."""
        x = x.reshape(-1, self.dim) - self.query_center.to(x.dtype)
        q = self.query_norm(self.query(x).unflatten(-1, (self.heads, self.key_dim)))
        scores, ids = pk_topk(q, self.keys1, self.keys2, self.k, check_values=False)
        return ids.flatten(1), scores.softmax(-1).flatten(1)

    def extra_repr(self):
        return (f"dim={self.dim}, heads={self.heads}, k={self.k}, n_keys={self.n_keys} "
                f"({self.n_slots} slots), key_dim={self.key_dim}, value_dim={self.value_dim}")
