// Fused causal grouped-query flash attention with document masks: forward and backward.
//
// Semantics, layout and launch geometry are documented in attention.rs; this file holds:
//
//   tensor-core kernels (sm_80+, mma.sync m16n8k16 + ldmatrix + cp.async):
//     attn_fwd_tc_<dt>_d<D>_m<BM>_w<NW>_n<BN>  a CTA of NW warps per (block of BM query rows,
//                                              head, sequence), key tiles of BN
//     attn_bwd_tc_<dt>_d<D>_m<BM>_n<BN>_w<NW>  a CTA of NW warps per (block of BN keys, kv head,
//                                              sequence), query tiles of BM
//   (BM = 16 or 32 rows per warp forward, BN = 16 or 32 keys per warp backward)
//   portable kernels (any arch, scalar f32, a warp per row):
//     attn_fwd_simple_<dt>_d<D>, attn_bwd_dq_simple_<dt>_d<D>, attn_bwd_dkdv_simple_<dt>_d<D>
//   shared by both backward paths:
//     attn_bwd_pre_<dt>_d<D>   D = rowsum(dout * o), lse in log2 units, zeroes the dq accumulator
//     attn_bwd_cast_<dt>_d<D>  dq = scale * dq_acc, rounded to 16 bits
//
// 16-bit values are raw `unsigned short` (no cuda_fp16.h / cuda_bf16.h); arithmetic is f32;
// rounding to 16 bits is round-to-nearest-even. The tensor-core kernels' bodies exist only
// when compiling for sm_80 or newer (their names exist everywhere, empty below sm_80), so
// the module loads on sm_75, where the launcher never picks them.
//
// Masking. Query i of a sequence sees key j iff j <= i and (with docs) docs[j] == docs[i];
// inside a tile that is tested element by element, exactly as the CPU reference does.
// Skipping whole tiles relies on the documented contract that each document's tokens are
// contiguous: then a key tile that ends before the first row m0 of a query block is
// invisible to the whole block iff docs[last key] != docs[m0], and so are all tiles before
// it (symmetrically for the backward's query tiles after a key block).

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define DEV __device__ __forceinline__

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

DEV float neg_inf() { return __int_as_float(0xff800000); }

struct Bf16 {};
struct F16 {};

template <class T> struct Elem;

template <> struct Elem<Bf16> {
    static DEV float to_f(u16 x) { return __uint_as_float(((u32)x) << 16); }
    static DEV u16 from_f(float f) {
        u32 u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return (u16)(u >> 16);
    }
    // Two values into one 32-bit register, `lo` in the low half (mma fragment order).
    static DEV u32 pack(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
#else
        return (u32)from_f(lo) | ((u32)from_f(hi) << 16);
#endif
    }
};

template <> struct Elem<F16> {
    static DEV float to_f(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static DEV u16 from_f(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
    static DEV u32 pack(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
#else
        return (u32)from_f(lo) | ((u32)from_f(hi) << 16);
#endif
    }
};

template <class T> DEV float lo_f(u32 x) { return Elem<T>::to_f((u16)(x & 0xffffu)); }
template <class T> DEV float hi_f(u32 x) { return Elem<T>::to_f((u16)(x >> 16)); }

DEV float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---------------------------------------------------------------------------------------
// Backward helpers shared by both paths.
// ---------------------------------------------------------------------------------------

// 8 lanes per (token, head) row: D[h][t] = sum_c dout[t,h,c] * o[t,h,c] (the 16-bit o the
// forward wrote), lse2[h][t] = lse[t,h] * log2(e), and (zero_dq) dq_acc[t,h,:] = 0.
template <class T, int D>
DEV void bwd_pre(const u16* __restrict__ o, i64 ldo, const u16* __restrict__ dout, i64 lddo,
                 const float* __restrict__ lse, float* __restrict__ ws_lse2, float* __restrict__ ws_d,
                 float* __restrict__ dq_acc, int tokens, int heads, int zero_dq) {
    const i64 gt = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 row = gt >> 3;
    const int sub = (int)(gt & 7);
    const bool ok = row < (i64)tokens * heads;
    const i64 t = ok ? row / heads : 0;
    const int h = ok ? (int)(row % heads) : 0;
    float acc = 0.f;
    if (ok) {
#pragma unroll
        for (int c = sub * 8; c < D; c += 64) {
            const uint4 a = *(const uint4*)(o + t * ldo + (i64)h * D + c);
            const uint4 b = *(const uint4*)(dout + t * lddo + (i64)h * D + c);
            acc += lo_f<T>(a.x) * lo_f<T>(b.x) + hi_f<T>(a.x) * hi_f<T>(b.x);
            acc += lo_f<T>(a.y) * lo_f<T>(b.y) + hi_f<T>(a.y) * hi_f<T>(b.y);
            acc += lo_f<T>(a.z) * lo_f<T>(b.z) + hi_f<T>(a.z) * hi_f<T>(b.z);
            acc += lo_f<T>(a.w) * lo_f<T>(b.w) + hi_f<T>(a.w) * hi_f<T>(b.w);
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (!ok) return;
    if (sub == 0) {
        ws_d[(i64)h * tokens + t] = acc;
        ws_lse2[(i64)h * tokens + t] = lse[t * heads + h] * LOG2E;
    }
    if (zero_dq) {
#pragma unroll
        for (int c = sub * 8; c < D; c += 64) {
            float4* p = (float4*)(dq_acc + row * D + c);
            p[0] = make_float4(0.f, 0.f, 0.f, 0.f);
            p[1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}

// A thread per 8 elements: dq[t, h*D + c] = scale * dq_acc[t, h, c].
template <class T, int D>
DEV void bwd_cast(const float* __restrict__ dq_acc, u16* __restrict__ dq, i64 lddq, int tokens, int heads,
                  float scale) {
    const i64 gt = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 row = gt / (D / 8);
    const int c = (int)(gt % (D / 8)) * 8;
    if (row >= (i64)tokens * heads) return;
    const i64 t = row / heads;
    const int h = (int)(row % heads);
    const float4 a = *(const float4*)(dq_acc + row * D + c);
    const float4 b = *(const float4*)(dq_acc + row * D + c + 4);
    uint4 r;
    r.x = Elem<T>::pack(a.x * scale, a.y * scale);
    r.y = Elem<T>::pack(a.z * scale, a.w * scale);
    r.z = Elem<T>::pack(b.x * scale, b.y * scale);
    r.w = Elem<T>::pack(b.z * scale, b.w * scale);
    *(uint4*)(dq + t * lddq + (i64)h * D + c) = r;
}

// ---------------------------------------------------------------------------------------
// Portable path: a warp per row, lanes split the head dimension, f32 throughout. Correct on
// every architecture (bf16 emulated on sm_75); O(L^2) reads from L1/L2, no tiling.
// ---------------------------------------------------------------------------------------

template <class T, int D>
DEV void fwd_simple(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk,
                    const u16* __restrict__ v, i64 ldv, const u32* __restrict__ docs, u16* __restrict__ o,
                    i64 ldo, float* __restrict__ lse, int seqs, int L, int heads, int kvh, float scale) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= (i64)seqs * L * heads) return;
    const i64 t = w / heads;
    const int h = (int)(w % heads);
    const i64 tok0 = t - t % L;
    const int i = (int)(t - tok0);
    const int g = h / (heads / kvh);
    float qv[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = Elem<T>::to_f(q[t * ldq + (i64)h * D + lane + 32 * e]);
        acc[e] = 0.f;
    }
    const u32 di = docs ? docs[t] : 0u;
    float m = neg_inf(), l = 0.f;
    for (int j = 0; j <= i; ++j) {
        if (docs && docs[tok0 + j] != di) continue;
        const u16* kr = k + (tok0 + j) * ldk + (i64)g * D;
        const u16* vr = v + (tok0 + j) * ldv + (i64)g * D;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) s += qv[e] * Elem<T>::to_f(kr[lane + 32 * e]);
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float al = expf(m - mn);
        const float p = expf(s - mn);
        l = l * al + p;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * al + p * Elem<T>::to_f(vr[lane + 32 * e]);
        m = mn;
    }
    const float inv = 1.f / l;
#pragma unroll
    for (int e = 0; e < E; ++e) o[t * ldo + (i64)h * D + lane + 32 * e] = Elem<T>::from_f(acc[e] * inv);
    if (lane == 0) lse[t * heads + h] = m + logf(l);
}

template <class T, int D>
DEV void bwd_dq_simple(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk,
                       const u16* __restrict__ v, i64 ldv, const u32* __restrict__ docs,
                       const u16* __restrict__ dout, i64 lddo, const float* __restrict__ lse,
                       const float* __restrict__ ws_d, u16* __restrict__ dq, i64 lddq, int seqs, int L,
                       int heads, int kvh, float scale) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const i64 tokens = (i64)seqs * L;
    if (w >= tokens * heads) return;
    const i64 t = w / heads;
    const int h = (int)(w % heads);
    const i64 tok0 = t - t % L;
    const int i = (int)(t - tok0);
    const int g = h / (heads / kvh);
    float qv[E], dov[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = Elem<T>::to_f(q[t * ldq + (i64)h * D + lane + 32 * e]);
        dov[e] = Elem<T>::to_f(dout[t * lddo + (i64)h * D + lane + 32 * e]);
        acc[e] = 0.f;
    }
    const u32 di = docs ? docs[t] : 0u;
    const float li = lse[t * heads + h];
    const float dd = ws_d[(i64)h * tokens + t];
    for (int j = 0; j <= i; ++j) {
        if (docs && docs[tok0 + j] != di) continue;
        const u16* kr = k + (tok0 + j) * ldk + (i64)g * D;
        const u16* vr = v + (tok0 + j) * ldv + (i64)g * D;
        float kv[E], s = 0.f, dp = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            kv[e] = Elem<T>::to_f(kr[lane + 32 * e]);
            s += qv[e] * kv[e];
            dp += dov[e] * Elem<T>::to_f(vr[lane + 32 * e]);
        }
        s = warp_sum(s);
        dp = warp_sum(dp);
        const float p = expf(s * scale - li);
        const float ds = p * (dp - dd);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] += ds * kv[e];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) dq[t * lddq + (i64)h * D + lane + 32 * e] = Elem<T>::from_f(acc[e] * scale);
}

template <class T, int D>
DEV void bwd_dkdv_simple(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk,
                         const u16* __restrict__ v, i64 ldv, const u32* __restrict__ docs,
                         const u16* __restrict__ dout, i64 lddo, const float* __restrict__ lse,
                         const float* __restrict__ ws_d, u16* __restrict__ dk, i64 lddk, u16* __restrict__ dv,
                         i64 lddv, int seqs, int L, int heads, int kvh, float scale) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const i64 tokens = (i64)seqs * L;
    if (w >= tokens * kvh) return;
    const i64 t = w / kvh;
    const int g = (int)(w % kvh);
    const i64 tok0 = t - t % L;
    const int j = (int)(t - tok0);
    const int group = heads / kvh;
    float kv[E], vv[E], dka[E], dva[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        kv[e] = Elem<T>::to_f(k[t * ldk + (i64)g * D + lane + 32 * e]);
        vv[e] = Elem<T>::to_f(v[t * ldv + (i64)g * D + lane + 32 * e]);
        dka[e] = 0.f;
        dva[e] = 0.f;
    }
    const u32 dj = docs ? docs[t] : 0u;
    for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int i = j; i < L; ++i) {
            const i64 ti = tok0 + i;
            if (docs && docs[ti] != dj) continue;
            const u16* qr = q + ti * ldq + (i64)h * D;
            const u16* dr = dout + ti * lddo + (i64)h * D;
            float qv[E], dov[E], s = 0.f, dp = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                qv[e] = Elem<T>::to_f(qr[lane + 32 * e]);
                dov[e] = Elem<T>::to_f(dr[lane + 32 * e]);
                s += qv[e] * kv[e];
                dp += dov[e] * vv[e];
            }
            s = warp_sum(s);
            dp = warp_sum(dp);
            const float p = expf(s * scale - lse[ti * heads + h]);
            const float ds = p * (dp - ws_d[(i64)h * tokens + ti]);
