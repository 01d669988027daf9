// fsdp/src/gpu/kernels.cu: the element-wise and row kernels of the fsdp GPU runtime.
// Launchers, argument checks and the byte counts / floors are in kernels.rs; the CPU
// references are fsdp::ops::{embedding, rmsnorm, rope, swiglu} and fsdp::optim.
//
// Conventions:
// - Dtype codes as memlinear::Dtype: 0 = f32, 1 = f16, 2 = bf16. 16-bit values are raw
//   `unsigned short` (no cuda_fp16.h), converted with our own round-to-nearest-even.
// - Arithmetic is f32 and written as the CPU reference writes it, operation for operation:
//   the source is compiled with --fmad=false (cudakit), and the kernels that promise
//   bit-exactness (RoPE, AdamW, clip factor) also spell their roundings with __f*_rn /
//   __d*_rn intrinsics, so no flag can fuse them.
// - Element-wise 2-D kernels work on "items": 8 consecutive elements of one row (one
//   16-byte load of 16-bit values, two of f32). Item i of a [rows, cols] operand is row
//   i / ceil(cols / 8), columns 8 * (i % ceil(cols / 8)) + 0..8. Each kernel exists as a
//   _v build (every operand's base and row stride 16-byte aligned: vector loads; the
//   last, partial item of a row takes the scalar path) and an _s build (scalar loads,
//   any alignment). The host picks.
// - Row kernels (RMSNorm) run one block per row; each thread keeps up to KMAX items of
//   its row in registers between the reduction pass and the output pass, as loaded (raw
//   16-byte words: 4 registers per bf16 item instead of 8 floats, for occupancy), so x
//   (and dy) are read from memory once for rows of up to KMAX * 8 * blockDim elements
//   (8192 at 256 threads); longer rows re-read the rest (from L1/L2). The weight row is
//   re-read in the output pass (L1/L2: every row reads the same one).
//
// History (H100 80GB HBM3, bench_kernels, 8192 x 2048, % of the 3000 GB/s floor):
// v1 RMSNorm cached f32 values: forward x bf16 73%, backward dy f32 88%, dy bf16 79%.
// v2 caches the raw 16-byte words (half the registers for bf16): 76%, 95%, 89%.
// The element-wise kernels (one 8-element item per thread) reach 99-100% of the floor on
// 8192 x 8192 (SwiGLU, cast f32 -> bf16) and 79-89% on the ~20-40 us shapes.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define THREADS 256
#define KMAX 4

