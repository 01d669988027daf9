// nf4/src/dequant.cu: 4-bit (NF4/FP4) blockwise dequantization, one launch per tensor.
//
// Computes, for every element i of a tensor of n elements:
//   absmax_b = nested ? (code2[q[b]] * absmax2[b >> log2_bs2]) + offset   (two f32 roundings)
//                     : absmax[b],                  with b = i >> log2_bs
//   out[i]   = round_to_out_type(code[nibble(i)] * absmax_b)              (one f32 multiply)
// where byte j of `packed` holds element 2j in its high nibble and 2j+1 in its low nibble.
// This is exactly what bitsandbytes computes with three launches (8-bit dequant of the
// absmax, `+= offset`, 4-bit dequant); here the nested absmax is decoded in registers.
// bitsandbytes is built with --use_fast_math, so its multiplies flush denormals to zero
// (mul.rn.ftz); the offset is added by PyTorch, without flushing. We write those exact PTX
// instructions (mul_ftz, add_rn) so the result does not depend on compiler flags, and
// compile with --fmad=false so nothing fuses.
//
// Bytes per element (bf16 out, blocksize 64, nested): 0.5 packed + 1/64 absmax codes
// + 4/16384 absmax2 + 2 output = 2.516 B; FLOPs are negligible, so the floor is
// bytes / copy bandwidth (3020 GB/s measured on the H100): 8192x8192 -> 55.9 us.
//
// Work split: a "unit" is 8 consecutive elements = 4 packed bytes = one 32-bit load and,
// for 16-bit outputs, one 16-byte store. Lane l of a warp handles units
// base + k*32 + l for k < UNITS, so every load and store instruction of a warp touches
// one contiguous span (coalesced), and UNITS loads are in flight before the first use.
// A unit never straddles an absmax block (blocksize >= 32 is a multiple of 8).
// The tail (a partial last unit), misaligned pointers and the legacy transposed layout take
// a scalar path with the same arithmetic. Indices are 64-bit: n may exceed 2^31.
//
// Half and bf16 are raw 16-bit values: no cuda_fp16.h (NVRTC in CUDA 13 cannot find it
// without include paths). On sm_80+ pairs are converted with one cvt.rn.{bf16x2,f16x2}.f32;
// sm_75 (no bf16 hardware) rounds in integer arithmetic, with the same result.
// The built-in code tables (NF4_BITS, FP4_BITS, DYN_BITS) come from a prelude the host
// code prepends, generated from the Rust constants: one source of truth. They live in
// global memory (not __constant__, which serializes when a warp reads different entries)
// and are copied to shared memory once per block; the grid is persistent (a few blocks
// per SM, grid-stride over tiles) so that copy is paid once per block, not once per tile.
//
// History (H100, 8192x8192 bf16 nested, floor 56 us; bench/RESULTS.md has the sweep):
// v1 one tile per block, __constant__ tables, integer bf16 rounding, UNITS=4: 90.7 us (62%).
// v2 persistent grid, global tables, cvt.rn.bf16x2, UNITS=8: 76.0 us (74%).
// v3 occupancy-sized grid, nested/plain as separate kernels, tail split from the vector
//    loop (48 registers, no spills): 71.0 us (79%); UNITS=4 with 8 blocks/SM: 68.0 (83%).
// v4 work dealt per warp instead of per block (finer last wave), UNITS=4, evict-first
//    stores, compiler's register choice (40, 6 blocks/SM): 66.4 us (84%) in the sweep's
//    per-call timing, 63.2 us (89%) from a CUDA graph. Tried and kept only as sweep
//    variants: 16-byte lane-contiguous loads (LAYOUT 1: uncoalesced stores, 47%), 16-byte
//    loads with shuffled stores (LAYOUT 2: same as 0), equal per-warp shares (LAYOUT 3:
//    3-5% slower on an H200), 32-register caps (spills, slower on large tensors).
// A kernel with this exact traffic and no decoding reaches 83% of copy bandwidth in the
// same per-call timing: the decode is hidden; what is left is the 1:4 read:write mix.

#ifndef UNITS
#define UNITS 8
#endif
#ifndef MIN_BLOCKS  // __launch_bounds__ min blocks per SM (caps registers); 0 = let ptxas choose
#define MIN_BLOCKS 0
#endif
#ifndef LAYOUT  // 0: lanes interleave 4-byte loads; 1: a lane owns 32 elements (16-byte load,
                 //    4 consecutive stores); 2: 16-byte loads, units exchanged by warp shuffles
                 //    so that stores stay coalesced; 3: as 0, but each warp owns one contiguous,
                 //    equal share of the units (no partly filled last round across the grid)
