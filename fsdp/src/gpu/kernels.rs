//! Element-wise and row kernels (`kernels.cu`): embedding, RMSNorm, RoPE, SwiGLU, casts,
//! the global gradient norm, the clip factor and AdamW. Each matches its CPU reference in
//! [`crate::ops`] / [`crate::optim`] (`tests/gpu_kernels.rs` checks every one).
//!
//! | launcher | computes | reference | exactness |
//! |---|---|---|---|
//! | [`embedding_forward`] | `out[t] = table[ids[t]]` (f32 out) | [`crate::ops::embedding_forward`] | exact |
//! | [`rms_norm_forward`] | `y = w * (x * rstd)`, saves `rstd` | [`crate::ops::rms_norm_forward`] | f32 sum vs the CPU's f64: y within 1 ulp of the 16-bit output |
//! | [`rms_norm_backward`] ([`rms_norm_backward_cast`]: also `dx` rounded to 16-bit, fused) | `dx (+)= rstd * (g - xhat * mean(g * xhat))`, `g = dy * w` | [`crate::ops::rms_norm_backward`] (`dw = None`) | f32 vs f64: a few f32 ulps of the terms |
//! | [`rope_forward`], [`rope_backward`] | rotate-half rotation by `±angle`, in place | [`crate::ops::rope_forward`] | bit-exact (same f32 operations, then one rounding) |
//! | [`swiglu_forward`], [`swiglu_backward`] | `silu(gate) * up` and its gradients | [`crate::ops::swiglu_forward`] | `expf` vs Rust's `exp`: within 1 ulp of the 16-bit output |
//! | [`cast`] | f32 / f16 / bf16 to any of them, round to nearest even | `half`'s `from_f32` | exact |
//! | [`sum_squares`], [`clip_factor`] | `acc += sum x^2` (f64), the clip factor | [`crate::optim::grad_norm`], [`crate::optim::clip_grad_norm`] | f64 summation order only |
//! | [`adamw_step`] | one AdamW update | [`crate::optim::AdamW::step`] | bit-exact |
//!
//! # Memory traffic and floors
//!
//! All of these are memory-bound. Bytes per element (read + written), the floor at the
//! H100's ~3000 GB/s copy bandwidth on the runtime's shapes (Llama-3.2-1B, 8192 tokens:
//! hidden 2048, intermediate 8192, 32 + 2 x 8 heads of 64 in a fused `q|k|v` of width
//! 3072), bf16 compute dtype, and the median measured by `examples/bench_kernels.rs` on an
//! H100 80GB HBM3 (2026-11-26; a device-to-device copy measured 2961 GB/s in the same run):
//!
//! | kernel | bytes / element | shape | MB | floor | H100 | of floor |
//! |---|---|---|---|---|---|---|
//! | embedding (bf16 table -> f32) | 2 + 4 | 8192 x 2048 | 100.7 | 33.6 us | 40.4 us | 83% |
//! | RMSNorm forward, x f32 -> y bf16 | 4 + 2 | 8192 x 2048 | 100.7 | 33.6 us | 38.9 us | 86% |
//! | RMSNorm forward, x bf16 | 2 + 2 | 8192 x 2048 | 67.1 | 22.4 us | 29.5 us | 76% |
//! | RMSNorm backward, dy f32, x bf16, dx f32 accumulated | 4 + 2 + 4 + 4 | 8192 x 2048 | 234.9 | 78.3 us | 82.3 us | 95% |
//! | RMSNorm backward, dy bf16, x bf16, dx f32 overwritten | 2 + 2 + 4 | 8192 x 2048 | 134.3 | 44.8 us | 50.3 us | 89% |
//! | RoPE on q, in place (+ cos/sin, 8 B per pair and row) | 2 + 2 | 8192 x 32 x 64 | 69.2 | 23.1 us | 28.5 us | 81% |
//! | RoPE on k, in place | 2 + 2 | 8192 x 8 x 64 | 18.9 | 6.3 us | 8.0 us | 79% |
//! | SwiGLU forward | 2 + 2 + 2 | 8192 x 8192 | 402.7 | 134.2 us | 134.8 us | 100% |
//! | SwiGLU backward | 3 x 2 + 2 x 2 | 8192 x 8192 | 671.1 | 223.7 us | 223.2 us | 100% |
//! | cast f32 -> bf16 | 4 + 2 | 8192 x 8192 | 402.7 | 134.2 us | 135.6 us | 99% |
//! | cast bf16 -> f32 | 2 + 4 | 8192 x 8192 | 402.7 | 134.2 us | 144.6 us | 93% |
//! | cast f32 -> bf16 | 4 + 2 | 8192 x 2048 | 100.7 | 33.6 us | 37.6 us | 89% |
//! | sum of squares | 4 | 2^24 | 67.1 | 22.4 us | 26.7 us | 84% |
//! | AdamW (p, g, m, v read; p, m, v written) | 16 + 12 | 2^24 | 469.8 | 156.6 us | 171.0 us | 92% |
//!
//! The weight vectors of RMSNorm (one row, re-read by every row) and the ids stay in L1/L2
//! and are not counted. The short kernels (~20-40 us) lose a few microseconds to launch and
//! the last partial wave; the large ones run at copy speed.
//!
//! # Design
//!
//! - **Element-wise kernels** (embedding, RoPE, SwiGLU, cast) give each thread one item of
//!   8 consecutive elements of a row: one 16-byte load per 16-bit operand (two for f32).
//!   Each kernel is built twice: a vector build, used when every operand's base address
//!   and row stride are 16-byte aligned (the last, partial item of a row still takes the
//!   scalar path, so widths need not be multiples of 8), and a scalar build for anything
//!   else. Grids are one thread per item.
//! - **RMSNorm** runs one block per row (32..256 threads, about two items per thread); a
//!   thread keeps up to 4 items of `x` (and of `dy` in the backward) in registers between
//!   the reduction and the output pass, so rows of up to 8192 elements are read from
//!   memory once. Items are kept as loaded (4 registers per bf16 item rather than 8
//!   floats): on the H100 that took the backward from 88% to 95% of its floor (dy f32) and
//!   from 79% to 89% (dy bf16), and the bf16 forward from 73% to 76% (registers now 32-74
//!   per thread, 6-16 blocks of 128 per SM). The row sum is a fixed-order tree
//!   (deterministic).
//! - **AdamW and the norm** stride over a grid of the blocks that fit on the device at once,
//!   4 elements per 16-byte load when the pointers allow. The norm is accumulated in f64
//!   (each square is exact) with one `atomicAdd` per block: its last bits depend on the
//!   order blocks finish in (relative ~1e-16), nothing else does.
//! - Arithmetic is f32, written in the reference's order; the source is compiled with
//!   `--fmad=false` and the exact kernels spell their roundings (`__fmul_rn`, ...).
//!
//! # Arguments
//!
//! Pointers are device addresses (`u64`), strides (`ld*`) are in elements. Every launcher
//! checks what it can without the buffers' sizes and returns
//! [`GpuError::InvalidArgument`] naming the argument: a dtype it does not take, a null or
//! misaligned pointer (to its element size), a stride smaller than the width, an odd
//! `head_dim`, a non-finite or negative `eps`, sizes beyond the kernels' 32-bit widths.
//! A zero size is a successful no-op (checked after the dtypes, before the pointers).
#![allow(clippy::too_many_arguments)] // launchers mirror the kernels' flat argument lists

