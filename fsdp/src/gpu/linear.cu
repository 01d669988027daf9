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

// ---- LoRA dropout (fsdp/src/dropout.rs holds the reference and the seeds) ----
//
// Element `index = row * cols + col` of one adapter call's [rows, cols] input is kept iff
//   (mix64(seed ^ index * 0x9E3779B97F4A7C15) >> 32) >= threshold,   threshold = round(p * 2^32)
// with mix64 SplitMix64's finalizer, all 64-bit wrapping arithmetic: the same function as
// fsdp::dropout::keep, bit for bit. A kept element is x * scale (scale = 1 / (1 - p) as
// f32, one f32 product).
//
// The hash is ~20 integer operations per element (three 64-bit multiplies): about as
// long as moving the element's bytes on an H100, so the kernels avoid every other
// per-element integer cost (no division: blocks stride over rows, threads over columns).

__device__ __forceinline__ unsigned long long dropout_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long index,
                                             unsigned long long threshold) {
    return (dropout_mix64(seed ^ (index * 0x9E3779B97F4A7C15ull)) >> 32) >= threshold;
}

// mask[i] = keep(seed, first + i) as 0/1 bytes (the CPU/GPU agreement test).
extern "C" __global__ void dropout_mask(unsigned char* mask, unsigned long long first, long long n,
                                        unsigned long long seed, unsigned long long threshold) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        mask[i] = dropout_keep(seed, first + (unsigned long long)i, threshold) ? 1 : 0;
}

// xd = D ⊙ x * scale in the compute dtype: xd[r, c] = kept ? round(x[r, c] * scale) : 0.
// Bytes per element: 2 read + 2 written.
#define DROPOUT_INPUT(NAME, TO_F, FROM_F)                                                                         \
    extern "C" __global__ void NAME(const u16* x, long long ldx, u16* xd, long long ldxd, long long rows,          \
                                    long long cols, unsigned long long seed, unsigned long long threshold,         \
                                    float scale) {                                                                 \
        for (long long r = blockIdx.x; r < rows; r += gridDim.x) {                                                 \
            const u16* xr = x + r * ldx;                                                                           \
            u16* o = xd + r * ldxd;                                                                                \
            unsigned long long base = (unsigned long long)(r * cols);                                              \
            for (long long c = threadIdx.x; c < cols; c += blockDim.x)                                             \
                o[c] = dropout_keep(seed, base + (unsigned long long)c, threshold) ? FROM_F(TO_F(xr[c]) * scale)    \
                                                                                   : (u16)0;                       \
        }                                                                                                          \
    }

DROPOUT_INPUT(dropout_input_bf16, bf16_to_f, f_to_bf16)
DROPOUT_INPUT(dropout_input_f16, f16_to_f, f_to_f16)

// The adapters' input gradient of up to DROP_MAX_PARTS dropped parts, fused (no
// [rows, cols] temporary, one pass over dx for all of them):
//   dx[r, c] += sum_p (keep_p(r * cols + c) ? scale_p * sum_k g[r, goff_p + k] * A_p[k, c] : 0)
// g = g' [rows, ldg] (compute dtype, the scale s_p already in it), A_p [r_p, cols] (compute
// dtype). Arithmetic, in this order: acc_p = fmaf over k = 0.. (from 0); add += acc_p *
// scale_p (kept parts, in part order; separate multiply and add: --fmad=false); dx =
// dx + add, a 16-bit dx rounded once. A block takes DROP_ROWS rows at a time (their g rows
// staged in shared memory, DROP_ROWS * ldg floats), its threads stride over the columns;
// each A_p element read serves DROP_ROWS rows. Bytes per element: dx read + written
// (4 + 4 or 2 + 2), A_p from L1/L2.
#define DROP_ROWS 4
#define DROP_MAX_PARTS 4
struct DropParts {
    const u16* a[DROP_MAX_PARTS];
    unsigned long long seed[DROP_MAX_PARTS];
    unsigned long long threshold[DROP_MAX_PARTS];
    float scale[DROP_MAX_PARTS];
    int r[DROP_MAX_PARTS];
    int goff[DROP_MAX_PARTS];
    int n;
};

