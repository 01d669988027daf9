//! The QLoRA linear on the GPU: a frozen NF4 base weight, dequantized into scratch and
//! multiplied with cuBLAS, plus the LoRA adapter, for a *group* of projections that share
//! one input (`q|k|v`, `gate|up`, or one alone: `o`, `down`). Forward and backward.
//!
//! Semantics are those of [`crate::ops::lora_linear`], part by part (`s = alpha / r`):
//! `y = x W^T (+ b) + s (x A^T) B^T`; backward with `g = dy B`:
//! `dx = dy W + s g A`, `dB += s dy^T xa`, `dA += s g^T x`. The bias is frozen (no
//! gradient), as is `W`.
//!
//! # Layout
//!
//! A group of parts `p = 0..P` with `out_p` output features each and `O = sum out_p`:
//! the output `y [rows, O]` holds the parts side by side (part `p` in columns
//! `off_p .. off_p + out_p`, `off_p = sum_{q<p} out_q`), and so does `dy`. Each part's NF4
//! weight is dequantized with nf4's fused kernel into rows `off_p..` of one scratch
//! matrix `W [O, in]` in the compute dtype, so the base product of the whole group is one
//! GEMM. That matrix is scratch: the backward dequantizes again (never kept: that is the
//! memory QLoRA saves). Per part with an adapter of rank `r_p`, `A_p [r_p, in]`,
//! `B_p [out_p, r_p]` (compute dtype) and `dA_p`, `dB_p` (f32, accumulated). `R` is the
//! sum of the ranks of the parts that have an adapter ([`Group::lora_rank_sum`]), and
//! `xa [rows, R]` (compute dtype, row stride `ldxa`) holds each adapted part's `x A_p^T`
//! in its own column block, in part order: a matrix of its own, or the tail of `x`'s rows
//! (the fused adapter, below).
//!
//! # GEMMs (cuBLAS, 16-bit inputs, f32 accumulation)
//!
//! Forward: the bias (if any part has one) is written into `y` first by a small kernel
//! (`linear.cu`), so the base GEMM accumulates onto it and `x W^T + b` is rounded once.
//! Then `y (+)= x W^T` (one GEMM), `xa = x A^T` (one GEMM over the stacked `A`), and per
//! adapted part `y_p += s_p xa_p B_p^T` (one GEMM each, `beta = 1`).
//!
//! Backward: `g'_p = s_p dy_p B_p` (into scratch `[rows, R]` or `dy`'s tail, compute dtype:
//! the scale is folded in here) and `dB_p += s_p xa_p^T dy_p` (f32), then
//! `dx = dx_beta dx + dy W` (one GEMM, f32 out), `dx += g' A` (one GEMM over the stacked
//! `A`), `dA += g'^T x` (one GEMM when the parts' `dA` are contiguous, one per part
//! otherwise).
//!
//! **`g'` and `dB` in one pass over `dy`** ([`LoraPass`]). Both read all of `dy`
//! (`rows x O`, the largest operand the adapter touches: `gate|up` 268 MB at 8192 rows);
//! as cuBLAS GEMMs (one per part each, `dB` often split-K plus a reduce) `dy` is read
//! twice. `linear.cu`'s `lora_pass_*` reads it once: a block per (part, span of 512 / 256
//! / 128 columns at rank <= 16 / 32 / 64, chunk of rows) walks 64 x 128 tiles of `dy`
//! (cp.async, 4 stages, 3 at rank 64) and feeds each tile to two tensor-core products
//! (`mma.sync` m16n8k16, f32 accumulate): `dy_tile B` for the rows' `g'` and
//! `dy_tile^T xa_tile` for the columns' `dB`, with `ldmatrix(.trans)` from the same
//! shared tile. Each block writes f32 partials (`g'` per span, `dB` per chunk) into
//! scratch; `lora_pass_reduce_*` then sums them in a fixed order, scales, rounds `g'` once
//! to the compute dtype (written where the GEMMs wrote it) and adds into `dB`. No atomics:
//! the same inputs give the same bits. The chunk count keeps the launch within
//! [`LORA_PASS_TARGET_BLOCKS`] blocks (one wave on an H100; a tuning knob). The pass runs
//! before the backward's dequantization so that its partials use `W`'s scratch (the
//! region grows only where the partials are larger than `W`). Rounding differs from the
//! GEMMs only in summation order.
//!
//! It applies where no part drops, every adapted part's rank is 8, 16, 32 or 64 and at
//! most 4 parts are adapted; [`LoraPass::Auto`] (the default) then takes it on sm_80+ when
//! it pays: two or more adapted parts, or a `dy` larger than L2 (see the measurements
//! below); cuBLAS otherwise, and where its shared memory (up to 122 KiB a block) does not
//! fit (sm_86 / sm_89: 99 KiB). A portable kernel with the same blocks and partials and
//! scalar FMAs (reads `dy` twice: a correctness fallback) serves [`LoraPass::Always`]
//! below sm_80 and [`LoraPass::Portable`] anywhere (how it is tested on an H100); on sm_75
//! `Auto` keeps cuBLAS. [`set_lora_pass`] switches per thread (`Cublas` forces the GEMMs).
//!
//! Measured (H100 80GB HBM3, `bench_linear --pass-only`, rows 8192, r 16, bf16, fused
//! layout, µs, medians; `fsdp/results/lora-pass-h100/`), `Always` against `Cublas`:
//!
//! | group | `g'` GEMMs + `dB` GEMMs alone | backward without `dx` (`g'`, `dB`, `dA`) | full backward |
//! |---|---|---|---|
//! | q\|k\|v | 34.5 + 40.6 | 93.4 -> 71.3 | 273.5 -> 246.2 |
//! | o | 18.4 + 19.8 | 50.8 -> 59.7 | 176.0 -> 181.4 |
//! | gate\|up | 105.9 + 105.7 | 231.6 -> 201.0 | 983.1 -> 942.5 |
//! | down | 18.2 + 19.2 | 85.9 -> 91.5 | 519.4 -> 519.0 |
//!
//! ncu (same card, caches flushed between kernels): the pass kernel 42 / 34 / 144 / 34 µs
//! reading 52 / 35 / 270 / 35 MB (1.0-1.9 TB/s, well under the card's ~3 TB/s), its
//! reduce 10 / 8 / 19 / 8 µs. So `Auto` takes it for `q|k|v` and `gate|up` (about 68 µs a
//! layer, ~1.1 ms of a 16-layer step) and leaves `o` and `down` to cuBLAS, whose second
//! read of a 33.5 MB `dy` comes mostly from L2. Not yet known: why the pass kernel
//! streams at only 1-1.9 TB/s (occupancy / shared-memory carveout, the per-step
//! `__syncthreads`, tile shape); fixing that is what would make it pay everywhere.

