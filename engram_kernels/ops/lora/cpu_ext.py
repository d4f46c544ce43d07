"""`cpu` backend: csrc/cpu/lora.cpp (ATen GEMMs with the branch accumulated in place, hash dropout,
segment-parallel many-adapter GEMMs)."""
from ...backends import extension

_C = extension("_C_lora_cpu")


def lora_forward(x, weight, bias, lora_a, lora_b, scale, p, seed):
    return _C.lora_forward(x, weight, bias, lora_a, lora_b, scale, p, seed)


def lora_backward(grad_y, x, weight, lora_a, lora_b, u, scale, p, seed):
    return _C.lora_backward(grad_y, x, weight, lora_a, lora_b, u, scale, p, seed)


def multi_forward(x, weight, bias, lora_a, lora_b, scales, perm, offsets):
    return _C.multi_forward(x, weight, bias, lora_a, lora_b, scales, perm, offsets)


def multi_backward(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u):
    return _C.multi_backward(grad_y, x, weight, lora_a, lora_b, scales, perm, offsets, u)