#pragma unroll
            for (int e = 0; e < E; ++e) {
                dva[e] += p * dov[e];
                dka[e] += ds * qv[e];
            }
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
        dk[t * lddk + (i64)g * D + lane + 32 * e] = Elem<T>::from_f(dka[e] * scale);
        dv[t * lddv + (i64)g * D + lane + 32 * e] = Elem<T>::from_f(dva[e]);
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core path (sm_80+).
// ---------------------------------------------------------------------------------------

extern __shared__ __align__(128) unsigned char attn_smem[];

// cp.async pipeline depth: K/V tiles in flight in the forward, Q/dO tiles in the backward
// (attention.rs sizes the shared memory with the same numbers). 3 measured no faster than 2
// on an H100 at the Llama shapes (and is not tested).
#define FWD_STAGES 2
#define BWD_STAGES 2

#if __CUDA_ARCH__ >= 800

DEV float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

DEV u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

DEV void cp16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
DEV void cp4(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}
DEV void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> DEV void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

DEV void ldsm4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
DEV void ldsm4t(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <class T> DEV void mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1);
template <> DEV void mma<Bf16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> DEV void mma<F16>(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

DEV void red2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Shared-memory tiles are rows of C 16-byte chunks (8 16-bit values each); chunk c of row r
// is stored at chunk position swz<C>(r, c). The XOR spreads the 8 rows an ldmatrix reads at
// one logical chunk over all 32 banks.
template <int C> DEV int swz(int r, int c) {
    if (C >= 8) return r * C + (c ^ (r & 7));
    return r * C + (c ^ ((r >> 1) & 3));  // C == 4: two rows per 128-byte line
}

// cp.async rows [row0, row0 + R) of a [*, ld] 16-bit matrix (row 0 at g) into a swizzled
// R x (8*C) tile; rows at or past `rows` are zero-filled (nothing is read from them).
template <int R, int C, int NT>
DEV void load_tile(u32 s, const u16* g, i64 ld, int row0, int rows, int tid) {
#pragma unroll
    for (int x = 0; x < (R * C + NT - 1) / NT; ++x) {
        const int idx = tid + x * NT;
        if ((R * C) % NT != 0 && idx >= R * C) break;  // (a compile-time no-op when NT divides)
        const int r = idx / C, c = idx % C;
        const bool ok = row0 + r < rows;
        cp16(s + swz<C>(r, c) * 16, ok ? (const void*)(g + (i64)(row0 + r) * ld + c * 8) : (const void*)g, ok);
    }
}

// The (sequence, head, query block) a forward CTA owns, for blockIdx.x over query blocks x
// (sequences x heads): heaviest (last) query blocks first; kg is the head's KV group.
struct FwdBlock {
    int seq, h, kg, m0;
    i64 tok0;
};
DEV FwdBlock fwd_block(int L, int heads, int kvh, int seqs, int BM) {
    const int nmb = (L + BM - 1) / BM;
    const int hs_count = heads * seqs;
    const int mb = nmb - 1 - (int)(blockIdx.x / hs_count);
    const int hs = (int)(blockIdx.x % hs_count);
    FwdBlock b;
    b.seq = hs / heads;
    b.h = hs % heads;
    b.kg = b.h / (heads / kvh);
    b.m0 = mb * BM;
    b.tok0 = (i64)b.seq * L;
    return b;
}

// Forward: a CTA of NW warps owns BM = 16*MT*NW query rows of one (head, sequence); each warp
// owns 16*MT rows as MT m16 tiles that share every K/V fragment the warp loads (MT = 2 halves
// the shared-memory reads per tensor-core op, which bound the MT = 1 kernel). The CTA walks
// key tiles of BN from the diagonal down, K/V multi-buffered with cp.async (FWD_STAGES).
// S = Q K^T and O += P V on tensor cores (f32 accumulate), online softmax in registers (log2
// domain, the scale folded into the exp2 argument), P re-packed from the S accumulators as the
// A operand. Masks are decided per warp (a warp whose rows all see a whole tile skips the mask,
// which is branch-free inside). No warp skips a tile it cannot see at all (the upper half of
// the diagonal when BM = 2 BN, or another document's keys): measured on an H100, a plain
// branch made ptxas wrap the mma.sync and shuffles in divergence handling (5% slower), and a
// vote-guarded one saved nothing forward and cost the backward registers (8% slower).
template <class T, int D, int NW, int BN, int MT>
DEV void fwd_tc(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk, const u16* __restrict__ v,
                i64 ldv, const u32* __restrict__ docs, u16* __restrict__ o, i64 ldo, float* __restrict__ lse, int seqs,
                int L, int heads, int kvh, float scale_log2) {
    constexpr int WR = 16 * MT, BM = WR * NW, NT = 32 * NW, C = D / 8;
    constexpr int S = FWD_STAGES;
    u16* sQ = (u16*)attn_smem;
    u16* sK = sQ + BM * D;      // [S][BN*D]
    u16* sV = sK + S * BN * D;  // [S][BN*D]
    u32* sKd = (u32*)(sV + S * BN * D);  // [S][BN]
    __shared__ int s_lo;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, t4 = lane & 3;
    const FwdBlock fb = fwd_block(L, heads, kvh, seqs, BM);
    const int seq = fb.seq, h = fb.h, m0 = fb.m0;
    const i64 tok0 = fb.tok0;
    const u16* qb = q + tok0 * ldq + (i64)h * D;
    const u16* kb = k + tok0 * ldk + (i64)fb.kg * D;
    const u16* vb = v + tok0 * ldv + (i64)fb.kg * D;
    const u32* db = docs ? docs + tok0 : nullptr;
    const int n_hi = (min(m0 + BM, L) - 1) / BN;

    const u32 sQa = smem_addr(sQ), sKa = smem_addr(sK), sVa = smem_addr(sV);
    auto load_kv = [&](int n, int buf) {
        load_tile<BN, C, NT>(sKa + buf * BN * D * 2, kb, ldk, n * BN, L, tid);
        load_tile<BN, C, NT>(sVa + buf * BN * D * 2, vb, ldv, n * BN, L, tid);
        if (db) {
            for (int j = tid; j < BN; j += NT) {
                const bool ok = n * BN + j < L;
                cp4(smem_addr(sKd + buf * BN + j), ok ? db + n * BN + j : db, ok);
            }
        }
    };
    // n_lo is not known yet (documents): the prologue's S - 1 tiles may include some below it,
    // loaded for nothing (never read).
    load_tile<BM, C, NT>(sQa, qb, ldq, m0, L, tid);
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (n_hi - st >= 0) load_kv(n_hi - st, st);
        cp_commit();  // one group per stage, empty or not, so that cp_wait<S - 1> counts right
    }

    // This warp's rows: w0 .. w0 + WR - 1, the thread's w0 + 16 mt + gr (+ 8); wl is the last
    // row below L (the warp has none when w0 >= L).
    const int w0 = m0 + warp * WR, wl = min(w0 + WR, L) - 1;
    int n_lo = 0;
    u32 rd[MT][2], dlast = 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) rd[mt][0] = rd[mt][1] = 0;
    if (db) {
        if (tid == 0) s_lo = 0;
        __syncthreads();
        const u32 d0 = db[m0];
        for (int n = tid; n < n_hi; n += NT) {
            const int e = n * BN + BN - 1;
            if (e < m0 && db[e] != d0) atomicMax(&s_lo, n + 1);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            rd[mt][0] = db[min(w0 + 16 * mt + gr, L - 1)];
            rd[mt][1] = db[min(w0 + 16 * mt + gr + 8, L - 1)];
        }
        dlast = db[wl];
        __syncthreads();
        n_lo = s_lo;
    }

    cp_wait<S - 2>();  // Q (in the first group)
    __syncthreads();
    u32 qf[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kd = 0; kd < D / 16; ++kd)
            ldsm4(qf[mt][kd], sQa + swz<C>(warp * WR + mt * 16 + (lane & 15), 2 * kd + (lane >> 4)) * 16);

    float acc[MT][D / 8][4], mr[MT][2], lr[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) acc[mt][dn][0] = acc[mt][dn][1] = acc[mt][dn][2] = acc[mt][dn][3] = 0.f;
        mr[mt][0] = mr[mt][1] = neg_inf();
        lr[mt][0] = lr[mt][1] = 0.f;
    }

    for (int n = n_hi; n >= n_lo; --n) {
        const int buf = (n_hi - n) % S;
        if (n - (S - 1) >= n_lo) load_kv(n - (S - 1), (n_hi - n + S - 1) % S);
        cp_commit();
        cp_wait<S - 1>();
        __syncthreads();  // tile n landed
        const int n0 = n * BN;
        {
            const u32 kbase = sKa + buf * BN * D * 2, vbase = sVa + buf * BN * D * 2;
            float s[MT][BN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
            for (int kd = 0; kd < D / 16; ++kd) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32 b[4];
                    ldsm4(b, kbase + swz<C>(np * 16 + ((lane >> 4) << 3) + (lane & 7), 2 * kd + ((lane >> 3) & 1)) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(s[mt][2 * np], qf[mt][kd], b[0], b[1]);
                        mma<T>(s[mt][2 * np + 1], qf[mt][kd], b[2], b[3]);
                    }
                }
            }

            // Causally, the tile needs a mask iff its last key is after the warp's first row;
            // with documents, also iff its first key's document is not the warp's last row's
            // (contiguous documents: otherwise every pair shares one document).
            // (Branch-free inside: the documents of the thread's keys are read once, 0 without
            // documents like rd, so that the comparison then always holds.)
            const bool need_mask = (n0 + BN - 1 > w0) || (db && sKd[buf * BN] != dlast);
            if (need_mask) {
                u32 kdoc[BN / 8][2];
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    kdoc[nt][0] = db ? sKd[buf * BN + nt * 8 + 2 * t4] : 0u;
                    kdoc[nt][1] = db ? sKd[buf * BN + nt * 8 + 2 * t4 + 1] : 0u;
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int j = n0 + nt * 8 + 2 * t4 + (e & 1);
                            const int r = w0 + 16 * mt + gr + ((e >> 1) << 3);
                            const bool vis = (j <= r) & (kdoc[nt][e & 1] == rd[mt][e >> 1]);
                            s[mt][nt][e] = vis ? s[mt][nt][e] : neg_inf();
                        }
                    }
                }
            }