//! # Fused adapter (K-concatenation; opt in per call)
//!
//! `y = x W^T + sum_p s_p xa_p B_p^T` is one GEMM over a K-concatenated problem:
//! `y = [x | xa] [W | Bd]^T`, `K = in + R`. The caller opts in by passing `xa` as `x`'s
//! own tail: `xa = x + in` elements with `ldxa = ldx >= in + R` (the model gives the
//! buffers that feed the linears those extra columns). Then the forward
//!
//! 1. dequantizes `W` into scratch `W' [O, in + R]` with row stride `in + R` (nf4's
//!    [`nf4::gpu::launch_dequant_rows`]: the same one pass as a dense dequant, measured
//!    within 1-3 µs of it);
//! 2. writes `Bd` into `W'`'s last `R` columns (`linear.cu`'s `lora_bd_*`, `O x R`
//!    elements): block-diagonal, part `p`'s rows hold `s_p B_p` in its own columns
//!    `rc_p ..`, zeros elsewhere (zeros for parts without adapter);
//! 3. writes `xa = x A^T` into `x`'s tail (the same GEMM(s) as without fusion; dropout too);
//! 4. runs `y = beta y + [x | xa] W'^T` (bias prologue first, as always): `y` is written
//!    once and never re-read for the adapter, and `beta` is the caller's (0 for `q|k|v`
//!    and `gate|up`: no read of `y` at all).
//!
//! **Where `s_p` goes.** Into the 16-bit copy of `B` (`round(s_p B_p)`, one f32 product
//! rounded to nearest even), not into `xa`: `xa` must stay `x A^T` for the backward's
//! `dB += s dy^T xa`, and a second scaled copy of it would cost a pass over `[rows, R]`.
//! With the usual `s = alpha / r` a power of two (alpha 16, r 16 or 8: `s` = 1, 2) the
//! product is exact; otherwise it is one bf16 rounding of a weight (relative 2^-9), the
//! same size as the rounding of `xa` itself, while `y` loses one rounding (PEFT rounds
//! `base(x)` and `lora(x)` separately and then their sum).
//!
//! Backward (`dy_tail`): `dx = dy W + sum_p s_p g_p A_p` is one GEMM over
//! `dy' = [dy | g']` `[rows, O + R]` (the caller gives `dy` with row stride `>= O + R`
//! whose tail this call may overwrite; the `g' = s dy B` GEMMs write there) and
//! `W'' = [W ; A] [O + R, in]` (`W` dequantized dense, the stacked `A` copied right below
//! it: `R x in` elements). `dA += g'^T x` reads `g'` from `dy`'s tail, `dB` reads `xa`
//! wherever it is. Not with dropout on a part (its `dx` term is masked): there the call
//! keeps the separate path (`g'` in scratch, the tail untouched).
//!
//! The separate path (a dense `xa`, or `xa` anywhere else; `dy_tail = false`) is
//! unchanged and still tested; both give the same values up to rounding.
//!
//! **Stacked `A`.** `x A^T` and `g' A` are single GEMMs over `A = [A_0; A_1; ...]
//! [R, in]`. When the adapted parts' `A` buffers are contiguous in part order (the model
//! can allocate a group's adapters that way) they are used in place; otherwise they are
//! copied into scratch first (`R * in` elements, small). Likewise `dA` is one GEMM when
//! the parts' `dA` buffers are contiguous.
//!
//! Rounding: `y` in the compute dtype is rounded twice on the separate path (base + bias
//! in the base GEMM, then once more per LoRA GEMM), once on the fused one; `xa` and `g'`
//! are rounded to the compute dtype (as PEFT does), and so is `s B` on the fused forward;
//! `dx`, `dA`, `dB` are f32 (a 16-bit `dx`: rounded per GEMM, one GEMM when fused).
//!
//! # LoRA dropout
//!
//! A part's [`LoraRef::dropout`] (PEFT's `lora_dropout`, masks of [`crate::dropout`]) drops
//! elements of *its* adapter's input: `xa_p = xd_p A_p^T` with
//! `xd_p = D_p ⊙ x / (1 - p)`, so the parts of a fused group get independent masks.
//! Backward: `dA_p += g'_p^T xd_p` (`xd_p` regenerated from `x` and the seed, never
//! stored) and `dx += D_p ⊙ (g'_p A_p) / (1 - p)`; `dB_p` and the base path are unchanged.
//! With dropout on any part of a group, the adapter GEMMs run part by part (no stacked
//! `A`):
//!
//! - forward, per dropped part: [`dropout_input`] writes `xd_p` (compute dtype) into
//!   scratch, then `xa_p = xd_p A_p^T`;
//! - backward, after `dx (+)= dy W`: [`dropout_lora_dx`] adds every dropped part's
//!   `D_p ⊙ (g'_p A_p) / (1 - p)` into `dx` in one pass (a rank-`R` product computed in
//!   the kernel, the masks inline: no `[rows, in]` temporary); then per dropped part `xd_p`
//!   again into scratch for `dA_p += g'_p^T xd_p`. Parts without dropout keep their plain
//!   GEMMs.
//!
//! That costs `rows x in` elements of `2 + 2` bytes per dropped part (forward; backward
//! again for `xd_p`), one pass over `dx` (`2 dx_e` bytes per element) for all of them,
//! a hash per element and part each time, and `rows x in` compute-dtype elements more of
//! scratch. Without dropout (`None` or `p = 0` on every part) nothing of this runs: the
//! launches, the scratch size and the results are those of a group without the option.
//!
//! # Cost (rows `T`, in `I`, out `O`, ranks `r_p`, `R = sum r_p`, `Q = sum r_p out_p`)
//!
//! | step | FLOPs | bytes (16-bit `e = 2`) |
//! |---|---|---|
//! | dequant (fwd, and again bwd) | – | `O I (0.5 + 1/64 + e)` (double-quantized, blocksize 64) |
//! | bias (when present) | – | `T O e_y` written, read back by the GEMM |
//! | fwd base `x W^T` | `2 T I O` | `e (T I + O I) + e_y T O` (+ `e_y T O` read when accumulating) |
//! | fwd `x A^T` | `2 T I R` | `e T I` |
//! | fwd `y += s xa B^T` | `2 T Q` | `2 e_y T O` (read + write `y`) |
//! | bwd `g' = s dy B` | `2 T Q` | `e T O` |
//! | bwd `dx = dy W` | `2 T O I` | `e (T O + O I) + 4 T I` (+ `4 T I` read when `dx_beta != 0`) |
//! | bwd `dx += g' A` | `2 T R I` | `8 T I` |
//! | bwd `dB += s xa^T dy` | `2 T Q` | `e T (O + R)` |
//! | bwd `dA += g'^T x` | `2 T R I` | `e T I` |
//! | fused fwd: `Bd`, then `y = [x\|xa] [W\|Bd]^T` (replaces the base GEMM and the `y +=` GEMMs) | `2 T (I + R) O` | `e (T (I + R) + O (I + R)) + e_y T O` (+ `e_y T O` read when `beta = 1`) |
//! | fused bwd: `dx = [dy\|g'] [W;A]` (replaces both `dx` GEMMs) | `2 T (O + R) I` | `e (T (O + R) + (O + R) I) + 4 T I` |
//!
//! The model FLOPs that matter are the base GEMMs: `2 T I O` forward, `2 T I O` backward
//! (no `dW`: the base is frozen). With `r = 16` the adapter adds about `3 r (1/I + 1/O)`
//! of that, under 5 % for Llama shapes.
//!
//! # Measured (H100 80GB HBM3, `examples/bench_linear.rs`, rows 8192, r 16, bf16, µs)
//!
//! | group | dequant | base GEMM fwd (TFLOP/s) | fwd | fwd without LoRA | base GEMM bwd (TFLOP/s) | bwd | bwd without LoRA |
//! |---|---|---|---|---|---|---|---|
//! | q\|k\|v 2048→3072 | 17 | 136 (760) | 230 | 153 | 139 (741) | 326 | 156 |
//! | o 2048→2048, f32 y += | 12 | 127 (540) | 222 | 135 | 99 (696) | 240 | 107 |
//! | gate\|up 2048→16384 | 39 | 720 (763) | 1055 | 758 | 682 (807) | 1020 | 725 |
//! | down 8192→2048, f32 y += | 17 | 353 (779) | 485 | 372 | 392 (702) | 773 | 413 |
//!
//! The adapter costs 30-110 % on top of dequant + base GEMM, all of it memory traffic:
//! the `y += s xa B^T` GEMMs (`k = r`) re-read and re-write `y` (gate|up: 292 µs alone,
//! about 1.85 TB/s) and `dx += g' A` re-reads and re-writes the f32 `dx` (down: 270 µs).
//! In the same run, torch eager doing what PEFT does on an *already dequantized* bf16
//! weight (`fsdp/py/bench_linear_torch.py`) took 1340 / 686 / 2797 / 1585 µs fwd+bwd for
//! the four groups, against 556 / 462 / 2075 / 1257 here (dequantization included).
//!
//! With LoRA dropout 0.1 on every part (same run as the first table, H100 80GB HBM3,
//! `bench_linear`'s third table, µs):
//!
//! | group | fwd | fwd with dropout | bwd | bwd with dropout |
//! |---|---|---|---|---|
//! | q\|k\|v | 215 | 400 | 303 | 719 |
//! | o | 222 | 273 | 226 | 347 |
//! | gate\|up | 984 | 1060 | 996 | 1387 |
//! | down | 486 | 702 | 690 | 1284 |
//!
//! Dropout costs 20-90 % more per call. Not tuned yet: the hash (three 64-bit multiplies
//! per element) makes `dropout_input` integer-bound (about 2.4x its memory floor on
//! `down`'s 8192 x 8192 input), and [`dropout_lora_dx`] walks `k` with one dependent
//! `A` load at a time (runtime rank, no unrolling): latency-bound where `A` leaves L1
//! (`down`: `in = 8192`). Unrolling `k`, keeping a row's `g'` in registers, and one
//! hash per pair of elements are the next steps.
//!
//! With the fused adapter (same binary and card, H100 80GB HBM3, rows 8192, r 16, bf16,
//! µs; `bench_linear`'s fourth table, separate and fused calls interleaved):
//!
//! | group | fwd separate | fwd fused | bwd separate | bwd fused |
//! |---|---|---|---|---|
//! | q\|k\|v | 215.5 | 190.0 (1.13x) | 302.2 | 270.0 (1.12x) |
//! | o, f32 y += | 226.5 | 161.4 (1.40x) | 224.7 | 176.2 (1.28x) |
//! | gate\|up | 997.1 | 898.2 (1.11x) | 1050.0 | 1025.0 (1.02x) |
//! | down, f32 y += | 490.2 | 455.1 (1.08x) | 711.3 | 553.8 (1.28x) |
//!
//! What is left of the adapter's cost on the fused path is the `x A^T` GEMM (it reads
//! all of `x`: `down` 50 µs), the `g' = s dy B` and `dB` GEMMs (each reads all of `dy`:
//! `gate|up` about 100 µs each) and `dA`; `K` grows by `R` (under 2.5 %). Rounding `K` up
//! to a multiple of 64 gained nothing (fifth table). Training step (`qlora bench`, Llama-3.2-1B
//! shape, 8192 tokens) with the fused adapters (`RuntimeOptions::fused_lora`) against
//! without, same binary, two runs each, H100 80GB HBM3: checkpointing off 111.1 / 112.0 ->
//! 109.2 / 109.0 ms (forward phase 36.7 -> 35.2 ms), on 140.8 / 140.5 -> 136.7 / 135.7 ms,
//! offload 140.8 / 141.1 -> 136.8 / 136.4 ms; memory held 8.841 -> 8.851, 2.817 -> 2.819,
//! 2.380 -> 2.383 GB.
//!
//! # Scratch
//!
//! [`scratch_bytes`]: `W [O, in]` (with adapters: room for `W' [O, in + R]` or
//! `W'' [O + R, in]`, whichever is larger) + stacked `A [R, in]` + `g' [rows, R]`, each
//! rounded up to 256 bytes, plus `xd [rows, in]` when a part has dropout. The cuBLAS
//! workspace belongs to the [`Blas`] handle.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudakit::blas::{Blas, DataType, Mat, Op};
use cudakit::kernel::{function_in_current_context, launch, KernelSource};
use cudarc::driver::sys::{self as drv, CUstream};

use super::{Dtype, GpuError};
use crate::dropout::Dropout;

/// The frozen NF4 base weight of one part, `[out, in]` once dequantized (PyTorch's
/// `nn.Linear.weight` layout; the legacy transposed NF4 layout is handled by nf4).
#[derive(Clone, Copy)]
pub struct Nf4Ref<'a> {
    /// The uploaded weight; it must live in the context the linear runs in.
    pub weight: &'a nf4::GpuQuantized,
}

impl std::fmt::Debug for Nf4Ref<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nf4Ref").field("shape", &self.weight.state().output_shape()).finish()
    }
}

/// One part's LoRA adapter and its gradient buffers (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct LoraRef {
    /// `A [r, in]`, compute dtype.
    pub a: u64,
    /// `B [out, r]`, compute dtype.
    pub b: u64,
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f32,
    /// `dA [r, in]`, f32, accumulated (`+=`) by the backward (may be 0 in the forward).
    pub da: u64,
    /// `dB [out, r]`, f32, accumulated (`+=`) by the backward (may be 0 in the forward).
    pub db: u64,
    /// Dropout on this adapter's input (`None`, or `p = 0`: none); the backward must get
    /// the forward's.
    pub dropout: Option<Dropout>,
}

impl LoraRef {
    /// The dropout that applies: `None` without one or with `p = 0`.
    fn active_dropout(&self) -> Option<Dropout> {
        self.dropout.filter(Dropout::is_active)
    }
}

/// One projection of a group.
#[derive(Clone, Copy, Debug)]
pub struct Part<'a> {
    /// The frozen base weight, `[out_features, in_features]`.
    pub weight: Nf4Ref<'a>,
    /// Output features of this part.
    pub out_features: usize,
    /// `bias [out_features]` in the compute dtype, or 0.
    pub bias: u64,
    /// The adapter, if this part has one.
    pub lora: Option<LoraRef>,
}

