//! Fused causal grouped-query flash attention with document masks, forward and backward
//! (`attention.cu`), the GPU twin of [`crate::ops::attention`].
//!
//! # Semantics (those of the CPU reference)
//!
//! `tokens = seqs * seq_len`, sequence-major. Query head `h` of token `t` is
//! `q[t * ldq + h * head_dim + c]`; its key/value head `g = h / (heads / kv_heads)` is
//! `k[t * ldk + g * head_dim + c]` (same for `v`). Token `i` of a sequence attends to token
//! `j` of the same sequence iff `j <= i` and, with `docs` (`u32[tokens]`), `docs[j] == docs[i]`.
//! Scores are `q.k / sqrt(head_dim)`. The forward writes `o` (16-bit, same layout as `q`
//! with its own stride) and `lse[t * heads + h]`, the natural-log log-sum-exp of the row's
//! scaled scores (f32). The backward takes the forward's inputs, `o` and `lse` as the
//! forward wrote them, and `dout`, and overwrites `dq`, `dk`, `dv` (`dk`, `dv` summed over
//! the query heads of each group).
//!
//! Strides are in elements and may exceed the widths: `q`, `k`, `v` are typically column
//! slices of one fused `[tokens, (heads + 2 * kv_heads) * head_dim]` projection output, and
//! `dq`, `dk`, `dv` slices of one fused gradient buffer. Outputs must not overlap inputs.
//!
//! **Documents must be contiguous** within a sequence (what [`crate::Batch::packed`] builds,
//! and what its positions assume): elements are masked with `docs[j] == docs[i]` exactly as
//! the reference does, but whole tiles are skipped on the strength of contiguity (a key tile
//! that ends before a query block and whose last token's document differs from the block's
//! first token's is skipped, and so is everything before it). An id that comes back after
//! another document (`0 0 1 1 0`) is outside the contract; the kernels then treat the runs as
//! separate documents in skipped tiles, and the result is unspecified.
//!
//! # Kernels
//!
//! | path | kernels | when |
//! |---|---|---|
//! | tensor cores | forward: a CTA of `w` warps per (block of [`Tiling::fwd_rows`] query rows, head, sequence), each warp 16 or 32 rows, K/V tiles double-buffered through `cp.async`, `S = QK^T` and `O += PV` with `mma.sync.m16n8k16` (f32 accumulate) from `ldmatrix` fragments, online softmax in registers (log2 domain); backward: a CTA of `w` warps per (block of [`Tiling::bwd_keys`] keys, kv head, sequence), each warp 16 or 32 keys, walking the query tiles that can see them for every head of the group, dK/dV in registers, dQ added to an f32 accumulator with atomics | sm_80 and newer |
//! | portable | scalar f32, a warp per row, no tiling: forward; dQ (a warp per query row); dK/dV (a warp per key row) | sm_75 (bf16 emulated), or on request |
//! | wgmma forward (head_dim 64) | a CTA of 1 or 2 warpgroups, 64 query rows each; `S = QK^T` and `O += PV` with `wgmma.mma_async` (Q and P from registers, K and V from 128-byte-swizzled shared memory by descriptor, V transposed) | sm_90 only, on request ([`Tiling::fwd_wgmma`]; not a default) |
//!
//! A warp that owns 32 rows (forward) or keys (backward) holds them as two m16 tiles that
//! share every fragment it loads from shared memory: `ldmatrix` bandwidth, not the tensor
//! cores, bounds these kernels on an H100 with 16 rows per warp, and halving the loads per
//! `mma` is what made the defaults faster (forward 15%, backward 11% at the 1B shape). It
//! costs registers (255, with a few bytes spilled in the backward) and so occupancy.
//!
//! Both backward paths start with a pass computing `D = rowsum(dout * o)` (and `lse` in
//! log2 units) into the workspace. The tensor-core backward gets `dq` through an f32
//! accumulator in the workspace (zeroed by that pass, added to with `red.global.add`, then
//! scaled and rounded by a cast pass): the FlashAttention-2 choice. The alternative, a
//! separate dQ kernel looping over key tiles, avoids the atomics and the workspace but
//! recomputes `QK^T` and `dO V^T` (7 GEMM-sized products per tile pair instead of 5, 40%
//! more tensor-core work); on an H100 the atomics' traffic stays in L2.
//!
//! Tiles are skipped when fully masked for the whole CTA: causally, and with documents by
//! the rule above. Heavy CTAs are scheduled first (late query blocks forward, early key
//! blocks backward). Short documents favour smaller tiles (a block that straddles a
//! document boundary works for rows of one document on keys of the other), so
//! [`Path::Auto`] picks [`Tiling::default_with_docs`] when a document mask is given.
//!
//! # Precision
//!
//! Inputs and outputs are 16-bit ([`Dtype::Bf16`] or [`Dtype::F16`]); scores, softmax and
//! every accumulation are f32; `P` and `dS` are rounded to 16 bits as tensor-core operands
//! (as in FlashAttention-2). `exp2` is the hardware approximation (relative error ~2^-22).
//!
//! # Measured (H100 80GB HBM3, bf16, 4 x 2048 tokens, causal; `examples/bench_attention.rs`
//! and `py/bench_sdpa.py` in one device call; medians of 9 samples of 10 back-to-back calls;
//! raw JSON in `fsdp/results/attention-h100/`)
//!
//! | shape | ours fwd / bwd / f+b (us) | with documents | before (previous kernels) | SDPA flash (FA2) | SDPA default (cuDNN on this torch) |
//! |---|---|---|---|---|---|
//! | Llama-3.2-1B: 32/8 heads, d 64 | 268 / 780 / 1046 (256 / 220 TF/s) | 127 / 419 / 544 | 317 / 881 / 1239; docs 584 | 284 / 1153 / 1437 | 184 / 850 / 1034 |
//! | Llama-3.2-3B: 24/8 heads, d 128 | 433 / 1326 / 1788 (238 / 194 TF/s) | 185 / 591 / 786 | 424 / 1344 / 1837; docs 829 | 379 / 1639 / 2018 | 206 / 1092 / 1298 |
//! | 1B, re-measured (2026-11-26, second call of `results/attention-h100/wgmma.md`) | 270 / 780 / 1071 | 127 / 416 / 541 | | 293 / 1158 / 1452 | 185 / 857 / 1042 |
//! | 1B, wgmma forward f128x128g2 (not default), same call | 265 / 793 / 1038 | 156 / 456 / 608 | | | |
//! | 3B, re-measured, same call | 433 / 1340 / 1789 | 184 / 590 / 786 | | 389 / 1655 / 2043 | 215 / 1100 / 1314 |
//!
//! (torch 2.11 with `enable_gqa=True`, q/k/v strided views of one fused buffer as here;
//! documents of 64..1024 tokens, which SDPA cannot express; "before" from an earlier call on
//! the same kind of card.) At the 1B shape forward + backward is now level with torch's
//! default SDPA (cuDNN's Hopper kernels, 1.01x faster) and 1.37x faster than
//! FlashAttention-2: our backward is 9% faster than cuDNN's, our forward 46% slower (cuDNN
//! uses Hopper's wgmma, which this sm_80 code does not). At the 3B shape (head_dim 128, where
//! 32 rows per warp do not fit the registers) cuDNN is 1.38x faster and FA2 1.13x slower.
//! The portable path runs the 1B shape in 19 ms forward, 52 ms backward.
//!
//! **The wgmma forward** (sm_90a; the source is compiled arch-specific, `compute_90a`, on
//! sm_90 through [`KernelSource::arch_specific`]). Two variants matched the reference on an
//! H100 on every case (`fsdp/results/attention-h100/wgmma.md`): f128x128g2 (cp.async double
//! buffer, each tile's `PV` into a fresh accumulator, then `O = alpha O + PV`) at 265 us
//! forward without documents (the mma.sync default 270 us in the same call, 1.6% apart:
//! within what we would call noise, so not made the default) and 156 us with documents
//! (mma.sync 127 us); f64x128g1 (plain loads into one buffer) at 370 / 194 us. The variants
//! that accumulate `PV` in place into the rescaled `O` registers with the cp.async ring ran
//! at 223 us (f128x64g2) and 103 us with documents (f64x64g1), but were wrong whenever a row
//! block spans more than one key tile (cause not found; see attention.cu); the fresh-accumulator
//! fix on those tile shapes is the next thing to try. cuDNN's forward: 185 us.
//!
//! `attn_bwd_pre` (the `D` pass) moves 137 MB at the 1B shape (o and dout read, 67 MB; the f32
//! dq accumulator zeroed, 67 MB; D, lse) in 52.5 us: 2.6 TB/s, 87% of the card's 3.0 TB/s
//! device copy. Unchanged.
//!
//! Tried and not kept (same card, `fsdp/results/attention-h100/sweep.md`): a 3-stage
//! `cp.async` pipeline (no faster), register caps for more CTAs per SM (`__launch_bounds__`
//! minimum blocks: within 2%, except the 32-key forward, which keeps a cap), warps skipping tiles they cannot
//! see (see attention.cu), 32-row backward tiles with 16 keys per warp (25% slower), 8-warp
//! CTAs (slower forward and backward).
//!
//! # Requirements checked at launch
//!
//! `head_dim` 64 or 128; `kv_heads` divides `heads`; strides at least the widths and
//! multiples of 8 elements; 16-bit buffers 16-byte aligned, `lse`/`docs` 4-byte aligned,
//! the workspace 16-byte aligned and at least [`backward_workspace_bytes`]; no null pointer
//! (but `docs`). Violations are [`GpuError::InvalidArgument`] naming the argument.

