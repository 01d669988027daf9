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

// ---- One pass over dy for the LoRA backward's g' and dB (linear.rs, "GEMMs") ----
//
// Per adapted part p (rank R, dy_p = dy's columns col_p .., xa_p = xa's columns rc_p ..):
//   g'_p [rows, R]   = s_p dy_p B_p          (compute dtype, rounded once)
//   dB_p [out_p, R] += s_p dy_p^T xa_p       (f32)
// Both read dy_p: here it is read once. Two launches, deterministic (no atomics, every
// sum in a fixed order):
//
// 1. lora_pass_*: one block per (part, column span of CS = 128 * NCT columns, row chunk
//    of `chunk_rows` rows). It walks its chunk in steps of 64 rows x 128 columns (dy
//    tiles staged through shared memory, 3 or 4 deep with cp.async), with the span's
//    B rows [CS, R] resident, and per step:
//      - g' partial of the 64 rows += dy_tile B_tile   (mma m16n8k16, A from ldmatrix,
//        B from ldmatrix.trans), in registers across the span's column tiles, then
//        written (f32) to gpart[span][row][R];
//      - dB partial of the tile's 128 columns += dy_tile^T xa_tile (A from
//        ldmatrix.trans of the same dy tile, B from ldmatrix.trans of xa), in registers
//        across the whole chunk, written (f32) to dbpart[chunk][col][R] at the end.
//    Out-of-range rows and columns are zero-filled (never read), so the poison a caller
//    keeps beyond its matrices cannot leak into a sum.
// 2. lora_pass_reduce_*: g' = round(s * sum over spans), dB += s * sum over chunks, in
//    ascending order (separate multiply and add).
//
// Bytes per part: dy_p once (2 rows out_p), xa_p once per span, B once per chunk, plus
// the partials written and read back: 4 R (rows * nspan + out_p * nchunk) each way. FLOPs
// 4 rows out_p R (tensor cores). sm_80+: mma.sync bf16/f16 + cp.async; older
// architectures (and the `Portable` switch) use lora_pass_scalar_*, same blocks and
// partials, plain f32 FMA loops (reads dy twice; a correctness fallback, not fast).
#define LP_BM 64
#define LP_BN 128
#define LP_LDS (LP_BN + 8)
#define LP_MAX_PARTS 4
#define LP_THREADS 256

struct LoraPassParts {
    const u16* dy[LP_MAX_PARTS];   // &dy[0, col_p], row stride lddy
    const u16* b[LP_MAX_PARTS];    // B_p [out_p, R]
    const u16* xa[LP_MAX_PARTS];   // &xa[0, rc_p], row stride ldxa
    float* gpart[LP_MAX_PARTS];    // [nspan_p][rows][R]
    float* dbpart[LP_MAX_PARTS];   // [nchunk][out_p][R]
    int out[LP_MAX_PARTS];
    int first_block[LP_MAX_PARTS + 1];
    int n;
};

typedef unsigned int u32;
struct LpBf16 {};
struct LpF16 {};

__device__ __forceinline__ int lp_part(const LoraPassParts& P, int blk) {
    int p = 0;
    while (p + 1 < P.n && blk >= P.first_block[p + 1]) ++p;
    return p;
}