/// Projections sharing one input, computed together.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    /// The parts, in output-column order.
    pub parts: &'a [Part<'a>],
    /// Input features (shared).
    pub in_features: usize,
    /// Compute dtype: `Bf16` or `F16` (of `x`, `dy`, `A`, `B`, `bias`, `xa`, the
    /// dequantized weight, and `y` unless `y` is f32).
    pub dtype: Dtype,
}

impl Group<'_> {
    /// `O`: the sum of the parts' output features (columns of `y` and `dy`).
    pub fn out_features(&self) -> usize {
        self.parts.iter().map(|p| p.out_features).sum()
    }
    /// `R`: the sum of the ranks of the parts that have an adapter (columns of `xa`).
    pub fn lora_rank_sum(&self) -> usize {
        self.parts.iter().filter_map(|p| p.lora.map(|l| l.r)).sum()
    }
    /// Whether any part's adapter drops (dropout with `p > 0`).
    pub fn has_dropout(&self) -> bool {
        self.parts.iter().any(|p| p.lora.is_some_and(|l| l.active_dropout().is_some()))
    }
}

const ALIGN: usize = 256;

fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Byte offsets of the scratch regions.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Dequantized `W [O, in]`.
    w: usize,
    /// Stacked `A [R, in]` (used when the parts' `A` are not contiguous).
    a: usize,
    /// `g' [rows, R]` (backward).
    g: usize,
    /// With dropout: `xd [rows, in]`, a part's dropped input (compute dtype). Zero bytes
    /// without dropout.
    d: usize,
    total: usize,
}

fn layout(g: &Group, rows: usize) -> Layout {
    let e = g.dtype.size();
    let (o, i, r) = (g.out_features(), g.in_features, g.lora_rank_sum());
    let w = 0;
    // The fused paths' W' = [W | Bd] [O, in + R] (forward) and W'' = [W ; A] [O + R, in]
    // (backward) take the place of W [O, in].
    let w_elems = if r > 0 { (o * (i + r)).max((o + r) * i) } else { o * i };
    // The one-pass backward's f32 partials live there too: it runs before the backward
    // dequantizes `W` (see `backward_impl`).
    let pass = pass_plan(g, rows).map_or(0, |p| p.bytes);
    let a = w + up((w_elems * e).max(pass));
    let gg = a + up(r * i * e);
    let d = gg + up(rows * r * e);
    let total = if g.has_dropout() { d + up(rows * i * e) } else { d };
    Layout { w, a, g: gg, d, total }
}

/// Bytes of scratch [`forward`] and [`backward`] need for `rows` rows of group `g`: the
/// dequantized weight `[O, in]` (with adapters, room for the fused paths' `[O, in + R]` or
/// `[O + R, in]`, and for the one-pass backward's f32 partials of `g'` and `dB` where they
/// are larger), the stacked `A [R, in]` and `g' [rows, R]`, in the compute dtype, and
/// with dropout on a part `xd [rows, in]` too, each rounded up to 256 bytes. Depends on
/// this thread's [`set_lora_pass_target_blocks`]: size scratch after setting it.
pub fn scratch_bytes(g: &Group, rows: usize) -> usize {
    layout(g, rows).total
}

fn source() -> &'static KernelSource {
    static S: OnceLock<KernelSource> = OnceLock::new();
    S.get_or_init(|| KernelSource::new("fsdp/gpu/linear.cu", include_str!("linear.cu")))
}

/// The kernel source (for the test that compiles every source for sm_75..sm_90).
pub fn kernel_source() -> &'static KernelSource {
    source()
}

fn invalid(arg: &'static str, problem: impl Into<String>) -> GpuError {
    GpuError::InvalidArgument { arg, problem: problem.into() }
}

fn blas_dtype(d: Dtype) -> DataType {
    match d {
        Dtype::F32 => DataType::F32,
        Dtype::F16 => DataType::F16,
        Dtype::Bf16 => DataType::Bf16,
    }
}

fn nf4_dtype(d: Dtype) -> nf4::FloatDtype {
    match d {
        Dtype::F32 => nf4::FloatDtype::F32,
        Dtype::F16 => nf4::FloatDtype::F16,
        Dtype::Bf16 => nf4::FloatDtype::Bf16,
    }
}

/// Checks what both directions share; returns (O, R).
fn check_group(g: &Group, rows: usize, backward: bool) -> Result<(usize, usize), GpuError> {
    if g.parts.is_empty() {
        return Err(invalid("group", "has no parts"));
    }
    if !matches!(g.dtype, Dtype::Bf16 | Dtype::F16) {
        return Err(invalid("group", format!("compute dtype must be bf16 or f16, got {}", g.dtype.name())));
    }
    if g.in_features == 0 {
        return Err(invalid("group", "in_features is 0"));
    }
    if rows == 0 {
        return Err(invalid("rows", "is 0"));
    }
    let fits = |v: usize| v <= i32::MAX as usize;
    for (i, p) in g.parts.iter().enumerate() {
        if p.out_features == 0 {
            return Err(invalid("part", format!("part {i}: out_features is 0")));
        }
        let shape = p.weight.weight.state().output_shape();
        if shape != [p.out_features, g.in_features] {
            return Err(invalid(
                "part",
                format!("part {i}: the NF4 weight dequantizes to {shape:?}, the group needs [{}, {}]", p.out_features, g.in_features),
            ));
        }
        if let Some(l) = p.lora {
            if l.r == 0 {
                return Err(invalid("part", format!("part {i}: LoRA rank is 0 (use lora: None for no adapter)")));
            }
            if !l.scale.is_finite() {
                return Err(invalid("part", format!("part {i}: LoRA scale is {}", l.scale)));
            }
            if let Some(d) = l.dropout {
                if !(0.0..1.0).contains(&d.p) {
                    return Err(invalid("part", format!("part {i}: LoRA dropout probability {} is outside [0, 1)", d.p)));
                }
            }
            for (name, ptr) in [("a", l.a), ("b", l.b)] {
                if ptr == 0 {
                    return Err(invalid("part", format!("part {i}: LoRA `{name}` is a null pointer")));
                }
            }
            if backward {
                for (name, ptr) in [("da", l.da), ("db", l.db)] {
                    if ptr == 0 {
                        return Err(invalid("part", format!("part {i}: LoRA gradient `{name}` is a null pointer")));
                    }
                }
            }
        }
    }
    let (o, r) = (g.out_features(), g.lora_rank_sum());
    for (name, v) in [("rows", rows), ("in_features", g.in_features), ("out_features (sum)", o)] {
        if !fits(v) {
            return Err(invalid("group", format!("{name} = {v} does not fit cuBLAS's 32-bit int")));
        }
    }
    Ok((o, r))
}

fn check_ld(arg: &'static str, ld: usize, cols: usize) -> Result<(), GpuError> {
    if ld < cols {
        return Err(invalid(arg, format!("row stride {ld} is less than the {cols} columns")));
    }
    if ld > i32::MAX as usize {
        return Err(invalid(arg, format!("row stride {ld} does not fit cuBLAS's 32-bit int")));
    }
    Ok(())
}

fn check_common(blas: &Blas, g: &Group, rows: usize, scratch: u64, scratch_len: usize, stream: CUstream) -> Result<Layout, GpuError> {
    if blas.stream() != stream {
        return Err(invalid("blas", "the cuBLAS handle is bound to another stream than `stream`"));
    }
    let lay = layout(g, rows);
    if scratch == 0 || scratch % 16 != 0 {
        return Err(invalid("scratch", "must be a non-null, 16-byte aligned device address"));
    }
    if scratch_len < lay.total {
        return Err(invalid("scratch_bytes", format!("{scratch_len} bytes given, {} needed (scratch_bytes(group, {rows}))", lay.total)));
    }
    Ok(lay)
}

/// Dequantizes every part into consecutive rows of `W` in scratch, row stride `ldw`
/// (`in`: dense; `in + R`: the fused forward's `W'`, the tail columns left for `Bd`).
unsafe fn dequant_group(g: &Group, w: u64, ldw: usize, stream: CUstream) -> Result<(), GpuError> {
    let e = g.dtype.size() as u64;
    let mut row = 0u64;
    for p in g.parts {
        let args = p.weight.weight.dequant_args(w + row * ldw as u64 * e, nf4_dtype(g.dtype));
        if ldw == g.in_features {
            nf4::gpu::launch_dequant(&args, stream)?;
        } else {
            nf4::gpu::launch_dequant_rows(&args, g.in_features as u64, ldw as u64, stream)?;
        }
        row += p.out_features as u64;
    }
    Ok(())
}

/// The fused forward's `Bd`: columns `in .. in + R` of `W' [O, in + R]` (`w` is `W'`):
/// part `p`'s rows hold `s_p B_p` (rounded once to the compute dtype) in its own column
/// block `rc_p .. rc_p + r_p`, zeros elsewhere (`linear.cu`'s `lora_bd_*`, one launch per
/// part).
unsafe fn write_bd(g: &Group, w: u64, stream: CUstream) -> Result<(), GpuError> {
    let name = match g.dtype {
        Dtype::Bf16 => "lora_bd_bf16",
        _ => "lora_bd_f16",
    };
    let f = function_in_current_context(source(), name)?;
    let e = g.dtype.size() as u64;
    let (inf, r_all) = (g.in_features, g.lora_rank_sum());
    let ld = inf + r_all;
    let (mut row, mut rc) = (0usize, 0usize);
    for p in g.parts {
        let (b, r, scale) = p.lora.map_or((0, 0, 0.0), |l| (l.b, l.r, l.scale));
        let n = (p.out_features * r_all) as u64;
        let (mut dst, mut ld_, mut rows_, mut rr, mut bp, mut r_, mut g0, mut sc) =
            (w + ((row * ld + inf) as u64) * e, ld as i64, p.out_features as i64, r_all as i64, b, r as i64, rc as i64, scale);
        let mut args: [*mut c_void; 8] = [
            &mut dst as *mut _ as *mut c_void,
            &mut ld_ as *mut _ as *mut c_void,
            &mut rows_ as *mut _ as *mut c_void,
            &mut rr as *mut _ as *mut c_void,
            &mut bp as *mut _ as *mut c_void,
            &mut r_ as *mut _ as *mut c_void,
            &mut g0 as *mut _ as *mut c_void,
            &mut sc as *mut _ as *mut c_void,
        ];
        launch(f, n.div_ceil(256).clamp(1, 4096) as u32, 256, 0, stream, &mut args)?;
        row += p.out_features;
        rc += r;
    }
    Ok(())
}