// ---------------------------------------------------------------- conversions
__device__ __forceinline__ float bf16_to_f(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even; a NaN stays a (quiet) NaN with its sign and top payload bits,
// as the `half` crate's bf16::from_f32 does.
__device__ __forceinline__ u16 f_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 f_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

template <int D> __device__ __forceinline__ float h_to_f(u16 h) { return D == 1 ? f16_to_f(h) : bf16_to_f(h); }
template <int D> __device__ __forceinline__ u16 f_to_h(float f) { return D == 1 ? f_to_f16(f) : f_to_bf16(f); }

// Element i of a D-typed array, as f32.
template <int D> __device__ __forceinline__ float ld1(const void* p, u64 i) {
    if (D == 0) return ((const float*)p)[i];
    return h_to_f<D>(((const u16*)p)[i]);
}

template <int D> __device__ __forceinline__ void st1(void* p, u64 i, float v) {
    if (D == 0) ((float*)p)[i] = v;
    else ((u16*)p)[i] = f_to_h<D>(v);
}

// An item as loaded: 8 elements of D in their raw bits (two 16-byte words for f32, one
// for 16-bit types: a row kernel keeping items in registers holds half as many for bf16).
template <int D> struct Raw {
    uint4 w[D == 0 ? 2 : 1];
};

// Elements i..i+8 (16-byte aligned address), raw.
template <int D> __device__ __forceinline__ void ld_raw(const void* p, u64 i, Raw<D>& r) {
    const uint4* q = (const uint4*)((const char*)p + i * (D == 0 ? 4 : 2));
#pragma unroll
    for (int k = 0; k < (D == 0 ? 2 : 1); k++) r.w[k] = q[k];
}

template <int D> __device__ __forceinline__ void unpack(const Raw<D>& r, float* v) {
#pragma unroll
    for (int k = 0; k < (D == 0 ? 2 : 1); k++) {
        const u32 ws[4] = {r.w[k].x, r.w[k].y, r.w[k].z, r.w[k].w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (D == 0) {
                v[4 * k + j] = __uint_as_float(ws[j]);
            } else {
                v[2 * j] = h_to_f<D>((u16)(ws[j] & 0xffffu));
                v[2 * j + 1] = h_to_f<D>((u16)(ws[j] >> 16));
            }
        }
    }
}

// Elements i..i+8 (16-byte aligned address), as f32.
template <int D> __device__ __forceinline__ void ld8(const void* p, u64 i, float* v) {
    Raw<D> r;
    ld_raw<D>(p, i, r);
    unpack<D>(r, v);
}

template <int D> __device__ __forceinline__ void st8(void* p, u64 i, const float* v) {
    if (D == 0) {
        float4* q = (float4*)((float*)p + i);
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 ws[4];
#pragma unroll
        for (int k = 0; k < 4; k++) ws[k] = (u32)f_to_h<D>(v[2 * k]) | ((u32)f_to_h<D>(v[2 * k + 1]) << 16);
        *(uint4*)((u16*)p + i) = make_uint4(ws[0], ws[1], ws[2], ws[3]);
    }
}

// ---------------------------------------------------------------- indexing, reductions
// This thread's item: row and index within the row, for `total` items of `per_row` each.
// 32-bit division when everything fits (the common case), 64-bit otherwise.
__device__ __forceinline__ bool item_of(u64 total, u32 per_row, u64& row, u32& k) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return false;
    if (total <= 0xffffffffull) {
        u32 j = (u32)i, r = j / per_row;
        row = r;
        k = j - r * per_row;
    } else {
        row = i / per_row;
        k = (u32)(i - row * per_row);
    }
    return true;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
// Fixed order: deterministic.
__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < (blockDim.x >> 5) ? sh[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---------------------------------------------------------------- embedding
// out[t, :] = table[ids[t], :] (f32, dense [tokens, hidden]); ids >= vocab give a row of
// zeros (the table is never read out of bounds).
template <int D, bool VEC>
__device__ __forceinline__ void embedding_fwd(const void* table, u64 vocab, u32 hidden, const u32* ids, u64 tokens,
                                              float* out) {
    const u32 cpr = (hidden + 7) / 8;
    u64 t;
    u32 k;
    if (!item_of(tokens * cpr, cpr, t, k)) return;
    const u32 c0 = 8 * k, n = min(8u, hidden - c0);
    const u64 id = ids[t];
    const u64 o = t * hidden + c0;
    if (id >= vocab) {
        for (u32 j = 0; j < n; j++) out[o + j] = 0.f;
        return;
    }
    const u64 s = id * hidden + c0;
    if (VEC && n == 8) {
        float v[8];
        ld8<D>(table, s, v);
        st8<0>(out, o, v);
    } else {
        for (u32 j = 0; j < n; j++) out[o + j] = ld1<D>(table, s + j);
    }
}

#define EMBEDDING(NAME, D, VEC)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        NAME(const void* table, u64 vocab, u32 hidden, const u32* ids, u64 tokens, float* out) {                    \
        embedding_fwd<D, VEC>(table, vocab, hidden, ids, tokens, out);                                              \
    }
EMBEDDING(embedding_f32_v, 0, true)
EMBEDDING(embedding_f32_s, 0, false)
EMBEDDING(embedding_f16_v, 1, true)
EMBEDDING(embedding_f16_s, 1, false)
EMBEDDING(embedding_bf16_v, 2, true)
EMBEDDING(embedding_bf16_s, 2, false)

// ---------------------------------------------------------------- RMSNorm
// Forward: rstd = 1 / sqrt(sum(x^2) / hidden + eps); y = w * (x * rstd) (the CPU's order).
// xcopy (dtype XD, may be null): x itself written out (the residual stream's next buffer,
// without a separate copy's read of x).
template <int XD, int D, bool VEC>
__device__ __forceinline__ void rms_fwd(const void* x, u64 ldx, const void* w, u32 hidden, float eps, void* y, u64 ldy,
                                        float* rstd, void* xcopy, u64 ldc) {
    __shared__ float sh[32];
    const u64 row = blockIdx.x;
    const u32 tid = threadIdx.x, nt = blockDim.x;
    const u32 nch = VEC ? hidden / 8 : 0;  // vector items; elements nch*8.. take the scalar path
    const u64 xo = row * ldx, yo = row * ldy, co = row * ldc;
    Raw<XD> xc[KMAX];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < KMAX; k++) {
        const u32 c = k * nt + tid;
        if (c < nch) {
            float v[8];
            ld_raw<XD>(x, xo + 8ull * c, xc[k]);
            unpack<XD>(xc[k], v);
#pragma unroll
            for (int j = 0; j < 8; j++) ss += v[j] * v[j];
        }
    }
    for (u32 c = KMAX * nt + tid; c < nch; c += nt) {
        float v[8];
        ld8<XD>(x, xo + 8ull * c, v);
#pragma unroll
        for (int j = 0; j < 8; j++) ss += v[j] * v[j];
    }
    for (u32 e = nch * 8 + tid; e < hidden; e += nt) {
        const float v = ld1<XD>(x, xo + e);
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    const float r = __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)hidden), eps)));
    if (tid == 0) rstd[row] = r;
