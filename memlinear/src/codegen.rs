//! CUDA source generated from a [`Loss`]: one kernel that computes the per-token loss and
//! writes d(loss)/d(logits) over the logits, in place, for a chunk of rows.
//!
//! The schedule is the loss's reduction levels: pass k walks the row once and computes
//! every level-k reduction (sums, maxima, online logsumexp), block-reduces them, and then
//! every scalar of level k (including values at the target index); the last pass
//! evaluates the gradient expression and stores it. [`Spec`] picks the kernel's shape:
//!
//! - multi-pass (`cache: false, cluster: 1`, the default): one block per row; later passes
//!   re-read the row from global memory (L2 or DRAM, depending on rows in flight);
//!   `streaming` puts evict-first hints on the gradient pass's loads and stores;
//! - row-cached (`cache: true`): the first pass keeps its slice of the row in shared memory
//!   (raw, 8 loads in flight per thread), later passes and the gradient pass read it from
//!   there: one global read and one global write per logit whatever the number of passes;
//! - split over a cluster (`cluster > 1`, sm_90): the row's `cluster` blocks each own a
//!   slice; each reduction's block partials go to a shared-memory slot, one cluster
//!   barrier per level, then every block combines all partials in rank order through
//!   distributed shared memory (so every block gets the same bits).
//!
//! The logit at the target is read once, before any barrier, so no gradient store of the
//! row (by another thread or block) can precede it.
//!
//! Measured on the H100 at 1638 x 128256 bf16 cross-entropy (`memlinear-bench kernel`,
//! `bench/RESULTS.md`): multi-pass 462 us, multi-pass with hints 451 us, row-cached over a
//! cluster 530-570 us (the barriers leave each block's loads idle while it reduces and
//! writes; too few blocks per SM to cover it). [`crate::gpu::plan_spec`] therefore picks
//! the multi-pass kernel with hints; the cached shapes stay, tested, behind
//! [`set_plan`].
//!
//! Arithmetic is f32 (logits are upcast on load; bias added in f32). For 16-bit inputs
//! the fast intrinsics `__expf` / `__logf` are used (their error, ~2 ulp, is far below
//! bf16's); for f32 inputs the accurate `expf` / `logf`, so the f32 path is within 1e-5
//! of the f64 reference. Half and bf16 are raw 16-bit values converted by our own code
//! (NVRTC in CUDA 13 cannot include cuda_fp16.h without include paths).

use std::fmt::Write as _;

use crate::expr::{Loss, NodeId, Op, Shape};
use crate::Dtype;

/// Threads per block (one row per block) of the loss kernel, unless [`set_block`] chose
/// another.
pub const BLOCK: u32 = 512;

static BLOCK_OVERRIDE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sets the loss kernel's threads per block (a multiple of 32, at most 1024; 0: back to
/// the automatic choice) for later calls; for experiments such as `memlinear-bench gpu`.
pub fn set_block(threads: u32) {
    assert!(threads == 0 || (threads % 32 == 0 && (32..=1024).contains(&threads)), "block of {threads} threads");
    BLOCK_OVERRIDE.store(threads, std::sync::atomic::Ordering::Relaxed);
}

/// The threads per block set by [`set_block`], if any.
pub fn block_override() -> Option<u32> {
    match BLOCK_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        b => Some(b),
    }
}

/// The multi-pass loss kernel's threads per block ([`BLOCK`] unless [`set_block`] chose
/// another).
pub fn block() -> u32 {
    block_override().unwrap_or(BLOCK)
}

/// What the generated kernel is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Spec {
    /// Element type of the logits (and of the gradient written over them).
    pub dtype: Dtype,
    /// Vocabulary size (row length).
    pub vocab: usize,
    /// Whether to write the gradient (false: forward only).
    pub want_grad: bool,
    /// Student bias present.
    pub bias: bool,
    /// Teacher bias present.
    pub teacher_bias: bool,
    /// 16-byte vector loads (rows and bias 16-byte aligned, vocab a multiple of the width).
    pub vectorized: bool,
    /// Threads per block.
    pub block: u32,
    /// Blocks that share one row, each owning a contiguous slice of it. More than 1 needs
    /// sm_90: the blocks of a row form a thread-block cluster and combine their partial
    /// reductions through distributed shared memory.
    pub cluster: u32,
    /// Keep each block's slice of the logits in shared memory (raw, in the input dtype)
    /// from the first pass on: the row is read from global memory once, whatever the
    /// number of passes. Shared memory per block: [`shared_bytes`].
    pub cache: bool,
    /// Evict-first (`.cs`) hints on the last global read of the logits and on the
    /// gradient stores: neither is read again by this kernel.
    pub streaming: bool,
}