/// `[A_0; A_1; ...]` (the adapted parts' `A`, `R` rows of `in`) copied to `dst`.
unsafe fn copy_a(g: &Group, dst: u64, stream: CUstream) -> Result<(), GpuError> {
    let row_bytes = (g.in_features * g.dtype.size()) as u64;
    let mut at = dst;
    for l in g.parts.iter().filter_map(|p| p.lora) {
        let bytes = l.r as u64 * row_bytes;
        drv::cuMemcpyDtoDAsync_v2(at, l.a, bytes as usize, stream).result().map_err(GpuError::driver("cuMemcpyDtoDAsync"))?;
        at += bytes;
    }
    Ok(())
}

/// The stacked `A [R, in]`: the parts' own buffers when contiguous, else a copy in
/// scratch at `dst`.
unsafe fn stacked_a(g: &Group, dst: u64, stream: CUstream) -> Result<u64, GpuError> {
    let row_bytes = (g.in_features * g.dtype.size()) as u64;
    let adapters: Vec<LoraRef> = g.parts.iter().filter_map(|p| p.lora).collect();
    let contiguous = adapters.windows(2).all(|w| w[1].a == w[0].a + w[0].r as u64 * row_bytes);
    if contiguous {
        return Ok(adapters[0].a);
    }
    copy_a(g, dst, stream)?;
    Ok(dst)
}

/// Writes the biases into `y` (see `linear.cu`); returns the beta the base GEMM must use.
unsafe fn bias_prologue(g: &Group, rows: usize, y: u64, ldy: usize, y_dt: Dtype, beta: f32, stream: CUstream) -> Result<f32, GpuError> {
    if g.parts.iter().all(|p| p.bias == 0) {
        return Ok(beta);
    }
    let name = match (y_dt, g.dtype, beta != 0.0) {
        (Dtype::F32, Dtype::Bf16, _) => "bias_add_f32_bf16",
        (Dtype::F32, _, _) => "bias_add_f32_f16",
        (_, Dtype::Bf16, true) => "bias_add_16_bf16",
        (_, _, true) => "bias_add_16_f16",
        _ => "bias_fill_16",
    };
    let f = function_in_current_context(source(), name)?;
    let ye = y_dt.size() as u64;
    let mut col = 0usize;
    for p in g.parts {
        let accumulate = beta != 0.0;
        // Accumulating: a part without bias keeps y as it is.
        if !(p.bias == 0 && accumulate) {
            let n = rows as u64 * p.out_features as u64;
            let grid = n.div_ceil(256).clamp(1, 8192) as u32;
            let (mut yp, mut ld, mut b, mut r, mut c, mut acc) =
                (y + col as u64 * ye, ldy as i64, p.bias, rows as i64, p.out_features as i64, accumulate as i32);
            let mut args: Vec<*mut c_void> = vec![
                &mut yp as *mut _ as *mut c_void,
                &mut ld as *mut _ as *mut c_void,
                &mut b as *mut _ as *mut c_void,
                &mut r as *mut _ as *mut c_void,
                &mut c as *mut _ as *mut c_void,
            ];
            if y_dt == Dtype::F32 {
                args.push(&mut acc as *mut _ as *mut c_void);
            }
            launch(f, grid, 256, 0, stream, &mut args)?;
        }
        col += p.out_features;
    }
    Ok(1.0)
}

/// Forward of group `g` over `rows` rows:
/// `y[rows, O] (row stride ldy) = beta * y + x W^T + bias + sum_p s_p (x A_p^T) B_p^T`,
/// and `xa [rows, R]` (compute dtype, row stride `ldxa`) = each adapted part's `x A_p^T`,
/// kept for the backward (`xa` may be 0 when `R == 0`).
///
/// `x`: compute dtype `[rows, in]`, row stride `ldx`. `y_dt` is the compute dtype or
/// `F32`; `beta` is 0 (overwrite) or 1 (accumulate: the model adds the `o_proj` /
/// `down_proj` outputs into its residual stream). `scratch` holds
/// [`scratch_bytes`]`(g, rows)` bytes, 16-byte aligned.
///
/// **Fused adapter** (opt in): when `xa == x + in` elements and `ldxa == ldx` (so
/// `ldx >= in + R`), `xa` is written into the columns `in .. in + R` of `x`'s own rows and
/// the whole output is one GEMM over `x' = [x | xa]` and `W' = [W | Bd]` (see the module
/// docs): `y` is written once, rounded once. Otherwise `xa` is its own matrix
/// (`ldxa >= R`) and the adapters add onto `y` in GEMMs of their own (a 16-bit `y` then
/// rounded once by the base GEMM and once per adapter GEMM, as PEFT's
/// `base(x) + lora(x)` is).
///
/// Queues work on `stream` (which must be `blas`'s); never allocates or synchronizes.
///
/// # Safety
/// Every address must be a device allocation of the current context (the one `blas` and
/// the NF4 weights belong to) of the size its shape, stride and dtype imply, valid until
/// the queued work has run; `y` must not overlap `x`, `xa` or scratch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward(
    blas: &Blas,
    g: &Group,
    rows: usize,
    x: u64,
    ldx: usize,
    y: u64,
    ldy: usize,
    y_dt: Dtype,
    beta: f32,
    xa: u64,
    ldxa: usize,
    scratch: u64,
    scratch_bytes: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    let (o, r) = check_group(g, rows, false)?;
    check_ld("ldx", ldx, g.in_features)?;
    check_ld("ldy", ldy, o)?;
    if x == 0 || y == 0 {
        return Err(invalid(if x == 0 { "x" } else { "y" }, "is a null pointer"));
    }
    if r > 0 && xa == 0 {
        return Err(invalid("xa", format!("is a null pointer but the group has adapters (R = {r})")));
    }
    let fused = is_fused(g, x, ldx, xa, ldxa, r)?;
    if y_dt != g.dtype && y_dt != Dtype::F32 {
        return Err(invalid("y_dt", format!("must be the compute dtype {} or f32, got {}", g.dtype.name(), y_dt.name())));
    }
    if beta != 0.0 && beta != 1.0 {
        return Err(invalid("beta", format!("must be 0 (overwrite) or 1 (accumulate), got {beta}")));
    }
    let lay = check_common(blas, g, rows, scratch, scratch_bytes, stream)?;
    let (dt, ydt) = (blas_dtype(g.dtype), blas_dtype(y_dt));
    let (e, ye) = (g.dtype.size() as u64, y_dt.size() as u64);
    let w = scratch + lay.w as u64;
    let inf = g.in_features;

    if fused {
        // W' = [W | Bd] [O, in + R]; xa into x's tail; y (+)= [x | xa] W'^T, one GEMM.
        let k = inf + r;
        dequant_group(g, w, k, stream)?;
        write_bd(g, w, stream)?;
        adapter_input(blas, g, rows, x, ldx, xa, ldxa, r, scratch, &lay, stream)?;
        let base_beta = bias_prologue(g, rows, y, ldy, y_dt, beta, stream)?;
        return blas.gemm("linear forward: y = [x|xa] [W|sB]^T", Op::T, Op::N, o, rows, k, 1.0, Mat::new(w, dt, k), Mat::new(x, dt, ldx), base_beta, Mat::new(y, ydt, ldy));
    }
    dequant_group(g, w, inf, stream)?;
    let base = |beta: f32| {
        // y^T [O, rows] = W [O, in] x^T (column-major view of row-major y = x W^T).
        blas.gemm("linear forward: y = x W^T", Op::T, Op::N, o, rows, inf, 1.0, Mat::new(w, dt, inf), Mat::new(x, dt, ldx), beta, Mat::new(y, ydt, ldy))
    };
    // When every part has an adapter and y is overwritten, the adapter GEMMs write y first
    // (write-only) and the base GEMM adds onto it in its epilogue: one pass over y fewer
    // than adding the adapters afterwards (read + write per part), and y is still fully
    // written before anyone reads it.
    let lora_first = r > 0 && beta == 0.0 && g.parts.iter().all(|p| p.lora.is_some() && p.bias == 0);
    if !lora_first {
        let base_beta = bias_prologue(g, rows, y, ldy, y_dt, beta, stream)?;
        base(base_beta)?;
    }
    if r == 0 {
        return Ok(());
    }
    adapter_input(blas, g, rows, x, ldx, xa, ldxa, r, scratch, &lay, stream)?;
    let (mut col, mut rc) = (0usize, 0usize);
    for p in g.parts {
        if let Some(l) = p.lora {
            // y_p^T [out_p, rows] (+)= s B_p [out_p, r] xa_p^T [r, rows].
            blas.gemm(
                "linear forward: y += s xa B^T",
                Op::T,
                Op::N,
                p.out_features,
                rows,
                l.r,
                l.scale,
                Mat::new(l.b, dt, l.r),
                Mat::new(xa + rc as u64 * e, dt, ldxa),
                if lora_first { 0.0 } else { 1.0 },
                Mat::new(y + col as u64 * ye, ydt, ldy),
            )?;
            rc += l.r;
        }
        col += p.out_features;
    }
    if lora_first {
        base(1.0)?;
    }
    Ok(())
}

/// Whether `xa` is `x`'s tail (the fused forward); checks the strides either way.
fn is_fused(g: &Group, x: u64, ldx: usize, xa: u64, ldxa: usize, r: usize) -> Result<bool, GpuError> {
    if r == 0 {
        return Ok(false);
    }
    let inf = g.in_features;
    if x != 0 && xa == x + (inf * g.dtype.size()) as u64 && ldxa == ldx {
        if ldx < inf + r {
            return Err(invalid("ldx", format!("row stride {ldx}: xa in x's tail needs in + R = {} columns", inf + r)));
        }
        return Ok(true);
    }
    check_ld("ldxa", ldxa, r)?;
    Ok(false)
}

/// Only the adapters' input products of [`forward`]: `xa [rows, R] = x A_p^T` per adapted
/// part (`xd_p A_p^T` with dropout, the same masks as [`forward`]), without the base GEMM,
/// the dequantization or `y`. For a recomputed forward whose output nobody reads
/// (activation checkpointing recomputes the last projection of a layer only for what its
/// backward needs: `xa`). Does nothing when `R == 0`.
///
/// # Safety
/// As [`forward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn forward_adapter_input(
    blas: &Blas,
    g: &Group,
    rows: usize,
    x: u64,
    ldx: usize,
    xa: u64,
    ldxa: usize,
    scratch: u64,
    scratch_bytes: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    let (_, r) = check_group(g, rows, false)?;
    check_ld("ldx", ldx, g.in_features)?;
    if r == 0 {
        return Ok(());
    }
    if x == 0 || xa == 0 {
        return Err(invalid(if x == 0 { "x" } else { "xa" }, "is a null pointer"));
    }
    is_fused(g, x, ldx, xa, ldxa, r)?;
    let lay = check_common(blas, g, rows, scratch, scratch_bytes, stream)?;
    adapter_input(blas, g, rows, x, ldx, xa, ldxa, r, scratch, &lay, stream)
}