use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudakit::cudarc::driver::sys::{self, CUstream};
use cudakit::kernel::{self, Function, KernelSource};

use super::{Dtype, GpuError};
use crate::ops::attention::AttnShape;

/// Arguments of one forward call on raw device addresses.
#[derive(Clone, Copy, Debug)]
pub struct AttnForward {
    /// Sizes.
    pub shape: AttnShape,
    /// [`Dtype::Bf16`] or [`Dtype::F16`]: the type of `q`, `k`, `v`, `o` (and, backward, of
    /// `dout`, `dq`, `dk`, `dv`).
    pub dtype: Dtype,
    /// Queries, `q[t * ldq + h * head_dim + c]`.
    pub q: u64,
    /// Row stride of `q` (elements), `>= heads * head_dim`.
    pub ldq: usize,
    /// Keys, `k[t * ldk + g * head_dim + c]`.
    pub k: u64,
    /// Row stride of `k`, `>= kv_heads * head_dim`.
    pub ldk: usize,
    /// Values, like `k`.
    pub v: u64,
    /// Row stride of `v`, `>= kv_heads * head_dim`.
    pub ldv: usize,
    /// `u32[tokens]` document ids (contiguous documents, see the module docs), or 0 for no
    /// document mask.
    pub docs: u64,
    /// Output, `o[t * ldo + h * head_dim + c]`, overwritten.
    pub o: u64,
    /// Row stride of `o`, `>= heads * head_dim`.
    pub ldo: usize,
    /// `f32[tokens * heads]`: the log-sum-exp of each row's scaled scores, `lse[t * heads + h]`.
    pub lse: u64,
}