impl Spec {
    /// The multi-pass kernel (no row cache, one block per row) with `block` threads.
    pub fn passes(dtype: Dtype, vocab: usize, want_grad: bool, bias: bool, teacher_bias: bool, vectorized: bool, block: u32) -> Spec {
        Spec { dtype, vocab, want_grad, bias, teacher_bias, vectorized, block, cluster: 1, cache: false, streaming: false }
    }
    /// Elements per vector access (16 bytes when vectorized).
    pub fn vec(&self) -> usize {
        if self.vectorized { 16 / self.dtype.size() } else { 1 }
    }
    /// Elements of the row each block owns (a multiple of [`Spec::vec`]; the last block's
    /// slice may be shorter, or empty).
    pub fn slice(&self) -> usize {
        let vec = self.vec();
        self.vocab.div_ceil(vec).div_ceil(self.cluster.max(1) as usize) * vec
    }
}

/// Dynamic shared memory per block the kernel of `spec` needs (the row cache).
pub fn shared_bytes(spec: &Spec) -> usize {
    if spec.cache { spec.slice() * spec.dtype.size() } else { 0 }
}

/// Which kernel shape [`crate::gpu`] uses for the loss (see [`set_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowPlan {
    /// The default: what [`crate::gpu::plan_spec`] picks (today the multi-pass kernel with
    /// evict-first hints, the fastest measured).
    Auto,
    /// One block per row, one global pass per reduction level, then the gradient pass.
    Passes {
        /// `.cs` hints on the gradient pass.
        streaming: bool,
    },
    /// The row cached in shared memory, split over `cluster` blocks (1, or up to 8 on sm_90).
    Cached {
        /// Blocks per row.
        cluster: u32,
        /// `.cs` hints on the one global read and on the gradient stores.
        streaming: bool,
    },
}

static PLAN_OVERRIDE: std::sync::Mutex<RowPlan> = std::sync::Mutex::new(RowPlan::Auto);

/// Forces the loss kernel's shape for later calls (experiments, tests); `RowPlan::Auto`
/// restores the automatic choice. A forced plan the device cannot run is an error at
/// launch.
pub fn set_plan(plan: RowPlan) {
    *PLAN_OVERRIDE.lock().unwrap_or_else(|p| p.into_inner()) = plan;
}