/// `xa [rows, R] (row stride ldxa) = x A^T` over the stacked `A` (copied to scratch when
/// the parts' `A` are not contiguous); with dropout on a part, part by part, each dropped
/// part reading its `xd_p` (written into scratch). `xa` may be `x`'s tail: the GEMMs read
/// only `x`'s first `in` columns.
#[allow(clippy::too_many_arguments)]
unsafe fn adapter_input(blas: &Blas, g: &Group, rows: usize, x: u64, ldx: usize, xa: u64, ldxa: usize, r: usize, scratch: u64, lay: &Layout, stream: CUstream) -> Result<(), GpuError> {
    let dt = blas_dtype(g.dtype);
    let inf = g.in_features;
    if !g.has_dropout() {
        let a = stacked_a(g, scratch + lay.a as u64, stream)?;
        // xa^T [R, rows] = A [R, in] x^T.
        return blas.gemm("linear forward: xa = x A^T", Op::T, Op::N, r, rows, inf, 1.0, Mat::new(a, dt, inf), Mat::new(x, dt, ldx), 0.0, Mat::new(xa, dt, ldxa));
    }
    let xd = scratch + lay.d as u64;
    let e = g.dtype.size() as u64;
    let mut rc = 0usize;
    for l in g.parts.iter().filter_map(|p| p.lora) {
        let (src, ld) = match l.active_dropout() {
            Some(d) => {
                dropout_input(g.dtype, x, ldx, rows, inf, &d, xd, inf, stream)?;
                (xd, inf)
            }
            None => (x, ldx),
        };
        // xa_p^T [r, rows] = A_p [r, in] xd_p^T.
        blas.gemm("linear forward: xa_p = xd_p A_p^T", Op::T, Op::N, l.r, rows, inf, 1.0, Mat::new(l.a, dt, inf), Mat::new(src, dt, ld), 0.0, Mat::new(xa + rc as u64 * e, dt, ldxa))?;
        rc += l.r;
    }
    Ok(())
}

/// Backward of group `g` over `rows` rows, with `x` and `xa` as given to / written by
/// [`forward`]:
/// `dx [rows, in] (dx_dt, row stride lddx) = dx_beta * dx + dy W + sum_p s_p g_p A_p`
/// (`g_p = dy_p B_p`), and per adapted part `dB_p += s_p dy_p^T xa_p`,
/// `dA_p += s_p g_p^T x` (f32). With dropout on part `p` (the forward's), its `dx` term is
/// `D_p ⊙ (s_p g_p A_p) / (1 - p)` and `dA_p += s_p g_p^T xd_p` (see the module docs).
///
/// `dy`: compute dtype `[rows, O]`, row stride `lddy`. `xa`: row stride `ldxa` (`x`'s tail
/// as the fused forward left it, or its own matrix). `dx_dt` is f32 or the compute dtype
/// (then rounded by each of the two `dx` GEMMs, as PEFT's bf16 backward is). `dx_beta` 0
/// overwrites `dx` (its old contents are not read), 1 accumulates. `dx` 0: no input
/// gradient (the first layer above a frozen embedding): the base GEMM, the weight's
/// dequantization and the adapters' `dx` terms are skipped, `dA`/`dB` computed as always.
///
/// **Fused adapter** (opt in, `dy_tail`): the caller's `dy` has `R` more columns per row
/// (`lddy >= O + R`) that this call may overwrite: `g'` is written there and `dx` is one
/// GEMM over `dy' = [dy | g']` and `W'' = [W ; A]` (see the module docs). Not with dropout
/// on a part (its `dx` term is masked): then `g'` goes to scratch as without `dy_tail`,
/// and the tail is not written.
///
/// # Safety
/// As [`forward`]; `dx` must not overlap any other operand.
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward(
    blas: &Blas,
    g: &Group,
    rows: usize,
    x: u64,
    ldx: usize,
    xa: u64,
    ldxa: usize,
    dy: u64,
    lddy: usize,
    dy_tail: bool,
    dx: u64,
    lddx: usize,
    dx_dt: Dtype,
    dx_beta: f32,
    scratch: u64,
    scratch_bytes: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    backward_impl(blas, g, rows, Some((x, ldx)), xa, ldxa, dy, lddy, dy_tail, dx, lddx, dx_dt, dx_beta, scratch, scratch_bytes, stream)
}

/// [`backward`] without the `dA` GEMM, for a caller whose `x` is not ready yet (the MLP's
/// `down`, whose input the SwiGLU backward recomputes after `down`'s `dx` is known): `g'`
/// stays in `dy`'s tail, and [`backward_a_grads`] finishes with the same `dy` once `x` is
/// written. Only the fused layout without dropout defers (`dy_tail`, no part dropping:
/// [`Group::has_dropout`]); anything else is an error. Between the two calls nothing may
/// write `dy`'s tail.
///
/// # Safety
/// As [`backward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward_deferring_a_grads(
    blas: &Blas,
    g: &Group,
    rows: usize,
    xa: u64,
    ldxa: usize,
    dy: u64,
    lddy: usize,
    dx: u64,
    lddx: usize,
    dx_dt: Dtype,
    dx_beta: f32,
    scratch: u64,
    scratch_bytes: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    if g.has_dropout() {
        return Err(invalid("group", "defers dA only without dropout (a dropped part reads its masked input)"));
    }
    backward_impl(blas, g, rows, None, xa, ldxa, dy, lddy, true, dx, lddx, dx_dt, dx_beta, scratch, scratch_bytes, stream)
}

/// The `dA` half of [`backward_deferring_a_grads`]: `dA_p += g'_p^T x` (f32) with `g'` in
/// `dy`'s tail (columns `O ..`, row stride `lddy`) as that call left it.
///
/// # Safety
/// As [`backward`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn backward_a_grads(blas: &Blas, g: &Group, rows: usize, x: u64, ldx: usize, dy: u64, lddy: usize, stream: CUstream) -> Result<(), GpuError> {
    let (o, r) = check_group(g, rows, true)?;
    if g.has_dropout() {
        return Err(invalid("group", "defers dA only without dropout (a dropped part reads its masked input)"));
    }
    check_ld("ldx", ldx, g.in_features)?;
    check_ld("lddy", lddy, o + r)?;
    if r == 0 {
        return Ok(());
    }
    if x == 0 || dy == 0 {
        return Err(invalid(if x == 0 { "x" } else { "dy" }, "is a null pointer"));
    }
    if blas.stream() != stream {
        return Err(invalid("blas", "the cuBLAS handle is bound to another stream than `stream`"));
    }
    // No scratch is read without dropout.
    a_grads(blas, g, rows, x, ldx, dy + (o * g.dtype.size()) as u64, lddy, 0, stream)
}