use std::ffi::c_void;
use std::sync::OnceLock;

use cudakit::cudarc::driver::sys::CUstream;
use cudakit::kernel::{self, KernelSource};

use super::{Dtype, GpuError};

/// Threads per block of the element-wise kernels (and the most a row kernel uses).
const THREADS: u32 = 256;
/// Items a row-kernel thread keeps in registers (`KMAX` in `kernels.cu`).
const KMAX: usize = 4;

/// The CUDA C source of every kernel here (compiled by NVRTC at first use, per device
/// architecture; tests compile it for sm_75, sm_80 and sm_90).
pub fn source() -> &'static KernelSource {
    static S: OnceLock<KernelSource> = OnceLock::new();
    S.get_or_init(|| KernelSource::new("fsdp/gpu/kernels.cu", include_str!("kernels.cu")))
}

fn invalid(arg: &'static str, problem: impl Into<String>) -> GpuError {
    GpuError::InvalidArgument { arg, problem: problem.into() }
}

/// A kernel parameter: the address of the value (its type must match the kernel's).
fn arg<T>(x: &mut T) -> *mut c_void {
    x as *mut T as *mut c_void
}

/// `dt` must be a 16-bit dtype.
fn sixteen(arg: &'static str, dt: Dtype) -> Result<(), GpuError> {
    match dt {
        Dtype::Bf16 | Dtype::F16 => Ok(()),
        Dtype::F32 => Err(invalid(arg, "must be a 16-bit dtype (Bf16 or F16), not F32")),
    }
}

/// `d` must be f32 or the compute dtype `dt`.
fn f32_or(arg: &'static str, d: Dtype, dt: Dtype) -> Result<(), GpuError> {
    if d == Dtype::F32 || d == dt {
        Ok(())
    } else {
        Err(invalid(arg, format!("must be F32 or the compute dtype {}, not {}", dt.name(), d.name())))
    }
}