#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ u32 lp_smem(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void lp_cp16(u16* dst, const u16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(lp_smem(dst)), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void lp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void lp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void lp_ldsm4(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lp_smem(p)));
}
__device__ __forceinline__ void lp_ldsm4t(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(lp_smem(p)));
}
__device__ __forceinline__ void lp_ldsm2t(u32& r0, u32& r1, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(lp_smem(p)));
}
template <class T> __device__ __forceinline__ void lp_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1);
template <> __device__ __forceinline__ void lp_mma<LpBf16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void lp_mma<LpF16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Column tiles per span: the dB accumulators of a span stay in registers (NCT * R/8 * 4
// floats per thread: 32 at R = 16, 32, 64).
template <int R> struct LpShape {
    static constexpr int NCT = R <= 16 ? 4 : (R <= 32 ? 2 : 1);
    static constexpr int CS = LP_BN * NCT;
    static constexpr int LDR = R + 8;  // shared row stride of B and xa (conflict-free ldmatrix for R >= 16)
    static constexpr int STAGE = LP_BM * LP_LDS + LP_BM * LDR;  // elements per pipeline stage
    // cp.async depth: 4 (3 tiles in flight) where two blocks still fit an SM's shared
    // memory (R <= 32: <= 110 KB a block), else 3.
    static constexpr int STAGES = R <= 32 ? 4 : 3;
};

// `aligned`: every dy/xa/B address and stride is a multiple of 16 bytes and every out_p a
// multiple of 8 (cp.async in 16-byte pieces); otherwise 2-byte loads through registers.
template <class T, int R>
__device__ __forceinline__ void lora_pass_mma(const LoraPassParts& P, long long lddy, long long ldxa, int rows, int chunk_rows,
                                              int nchunk, int aligned) {
#if __CUDA_ARCH__ >= 800
    typedef LpShape<R> S;
    constexpr int NCT = S::NCT, CS = S::CS, LDR = S::LDR, STAGE = S::STAGE, LP_STAGES = S::STAGES;
    constexpr int GN = R >= 16 ? R / 16 : 1;  // g' n8 tiles per warp
    extern __shared__ __align__(16) u16 lp_sm[];
    u16* bs = lp_sm;              // [CS][LDR]
    u16* stages = lp_sm + CS * LDR;

    const int p = lp_part(P, blockIdx.x);
    const int local = blockIdx.x - P.first_block[p];
    const int span = local / nchunk, chunk = local - span * nchunk;
    const int out = P.out[p];
    const int col0 = span * CS, ncols = min(CS, out - col0);
    const int row0 = chunk * chunk_rows, nrows = min(chunk_rows, rows - row0);
    const int nct = (ncols + LP_BN - 1) / LP_BN;  // column tiles of this span that exist
    const int nsub = (nrows + LP_BM - 1) / LP_BM;
    const int nsteps = nsub * nct;
    const u16* dy = P.dy[p];
    const u16* xa = P.xa[p];
    const u16* bsrc = P.b[p];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    // B rows of the span (zeros past the part's last column).
    if (aligned) {
        for (int i = tid; i < CS * (R / 8); i += LP_THREADS) {
            int j = i / (R / 8), c = (i - j * (R / 8)) * 8;
            bool v = j < ncols;
            lp_cp16(bs + j * LDR + c, v ? bsrc + (long long)(col0 + j) * R + c : bsrc, v);
        }
    } else {
        for (int i = tid; i < CS * R; i += LP_THREADS) {
            int j = i / R, c = i - j * R;
            bs[j * LDR + c] = j < ncols ? bsrc[(long long)(col0 + j) * R + c] : (u16)0;
        }
    }
    auto load = [&](int s) {
        const int rs = s / nct, ct = s - rs * nct;
        u16* d = stages + (s % LP_STAGES) * STAGE;
        u16* x = d + LP_BM * LP_LDS;
        const int r_lo = row0 + rs * LP_BM, c_lo = col0 + ct * LP_BN;
        const int nr = min(LP_BM, row0 + nrows - r_lo), nc = min(LP_BN, col0 + ncols - c_lo);
        if (aligned) {
            for (int i = tid; i < LP_BM * (LP_BN / 8); i += LP_THREADS) {
                int rr = i / (LP_BN / 8), cc = (i - rr * (LP_BN / 8)) * 8;
                bool v = rr < nr && cc < nc;
                lp_cp16(d + rr * LP_LDS + cc, v ? dy + (long long)(r_lo + rr) * lddy + c_lo + cc : dy, v);
            }
            for (int i = tid; i < LP_BM * (R / 8); i += LP_THREADS) {
                int rr = i / (R / 8), cc = (i - rr * (R / 8)) * 8;
                bool v = rr < nr;
                lp_cp16(x + rr * LDR + cc, v ? xa + (long long)(r_lo + rr) * ldxa + cc : xa, v);
            }
        } else {
            for (int i = tid; i < LP_BM * LP_BN; i += LP_THREADS) {
                int rr = i / LP_BN, cc = i - rr * LP_BN;
                d[rr * LP_LDS + cc] = (rr < nr && cc < nc) ? dy[(long long)(r_lo + rr) * lddy + c_lo + cc] : (u16)0;
            }
            for (int i = tid; i < LP_BM * R; i += LP_THREADS) {
                int rr = i / R, cc = i - rr * R;
                x[rr * LDR + cc] = rr < nr ? xa[(long long)(r_lo + rr) * ldxa + cc] : (u16)0;
            }
        }
    };
    // Prologue: B joins the first step's group.
#pragma unroll
    for (int s = 0; s < LP_STAGES - 1; ++s) {
        if (s < nsteps) load(s);
        lp_commit();
    }

    float gacc[GN][4];
    float dbacc[NCT][R / 8][4];
#pragma unroll
    for (int i = 0; i < GN; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) gacc[i][q] = 0.f;
#pragma unroll
    for (int c = 0; c < NCT; ++c)
#pragma unroll
        for (int j = 0; j < R / 8; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) dbacc[c][j][q] = 0.f;

    const int mt = warp & 3, nh = warp >> 2;  // g': rows mt*16.., n8 tiles nh, nh + 2, ...
    int s = 0;
    for (int rs = 0; rs < nsub; ++rs) {
#pragma unroll
        for (int ct = 0; ct < NCT; ++ct) {
            if (ct < nct) {
                lp_wait<LP_STAGES - 2>();
                __syncthreads();  // step s landed for everyone; step s-1's buffer is free
                if (s + LP_STAGES - 1 < nsteps) load(s + LP_STAGES - 1);
                lp_commit();
                const u16* d = stages + (s % LP_STAGES) * STAGE;
                const u16* x = d + LP_BM * LP_LDS;
                // g' rows mt*16.. += dy[rows, 128 cols] B[128 cols, R]
#pragma unroll
                for (int kk = 0; kk < LP_BN / 16; ++kk) {
                    u32 a[4];
                    lp_ldsm4(a, d + (mt * 16 + (lane & 15)) * LP_LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int i = 0; i < GN; ++i) {
                        const int jn = nh + 2 * i;
                        if (jn < R / 8) {
                            u32 b0, b1;
                            lp_ldsm2t(b0, b1, bs + (ct * LP_BN + kk * 16 + (lane & 15)) * LDR + jn * 8);
                            lp_mma<T>(gacc[i], a, b0, b1);
                        }
                    }
                }
                // dB columns warp*16.. += dy^T[16 cols, 64 rows] xa[64 rows, R]
#pragma unroll
                for (int kk = 0; kk < LP_BM / 16; ++kk) {
                    u32 a[4];
                    const int q = lane >> 3;
                    lp_ldsm4t(a, d + (kk * 16 + (lane & 7) + (q >> 1) * 8) * LP_LDS + warp * 16 + (q & 1) * 8);
#pragma unroll
                    for (int jn = 0; jn < R / 8; ++jn) {
                        u32 b0, b1;
                        lp_ldsm2t(b0, b1, x + (kk * 16 + (lane & 15)) * LDR + jn * 8);
                        lp_mma<T>(dbacc[ct][jn], a, b0, b1);
                    }
                }
                ++s;
            }
        }
        // The 64 rows' g' partial over this span.
        const int rbase = row0 + rs * LP_BM + mt * 16 + (lane >> 2);
#pragma unroll
        for (int i = 0; i < GN; ++i) {
            const int jn = nh + 2 * i;
            if (jn < R / 8) {
                const int n = jn * 8 + 2 * (lane & 3);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = rbase + h * 8;
                    if (row < row0 + nrows) {
                        float2 v = make_float2(gacc[i][2 * h], gacc[i][2 * h + 1]);
                        *(float2*)(P.gpart[p] + ((long long)span * rows + row) * R + n) = v;
                    }
                }
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) gacc[i][q] = 0.f;
        }
    }
    lp_wait<0>();
    // The chunk's dB partial of the span's columns.
#pragma unroll
    for (int ct = 0; ct < NCT; ++ct) {
        if (ct < nct) {
#pragma unroll
            for (int jn = 0; jn < R / 8; ++jn) {
                const int n = jn * 8 + 2 * (lane & 3);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int c = ct * LP_BN + warp * 16 + (lane >> 2) + h * 8;
                    if (c < ncols) {
                        float2 v = make_float2(dbacc[ct][jn][2 * h], dbacc[ct][jn][2 * h + 1]);
                        *(float2*)(P.dbpart[p] + ((long long)chunk * out + col0 + c) * R + n) = v;
                    }
                }
            }
        }
    }