#define DROPOUT_LORA_DX(NAME, DXT, TO_F, DX_TO_F, DX_FROM_F)                                                      \
    extern "C" __global__ void NAME(DXT* dx, long long lddx, const u16* g, long long ldg, long long rows,          \
                                    long long cols, DropParts P) {                                                 \
        extern __shared__ float gs[];                                                                              \
        const int R = (int)ldg;                                                                                    \
        for (long long r0 = (long long)blockIdx.x * DROP_ROWS; r0 < rows; r0 += (long long)gridDim.x * DROP_ROWS) { \
            const int nr = rows - r0 < DROP_ROWS ? (int)(rows - r0) : DROP_ROWS;                                   \
            __syncthreads(); /* the previous rows' readers are done with gs */                                     \
            for (int i = threadIdx.x; i < DROP_ROWS * R; i += blockDim.x) {                                        \
                int j = i / R, k = i - j * R;                                                                      \
                gs[i] = j < nr ? TO_F(g[(r0 + j) * ldg + k]) : 0.f;                                                \
            }                                                                                                      \
            __syncthreads();                                                                                       \
            for (long long c = threadIdx.x; c < cols; c += blockDim.x) {                                           \
                float add[DROP_ROWS];                                                                              \
                _Pragma("unroll") for (int j = 0; j < DROP_ROWS; ++j) add[j] = 0.f;                                \
                for (int p = 0; p < P.n; ++p) {                                                                    \
                    float acc[DROP_ROWS];                                                                          \
                    _Pragma("unroll") for (int j = 0; j < DROP_ROWS; ++j) acc[j] = 0.f;                            \
                    const u16* a = P.a[p] + c;                                                                     \
                    const float* gp = gs + P.goff[p];                                                              \
                    for (int k = 0; k < P.r[p]; ++k) {                                                             \
                        float av = TO_F(a[(long long)k * cols]);                                                   \
                        _Pragma("unroll") for (int j = 0; j < DROP_ROWS; ++j) acc[j] = __fmaf_rn(gp[j * R + k], av, acc[j]); \
                    }                                                                                              \
                    _Pragma("unroll") for (int j = 0; j < DROP_ROWS; ++j) {                                        \
                        if (j < nr && dropout_keep(P.seed[p], (unsigned long long)((r0 + j) * cols + c), P.threshold[p])) \
                            add[j] = add[j] + acc[j] * P.scale[p];                                                 \
                    }                                                                                              \
                }                                                                                                  \
                for (int j = 0; j < nr; ++j) {                                                                     \
                    DXT* q = dx + (r0 + j) * lddx + c;                                                             \
                    *q = DX_FROM_F(DX_TO_F(*q) + add[j]);                                                          \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

__device__ __forceinline__ float f32_id(float x) { return x; }
DROPOUT_LORA_DX(dropout_lora_dx_f32_bf16, float, bf16_to_f, f32_id, f32_id)
DROPOUT_LORA_DX(dropout_lora_dx_f32_f16, float, f16_to_f, f32_id, f32_id)
DROPOUT_LORA_DX(dropout_lora_dx_bf16, u16, bf16_to_f, bf16_to_f, f_to_bf16)
DROPOUT_LORA_DX(dropout_lora_dx_f16, u16, f16_to_f, f16_to_f, f_to_f16)

// ---- The K-concatenated forward's weight tail (linear.rs, "Fused adapter") ----
//
// W' = [W | Bd] [O, in + R]: this writes one part's rows of Bd, `rows` = out_p rows of R
// columns starting at `dst` (= &W'[off_p, in]), row stride `ld` (= in + R): the columns
// g0 .. g0 + r of row i hold round(scale * B[i, :]) (B [rows, r] in the compute dtype, one
// f32 product rounded to nearest even), every other column 0 (`b` null: all zeros, a part
// without adapter). rows x R elements: a few hundred KB, memory-bound.
#define LORA_BD(NAME, TO_F, FROM_F)                                                                               \
    extern "C" __global__ void NAME(u16* dst, long long ld, long long rows, long long R, const u16* b, long long r, \
                                    long long g0, float scale) {                                                   \
        long long n = rows * R;                                                                                    \
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;                                 \
             i += (long long)gridDim.x * blockDim.x) {                                                             \
            long long row = i / R, j = i - row * R;                                                                \
            long long k = j - g0;                                                                                  \
            dst[row * ld + j] = (b && k >= 0 && k < r) ? FROM_F(scale * TO_F(b[row * r + k])) : (u16)0;            \
        }                                                                                                          \
    }

LORA_BD(lora_bd_bf16, bf16_to_f, f_to_bf16)
LORA_BD(lora_bd_f16, f16_to_f, f_to_f16)