/// Non-null and aligned to its element size.
fn ptr(arg: &'static str, p: u64, elem: usize) -> Result<(), GpuError> {
    if p == 0 {
        return Err(invalid(arg, "is a null pointer"));
    }
    if p % elem as u64 != 0 {
        return Err(invalid(arg, format!("address {p:#x} is not aligned to its {elem}-byte elements")));
    }
    Ok(())
}

fn stride(arg: &'static str, ld: usize, width: usize) -> Result<(), GpuError> {
    if ld < width {
        return Err(invalid(arg, format!("row stride {ld} is smaller than the row width {width}")));
    }
    Ok(())
}

fn width32(arg: &'static str, n: usize) -> Result<u32, GpuError> {
    u32::try_from(n).map_err(|_| invalid(arg, format!("{n} exceeds the kernels' 32-bit widths")))
}

/// Rows starting on 16-byte boundaries: base aligned and stride a multiple of 16 bytes.
fn rows16(p: u64, ld: usize, elem: usize) -> bool {
    p % 16 == 0 && (ld * elem) % 16 == 0
}

fn vs(vec: bool) -> &'static str {
    if vec {
        "v"
    } else {
        "s"
    }
}

/// One thread per item: the grid for `rows * per_row` items.
fn items_grid(rows: usize, per_row: u32) -> Result<u32, GpuError> {
    let total = (rows as u64).checked_mul(per_row as u64).ok_or_else(|| invalid("rows", "too many elements"))?;
    u32::try_from(total.div_ceil(THREADS as u64))
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| invalid("rows", format!("{total} items exceed one launch's grid")))
}

/// Threads of a row kernel for rows of `width` elements: about two 8-element items per
/// thread, a multiple of 32, 32..=256.
fn row_threads(width: usize) -> u32 {
    (width.div_ceil(8).div_ceil(2).div_ceil(32) * 32).clamp(32, THREADS as usize) as u32
}

fn row_grid(rows: usize) -> Result<u32, GpuError> {
    u32::try_from(rows).ok().filter(|&r| r <= i32::MAX as u32).ok_or_else(|| invalid("rows", format!("{rows} rows exceed one launch's grid")))
}

/// A grid-stride kernel's grid: the blocks resident at once, no more than the work needs.
fn strided_grid(f: kernel::Function, work: u64) -> Result<u32, GpuError> {
    let resident = kernel::resident_blocks(f, THREADS)? as u64;
    Ok(work.div_ceil(THREADS as u64).clamp(1, resident.max(1)) as u32)
}

unsafe fn go(name: &str, grid: u32, block: u32, stream: CUstream, params: &mut [*mut c_void]) -> Result<(), GpuError> {
    let f = kernel::function_in_current_context(source(), name)?;
    kernel::launch(f, grid, block, 0, stream, params)
}

/// Embedding lookup: `out[t, :] = table[ids[t], :]` as f32.
///
/// `table` is `[vocab, hidden]` (dense) of `dt` (any dtype, f32 included); `ids` is
/// `u32[tokens]`; `out` is f32 `[tokens, hidden]` (dense). **Out-of-range ids** (`>= vocab`)
/// are the caller's to refuse on the host; the kernel never reads outside the table and
/// writes a row of **zeros** for them.
///
/// # Safety
/// The pointers must be device addresses of the current context, valid for the sizes above,
/// and `stream` a stream of that context (or null).
pub unsafe fn embedding_forward(
    dt: Dtype,
    table: u64,
    vocab: usize,
    hidden: usize,
    ids: u64,
    tokens: usize,
    out: u64,
    stream: CUstream,
) -> Result<(), GpuError> {
    if hidden == 0 || tokens == 0 {
        return Ok(());
    }
    ptr("table", table, dt.size())?;
    ptr("ids", ids, 4)?;
    ptr("out", out, 4)?;
    let h32 = width32("hidden", hidden)?;
    let vec = rows16(table, hidden, dt.size()) && rows16(out, hidden, 4);
    let grid = items_grid(tokens, h32.div_ceil(8))?;
    let (mut table, mut vocab, mut h, mut ids, mut tokens, mut out) = (table, vocab as u64, h32, ids, tokens as u64, out);
    let mut p = [arg(&mut table), arg(&mut vocab), arg(&mut h), arg(&mut ids), arg(&mut tokens), arg(&mut out)];
    go(&format!("embedding_{}_{}", dt.name(), vs(vec)), grid, THREADS, stream, &mut p)
}