/// Arguments of one backward call on raw device addresses.
#[derive(Clone, Copy, Debug)]
pub struct AttnBackward {
    /// The forward's inputs, and `o` and `lse` as the forward wrote them.
    pub fwd: AttnForward,
    /// Gradient of the output, laid out like `o`.
    pub dout: u64,
    /// Row stride of `dout`, `>= heads * head_dim`.
    pub lddout: usize,
    /// Gradient of `q`, overwritten.
    pub dq: u64,
    /// Row stride of `dq`, `>= heads * head_dim`.
    pub lddq: usize,
    /// Gradient of `k` (summed over each group's query heads), overwritten.
    pub dk: u64,
    /// Row stride of `dk`, `>= kv_heads * head_dim`.
    pub lddk: usize,
    /// Gradient of `v` (summed over each group's query heads), overwritten.
    pub dv: u64,
    /// Row stride of `dv`, `>= kv_heads * head_dim`.
    pub lddv: usize,
    /// Scratch device memory of at least [`backward_workspace_bytes`] bytes, 16-byte
    /// aligned; its contents on entry do not matter.
    pub workspace: u64,
    /// Its size in bytes.
    pub workspace_bytes: usize,
}

/// A tiling of the tensor-core kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    /// Forward on Hopper's `wgmma` (sm_90 only, head_dim 64): `fwd_warps` is then a multiple
    /// of 4 (warpgroups) and `fwd_rows = 16 * fwd_warps` (64 rows per warpgroup). Otherwise
    /// the `mma.sync` forward (sm_80+).
    pub fwd_wgmma: bool,
    /// Forward: warps per CTA.
    pub fwd_warps: u32,
    /// Forward: query rows per CTA, `16 * fwd_warps` or `32 * fwd_warps` (each warp then owns
    /// two row tiles that share every K/V fragment it loads).
    pub fwd_rows: u32,
    /// Forward: keys per tile.
    pub fwd_keys: u32,
    /// Backward: query rows per tile.
    pub bwd_rows: u32,
    /// Backward: keys per CTA, `16 * bwd_warps` or `32 * bwd_warps` (each warp then owns two
    /// key tiles that share every Q/dO fragment it loads).
    pub bwd_keys: u32,
    /// Backward: warps per CTA.
    pub bwd_warps: u32,
}

