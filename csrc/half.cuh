// The 16-bit conversions csrc/rnn.cuh's device code needs, for the .cu files that include it (declared before
// it: torch's nvcc flags disable cuda_fp16's and cuda_bf16's implicit conversions).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "philox.cuh"  // FUSENN_HD

namespace fusenn {
FUSENN_HD float to_float(__half x) { return __half2float(x); }
FUSENN_HD __half from_float(float x, __half*) { return __float2half_rn(x); }
FUSENN_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
FUSENN_HD __nv_bfloat16 from_float(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }
}  // namespace fusenn