/// RMSNorm forward: `rstd[r] = 1 / sqrt(mean(x[r]^2) + eps)`, `y[r] = w * (x[r] * rstd[r])`.
///
/// `x` is `[rows, hidden]` of `x_dt` (F32 or `dt`) with row stride `ldx`; `w` is `dt`
/// `[hidden]`; `y` is `dt` (Bf16 or F16) with stride `ldy`; `rstd` is f32 `[rows]` (saved
/// for the backward). `x` and `y` must not overlap. The sum of squares is f32 (the CPU's is
/// f64): `rstd` agrees to ~1e-6 relative, `y` to one ulp of `dt`.
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn rms_norm_forward(
    x_dt: Dtype,
    dt: Dtype,
    x: u64,
    ldx: usize,
    w: u64,
    rows: usize,
    hidden: usize,
    eps: f32,
    y: u64,
    ldy: usize,
    rstd: u64,
    stream: CUstream,
) -> Result<(), GpuError> {
    rms_norm_forward_copy(x_dt, dt, x, ldx, w, rows, hidden, eps, y, ldy, rstd, 0, 0, stream)
}

/// [`rms_norm_forward`] that also copies `x` to `xcopy` (`x_dt`, row stride `ldc`) from
/// the same read: the residual stream's next buffer, which the following GEMM accumulates
/// onto, without a separate copy pass. `xcopy` 0: no copy (`ldc` not checked). `xcopy`
/// must not overlap any other operand.
///
/// # Safety
/// As [`embedding_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm_forward_copy(
    x_dt: Dtype,
    dt: Dtype,
    x: u64,
    ldx: usize,
    w: u64,
    rows: usize,
    hidden: usize,
    eps: f32,
    y: u64,
    ldy: usize,
    rstd: u64,
    xcopy: u64,
    ldc: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    sixteen("dt", dt)?;
    f32_or("x_dt", x_dt, dt)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(invalid("eps", format!("{eps} is not a finite non-negative number")));
    }
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    ptr("x", x, x_dt.size())?;
    ptr("w", w, dt.size())?;
    ptr("y", y, dt.size())?;
    ptr("rstd", rstd, 4)?;
    stride("ldx", ldx, hidden)?;
    stride("ldy", ldy, hidden)?;
    if xcopy != 0 {
        ptr("xcopy", xcopy, x_dt.size())?;
        stride("ldc", ldc, hidden)?;
    }
    let h32 = width32("hidden", hidden)?;
    let vec = rows16(x, ldx, x_dt.size()) && rows16(y, ldy, dt.size()) && w % 16 == 0 && (xcopy == 0 || rows16(xcopy, ldc, x_dt.size()));
    let grid = row_grid(rows)?;
    let (mut x, mut ldx, mut w, mut h, mut eps, mut y, mut ldy, mut rstd) = (x, ldx as u64, w, h32, eps, y, ldy as u64, rstd);
    let (mut xc, mut ldc) = (xcopy, ldc as u64);
    let mut p = [arg(&mut x), arg(&mut ldx), arg(&mut w), arg(&mut h), arg(&mut eps), arg(&mut y), arg(&mut ldy), arg(&mut rstd), arg(&mut xc), arg(&mut ldc)];
    go(&format!("rms_fwd_{}_{}_{}", x_dt.name(), dt.name(), vs(vec)), grid, row_threads(hidden), stream, &mut p)
}

/// RMSNorm backward with respect to `x` (the weight is frozen: no `dw`):
/// `dx = (accumulate ? dx : 0) + rstd * (g - xhat * mean(g * xhat))`, `g = dy * w`,
/// `xhat = x * rstd`.
///
/// `dy` is `[rows, hidden]` of `dy_dt` (F32 or `dt`), stride `lddy`; `x` of `x_dt` (F32 or
/// `dt`), stride `ldx`; `w` `dt` `[hidden]`; `rstd` f32 `[rows]` from the forward; `dx` f32,
/// stride `lddx`, overwritten or (`accumulate`) added to. `dx` must not overlap the inputs.
/// [`rms_norm_backward_cast`] also writes `dx` rounded to `dt`.
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn rms_norm_backward(
    dy_dt: Dtype,
    x_dt: Dtype,
    dt: Dtype,
    dy: u64,
    lddy: usize,
    x: u64,
    ldx: usize,
    w: u64,
    rstd: u64,
    rows: usize,
    hidden: usize,
    dx: u64,
    lddx: usize,
    accumulate: bool,
    stream: CUstream,
) -> Result<(), GpuError> {
    rms_norm_backward_cast(dy_dt, x_dt, dt, dy, lddy, x, ldx, w, rstd, rows, hidden, dx, lddx, accumulate, 0, 0, stream)
}