impl Tiling {
    /// The tilings compiled for `head_dim`; the first is the sm_80+ default without a
    /// document mask, [`Tiling::default_with_docs`] the default with one (the fastest
    /// measured on an H100 at the Llama training shapes, see the module docs), and
    /// [`Tiling::for_arch`] what [`Path::Auto`] picks on a given device. Tilings with
    /// [`Tiling::fwd_wgmma`] run on sm_90 only ([`Tiling::runs_on`]).
    pub fn available(head_dim: usize) -> &'static [Tiling] {
        const fn t(fwd_rows: u32, fwd_warps: u32, fwd_keys: u32, bwd_rows: u32, bwd_keys: u32, bwd_warps: u32) -> Tiling {
            Tiling { fwd_wgmma: false, fwd_warps, fwd_rows, fwd_keys, bwd_rows, bwd_keys, bwd_warps }
        }
        // The wgmma forward with `groups` warpgroups, paired with the mma.sync backward given.
        const fn wg(groups: u32, fwd_keys: u32, bwd_rows: u32, bwd_keys: u32, bwd_warps: u32) -> Tiling {
            Tiling { fwd_wgmma: true, fwd_warps: 4 * groups, fwd_rows: 64 * groups, fwd_keys, bwd_rows, bwd_keys, bwd_warps }
        }
        // Each entry needs its FWD_TC (FWD_WG) and BWD_TC instantiations in attention.cu. The
        // first is the default without documents, the one `default_with_docs` names the
        // default with. The wgmma ones are the two variants that matched the reference on an
        // H100 (attention.cu, FWD_WG; neither is a default: see the module docs).
        const D64: [Tiling; 6] = [
            t(128, 4, 64, 32, 128, 4), // f128x64w4-b32x128w4: default
            t(64, 2, 64, 64, 64, 4),   // f64x64w2-b64x64w4: default with documents
            t(64, 4, 64, 64, 128, 8),  // f64x64w4-b64x128w8: the 16-row (16-key) warps
            t(128, 4, 32, 32, 64, 4),  // f128x32w4-b32x64w4
            wg(2, 128, 32, 128, 4),    // f128x128g2-b32x128w4: wgmma, fresh P V accumulator
            wg(1, 128, 32, 128, 4),    // f64x128g1-b32x128w4: wgmma, plain loads, one buffer
        ];
        const D128: [Tiling; 2] = [t(64, 4, 64, 32, 64, 4), t(128, 8, 64, 32, 128, 8)];
        match head_dim {
            64 => &D64,
            128 => &D128,
            _ => &[],
        }
    }
    /// The tiling [`Path::Auto`] uses for `head_dim` on sm_80+ without a document mask.
    pub fn default_for(head_dim: usize) -> Option<Tiling> {
        Tiling::available(head_dim).first().copied()
    }
    /// The tiling [`Path::Auto`] uses for `head_dim` on sm_80+ with a document mask. Short
    /// documents favour smaller tiles: a tile that straddles a document boundary does work
    /// that its other document's rows cannot use.
    pub fn default_with_docs(head_dim: usize) -> Option<Tiling> {
        let i = match head_dim {
            64 => 1,
            _ => 0,
        };
        Tiling::available(head_dim).get(i).copied()
    }
    /// The tiling [`Path::Auto`] uses on sm_90 (H100/H200) for `head_dim`, with or without
    /// a document mask. The place for a wgmma forward once one is measured clearly faster
    /// than the mma.sync one; none is yet (module docs), so these are the sm_80 defaults.
    pub fn hopper_default(head_dim: usize, docs: bool) -> Option<Tiling> {
        if docs {
            Tiling::default_with_docs(head_dim)
        } else {
            Tiling::default_for(head_dim)
        }
    }
    /// The tiling [`Path::Auto`] uses on a device of compute capability `major.minor`
    /// (`None` below sm_80: the portable kernels).
    pub fn for_arch(head_dim: usize, docs: bool, major: u32, minor: u32) -> Option<Tiling> {
        match (major, minor) {
            (m, _) if m < 8 => None,
            (9, 0) => Tiling::hopper_default(head_dim, docs),
            _ if docs => Tiling::default_with_docs(head_dim),
            _ => Tiling::default_for(head_dim),
        }
    }
    /// Whether the kernels exist on compute capability `major.minor`: sm_80 and newer, and
    /// sm_90 exactly for [`Tiling::fwd_wgmma`] (wgmma is in no other architecture).
    pub fn runs_on(&self, major: u32, minor: u32) -> bool {
        if self.fwd_wgmma {
            (major, minor) == (9, 0)
        } else {
            major >= 8
        }
    }
    /// A short label, e.g. `f64x64w4-b64x64w4`: forward query rows x keys per tile and warps
    /// (`g<warpgroups>` for the wgmma forward), backward query rows per tile x keys per CTA
    /// and warps.
    pub fn label(&self) -> String {
        let fw = if self.fwd_wgmma { format!("g{}", self.fwd_warps / 4) } else { format!("w{}", self.fwd_warps) };
        format!("f{}x{}{fw}-b{}x{}w{}", self.fwd_rows, self.fwd_keys, self.bwd_rows, self.bwd_keys, self.bwd_warps)
    }
    /// The forward kernel's name for `dt` (`bf16`/`f16`) and `head_dim`.
    fn fwd_kernel(&self, dt: &str, d: usize) -> String {
        if self.fwd_wgmma {
            return format!("attn_fwd_wg_{dt}_d{d}_g{}_n{}", self.fwd_warps / 4, self.fwd_keys);
        }
        format!("attn_fwd_tc_{dt}_d{d}_m{}_w{}_n{}", self.fwd_rows, self.fwd_warps, self.fwd_keys)
    }
    /// The backward main kernel's name.
    fn bwd_kernel(&self, dt: &str, d: usize) -> String {
        format!("attn_bwd_tc_{dt}_d{d}_m{}_n{}_w{}", self.bwd_rows, self.bwd_keys, self.bwd_warps)
    }
    /// Every tensor-core kernel name the launcher may ask for (for the compile test).
    #[doc(hidden)]
    pub fn kernel_names(head_dim: usize) -> Vec<String> {
        let mut v = Vec::new();
        for dt in ["bf16", "f16"] {
            for t in Tiling::available(head_dim) {
                v.push(t.fwd_kernel(dt, head_dim));
                v.push(t.bwd_kernel(dt, head_dim));
            }
        }
        v
    }
}

/// Which kernels a call runs. [`forward`] and [`backward`] use [`Path::Auto`]; the others
/// exist for tests (the portable path is checked on the H100 too) and the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Tensor cores on sm_80+ with [`Tiling::for_arch`] ([`Tiling::default_for`], or
    /// [`Tiling::default_with_docs`] when a document mask is given; on sm_90
    /// [`Tiling::hopper_default`]); the portable kernels below sm_80.
    Auto,
    /// The tensor-core kernels with this tiling (an error below sm_80, for a wgmma tiling
    /// off sm_90, or for a tiling not in [`Tiling::available`]).
    TensorCore(Tiling),
    /// The portable scalar kernels (any architecture).
    Portable,
}

