"""NgramMemory: a memory layer addressed by the tokens themselves (hashed n-grams), not the hidden state."""
import torch
from torch import nn

from .memory import SlotMemory

NO_TOKEN = -1  # stands in for the tokens before a sequence's first one


class NgramMemory(SlotMemory):
    """x (..., dim) -> (..., dim): each token reads, for every n-gram order in `orders` ending at it
    and each of `heads` hash functions, one row of a shared value table (n_slots, value_dim), and
    averages them (optionally gated by silu(W_g x)).

    A product-key memory retrofitted into a pretrained model reads slots by its hidden state, and a
    reworded question puts the same subject in a state closer to other questions than to its own
    (eval_results/README.md, sixth session): what was written under one wording is not found under
    another. Hashed n-grams are the same in every context, so "King's Cross" reads the same rows in
    any question about it; the frozen attention above carries what they hold to where it is asked.

    The token ids come from the model, not from `x`: `add_memory_layers(..., addressing="ngram")`
    hooks the model's forward to hand every NgramMemory the current input_ids (`set_tokens`), with the
    last tokens of the previous call in front while a KV cache continues the sequence.
    """

    addressing = "ngram"

    def __init__(self, dim, n_slots=65536, orders=(1, 2, 3), heads=2, value_dim=None, gated=False,
                 value_init="zeros", sparse_grad=True, seed=0, dtype=None, device=None):
        super().__init__()
        orders = tuple(sorted(set(int(n) for n in orders)))
        if not orders or orders[0] < 1:
            raise ValueError(f"orders must be positive n-gram lengths, got {orders}")
        if n_slots < 1 or heads < 1:
            raise ValueError(f"n_slots and heads must be positive, got {n_slots} and {heads}")
        if value_init not in ("zeros", "normal"):
            raise ValueError(f"value_init must be 'zeros' or 'normal', got {value_init!r}")
        factory = {"dtype": dtype, "device": device}
        self.dim, self.n_slots, self.orders, self.heads, self.seed = dim, n_slots, orders, heads, seed
        self.value_dim = value_dim or dim
        self.sparse_grad, self.value_init = sparse_grad, value_init
        generator = torch.Generator().manual_seed(seed)
        multipliers = torch.randint(1, 2 ** 31, (len(orders), heads), generator=generator) * 2 + 1
        self.register_buffer("multipliers", multipliers.to(device), persistent=False)
        self._add_value_table(n_slots, gated, factory)
        self.tokens = None   # (B, history + T) ids of the current forward, history first
        self.history = None  # (B, history) last ids of the previous forward
        self.reset_parameters()

    @property
    def context(self):
        """Tokens before the current one that an n-gram may reach back to."""
        return self.orders[-1] - 1

    @property
    def reads(self):
        return len(self.orders) * self.heads

    def config(self):
        return {"addressing": self.addressing, "dim": self.dim, "n_slots": self.n_slots, "orders": list(self.orders),
                "heads": self.heads, "value_dim": self.value_dim, "gated": self.gate is not None,
                "value_init": self.value_init, "sparse_grad": self.sparse_grad, "seed": self.seed}

    @torch.no_grad()
    def reset_parameters(self):
        if self.value_init == "zeros":
            nn.init.zeros_(self.values)
        else:
            nn.init.normal_(self.values, std=self.value_dim ** -0.5)

    def set_tokens(self, input_ids, continues):
        """Hand over the (B, T) ids of the next forward; `continues`: they extend the previous ones
        (a decoding step on a KV cache), so its last tokens start this one's n-grams."""
        ids = input_ids.long()
        history = self.history if continues and self.history is not None and len(self.history) == len(ids) else \
            torch.full((len(ids), self.context), NO_TOKEN, dtype=torch.long, device=ids.device)
        self.tokens = torch.cat([history.to(ids.device), ids], 1)
        self.history = self.tokens[:, self.tokens.shape[1] - self.context:]

    def slot_ids(self, tokens):
        """(B * T, reads) slot ids of the T = tokens.shape[1] - context newest tokens of `tokens`."""
        length = tokens.shape[1] - self.context
        ids = []
        for o, n in enumerate(self.orders):
            gram = torch.zeros(tokens.shape[0], length, dtype=torch.long, device=tokens.device)
            for j in range(n):  # polynomial hash of the n tokens ending at each position
                start = self.context - n + 1 + j
                gram = gram * 1_000_003 + tokens[:, start:start + length] + 2
            mixed = gram.unsqueeze(-1) * self.multipliers[o].to(gram.device)
            ids.append(torch.remainder(mixed ^ (mixed >> 31), self.n_slots))
        return torch.cat(ids, -1).reshape(-1, self.reads)

    def lookup(self, x):
        """Slot ids (N, reads) and their equal weights for the flattened tokens of x."""
        tokens = self.tokens
        if tokens is None or (tokens.shape[0], tokens.shape[1] - self.context) != tuple(x.shape[:-1]):
            raise RuntimeError("NgramMemory has no token ids for this input: call the model it was added to with "
                               "input_ids (add_memory_layers(..., addressing='ngram') hooks its forward)")
        ids = self.slot_ids(tokens)
        return ids, torch.full(ids.shape, 1.0 / self.reads, dtype=self.values.dtype, device=x.device)

    def extra_repr(self):
        return (f"dim={self.dim}, n_slots={self.n_slots}, orders={self.orders}, heads={self.heads}, "
                f"value_dim={self.value_dim}")