/// [`rms_norm_backward`], and the final f32 `dx` rounded once to `dt` into `dx16` (stride
/// `lddx16`; 0: not written): what [`cast`] of `dx` would give, without reading `dx` again
/// (the next GEMM's 16-bit input). `dx16` must not overlap `dy`, `x` or `dx`.
///
/// # Safety
/// As [`embedding_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm_backward_cast(
    dy_dt: Dtype,
    x_dt: Dtype,
    dt: Dtype,
    dy: u64,
    lddy: usize,
    x: u64,
    ldx: usize,
    w: u64,
    rstd: u64,
    rows: usize,
    hidden: usize,
    dx: u64,
    lddx: usize,
    accumulate: bool,
    dx16: u64,
    lddx16: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    sixteen("dt", dt)?;
    f32_or("dy_dt", dy_dt, dt)?;
    f32_or("x_dt", x_dt, dt)?;
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    ptr("dy", dy, dy_dt.size())?;
    ptr("x", x, x_dt.size())?;
    ptr("w", w, dt.size())?;
    ptr("rstd", rstd, 4)?;
    ptr("dx", dx, 4)?;
    stride("lddy", lddy, hidden)?;
    stride("ldx", ldx, hidden)?;
    stride("lddx", lddx, hidden)?;
    if dx16 != 0 {
        ptr("dx16", dx16, dt.size())?;
        stride("lddx16", lddx16, hidden)?;
    }
    let h32 = width32("hidden", hidden)?;
    let vec = rows16(dy, lddy, dy_dt.size())
        && rows16(x, ldx, x_dt.size())
        && rows16(dx, lddx, 4)
        && w % 16 == 0
        && (dx16 == 0 || rows16(dx16, lddx16, dt.size()));
    let grid = row_grid(rows)?;
    let (mut dy, mut lddy, mut x, mut ldx, mut w, mut rstd, mut h) = (dy, lddy as u64, x, ldx as u64, w, rstd, h32);
    let (mut dx, mut lddx, mut acc, mut dx16, mut lddx16) = (dx, lddx as u64, accumulate as i32, dx16, lddx16 as u64);
    let mut p = [
        arg(&mut dy),
        arg(&mut lddy),
        arg(&mut x),
        arg(&mut ldx),
        arg(&mut w),
        arg(&mut rstd),
        arg(&mut h),
        arg(&mut dx),
        arg(&mut lddx),
        arg(&mut acc),
        arg(&mut dx16),
        arg(&mut lddx16),
    ];
    let name = format!("rms_bwd_{}_{}_{}_{}", dy_dt.name(), x_dt.name(), dt.name(), vs(vec));
    go(&name, grid, row_threads(hidden), stream, &mut p)
}

unsafe fn rope(
    dt: Dtype,
    x: u64,
    ld: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    cos: u64,
    sin: u64,
    sign: f32,
    stream: CUstream,
) -> Result<(), GpuError> {
    sixteen("dt", dt)?;
    if head_dim % 2 != 0 {
        return Err(invalid("head_dim", format!("{head_dim} is odd: RoPE rotates pairs (i, i + head_dim / 2)")));
    }
    if rows == 0 || heads == 0 || head_dim == 0 {
        return Ok(());
    }
    ptr("x", x, 2)?;
    ptr("cos", cos, 4)?;
    ptr("sin", sin, 4)?;
    let width = heads.checked_mul(head_dim).ok_or_else(|| invalid("heads", "heads * head_dim overflows"))?;
    stride("ld", ld, width)?;
    let hd2 = width32("head_dim", head_dim / 2)?;
    let h32 = width32("heads", heads)?;
    let per_row = h32.checked_mul(hd2.div_ceil(8)).ok_or_else(|| invalid("heads", "too many pairs per row"))?;
    let vec = hd2 % 8 == 0 && rows16(x, ld, 2) && cos % 16 == 0 && sin % 16 == 0;
    let grid = items_grid(rows, per_row)?;
    let (mut x, mut ld, mut rows, mut heads, mut hd2, mut cos, mut sin, mut sign) = (x, ld as u64, rows as u64, h32, hd2, cos, sin, sign);
    let mut p = [arg(&mut x), arg(&mut ld), arg(&mut rows), arg(&mut heads), arg(&mut hd2), arg(&mut cos), arg(&mut sin), arg(&mut sign)];
    go(&format!("rope_{}_{}", dt.name(), vs(vec)), grid, THREADS, stream, &mut p)
}