/// The kernel source.
pub fn source() -> &'static KernelSource {
    static S: OnceLock<KernelSource> = OnceLock::new();
    // Arch-specific on sm_90 (compute_90a), for the wgmma forward.
    S.get_or_init(|| KernelSource::new("fsdp/attention.cu", include_str!("attention.cu")).arch_specific())
}

const ALIGN: usize = 256;
fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Workspace layout: `lse2` f32 `[heads][tokens]`, `D` f32 `[heads][tokens]`, `dq_acc` f32
/// `[tokens][heads][head_dim]`, each 256-byte aligned. Returns the three offsets and the total.
fn workspace_layout(s: &AttnShape) -> (usize, usize, usize, usize) {
    let rows = s.seqs * s.seq_len * s.heads;
    let lse2 = 0;
    let d = up(rows * 4);
    let dq = d + up(rows * 4);
    (lse2, d, dq, dq + up(rows * s.head_dim * 4))
}

/// Bytes of workspace [`backward`] needs: `(8 + 4 * head_dim) * tokens * heads`, rounded up
/// (`D` and `lse` per row, and the f32 dq accumulator). 65 MiB for 4 x 2048 tokens, 32 heads
/// of 64.
pub fn backward_workspace_bytes(shape: &AttnShape) -> usize {
    workspace_layout(shape).3
}

fn invalid(arg: &'static str, problem: impl Into<String>) -> GpuError {
    GpuError::InvalidArgument { arg, problem: problem.into() }
}

fn dtype_name(d: Dtype) -> Result<&'static str, GpuError> {
    match d {
        Dtype::Bf16 => Ok("bf16"),
        Dtype::F16 => Ok("f16"),
        Dtype::F32 => Err(invalid("dtype", "attention takes bf16 or f16 (got f32)")),
    }
}

/// Checks the shape; `Ok(false)` when there is nothing to do (no tokens).
fn check_shape(s: &AttnShape) -> Result<bool, GpuError> {
    if s.head_dim != 64 && s.head_dim != 128 {
        return Err(invalid("head_dim", format!("{} is not supported (64 or 128)", s.head_dim)));
    }
    if s.heads == 0 || s.kv_heads == 0 || s.heads % s.kv_heads != 0 {
        return Err(invalid("kv_heads", format!("{} must be positive and divide heads = {}", s.kv_heads, s.heads)));
    }
    let rows = (s.seqs as u128) * (s.seq_len as u128) * (s.heads as u128);
    if rows * (s.head_dim as u128) >= 1 << 40 || s.seq_len >= 1 << 30 || rows >= 1 << 31 {
        return Err(invalid("shape", format!("{s:?} is too large")));
    }
    Ok(s.seqs > 0 && s.seq_len > 0)
}

fn check_ptr(name: &'static str, p: u64, align: u64) -> Result<(), GpuError> {
    if p == 0 {
        return Err(invalid(name, "is a null pointer"));
    }
    if p % align != 0 {
        return Err(invalid(name, format!("address {p:#x} is not {align}-byte aligned")));
    }
    Ok(())
}

fn check_ld(name: &'static str, ld: usize, width: usize) -> Result<(), GpuError> {
    if ld < width {
        return Err(invalid(name, format!("row stride {ld} is smaller than the row width {width}")));
    }
    if ld % 8 != 0 {
        return Err(invalid(name, format!("row stride {ld} is not a multiple of 8 elements")));
    }
    Ok(())
}

fn check_forward(a: &AttnForward) -> Result<bool, GpuError> {
    dtype_name(a.dtype)?;
    let go = check_shape(&a.shape)?;
    let s = &a.shape;
    let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check_ld("ldq", a.ldq, qw)?;
    check_ld("ldk", a.ldk, kw)?;
    check_ld("ldv", a.ldv, kw)?;
    check_ld("ldo", a.ldo, qw)?;
    for (name, p) in [("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)] {
        check_ptr(name, p, 16)?;
    }
    check_ptr("lse", a.lse, 4)?;
    if a.docs != 0 {
        check_ptr("docs", a.docs, 4)?;
    }
    Ok(go)
}

fn check_backward(a: &AttnBackward) -> Result<bool, GpuError> {
    let go = check_forward(&a.fwd)?;
    let s = &a.fwd.shape;
    let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    check_ld("lddout", a.lddout, qw)?;
    check_ld("lddq", a.lddq, qw)?;
    check_ld("lddk", a.lddk, kw)?;
    check_ld("lddv", a.lddv, kw)?;
    for (name, p) in [("dout", a.dout), ("dq", a.dq), ("dk", a.dk), ("dv", a.dv)] {
        check_ptr(name, p, 16)?;
    }
    let need = backward_workspace_bytes(s);
    if a.workspace_bytes < need {
        return Err(invalid("workspace_bytes", format!("{} bytes given, {need} needed for {s:?}", a.workspace_bytes)));
    }
    check_ptr("workspace", a.workspace, 16)?;
    Ok(go)
}

/// The compute capability of the current context's device, as `(major, minor)`.
fn current_arch() -> Result<(u32, u32), GpuError> {
    if !cudakit::driver_present() {
        return Err(GpuError::NoDriver);
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: out-pointer to a local; the driver library is present (checked above). Without
    // a current context (or before cuInit) the call returns an error code, not UB.
    unsafe { sys::cuCtxGetDevice(&mut dev) }.result().map_err(|_| GpuError::NoCurrentContext)?;
    let get = |attr| {
        let mut v: i32 = 0;
        // SAFETY: out-pointer to a local; `dev` came from cuCtxGetDevice.
        unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) }
            .result()
            .map(|_| v as u32)
            .map_err(GpuError::driver("cuDeviceGetAttribute"))
    };
    use sys::CUdevice_attribute as A;
    Ok((get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?, get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?))
}