#[allow(clippy::too_many_arguments)]
unsafe fn backward_impl(
    blas: &Blas,
    g: &Group,
    rows: usize,
    x: Option<(u64, usize)>,
    xa: u64,
    ldxa: usize,
    dy: u64,
    lddy: usize,
    dy_tail: bool,
    dx: u64,
    lddx: usize,
    dx_dt: Dtype,
    dx_beta: f32,
    scratch: u64,
    scratch_bytes: usize,
    stream: CUstream,
) -> Result<(), GpuError> {
    let (o, r) = check_group(g, rows, true)?;
    // `None`: dA deferred to [`backward_a_grads`] (x not read here).
    let defer = x.is_none();
    let (x, ldx) = x.unwrap_or((0, g.in_features));
    if dx_dt != g.dtype && dx_dt != Dtype::F32 {
        return Err(invalid("dx_dt", format!("must be the compute dtype {} or f32, got {}", g.dtype.name(), dx_dt.name())));
    }
    let dxt = blas_dtype(dx_dt);
    check_ld("ldx", ldx, g.in_features)?;
    check_ld("lddy", lddy, if dy_tail { o + r } else { o })?;
    check_ld("lddx", lddx, g.in_features)?;
    if dy == 0 {
        return Err(invalid("dy", "is a null pointer"));
    }
    // dx 0: no input gradient wanted (see `backward`).
    let want_dx = dx != 0;
    if r > 0 && ((!defer && x == 0) || xa == 0) {
        return Err(invalid(if x == 0 { "x" } else { "xa" }, format!("is a null pointer but the group has adapters (R = {r})")));
    }
    if r > 0 {
        check_ld("ldxa", ldxa, r)?;
    }
    if !dx_beta.is_finite() {
        return Err(invalid("dx_beta", format!("is {dx_beta}")));
    }
    let lay = check_common(blas, g, rows, scratch, scratch_bytes, stream)?;
    let dt = blas_dtype(g.dtype);
    let e = g.dtype.size() as u64;
    let w = scratch + lay.w as u64;
    let inf = g.in_features;
    let dropout = g.has_dropout();
    let fused = dy_tail && r > 0 && !dropout;
    // Where g' [rows, R] goes: dy's tail (fused) or scratch.
    let (gbuf, ldg) = if fused { (dy + o as u64 * e, lddy) } else { (scratch + lay.g as u64, r) };

    // g' and dB in one pass over dy where it applies (no dropout, ranks 8/16/32/64, at most
    // 4 adapted parts), before the dequantization: its f32 partials use W's scratch.
    let mode = lora_pass();
    let mut pass = if r > 0 && mode != LoraPass::Cublas { pass_plan(g, rows) } else { None };
    if let Some(plan) = &pass {
        match pass_kernel(plan, mode, rows, g.dtype.size())? {
            Some(portable) => run_pass(g, plan, rows, dy, lddy, xa, ldxa, gbuf, ldg, w, portable, stream)?,
            None => pass = None,
        }
    }
    if want_dx {
        dequant_group(g, w, inf, stream)?;
    }
    // g'_p^T [r, rows] = s B_p^T [r, out_p] dy_p^T [out_p, rows]  (B_p row-major [out, r] is
    // column-major [r, out]).
    let (mut col, mut rc) = (0usize, 0usize);
    for p in g.parts.iter().filter(|_| pass.is_none()) {
        if let Some(l) = p.lora {
            blas.gemm(
                "linear backward: g = s dy B",
                Op::N,
                Op::N,
                l.r,
                rows,
                p.out_features,
                l.scale,
                Mat::new(l.b, dt, l.r),
                Mat::new(dy + col as u64 * e, dt, lddy),
                0.0,
                Mat::new(gbuf + rc as u64 * e, dt, ldg),
            )?;
            rc += l.r;
        }
        col += p.out_features;
    }
    // dx^T [in, rows] = W^T [in, O] dy^T [O, rows]  (W row-major [O, in] is column-major [in, O]).
    let base = |beta: f32| {
        blas.gemm("linear backward: dx = dy W", Op::N, Op::N, inf, rows, o, 1.0, Mat::new(w, dt, inf), Mat::new(dy, dt, lddy), beta, Mat::new(dx, dxt, lddx))
    };
    if r == 0 {
        return if want_dx { base(dx_beta) } else { Ok(()) };
    }
    let adapters: Vec<LoraRef> = g.parts.iter().filter_map(|p| p.lora).collect();
    if !want_dx {
        // only the adapters' own gradients below
    } else if fused {
        // W'' = [W ; A] [O + R, in]: the stacked A right below W. dx^T [in, rows] (+)=
        // W''^T [in, O + R] dy'^T [O + R, rows], one GEMM.
        copy_a(g, w + (o * inf) as u64 * e, stream)?;
        blas.gemm("linear backward: dx = [dy|g] [W;A]", Op::N, Op::N, inf, rows, o + r, 1.0, Mat::new(w, dt, inf), Mat::new(dy, dt, lddy), dx_beta, Mat::new(dx, dxt, lddx))?;
    } else if !dropout {
        let a = stacked_a(g, scratch + lay.a as u64, stream)?;
        // dx^T [in, rows] (+)= A^T [in, R] g'^T [R, rows]. Overwriting dx, the small adapter
        // GEMM writes it first and the base GEMM adds in its epilogue (one pass over dx fewer).
        if dx_beta == 0.0 {
            blas.gemm("linear backward: dx = g A", Op::N, Op::N, inf, rows, r, 1.0, Mat::new(a, dt, inf), Mat::new(gbuf, dt, ldg), 0.0, Mat::new(dx, dxt, lddx))?;
            base(1.0)?;
        } else {
            base(dx_beta)?;
            blas.gemm("linear backward: dx += g A", Op::N, Op::N, inf, rows, r, 1.0, Mat::new(a, dt, inf), Mat::new(gbuf, dt, ldg), 1.0, Mat::new(dx, dxt, lddx))?;
        }
    } else {
        base(dx_beta)?;
        let mut dropped = Vec::new();
        let mut rc = 0usize;
        for l in &adapters {
            match l.active_dropout() {
                // dx^T [in, rows] += A_p^T [in, r] g'_p^T [r, rows].
                None => blas.gemm(
                    "linear backward: dx += g_p A_p",
                    Op::N,
                    Op::N,
                    inf,
                    rows,
                    l.r,
                    1.0,
                    Mat::new(l.a, dt, inf),
                    Mat::new(gbuf + rc as u64 * e, dt, ldg),
                    1.0,
                    Mat::new(dx, dxt, lddx),
                )?,
                Some(d) => dropped.push(DroppedPart { a: l.a, r: l.r, g_col: rc, dropout: d }),
            }
            rc += l.r;
        }
        // dx += sum_p D_p ⊙ (g'_p A_p) / (1 - p), one pass.
        dropout_lora_dx(dx_dt, g.dtype, dx, lddx, gbuf, ldg, rows, inf, &dropped, stream)?;
    }
    let (mut col, mut rc) = (0usize, 0usize);
    for p in g.parts.iter().filter(|_| pass.is_none()) {
        if let Some(l) = p.lora {
            // dB_p (column-major [r, out_p]) += s xa_p^T [r, rows] dy_p [rows, out_p].
            blas.gemm(
                "linear backward: dB += s dy^T xa",
                Op::N,
                Op::T,
                l.r,
                p.out_features,
                rows,
                l.scale,
                Mat::new(xa + rc as u64 * e, dt, ldxa),
                Mat::new(dy + col as u64 * e, dt, lddy),
                1.0,
                Mat::new(l.db, DataType::F32, l.r),
            )?;
            rc += l.r;
        }
        col += p.out_features;
    }
    if defer {
        return Ok(());
    }
    a_grads(blas, g, rows, x, ldx, gbuf, ldg, scratch + lay.d as u64, stream)
}

/// `dA_p += g'_p^T x` (f32) with `g'` at `gbuf` (row stride `ldg`): one GEMM over all parts
/// when their dA buffers are contiguous and no part drops; else per part, a dropped part
/// reading its regenerated `xd_p` (written to `xd`, scratch).
#[allow(clippy::too_many_arguments)]
unsafe fn a_grads(blas: &Blas, g: &Group, rows: usize, x: u64, ldx: usize, gbuf: u64, ldg: usize, xd: u64, stream: CUstream) -> Result<(), GpuError> {
    let dt = blas_dtype(g.dtype);
    let e = g.dtype.size() as u64;
    let inf = g.in_features;
    let adapters: Vec<LoraRef> = g.parts.iter().filter_map(|p| p.lora).collect();
    let r: usize = adapters.iter().map(|l| l.r).sum();
    let row_bytes = (inf * 4) as u64;
    let contiguous = adapters.windows(2).all(|w| w[1].da == w[0].da + w[0].r as u64 * row_bytes);
    if !g.has_dropout() && contiguous {
        return blas.gemm("linear backward: dA += g^T x", Op::N, Op::T, inf, r, rows, 1.0, Mat::new(x, dt, ldx), Mat::new(gbuf, dt, ldg), 1.0, Mat::new(adapters[0].da, DataType::F32, inf));
    }
    let mut rc = 0usize;
    for l in &adapters {
        let (src, ld) = match l.active_dropout() {
            Some(d) => {
                dropout_input(g.dtype, x, ldx, rows, inf, &d, xd, inf, stream)?;
                (xd, inf)
            }
            None => (x, ldx),
        };
        blas.gemm(
            "linear backward: dA += g^T xd",
            Op::N,
            Op::T,
            inf,
            l.r,
            rows,
            1.0,
            Mat::new(src, dt, ld),
            Mat::new(gbuf + rc as u64 * e, dt, ldg),
            1.0,
            Mat::new(l.da, DataType::F32, inf),
        )?;
        rc += l.r;
    }
    Ok(())
}

// ---- The one-pass backward for g' and dB (`linear.cu`'s `lora_pass_*`) ----

/// Which code computes the backward's `g' = s dy B` and `dB += s dy^T xa` on a group
/// without dropout (see the module docs, "GEMMs"). A per-thread setting (the calls made
/// from this thread follow it), for benchmarks and tests; the default is [`LoraPass::Auto`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraPass {
    /// The tensor-core pass where it applies (ranks 8, 16, 32, 64; at most 4 adapted
    /// parts; no dropout; sm_80 or newer; its shared memory fits) *and* pays: the group
    /// has two or more adapted parts (one launch instead of a GEMM per part and per
    /// gradient) or the adapted parts' `dy` is larger than the L2 cache (the GEMMs' second
    /// read of a `dy` that fits in L2 costs little: on the H100 the pass measured a few
    /// µs slower than cuBLAS for `o` and `down`, 33.5 MB of `dy`). cuBLAS otherwise.
    #[default]
    Auto,
    /// The pass wherever it applies, whatever it costs: the tensor-core kernel on sm_80
    /// and newer (where its shared memory fits), the portable one below sm_80.
    Always,
    /// cuBLAS: one GEMM per part for `g'`, one per part for `dB` (the path before the
    /// one-pass kernel), reading `dy` twice.
    Cublas,
    /// The portable one-pass kernel (plain f32 FMAs, any architecture; what sm_75 runs)
    /// wherever the pass applies: to test it on newer cards.
    Portable,
}

/// Default target (upper bound) of blocks per pass launch: two per SM of an H100 (132
/// SMs), the resident count at the kernel's shared memory (at most 122 KiB a block).
pub const LORA_PASS_TARGET_BLOCKS: usize = 264;

thread_local! {
    static PASS_MODE: Cell<LoraPass> = const { Cell::new(LoraPass::Auto) };
    static PASS_TARGET: Cell<usize> = const { Cell::new(LORA_PASS_TARGET_BLOCKS) };
}

/// Sets this thread's [`LoraPass`].
pub fn set_lora_pass(mode: LoraPass) {
    PASS_MODE.with(|m| m.set(mode));
}

/// This thread's [`LoraPass`].
pub fn lora_pass() -> LoraPass {
    PASS_MODE.with(|m| m.get())
}

/// Sets this thread's target of blocks per pass launch (0: [`LORA_PASS_TARGET_BLOCKS`]).
/// The pass splits the rows into `max(1, floor(target / spans))` chunks (`spans`: 128-, 256- or
/// 512-column spans over all parts), at least 64 rows each: more blocks, more f32 `dB`
/// partials. [`scratch_bytes`] depends on it.
pub fn set_lora_pass_target_blocks(n: usize) {
    PASS_TARGET.with(|t| t.set(if n == 0 { LORA_PASS_TARGET_BLOCKS } else { n }));
}

/// `LP_BM`, `LP_BN`, `LP_MAX_PARTS`, `LP_THREADS` of `linear.cu`.
const LP_BM: usize = 64;
const LP_BN: usize = 128;
const LP_MAX_PARTS: usize = 4;
const LP_THREADS: u32 = 256;

/// Columns of one block's span at rank `r` (`LpShape<R>::CS`).
fn lp_span_cols(r: usize) -> usize {
    LP_BN * if r <= 16 { 4 } else if r <= 32 { 2 } else { 1 }
}

/// Dynamic shared memory of `lora_pass_*_r{r}`: the span's `B` and the staged tiles.
fn lp_smem_bytes(r: usize) -> usize {
    let (ldr, stages) = (r + 8, if r <= 32 { 4 } else { 3 });
    (lp_span_cols(r) * ldr + stages * (LP_BM * (LP_BN + 8) + LP_BM * ldr)) * 2
}

/// One adapted part in the pass.
#[derive(Clone, Copy, Debug)]
struct PassPart {
    /// First column in `dy`.
    col: usize,
    /// First column in `xa` / `g'`.
    rc: usize,
    out: usize,
    lora: LoraRef,
    /// Column spans (`ceil(out / lp_span_cols(r))`).
    nspan: usize,
    /// Byte offsets of its `g'` partials `[nspan][rows][r]` and `dB` partials
    /// `[nchunk][out][r]` (f32) in the partials' region.
    g_off: usize,
    d_off: usize,
}

