//! CUDA source generated from a [`Loss`]: one kernel that computes the per-token loss and
//! writes d(loss)/d(logits) over the logits, in place, for a chunk of rows.
//!
//! One block per row. The schedule is the loss's reduction levels: pass k walks the row
//! once and computes every level-k reduction (sums, maxima, online logsumexp), block-
//! reduces them, and then every scalar of level k (including values at the target
//! index); the last pass evaluates the gradient expression and stores it. Later passes
//! re-read the row; whether that hits L2 depends on how many rows are in flight (on the
//! H100, 512 and 1024 threads per row measured the same: `bench/RESULTS.md`).
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

/// Sets the loss kernel's threads per block (a multiple of 32, at most 1024) for later
/// calls; for experiments such as `memlinear-bench gpu`.
pub fn set_block(threads: u32) {
    assert!(threads % 32 == 0 && (32..=1024).contains(&threads), "block of {threads} threads");
    BLOCK_OVERRIDE.store(threads, std::sync::atomic::Ordering::Relaxed);
}

/// The loss kernel's threads per block.
pub fn block() -> u32 {
    match BLOCK_OVERRIDE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => BLOCK,
        b => b,
    }
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
    /// Threads per block (one row per block).
    pub block: u32,
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
    let vec = if spec.vectorized { 16 / spec.dtype.size() } else { 1 };
    let v = spec.vocab;
    let max_level = nodes.iter().enumerate().filter(|(i, _)| gen.live[*i]).map(|(i, _)| loss.level(i as NodeId)).max().unwrap_or(0);

    let mut s = String::new();
    let _ = writeln!(s, "// Generated by memlinear::codegen for loss `{}` ({:?}).", loss.name(), spec);
    for line in loss.dump().lines() {
        let _ = writeln!(s, "//   {line}");
    }
    s += PRELUDE;
    let _ = writeln!(s, "#define V {v}LL\n#define BLOCK {}\n#define VEC {vec}", spec.block);
    s += &vector_helpers(spec.dtype, vec);
    s += r#"
