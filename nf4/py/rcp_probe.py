"""Extract the GPU's approximate reciprocal (`rcp.approx.ftz.f32`, MUFU.RCP) exactly.

bitsandbytes is built with --use_fast_math, so its quantizer's `1.0f / absmax` is the
hardware's approximate reciprocal, which differs from the correctly rounded one by an ulp
for some inputs; an element whose normalised value lands on a code threshold then gets a
different code. To quantize bit-identically on the CPU we need that function exactly.
For normal inputs it depends only on the mantissa (the exponent just shifts the result),
so we record, for each of the 2^23 mantissas, where it differs from round-to-nearest.

Writes argv[1]/rcp_table.npz: `mantissa` (u32, sorted) and `delta` (i8, ulps) for every
mantissa whose approximate reciprocal differs from the correctly rounded one, and
argv[1]/rcp_sm90.bin.z, the form nf4/src/rcp.rs embeds: 2 bits per mantissa (0 same,
1 one ulp up, 2 one ulp down), four per byte from the low bits, zlib-compressed. Checks the
exponent claim on random inputs, and prints a summary.
"""
import sys

import cupy as cp
import numpy as np

src = r"""
extern "C" __global__ void rcp(const unsigned* in, unsigned* out, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float x = __uint_as_float(in[i]), r;
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
        out[i] = __float_as_uint(r);
    }
}
"""
k = cp.RawKernel(src, "rcp")


def gpu_rcp(bits):
    bits = cp.asarray(bits, dtype=cp.uint32)
    out = cp.empty_like(bits)
    n = bits.size
    k(((n + 255) // 256,), (256,), (bits, out, cp.int64(n)))
    return cp.asnumpy(out)


m = np.arange(1 << 23, dtype=np.uint32)
x_bits = m | np.uint32(127 << 23)  # [1, 2)
approx = gpu_rcp(x_bits)
exact = (np.float32(1.0) / x_bits.view(np.float32)).view(np.uint32)
delta = approx.astype(np.int64) - exact.astype(np.int64)
nz = np.nonzero(delta)[0]
print(f"rcp.approx differs from round-to-nearest for {nz.size} of {1 << 23} mantissas; "
      f"deltas {np.unique(delta[nz], return_counts=True)}")

# Exponent independence on random normal inputs whose reciprocal is normal.
rng = np.random.default_rng(1)
e = rng.integers(1, 253, size=4_000_000, dtype=np.uint32)
mm = rng.integers(0, 1 << 23, size=e.size, dtype=np.uint32)
bits = (e << 23) | mm
r = gpu_rcp(bits)
r_model = approx[mm].astype(np.int64) + ((127 - e.astype(np.int64)) << 23) - ((127 - 127) << 23)
# approx[mm] is the reciprocal of 1.m (exponent 127 - 0 or 126); shifting by (127 - e) exponents
r_model = (approx[mm].astype(np.int64) + ((127 - e.astype(np.int64)) << 23)).astype(np.uint32)
ok = r == r_model
normal = ((r >> 23) & 0xFF) > 0
print(f"exponent shift model holds for {ok[normal].mean() * 100:.6f}% of {normal.sum()} normal results")
codes = np.zeros(1 << 23, np.uint8)
codes[nz[delta[nz] > 0]] = 1
codes[nz[delta[nz] < 0]] = 2
packed = codes[0::4] | (codes[1::4] << 2) | (codes[2::4] << 4) | (codes[3::4] << 6)
import zlib
with open(f"{sys.argv[1]}/rcp_sm90.bin.z", "wb") as f:
    f.write(zlib.compress(packed.astype(np.uint8).tobytes(), 9))
np.savez_compressed(f"{sys.argv[1]}/rcp_table.npz", mantissa=nz.astype(np.uint32), delta=delta[nz].astype(np.int8))