#pragma unroll
    for (int k = 0; k < KMAX; k++) {
        const u32 c = k * nt + tid;
        if (c < nch) {
            float v[8], wv[8], o[8];
            unpack<XD>(xc[k], v);
            ld8<D>(w, 8ull * c, wv);
#pragma unroll
            for (int j = 0; j < 8; j++) o[j] = __fmul_rn(wv[j], __fmul_rn(v[j], r));
            st8<D>(y, yo + 8ull * c, o);
            if (xcopy) st8<XD>(xcopy, co + 8ull * c, v);
        }
    }
    for (u32 c = KMAX * nt + tid; c < nch; c += nt) {
        float v[8], wv[8], o[8];
        ld8<XD>(x, xo + 8ull * c, v);
        ld8<D>(w, 8ull * c, wv);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = __fmul_rn(wv[j], __fmul_rn(v[j], r));
        st8<D>(y, yo + 8ull * c, o);
        if (xcopy) st8<XD>(xcopy, co + 8ull * c, v);
    }
    for (u32 e = nch * 8 + tid; e < hidden; e += nt) {
        const float v = ld1<XD>(x, xo + e);
        st1<D>(y, yo + e, __fmul_rn(ld1<D>(w, e), __fmul_rn(v, r)));
        if (xcopy) st1<XD>(xcopy, co + e, v);
    }
}