#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float rm0 = neg_inf(), rm1 = neg_inf();
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    rm0 = fmaxf(rm0, fmaxf(s[mt][nt][0], s[mt][nt][1]));
                    rm1 = fmaxf(rm1, fmaxf(s[mt][nt][2], s[mt][nt][3]));
                }
                rm0 = fmaxf(rm0, __shfl_xor_sync(0xffffffffu, rm0, 1));
                rm0 = fmaxf(rm0, __shfl_xor_sync(0xffffffffu, rm0, 2));
                rm1 = fmaxf(rm1, __shfl_xor_sync(0xffffffffu, rm1, 1));
                rm1 = fmaxf(rm1, __shfl_xor_sync(0xffffffffu, rm1, 2));
                const float mn0 = fmaxf(mr[mt][0], rm0 * scale_log2), mn1 = fmaxf(mr[mt][1], rm1 * scale_log2);
                const float mu0 = mn0 == neg_inf() ? 0.f : mn0, mu1 = mn1 == neg_inf() ? 0.f : mn1;
                const float al0 = ex2(mr[mt][0] - mu0), al1 = ex2(mr[mt][1] - mu1);
                mr[mt][0] = mn0;
                mr[mt][1] = mn1;
                float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    s[mt][nt][0] = ex2(__fmaf_rn(s[mt][nt][0], scale_log2, -mu0));
                    s[mt][nt][1] = ex2(__fmaf_rn(s[mt][nt][1], scale_log2, -mu0));
                    s[mt][nt][2] = ex2(__fmaf_rn(s[mt][nt][2], scale_log2, -mu1));
                    s[mt][nt][3] = ex2(__fmaf_rn(s[mt][nt][3], scale_log2, -mu1));
                    ps0 += s[mt][nt][0] + s[mt][nt][1];
                    ps1 += s[mt][nt][2] + s[mt][nt][3];
                }
                lr[mt][0] = __fmaf_rn(lr[mt][0], al0, ps0);
                lr[mt][1] = __fmaf_rn(lr[mt][1], al1, ps1);
