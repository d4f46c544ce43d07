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

// The transpose of an 8 x 8 matrix of 16-bit elements held as mma fragments (lane l: row l / 4,
// columns 2 (l % 4) and + 1): the lane's pair of the transpose (movmatrix).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // only the sm_80+ tensor-core kernels use it
  return x;
#else
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
#endif
}

// Asks L2 for the line holding p: no register, no wait.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Four 8x8 matrices of 16-bit elements from shared memory, one row address per lane (lanes 8i .. 8i + 7:
// matrix i); r[i] of lane l holds row l / 4, columns 2 (l % 4) and + 1 of matrix i (TRANS: that
// element pair of its transpose).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the kernels using it run on sm_80 or newer only
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
#endif
}

// 16 bytes global -> shared without registers; `bytes` (0 or 16) of them read, the rest zero-filled.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Programmatic dependent launch (sm_90+; no-ops before): launch_dependents lets the stream's next
// kernel, if launched with programmatic stream serialization, start its blocks before this grid
// ends; wait_for_primary, in that kernel, waits until the grid before it has finished and its writes
// are visible (at once without such a launch).
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A kernel's dynamic shared memory, as bytes.
#define ENGRAM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]

}  // namespace ptx
}  // namespace engram
