"""Compiles the Triton KV decode kernel for an H100 (sm_90) on a machine without a GPU and prints what
the compiler made of it: registers, stack (spills), shared memory, and the instruction mix of each
loop (conditional backward branch) in the SASS. A static proxy for GPU time, for sessions without a device:
fewer instructions per tile and no spills is what to aim for; only a GPU run says what it buys.
It compiles with the specialization Triton's launcher gives a long-context call (aligned pointers,
lengths that are multiples of 16): for 60e877d's kernel it gives the registers and shared memory the
H100 reported in benchmarks/results/logs/nvidia-h100-80gb-hbm3-20261126-1909-kv-probe.log
(4 warps, 3 stages: 210 registers, 36928 B; 8 warps: 178, 37440 B); without it, 252 registers.

    python scripts/triton_sass_stats.py [--bits 4] [--warps 4 8] [--stages 3] [--dtype bfloat16] [--no-ptx]
    python scripts/triton_sass_stats.py --module old.py --bits 4 --warps 4  (another version's kernel)
    python scripts/triton_sass_stats.py --cuda-object BUILD/kvcache.cuda.o   (the CUDA tensor-core kernel;
                                                  BUILD/lora.cuda.o: the fused LoRA dy kernel)

Needs triton's bundled CUDA tools (ptxas, cuobjdump: triton/backends/nvidia/bin), no driver.
"""
import argparse
import collections
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engram_kernels.ops.kvcache import naive, triton_kernels

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
POINTERS = {"q_ptr": None, "kc_ptr": "u8", "ks_ptr": "fp16", "kz_ptr": "fp16", "vc_ptr": "u8", "vs_ptr": "fp16",
            "vz_ptr": "fp16", "rk_ptr": None, "rv_ptr": None, "scratch_ptr": "fp32", "counter_ptr": "i32",
            "out_ptr": None}
SCALARS = {"packed_len": "i32", "residual_len": "i32", "n_groups": "i32", "n_splits": "i32", "scale": "fp32"}
# What Triton's launcher tells the compiler at a long context: torch's allocations are 16-byte
# aligned and these integers are multiples of 16 (whole groups), so loads can be vectorized.
MULTIPLES_OF_16 = ("packed_len", "residual_len", "n_groups", "n_splits")
# The CUDA kernels --cuda-object looks for (bf16), by the start of their mangled names (kernel and
# template arguments; the parameters may change): the tensor-core KV decode for the benchmarks' shape
# (int4, d 128, key group 64: two value groups per token; no ablation) in kvcache.cu's object, the
# fused LoRA dy products (and its copy mode, the joined-weight forward's x Aᵀ) in lora.cu's.
CUDA_KERNELS = {
    "cuda tensor-core decode, int4 bf16 d 128 group 64 (2 value groups), 4 warps":
        "_ZN6engram10mma_decode13decode_kernelIN3c108BFloat16ELi4ELi128ELi2ELi0EEE",
    "cuda fused LoRA dy products, bf16, 4 warps": "_ZN6engram11dy_products18dy_products_kernelIN3c108BFloat16ELb0EEE",
    "cuda fused LoRA x products + copy of x, bf16, 4 warps":
        "_ZN6engram11dy_products18dy_products_kernelIN3c108BFloat16ELb1EEE",
}
EARLY_READ = 200  # instructions: a load read sooner than this is waited for in the same iteration
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_decode(bits, warps, stages, dtype, ptx, tiles=16, n_rep=4, group=64, head_dim=128, kernel=None):
    """`kernel`: another version's _decode_kernel (default: this one); it gets the arguments it has."""
    fn = kernel or triton_kernels._decode_kernel
    magic_bits, magic = triton_kernels._MAGIC.get(dtype, (0, 0.0))
    triton_kernels.USE_PTX = ptx
    asm = triton_kernels._asm(bits, magic_bits, torch.device("cuda"))
    constants = dict(TILES=tiles, N_REP=n_rep, Q_LEN=1, ROWS_PAD=max(16, n_rep), G=group,
                     GV=naive.value_group(head_dim, group), D=head_dim, BITS=bits,
                     BLOCK=triton_kernels._decode_block(group), MAGIC_BITS=magic_bits, MAGIC=magic,
                     ASM0=asm[0], ASM1=asm[1], ASM2=asm[2], ASM3=asm[3],
                     MERGE_CHUNK=triton_kernels._MERGE_CHUNK, PRECISION="tf32")
    signature = {}
    for name in fn.arg_names:
        if name in POINTERS:
            signature[name] = "*" + (POINTERS[name] or TRITON_TYPES[dtype])
        else:
            signature[name] = SCALARS.get(name, "constexpr")
    aligned = [k for k in fn.arg_names if k in POINTERS or k in MULTIPLES_OF_16]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items() if k in fn.arg_names},
                       attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                           "num_stages": stages})