#pragma unroll
                for (int dn = 0; dn < D / 8; ++dn) {
                    acc[mt][dn][0] *= al0;
                    acc[mt][dn][1] *= al0;
                    acc[mt][dn][2] *= al1;
                    acc[mt][dn][3] *= al1;
                }
            }
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = Elem<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = Elem<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = Elem<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = Elem<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32 b[4];
                    ldsm4t(b, vbase + swz<C>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(acc[mt][2 * dp], a[mt], b[0], b[1]);
                        mma<T>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with buffer buf before it is refilled
    }

    u16* ob = o + tok0 * ldo + (i64)h * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l0 = lr[mt][0], l1 = lr[mt][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
        const int r0 = w0 + 16 * mt + gr;
        if (r0 < L) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn)
                *(u32*)(ob + (i64)r0 * ldo + dn * 8 + 2 * t4) = Elem<T>::pack(acc[mt][dn][0] * inv0, acc[mt][dn][1] * inv0);
            if (t4 == 0) lse[(tok0 + r0) * heads + h] = (mr[mt][0] + log2f(l0)) * LN2;
        }
        if (r0 + 8 < L) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn)
                *(u32*)(ob + (i64)(r0 + 8) * ldo + dn * 8 + 2 * t4) =
                    Elem<T>::pack(acc[mt][dn][2] * inv1, acc[mt][dn][3] * inv1);
            if (t4 == 0) lse[(tok0 + r0 + 8) * heads + h] = (mr[mt][1] + log2f(l1)) * LN2;
        }
    }
}