// Backward (no weight gradient): g = dy * w, xhat = x * rstd,
// dx (+)= rstd * (g - xhat * mean(g * xhat)), with mean(g * xhat) = rstd * sum(g * x) / hidden.
// dx16 (dtype D, may be null): the final f32 dx rounded once, written beside it (the next
// GEMM's 16-bit input, without a separate cast pass). It must not alias dy or x.
template <int YD, int XD, int D, bool VEC>
__device__ __forceinline__ void rms_bwd(const void* dy, u64 lddy, const void* x, u64 ldx, const void* w,
                                        const float* rstd, u32 hidden, float* dx, u64 lddx, int acc,
                                        void* dx16, u64 lddx16) {
    __shared__ float sh[32];
    const u64 row = blockIdx.x;
    const u32 tid = threadIdx.x, nt = blockDim.x;
    const u32 nch = VEC ? hidden / 8 : 0;
    const u64 yo = row * lddy, xo = row * ldx, oo = row * lddx, ho = row * lddx16;
    const float r = rstd[row];
    Raw<YD> yc[KMAX];
    Raw<XD> xc[KMAX];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < KMAX; k++) {
        const u32 c = k * nt + tid;
        if (c < nch) {
            float g[8], xv[8], wv[8];
            ld_raw<YD>(dy, yo + 8ull * c, yc[k]);
            ld_raw<XD>(x, xo + 8ull * c, xc[k]);
            ld8<D>(w, 8ull * c, wv);
            unpack<YD>(yc[k], g);
            unpack<XD>(xc[k], xv);
#pragma unroll
            for (int j = 0; j < 8; j++) s += (g[j] * wv[j]) * xv[j];
        }
    }
    for (u32 c = KMAX * nt + tid; c < nch; c += nt) {
        float g[8], xv[8], wv[8];
        ld8<YD>(dy, yo + 8ull * c, g);
        ld8<XD>(x, xo + 8ull * c, xv);
        ld8<D>(w, 8ull * c, wv);
#pragma unroll
        for (int j = 0; j < 8; j++) s += (g[j] * wv[j]) * xv[j];
    }
    for (u32 e = nch * 8 + tid; e < hidden; e += nt) {
        s += (ld1<YD>(dy, yo + e) * ld1<D>(w, e)) * ld1<XD>(x, xo + e);
    }
    s = block_sum(s, sh);
    const float mean = __fdiv_rn(__fmul_rn(s, r), (float)hidden);
#define RMS_BWD_OUT(G, X) __fmul_rn(r, __fsub_rn((G), __fmul_rn(__fmul_rn((X), r), mean)))
#pragma unroll
    for (int k = 0; k < KMAX; k++) {
        const u32 c = k * nt + tid;
        if (c < nch) {
            float g[8], xv[8], wv[8], o[8];
            unpack<YD>(yc[k], g);
            unpack<XD>(xc[k], xv);
            ld8<D>(w, 8ull * c, wv);
#pragma unroll
            for (int j = 0; j < 8; j++) o[j] = RMS_BWD_OUT(g[j] * wv[j], xv[j]);
            if (acc) {
                float old[8];
                ld8<0>(dx, oo + 8ull * c, old);
#pragma unroll
                for (int j = 0; j < 8; j++) o[j] = old[j] + o[j];
            }
            st8<0>(dx, oo + 8ull * c, o);
            if (dx16) st8<D>(dx16, ho + 8ull * c, o);
        }
    }
    for (u32 c = KMAX * nt + tid; c < nch; c += nt) {
        float g[8], xv[8], wv[8], o[8];
        ld8<YD>(dy, yo + 8ull * c, g);
        ld8<XD>(x, xo + 8ull * c, xv);
        ld8<D>(w, 8ull * c, wv);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = RMS_BWD_OUT(g[j] * wv[j], xv[j]);
        if (acc) {
            float old[8];
            ld8<0>(dx, oo + 8ull * c, old);
#pragma unroll
            for (int j = 0; j < 8; j++) o[j] = old[j] + o[j];
        }
        st8<0>(dx, oo + 8ull * c, o);
        if (dx16) st8<D>(dx16, ho + 8ull * c, o);
    }
    for (u32 e = nch * 8 + tid; e < hidden; e += nt) {
        float o = RMS_BWD_OUT(ld1<YD>(dy, yo + e) * ld1<D>(w, e), ld1<XD>(x, xo + e));
        if (acc) o = dx[oo + e] + o;
        dx[oo + e] = o;
        if (dx16) st1<D>(dx16, ho + e, o);
    }
#undef RMS_BWD_OUT
}

#define RMS_FWD(NAME, XD, D, VEC)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const void* x, u64 ldx, const void* w, u32 hidden,    \
                                                               float eps, void* y, u64 ldy, float* rstd,            \
                                                               void* xcopy, u64 ldc) {                              \
        rms_fwd<XD, D, VEC>(x, ldx, w, hidden, eps, y, ldy, rstd, xcopy, ldc);                                      \
    }