/// The plan set by [`set_plan`].
pub fn plan() -> RowPlan {
    *PLAN_OVERRIDE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The fixed kernel signature (every loss gets the same, unused pointers may be null):
/// `(T* z, const T* zt, const T* bias, const T* tbias, const long long* targets,
///   long long ignore_index, const float* tp, long long tp_stride, const float* cp,
///   const float* grad_tokens, float seed_scale, float* loss_out,
///   unsigned long long* flags, long long t0, int rows)`.
pub const ENTRY: &str = "memlinear_loss";

/// Raw 16-bit <-> f32 conversions every kernel of the crate uses (round to nearest even;
/// NaN -> canonical NaN), without cuda_fp16.h / cuda_bf16.h.
pub(crate) const PRELUDE: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;
__device__ __forceinline__ float bf16_to_f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f_to_f16(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float f_to_f(float f) { return f; }
"#;

fn lit(v: f64) -> String {
    let f = v as f32;
    if f.is_nan() {
        "__int_as_float(0x7fc00000)".into()
    } else if f.is_infinite() {
        if f > 0.0 { "__int_as_float(0x7f800000)".into() } else { "__int_as_float(0xff800000)".into() }
    } else {
        format!("{:e}f", f)
    }
}

struct Gen<'l> {
    loss: &'l Loss,
    spec: Spec,
    live: Vec<bool>,
    fast: bool,
}

impl Gen<'_> {
    fn g(&self) -> &crate::expr::Graph {
        self.loss.graph()
    }
    /// The C expression of operand `a` inside a row evaluation with variable prefix `p`.
    fn operand(&self, a: NodeId, p: &str) -> String {
        let n = self.g().node(a);
        if let Op::Const(b) = n.op {
            return lit(f64::from_bits(b));
        }
        match n.shape {
            Shape::Row => format!("{p}{a}"),
            Shape::Scalar => format!("s{a}"),
        }
    }
    fn fun(&self, name: &str) -> String {
        match (name, self.fast) {
            ("exp", true) => "__expf".into(),
            ("log", true) => "__logf".into(),
            (n, _) => format!("{n}f"),
        }
    }
    fn elementwise(&self, op: Op, args: &[String]) -> String {
        use Op::*;
        match op {
            Neg => format!("(-{})", args[0]),
            Exp => format!("{}({})", self.fun("exp"), args[0]),
            Log => format!("{}({})", self.fun("log"), args[0]),
            Tanh => format!("tanhf({})", args[0]),
            Sqrt => format!("sqrtf({})", args[0]),
            Add => format!("({} + {})", args[0], args[1]),
            Sub => format!("({} - {})", args[0], args[1]),
            Mul => format!("({} * {})", args[0], args[1]),
            Div => format!("({} / {})", args[0], args[1]),
            Max => format!("(({1}) > ({0}) ? ({1}) : ({0}))", args[0], args[1]),
            Min => format!("(({1}) < ({0}) ? ({1}) : ({0}))", args[0], args[1]),
            Gt => format!("(({}) > ({}) ? 1.f : 0.f)", args[0], args[1]),
            Select => format!("(({}) != 0.f ? ({}) : ({}))", args[0], args[1], args[2]),
            StopGrad => args[0].clone(),
            other => unreachable!("{other:?} is not elementwise"),
        }
    }
    fn load(&self, ptr: &str, idx: &str) -> String {
        match self.spec.dtype {
            Dtype::F32 => format!("{ptr}[{idx}]"),
            Dtype::Bf16 => format!("bf16_to_f({ptr}[{idx}])"),
            Dtype::F16 => format!("f16_to_f({ptr}[{idx}])"),
        }
    }
    /// Statements computing the row nodes in `need` (a set, computed in id order) at
    /// element index `idx`, with variables named `{p}{id}`. `vals` gives the source of
    /// the logits and teacher values at that index.
    fn row_block(&self, need: &[bool], p: &str, idx: &str, z: &str, zt: &str) -> String {
        let mut s = String::new();
        for (i, n) in self.g().nodes().iter().enumerate() {
            if !need[i] || n.shape != Shape::Row {
                continue;
            }
            let e = match n.op {
                Op::Logits => z.to_string(),
                Op::Teacher => zt.to_string(),
                Op::IsTarget => format!("(({idx}) == tgt ? 1.f : 0.f)"),
                Op::ClassParam(k) => format!("cp[{}LL + ({idx})]", k as usize * self.spec.vocab),
                op => {
                    let args: Vec<String> = n.args[..op.arity()].iter().map(|&a| self.operand(a, p)).collect();
                    self.elementwise(op, &args)
                }
            };
            let _ = writeln!(s, "            const float {p}{i} = {e};");
        }
        s
    }
    /// The row nodes (transitively, not crossing scalars) that `roots` need.
    fn row_deps(&self, roots: &[NodeId]) -> Vec<bool> {
        let mut need = vec![false; self.g().nodes().len()];
        for &r in roots {
            need[r as usize] = true;
        }
        for i in (0..need.len()).rev() {
            if !need[i] {
                continue;
            }
            let n = self.g().node(i as NodeId);
            if n.shape != Shape::Row && !roots.contains(&(i as NodeId)) {
                continue;
            }
            for &a in &n.args[..n.op.arity()] {
                if self.g().node(a).shape == Shape::Row {
                    need[a as usize] = true;
                }
            }
        }
        // Only rows: scalars are computed in stages.
        for (i, n) in self.g().nodes().iter().enumerate() {
            if n.shape != Shape::Row {
                need[i] = false;
            }
        }
        need
    }
}

/// Where a pass gets the logits from.
#[derive(Clone, Copy, PartialEq)]
enum Src {
    /// Global memory (`cs`: evict-first hint, the last read).
    Global { cs: bool },
    /// The row cache in shared memory.
    Cache,
    /// The fill pass: `zv` is already converted from the raw load.
    Filled,
}

