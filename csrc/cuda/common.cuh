// What the CUDA op families share: the headers every kernel file needs, the float dispatch and
// the warp constants.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// Only the three dtypes the Python checks admit; fewer instantiations than AT_DISPATCH_FLOATING_TYPES_AND2.
#define ENGRAM_DISPATCH_FLOATS(TYPE, NAME, ...)                           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                          \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace engram {
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
}  // namespace engram
