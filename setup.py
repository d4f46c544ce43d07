"""Builds the compiled backends, one pair of extensions per op family (memory, lora, kvcache):

    engram_kernels._C_<family>_cpu    from csrc/cpu/<family>.cpp            (C++/OpenMP, always)
    engram_kernels._C_<family>_cuda   from csrc/cuda/<family>.cu + <family>_bindings.cpp
                                      (when torch has CUDA and nvcc is found)

A family whose sources do not exist yet is skipped. A failed or impossible build leaves the package
usable (a failing extension is reported and skipped, the others still build): the dispatcher falls
back to the pure-PyTorch reference with a one-line notice.

ENGRAM_NO_EXTENSIONS=1 skips all; ENGRAM_FAMILIES=memory,lora builds only those families (one process
per family, each with its own --build-temp, builds them side by side: torch's ninja build file is
per build directory, so `build_ext -j` over several extensions races); ENGRAM_CPU_ARCH sets -march (default: native, the machine that
builds is the machine that runs an install from source). ENGRAM_KV_ABLATION=1 builds only
engram_kernels._C_kvcache_ablation, timing-only KV decode kernels with parts of their work left out
(csrc/cuda/kvcache_ablation.cu, for scripts/kv_decode_probe.py --ablation; never part of an install).
"""
import glob
import os
import shutil

from setuptools import setup

FAMILIES = ("memory", "lora", "kvcache")


def cpu_extension(cpp, family):
    arch = os.environ.get("ENGRAM_CPU_ARCH", "native")
    return cpp.CppExtension(
        f"engram_kernels._C_{family}_cpu",
        [f"csrc/cpu/{family}.cpp"],
        extra_compile_args=["-O3", "-fopenmp", f"-march={arch}", "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
    )


def cuda_extension(cpp, name, sources):
    return cpp.CUDAExtension(
        f"engram_kernels.{name}",
        sources,
        depends=sorted(glob.glob("csrc/cuda/*.cuh")),  # a header edit rebuilds the extension
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )


def build_command(cpp):
    class BuildEachExtension(cpp.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # one family's failure must not cost the others their build
                print(f"engram_kernels: WARNING: building {ext.name} failed ({type(exc).__name__}: {exc}); "
                      "its ops fall back to the torch reference")

    return BuildEachExtension.with_options(no_python_abi_suffix=False)


def extensions():
    if os.environ.get("ENGRAM_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as cpp
    except ImportError:
        print("engram_kernels: torch not importable at build time; installing without compiled backends")
        return [], {}
    with_cuda = bool(torch.version.cuda and (cpp.CUDA_HOME or shutil.which("nvcc")))
    if os.environ.get("ENGRAM_KV_ABLATION") == "1":
        exts = [cuda_extension(cpp, "_C_kvcache_ablation", ["csrc/cuda/kvcache_ablation.cu"])] if with_cuda else []
        return exts, {"build_ext": build_command(cpp)}
    exts = []
    wanted = os.environ.get("ENGRAM_FAMILIES")
    for family in (wanted.split(",") if wanted else FAMILIES):
        if os.path.exists(f"csrc/cpu/{family}.cpp"):
            exts.append(cpu_extension(cpp, family))
        if with_cuda and os.path.exists(f"csrc/cuda/{family}.cu"):
            exts.append(cuda_extension(cpp, f"_C_{family}_cuda",
                                       [f"csrc/cuda/{family}_bindings.cpp", f"csrc/cuda/{family}.cu"]))
    return exts, {"build_ext": build_command(cpp)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