#define LAYOUT 0
#endif
#ifndef STREAM_STORES  // 1: st.global.cs (evict-first) for the output, which nobody re-reads soon
#define STREAM_STORES 0
#endif
#define THREADS 256

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ unsigned short to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Round to nearest even; NaN -> 0x7fff, as __float2bfloat16_rn / cvt.rn.bf16.f32.
__device__ __forceinline__ unsigned short to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

template <int OUT> __device__ __forceinline__ unsigned short to16(float f) {
    return OUT == 1 ? to_f16(f) : to_bf16(f);
}

// Two floats -> one 32-bit word of two 16-bit values, `lo` in the low half.
template <int OUT> __device__ __forceinline__ u32 pack2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    if (OUT == 1) asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u32)to16<OUT>(lo) | ((u32)to16<OUT>(hi) << 16);
#endif
}

// OUT: 0 = f32, 1 = f16, 2 = bf16.
template <int OUT> __device__ __forceinline__ void store_one(void* out, u64 i, float v) {
    if (OUT == 0) ((float*)out)[i] = v;
    else ((unsigned short*)out)[i] = to16<OUT>(v);
}

template <int OUT> __device__ __forceinline__ void store_unit(void* out, u64 unit, const float* v) {
    if (OUT == 0) {
        float4* p = (float4*)out + 2 * unit;
        p[0] = make_float4(v[0], v[1], v[2], v[3]);
        p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        uint4 w;
        w.x = pack2<OUT>(v[0], v[1]);
        w.y = pack2<OUT>(v[2], v[3]);
        w.z = pack2<OUT>(v[4], v[5]);
        w.w = pack2<OUT>(v[6], v[7]);
#if STREAM_STORES
        uint4* p = (uint4*)out + unit;
        asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w) : "memory");
#else
        ((uint4*)out)[unit] = w;
#endif
    }
}

// The absmax of block b: nested (8-bit code, one f32 scale per 2^log2_bs2 blocks, offset)
// or plain f32.
template <bool NESTED>
__device__ __forceinline__ float block_absmax(const void* __restrict__ absmax, const float* __restrict__ absmax2,
                                              const float* s_code2, float offset, u64 b, u32 log2_bs2) {
    if (NESTED) {
        const u32 q = __ldg((const u8*)absmax + b);
        return add_rn(mul_ftz(s_code2[q], __ldg(absmax2 + (b >> log2_bs2))), offset);
    }
    return __ldg((const float*)absmax + b);
}

// Strided output (the `_rows` entries): element e of the flat tensor goes to
// (e / cols) * ld + e % cols, i.e. rows of `cols` elements written with row stride `ld`
// (a matrix embedded in a wider one). For units: cols and ld in units of 8 elements
// (the vector path runs only when both are multiples of 8). Contiguous entries pass
// STRIDED = false and compile to what they were before.
struct OutMap {
    u64 cols;  // elements (scalar path) or units (vector path) per row
    u64 ld;
};

template <bool STRIDED> __device__ __forceinline__ u64 map_out(u64 i, OutMap m) {
    if (!STRIDED) return i;
    // 32-bit division when the index fits (always, below 2^32 units = 32 G elements).
    const u64 row = (i >> 32) == 0 && (m.cols >> 32) == 0 ? (u64)((u32)i / (u32)m.cols) : i / m.cols;
    return row * m.ld + (i - row * m.cols);
}

// Decodes one unit (8 elements, packed in `word`) with block absmax `a` and stores it.
template <int OUT>
__device__ __forceinline__ void decode_store(void* __restrict__ out, u64 u, u32 word, float a, const float* s_code) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const u32 byte = (word >> (8 * j)) & 0xffu;
        v[2 * j] = mul_ftz(s_code[byte >> 4], a);
        v[2 * j + 1] = mul_ftz(s_code[byte & 0xfu], a);
    }
    store_unit<OUT>(out, u, v);
}

// One round of a lane: units base + k*32 (k < UNITS) below `limit`. All loads are issued
// before the first use, so UNITS of them are in flight.
template <int OUT, bool NESTED, bool STRIDED = false>
__device__ __forceinline__ void unit_round(const u8* __restrict__ packed, const void* __restrict__ absmax,
                                           const float* __restrict__ absmax2, const float* s_code2, const float* s_code,
                                           float offset, u32 log2_bs, u32 log2_bs2, u64 base, u64 limit,
                                           void* __restrict__ out, OutMap m = OutMap{0, 0}) {
    u32 w[UNITS];
    float am[UNITS];
#pragma unroll
    for (int k = 0; k < UNITS; k++) {
        const u64 u = base + (u64)k * 32;
        w[k] = u < limit ? __ldg((const u32*)packed + u) : 0u;
    }
#pragma unroll
    for (int k = 0; k < UNITS; k++) {
        const u64 u = base + (u64)k * 32;
        am[k] = u < limit ? block_absmax<NESTED>(absmax, absmax2, s_code2, offset, (u << 3) >> log2_bs, log2_bs2) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < UNITS; k++) {
        const u64 u = base + (u64)k * 32;
        if (u < limit) decode_store<OUT>(out, map_out<STRIDED>(u, m), w[k], am[k], s_code);
    }
}