/// Generates the kernel source for `loss` under `spec`.
pub fn generate(loss: &Loss, spec: Spec) -> String {
    let want = if spec.want_grad { vec![loss.loss_node(), loss.grad_node()] } else { vec![loss.loss_node()] };
    let gen = Gen { loss, spec, live: loss.live(&want), fast: spec.dtype != Dtype::F32 };
    let g = loss.graph();
    let nodes = g.nodes();
    let ty = match spec.dtype {
        Dtype::F32 => "float",
        _ => "u16",
    };
    let vec = spec.vec();
    let v = spec.vocab;
    let max_level = nodes.iter().enumerate().filter(|(i, _)| gen.live[*i]).map(|(i, _)| loss.level(i as NodeId)).max().unwrap_or(0);
    let cluster = spec.cluster.max(1);
    // Without a reduction pass there is nothing to keep between passes.
    let cache = spec.cache && max_level >= 1;
    let slice = spec.slice();
    let nb = slice.div_ceil(vec).div_ceil(spec.block as usize).max(1);
    let nbatch = nb.min(8);
    let reds_all: Vec<usize> = (0..nodes.len()).filter(|&i| gen.live[i] && nodes[i].op.is_reduction()).collect();
    let slot = |i: usize| reds_all.iter().position(|&r| r == i).expect("a live reduction");

    let mut s = String::new();
    let _ = writeln!(s, "// Generated by memlinear::codegen for loss `{}` ({:?}).", loss.name(), spec);
    for line in loss.dump().lines() {
        let _ = writeln!(s, "//   {line}");
    }
    s += PRELUDE;
    let _ = writeln!(
        s,
        "#define V {v}LL\n#define BLOCK {}\n#define VEC {vec}\n#define CLUSTER {cluster}\n#define SLICE {slice}LL\n#define NB {nb}\n#define NBATCH {nbatch}\n#define NRED {}",
        spec.block,
        reds_all.len().max(1)
    );
    s += &vector_helpers(spec.dtype, vec);
    s += r#"
struct LSE { float m, s; };
__device__ __forceinline__ LSE lse_merge(LSE a, LSE b) {
    float m = fmaxf(a.m, b.m);
    if (m == __int_as_float(0xff800000)) return a;
    LSE r; r.m = m; r.s = a.s * EXPF(a.m - m) + b.s * EXPF(b.m - m); return r;
}
__device__ __forceinline__ float lse_value(LSE y) { return y.m == __int_as_float(0xff800000) ? y.m : y.m + LOGF(y.s); }
__device__ __forceinline__ float warp_sum(float x) { for (int o = 16; o; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o); return x; }
__device__ __forceinline__ float warp_max(float x) { for (int o = 16; o; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o)); return x; }
__device__ __forceinline__ LSE warp_lse(LSE x) {
    for (int o = 16; o; o >>= 1) { LSE y; y.m = __shfl_xor_sync(0xffffffffu, x.m, o); y.s = __shfl_xor_sync(0xffffffffu, x.s, o); x = lse_merge(x, y); }
    return x;
}
// Block reductions: every thread gets the result. `sh` holds 2 * BLOCK/32 floats.
__device__ float block_sum(float x, float* sh) {
    x = warp_sum(x); int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads(); if (l == 0) sh[w] = x; __syncthreads();
    x = l < BLOCK / 32 ? sh[l] : 0.f; return warp_sum(x);
}
__device__ float block_max(float x, float* sh) {
    x = warp_max(x); int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads(); if (l == 0) sh[w] = x; __syncthreads();
    x = l < BLOCK / 32 ? sh[l] : __int_as_float(0xff800000); return warp_max(x);
}
__device__ LSE block_lse2(LSE x, float* sh) {
    x = warp_lse(x); int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads(); if (l == 0) { sh[w] = x.m; sh[BLOCK / 32 + w] = x.s; } __syncthreads();
    LSE y; y.m = l < BLOCK / 32 ? sh[l] : __int_as_float(0xff800000); y.s = l < BLOCK / 32 ? sh[BLOCK / 32 + l] : 0.f;
    return warp_lse(y);
}
__device__ float block_lse(LSE x, float* sh) { return lse_value(block_lse2(x, sh)); }
"#;
    if cluster > 1 {
        // Thread-block cluster (sm_90): the default semantics of barrier.cluster.arrive /
        // wait are release / acquire, so a slot written before arrive is visible to every
        // block of the cluster after wait. mapa maps a generic address of our shared
        // memory to the same variable in block `r` of the cluster.
        s += r#"__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }
__device__ __forceinline__ float peer(const float* p, unsigned r) {
    unsigned long long a;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(a) : "l"((unsigned long long)p), "r"(r));
    return *(const volatile float*)a;
}
"#;
    }
    s = s.replace("EXPF", &gen.fun("exp")).replace("LOGF", &gen.fun("log"));
    let _ = writeln!(
        s,
        r#"extern "C" __global__ void __launch_bounds__(BLOCK) {ENTRY}(
    {ty}* __restrict__ z, const {ty}* __restrict__ zt, const {ty}* __restrict__ bias, const {ty}* __restrict__ tbias,
    const long long* __restrict__ targets, long long ignore_index,
    const float* __restrict__ tp, long long tp_stride, const float* __restrict__ cp,
    const float* __restrict__ grad_tokens, float seed_scale, float* __restrict__ loss_out,
    unsigned long long* flags, long long t0, int rows)
{{
    // Block `rank` of the row's CLUSTER blocks owns elements [lo, hi).
    const int row = blockIdx.x / CLUSTER;
    const unsigned rank = blockIdx.x % CLUSTER; (void)rank;
    if (row >= rows) return;
    __shared__ float sh[2 * BLOCK / 32];
    const long long lo = (long long)rank * SLICE;
    const long long hi = lo + SLICE < V ? lo + SLICE : V;
    {ty}* zr = z + (long long)row * V;
    const {ty}* ztr = zt ? zt + (long long)row * V : zt;
    (void)ztr; (void)tbias; (void)bias; (void)tp; (void)tp_stride; (void)cp;"#
    );
    if cluster > 1 {
        s += "    __shared__ float red[2 * NRED]; // this block's partial of each reduction, read by the cluster\n";
    }
    if cache {
        let _ = writeln!(s, "    extern __shared__ __align__(16) unsigned char cache_raw[];\n    {ty}* zc = ({ty}*)cache_raw; // elements [lo, hi) of the row, raw");
    }
    s += r#"    long long tgt = -1;
    if (targets) {
        tgt = targets[row];
        if (tgt == ignore_index || tgt < 0 || tgt >= V) {
            if (tgt != ignore_index) atomicOr(flags, 4ULL);
            if (threadIdx.x == 0 && rank == 0) loss_out[row] = 0.f;
"#;
    if spec.want_grad {
        let zero = if spec.dtype == Dtype::F32 { "0.f" } else { "(u16)0" };
        let _ = writeln!(s, "            for (long long i = lo + threadIdx.x; i < hi; i += BLOCK) zr[i] = {zero};");
    }
    s += "            return;\n        }\n    }\n";
    let _ = writeln!(s, "    const float seed = (grad_tokens ? grad_tokens[row] : 1.f) * seed_scale; (void)seed;");
    // The logit at the target, read before any gradient store of this row: the gradient
    // pass writes over the row (in another thread, or another block of the cluster), and
    // every write comes after a block (cluster) barrier that follows this read.
    let _ = writeln!(s, "    const float ztgt = tgt >= 0 ? {} : 0.f; (void)ztgt;", gen.load("zr", "tgt"));
    if cluster > 1 && max_level == 0 {
        s += "    cluster_arrive(); cluster_wait(); // every block has read ztgt\n";
    } else if max_level == 0 && spec.want_grad {
        s += "    __syncthreads(); // every thread has read ztgt\n";
    }

    // Scalars by stage. Stage k: after the level-k reductions.
    let scalar_stmt = |gen: &Gen<'_>, i: usize| -> Option<String> {
        let n = nodes[i];
        if n.shape != Shape::Scalar || n.op.is_reduction() || matches!(n.op, Op::Const(_)) {
            return None;
        }
        let e = match n.op {
            Op::TokenParam(k) => format!("tp[{k} * tp_stride + row]"),
            Op::Seed => "seed".into(),
            Op::VocabSize => lit(v as f64),
            Op::AtTarget => {
                // Evaluate the row operand at the target index.
                let need = gen.row_deps(&[n.args[0]]);
                let z = format!("(ztgt{})", if spec.bias { format!(" + {}", gen.load("bias", "tgt")) } else { String::new() });
                let zt = format!("({}{})", gen.load("ztr", "tgt"), if spec.teacher_bias { format!(" + {}", gen.load("tbias", "tgt")) } else { String::new() });
                let block = gen.row_block(&need, &format!("g{i}_"), "tgt", &z, &zt);
                return Some(format!(
                    "    float s{i};\n    {{\n{block}            s{i} = {};\n    }}\n",
                    gen.operand(n.args[0], &format!("g{i}_"))
                ));
            }
            op => {
                let args: Vec<String> = n.args[..op.arity()].iter().map(|&a| gen.operand(a, "r")).collect();
                gen.elementwise(op, &args)
            }
        };
        Some(format!("    const float s{i} = {e};\n"))
    };
    let (z, zt) = {
        let z = if spec.bias { "(zv[j] + bv[j])".to_string() } else { "zv[j]".to_string() };
        let zt = if spec.teacher_bias { "(tv[j] + tbv[j])".to_string() } else { "tv[j]".to_string() };
        (z, zt)
    };
    // Vector loads of what a pass reads, at the top of each step of VEC elements.
    let loads = |need: &[bool], src: Src| -> String {
        let uses = |op: Op| nodes.iter().enumerate().any(|(i, n)| need[i] && n.op == op);
        let mut l = String::new();
        if uses(Op::Logits) {
            match src {
                Src::Global { cs: false } => l += "        float zv[VEC]; ldv(zr + b, zv);\n",
                Src::Global { cs: true } => l += "        float zv[VEC]; ldv_cs(zr + b, zv);\n",
                Src::Cache => l += "        float zv[VEC]; ldv(zc + (b - lo), zv);\n",
                Src::Filled => {}
            }
            if spec.bias {
                l += "        float bv[VEC]; ldv(bias + b, bv);\n";
            }
        }
        if uses(Op::Teacher) {
            l += "        float tv[VEC]; ldv(ztr + b, tv);\n";
            if spec.teacher_bias {
                l += "        float tbv[VEC]; ldv(tbias + b, tbv);\n";
            }
        }
        l
    };
    // Stage 0 scalars.
    for i in 0..nodes.len() {
        if gen.live[i] && loss.level(i as NodeId) == 0 {
            if let Some(st) = scalar_stmt(&gen, i) {
                s += &st;
            }
        }
    }
    for level in 1..=max_level {
        let reds: Vec<usize> = (0..nodes.len()).filter(|&i| gen.live[i] && nodes[i].op.is_reduction() && loss.level(i as NodeId) == level).collect();
        let _ = writeln!(s, "    // pass {level}: {} reduction(s)", reds.len());
        for &i in &reds {
            match nodes[i].op {
                Op::Sum => { let _ = writeln!(s, "    float a{i} = 0.f;"); }
                Op::ReduceMax => { let _ = writeln!(s, "    float a{i} = __int_as_float(0xff800000);"); }
                Op::LogSumExp => { let _ = writeln!(s, "    LSE a{i}; a{i}.m = __int_as_float(0xff800000); a{i}.s = 0.f;"); }
                _ => unreachable!(),
            }
        }
        let roots: Vec<NodeId> = reds.iter().map(|&i| nodes[i].args[0]).collect();
        let need = gen.row_deps(&roots);
        let mut body = String::new();
        let _ = writeln!(body, "        #pragma unroll\n        for (int j = 0; j < VEC; ++j) {{\n            const long long i = b + j; (void)i;");
        body += &gen.row_block(&need, "r", "i", &z, &zt);
        for &i in &reds {
            let x = gen.operand(nodes[i].args[0], "r");
            match nodes[i].op {
                Op::Sum => { let _ = writeln!(body, "            a{i} += {x};"); }
                Op::ReduceMax => { let _ = writeln!(body, "            a{i} = fmaxf(a{i}, {x});"); }
                Op::LogSumExp => {
                    let e = gen.fun("exp");
                    let _ = writeln!(
                        body,
                        "            {{ const float x = {x}; if (x > a{i}.m) {{ a{i}.s = a{i}.s * {e}(a{i}.m - x) + 1.f; a{i}.m = x; }} else a{i}.s += {e}(x - a{i}.m); }}"
                    );
                }
                _ => unreachable!(),
            }
        }
        body += "        }\n";
        if cache && level == 1 {
            // The fill pass: NBATCH raw loads in flight per thread, each kept in shared
            // memory, then the pass's work on them.
            s += "    #pragma unroll 1\n    for (int k0 = 0; k0 < NB; k0 += NBATCH) {\n        RAW rv[NBATCH];\n        #pragma unroll\n";
            let ld = if spec.streaming { "ldraw_cs" } else { "ldraw" };
            let _ = writeln!(
                s,
                "        for (int k = 0; k < NBATCH; ++k) {{\n            const long long b = lo + ((long long)(k0 + k) * BLOCK + threadIdx.x) * VEC;\n            if (k0 + k < NB && b < hi) rv[k] = {ld}(zr + b);\n        }}"
            );
            s += "        #pragma unroll\n        for (int k = 0; k < NBATCH; ++k) {\n            const long long b = lo + ((long long)(k0 + k) * BLOCK + threadIdx.x) * VEC;\n            if (!(k0 + k < NB && b < hi)) continue;\n";
            s += "        putraw(zc + (b - lo), rv[k]);\n        float zv[VEC]; cvt(rv[k], zv); (void)zv;\n";
            s += &loads(&need, Src::Filled);
            s += &body;
            s += "        }\n    }\n";
        } else {
            let src = if cache { Src::Cache } else { Src::Global { cs: false } };
            let _ = writeln!(s, "    for (long long b = lo + threadIdx.x * VEC; b < hi; b += BLOCK * VEC) {{");
            s += &loads(&need, src);
            s += &body;
            s += "    }\n";
        }
        if cluster == 1 {
            for &i in &reds {
                match nodes[i].op {
                    Op::Sum => { let _ = writeln!(s, "    const float s{i} = block_sum(a{i}, sh);"); }
                    Op::ReduceMax => { let _ = writeln!(s, "    const float s{i} = block_max(a{i}, sh);"); }
                    Op::LogSumExp => { let _ = writeln!(s, "    const float s{i} = block_lse(a{i}, sh);"); }
                    _ => unreachable!(),
                }
            }
        } else {
            // Block partials into this block's slots, one cluster barrier, then every block
            // combines all partials in rank order: every block gets the same bits.
            for &i in &reds {
                let k = slot(i);
                match nodes[i].op {
                    Op::Sum => { let _ = writeln!(s, "    {{ const float p = block_sum(a{i}, sh); if (threadIdx.x == 0) red[{}] = p; }}", 2 * k); }
                    Op::ReduceMax => { let _ = writeln!(s, "    {{ const float p = block_max(a{i}, sh); if (threadIdx.x == 0) red[{}] = p; }}", 2 * k); }
                    Op::LogSumExp => {
                        let _ = writeln!(s, "    {{ const LSE p = block_lse2(a{i}, sh); if (threadIdx.x == 0) {{ red[{}] = p.m; red[{}] = p.s; }} }}", 2 * k, 2 * k + 1);
                    }
                    _ => unreachable!(),
                }
            }
            s += "    cluster_arrive(); cluster_wait();\n";
            for &i in &reds {
                let k = slot(i);
                match nodes[i].op {
                    Op::Sum => { let _ = writeln!(s, "    float s{i} = 0.f;\n    #pragma unroll\n    for (unsigned r = 0; r < CLUSTER; ++r) s{i} += peer(&red[{}], r);", 2 * k); }
                    Op::ReduceMax => {
                        let _ = writeln!(s, "    float s{i} = __int_as_float(0xff800000);\n    #pragma unroll\n    for (unsigned r = 0; r < CLUSTER; ++r) s{i} = fmaxf(s{i}, peer(&red[{}], r));", 2 * k);
                    }
                    Op::LogSumExp => {
                        let _ = writeln!(
                            s,
                            "    float s{i};\n    {{\n        LSE q; q.m = __int_as_float(0xff800000); q.s = 0.f;\n        #pragma unroll\n        for (unsigned r = 0; r < CLUSTER; ++r) {{ LSE t; t.m = peer(&red[{}], r); t.s = peer(&red[{}], r); q = lse_merge(q, t); }}\n        s{i} = lse_value(q);\n    }}",
                            2 * k,
                            2 * k + 1
                        );
                    }
                    _ => unreachable!(),
                }
            }
        }
        for i in 0..nodes.len() {
            if gen.live[i] && loss.level(i as NodeId) == level {
                if let Some(st) = scalar_stmt(&gen, i) {
                    s += &st;
                }
            }
        }
    }
    if cluster > 1 && max_level >= 1 {
        // Our slots may still be read by the cluster: arrive now, wait before exiting.
        s += "    cluster_arrive();\n";
    }
    let l = gen.operand(loss.loss_node(), "r");
    let _ = writeln!(
        s,
        "    if (threadIdx.x == 0 && rank == 0) {{\n        loss_out[row] = {l};\n        if (!isfinite({l})) {{ atomicOr(flags, 1ULL); atomicMin(flags + 1, (unsigned long long)(t0 + row)); }}\n    }}"
    );
    if spec.want_grad {
        let gnode = loss.grad_node();
        let need = gen.row_deps(&[gnode]);
        let gx = gen.operand(gnode, "r");
        let src = if cache { Src::Cache } else { Src::Global { cs: spec.streaming } };
        let st = if spec.streaming { "stv_cs" } else { "stv" };
        let _ = writeln!(s, "    // gradient pass\n    bool bad = false;");
        let _ = writeln!(s, "    for (long long b = lo + threadIdx.x * VEC; b < hi; b += BLOCK * VEC) {{");
        s += &loads(&need, src);
        let _ = writeln!(s, "        float gv[VEC];\n        #pragma unroll\n        for (int j = 0; j < VEC; ++j) {{\n            const long long i = b + j; (void)i;");
        s += &gen.row_block(&need, "r", "i", &z, &zt);
        let _ = writeln!(s, "            gv[j] = {gx};\n            bad |= !isfinite(gv[j]);");
        let _ = writeln!(s, "        }}\n        {st}(zr + b, gv);\n    }}");
        s += "    if (bad) { atomicOr(flags, 2ULL); atomicMin(flags + 1, (unsigned long long)(t0 + row)); }\n";
    }
    if cluster > 1 && max_level >= 1 {
        s += "    cluster_wait();\n";
    }
    s += "}\n";
    s
}

/// Raw vector access: `RAW` holds VEC elements as loaded; `ldraw` / `ldraw_cs` (evict
/// first) load one from global memory (16-byte aligned when VEC > 1), `putraw` stores it
/// (shared memory), `cvt` converts it to floats; `ldv(p, out)` is `cvt(ldraw(p), out)`;
/// `stv` / `stv_cs` store VEC floats rounded to nearest even.
fn vector_helpers(dtype: Dtype, vec: usize) -> String {
    let (ty, to_f, from_f) = match dtype {
        Dtype::F32 => ("float", "", ""),
        Dtype::Bf16 => ("u16", "bf16_to_f", "f_to_bf16"),
        Dtype::F16 => ("u16", "f16_to_f", "f_to_f16"),
    };
    let mut s = if vec == 1 {
        let (ptx, reg) = if dtype == Dtype::F32 { ("f32", "f") } else { ("u16", "h") };
        format!(
            "typedef {ty} RAW;\n\
             __device__ __forceinline__ RAW ldraw(const {ty}* p) {{ return p[0]; }}\n\
             __device__ __forceinline__ RAW ldraw_cs(const {ty}* p) {{ RAW r; asm volatile(\"ld.global.cs.{ptx} %0, [%1];\" : \"={reg}\"(r) : \"l\"(p)); return r; }}\n\
             __device__ __forceinline__ void putraw({ty}* p, RAW r) {{ p[0] = r; }}\n\
             __device__ __forceinline__ void cvt(RAW r, float* o) {{ o[0] = {to_f}(r); }}\n\
             __device__ __forceinline__ void stv({ty}* p, const float* g) {{ p[0] = {from_f}(g[0]); }}\n\
             __device__ __forceinline__ void stv_cs({ty}* p, const float* g) {{ RAW r = {from_f}(g[0]); asm volatile(\"st.global.cs.{ptx} [%0], %1;\" :: \"l\"(p), \"{reg}\"(r) : \"memory\"); }}\n"
        )
    } else if dtype == Dtype::F32 {
        "typedef float4 RAW;\n\
         __device__ __forceinline__ RAW ldraw(const float* p) { return *(const float4*)p; }\n\
         __device__ __forceinline__ RAW ldraw_cs(const float* p) { RAW r; asm volatile(\"ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%4];\" : \"=f\"(r.x), \"=f\"(r.y), \"=f\"(r.z), \"=f\"(r.w) : \"l\"(p)); return r; }\n\
         __device__ __forceinline__ void putraw(float* p, RAW r) { *(float4*)p = r; }\n\
         __device__ __forceinline__ void cvt(RAW q, float* o) { o[0] = q.x; o[1] = q.y; o[2] = q.z; o[3] = q.w; }\n\
         __device__ __forceinline__ void stv(float* p, const float* g) { *(float4*)p = make_float4(g[0], g[1], g[2], g[3]); }\n\
         __device__ __forceinline__ void stv_cs(float* p, const float* g) { asm volatile(\"st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};\" :: \"l\"(p), \"f\"(g[0]), \"f\"(g[1]), \"f\"(g[2]), \"f\"(g[3]) : \"memory\"); }\n"
            .to_string()
    } else {
        format!(
            "typedef uint4 RAW;\n\
             __device__ __forceinline__ RAW ldraw(const u16* p) {{ return *(const uint4*)p; }}\n\
             __device__ __forceinline__ RAW ldraw_cs(const u16* p) {{ RAW r; asm volatile(\"ld.global.cs.v4.u32 {{%0, %1, %2, %3}}, [%4];\" : \"=r\"(r.x), \"=r\"(r.y), \"=r\"(r.z), \"=r\"(r.w) : \"l\"(p)); return r; }}\n\
             __device__ __forceinline__ void putraw(u16* p, RAW r) {{ *(uint4*)p = r; }}\n\
             __device__ __forceinline__ void cvt(RAW q, float* o) {{\n\
                 u32 w[4] = {{q.x, q.y, q.z, q.w}};\n\
                 #pragma unroll\n for (int k = 0; k < 4; ++k) {{ o[2 * k] = {to_f}((u16)(w[k] & 0xffffu)); o[2 * k + 1] = {to_f}((u16)(w[k] >> 16)); }}\n\
             }}\n\
             __device__ __forceinline__ void pack(const float* g, u32* w) {{\n\
                 #pragma unroll\n for (int k = 0; k < 4; ++k) w[k] = (u32){from_f}(g[2 * k]) | ((u32){from_f}(g[2 * k + 1]) << 16);\n\
             }}\n\
             __device__ __forceinline__ void stv(u16* p, const float* g) {{ u32 w[4]; pack(g, w); *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]); }}\n\
             __device__ __forceinline__ void stv_cs(u16* p, const float* g) {{ u32 w[4]; pack(g, w); asm volatile(\"st.global.cs.v4.u32 [%0], {{%1, %2, %3, %4}};\" :: \"l\"(p), \"r\"(w[0]), \"r\"(w[1]), \"r\"(w[2]), \"r\"(w[3]) : \"memory\"); }}\n"
        )
    };
    let _ = writeln!(s, "template <typename P> __device__ __forceinline__ void ldv(const P* p, float* o) {{ cvt(ldraw(p), o); }}");
    let _ = writeln!(s, "template <typename P> __device__ __forceinline__ void ldv_cs(const P* p, float* o) {{ cvt(ldraw_cs(p), o); }}");
    s
}