#define RMS_FWD2(XN, XD, DN, D) RMS_FWD(rms_fwd_##XN##_##DN##_v, XD, D, true) RMS_FWD(rms_fwd_##XN##_##DN##_s, XD, D, false)
RMS_FWD2(f32, 0, bf16, 2)
RMS_FWD2(bf16, 2, bf16, 2)
RMS_FWD2(f32, 0, f16, 1)
RMS_FWD2(f16, 1, f16, 1)

#define RMS_BWD(NAME, YD, XD, D, VEC)                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        NAME(const void* dy, u64 lddy, const void* x, u64 ldx, const void* w, const float* rstd, u32 hidden,        \
             float* dx, u64 lddx, int acc, void* dx16, u64 lddx16) {                                                \
        rms_bwd<YD, XD, D, VEC>(dy, lddy, x, ldx, w, rstd, hidden, dx, lddx, acc, dx16, lddx16);                    \
    }
#define RMS_BWD2(YN, YD, XN, XD, DN, D)                                                                              \
    RMS_BWD(rms_bwd_##YN##_##XN##_##DN##_v, YD, XD, D, true) RMS_BWD(rms_bwd_##YN##_##XN##_##DN##_s, YD, XD, D, false)
RMS_BWD2(f32, 0, f32, 0, bf16, 2)
RMS_BWD2(f32, 0, bf16, 2, bf16, 2)
RMS_BWD2(bf16, 2, f32, 0, bf16, 2)
RMS_BWD2(bf16, 2, bf16, 2, bf16, 2)
RMS_BWD2(f32, 0, f32, 0, f16, 1)
RMS_BWD2(f32, 0, f16, 1, f16, 1)
RMS_BWD2(f16, 1, f32, 0, f16, 1)
RMS_BWD2(f16, 1, f16, 1, f16, 1)

// ---------------------------------------------------------------- RoPE
// In place. Pair i < hd2 = head_dim / 2 of head h of row t: (a, b) = (x[i], x[i + hd2]);
// a' = a cos - b s, b' = b cos + a s with s = sign * sin (sign -1: the inverse rotation).
// Items are groups of up to 8 pairs of one head.
template <int D, bool VEC>
__device__ __forceinline__ void rope(void* x, u64 ld, u64 rows, u32 heads, u32 hd2, const float* cs, const float* sn,
                                     float sign) {
    const u32 gph = (hd2 + 7) / 8, ipr = heads * gph;
    u64 t;
    u32 k;
    if (!item_of(rows * ipr, ipr, t, k)) return;
    const u32 h = k / gph, p0 = 8 * (k - h * gph), n = min(8u, hd2 - p0);
    const u64 xa = t * ld + (u64)h * (2 * hd2) + p0, xb = xa + hd2, co = t * hd2 + p0;
    if (VEC && n == 8) {
        float a[8], b[8], c[8], s[8], oa[8], ob[8];
        ld8<D>(x, xa, a);
        ld8<D>(x, xb, b);
        ld8<0>(cs, co, c);
        ld8<0>(sn, co, s);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float si = __fmul_rn(sign, s[j]);
            oa[j] = __fsub_rn(__fmul_rn(a[j], c[j]), __fmul_rn(b[j], si));
            ob[j] = __fadd_rn(__fmul_rn(b[j], c[j]), __fmul_rn(a[j], si));
        }
        st8<D>(x, xa, oa);
        st8<D>(x, xb, ob);
    } else {
        for (u32 j = 0; j < n; j++) {
            const float a = ld1<D>(x, xa + j), b = ld1<D>(x, xb + j), c = cs[co + j];
            const float si = __fmul_rn(sign, sn[co + j]);
            st1<D>(x, xa + j, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, si)));
            st1<D>(x, xb + j, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, si)));
        }
    }
}

#define ROPE(NAME, D, VEC)                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(void* x, u64 ld, u64 rows, u32 heads, u32 hd2,       \
                                                               const float* cs, const float* sn, float sign) {      \
        rope<D, VEC>(x, ld, rows, heads, hd2, cs, sn, sign);                                                       \
    }
ROPE(rope_f16_v, 1, true)
ROPE(rope_f16_s, 1, false)
ROPE(rope_bf16_v, 2, true)
ROPE(rope_bf16_s, 2, false)