/// RoPE forward, in place, HF's rotate-half convention exactly as [`crate::ops::rope`]:
/// for head `h` of row `t` (at `x[t * ld + h * head_dim ..]`) and `i < head_dim / 2`,
/// `(a, b) = (x[i], x[i + head_dim / 2])` becomes `(a cos - b sin, b cos + a sin)`.
///
/// `x` is `dt` (Bf16 or F16), `rows x heads` heads of `head_dim` (even); `cos`, `sin` are
/// f32 `[rows, head_dim / 2]` (what [`crate::ops::Rope::cos_sin`] returns for the rows'
/// positions). The same f32 operations as the CPU, then one rounding: bit-exact.
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn rope_forward(
    dt: Dtype,
    x: u64,
    ld: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    cos: u64,
    sin: u64,
    stream: CUstream,
) -> Result<(), GpuError> {
    rope(dt, x, ld, rows, heads, head_dim, cos, sin, 1.0, stream)
}

/// RoPE backward, in place: the rotation by the opposite angles (the transpose of a
/// rotation), turning `dy` into `dx`. Arguments as [`rope_forward`].
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn rope_backward(
    dt: Dtype,
    dx: u64,
    ld: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    cos: u64,
    sin: u64,
    stream: CUstream,
) -> Result<(), GpuError> {
    rope(dt, dx, ld, rows, heads, head_dim, cos, sin, -1.0, stream)
}

/// SwiGLU forward: `out = silu(gate) * up` (`silu(g) = g / (1 + exp(-g))`), all `dt`
/// (Bf16 or F16) `[rows, cols]` with row strides. `out` must not overlap the inputs.
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn swiglu_forward(
    dt: Dtype,
    gate: u64,
    ldg: usize,
    up: u64,
    ldu: usize,
    out: u64,
    ldo: usize,
    rows: usize,
    cols: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    sixteen("dt", dt)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    for (name, p) in [("gate", gate), ("up", up), ("out", out)] {
        ptr(name, p, 2)?;
    }
    for (name, ld) in [("ldg", ldg), ("ldu", ldu), ("ldo", ldo)] {
        stride(name, ld, cols)?;
    }
    let c32 = width32("cols", cols)?;
    let vec = rows16(gate, ldg, 2) && rows16(up, ldu, 2) && rows16(out, ldo, 2);
    let grid = items_grid(rows, c32.div_ceil(8))?;
    let (mut g, mut ldg, mut u, mut ldu, mut o, mut ldo, mut rows, mut cols) = (gate, ldg as u64, up, ldu as u64, out, ldo as u64, rows as u64, c32);
    let mut p = [arg(&mut g), arg(&mut ldg), arg(&mut u), arg(&mut ldu), arg(&mut o), arg(&mut ldo), arg(&mut rows), arg(&mut cols)];
    go(&format!("swiglu_fwd_{}_{}", dt.name(), vs(vec)), grid, THREADS, stream, &mut p)
}

/// SwiGLU backward: with `s = sigmoid(gate)`, `dgate = dout * up * s * (1 + gate * (1 - s))`,
/// `dup = dout * gate * s`, all `dt` (Bf16 or F16) `[rows, cols]` with row strides.
///
/// **In place works**: `dgate` may be `gate` and `dup` may be `up` (same address and the
/// same stride; a different stride is refused). No other overlap is allowed.
///
/// # Safety
/// As [`embedding_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn swiglu_backward(
    dt: Dtype,
    dout: u64,
    lddo: usize,
    gate: u64,
    ldg: usize,
    up: u64,
    ldu: usize,
    dgate: u64,
    lddg: usize,
    dup: u64,
    lddu: usize,
    rows: usize,
    cols: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    swiglu_backward_and_product(dt, dout, lddo, gate, ldg, up, ldu, dgate, lddg, dup, lddu, 0, 0, rows, cols, stream)
}