template <int OUT, bool NESTED, bool STRIDED = false>
__device__ __forceinline__ void dequant(
    const u8* __restrict__ packed, const void* __restrict__ absmax, const float* __restrict__ absmax2,
    const float* __restrict__ code2, float offset, const float* __restrict__ code, int qtype, u64 n,
    u32 log2_bs, u32 log2_bs2, u64 rows_t, u64 cols_t, int aligned, void* __restrict__ out,
    u64 out_cols = 0, u64 out_ld = 0) {
    __shared__ float s_code[16];
    __shared__ float s_code2[NESTED ? 256 : 1];
    for (int i = threadIdx.x; i < 16; i += THREADS)
        s_code[i] = code ? code[i] : __uint_as_float(qtype == 0 ? NF4_BITS[i] : FP4_BITS[i]);
    if (NESTED)
        for (int i = threadIdx.x; i < 256; i += THREADS)
            s_code2[i] = code2 ? code2[i] : __uint_as_float(DYN_BITS[i]);
    __syncthreads();

    const u64 nunits = (n + 7) >> 3;
    // Units that take the vector path (LAYOUT 1/2 work in chunks of 4 units = 16 packed bytes).
    const u64 full_units = aligned ? ((LAYOUT == 0 || LAYOUT == 3) ? (n >> 3) : ((n >> 5) << 2)) : 0;
#if LAYOUT == 3
    {
        const u32 lane = threadIdx.x & 31;
        const u64 n_warps = (u64)gridDim.x * (THREADS / 32);
        const u64 warp = (u64)blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5);
        const u64 share = ((full_units + n_warps - 1) / n_warps + 31) & ~31ull;  // multiple of 32 units
        const u64 begin = warp * share;
        const u64 end = min(begin + share, full_units);
        for (u64 base = begin + lane; base < end; base += 32ull * UNITS)
            unit_round<OUT, NESTED>(packed, absmax, absmax2, s_code2, s_code, offset, log2_bs, log2_bs2, base, end, out);
    }
#elif LAYOUT == 0

    // Vector path: whole units, 32-bit loads, 16-byte stores, UNITS loads in flight.
    // Work is dealt out per warp (tiles of 32 * UNITS units, grid-striding over warps), a
    // finer grain than per block, so the last wave leaves few SMs idle on small tensors.
    const u32 lane = threadIdx.x & 31;
    const u64 warp_tile = 32ull * UNITS;
    const u64 n_warps = (u64)gridDim.x * (THREADS / 32);
    for (u64 base = ((u64)blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5)) * warp_tile + lane; base < full_units;
         base += n_warps * warp_tile)
        unit_round<OUT, NESTED, STRIDED>(packed, absmax, absmax2, s_code2, s_code, offset, log2_bs, log2_bs2, base, full_units,
                                         out, OutMap{out_cols >> 3, out_ld >> 3});

#else
    // LAYOUT 1/2: lane-contiguous 16-byte loads; one absmax per chunk (32 elements never
    // straddle a block: blocksize >= 32 and chunks are aligned).
    const u32 lane = threadIdx.x & 31;
    const u64 full_chunks = full_units >> 2;
    const u64 n_warps = (u64)gridDim.x * (THREADS / 32);
    for (u64 wbase = ((u64)blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5)) * 32; wbase < full_chunks; wbase += n_warps * 32) {
        const u64 c = wbase + lane;
        const uint4 q = c < full_chunks ? __ldg((const uint4*)packed + c) : make_uint4(0, 0, 0, 0);
#if LAYOUT == 2
        if (wbase + 32 <= full_chunks) {  // warp-uniform: every lane has a chunk
#pragma unroll
            for (int k = 0; k < 4; k++) {
                // Store k of this lane writes unit U = 4*wbase + 32k + lane, whose packed word
                // is word (lane % 4) of chunk wbase + 8k + lane / 4.
                const int src = 8 * k + (lane >> 2);
                const u32 t0 = __shfl_sync(0xffffffffu, q.x, src), t1 = __shfl_sync(0xffffffffu, q.y, src);
                const u32 t2 = __shfl_sync(0xffffffffu, q.z, src), t3 = __shfl_sync(0xffffffffu, q.w, src);
                const u32 sel = lane & 3;
                const u32 word = sel == 0 ? t0 : sel == 1 ? t1 : sel == 2 ? t2 : t3;
                const u64 u = 4 * wbase + 32 * k + lane;
                const float a = block_absmax<NESTED>(absmax, absmax2, s_code2, offset, (u << 3) >> log2_bs, log2_bs2);
                decode_store<OUT>(out, u, word, a, s_code);
            }
            continue;
        }
#endif
        if (c < full_chunks) {
            const float a = block_absmax<NESTED>(absmax, absmax2, s_code2, offset, (c << 5) >> log2_bs, log2_bs2);
            const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int k = 0; k < 4; k++) decode_store<OUT>(out, 4 * c + k, words[k], a, s_code);
        }
    }