// ---------------------------------------------------------------- SwiGLU
// The CPU's expressions: s = 1 / (1 + exp(-g)); out = (g * s) * u;
// dgate = ((d * u) * s) * (1 + g * (1 - s)); dup = (d * g) * s.
__device__ __forceinline__ float sigmoid_f(float g) { return __fdiv_rn(1.f, __fadd_rn(1.f, expf(-g))); }

template <int D, bool VEC>
__device__ __forceinline__ void swiglu_fwd(const void* gate, u64 ldg, const void* up, u64 ldu, void* out, u64 ldo,
                                           u64 rows, u32 cols) {
    const u32 cpr = (cols + 7) / 8;
    u64 r;
    u32 k;
    if (!item_of(rows * cpr, cpr, r, k)) return;
    const u32 c0 = 8 * k, n = min(8u, cols - c0);
    const u64 go = r * ldg + c0, uo = r * ldu + c0, oo = r * ldo + c0;
    if (VEC && n == 8) {
        float g[8], u[8], o[8];
        ld8<D>(gate, go, g);
        ld8<D>(up, uo, u);
#pragma unroll
        for (int j = 0; j < 8; j++) o[j] = __fmul_rn(__fmul_rn(g[j], sigmoid_f(g[j])), u[j]);
        st8<D>(out, oo, o);
    } else {
        for (u32 j = 0; j < n; j++) {
            const float g = ld1<D>(gate, go + j);
            st1<D>(out, oo + j, __fmul_rn(__fmul_rn(g, sigmoid_f(g)), ld1<D>(up, uo + j)));
        }
    }
}

// dgate may be gate and dup may be up (same stride): every input of an element is read
// before its outputs are written, by the same thread. `act` (when not null) receives the
// forward's product silu(gate) * up, rounded as swiglu_fwd rounds it (same operations).
template <int D, bool VEC>
__device__ __forceinline__ void swiglu_bwd(const void* dout, u64 lddo, const void* gate, u64 ldg, const void* up,
                                           u64 ldu, void* dgate, u64 lddg, void* dup, u64 lddu, void* act, u64 ldact,
                                           u64 rows, u32 cols) {
    const u32 cpr = (cols + 7) / 8;
    u64 r;
    u32 k;
    if (!item_of(rows * cpr, cpr, r, k)) return;
    const u32 c0 = 8 * k, n = min(8u, cols - c0);
    const u64 dO = r * lddo + c0, go = r * ldg + c0, uo = r * ldu + c0, dgo = r * lddg + c0, duo = r * lddu + c0;
    const u64 ao = r * ldact + c0;
#define SWIGLU_BWD(D_, G_, U_, DG, DU)                                                                              \
    {                                                                                                                \
        const float s_ = sigmoid_f(G_);                                                                              \
        DG = __fmul_rn(__fmul_rn(__fmul_rn(D_, U_), s_), __fadd_rn(1.f, __fmul_rn(G_, __fsub_rn(1.f, s_))));        \
        DU = __fmul_rn(__fmul_rn(D_, G_), s_);                                                                       \
    }
    if (VEC && n == 8) {
        float d[8], g[8], u[8], dg[8], du[8];
        ld8<D>(dout, dO, d);
        ld8<D>(gate, go, g);
        ld8<D>(up, uo, u);
        if (act) {
            float a[8];
#pragma unroll
            for (int j = 0; j < 8; j++) a[j] = __fmul_rn(__fmul_rn(g[j], sigmoid_f(g[j])), u[j]);
            st8<D>(act, ao, a);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) SWIGLU_BWD(d[j], g[j], u[j], dg[j], du[j])
        st8<D>(dgate, dgo, dg);
        st8<D>(dup, duo, du);
    } else {
        for (u32 j = 0; j < n; j++) {
            const float d = ld1<D>(dout, dO + j), g = ld1<D>(gate, go + j), u = ld1<D>(up, uo + j);
            if (act) st1<D>(act, ao + j, __fmul_rn(__fmul_rn(g, sigmoid_f(g)), u));
            float dg, du;
            SWIGLU_BWD(d, g, u, dg, du)
            st1<D>(dgate, dgo + j, dg);
            st1<D>(dup, duo + j, du);
        }
    }
#undef SWIGLU_BWD
}