/// [`swiglu_backward`] that also writes the forward's product `act = silu(gate) * up`
/// (`dt`, row stride `ldact`), bit-identical to [`swiglu_forward`]'s, from the same read of
/// `gate` and `up`: a backward that needs the product after the SwiGLU backward (the
/// `down` projection's `dA`) gets it without a second pass over `gate|up`. `act` 0: not
/// written (then `ldact` is not checked). `act` must not overlap any other operand.
///
/// # Safety
/// As [`embedding_forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn swiglu_backward_and_product(
    dt: Dtype,
    dout: u64,
    lddo: usize,
    gate: u64,
    ldg: usize,
    up: u64,
    ldu: usize,
    dgate: u64,
    lddg: usize,
    dup: u64,
    lddu: usize,
    act: u64,
    ldact: usize,
    rows: usize,
    cols: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    sixteen("dt", dt)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    for (name, p) in [("dout", dout), ("gate", gate), ("up", up), ("dgate", dgate), ("dup", dup)] {
        ptr(name, p, 2)?;
    }
    for (name, ld) in [("lddo", lddo), ("ldg", ldg), ("ldu", ldu), ("lddg", lddg), ("lddu", lddu)] {
        stride(name, ld, cols)?;
    }
    if dgate == gate && lddg != ldg {
        return Err(invalid("lddg", format!("dgate is gate (in place) but its stride {lddg} is not gate's {ldg}")));
    }
    if dup == up && lddu != ldu {
        return Err(invalid("lddu", format!("dup is up (in place) but its stride {lddu} is not up's {ldu}")));
    }
    if dgate == dup {
        return Err(invalid("dup", "is the same buffer as dgate"));
    }
    if act != 0 {
        ptr("act", act, 2)?;
        stride("ldact", ldact, cols)?;
    }
    let c32 = width32("cols", cols)?;
    let vec = rows16(dout, lddo, 2) && rows16(gate, ldg, 2) && rows16(up, ldu, 2) && rows16(dgate, lddg, 2) && rows16(dup, lddu, 2) && (act == 0 || rows16(act, ldact, 2));
    let grid = items_grid(rows, c32.div_ceil(8))?;
    let (mut d, mut lddo, mut g, mut ldg, mut u, mut ldu) = (dout, lddo as u64, gate, ldg as u64, up, ldu as u64);
    let (mut dg, mut lddg, mut du, mut lddu, mut rows, mut cols) = (dgate, lddg as u64, dup, lddu as u64, rows as u64, c32);
    let (mut a, mut lda) = (act, ldact as u64);
    let mut p = [
        arg(&mut d),
        arg(&mut lddo),
        arg(&mut g),
        arg(&mut ldg),
        arg(&mut u),
        arg(&mut ldu),
        arg(&mut dg),
        arg(&mut lddg),
        arg(&mut du),
        arg(&mut lddu),
        arg(&mut a),
        arg(&mut lda),
        arg(&mut rows),
        arg(&mut cols),
    ];
    go(&format!("swiglu_bwd_{}_{}", dt.name(), vs(vec)), grid, THREADS, stream, &mut p)
}

/// Converts `[rows, cols]` of `src_dt` (stride `lds`) into `dst_dt` (stride `ldd`): any of
/// f32 / f16 / bf16 to any, through f32, rounding to nearest even (as `half`'s `from_f32`;
/// overflow gives ±inf). `src` and `dst` must not overlap, except as the very same buffer
/// with the same dtype and stride (a no-op copy).
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn cast(
    src_dt: Dtype,
    src: u64,
    lds: usize,
    dst_dt: Dtype,
    dst: u64,
    ldd: usize,
    rows: usize,
    cols: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    ptr("src", src, src_dt.size())?;
    ptr("dst", dst, dst_dt.size())?;
    stride("lds", lds, cols)?;
    stride("ldd", ldd, cols)?;
    if src == dst && (src_dt != dst_dt || lds != ldd) {
        return Err(invalid("dst", "is src with another dtype or stride: an in-place cast would overwrite values not yet read"));
    }
    let c32 = width32("cols", cols)?;
    let vec = rows16(src, lds, src_dt.size()) && rows16(dst, ldd, dst_dt.size());
    let grid = items_grid(rows, c32.div_ceil(8))?;
    let (mut s, mut lds, mut d, mut ldd, mut rows, mut cols) = (src, lds as u64, dst, ldd as u64, rows as u64, c32);
    let mut p = [arg(&mut s), arg(&mut lds), arg(&mut d), arg(&mut ldd), arg(&mut rows), arg(&mut cols)];
    go(&format!("cast_{}_{}_{}", src_dt.name(), dst_dt.name(), vs(vec)), grid, THREADS, stream, &mut p)
}

/// `*acc += sum of x[i]^2` over `n` f32 values, in f64 (as [`crate::optim::grad_norm`]);
/// `acc` is one f64 on the device (the caller zeroes it once, then sums every tensor into
/// it). Blocks add their partial sums atomically, so the last bits of `*acc` vary from run
/// to run (relative ~1e-16).
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn sum_squares(x: u64, n: usize, acc: u64, stream: CUstream) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    ptr("x", x, 4)?;
    ptr("acc", acc, 8)?;
    let vec = (x % 16 == 0) as i32;
    let f = kernel::function_in_current_context(source(), "sum_squares")?;
    let grid = strided_grid(f, (n as u64).div_ceil(4))?;
    let (mut x, mut n, mut acc, mut vec) = (x, n as u64, acc, vec);
    let mut p = [arg(&mut x), arg(&mut n), arg(&mut acc), arg(&mut vec)];
    kernel::launch(f, grid, THREADS, 0, stream, &mut p)
}