/// Resolves `path` for the current device: `Some(tiling)` for the tensor-core kernels.
fn resolve(path: Path, head_dim: usize, docs: bool) -> Result<Option<Tiling>, GpuError> {
    match path {
        Path::Portable => Ok(None),
        Path::Auto => {
            let (major, minor) = current_arch()?;
            Ok(Tiling::for_arch(head_dim, docs, major, minor))
        }
        Path::TensorCore(t) => {
            if !Tiling::available(head_dim).contains(&t) {
                return Err(invalid("path", format!("tiling {t:?} is not compiled for head_dim {head_dim}")));
            }
            let (major, minor) = current_arch()?;
            if !t.runs_on(major, minor) {
                let need = if t.fwd_wgmma { "the wgmma forward needs sm_90" } else { "the tensor-core kernels need sm_80 or newer" };
                return Err(invalid("path", format!("{need} (this is sm_{major}{minor})")));
            }
            Ok(Some(t))
        }
    }
}

/// Loads `name` and allows it `smem` bytes of dynamic shared memory (once per function).
fn function(name: &str, smem: u32) -> Result<Function, GpuError> {
    let f = kernel::function_in_current_context(source(), name)?;
    if smem > 48 * 1024 {
        static DONE: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
        let done = DONE.get_or_init(Default::default);
        let key = f.0 as usize;
        if !done.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            // SAFETY: `f` is a live function handle of the current context.
            unsafe {
                sys::cuFuncSetAttribute(
                    f.0,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .result()
            .map_err(GpuError::driver("cuFuncSetAttribute"))?;
            done.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        }
    }
    Ok(f)
}

/// Kernel parameters: each value boxed in place so the driver can read it by address.
struct Params(Vec<Box<dyn std::any::Any>>, Vec<*mut c_void>);
impl Params {
    fn new() -> Self {
        Params(Vec::new(), Vec::new())
    }
    fn push<T: 'static + Copy>(mut self, x: T) -> Self {
        let mut b = Box::new(x);
        self.1.push(&mut *b as *mut T as *mut c_void);
        self.0.push(b);
        self
    }
    fn ptr(self, p: u64) -> Self {
        self.push(p)
    }
    fn ld(self, ld: usize) -> Self {
        self.push(ld as i64)
    }
    fn int(self, x: usize) -> Self {
        self.push(x as i32)
    }
}

fn scale(s: &AttnShape) -> f32 {
    1.0 / (s.head_dim as f32).sqrt()
}

/// The cp.async pipeline depths of attention.cu (`FWD_STAGES`, `BWD_STAGES`).
const FWD_STAGES: usize = 2;
const BWD_STAGES: usize = 2;

fn fwd_smem(t: Tiling, d: usize) -> u32 {
    let (bm, bn, s) = (t.fwd_rows as usize, t.fwd_keys as usize, FWD_STAGES);
    // The wgmma kernel aligns its tiles to 1024 bytes itself (the swizzle's period).
    let slack = if t.fwd_wgmma { 1024 } else { 0 };
    ((bm * d + 2 * s * bn * d) * 2 + s * bn * 4 + slack) as u32
}

fn bwd_smem(t: Tiling, d: usize) -> u32 {
    let (bm, bn, s) = (t.bwd_rows as usize, t.bwd_keys as usize, BWD_STAGES);
    ((2 * bn * d + 2 * s * bm * d + bn * bm) * 2 + 3 * s * bm * 4) as u32
}

/// Queues the forward on `stream` (the current context's), with [`Path::Auto`].
///
/// # Safety
/// Every pointer must be a device address of the current context valid for the layout
/// documented on [`AttnForward`] (`q`, `k`, `v` readable for `tokens` rows of their strides,
/// `o`, `lse` writable, `o` overlapping no input), and `stream` a stream of that context.
pub unsafe fn forward(a: &AttnForward, stream: CUstream) -> Result<(), GpuError> {
    forward_with(a, Path::Auto, stream)
}