// Backward: a CTA of NW warps owns BN = 16*MT*NW keys of one (kv head, sequence); each warp
// owns 16*MT keys as MT m16 tiles that share every Q/dO fragment the warp loads, with their
// dK, dV in registers. The CTA walks the query tiles (BM rows) that can see its keys, for
// every query head of the group, Q/dO/lse/D multi-buffered with cp.async (BWD_STAGES). Per tile:
// S^T = K Q^T, dP^T = V dO^T, P = exp2(S*c - lse2), dS = P (dP - D), dV += P^T dO,
// dK += dS^T Q (A operands re-packed from the accumulators), then dS^T goes through shared
// memory for dQ += dS K (the BM x D block split over WR x NW/WR warps), added to the f32
// accumulator with atomics. Masks are decided per warp; as in the forward, no warp skips a
// tile it cannot see at all (and dQ runs over every key of the block, without branches).
template <class T, int D, int BM, int NW, int MT, int WR>
DEV void bwd_tc(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk, const u16* __restrict__ v,
                i64 ldv, const u32* __restrict__ docs, const u16* __restrict__ dout, i64 lddo,
                const float* __restrict__ ws_lse2, const float* __restrict__ ws_d, float* __restrict__ dq_acc,
                u16* __restrict__ dk, i64 lddk, u16* __restrict__ dv, i64 lddv, int seqs, int L, int heads, int kvh,
                float scale, float scale_log2) {
    constexpr int KW = 16 * MT, BN = KW * NW, NT = 32 * NW, C = D / 8, CM = BM / 8;
    constexpr int RB = BM / 16, WC = NW / WR, RW = RB / WR, DC = D / WC;  // dQ: warp -> (RW row blocks, DC columns)
    static_assert(NW % WR == 0 && RB % WR == 0 && DC % 16 == 0, "dQ warp split");
    u16* sK = (u16*)attn_smem;
    u16* sV = sK + BN * D;
    constexpr int S = BWD_STAGES;
    u16* sQ = sV + BN * D;      // [S][BM*D]
    u16* sO = sQ + S * BM * D;  // dO, [S][BM*D]
    u16* sS = sO + S * BM * D;  // dS^T, [BN][BM]
    float* sL = (float*)(sS + BN * BM);  // [S][BM]
    float* sD = sL + S * BM;             // [S][BM]
    u32* sQd = (u32*)(sD + S * BM);      // [S][BM]
    __shared__ int s_hi;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, t4 = lane & 3;
    const int kh_count = kvh * seqs;
    const int nb = (int)(blockIdx.x / kh_count);  // heaviest (first) key blocks first
    const int gs = (int)(blockIdx.x % kh_count);
    const int seq = gs / kvh, kg = gs % kvh, group = heads / kvh;
    const i64 tokens = (i64)seqs * L;
    const int n0 = nb * BN, n1 = min(n0 + BN, L) - 1;
    const i64 tok0 = (i64)seq * L;
    const u32* db = docs ? docs + tok0 : nullptr;
    const u32 sKa = smem_addr(sK), sVa = smem_addr(sV), sQa = smem_addr(sQ), sOa = smem_addr(sO), sSa = smem_addr(sS);

    load_tile<BN, C, NT>(sKa, k + tok0 * ldk + (i64)kg * D, ldk, n0, L, tid);
    load_tile<BN, C, NT>(sVa, v + tok0 * ldv + (i64)kg * D, ldv, n0, L, tid);

    const int m_first = n0 / BM, nmb = (L + BM - 1) / BM;
    int m_last = nmb - 1;
    const int kw0 = n0 + warp * KW;  // this warp's keys: kw0 .. kw0 + KW - 1, the thread's kw0 + 16 mt + gr (+ 8)
    u32 kd[MT][2], kd_first = 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) kd[mt][0] = kd[mt][1] = 0;
    if (db) {
        if (tid == 0) s_hi = nmb;
        __syncthreads();
        const u32 dn1 = db[n1];
        for (int m = m_first + 1 + tid; m < nmb; m += NT)
            if (m * BM > n1 && db[m * BM] != dn1) atomicMin(&s_hi, m);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            kd[mt][0] = db[min(kw0 + 16 * mt + gr, L - 1)];
            kd[mt][1] = db[min(kw0 + 16 * mt + gr + 8, L - 1)];
        }
        kd_first = db[min(kw0, L - 1)];
        __syncthreads();
        m_last = s_hi - 1;
    }
    const int ntiles = m_last - m_first + 1;
    const int niters = group * ntiles;

    auto load_q = [&](int it, int buf) {
        const int h = kg * group + it / ntiles;
        const int m0 = (m_first + it % ntiles) * BM;
        load_tile<BM, C, NT>(sQa + buf * BM * D * 2, q + tok0 * ldq + (i64)h * D, ldq, m0, L, tid);
        load_tile<BM, C, NT>(sOa + buf * BM * D * 2, dout + tok0 * lddo + (i64)h * D, lddo, m0, L, tid);
        for (int i = tid; i < BM; i += NT) {
            const bool ok = m0 + i < L;
            const i64 off = (i64)h * tokens + tok0 + m0 + i;
            cp4(smem_addr(sL + buf * BM + i), ok ? ws_lse2 + off : ws_lse2, ok);
            cp4(smem_addr(sD + buf * BM + i), ok ? ws_d + off : ws_d, ok);
            if (db) cp4(smem_addr(sQd + buf * BM + i), ok ? db + m0 + i : db, ok);
        }
    };
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (st < niters) load_q(st, st);
        cp_commit();  // one group per stage, empty or not, so that cp_wait<S - 2> counts right
    }

    float dka[MT][D / 8][4], dva[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            dka[mt][dn][0] = dka[mt][dn][1] = dka[mt][dn][2] = dka[mt][dn][3] = 0.f;
            dva[mt][dn][0] = dva[mt][dn][1] = dva[mt][dn][2] = dva[mt][dn][3] = 0.f;
        }

    for (int it = 0; it < niters; ++it) {
        const int buf = it % S;
        cp_wait<S - 2>();
        __syncthreads();  // (A): tile `it` landed; everyone is done with iteration it-1
        if (it + S - 1 < niters) load_q(it + S - 1, (it + S - 1) % S);  // into iteration it-1's buffer
        cp_commit();
        const int h = kg * group + it / ntiles;
        const int m0 = (m_first + it % ntiles) * BM;
        const u32 qbase = sQa + buf * BM * D * 2, obase = sOa + buf * BM * D * 2;
        const float* lb = sL + buf * BM;
        const float* dbuf = sD + buf * BM;
        const u32* qd = sQd + buf * BM;

        {
            // S^T = K Q^T and dP^T = V dO^T, 16 MT keys x BM queries per warp.
            float st[MT][BM / 8][4], dpt[MT][BM / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt) {
                    st[mt][nt][0] = st[mt][nt][1] = st[mt][nt][2] = st[mt][nt][3] = 0.f;
                    dpt[mt][nt][0] = dpt[mt][nt][1] = dpt[mt][nt][2] = dpt[mt][nt][3] = 0.f;
                }
#pragma unroll
            for (int kd2 = 0; kd2 < D / 16; ++kd2) {
                u32 ak[MT][4], av[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int off = swz<C>(warp * KW + mt * 16 + (lane & 15), 2 * kd2 + (lane >> 4)) * 16;
                    ldsm4(ak[mt], sKa + off);
                    ldsm4(av[mt], sVa + off);
                }
#pragma unroll
                for (int np = 0; np < BM / 16; ++np) {
                    const int row = np * 16 + ((lane >> 4) << 3) + (lane & 7), ch = 2 * kd2 + ((lane >> 3) & 1);
                    u32 b[4];
                    ldsm4(b, qbase + swz<C>(row, ch) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(st[mt][2 * np], ak[mt], b[0], b[1]);
                        mma<T>(st[mt][2 * np + 1], ak[mt], b[2], b[3]);
                    }
                    ldsm4(b, obase + swz<C>(row, ch) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(dpt[mt][2 * np], av[mt], b[0], b[1]);
                        mma<T>(dpt[mt][2 * np + 1], av[mt], b[2], b[3]);
                    }
                }
            }

            // P and dS (in place: st <- P, dpt <- dS). Causally the warp's keys need a mask iff
            // the last is after the tile's first query; rows past L are masked; with documents,
            // iff the warp's first key's document is not the tile's last query's.
            const bool need_mask =
                (m0 < kw0 + KW) || (m0 + BM > L) || (db && qd[min(BM, L - m0) - 1] != kd_first);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        st[mt][nt][e] = ex2(__fmaf_rn(st[mt][nt][e], scale_log2, -lb[nt * 8 + 2 * t4 + (e & 1)]));
            if (need_mask) {  // branch-free inside, as in the forward
                u32 qdoc[BM / 8][2];
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt) {
                    qdoc[nt][0] = db ? qd[nt * 8 + 2 * t4] : 0u;
                    qdoc[nt][1] = db ? qd[nt * 8 + 2 * t4 + 1] : 0u;
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int i = m0 + nt * 8 + 2 * t4 + (e & 1), j = kw0 + 16 * mt + gr + ((e >> 1) << 3);
                            const bool vis = (i < L) & (j <= i) & (qdoc[nt][e & 1] == kd[mt][e >> 1]);
                            st[mt][nt][e] = vis ? st[mt][nt][e] : 0.f;
                        }
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dpt[mt][nt][e] = st[mt][nt][e] * (dpt[mt][nt][e] - dbuf[nt * 8 + 2 * t4 + (e & 1)]);

            // dV += P^T dO, dK += dS^T Q (k = queries); dS^T rows (keys) to shared memory.
#pragma unroll
            for (int kq = 0; kq < BM / 16; ++kq) {
                u32 ap[MT][4], as[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ap[mt][0] = Elem<T>::pack(st[mt][2 * kq][0], st[mt][2 * kq][1]);
                    ap[mt][1] = Elem<T>::pack(st[mt][2 * kq][2], st[mt][2 * kq][3]);
                    ap[mt][2] = Elem<T>::pack(st[mt][2 * kq + 1][0], st[mt][2 * kq + 1][1]);
                    ap[mt][3] = Elem<T>::pack(st[mt][2 * kq + 1][2], st[mt][2 * kq + 1][3]);
                    as[mt][0] = Elem<T>::pack(dpt[mt][2 * kq][0], dpt[mt][2 * kq][1]);
                    as[mt][1] = Elem<T>::pack(dpt[mt][2 * kq][2], dpt[mt][2 * kq][3]);
                    as[mt][2] = Elem<T>::pack(dpt[mt][2 * kq + 1][0], dpt[mt][2 * kq + 1][1]);
                    as[mt][3] = Elem<T>::pack(dpt[mt][2 * kq + 1][2], dpt[mt][2 * kq + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    const int row = kq * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), ch = 2 * dp + (lane >> 4);
                    u32 b[4];
                    ldsm4t(b, obase + swz<C>(row, ch) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(dva[mt][2 * dp], ap[mt], b[0], b[1]);
                        mma<T>(dva[mt][2 * dp + 1], ap[mt], b[2], b[3]);
                    }
                    ldsm4t(b, qbase + swz<C>(row, ch) * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma<T>(dka[mt][2 * dp], as[mt], b[0], b[1]);
                        mma<T>(dka[mt][2 * dp + 1], as[mt], b[2], b[3]);
                    }
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const int kr = warp * KW + mt * 16 + gr;
                    *(u32*)(sS + swz<CM>(kr, 2 * kq) * 8 + 2 * t4) = as[mt][0];
                    *(u32*)(sS + swz<CM>(kr + 8, 2 * kq) * 8 + 2 * t4) = as[mt][1];
                    *(u32*)(sS + swz<CM>(kr, 2 * kq + 1) * 8 + 2 * t4) = as[mt][2];
                    *(u32*)(sS + swz<CM>(kr + 8, 2 * kq + 1) * 8 + 2 * t4) = as[mt][3];
                }
            }
        }
        __syncthreads();  // (B): dS^T complete

        // dQ[BM x D] += dS K.
        {
            const int wr = warp % WR, wc = warp / WR;
            float dqa[RW][DC / 8][4];
#pragma unroll
            for (int r = 0; r < RW; ++r)
#pragma unroll
                for (int dn = 0; dn < DC / 8; ++dn) dqa[r][dn][0] = dqa[r][dn][1] = dqa[r][dn][2] = dqa[r][dn][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 a[RW][4];
#pragma unroll
                for (int r = 0; r < RW; ++r)
                    ldsm4t(a[r], sSa + swz<CM>(kk * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * (wr * RW + r) + ((lane >> 3) & 1)) * 16);
#pragma unroll
                for (int dp = 0; dp < DC / 16; ++dp) {
                    u32 b[4];
                    ldsm4t(b, sKa + swz<C>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), wc * (DC / 8) + 2 * dp + (lane >> 4)) * 16);
#pragma unroll
                    for (int r = 0; r < RW; ++r) {
                        mma<T>(dqa[r][2 * dp], a[r], b[0], b[1]);
                        mma<T>(dqa[r][2 * dp + 1], a[r], b[2], b[3]);
                    }
                }
            }
            const i64 step8 = (i64)8 * heads * D;
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const int i0 = m0 + (wr * RW + r) * 16 + gr;
                float* base = dq_acc + ((tok0 + i0) * heads + h) * D + wc * DC + 2 * t4;
#pragma unroll
                for (int dn = 0; dn < DC / 8; ++dn) {
                    if (i0 < L) red2(base + dn * 8, dqa[r][dn][0], dqa[r][dn][1]);
                    if (i0 + 8 < L) red2(base + step8 + dn * 8, dqa[r][dn][2], dqa[r][dn][3]);
                }
            }
        }
    }

    u16* dkb = dk + tok0 * lddk + (i64)kg * D;
    u16* dvb = dv + tok0 * lddv + (i64)kg * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int j0 = kw0 + 16 * mt + gr;
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn) {
            const int c = dn * 8 + 2 * t4;
            if (j0 < L) {
                *(u32*)(dkb + (i64)j0 * lddk + c) = Elem<T>::pack(dka[mt][dn][0] * scale, dka[mt][dn][1] * scale);
                *(u32*)(dvb + (i64)j0 * lddv + c) = Elem<T>::pack(dva[mt][dn][0], dva[mt][dn][1]);
            }
            if (j0 + 8 < L) {
                *(u32*)(dkb + (i64)(j0 + 8) * lddk + c) = Elem<T>::pack(dka[mt][dn][2] * scale, dka[mt][dn][3] * scale);
                *(u32*)(dvb + (i64)(j0 + 8) * lddv + c) = Elem<T>::pack(dva[mt][dn][2], dva[mt][dn][3]);
            }
        }
    }
}