#define SWIGLU_F(NAME, D, VEC)                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(const void* gate, u64 ldg, const void* up, u64 ldu,   \
                                                               void* out, u64 ldo, u64 rows, u32 cols) {            \
        swiglu_fwd<D, VEC>(gate, ldg, up, ldu, out, ldo, rows, cols);                                               \
    }
SWIGLU_F(swiglu_fwd_f16_v, 1, true)
SWIGLU_F(swiglu_fwd_f16_s, 1, false)
SWIGLU_F(swiglu_fwd_bf16_v, 2, true)
SWIGLU_F(swiglu_fwd_bf16_s, 2, false)

#define SWIGLU_B(NAME, D, VEC)                                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        NAME(const void* dout, u64 lddo, const void* gate, u64 ldg, const void* up, u64 ldu, void* dgate, u64 lddg,  \
             void* dup, u64 lddu, void* act, u64 ldact, u64 rows, u32 cols) {                                       \
        swiglu_bwd<D, VEC>(dout, lddo, gate, ldg, up, ldu, dgate, lddg, dup, lddu, act, ldact, rows, cols);         \
    }
SWIGLU_B(swiglu_bwd_f16_v, 1, true)
SWIGLU_B(swiglu_bwd_f16_s, 1, false)
SWIGLU_B(swiglu_bwd_bf16_v, 2, true)
SWIGLU_B(swiglu_bwd_bf16_s, 2, false)

// ---------------------------------------------------------------- casts
template <int SD, int DD, bool VEC>
__device__ __forceinline__ void cast(const void* src, u64 lds, void* dst, u64 ldd, u64 rows, u32 cols) {
    const u32 cpr = (cols + 7) / 8;
    u64 r;
    u32 k;
    if (!item_of(rows * cpr, cpr, r, k)) return;
    const u32 c0 = 8 * k, n = min(8u, cols - c0);
    const u64 so = r * lds + c0, d0 = r * ldd + c0;
    if (VEC && n == 8) {
        float v[8];
        ld8<SD>(src, so, v);
        st8<DD>(dst, d0, v);
    } else {
        for (u32 j = 0; j < n; j++) st1<DD>(dst, d0 + j, ld1<SD>(src, so + j));
    }
}

#define CAST(SN, SD, DN, DD)                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        cast_##SN##_##DN##_v(const void* src, u64 lds, void* dst, u64 ldd, u64 rows, u32 cols) {                    \
        cast<SD, DD, true>(src, lds, dst, ldd, rows, cols);                                                         \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        cast_##SN##_##DN##_s(const void* src, u64 lds, void* dst, u64 ldd, u64 rows, u32 cols) {                    \
        cast<SD, DD, false>(src, lds, dst, ldd, rows, cols);                                                        \
    }
CAST(f32, 0, f32, 0)
CAST(f32, 0, f16, 1)
CAST(f32, 0, bf16, 2)
CAST(f16, 1, f32, 0)
CAST(f16, 1, f16, 1)
CAST(f16, 1, bf16, 2)
CAST(bf16, 2, f32, 0)
CAST(bf16, 2, f16, 1)
CAST(bf16, 2, bf16, 2)

// ---------------------------------------------------------------- global norm, clipping
// *acc += sum of x[i]^2 in f64 (each square is exact in f64). Grid-stride over a grid of
// at most the resident blocks; one atomicAdd per block (so the f64 summation order, and
// the last bits of the sum, vary from run to run).
extern "C" __global__ void __launch_bounds__(THREADS) sum_squares(const float* x, u64 n, double* acc, int vec) {
    __shared__ double sh[32];
    const u64 stride = (u64)gridDim.x * blockDim.x, i0 = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    double s = 0.0;
    u64 done = 0;
    if (vec) {
        const u64 n4 = n / 4;
        for (u64 i = i0; i < n4; i += stride) {
            const float4 v = ((const float4*)x)[i];
            s += (double)v.x * (double)v.x;
            s += (double)v.y * (double)v.y;
            s += (double)v.z * (double)v.z;
            s += (double)v.w * (double)v.w;
        }
        done = n4 * 4;
    }
    for (u64 i = done + i0; i < n; i += stride) s += (double)x[i] * (double)x[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < (blockDim.x >> 5) ? sh[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) atomicAdd(acc, s);
    }
}