/// [`forward`] on a chosen [`Path`].
///
/// # Safety
/// As [`forward`].
pub unsafe fn forward_with(a: &AttnForward, path: Path, stream: CUstream) -> Result<(), GpuError> {
    if !check_forward(a)? {
        return Ok(());
    }
    let s = a.shape;
    let dt = dtype_name(a.dtype)?;
    let d = s.head_dim;
    let p = Params::new()
        .ptr(a.q)
        .ld(a.ldq)
        .ptr(a.k)
        .ld(a.ldk)
        .ptr(a.v)
        .ld(a.ldv)
        .ptr(a.docs)
        .ptr(a.o)
        .ld(a.ldo)
        .ptr(a.lse)
        .int(s.seqs)
        .int(s.seq_len)
        .int(s.heads)
        .int(s.kv_heads)
        .push(scale(&s));
    let mut params = p.1;
    match resolve(path, d, a.docs != 0)? {
        Some(t) => {
            let smem = fwd_smem(t, d);
            let f = function(&t.fwd_kernel(dt, d), smem)?;
            let grid = s.seq_len.div_ceil(t.fwd_rows as usize) * s.heads * s.seqs;
            kernel::launch(f, grid as u32, 32 * t.fwd_warps, smem, stream, &mut params)
        }
        None => {
            let f = function(&format!("attn_fwd_simple_{dt}_d{d}"), 0)?;
            let rows = s.seqs * s.seq_len * s.heads;
            kernel::launch(f, rows.div_ceil(4) as u32, 128, 0, stream, &mut params)
        }
    }
}

/// Queues only the backward's first pass (`D`, `lse` in log2 units, and the zeroed dq
/// accumulator of the tensor-core path) on `stream`: for the benchmark, which times it alone.
///
/// # Safety
/// As [`backward`].
#[doc(hidden)]
pub unsafe fn backward_pre_only(a: &AttnBackward, stream: CUstream) -> Result<(), GpuError> {
    if !check_backward(a)? {
        return Ok(());
    }
    launch_pre(a, true, stream)
}

/// The `D` pass of the backward (zeroing the dq accumulator iff `zero_dq`).
unsafe fn launch_pre(a: &AttnBackward, zero_dq: bool, stream: CUstream) -> Result<(), GpuError> {
    let f = &a.fwd;
    let s = f.shape;
    let dt = dtype_name(f.dtype)?;
    let tokens = s.seqs * s.seq_len;
    let rows = tokens * s.heads;
    let (o_lse2, o_d, o_dq, _) = workspace_layout(&s);
    let pre = function(&format!("attn_bwd_pre_{dt}_d{}", s.head_dim), 0)?;
    let mut pp = Params::new()
        .ptr(f.o)
        .ld(f.ldo)
        .ptr(a.dout)
        .ld(a.lddout)
        .ptr(f.lse)
        .ptr(a.workspace + o_lse2 as u64)
        .ptr(a.workspace + o_d as u64)
        .ptr(a.workspace + o_dq as u64)
        .int(tokens)
        .int(s.heads)
        .push(zero_dq as i32);
    kernel::launch(pre, (rows * 8).div_ceil(256) as u32, 256, 0, stream, &mut pp.1)
}

/// Queues the backward on `stream` (the current context's), with [`Path::Auto`]: three
/// launches (the `D` pass, the main kernel, the dq cast), or three on the portable path
/// (`D`, dq, dk/dv).
///
/// # Safety
/// As [`forward`] for the `fwd` part (with `o`, `lse` read, not written), plus: `dout`
/// readable, `dq`, `dk`, `dv` writable for their layouts and overlapping no input, and
/// `workspace` writable for `workspace_bytes`.
pub unsafe fn backward(a: &AttnBackward, stream: CUstream) -> Result<(), GpuError> {
    backward_with(a, Path::Auto, stream)
}