#else
    __trap();  // the host launches lora_pass_scalar_* below sm_80
#endif
}

#define LORA_PASS_MMA(NAME, T, R)                                                                                 \
    extern "C" __global__ void __launch_bounds__(LP_THREADS, 2)                                                    \
        NAME(LoraPassParts P, long long lddy, long long ldxa, int rows, int chunk_rows, int nchunk, int aligned) { \
        lora_pass_mma<T, R>(P, lddy, ldxa, rows, chunk_rows, nchunk, aligned);                                     \
    }
LORA_PASS_MMA(lora_pass_bf16_r8, LpBf16, 8)
LORA_PASS_MMA(lora_pass_bf16_r16, LpBf16, 16)
LORA_PASS_MMA(lora_pass_bf16_r32, LpBf16, 32)
LORA_PASS_MMA(lora_pass_bf16_r64, LpBf16, 64)
LORA_PASS_MMA(lora_pass_f16_r8, LpF16, 8)
LORA_PASS_MMA(lora_pass_f16_r16, LpF16, 16)
LORA_PASS_MMA(lora_pass_f16_r32, LpF16, 32)
LORA_PASS_MMA(lora_pass_f16_r64, LpF16, 64)

// The portable pass: the same blocks and partials as lora_pass_mma (span width `cs`, rank
// `r` at run time), plain f32 FMA loops over global memory, k ascending.
#define LORA_PASS_SCALAR(NAME, TO_F)                                                                              \
    extern "C" __global__ void NAME(LoraPassParts P, long long lddy, long long ldxa, int rows, int chunk_rows,    \
                                    int nchunk, int r, int cs) {                                                   \
        const int p = lp_part(P, blockIdx.x);                                                                      \
        const int local = blockIdx.x - P.first_block[p];                                                           \
        const int span = local / nchunk, chunk = local - span * nchunk;                                            \
        const int out = P.out[p];                                                                                  \
        const int col0 = span * cs, ncols = min(cs, out - col0);                                                   \
        const int row0 = chunk * chunk_rows, nrows = min(chunk_rows, rows - row0);                                 \
        const u16* dy = P.dy[p] + col0;                                                                            \
        const u16* b = P.b[p] + (long long)col0 * r;                                                               \
        for (int i = threadIdx.x; i < nrows * r; i += blockDim.x) {                                                \
            const int t = i / r, k = i - t * r;                                                                    \
            const u16* d = dy + (long long)(row0 + t) * lddy;                                                      \
            float acc = 0.f;                                                                                       \
            for (int j = 0; j < ncols; ++j) acc = __fmaf_rn(TO_F(d[j]), TO_F(b[(long long)j * r + k]), acc);       \
            P.gpart[p][((long long)span * rows + row0 + t) * r + k] = acc;                                         \
        }                                                                                                          \
        for (int i = threadIdx.x; i < ncols * r; i += blockDim.x) {                                                \
            const int j = i / r, k = i - j * r;                                                                    \
            float acc = 0.f;                                                                                       \
            for (int t = row0; t < row0 + nrows; ++t)                                                              \
                acc = __fmaf_rn(TO_F(dy[(long long)t * lddy + j]), TO_F(P.xa[p][(long long)t * ldxa + k]), acc);   \
            P.dbpart[p][((long long)chunk * out + col0 + j) * r + k] = acc;                                        \
        }                                                                                                          \
    }