// ---------------------------------------------------------------------------------------
// Hopper path (sm_90a only: wgmma exists in no other architecture's PTX). The module is
// compiled for compute_90a on an sm_90 device (attention.rs asks cudakit for the
// arch-specific target), which defines __CUDA_ARCH_FEAT_SM90_ALL; elsewhere these kernels'
// bodies are empty and the launcher never picks them.
// ---------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

typedef unsigned long long u64;

// A shared-memory matrix descriptor for a tile of rows of 128 bytes (64 16-bit values) in
// the 128-byte swizzle that swz<8> writes (chunk c of row r at r * 128 + (c ^ (r & 7)) * 16,
// the tile 1024-byte aligned): 8-row groups 1024 bytes apart. For a K-major operand (K's
// rows of head_dim values) that is the stride byte offset and the leading one is unused; for
// the MN-major V (rows of keys = the reduction dimension, 64 values of head_dim = one swizzle
// atom wide) it is the stride between 8-row groups of the reduction dimension and the
// leading offset (between 64-wide atoms) is unused. Both are set to 1024 so that either
// reading holds. Bits: start address >> 4 [0,14), leading byte offset >> 4 [16,30), stride
// byte offset >> 4 [32,46), base offset 0 [49,52), swizzle mode 1 = 128 bytes [62,64).
DEV u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3ffffu) >> 4) | ((u64)(1024 >> 4) << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
DEV void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DEV void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> DEV void wg_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// cp.async writes are generic-proxy writes; wgmma reads shared memory through the async proxy.
DEV void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Pins registers in program order against the (volatile) wgmma fences: after a
// wgmma.wait_group no read of an accumulator moves above it, and before a wgmma.fence every
// write of an accumulator or A fragment is done (a write the compiler sank below the fence
// would make ptxas serialize the wgmma pipeline).
template <int N> DEV void reg_fence(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N> DEV void reg_fence(u32 (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i][0]), "+r"(d[i][1]), "+r"(d[i][2]), "+r"(d[i][3])::"memory");
}

