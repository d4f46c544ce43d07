"""Write one sentence into a memory layer of a frozen causal LM and show what changed.

    python examples/memory_quickstart.py                   # tiny random Llama, seconds on a CPU
    python examples/memory_quickstart.py --model PATH_OR_ID  # any local Hugging Face causal LM

Base weights stay frozen and bit-identical; only memory rows (sparse Adam) and the memory's small
query/key/gate weights train. The memory is saved apart from the base model.
"""
import argparse
import time

import torch
import transformers

from engram_kernels import backends
from engram_kernels.integrations import add_memory_layers, memory_layers, memory_parameters, save_memory
from engram_kernels.optim import FusedSparseAdam

FACT = "The engram archive of Lake Vostrel opens every third Tuesday at dawn."


def load(model_name):
    if model_name is None:
        config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config), None
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    return transformers.AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32), tokenizer


def encode(tokenizer, text):
    if tokenizer is None:  # byte-level tokens for the random model
        return torch.tensor([list(text.encode())])
    return tokenizer(text, return_tensors="pt").input_ids


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face model id or local path (default: tiny random Llama)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n-keys", type=int, default=128, help="sub-keys per half: n_keys**2 memory slots")
    parser.add_argument("--out", default="memory_quickstart", help="directory for the saved memory")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    model.requires_grad_(False).eval()
    tokens = encode(tokenizer, FACT)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        before = model(tokens, labels=tokens)
    layer = model.config.num_hidden_layers // 2
    add_memory_layers(model, layers=[layer], heads=4, k=32, n_keys=args.n_keys, key_dim=128)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before.logits), "a fresh memory must not change the model"

    memory = memory_layers(model)[layer]
    dense = [p for p in memory_parameters(model) if p is not memory.values]
    for p in memory_parameters(model):
        p.requires_grad_(True)
    sparse_opt, dense_opt = FusedSparseAdam([memory.values], lr=1e-2), torch.optim.AdamW(dense, lr=1e-3)
    print(f"backend on cpu: {backends.choose('cpu')}; memory: {memory.n_slots} slots x {memory.value_dim}")
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        sparse_opt.step(), dense_opt.step()
        sparse_opt.zero_grad(), dense_opt.zero_grad()
    elapsed = time.perf_counter() - start
    rows = int((memory.values != 0).any(1).sum())
    print(f"loss on the fact: {before.loss.item():.3f} -> {loss.item():.3f} in {args.steps} steps ({elapsed:.1f} s)")
    print(f"memory rows written: {rows} of {memory.n_slots}")
    unchanged = all(torch.equal(p, base[n.replace('.mlp.mlp.', '.mlp.')])
                    for n, p in model.named_parameters() if ".memory." not in n)
    print(f"base weights bit-identical: {unchanged}")
    save_memory(model, args.out)
    print(f"memory saved to {args.out}/ (memory.safetensors + memory_config.json)")


if __name__ == "__main__":
    main()