LORA_PASS_SCALAR(lora_pass_scalar_bf16, bf16_to_f)
LORA_PASS_SCALAR(lora_pass_scalar_f16, f16_to_f)

// The fixed-order reduce of both partials, all parts of the group in one launch:
//   blocks [0, gblocks):  one thread per g' element (index i < gfirst[n]):
//                         g'[t, goff_p + k] = round(scale_p * sum_{span} gpart_p[span][t][k])
//   blocks [gblocks, ..): 32 dB elements (flat index over the parts) per block, its 8 warps
//                         summing chunks w, w + 8, w + 16, ... each, then warp 0 adding the
//                         8 sums in warp order: dB_p[j, k] = dB_p[j, k] + scale_p * total
// Sums from 0 in that fixed order (multiply and add separate): deterministic. The dB side
// has few elements (out_p * R) and many chunks: spreading the chunks over 8 warps keeps
// 8x more loads in flight than a loop per element.
#define LPR_GROUPS 8
struct LoraReduceParts {
    const float* gpart[LP_MAX_PARTS];
    const float* dbpart[LP_MAX_PARTS];
    float* db[LP_MAX_PARTS];
    long long gfirst[LP_MAX_PARTS + 1];  // prefix of rows * r_p
    long long dfirst[LP_MAX_PARTS + 1];  // prefix of out_p * r_p
    int r[LP_MAX_PARTS];
    int goff[LP_MAX_PARTS];
    int nspan[LP_MAX_PARTS];
    float scale[LP_MAX_PARTS];
    int n;
};