#[derive(Clone, Debug)]
struct PassPlan {
    parts: Vec<PassPart>,
    nchunk: usize,
    chunk_rows: usize,
    /// Bytes of the partials' region.
    bytes: usize,
}

/// The pass's blocks and partials for `rows` rows of `g`, or `None` where it does not
/// apply (dropout on a part, a rank other than 8/16/32/64, more than 4 adapted parts, no
/// adapter). Independent of the device (scratch is sized from it).
fn pass_plan(g: &Group, rows: usize) -> Option<PassPlan> {
    if g.has_dropout() || rows == 0 {
        return None;
    }
    let mut parts = Vec::new();
    let (mut col, mut rc) = (0usize, 0usize);
    for p in g.parts {
        if let Some(l) = p.lora {
            if !matches!(l.r, 8 | 16 | 32 | 64) {
                return None;
            }
            let nspan = p.out_features.div_ceil(lp_span_cols(l.r));
            parts.push(PassPart { col, rc, out: p.out_features, lora: l, nspan, g_off: 0, d_off: 0 });
            rc += l.r;
        }
        col += p.out_features;
    }
    if parts.is_empty() || parts.len() > LP_MAX_PARTS {
        return None;
    }
    let spans: usize = parts.iter().map(|p| p.nspan).sum();
    let target = PASS_TARGET.with(|t| t.get());
    // At most `target` blocks (one wave of resident blocks: no tail wave).
    let want = (target / spans).clamp(1, rows.div_ceil(LP_BM));
    let chunk_rows = rows.div_ceil(want).div_ceil(LP_BM) * LP_BM;
    let nchunk = rows.div_ceil(chunk_rows);
    let mut off = 0usize;
    for p in &mut parts {
        p.g_off = off;
        off += up(p.nspan * rows * p.lora.r * 4);
        p.d_off = off;
        off += up(nchunk * p.out * p.lora.r * 4);
    }
    if spans * nchunk > i32::MAX as usize || rows > i32::MAX as usize {
        return None;
    }
    Some(PassPlan { parts, nchunk, chunk_rows, bytes: off })
}

/// `LoraPassParts` of `linear.cu` (same field order, C layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraPassArg {
    dy: [u64; LP_MAX_PARTS],
    b: [u64; LP_MAX_PARTS],
    xa: [u64; LP_MAX_PARTS],
    gpart: [u64; LP_MAX_PARTS],
    dbpart: [u64; LP_MAX_PARTS],
    out: [i32; LP_MAX_PARTS],
    first_block: [i32; LP_MAX_PARTS + 1],
    n: i32,
}

/// `LoraReduceParts` of `linear.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraReduceArg {
    gpart: [u64; LP_MAX_PARTS],
    dbpart: [u64; LP_MAX_PARTS],
    db: [u64; LP_MAX_PARTS],
    gfirst: [i64; LP_MAX_PARTS + 1],
    dfirst: [i64; LP_MAX_PARTS + 1],
    r: [i32; LP_MAX_PARTS],
    goff: [i32; LP_MAX_PARTS],
    nspan: [i32; LP_MAX_PARTS],
    scale: [f32; LP_MAX_PARTS],
    n: i32,
}

/// An attribute of the current context's device.
fn device_attribute(a: drv::CUdevice_attribute) -> Result<i32, GpuError> {
    let mut dev: drv::CUdevice = 0;
    // SAFETY: out-pointers to locals; errors (no context) come back as results.
    unsafe {
        drv::cuCtxGetDevice(&mut dev).result().map_err(GpuError::driver("cuCtxGetDevice"))?;
        let mut v = 0i32;
        drv::cuDeviceGetAttribute(&mut v, a, dev).result().map_err(GpuError::driver("cuDeviceGetAttribute"))?;
        Ok(v)
    }
}

/// Which pass kernel runs `plan` (`rows` rows, `e` bytes per `dy` element) under `mode`
/// here (see [`LoraPass`]): `Some(true)` the portable one, `Some(false)` the tensor-core
/// one, `None` neither (cuBLAS): `Cublas`; below sm_80 unless forced; shared memory that
/// does not fit (99 KiB on sm_86 / sm_89 at rank <= 32); `Auto` where it does not pay.
fn pass_kernel(plan: &PassPlan, mode: LoraPass, rows: usize, e: usize) -> Result<Option<bool>, GpuError> {
    use drv::CUdevice_attribute as A;
    let old_arch = || Ok::<bool, GpuError>(device_attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? < 8);
    match mode {
        LoraPass::Cublas => return Ok(None),
        LoraPass::Portable => return Ok(Some(true)),
        LoraPass::Always if old_arch()? => return Ok(Some(true)),
        LoraPass::Auto if old_arch()? => return Ok(None),
        _ => {}
    }
    let optin = device_attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
    if !plan.parts.iter().all(|p| lp_smem_bytes(p.lora.r) <= optin) {
        return Ok(None);
    }
    if mode == LoraPass::Auto && plan.parts.len() < 2 {
        let dy_bytes = rows * plan.parts.iter().map(|p| p.out).sum::<usize>() * e;
        if dy_bytes <= device_attribute(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(0) as usize {
            return Ok(None);
        }
    }
    Ok(Some(false))
}

/// Loads `name` and allows it `smem` bytes of dynamic shared memory (once per function).
fn function_with_smem(name: &str, smem: usize) -> Result<cudakit::kernel::Function, GpuError> {
    let f = function_in_current_context(source(), name)?;
    if smem > 48 << 10 {
        static DONE: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
        let done = DONE.get_or_init(Default::default);
        let key = f.0 as usize;
        if !done.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            // SAFETY: `f` is a live function handle of the current context.
            unsafe { drv::cuFuncSetAttribute(f.0, drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32) }
                .result()
                .map_err(GpuError::driver("cuFuncSetAttribute"))?;
            done.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        }
    }
    Ok(f)
}

/// The one pass over `dy`: `g' [rows, R]` (compute dtype, at `gbuf`, row stride `ldg`)
/// `= s_p dy_p B_p` per part and `dB_p += s_p dy_p^T xa_p`, the f32 partials in `region`
/// (`plan.bytes`). One `lora_pass_*` launch per distinct rank (usually one), then one
/// reduce for every part. `portable`: the scalar kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn run_pass(g: &Group, plan: &PassPlan, rows: usize, dy: u64, lddy: usize, xa: u64, ldxa: usize, gbuf: u64, ldg: usize, region: u64, portable: bool, stream: CUstream) -> Result<(), GpuError> {
    let e = g.dtype.size() as u64;
    let dname = match g.dtype {
        Dtype::Bf16 => "bf16",
        _ => "f16",
    };
    let a16 = |v: u64| v % 16 == 0;
    let aligned = lddy % 8 == 0
        && ldxa % 8 == 0
        && plan.parts.iter().all(|p| a16(dy + p.col as u64 * e) && a16(xa + p.rc as u64 * e) && a16(p.lora.b) && p.out % 8 == 0);
    let mut ranks: Vec<usize> = Vec::new();
    for p in &plan.parts {
        if !ranks.contains(&p.lora.r) {
            ranks.push(p.lora.r);
        }
    }
    for &r in &ranks {
        let mut arg = LoraPassArg::default();
        let mut blocks = 0usize;
        let mut n = 0usize;
        for p in plan.parts.iter().filter(|p| p.lora.r == r) {
            arg.dy[n] = dy + p.col as u64 * e;
            arg.b[n] = p.lora.b;
            arg.xa[n] = xa + p.rc as u64 * e;
            arg.gpart[n] = region + p.g_off as u64;
            arg.dbpart[n] = region + p.d_off as u64;
            arg.out[n] = p.out as i32;
            arg.first_block[n] = blocks as i32;
            blocks += p.nspan * plan.nchunk;
            n += 1;
        }
        arg.first_block[n] = blocks as i32;
        arg.n = n as i32;
        let (mut lddy_, mut ldxa_, mut rows_, mut crows, mut nchunk) = (lddy as i64, ldxa as i64, rows as i32, plan.chunk_rows as i32, plan.nchunk as i32);
        if portable {
            let f = function_in_current_context(source(), &format!("lora_pass_scalar_{dname}"))?;
            let (mut r_, mut cs) = (r as i32, lp_span_cols(r) as i32);
            let mut args: [*mut c_void; 8] = [
                &mut arg as *mut _ as *mut c_void,
                &mut lddy_ as *mut _ as *mut c_void,
                &mut ldxa_ as *mut _ as *mut c_void,
                &mut rows_ as *mut _ as *mut c_void,
                &mut crows as *mut _ as *mut c_void,
                &mut nchunk as *mut _ as *mut c_void,
                &mut r_ as *mut _ as *mut c_void,
                &mut cs as *mut _ as *mut c_void,
            ];
            launch(f, blocks as u32, LP_THREADS, 0, stream, &mut args)?;
        } else {
            let smem = lp_smem_bytes(r);
            let f = function_with_smem(&format!("lora_pass_{dname}_r{r}"), smem)?;
            let mut al = aligned as i32;
            let mut args: [*mut c_void; 7] = [
                &mut arg as *mut _ as *mut c_void,
                &mut lddy_ as *mut _ as *mut c_void,
                &mut ldxa_ as *mut _ as *mut c_void,
                &mut rows_ as *mut _ as *mut c_void,
                &mut crows as *mut _ as *mut c_void,
                &mut nchunk as *mut _ as *mut c_void,
                &mut al as *mut _ as *mut c_void,
            ];
            launch(f, blocks as u32, LP_THREADS, smem as u32, stream, &mut args)?;
        }
    }
    let mut arg = LoraReduceArg::default();
    let (mut gf, mut df) = (0i64, 0i64);
    for (i, p) in plan.parts.iter().enumerate() {
        arg.gpart[i] = region + p.g_off as u64;
        arg.dbpart[i] = region + p.d_off as u64;
        arg.db[i] = p.lora.db;
        arg.gfirst[i] = gf;
        arg.dfirst[i] = df;
        gf += (rows * p.lora.r) as i64;
        df += (p.out * p.lora.r) as i64;
        arg.r[i] = p.lora.r as i32;
        arg.goff[i] = p.rc as i32;
        arg.nspan[i] = p.nspan as i32;
        arg.scale[i] = p.lora.scale;
    }
    let n = plan.parts.len();
    arg.gfirst[n] = gf;
    arg.dfirst[n] = df;
    arg.n = n as i32;
    let f = function_in_current_context(source(), &format!("lora_pass_reduce_{dname}"))?;
    // Blocks: 256 g' elements each, then 32 dB elements each (see `linear.cu`).
    let (gblocks, dblocks) = ((gf as u64).div_ceil(256), (df as u64).div_ceil(32));
    let (mut gp, mut ldg_, mut rows_, mut nchunk, mut gb) = (gbuf, ldg as i64, rows as i64, plan.nchunk as i32, gblocks as i64);
    let mut args: [*mut c_void; 6] = [
        &mut arg as *mut _ as *mut c_void,
        &mut gp as *mut _ as *mut c_void,
        &mut ldg_ as *mut _ as *mut c_void,
        &mut rows_ as *mut _ as *mut c_void,
        &mut nchunk as *mut _ as *mut c_void,
        &mut gb as *mut _ as *mut c_void,
    ];
    let blocks = gblocks + dblocks;
    if blocks > u32::MAX as u64 {
        return Err(invalid("rows", format!("{rows} rows need {blocks} reduce blocks")));
    }
    launch(f, blocks as u32, 256, 0, stream, &mut args)
}