def sass_stats(cubin):
    """(resources, instruction count, per-loop instruction mixes) of a compiled Triton kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decode.cubin"
        path.write_bytes(cubin)
        return object_stats(path)


def object_stats(path, function=None):
    """The same for a CUDA object or library (`function`: the kernel whose mangled name starts so, else
    all of them), its sm_90 code only (an extension built for several GPUs holds one copy per architecture)."""
    usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", "-arch", "sm_90", path], capture_output=True,
                           text=True).stdout
    if function:
        kernels = dict(re.findall(r"Function (\S+):\s*\n(.*)", usage))  # name -> its resource line
        names = [n for n in kernels if n.startswith(function)]
        if not names:
            return {}, 0, []
        function, usage = names[0], kernels[names[0]]
    select = ["-arch", "sm_90", *(["-fun", function] if function else [])]
    sass = subprocess.run([TOOLS / "cuobjdump", "-sass", *select, path], capture_output=True, text=True).stdout
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    code = [(int(m[1], 16), m[2], m[3], m[4]) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);", sass)]
    loops = []
    for address, predicate, op, operands in code:
        # A loop ends in a conditional branch back; an unconditional one is a block placed out of line
        # (a rarely taken path) jumping back into the code it left, and would count that code twice.
        target = _branch_target(predicate, op, operands)
        if target is not None and target < address:
            loops.append([c for c in code if target <= c[0] <= address])
    return resources, len(code), loops


def _branch_target(predicate, op, operands):
    """The address a conditional branch jumps to, else None."""
    target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") and predicate else None
    return int(target[1], 16) if target else None


def _registers(operands):
    return {int(r) for r in re.findall(r"\bR(\d+)", operands)}


def early_reads(body, within=EARLY_READ):
    """(global loads in a loop body, how many of them an instruction reads within `within` instructions
    of the load): such a read waits out the load's memory latency there, in every iteration. Streaming
    kernels with many warps per SM hide that behind other warps; a loop with few warps, such as the
    tensor-core KV decode (12 per SM), does not."""
    loads = early = 0
    for i, (_, _, op, operands) in enumerate(body):
        if not op.startswith("LDG."):
            continue
        loads += 1
        first = re.match(r"R(\d+)", operands)
        width = 4 if ".128" in op else 2 if ".64" in op else 1
        written = set(range(int(first[1]), int(first[1]) + width)) if first else set()
        for _, _, later_op, later in body[i + 1:i + 1 + within]:
            store = later_op.startswith(("ST", "RED", "ATOM"))  # no destination register: all operands read
            target, _, sources = later.partition(",")
            if written & _registers(later if store else sources):
                early += 1
                break
            if not store:
                written -= _registers(target)  # overwritten before any read: later reads see another value
            if not written:
                break
    return loads, early


def forward_skips(body):
    """(position, instructions jumped over) of each conditional forward branch in a loop body: blocks a
    typical iteration may skip (a key group's setup, a rescale), so that what one iteration runs is the
    loop's length less the blocks it skips."""
    start = {address: i for i, (address, _, _, _) in enumerate(body)}
    skips = []
    for i, (address, predicate, op, operands) in enumerate(body):
        target = _branch_target(predicate, op, operands)
        if target is not None and target > address and target in start:
            skips.append((i, start[target] - i - 1))
    return skips


def print_loops(loops, warps):
    for n, body in enumerate(sorted(loops, key=len, reverse=True)[:2]):
        mix = collections.Counter(op.split(".")[0] for _, _, op, _ in body)
        loads, early = early_reads(body)
        print(f"  loop of {len(body)} instructions x {warps} warps: {dict(mix.most_common(24))}")
        print(f"    {loads} global loads, {early} of them read within {EARLY_READ} instructions (the warp waits there "
              f"every iteration; only other warps can hide it)")
        if n == 0:
            print(f"    conditional blocks (position, instructions): {forward_skips(body)}")


def _load(path):
    spec = importlib.util.spec_from_file_location("other_triton_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-ptx", action="store_true", help="codes by Triton bit ops (ENGRAM_KV_PTX=0)")
    parser.add_argument("--module", metavar="PY",
                        help="the Triton decode kernel of this file instead, e.g. an earlier version: git show "
                             "REV:engram_kernels/ops/kvcache/triton_kernels.py > old.py (its relative imports "
                             "made absolute)")
    parser.add_argument("--cuda-object", metavar="PATH",
                        help="instead: the CUDA kernels of CUDA_KERNELS in this compiled object or library (e.g. "
                             "the build directory's kvcache.cuda.o or lora.cuda.o)")
    args = parser.parse_args(argv)
    if args.cuda_object:
        for title, name in CUDA_KERNELS.items():
            resources, total, loops = object_stats(args.cuda_object, name)
            if total:
                print(f"{title}: {resources}, {total} instructions")
                print_loops(loops, 4)
        return
    dtype = getattr(torch, args.dtype)
    other = _load(args.module)._decode_kernel if args.module else None
    for bits in args.bits:
        for warps in args.warps:
            kernel = compile_decode(bits, warps, args.stages, dtype, not args.no_ptx, kernel=other)
            resources, total, loops = sass_stats(kernel.asm["cubin"])
            resources["SHARED"] = kernel.metadata.shared  # Triton's is dynamic: cuobjdump sees only static
            print(f"int{bits} {args.dtype} {warps} warps {args.stages} stages: {resources}, {total} instructions")
            print_loops(loops, warps)


if __name__ == "__main__":
    main()