#endif

    // Scalar path: the tail, misaligned pointers, the legacy transposed layout.
    for (u64 u = full_units + (u64)blockIdx.x * THREADS + threadIdx.x; u < nunits; u += (u64)gridDim.x * THREADS) {
        const float a = block_absmax<NESTED>(absmax, absmax2, s_code2, offset, (u << 3) >> log2_bs, log2_bs2);
        const u64 end = min((u + 1) << 3, n);
        for (u64 e = u << 3; e < end; e++) {
            const u32 byte = packed[e >> 1];
            const u32 nib = (e & 1) ? (byte & 0xfu) : (byte >> 4);
            const float v = mul_ftz(s_code[nib], a);
            const u64 dst = rows_t ? (e % cols_t) * rows_t + e / cols_t : map_out<STRIDED>(e, OutMap{out_cols, out_ld});
            store_one<OUT>(out, dst, v);
        }
    }
}

#if MIN_BLOCKS > 0
#define BOUNDS __launch_bounds__(THREADS, MIN_BLOCKS)
#else
#define BOUNDS __launch_bounds__(THREADS)
#endif

#define ENTRY(NAME, OUT, NESTED)                                                                      \
    extern "C" __global__ void BOUNDS NAME(                                      \
        const u8* __restrict__ packed, const void* __restrict__ absmax, const float* __restrict__ absmax2, \
        const float* __restrict__ code2, float offset, const float* __restrict__ code, int qtype, u64 n,  \
        u32 log2_bs, u32 log2_bs2, u64 rows_t, u64 cols_t, int aligned, void* __restrict__ out) {     \
        dequant<OUT, NESTED>(packed, absmax, absmax2, code2, offset, code, qtype, n, log2_bs, log2_bs2, \
                             rows_t, cols_t, aligned, out);                                           \
    }

ENTRY(nf4_dequant_f32, 0, false)
ENTRY(nf4_dequant_f16, 1, false)
ENTRY(nf4_dequant_bf16, 2, false)
ENTRY(nf4_dequant_nested_f32, 0, true)
ENTRY(nf4_dequant_nested_f16, 1, true)
ENTRY(nf4_dequant_nested_bf16, 2, true)

// Strided output: rows of `out_cols` elements with row stride `out_ld` (see map_out).
// The vector path needs out_cols and out_ld multiples of 8 (the host clears `aligned`
// otherwise) and LAYOUT 0 (the default; other layouts ignore the stride: the host refuses).
#define ENTRY_ROWS(NAME, OUT, NESTED)                                                                 \
    extern "C" __global__ void BOUNDS NAME(                                                         \
        const u8* __restrict__ packed, const void* __restrict__ absmax, const float* __restrict__ absmax2, \
        const float* __restrict__ code2, float offset, const float* __restrict__ code, int qtype, u64 n,  \
        u32 log2_bs, u32 log2_bs2, int aligned, void* __restrict__ out, u64 out_cols, u64 out_ld) {   \
        dequant<OUT, NESTED, true>(packed, absmax, absmax2, code2, offset, code, qtype, n, log2_bs,     \
                                   log2_bs2, 0, 1, aligned, out, out_cols, out_ld);                    \
    }

ENTRY_ROWS(nf4_dequant_rows_f32, 0, false)
ENTRY_ROWS(nf4_dequant_rows_f16, 1, false)
ENTRY_ROWS(nf4_dequant_rows_bf16, 2, false)
ENTRY_ROWS(nf4_dequant_rows_nested_f32, 0, true)
ENTRY_ROWS(nf4_dequant_rows_nested_f16, 1, true)
ENTRY_ROWS(nf4_dequant_rows_nested_bf16, 2, true)