struct LSE { float m, s; };
__device__ __forceinline__ LSE lse_merge(LSE a, LSE b) {
    float m = fmaxf(a.m, b.m);
    if (m == __int_as_float(0xff800000)) return a;
    LSE r; r.m = m; r.s = a.s * EXPF(a.m - m) + b.s * EXPF(b.m - m); return r;
}
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
__device__ float block_lse(LSE x, float* sh) {
    x = warp_lse(x); int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads(); if (l == 0) { sh[w] = x.m; sh[BLOCK / 32 + w] = x.s; } __syncthreads();
    LSE y; y.m = l < BLOCK / 32 ? sh[l] : __int_as_float(0xff800000); y.s = l < BLOCK / 32 ? sh[BLOCK / 32 + l] : 0.f;
    y = warp_lse(y);
    return y.m == __int_as_float(0xff800000) ? y.m : y.m + LOGF(y.s);
}
"#;
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
    const int row = blockIdx.x;
    if (row >= rows) return;
    __shared__ float sh[2 * BLOCK / 32];
    {ty}* zr = z + (long long)row * V;
    const {ty}* ztr = zt ? zt + (long long)row * V : zt;
    (void)ztr; (void)tbias; (void)bias; (void)tp; (void)tp_stride; (void)cp;
    long long tgt = -1;
    if (targets) {{
        tgt = targets[row];
        if (tgt == ignore_index || tgt < 0 || tgt >= V) {{
            if (tgt != ignore_index) atomicOr(flags, 4ULL);
            if (threadIdx.x == 0) loss_out[row] = 0.f;"#
    );
    if spec.want_grad {
        let zero = if spec.dtype == Dtype::F32 { "0.f" } else { "(u16)0" };
        let _ = writeln!(s, "            for (long long i = threadIdx.x; i < V; i += BLOCK) zr[i] = {zero};");
    }
    s += "            return;\n        }\n    }\n";
    let _ = writeln!(s, "    const float seed = (grad_tokens ? grad_tokens[row] : 1.f) * seed_scale; (void)seed;");

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
                let z = format!("({}{})", gen.load("zr", "tgt"), if spec.bias { format!(" + {}", gen.load("bias", "tgt")) } else { String::new() });
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
    let elem_z = |_idx: &str| -> (String, String) {
        let z = if spec.bias { "(zv[j] + bv[j])".to_string() } else { "zv[j]".to_string() };
        let zt = if spec.teacher_bias { "(tv[j] + tbv[j])".to_string() } else { "tv[j]".to_string() };
        (z, zt)
    };
    // Vector loads of what a pass reads, at the top of each step of VEC elements.
    let loads = |need: &[bool]| -> String {
        let uses = |op: Op| nodes.iter().enumerate().any(|(i, n)| need[i] && n.op == op);
        let mut l = String::new();
        if uses(Op::Logits) {
            l += "        float zv[VEC]; ldv(zr + b, zv);\n";
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
        let (z, zt) = elem_z("i");
        let _ = writeln!(s, "    for (long long b = threadIdx.x * VEC; b < V; b += BLOCK * VEC) {{");
        s += &loads(&need);
        let _ = writeln!(s, "        #pragma unroll\n        for (int j = 0; j < VEC; ++j) {{\n            const long long i = b + j; (void)i;");
        s += &gen.row_block(&need, "r", "i", &z, &zt);
        for &i in &reds {
            let x = gen.operand(nodes[i].args[0], "r");
            match nodes[i].op {
                Op::Sum => { let _ = writeln!(s, "            a{i} += {x};"); }
                Op::ReduceMax => { let _ = writeln!(s, "            a{i} = fmaxf(a{i}, {x});"); }
                Op::LogSumExp => {
                    let e = gen.fun("exp");
                    let _ = writeln!(
                        s,
                        "            {{ const float x = {x}; if (x > a{i}.m) {{ a{i}.s = a{i}.s * {e}(a{i}.m - x) + 1.f; a{i}.m = x; }} else a{i}.s += {e}(x - a{i}.m); }}"
                    );
                }
                _ => unreachable!(),
            }
        }
        s += "        }\n    }\n";
        for &i in &reds {
            match nodes[i].op {
                Op::Sum => { let _ = writeln!(s, "    const float s{i} = block_sum(a{i}, sh);"); }
                Op::ReduceMax => { let _ = writeln!(s, "    const float s{i} = block_max(a{i}, sh);"); }
                Op::LogSumExp => { let _ = writeln!(s, "    const float s{i} = block_lse(a{i}, sh);"); }
                _ => unreachable!(),
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
    let l = gen.operand(loss.loss_node(), "r");
    let _ = writeln!(
        s,
        "    if (threadIdx.x == 0) {{\n        loss_out[row] = {l};\n        if (!isfinite({l})) {{ atomicOr(flags, 1ULL); atomicMin(flags + 1, (unsigned long long)(t0 + row)); }}\n    }}"
    );
    if spec.want_grad {
        let gnode = loss.grad_node();
        let need = gen.row_deps(&[gnode]);
        let (z, zt) = elem_z("i");
        let gx = gen.operand(gnode, "r");
        let _ = writeln!(s, "    // gradient pass\n    bool bad = false;");
        let _ = writeln!(s, "    for (long long b = threadIdx.x * VEC; b < V; b += BLOCK * VEC) {{");
        s += &loads(&need);
        let _ = writeln!(s, "        float gv[VEC];\n        #pragma unroll\n        for (int j = 0; j < VEC; ++j) {{\n            const long long i = b + j; (void)i;");
        s += &gen.row_block(&need, "r", "i", &z, &zt);
        let _ = writeln!(s, "            gv[j] = {gx};\n            bad |= !isfinite(gv[j]);");
        s += "        }\n        stv(zr + b, gv);\n    }\n";
        s += "    if (bad) { atomicOr(flags, 2ULL); atomicMin(flags + 1, (unsigned long long)(t0 + row)); }\n";
    }
    s += "}\n";
    s
}

/// `ldv(p, out)`: VEC elements from `p` (16-byte aligned when VEC > 1) into floats;
/// `stv(p, in)`: the reverse, rounding to nearest even.
fn vector_helpers(dtype: Dtype, vec: usize) -> String {
    let (ty, to_f, from_f) = match dtype {
        Dtype::F32 => ("float", "", ""),
        Dtype::Bf16 => ("u16", "bf16_to_f", "f_to_bf16"),
        Dtype::F16 => ("u16", "f16_to_f", "f_to_f16"),
    };
    if vec == 1 {
        return format!(
            "__device__ __forceinline__ void ldv(const {ty}* p, float* o) {{ o[0] = {to_f}(p[0]); }}\n\
             __device__ __forceinline__ void stv({ty}* p, const float* g) {{ p[0] = {from_f}(g[0]); }}\n"
        );
    }
    match dtype {
        Dtype::F32 => "__device__ __forceinline__ void ldv(const float* p, float* o) { float4 q = *(const float4*)p; o[0] = q.x; o[1] = q.y; o[2] = q.z; o[3] = q.w; }\n\
                       __device__ __forceinline__ void stv(float* p, const float* g) { *(float4*)p = make_float4(g[0], g[1], g[2], g[3]); }\n"
            .to_string(),
        _ => format!(
            "__device__ __forceinline__ void ldv(const u16* p, float* o) {{\n\
                 uint4 q = *(const uint4*)p; u32 w[4] = {{q.x, q.y, q.z, q.w}};\n\
                 #pragma unroll\n for (int k = 0; k < 4; ++k) {{ o[2 * k] = {to_f}((u16)(w[k] & 0xffffu)); o[2 * k + 1] = {to_f}((u16)(w[k] >> 16)); }}\n}}\n\
             __device__ __forceinline__ void stv(u16* p, const float* g) {{\n\
                 u32 w[4];\n\
                 #pragma unroll\n for (int k = 0; k < 4; ++k) w[k] = (u32){from_f}(g[2 * k]) | ((u32){from_f}(g[2 * k + 1]) << 16);\n\
                 *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);\n}}\n"
        ),
    }
}
