// The inline-PTX instructions the tensor-core decode kernel uses, each behind a function, so that
// csrc/emulation/host_warps.h can give the same names a host meaning and the kernel runs on a CPU.
#pragma once

#include <cstdint>

namespace engram {
namespace ptx {

// d += A B for one warp: mma.sync m16n8k16, row.col, fp32 accumulate; BF16 picks bf16 (else f16).
template <bool BF16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma_decode::supported keeps pre-Ampere GPUs off this instruction
#else
#define ENGRAM_MMA(TYPE)                                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                                  \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (BF16) ENGRAM_MMA("bf16");
  else ENGRAM_MMA("f16");
#undef ENGRAM_MMA
#endif
}

// 2^x, flushing denormal results to zero (ex2.approx.ftz).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Byte permute: byte k of the result is byte (selector >> 4k) & 7 of b:a.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// Asks L2 for the line holding p: no register, no wait.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

}  // namespace ptx
}  // namespace engram
