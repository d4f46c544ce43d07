"""Builds the compiled backends: `_C_cpu` always (C++/OpenMP), `_C_cuda` when torch has CUDA and
nvcc is found. A failed or impossible build leaves the package usable: the dispatcher falls back to
the pure-PyTorch reference with a one-line notice.

ENGRAM_NO_EXTENSIONS=1 skips both; ENGRAM_CPU_ARCH sets -march (default: native, the machine that
builds is the machine that runs an install from source).
"""
import os
import shutil

from setuptools import setup


def cpu_extension(cpp):
    arch = os.environ.get("ENGRAM_CPU_ARCH", "native")
    return cpp.CppExtension(
        "engram_kernels._C_cpu",
        ["csrc/cpu/memory.cpp"],
        extra_compile_args=["-O3", "-fopenmp", f"-march={arch}", "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
    )


def cuda_extension(cpp):
    return cpp.CUDAExtension(
        "engram_kernels._C_cuda",
        ["csrc/cuda/bindings.cpp", "csrc/cuda/memory.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )


def extensions():
    if os.environ.get("ENGRAM_NO_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as cpp
    except ImportError:
        print("engram_kernels: torch not importable at build time; installing without compiled backends")
        return [], {}
    exts = [cpu_extension(cpp)]
    if torch.version.cuda and (cpp.CUDA_HOME or shutil.which("nvcc")) and os.path.exists("csrc/cuda/memory.cu"):
        exts.append(cuda_extension(cpp))
    return exts, {"build_ext": cpp.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