// fsdp::optim::clip_grad_norm's factor: coef = max_norm / (sqrt(sumsq) + 1e-6), applied
// (as f32) only when < 1. A NaN norm gives 1, as the CPU's f64::min does.
extern "C" __global__ void clip_factor(const double* sumsq, double max_norm, float* scale) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const double coef = __ddiv_rn(max_norm, __dadd_rn(__dsqrt_rn(*sumsq), 1e-6));
    *scale = coef < 1.0 ? __double2float_rn(coef) : 1.0f;
}

// ---------------------------------------------------------------- AdamW
// fsdp::optim::AdamW::step per element, operation for operation in f32 (the host computes
// decay, step_size, bc2 (= sqrt(1 - b2^t)), w1 (= 1 - b1), b2, w2 (= 1 - b2), eps in f64
// and rounds them to f32 exactly as the CPU does):
//   p *= decay; m = lerp(m, g, w1); v = v * b2 + (w2 * g) * g;
//   p -= (step_size * m) / (sqrt(v) / bc2 + eps)
// g is first multiplied by *gscale when gscale is not null (the clip factor).
__device__ __forceinline__ void adamw1(float& p, float g, float& m, float& v, float decay, float step_size, float bc2,
                                       float w1, float b2, float w2, float eps) {
    p = __fmul_rn(p, decay);
    m = w1 < 0.5f ? __fadd_rn(m, __fmul_rn(w1, __fsub_rn(g, m)))
                  : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m), __fsub_rn(1.f, w1)));
    v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(w2, g), g));
    p = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, m), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2), eps)));
}

extern "C" __global__ void __launch_bounds__(THREADS)
    adamw_step(float* p, const float* g, float* m, float* v, u64 n, const float* gscale, float decay, float step_size,
               float bc2, float w1, float b2, float w2, float eps, int vec) {
    const bool scaled = gscale != 0;
    const float sc = scaled ? *gscale : 1.f;
    const u64 stride = (u64)gridDim.x * blockDim.x, i0 = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 done = 0;
    if (vec) {
        const u64 n4 = n / 4;
        for (u64 i = i0; i < n4; i += stride) {
            float4 P = ((float4*)p)[i], G = ((const float4*)g)[i], M = ((float4*)m)[i], V = ((float4*)v)[i];
            if (scaled) {
                G.x = __fmul_rn(G.x, sc);
                G.y = __fmul_rn(G.y, sc);
                G.z = __fmul_rn(G.z, sc);
                G.w = __fmul_rn(G.w, sc);
            }
            adamw1(P.x, G.x, M.x, V.x, decay, step_size, bc2, w1, b2, w2, eps);
            adamw1(P.y, G.y, M.y, V.y, decay, step_size, bc2, w1, b2, w2, eps);
            adamw1(P.z, G.z, M.z, V.z, decay, step_size, bc2, w1, b2, w2, eps);
            adamw1(P.w, G.w, M.w, V.w, decay, step_size, bc2, w1, b2, w2, eps);
            ((float4*)p)[i] = P;
            ((float4*)m)[i] = M;
            ((float4*)v)[i] = V;
        }
        done = n4 * 4;
    }
    for (u64 i = done + i0; i < n; i += stride) {
        float P = p[i], G = g[i], M = m[i], V = v[i];
        if (scaled) G = __fmul_rn(G, sc);
        adamw1(P, G, M, V, decay, step_size, bc2, w1, b2, w2, eps);
        p[i] = P;
        m[i] = M;
        v[i] = V;
    }
}
