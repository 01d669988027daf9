// The bias of the NF4 + LoRA linear (fsdp/src/gpu/linear.rs), written into the output
// *before* the base GEMM, which then accumulates onto it (beta = 1): the sum
// x W^T + b is rounded once, in the GEMM's epilogue.
//
// Each kernel covers one part's column block of y: rows x cols elements starting at y,
// row stride ldy (elements). `bias` may be null: the block gets zeros (a part without
// bias in a group where another part has one). 16-bit values are raw unsigned shorts.
//
// Bytes: 16-bit y: 2 written per element; f32 y: 4 written (+4 read when accumulating).
// No FLOPs to speak of. Memory-bound; a grid-stride loop over the block.

typedef unsigned short u16;

__device__ __forceinline__ float bf16_to_f(u16 h) { return __uint_as_float(((unsigned)h) << 16); }
__device__ __forceinline__ float f16_to_f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// 16-bit y (the compute dtype, which is also the bias's): y = bias, bit for bit.
extern "C" __global__ void bias_fill_16(u16* y, long long ldy, const u16* bias, long long rows, long long cols) {
    long long n = rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols, j = i - r * cols;
        y[r * ldy + j] = bias ? bias[j] : (u16)0;
    }
}

// f32 y: y = (accumulate ? y : 0) + bias (bias widened exactly; y's old value is not read
// when not accumulating, so NaN there does not propagate).
#define BIAS_ADD_F32(NAME, TO_F)                                                                                  \
    extern "C" __global__ void NAME(float* y, long long ldy, const u16* bias, long long rows, long long cols,       \
                                    int accumulate) {                                                              \
        long long n = rows * cols;                                                                                 \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                                 \
             i += (long long)gridDim.x * blockDim.x) {                                                             \
            long long r = i / cols, j = i - r * cols;                                                              \
            float b = bias ? TO_F(bias[j]) : 0.f;                                                                  \
            float* p = y + r * ldy + j;                                                                            \
            *p = accumulate ? *p + b : b;                                                                          \
        }                                                                                                          \
    }

BIAS_ADD_F32(bias_add_f32_bf16, bf16_to_f)
BIAS_ADD_F32(bias_add_f32_f16, f16_to_f)

// 16-bit y, accumulating (the model's residual stream): y = round(y + bias), then the base
// GEMM adds x W^T onto it (two roundings, as `residual + (x W^T + b)` in bf16 has).
__device__ __forceinline__ u16 f_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                    // round to nearest even
}
__device__ __forceinline__ u16 f_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#define BIAS_ADD_16(NAME, TO_F, FROM_F)                                                                           \
    extern "C" __global__ void NAME(u16* y, long long ldy, const u16* bias, long long rows, long long cols) {       \
        if (!bias) return;                                                                                         \
        long long n = rows * cols;                                                                                 \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                                 \
             i += (long long)gridDim.x * blockDim.x) {                                                             \
            long long r = i / cols, j = i - r * cols;                                                              \
            u16* p = y + r * ldy + j;                                                                              \
            *p = FROM_F(TO_F(*p) + TO_F(bias[j]));                                                                 \
        }                                                                                                          \
    }

BIAS_ADD_16(bias_add_16_bf16, bf16_to_f, f_to_bf16)
BIAS_ADD_16(bias_add_16_f16, f16_to_f, f_to_f16)