/// [`backward`] on a chosen [`Path`].
///
/// # Safety
/// As [`backward`].
pub unsafe fn backward_with(a: &AttnBackward, path: Path, stream: CUstream) -> Result<(), GpuError> {
    if !check_backward(a)? {
        return Ok(());
    }
    let f = &a.fwd;
    let s = f.shape;
    let dt = dtype_name(f.dtype)?;
    let d = s.head_dim;
    let tokens = s.seqs * s.seq_len;
    let rows = tokens * s.heads;
    let (o_lse2, o_d, o_dq, _) = workspace_layout(&s);
    let (ws_lse2, ws_d, ws_dq) = (a.workspace + o_lse2 as u64, a.workspace + o_d as u64, a.workspace + o_dq as u64);
    let tiling = resolve(path, d, f.docs != 0)?;

    launch_pre(a, tiling.is_some(), stream)?;

    let common = || {
        Params::new()
            .ptr(f.q)
            .ld(f.ldq)
            .ptr(f.k)
            .ld(f.ldk)
            .ptr(f.v)
            .ld(f.ldv)
            .ptr(f.docs)
            .ptr(a.dout)
            .ld(a.lddout)
    };
    match tiling {
        Some(t) => {
            let smem = bwd_smem(t, d);
            let main = function(&t.bwd_kernel(dt, d), smem)?;
            let mut p = common()
                .ptr(ws_lse2)
                .ptr(ws_d)
                .ptr(ws_dq)
                .ptr(a.dk)
                .ld(a.lddk)
                .ptr(a.dv)
                .ld(a.lddv)
                .int(s.seqs)
                .int(s.seq_len)
                .int(s.heads)
                .int(s.kv_heads)
                .push(scale(&s));
            let grid = s.seq_len.div_ceil(t.bwd_keys as usize) * s.kv_heads * s.seqs;
            kernel::launch(main, grid as u32, 32 * t.bwd_warps, smem, stream, &mut p.1)?;
            let cast = function(&format!("attn_bwd_cast_{dt}_d{d}"), 0)?;
            let mut p = Params::new().ptr(ws_dq).ptr(a.dq).ld(a.lddq).int(tokens).int(s.heads).push(scale(&s));
            kernel::launch(cast, (rows * d / 8).div_ceil(256) as u32, 256, 0, stream, &mut p.1)
        }
        None => {
            let dq = function(&format!("attn_bwd_dq_simple_{dt}_d{d}"), 0)?;
            let mut p = common()
                .ptr(f.lse)
                .ptr(ws_d)
                .ptr(a.dq)
                .ld(a.lddq)
                .int(s.seqs)
                .int(s.seq_len)
                .int(s.heads)
                .int(s.kv_heads)
                .push(scale(&s));
            kernel::launch(dq, rows.div_ceil(4) as u32, 128, 0, stream, &mut p.1)?;
            let dkdv = function(&format!("attn_bwd_dkdv_simple_{dt}_d{d}"), 0)?;
            let mut p = common()
                .ptr(f.lse)
                .ptr(ws_d)
                .ptr(a.dk)
                .ld(a.lddk)
                .ptr(a.dv)
                .ld(a.lddv)
                .int(s.seqs)
                .int(s.seq_len)
                .int(s.heads)
                .int(s.kv_heads)
                .push(scale(&s));
            kernel::launch(dkdv, (tokens * s.kv_heads).div_ceil(4) as u32, 128, 0, stream, &mut p.1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_fits() {
        // Defaults within 99 KiB (the opt-in limit of sm_86/89, the smallest among sm_80+);
        // the other tilings within an H100's 227 KiB.
        for d in [64, 128] {
            for &t in Tiling::available(d) {
                if t.fwd_wgmma {
                    assert!(d == 64 && t.fwd_warps % 4 == 0 && t.fwd_rows == 16 * t.fwd_warps, "{t:?}");
                    assert!(t.fwd_keys == 64 || t.fwd_keys == 128, "{t:?}");
                } else {
                    assert!(t.fwd_rows == 16 * t.fwd_warps || t.fwd_rows == 32 * t.fwd_warps, "{t:?}");
                }
                assert!(t.bwd_keys == 16 * t.bwd_warps || t.bwd_keys == 32 * t.bwd_warps, "{t:?}");
                let default = [Tiling::default_for(d), Tiling::default_with_docs(d)].contains(&Some(t));
                let limit = if default { 99 * 1024 } else { 227 * 1024 };
                assert!(fwd_smem(t, d) <= limit, "{t:?} d{d} fwd {}", fwd_smem(t, d));
                assert!(bwd_smem(t, d) <= limit, "{t:?} d{d} bwd {}", bwd_smem(t, d));
            }
        }
    }

    #[test]
    fn auto_picks_per_architecture() {
        for d in [64, 128] {
            for docs in [false, true] {
                assert_eq!(Tiling::for_arch(d, docs, 7, 5), None);
                let sm80 = if docs { Tiling::default_with_docs(d) } else { Tiling::default_for(d) };
                for (major, minor) in [(8, 0), (8, 9), (10, 0), (12, 0)] {
                    let t = Tiling::for_arch(d, docs, major, minor);
                    assert_eq!(t, sm80, "sm_{major}{minor} d{d} docs {docs}");
                    assert!(t.unwrap().runs_on(major, minor));
                }
                let h = Tiling::for_arch(d, docs, 9, 0).unwrap();
                assert_eq!(Some(h), Tiling::hopper_default(d, docs));
                assert!(Tiling::available(d).contains(&h) && h.runs_on(9, 0));
                assert!(!h.fwd_wgmma || d == 64);
            }
        }
        // A wgmma tiling runs on sm_90 only; the others from sm_80 on.
        let wg = Tiling::available(64).iter().copied().find(|t| t.fwd_wgmma).unwrap();
        assert!(wg.runs_on(9, 0) && !wg.runs_on(8, 0) && !wg.runs_on(10, 0));
        assert!(wg.label().contains('g'));
        assert!(Tiling::available(128).iter().all(|t| !t.fwd_wgmma));
    }

    #[test]
    fn workspace_covers_the_accumulator() {
        let s = AttnShape { seqs: 4, seq_len: 2048, heads: 32, kv_heads: 8, head_dim: 64 };
        let rows = 4 * 2048 * 32;
        assert_eq!(backward_workspace_bytes(&s), rows * 4 * 2 + rows * 64 * 4);
        let s = AttnShape { seqs: 1, seq_len: 3, heads: 2, kv_heads: 1, head_dim: 128 };
        assert!(backward_workspace_bytes(&s) >= 6 * (8 + 4 * 128));
    }
}