#define LORA_PASS_REDUCE(NAME, FROM_F)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(LoraReduceParts P, u16* g, long long ldg, long long rows, \
                                                          int nchunk, long long gblocks) {                         \
        __shared__ float sums[LPR_GROUPS][32];                                                                     \
        if (blockIdx.x < gblocks) {                                                                                \
            const long long i = blockIdx.x * 256ll + threadIdx.x;                                                  \
            if (i >= P.gfirst[P.n]) return;                                                                        \
            int p = 0;                                                                                             \
            while (p + 1 < P.n && i >= P.gfirst[p + 1]) ++p;                                                       \
            const long long local = i - P.gfirst[p];                                                               \
            const int r = P.r[p];                                                                                  \
            const long long t = local / r, k = local - t * r;                                                      \
            const float* src = P.gpart[p] + local;                                                                 \
            const long long stride = rows * r;                                                                     \
            float acc = 0.f;                                                                                       \
            _Pragma("unroll 16") for (int s = 0; s < P.nspan[p]; ++s) acc = acc + src[s * stride];                 \
            g[t * ldg + P.goff[p] + k] = FROM_F(P.scale[p] * acc);                                                 \
            return;                                                                                                \
        }                                                                                                          \
        const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;                                                 \
        const long long j = (blockIdx.x - gblocks) * 32 + lane;                                                    \
        const bool valid = j < P.dfirst[P.n];                                                                      \
        int p = 0;                                                                                                 \
        while (p + 1 < P.n && j >= P.dfirst[p + 1]) ++p;                                                           \
        const long long local = j - P.dfirst[p];                                                                   \
        float acc = 0.f;                                                                                           \
        if (valid) {                                                                                               \
            const long long stride = P.dfirst[p + 1] - P.dfirst[p];                                                \
            const float* src = P.dbpart[p] + local;                                                                \
            _Pragma("unroll 4") for (int c = grp; c < nchunk; c += LPR_GROUPS) acc = acc + src[c * stride];        \
        }                                                                                                          \
        sums[grp][lane] = acc;                                                                                     \
        __syncthreads();                                                                                           \
        if (grp == 0 && valid) {                                                                                   \
            float tot = sums[0][lane];                                                                             \
            _Pragma("unroll") for (int q = 1; q < LPR_GROUPS; ++q) tot = tot + sums[q][lane];                      \
            float* d = P.db[p] + local;                                                                            \
            *d = *d + P.scale[p] * tot;                                                                            \
        }                                                                                                          \
    }
LORA_PASS_REDUCE(lora_pass_reduce_bf16, f_to_bf16)
LORA_PASS_REDUCE(lora_pass_reduce_f16, f_to_f16)