/// `*scale` (one f32 on the device) = the factor [`crate::optim::clip_grad_norm`] applies
/// for the norm `sqrt(*sumsq)` (one f64 on the device, from [`sum_squares`]) and
/// `max_norm`: `max_norm / (norm + 1e-6)` rounded to f32 when that is below 1, else exactly
/// 1 (also for a NaN norm, as the CPU's `f64::min`). Same f64 operations as the CPU.
///
/// # Safety
/// As [`embedding_forward`].
pub unsafe fn clip_factor(sumsq: u64, max_norm: f64, scale: u64, stream: CUstream) -> Result<(), GpuError> {
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(invalid("max_norm", format!("{max_norm} is not a finite positive number")));
    }
    ptr("sumsq", sumsq, 8)?;
    ptr("scale", scale, 4)?;
    let (mut s, mut m, mut sc) = (sumsq, max_norm, scale);
    let mut p = [arg(&mut s), arg(&mut m), arg(&mut sc)];
    go("clip_factor", 1, 32, stream, &mut p)
}

/// The hyper-parameters of one AdamW step (those of [`crate::optim::AdamWConfig`], the
/// learning rate, and the 1-based step number `t` the bias corrections use).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The step number, 1-based (the CPU's `AdamW::t` after its increment).
    pub step: u64,
}

/// One AdamW step on `n` f32 values: `p`, `m`, `v` updated in place from `g`, exactly
/// as [`crate::optim::AdamW::step`] (bit-for-bit: the same f32 operations in the same
/// order, with the decay, step size and bias-correction factors computed here in f64 and
/// rounded to f32 as the CPU does). When `grad_scale` is not 0 it is the address of one
/// f32 (the factor from [`clip_factor`]) that each gradient is multiplied by first.
///
/// # Safety
/// As [`embedding_forward`]; `p`, `g`, `m`, `v` hold `n` values each and do not overlap.
pub unsafe fn adamw_step(p: u64, g: u64, m: u64, v: u64, n: usize, h: &AdamWStep, grad_scale: u64, stream: CUstream) -> Result<(), GpuError> {
    if h.step == 0 || h.step > i32::MAX as u64 {
        return Err(invalid("step", format!("{} is not a 1-based step number (1..=2^31-1)", h.step)));
    }
    for (name, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(invalid(name, format!("{b} is not in [0, 1)")));
        }
    }
    for (name, x) in [("lr", h.lr), ("eps", h.eps), ("weight_decay", h.weight_decay)] {
        if !x.is_finite() {
            return Err(invalid(name, format!("{x} is not finite")));
        }
    }
    if n == 0 {
        return Ok(());
    }
    for (name, a) in [("p", p), ("g", g), ("m", m), ("v", v)] {
        ptr(name, a, 4)?;
    }
    if grad_scale != 0 {
        ptr("grad_scale", grad_scale, 4)?;
    }
    // fsdp::optim::AdamW::step, word for word.
    let t = h.step as i32;
    let (b1, b2) = (h.beta1, h.beta2);
    let mut decay = (1.0 - h.lr * h.weight_decay) as f32;
    let mut step_size = (h.lr / (1.0 - b1.powi(t))) as f32;
    let mut bc2 = (1.0 - b2.powi(t)).sqrt() as f32;
    let (mut w1, mut b2f, mut w2, mut eps) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32, h.eps as f32);
    let mut vec = [p, g, m, v].iter().all(|&a| a % 16 == 0) as i32;
    let f = kernel::function_in_current_context(source(), "adamw_step")?;
    let grid = strided_grid(f, (n as u64).div_ceil(4))?;
    let (mut p, mut g, mut m, mut v, mut n, mut gs) = (p, g, m, v, n as u64, grad_scale);
    let mut params = [
        arg(&mut p),
        arg(&mut g),
        arg(&mut m),
        arg(&mut v),
        arg(&mut n),
        arg(&mut gs),
        arg(&mut decay),
        arg(&mut step_size),
        arg(&mut bc2),
        arg(&mut w1),
        arg(&mut b2f),
        arg(&mut w2),
        arg(&mut eps),
        arg(&mut vec),
    ];
    kernel::launch(f, grid, THREADS, 0, stream, &mut params)
}

/// Elements of a row kept in registers by the row kernels at full block size (rows up to
/// this long are read from memory once).
pub const ROW_CACHE_ELEMENTS: usize = KMAX * 8 * THREADS as usize;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_threads_take_two_items_each_within_bounds() {
        assert_eq!(row_threads(1), 32);
        assert_eq!(row_threads(2048), 128); // 256 items, 2 per thread
        assert_eq!(row_threads(4097), 256);
        assert_eq!(row_threads(1 << 20), 256);
        // the register cache covers a full row up to 8192 elements
        assert_eq!(ROW_CACHE_ELEMENTS, 8192);
        assert!(row_threads(8192) as usize * KMAX * 8 >= 8192);
    }
}