fn check_dropout(d: &Dropout) -> Result<(), GpuError> {
    if !(0.0..1.0).contains(&d.p) {
        return Err(invalid("dropout", format!("probability {} is outside [0, 1)", d.p)));
    }
    Ok(())
}

/// `xd [rows, cols] (row stride ldxd) = D ⊙ x * scale` in the 16-bit dtype `dt`, `x` with
/// row stride `ldx`: element `(r, c)` is kept iff [`crate::dropout::keep`]`(d.seed, r * cols
/// + c, d.threshold())`, and is then `round(x * d.scale())` (one f32 product, rounded to
/// nearest even). Bit-identical to [`Dropout::apply`] followed by the same rounding.
///
/// # Safety
/// `x` and `xd` must be device allocations of the current context holding the strided
/// matrices; they must not overlap.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dropout_input(dt: Dtype, x: u64, ldx: usize, rows: usize, cols: usize, d: &Dropout, xd: u64, ldxd: usize, stream: CUstream) -> Result<(), GpuError> {
    let name = match dt {
        Dtype::Bf16 => "dropout_input_bf16",
        Dtype::F16 => "dropout_input_f16",
        Dtype::F32 => return Err(invalid("dt", "must be Bf16 or F16")),
    };
    check_dropout(d)?;
    check_ld("ldx", ldx, cols)?;
    check_ld("ldxd", ldxd, cols)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if x == 0 || xd == 0 {
        return Err(invalid(if x == 0 { "x" } else { "xd" }, "is a null pointer"));
    }
    let f = function_in_current_context(source(), name)?;
    let (mut x, mut ldx, mut xd, mut ldxd, mut rows_, mut cols_) = (x, ldx as i64, xd, ldxd as i64, rows as i64, cols as i64);
    let (mut seed, mut th, mut scale) = (d.seed, d.threshold(), d.scale());
    let mut args: [*mut c_void; 9] = [
        &mut x as *mut _ as *mut c_void,
        &mut ldx as *mut _ as *mut c_void,
        &mut xd as *mut _ as *mut c_void,
        &mut ldxd as *mut _ as *mut c_void,
        &mut rows_ as *mut _ as *mut c_void,
        &mut cols_ as *mut _ as *mut c_void,
        &mut seed as *mut _ as *mut c_void,
        &mut th as *mut _ as *mut c_void,
        &mut scale as *mut _ as *mut c_void,
    ];
    // One block per row (at most 32768: they stride over the rest).
    launch(f, rows.clamp(1, 32768) as u32, 256, 0, stream, &mut args)
}

/// One dropped part for [`dropout_lora_dx`]: its `A [r, cols]` (compute dtype), rank, first
/// column in `g'` and dropout.
#[derive(Clone, Copy, Debug)]
pub struct DroppedPart {
    /// `A_p [r, cols]`, compute dtype, row stride `cols`.
    pub a: u64,
    /// Rank `r_p`.
    pub r: usize,
    /// The part's first column in `g'`.
    pub g_col: usize,
    /// Its mask (`p > 0`).
    pub dropout: Dropout,
}

/// Parts per launch of `dropout_lora_dx_*` (`DROP_MAX_PARTS` in `linear.cu`).
const DROP_MAX_PARTS: usize = 4;
/// Rows per block (`DROP_ROWS`).
const DROP_ROWS: usize = 4;

/// `DropParts` of `linear.cu`, passed by value (same field order, C layout).
#[repr(C)]
#[derive(Clone, Copy)]
struct DropPartsArg {
    a: [u64; DROP_MAX_PARTS],
    seed: [u64; DROP_MAX_PARTS],
    threshold: [u64; DROP_MAX_PARTS],
    scale: [f32; DROP_MAX_PARTS],
    r: [i32; DROP_MAX_PARTS],
    goff: [i32; DROP_MAX_PARTS],
    n: i32,
}

/// `dx [rows, cols] += sum_p D_p ⊙ (g'_p A_p) * scale_p` over the dropped `parts`:
/// `g' [rows, ldg]` (compute dtype `dt`, part `p` in columns `g_col .. g_col + r`),
/// `A_p [r, cols]`, masks of [`dropout_input`] (element `(row, col)`: index
/// `row * cols + col`), `dx` of dtype `dx_dt` (`F32` or `dt`) with row stride `lddx`.
/// Per element, in this order (the CPU can repeat it bit for bit): `acc_p = fma` over
/// `k = 0..r` of `g'[row, g_col + k] * A_p[k, col]` from 0; `add += acc_p * scale_p` over
/// the kept parts, in order (separate multiply and add); `dx = dx + add` (a 16-bit `dx`
/// rounded once). More than 4 parts: one launch per 4, each rounding `dx` once.
///
/// # Safety
/// `dx`, `g` and every `a` must be device allocations of the current context holding the
/// strided matrices; `dx` must not overlap the others.
#[allow(clippy::too_many_arguments)]
pub unsafe fn dropout_lora_dx(dx_dt: Dtype, dt: Dtype, dx: u64, lddx: usize, g: u64, ldg: usize, rows: usize, cols: usize, parts: &[DroppedPart], stream: CUstream) -> Result<(), GpuError> {
    let name = match (dx_dt, dt) {
        (Dtype::F32, Dtype::Bf16) => "dropout_lora_dx_f32_bf16",
        (Dtype::F32, Dtype::F16) => "dropout_lora_dx_f32_f16",
        (Dtype::Bf16, Dtype::Bf16) => "dropout_lora_dx_bf16",
        (Dtype::F16, Dtype::F16) => "dropout_lora_dx_f16",
        _ => return Err(invalid("dx_dt", format!("must be F32 or the compute dtype {} (bf16 or f16), got {}", dt.name(), dx_dt.name()))),
    };
    check_ld("lddx", lddx, cols)?;
    for (i, p) in parts.iter().enumerate() {
        check_dropout(&p.dropout)?;
        if p.r == 0 || p.a == 0 {
            return Err(invalid("parts", format!("part {i}: rank 0 or a null `a`")));
        }
        if p.g_col + p.r > ldg {
            return Err(invalid("parts", format!("part {i}: columns {}..{} of g' exceed its row stride {ldg}", p.g_col, p.g_col + p.r)));
        }
    }
    // g' rows of a block are staged in shared memory (48 KiB without opting in).
    if ldg == 0 || DROP_ROWS * ldg * 4 > 48 << 10 {
        return Err(invalid("ldg", format!("{ldg}: the kernel stages {DROP_ROWS} rows of g' in shared memory, at most {} columns", (48 << 10) / (4 * DROP_ROWS))));
    }
    if rows == 0 || cols == 0 || parts.is_empty() {
        return Ok(());
    }
    if dx == 0 || g == 0 {
        return Err(invalid(if dx == 0 { "dx" } else { "g" }, "is a null pointer"));
    }
    let f = function_in_current_context(source(), name)?;
    let grid = rows.div_ceil(DROP_ROWS).clamp(1, 32768) as u32;
    for chunk in parts.chunks(DROP_MAX_PARTS) {
        let mut arg = DropPartsArg { a: [0; 4], seed: [0; 4], threshold: [0; 4], scale: [0.0; 4], r: [0; 4], goff: [0; 4], n: chunk.len() as i32 };
        for (i, p) in chunk.iter().enumerate() {
            arg.a[i] = p.a;
            arg.seed[i] = p.dropout.seed;
            arg.threshold[i] = p.dropout.threshold();
            arg.scale[i] = p.dropout.scale();
            arg.r[i] = p.r as i32;
            arg.goff[i] = p.g_col as i32;
        }
        let (mut dx, mut lddx, mut g, mut ldg, mut rows_, mut cols_) = (dx, lddx as i64, g, ldg as i64, rows as i64, cols as i64);
        let mut args: [*mut c_void; 7] = [
            &mut dx as *mut _ as *mut c_void,
            &mut lddx as *mut _ as *mut c_void,
            &mut g as *mut _ as *mut c_void,
            &mut ldg as *mut _ as *mut c_void,
            &mut rows_ as *mut _ as *mut c_void,
            &mut cols_ as *mut _ as *mut c_void,
            &mut arg as *mut _ as *mut c_void,
        ];
        launch(f, grid, 256, (DROP_ROWS * ldg as usize * 4) as u32, stream, &mut args)?;
    }
    Ok(())
}

/// `mask[i] = keep(d.seed, first + i)` as 0/1 bytes, `n` of them: the GPU's mask, for
/// comparing with [`Dropout::keep`] bit for bit.
///
/// # Safety
/// `mask` must be a device allocation of the current context of at least `n` bytes.
pub unsafe fn dropout_mask(d: &Dropout, first: u64, n: usize, mask: u64, stream: CUstream) -> Result<(), GpuError> {
    check_dropout(d)?;
    if n == 0 {
        return Ok(());
    }
    if mask == 0 {
        return Err(invalid("mask", "is a null pointer"));
    }
    let f = function_in_current_context(source(), "dropout_mask")?;
    let (mut m, mut first, mut n_, mut seed, mut th) = (mask, first, n as i64, d.seed, d.threshold());
    let mut args: [*mut c_void; 5] = [
        &mut m as *mut _ as *mut c_void,
        &mut first as *mut _ as *mut c_void,
        &mut n_ as *mut _ as *mut c_void,
        &mut seed as *mut _ as *mut c_void,
        &mut th as *mut _ as *mut c_void,
    ];
    launch(f, (n as u64).div_ceil(256).clamp(1, 32768) as u32, 256, 0, stream, &mut args)
}