// D[64 x N] (+)= A[64 x 16] B[16 x N] for the warpgroup, f32 accumulate, A from registers
// (per warp 16 rows, the mma.m16n8k16 A fragment), B from shared memory by descriptor (TB = 0:
// B stored K-major, rows of N; TB = 1: stored MN-major, rows of K). The accumulator layout per
// warp is mma.m16n8's C fragment repeated over the N / 8 column blocks.
template <class T, int N, int TB> struct Wgmma;
// The inline asm of one wgmma: R = 32 (n64) or 64 (n128) f32 accumulator registers, then
// the four A registers, the B descriptor and scale-d's predicate source.
#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_D_32 WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24)
#define WG_D_64 WG_D_32, WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56)
#define WG_R_32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_R_64 WG_R_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_A_32 "{%32, %33, %34, %35}, %36"
#define WG_A_64 "{%64, %65, %66, %67}, %68"
#define WG_P_32 "%37"
#define WG_P_64 "%69"
#define WGMMA(T, TY, N, TB, R)                                                                                      \
    template <> struct Wgmma<T, N, TB> {                                                                           \
        static DEV void run(float (&d)[R], const u32 (&a)[4], u64 desc, int scale_d) {                             \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " WG_P_##R ", 0;\n"                                      \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " "                           \
                         "{" WG_R_##R "}, " WG_A_##R ", p, 1, 1, " #TB ";\n}\n"                                     \
                         : WG_D_##R                                                                                \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d));                   \
        }                                                                                                          \
    };
WGMMA(Bf16, "bf16", 64, 0, 32)
WGMMA(Bf16, "bf16", 128, 0, 64)
WGMMA(Bf16, "bf16", 64, 1, 32)
WGMMA(F16, "f16", 64, 0, 32)
WGMMA(F16, "f16", 128, 0, 64)
WGMMA(F16, "f16", 64, 1, 32)
#undef WGMMA

// Forward on wgmma, head_dim 64: a CTA of NWG warpgroups owns BM = 64 NWG query rows of one
// (head, sequence); warp w owns rows 16 w .. 16 w + 15 (the wgmma A/accumulator fragment of
// its warpgroup). Q fragments are loaded once into registers with ldmatrix, as in fwd_tc.
// Per key tile: S = Q K^T as 4 wgmma m64nBNk16 (K from shared memory, K-major), the masks and
// online softmax of fwd_tc on the accumulators, then O += P V as BN / 16 wgmma m64n64k16 with P
// re-packed from S as the register A operand and V read MN-major (transposed) from shared
// memory. K/V arrive through an S-stage cp.async ring; one barrier per tile, placed after
// every warpgroup has waited for its previous P V (whose V buffer the next load refills).
//
// MODE (bits) selects variants of the synchronisation around the asynchronous parts:
//   WG_SYNC_PV  wait for P V at the end of its own iteration (nothing in flight across tiles)
//   WG_FRESH    P V into a fresh accumulator, combined as acc = acc * alpha + PV after a wait
//   WG_PLAIN    K/V loaded with ordinary loads and stores into one buffer at each tile's start
//               (no cp.async, no prefetch), then fence.proxy.async and a barrier
//   WG_REFENCE  after the tile barrier, every thread fences the async proxy again and the
//               CTA meets a second barrier before the first wgmma reads the tile
// Measured on an H100 (fsdp/results/attention-h100/wgmma.md): with the cp.async ring, P V
// accumulating in place into the rescaled O registers (MODE 0, WG_SYNC_PV | WG_REFENCE,
// WG_REFENCE) was exact whenever a row block saw a single key tile and wrong (relative L2
// 0.15..0.97) as soon as it spanned two; why is not understood (the SASS orders the rescale,
// the wgmma fence and the HGMMA as written, and no register of an HGMMA in flight is
// touched). WG_FRESH (cp.async ring kept) and WG_PLAIN | WG_SYNC_PV (in-place accumulate,
// no cp.async) matched the reference on every case; only those are instantiated.
#define WG_SYNC_PV 1
#define WG_FRESH 2
#define WG_PLAIN 4
#define WG_REFENCE 8
template <class T, int NWG, int BN, int S, int MODE>
DEV void fwd_wg(const u16* __restrict__ q, i64 ldq, const u16* __restrict__ k, i64 ldk, const u16* __restrict__ v,
                i64 ldv, const u32* __restrict__ docs, u16* __restrict__ o, i64 ldo, float* __restrict__ lse, int seqs,
                int L, int heads, int kvh, float scale_log2) {
    constexpr int D = 64, C = 8, BM = 64 * NWG, NT = 128 * NWG;
    __shared__ int s_lo;
    // 1024-byte aligned carve-up (the swizzle repeats every 1024 bytes; attention.rs adds the
    // slack): Q [BM][64], K [S][BN][64], V [S][BN][64], key documents [S][BN].
    const u32 raw = smem_addr(attn_smem);
    const u32 sQa = (raw + 1023u) & ~1023u;
    const u32 sKa = sQa + BM * D * 2, sVa = sKa + S * BN * D * 2, sKda = sVa + S * BN * D * 2;
    const u32* sKd = (const u32*)(attn_smem + (sKda - raw));

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gr = lane >> 2, t4 = lane & 3;
    const FwdBlock fb = fwd_block(L, heads, kvh, seqs, BM);
    const int seq = fb.seq, h = fb.h, m0 = fb.m0;
    const i64 tok0 = fb.tok0;
    const u16* qb = q + tok0 * ldq + (i64)h * D;
    const u16* kb = k + tok0 * ldk + (i64)fb.kg * D;
    const u16* vb = v + tok0 * ldv + (i64)fb.kg * D;
    const u32* db = docs ? docs + tok0 : nullptr;
    const int n_hi = (min(m0 + BM, L) - 1) / BN;

    // WG_PLAIN: ordinary 16-byte loads and shared stores (generic proxy) into buffer 0.
    auto plain_kv = [&](int n) {
        for (int idx = tid; idx < BN * C; idx += NT) {
            const int r = idx / C, c = idx % C;
            const bool ok = n * BN + r < L;
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
            const uint4 kv = ok ? *(const uint4*)(kb + (i64)(n * BN + r) * ldk + c * 8) : z;
            const uint4 vv = ok ? *(const uint4*)(vb + (i64)(n * BN + r) * ldv + c * 8) : z;
            *(uint4*)(attn_smem + (sKa - raw) + swz<C>(r, c) * 16) = kv;
            *(uint4*)(attn_smem + (sVa - raw) + swz<C>(r, c) * 16) = vv;
        }
        if (db) {
            for (int j = tid; j < BN; j += NT) ((u32*)sKd)[j] = n * BN + j < L ? db[n * BN + j] : 0u;
        }
    };
    auto load_kv = [&](int n, int buf) {
        load_tile<BN, C, NT>(sKa + buf * BN * D * 2, kb, ldk, n * BN, L, tid);
        load_tile<BN, C, NT>(sVa + buf * BN * D * 2, vb, ldv, n * BN, L, tid);
        if (db) {
            for (int j = tid; j < BN; j += NT) {
                const bool ok = n * BN + j < L;
                cp4(sKda + (buf * BN + j) * 4, ok ? db + n * BN + j : db, ok);
            }
        }
    };
    load_tile<BM, C, NT>(sQa, qb, ldq, m0, L, tid);
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (n_hi - st >= 0 && !(MODE & WG_PLAIN)) load_kv(n_hi - st, st);
        cp_commit();  // one group per stage, empty or not
    }

    const int w0 = m0 + warp * 16, wl = min(w0 + 16, L) - 1;
    int n_lo = 0;
    u32 rd0 = 0, rd1 = 0, dlast = 0;
    if (db) {
        if (tid == 0) s_lo = 0;
        __syncthreads();
        const u32 d0 = db[m0];
        for (int n = tid; n < n_hi; n += NT) {
            const int e = n * BN + BN - 1;
            if (e < m0 && db[e] != d0) atomicMax(&s_lo, n + 1);
        }
        rd0 = db[min(w0 + gr, L - 1)];
        rd1 = db[min(w0 + gr + 8, L - 1)];
        dlast = db[max(wl, 0)];
        __syncthreads();
        n_lo = s_lo;
    }

    cp_wait<S - 2>();  // Q (in the first group)
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int kd = 0; kd < D / 16; ++kd) ldsm4(qf[kd], sQa + swz<C>(warp * 16 + (lane & 15), 2 * kd + (lane >> 4)) * 16);

    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
    float mr0 = neg_inf(), mr1 = neg_inf(), lr0 = 0.f, lr1 = 0.f;

    // n_lo <= n_hi always (a row sees itself), and a do-while says so: with a path around the
    // loop, ptxas would find the final wait reachable without a wgmma and serialize them all.
    int n = n_hi;
    do {
        const int buf = (MODE & WG_PLAIN) ? 0 : (n_hi - n) % S;
        if (MODE & WG_PLAIN) {
            wg_wait<0>();
            reg_fence(acc);
            __syncthreads();  // every warpgroup is done with buffer 0
            plain_kv(n);
            fence_async_smem();
            __syncthreads();
        } else {
            cp_wait<S - 2>();  // this thread's part of tile n landed
            fence_async_smem();
            wg_wait<0>();  // this warpgroup's P V of tile n + 1 is done
            reg_fence(acc);
            __syncthreads();  // tile n visible to all; tile n + 1's buffer free
            if (MODE & WG_REFENCE) {
                fence_async_smem();
                __syncthreads();
            }
            if (n - (S - 1) >= n_lo) load_kv(n - (S - 1), (n_hi - n + S - 1) % S);
            cp_commit();
        }
        const int n0 = n * BN;
        const u32 kbase = sKa + buf * BN * D * 2, vbase = sVa + buf * BN * D * 2;

        float s[BN / 2];  // written by the first wgmma (scale-d 0: its old value is not read)
        wg_fence();
#pragma unroll
        for (int kd = 0; kd < D / 16; ++kd) Wgmma<T, BN, 0>::run(s, qf[kd], wg_desc(kbase + kd * 32), kd > 0);
        wg_commit();
        wg_wait<0>();
        reg_fence(s);

        // Masks as in fwd_tc (s[4 nt + e] is fwd_tc's s[nt][e]).
        const bool need_mask = (n0 + BN - 1 > w0) || (db && sKd[buf * BN] != dlast);
        if (need_mask) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const u32 kd0 = db ? sKd[buf * BN + nt * 8 + 2 * t4] : 0u;
                const u32 kd1 = db ? sKd[buf * BN + nt * 8 + 2 * t4 + 1] : 0u;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = n0 + nt * 8 + 2 * t4 + (e & 1);
                    const int r = w0 + gr + ((e >> 1) << 3);
                    const bool vis = (j <= r) & (((e & 1) ? kd1 : kd0) == ((e >> 1) ? rd1 : rd0));
                    s[4 * nt + e] = vis ? s[4 * nt + e] : neg_inf();
                }
            }
        }

        float rm0 = neg_inf(), rm1 = neg_inf();
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            rm0 = fmaxf(rm0, fmaxf(s[4 * nt], s[4 * nt + 1]));
            rm1 = fmaxf(rm1, fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
        }
        rm0 = fmaxf(rm0, __shfl_xor_sync(0xffffffffu, rm0, 1));
        rm0 = fmaxf(rm0, __shfl_xor_sync(0xffffffffu, rm0, 2));
        rm1 = fmaxf(rm1, __shfl_xor_sync(0xffffffffu, rm1, 1));
        rm1 = fmaxf(rm1, __shfl_xor_sync(0xffffffffu, rm1, 2));
        const float mn0 = fmaxf(mr0, rm0 * scale_log2), mn1 = fmaxf(mr1, rm1 * scale_log2);
        const float mu0 = mn0 == neg_inf() ? 0.f : mn0, mu1 = mn1 == neg_inf() ? 0.f : mn1;
        const float al0 = ex2(mr0 - mu0), al1 = ex2(mr1 - mu1);
        mr0 = mn0;
        mr1 = mn1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
            s[4 * nt] = ex2(__fmaf_rn(s[4 * nt], scale_log2, -mu0));
            s[4 * nt + 1] = ex2(__fmaf_rn(s[4 * nt + 1], scale_log2, -mu0));
            s[4 * nt + 2] = ex2(__fmaf_rn(s[4 * nt + 2], scale_log2, -mu1));
            s[4 * nt + 3] = ex2(__fmaf_rn(s[4 * nt + 3], scale_log2, -mu1));
            ps0 += s[4 * nt] + s[4 * nt + 1];
            ps1 += s[4 * nt + 2] + s[4 * nt + 3];
        }
        lr0 = __fmaf_rn(lr0, al0, ps0);
        lr1 = __fmaf_rn(lr1, al1, ps1);
        if (!(MODE & WG_FRESH)) {
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                acc[4 * dn] *= al0;
                acc[4 * dn + 1] *= al0;
                acc[4 * dn + 2] *= al1;
                acc[4 * dn + 3] *= al1;
            }
        }
        u32 p[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            p[kk][0] = Elem<T>::pack(s[8 * kk], s[8 * kk + 1]);
            p[kk][1] = Elem<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = Elem<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = Elem<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
        if (MODE & WG_FRESH) {
            float ot[D / 2];  // written by the first wgmma (scale-d 0)
            reg_fence(p);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, D, 1>::run(ot, p[kk], wg_desc(vbase + kk * 16 * D * 2), kk > 0);
            wg_commit();
            wg_wait<0>();
            reg_fence(ot);
            reg_fence(p);
#pragma unroll
            for (int dn = 0; dn < D / 8; ++dn) {
                acc[4 * dn] = __fmaf_rn(acc[4 * dn], al0, ot[4 * dn]);
                acc[4 * dn + 1] = __fmaf_rn(acc[4 * dn + 1], al0, ot[4 * dn + 1]);
                acc[4 * dn + 2] = __fmaf_rn(acc[4 * dn + 2], al1, ot[4 * dn + 2]);
                acc[4 * dn + 3] = __fmaf_rn(acc[4 * dn + 3], al1, ot[4 * dn + 3]);
            }
        } else {
            reg_fence(acc);
            reg_fence(p);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, D, 1>::run(acc, p[kk], wg_desc(vbase + kk * 16 * D * 2), 1);
            wg_commit();
            if (MODE & WG_SYNC_PV) {
                wg_wait<0>();
                reg_fence(acc);
                reg_fence(p);
            }
        }
    } while (--n >= n_lo);
    wg_wait<0>();
    reg_fence(acc);

    u16* ob = o + tok0 * ldo + (i64)h * D;
    float l0 = lr0, l1 = lr1;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    const int r0 = w0 + gr;
    if (r0 < L) {
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn)
            *(u32*)(ob + (i64)r0 * ldo + dn * 8 + 2 * t4) = Elem<T>::pack(acc[4 * dn] * inv0, acc[4 * dn + 1] * inv0);
        if (t4 == 0) lse[(tok0 + r0) * heads + h] = (mr0 + log2f(l0)) * LN2;
    }
    if (r0 + 8 < L) {
#pragma unroll
        for (int dn = 0; dn < D / 8; ++dn)
            *(u32*)(ob + (i64)(r0 + 8) * ldo + dn * 8 + 2 * t4) =
                Elem<T>::pack(acc[4 * dn + 2] * inv1, acc[4 * dn + 3] * inv1);
        if (t4 == 0) lse[(tok0 + r0 + 8) * heads + h] = (mr1 + log2f(l1)) * LN2;
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

#endif  // __CUDA_ARCH__ >= 800

// ---------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------

#define FWD_ARGS                                                                                                  \
    const u16 *q, i64 ldq, const u16 *k, i64 ldk, const u16 *v, i64 ldv, const u32 *docs, u16 *o, i64 ldo, float *lse, \
        int seqs, int L, int heads, int kvh, float scale
#define FWD_PASS q, ldq, k, ldk, v, ldv, docs, o, ldo, lse, seqs, L, heads, kvh

#if __CUDA_ARCH__ >= 800
#define TC_BODY(x) x
#else
#define TC_BODY(x)
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_BODY(x) x
#else
#define WG_BODY(x)
#endif

// Names carry the tiling: forward `m<BM>_w<NW>_n<BN>` (query rows per CTA, warps, keys per
// tile), backward `m<BM>_n<BN>_w<NW>` (query rows per tile, keys per CTA, warps). The
// instantiations below also fix what the names do not: the minimum of CTAs per SM the
// registers are budgeted for (MB; 0 sets none: the compiler then uses at most 255 registers
// but, unlike with an explicit 1, only as many as it needs), and WR, how many warps
// split dQ's rows.
#define FWD_TC(dt, T, D, BM, NW, BN, MB)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * NW, MB)                                             \
        attn_fwd_tc_##dt##_d##D##_m##BM##_w##NW##_n##BN(FWD_ARGS) {                                       \
        TC_BODY((fwd_tc<T, D, NW, BN, BM / (16 * NW)>(FWD_PASS, scale * LOG2E)));                         \
    }

// The wgmma forward (head_dim 64, sm_90a): `g<warpgroups>_n<BN>`, BM = 64 rows per
// warpgroup; a 2-stage cp.async ring; MB as above.
#define FWD_WG(dt, T, NWG, BN, MODE, MB)                                                                  \
    extern "C" __global__ void __launch_bounds__(128 * NWG, MB)                                           \
        attn_fwd_wg_##dt##_d64_g##NWG##_n##BN(FWD_ARGS) {                                                 \
        WG_BODY((fwd_wg<T, NWG, BN, 2, MODE>(FWD_PASS, scale * LOG2E)));                                  \
    }

#define BWD_ARGS                                                                                                   \
    const u16 *q, i64 ldq, const u16 *k, i64 ldk, const u16 *v, i64 ldv, const u32 *docs, const u16 *dout, i64 lddo, \
        const float *ws_lse2, const float *ws_d, float *dq_acc, u16 *dk, i64 lddk, u16 *dv, i64 lddv, int seqs, int L, \
        int heads, int kvh, float scale

#define BWD_TC(dt, T, D, BM, BN, NW, WR, MB)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW, MB)                                              \
        attn_bwd_tc_##dt##_d##D##_m##BM##_n##BN##_w##NW(BWD_ARGS) {                                        \
        TC_BODY((bwd_tc<T, D, BM, NW, BN / (16 * NW), WR>(q, ldq, k, ldk, v, ldv, docs, dout, lddo, ws_lse2, ws_d, \
                                                          dq_acc, dk, lddk, dv, lddv, seqs, L, heads, kvh, scale, \
                                                          scale * LOG2E)));                                \
    }

#define PER_DTYPE_DIM(dt, T, D)                                                                                     \
    extern "C" __global__ void attn_fwd_simple_##dt##_d##D(FWD_ARGS) { fwd_simple<T, D>(FWD_PASS, scale); }        \
    extern "C" __global__ void attn_bwd_pre_##dt##_d##D(const u16* o, i64 ldo, const u16* dout, i64 lddo,          \
                                                        const float* lse, float* ws_lse2, float* ws_d,              \
                                                        float* dq_acc, int tokens, int heads, int zero_dq) {        \
        bwd_pre<T, D>(o, ldo, dout, lddo, lse, ws_lse2, ws_d, dq_acc, tokens, heads, zero_dq);                      \
    }                                                                                                               \
    extern "C" __global__ void attn_bwd_cast_##dt##_d##D(const float* dq_acc, u16* dq, i64 lddq, int tokens,       \
                                                         int heads, float scale) {                                 \
        bwd_cast<T, D>(dq_acc, dq, lddq, tokens, heads, scale);                                                     \
    }                                                                                                               \
    extern "C" __global__ void attn_bwd_dq_simple_##dt##_d##D(                                                      \
        const u16* q, i64 ldq, const u16* k, i64 ldk, const u16* v, i64 ldv, const u32* docs, const u16* dout,      \
        i64 lddo, const float* lse, const float* ws_d, u16* dq, i64 lddq, int seqs, int L, int heads, int kvh,      \
        float scale) {                                                                                              \
        bwd_dq_simple<T, D>(q, ldq, k, ldk, v, ldv, docs, dout, lddo, lse, ws_d, dq, lddq, seqs, L, heads, kvh,     \
                            scale);                                                                                 \
    }                                                                                                               \
    extern "C" __global__ void attn_bwd_dkdv_simple_##dt##_d##D(                                                    \
        const u16* q, i64 ldq, const u16* k, i64 ldk, const u16* v, i64 ldv, const u32* docs, const u16* dout,      \
        i64 lddo, const float* lse, const float* ws_d, u16* dk, i64 lddk, u16* dv, i64 lddv, int seqs, int L,       \
        int heads, int kvh, float scale) {                                                                          \
        bwd_dkdv_simple<T, D>(q, ldq, k, ldk, v, ldv, docs, dout, lddo, lse, ws_d, dk, lddk, dv, lddv, seqs, L,     \
                              heads, kvh, scale);                                                                   \
    }

PER_DTYPE_DIM(bf16, Bf16, 64)
PER_DTYPE_DIM(bf16, Bf16, 128)
PER_DTYPE_DIM(f16, F16, 64)
PER_DTYPE_DIM(f16, F16, 128)

// The tilings of Tiling::available (attention.rs), each for both dtypes.
#define TILINGS(dt, T)                   \
    FWD_WG(dt, T, 1, 128, WG_PLAIN | WG_SYNC_PV, 0)   \
    FWD_WG(dt, T, 2, 128, WG_FRESH, 0)                \
    FWD_TC(dt, T, 64, 64, 4, 64, 0)      \
    FWD_TC(dt, T, 64, 128, 4, 32, 3)     \
    FWD_TC(dt, T, 64, 128, 4, 64, 0)     \
    FWD_TC(dt, T, 64, 64, 2, 64, 0)      \
    FWD_TC(dt, T, 128, 64, 4, 64, 0)     \
    FWD_TC(dt, T, 128, 128, 8, 64, 0)    \
    BWD_TC(dt, T, 64, 64, 64, 4, 2, 0)   \
    BWD_TC(dt, T, 64, 32, 64, 4, 2, 0)   \
    BWD_TC(dt, T, 64, 32, 128, 4, 1, 0)  \
    BWD_TC(dt, T, 64, 64, 128, 8, 2, 0)  \
    BWD_TC(dt, T, 128, 32, 64, 4, 1, 0)  \
    BWD_TC(dt, T, 128, 32, 128, 8, 1, 0)

TILINGS(bf16, Bf16)
TILINGS(f16, F16)
