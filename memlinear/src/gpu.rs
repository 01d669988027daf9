//! The CUDA implementation: cuBLAS GEMMs per chunk, the loss kernel generated from the
//! loss expression ([`crate::codegen`]), f32 accumulation of dW and dbias.
//!
//! Per chunk of `c` tokens (all on the caller's stream):
//! 1. `logits[c, V] = X_c @ W^T` (cuBLAS, output in the input dtype, f32 accumulation);
//!    the teacher's logits likewise when the loss reads them;
//! 2. the loss kernel: per-token losses, and d(loss)/d(logits) * upstream written over the
//!    logits (ignored tokens: zeros); its shape (multi-pass, or the row cached in shared
//!    memory over a cluster) comes from [`plan_spec`], its launch is [`launch_loss`];
//! 3. `dX_c = dlogits @ W` (complete over the vocabulary: one rounding);
//! 4. `dW += dlogits^T @ X_c` into f32: the caller's f32 gradient itself, or an f32
//!    accumulator in the workspace rounded once at the end; dbias likewise.
//!
//! Temporary memory is the workspace: cuBLAS's own workspace, one chunk of logits (two
//! with a teacher), per-token losses, and the f32 accumulators when the gradient outputs
//! are 16-bit. [`layout`] sizes it; [`chunk_for_budget`] picks the chunk for a budget.
//!
//! Checks: targets are validated before any GEMM (one tiny kernel and a 16-byte read);
//! non-finite losses or gradients set a flag the call reads at its end and turn into
//! [`Error::NonFiniteResult`] naming the first token (the call's gradient outputs are then
//! unspecified). The call synchronizes the stream before returning.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudakit::kernel::{function_in_current_context, launch, Function, KernelSource};
use cudakit::GpuError;
use cudakit::blas::{Blas, DataType, Mat, Op};
use cudarc::driver::sys as drv;

use crate::codegen::{self, RowPlan, Spec};
use crate::{Dtype, Error, Loss, Reduction};

/// Bytes of workspace handed to cuBLAS (NVIDIA's recommendation for Hopper).
pub const CUBLAS_WORKSPACE: usize = 32 << 20;
const ALIGN: usize = 256;

fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// Where each temporary lives in the workspace (byte offsets) and how big it is in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// cuBLAS's workspace.
    pub cublas: usize,
    /// One chunk of student logits (then their gradient).
    pub logits: usize,
    /// One chunk of teacher logits (when used).
    pub teacher: Option<usize>,
    /// Per-token losses `[tokens]` f32 (when the caller gives no buffer).
    pub per_token: Option<usize>,
    /// Flags and counters (64 bytes).
    pub flags: usize,
    /// Packed token parameters `[n][tokens]` f32.
    pub token_params: Option<usize>,
    /// Packed class parameters `[n][vocab]` f32.
    pub class_params: Option<usize>,
    /// f32 dW accumulator `[vocab, hidden]` (16-bit dW outputs only).
    pub dw_acc: Option<usize>,
    /// f32 dbias accumulator `[vocab]` (16-bit dbias outputs only).
    pub db_acc: Option<usize>,
    /// Total bytes.
    pub total: usize,
}

/// What a call needs beyond its shapes, to size the workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    /// Teacher logits buffer.
    pub teacher: bool,
    /// Per-token losses live in the workspace.
    pub per_token: bool,
    /// Number of token parameters.
    pub token_params: usize,
    /// Number of class parameters.
    pub class_params: usize,
    /// An f32 dW accumulator (dW wanted and its output is 16-bit).
    pub dw_acc: bool,
    /// An f32 dbias accumulator.
    pub db_acc: bool,
}

/// The workspace layout for a chunk of `chunk` tokens.
pub fn layout(tokens: usize, hidden: usize, vocab: usize, dtype: Dtype, chunk: usize, n: Needs) -> Layout {
    let mut off = 0;
    let mut take = |bytes: usize| {
        let at = off;
        off += up(bytes);
        at
    };
    let cublas = take(CUBLAS_WORKSPACE);
    let logits = take(chunk * vocab * dtype.size());
    let teacher = n.teacher.then(|| take(chunk * vocab * dtype.size()));
    let per_token = n.per_token.then(|| take(tokens * 4));
    let flags = take(64);
    let token_params = (n.token_params > 0).then(|| take(n.token_params * tokens * 4));
    let class_params = (n.class_params > 0).then(|| take(n.class_params * vocab * 4));
    let dw_acc = n.dw_acc.then(|| take(vocab * hidden * 4));
    let db_acc = n.db_acc.then(|| take(vocab * 4));
    Layout { cublas, logits, teacher, per_token, flags, token_params, class_params, dw_acc, db_acc, total: off }
}

/// The largest chunk (<= tokens) whose workspace fits `budget` bytes, or `None`.
pub fn chunk_for_budget(tokens: usize, hidden: usize, vocab: usize, dtype: Dtype, n: Needs, budget: usize) -> Option<usize> {
    let fits = |c: usize| layout(tokens, hidden, vocab, dtype, c, n).total <= budget;
    if !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1, tokens);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

/// The chunk actually used for at most `max` tokens per chunk: chunks of (nearly) equal
/// size, a multiple of 128 tokens when that is at least 128 (whole GEMM tiles), never
/// more than `max` (one chunk when `max` covers all tokens), so the workspace sized for `max` always suffices.
pub fn balanced_chunk(max: usize, tokens: usize) -> usize {
    let max = max.clamp(1, tokens.max(1));
    if max == tokens {
        return tokens; // one chunk: nothing to balance
    }
    let c = tokens.div_ceil(tokens.div_ceil(max));
    if c < 128 {
        return c;
    }
    let up = c.div_ceil(128) * 128;
    if up <= max {
        up
    } else {
        c / 128 * 128
    }
}

/// One head on the device: raw pointers (0 = absent).
#[derive(Clone, Copy, Debug)]
pub struct RawHead {
    /// `[tokens, hidden]`.
    pub x: u64,
    /// `[vocab, hidden]`.
    pub w: u64,
    /// `[vocab]` or 0.
    pub bias: u64,
    /// Hidden size.
    pub hidden: usize,
}

/// A problem on the device, as raw pointers (what the C ABI and [`run`] share).
#[derive(Clone, Debug)]
pub struct RawProblem {
    /// Tokens.
    pub tokens: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Element type of x, w, bias, dx, 16-bit dW.
    pub dtype: Dtype,
    /// The student head.
    pub student: RawHead,
    /// The teacher head.
    pub teacher: Option<RawHead>,
    /// `[tokens]` i64, or 0.
    pub targets: u64,
    /// Ignored target value.
    pub ignore_index: i64,
    /// Token parameters in the loss's order, each `[tokens]` f32.
    pub token_params: Vec<u64>,
    /// Class parameters in the loss's order, each `[vocab]` f32.
    pub class_params: Vec<u64>,
    /// `[tokens]` f32 upstream gradients (Reduction::None), or 0.
    pub grad_tokens: u64,
}

/// Where results go (0 = not wanted).
#[derive(Clone, Copy, Debug)]
pub struct RawOutputs {
    /// f32 scalar: the reduced loss.
    pub loss: u64,
    /// `[tokens]` f32 per-token losses (0: kept in the workspace).
    pub per_token: u64,
    /// `[tokens, hidden]` dtype.
    pub dx: u64,
    /// `[vocab, hidden]` of `dw_dtype`.
    pub dw: u64,
    /// F32 (accumulated in place) or the input dtype (f32 accumulator in the workspace).
    pub dw_dtype: Dtype,
    /// `[vocab]` of `dw_dtype`, when the head has a bias and dW is wanted.
    pub db: u64,
    /// Add to dw / db instead of overwriting them.
    pub accumulate: bool,
}

/// What a call did.
#[derive(Clone, Copy, Debug)]
pub struct RunInfo {
    /// Non-ignored tokens.
    pub counted: usize,
    /// The normalizer used.
    pub normalizer: f64,
    /// Tokens per chunk.
    pub chunk: usize,
    /// Workspace bytes used.
    pub workspace: usize,
}

/// The workspace needs of a call.
pub fn needs(loss: &Loss, p: &RawProblem, o: &RawOutputs) -> Needs {
    Needs {
        teacher: loss.uses_teacher(),
        per_token: o.per_token == 0,
        token_params: loss.token_params().len(),
        class_params: loss.class_params().len(),
        dw_acc: o.dw != 0 && o.dw_dtype != Dtype::F32,
        db_acc: o.dw != 0 && o.db != 0 && p.student.bias != 0 && o.dw_dtype != Dtype::F32,
    }
}

/// One cuBLAS handle per context, reused by every call (rebound to the call's stream and
/// workspace at its start).
static HANDLES: OnceLock<Mutex<HashMap<usize, Blas>>> = OnceLock::new();

fn current_ctx() -> Result<drv::CUcontext, Error> {
    if !cudakit::driver_present() {
        return Err(GpuError::NoDriver.into());
    }
    let mut ctx: drv::CUcontext = std::ptr::null_mut();
    // SAFETY: out-pointer to a local. cuInit was done by whoever made a context current;
    // if none did, this returns an error or a null context.
    let r = unsafe { drv::cuCtxGetCurrent(&mut ctx) };
    if r != drv::CUresult::CUDA_SUCCESS || ctx.is_null() {
        return Err(GpuError::NoCurrentContext.into());
    }
    Ok(ctx)
}

impl From<Dtype> for DataType {
    fn from(d: Dtype) -> DataType {
        match d {
            Dtype::F32 => DataType::F32,
            Dtype::F16 => DataType::F16,
            Dtype::Bf16 => DataType::Bf16,
        }
    }
}

const HELPERS: &str = r#"
// out[0] += non-ignored tokens; out[1] = min index of a target outside [0, vocab).
extern "C" __global__ void validate_targets(const long long* t, long long n, long long vocab, long long ignore,
                                            unsigned long long* out) {
    unsigned long long count = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long x = t[i];
        if (x == ignore) continue;
        if (x < 0 || x >= vocab) atomicMin(out + 1, (unsigned long long)i); else ++count;
    }
    for (int o = 16; o; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
    if ((threadIdx.x & 31) == 0 && count) atomicAdd(out, count);
}

// out[0] = scale * sum(l[0..n]), in f64, in a fixed order (one block of 1024).
extern "C" __global__ void sum_losses(const float* l, long long n, double scale, float* out) {
    __shared__ double sh[32];
    double s = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += (double)l[i];
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.0;
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) out[0] = (float)(s * scale);
    }
}

// acc[j] += sum over rows of g[r, j] (dbias), f32.
extern "C" __global__ void bias_grad(const T* g, long long rows, long long cols, float* acc) {
    long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.f;
    for (long long r = 0; r < rows; ++r) s += TO_F(g[r * cols + j]);
    acc[j] += s;
}

// out[0] = min index of a non-finite element (out initialised to all ones).
extern "C" __global__ void first_nonfinite(const T* p, long long n, unsigned long long* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        if (!isfinite(TO_F(p[i]))) atomicMin(out, (unsigned long long)i);
}

// dst = round(acc (+ dst when accumulating)): the one rounding of an f32 accumulator.
extern "C" __global__ void round_acc(const float* acc, T* dst, long long n, int accumulate) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = acc[i];
        if (accumulate) v += TO_F(dst[i]);
        dst[i] = FROM_F(v);
    }
}
"#;

/// The helper kernels' source for `dtype` (target validation, loss sum, dbias, rounding).
pub fn helpers(dtype: Dtype) -> KernelSource {
    let (t, to, from) = match dtype {
        Dtype::F32 => ("float", "f_to_f", "f_to_f"),
        Dtype::F16 => ("u16", "f16_to_f", "f_to_f16"),
        Dtype::Bf16 => ("u16", "bf16_to_f", "f_to_bf16"),
    };
    let body = codegen::PRELUDE.to_string() + HELPERS;
    let body = body.replace("TO_F(", &format!("{to}(")).replace("FROM_F(", &format!("{from}(")).replace("const T*", &format!("const {t}*")).replace("T* dst", &format!("{t}* dst"));
    KernelSource::new(format!("memlinear_helpers_{}", dtype.name()), body)
}

type LossCache = Mutex<HashMap<(String, Spec), KernelSource>>;

/// The generated source of `loss` for `spec` (generated once per (loss, spec)).
pub fn loss_source(loss: &Loss, spec: Spec) -> KernelSource {
    static C: OnceLock<LossCache> = OnceLock::new();
    let cache = C.get_or_init(Default::default);
    let key = (loss.dump(), spec);
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    c.entry(key).or_insert_with(|| KernelSource::new(format!("memlinear_loss_{}", loss.name()), codegen::generate(loss, spec))).clone()
}

fn f(src: &KernelSource, name: &str) -> Result<Function, Error> {
    Ok(function_in_current_context(src, name)?)
}

/// What the loss kernel's plan depends on, per device.
#[derive(Clone, Copy, Debug)]
struct DeviceFacts {
    /// Compute capability major.
    major: i32,
    /// Shared memory one block may opt into (bytes).
    smem_optin: usize,
}

fn device_facts() -> Result<DeviceFacts, Error> {
    static C: OnceLock<Mutex<HashMap<usize, DeviceFacts>>> = OnceLock::new();
    let ctx = current_ctx()?;
    let cache = C.get_or_init(Default::default);
    if let Some(f) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&(ctx as usize)) {
        return Ok(*f);
    }
    let mut dev: drv::CUdevice = 0;
    // SAFETY: out-pointer to a local; a context is current (checked above).
    drv_ok("cuCtxGetDevice", unsafe { drv::cuCtxGetDevice(&mut dev) })?;
    let get = |a: drv::CUdevice_attribute| -> Result<i32, Error> {
        let mut x = 0i32;
        // SAFETY: out-pointer to a local; `dev` came from the current context.
        drv_ok("cuDeviceGetAttribute", unsafe { drv::cuDeviceGetAttribute(&mut x, a, dev) })?;
        Ok(x)
    };
    use drv::CUdevice_attribute as A;
    let f = DeviceFacts {
        major: get(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        smem_optin: get(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize,
    };
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(ctx as usize, f);
    Ok(f)
}

/// Shared memory the kernel declares statically, at most (reductions and cluster slots).
const STATIC_SMEM: usize = 1 << 10;

/// Threads per block for the cached kernel: about 8 vectors of the slice per thread (the
/// fill pass keeps up to 8 loads in flight per thread), within [128, 1024].
fn cached_block(spec: &Spec) -> u32 {
    let vecs = spec.slice().div_ceil(spec.vec());
    (vecs.div_ceil(8).div_ceil(32) * 32).clamp(128, 1024) as u32
}

/// The loss kernel's specialization for a call. `RowPlan::Auto` (see [`codegen::set_plan`])
/// is the multi-pass kernel with evict-first hints on its gradient pass: on the H100 it
/// measured faster than every row-cached shape (cluster of 2, 4 or 8 blocks, 256 to 1024
/// threads; one block per row at vocabulary 32000), see `bench/RESULTS.md`. The row-cached
/// shapes are run only when forced (`RowPlan::Cached`); a forced shape the device cannot
/// run (cluster on sm < 90, slice larger than the shared memory a block may have) is an
/// error. Needs a current context for forced plans (reads the device's limits).
#[allow(clippy::too_many_arguments)]
pub fn plan_spec(loss: &Loss, dtype: Dtype, vocab: usize, want_grad: bool, bias: bool, teacher_bias: bool, vectorized: bool) -> Result<Spec, Error> {
    let base = Spec::passes(dtype, vocab, want_grad, bias, teacher_bias, vectorized, codegen::block());
    let cached = |cluster: u32, streaming: bool| {
        let mut s = Spec { cluster, cache: true, streaming, ..base };
        s.block = codegen::block_override().unwrap_or_else(|| cached_block(&s));
        s
    };
    match codegen::plan() {
        RowPlan::Passes { streaming } => Ok(Spec { streaming, ..base }),
        RowPlan::Cached { cluster, streaming } => {
            let s = cached(cluster, streaming);
            let f = device_facts()?;
            if cluster > 1 && f.major < 9 {
                return Err(Error::Options(format!("a row split over a cluster of {cluster} blocks needs sm_90 or newer")));
            }
            if !(1..=8).contains(&cluster) || codegen::shared_bytes(&s) + STATIC_SMEM > f.smem_optin {
                return Err(Error::Options(format!(
                    "a row of {vocab} {} over {cluster} block(s) needs {} bytes of shared memory per block; the device allows {}",
                    dtype.name(),
                    codegen::shared_bytes(&s),
                    f.smem_optin
                )));
            }
            Ok(s)
        }
        RowPlan::Auto => {
            let _ = loss; // the choice does not depend on the loss (yet)
            Ok(Spec { streaming: true, ..base })
        }
    }
}

/// The loss kernel's arguments for one chunk (device pointers; 0 = absent).
#[derive(Clone, Copy, Debug)]
pub struct LossArgs {
    /// `[rows, vocab]` student logits, overwritten with the gradient.
    pub z: u64,
    /// `[rows, vocab]` teacher logits.
    pub zt: u64,
    /// `[vocab]` student bias.
    pub bias: u64,
    /// `[vocab]` teacher bias.
    pub tbias: u64,
    /// `[rows]` i64 targets.
    pub targets: u64,
    /// Ignored target value.
    pub ignore_index: i64,
    /// Token parameters, `tp[k * tp_stride + row]` f32.
    pub tp: u64,
    /// Stride between token parameters.
    pub tp_stride: i64,
    /// Class parameters `[n][vocab]` f32.
    pub cp: u64,
    /// `[rows]` f32 upstream gradients.
    pub grad_tokens: u64,
    /// Multiplies the seed of differentiation (1 / normalizer).
    pub seed_scale: f32,
    /// `[rows]` f32 per-token losses.
    pub loss_out: u64,
    /// Flags (32 bytes): non-finite loss / gradient bits, first bad token, bad target.
    pub flags: u64,
    /// Index of the chunk's first token (for error messages).
    pub t0: i64,
    /// Rows in the chunk.
    pub rows: usize,
}

/// Launches the loss kernel of `loss` under `spec` on `stream`: `spec.cluster` blocks per
/// row (a cluster launch when > 1), `codegen::shared_bytes(&spec)` of dynamic shared memory.
///
/// # Safety
/// Every non-zero pointer of `a` must be a device allocation of the documented shape, in
/// the current context, valid until the kernel completes.
pub unsafe fn launch_loss(loss: &Loss, spec: Spec, a: &LossArgs, stream: drv::CUstream) -> Result<(), Error> {
    if a.rows == 0 {
        return Ok(());
    }
    let src = loss_source(loss, spec);
    let k = f(&src, codegen::ENTRY)?;
    let smem = codegen::shared_bytes(&spec);
    let cluster = spec.cluster.max(1);
    if smem > 48 << 10 {
        // Opt in above the 48 KB default, once per function.
        static DONE: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
        let done = DONE.get_or_init(Default::default);
        let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
        if d.get(&(k.0 as usize)).is_none_or(|&b| b < smem) {
            drv_ok(
                "cuFuncSetAttribute",
                drv::cuFuncSetAttribute(k.0, drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32),
            )?;
            d.insert(k.0 as usize, smem);
        }
    }
    let (mut a_z, mut a_zt, mut a_b, mut a_tb, mut a_tg, mut a_ig) = (a.z, a.zt, a.bias, a.tbias, a.targets, a.ignore_index);
    let (mut a_tp, mut a_tps, mut a_cp, mut a_gt, mut a_ss, mut a_lo) = (a.tp, a.tp_stride, a.cp, a.grad_tokens, a.seed_scale, a.loss_out);
    let (mut a_fl, mut a_t0, mut a_rows) = (a.flags, a.t0, a.rows as i32);
    let mut args: [*mut c_void; 15] = [
        &mut a_z as *mut _ as *mut c_void,
        &mut a_zt as *mut _ as *mut c_void,
        &mut a_b as *mut _ as *mut c_void,
        &mut a_tb as *mut _ as *mut c_void,
        &mut a_tg as *mut _ as *mut c_void,
        &mut a_ig as *mut _ as *mut c_void,
        &mut a_tp as *mut _ as *mut c_void,
        &mut a_tps as *mut _ as *mut c_void,
        &mut a_cp as *mut _ as *mut c_void,
        &mut a_gt as *mut _ as *mut c_void,
        &mut a_ss as *mut _ as *mut c_void,
        &mut a_lo as *mut _ as *mut c_void,
        &mut a_fl as *mut _ as *mut c_void,
        &mut a_t0 as *mut _ as *mut c_void,
        &mut a_rows as *mut _ as *mut c_void,
    ];
    let grid = u32::try_from(a.rows * cluster as usize).map_err(|_| Error::Options(format!("{} rows x {cluster} blocks overflow a grid", a.rows)))?;
    if cluster == 1 {
        launch(k, grid, spec.block, smem as u32, stream, &mut args)?;
        return Ok(());
    }
    let mut attr = cluster_attribute(cluster);
    let cfg = cluster_config(grid, spec.block, smem, stream, &mut attr);
    drv_ok("cuLaunchKernelEx", drv::cuLaunchKernelEx(&cfg, k.0, args.as_mut_ptr(), std::ptr::null_mut()))
}

/// The launch attribute that groups `cluster` consecutive blocks into a thread-block cluster.
fn cluster_attribute(cluster: u32) -> drv::CUlaunchAttribute {
    // SAFETY (of the zeroed value): a plain C union/struct of integers and pointers.
    let mut attr: drv::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = drv::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = cluster;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    attr
}

/// A 1-D launch of `grid` blocks of `block` threads with `smem` dynamic shared bytes and
/// the cluster attribute `attr` (which must outlive the configuration's use).
fn cluster_config(grid: u32, block: u32, smem: usize, stream: drv::CUstream, attr: &mut drv::CUlaunchAttribute) -> drv::CUlaunchConfig {
    drv::CUlaunchConfig {
        gridDimX: grid,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream,
        attrs: attr,
        numAttrs: 1,
    }
}

/// How many clusters of `spec` can be resident at once on the device (0: the launch
/// would fail). 1 block per cluster: the resident blocks.
pub fn resident_clusters(loss: &Loss, spec: Spec) -> Result<u32, Error> {
    static C: OnceLock<Mutex<HashMap<usize, u32>>> = OnceLock::new();
    let src = loss_source(loss, spec);
    let k = f(&src, codegen::ENTRY)?;
    let cache = C.get_or_init(Default::default);
    if let Some(&n) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&(k.0 as usize)) {
        return Ok(n);
    }
    let smem = codegen::shared_bytes(&spec);
    if smem > 48 << 10 {
        // SAFETY: `k` is a live function of the current context.
        drv_ok("cuFuncSetAttribute", unsafe {
            drv::cuFuncSetAttribute(k.0, drv::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        })?;
    }
    let mut attr = cluster_attribute(spec.cluster.max(1));
    let cfg = cluster_config(spec.cluster.max(1) * 1024, spec.block, smem, std::ptr::null_mut(), &mut attr);
    let mut n = 0i32;
    // SAFETY: out-pointer to a local; `cfg` points at a live attribute.
    drv_ok("cuOccupancyMaxActiveClusters", unsafe { drv::cuOccupancyMaxActiveClusters(&mut n, k.0, &cfg) })?;
    let n = n.max(0) as u32;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(k.0 as usize, n);
    Ok(n)
}

fn drv_ok(call: &'static str, r: drv::CUresult) -> Result<(), Error> {
    r.result().map_err(GpuError::driver(call)).map_err(Error::from)
}

/// Runs `loss` over `p` on `stream` in the current context, with the caller's workspace.
///
/// # Safety
/// Every non-zero pointer must be a device allocation of the documented shape and dtype,
/// valid for the call, in the current context; `workspace` must hold `workspace_bytes`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_raw(
    loss: &Loss,
    p: &RawProblem,
    reduction: Reduction,
    o: &RawOutputs,
    chunk: usize,
    workspace: u64,
    workspace_bytes: usize,
    stream: drv::CUstream,
) -> Result<RunInfo, Error> {
    let (tn, v, hd, dt) = (p.tokens, p.vocab, p.student.hidden, p.dtype);
    let bad = |m: String| Err(Error::Options(m));
    if tn == 0 || v == 0 || hd == 0 {
        return bad(format!("tokens ({tn}), vocab ({v}) and hidden ({hd}) must be positive"));
    }
    if v > i32::MAX as usize || hd > i32::MAX as usize || tn > i32::MAX as usize {
        return bad("tokens, vocab and hidden must each fit in 32 bits (cuBLAS)".into());
    }
    if p.student.x == 0 || p.student.w == 0 {
        return bad("x and w are required".into());
    }
    if o.dw != 0 && o.dw_dtype != Dtype::F32 && o.dw_dtype != dt {
        return bad(format!("dw must be f32 or the input dtype {}, got {}", dt.name(), o.dw_dtype.name()));
    }
    if loss.uses_teacher() && p.teacher.is_none() {
        return bad(format!("loss `{}` reads the teacher's logits but no teacher head was given", loss.name()));
    }
    if loss.uses_target() && p.targets == 0 {
        return bad(format!("loss `{}` reads the targets but none were given", loss.name()));
    }
    if p.token_params.len() != loss.token_params().len() || p.class_params.len() != loss.class_params().len() {
        return bad(format!(
            "loss `{}` takes token parameters {:?} and class parameters {:?}: got {} and {}",
            loss.name(),
            loss.token_params(),
            loss.class_params(),
            p.token_params.len(),
            p.class_params.len()
        ));
    }
    let want_grad = o.dx != 0 || o.dw != 0;
    if reduction == Reduction::None && want_grad && p.grad_tokens == 0 {
        return bad("reduction None with gradients needs grad_tokens (the per-token upstream gradients)".into());
    }
    if chunk == 0 {
        return bad("chunk of 0 tokens".into());
    }
    let n = needs(loss, p, o);
    let lay = layout(tn, hd, v, dt, chunk.min(tn), n);
    let chunk = balanced_chunk(chunk.min(tn), tn);
    if workspace_bytes < lay.total {
        return bad(format!("workspace has {workspace_bytes} bytes, the call needs {} for chunks of {chunk} tokens", lay.total));
    }
    if workspace % 16 != 0 {
        return bad("workspace must be 16-byte aligned".into());
    }
    let ws = |off: usize| workspace + off as u64;
    let vec_ok = |ptr: u64| ptr == 0 || ptr % 16 == 0;
    let spec = plan_spec(
        loss,
        dt,
        v,
        want_grad,
        p.student.bias != 0,
        p.teacher.is_some_and(|t| t.bias != 0) && loss.uses_teacher(),
        (v * dt.size()) % 16 == 0 && vec_ok(p.student.bias) && vec_ok(p.teacher.map_or(0, |t| t.bias)),
    )?;
    if spec.cluster > 1 && resident_clusters(loss, spec)? == 0 {
        return bad(format!("the device cannot place a cluster of {} blocks of {} threads with {} bytes of shared memory each", spec.cluster, spec.block, codegen::shared_bytes(&spec)));
    }
    let hsrc = helpers(dt);
    let kval = f(&hsrc, "validate_targets")?;
    let ksum = f(&hsrc, "sum_losses")?;
    let kbias = f(&hsrc, "bias_grad")?;
    let kround = f(&hsrc, "round_acc")?;

    let ctx = current_ctx()?;
    let handles = HANDLES.get_or_init(Default::default);
    let mut hs = handles.lock().unwrap_or_else(|p| p.into_inner());
    let h: &Blas = match hs.entry(ctx as usize) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let b = e.into_mut();
            b.rebind(stream, ws(lay.cublas), CUBLAS_WORKSPACE)?;
            b
        }
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Blas::with_workspace(stream, ws(lay.cublas), CUBLAS_WORKSPACE)?),
    };

    // Flags: [0] target count, [1] first bad target, [2] loss flags, [3] first bad token.
    let flags = ws(lay.flags);
    drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(flags, 0, 64, stream))?;
    drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(flags + 8, 0xff, 8, stream))?;
    drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(flags + 24, 0xff, 8, stream))?;
    let mut counted = tn;
    if p.targets != 0 {
        let (mut tp, mut n64, mut v64, mut ig, mut fl) = (p.targets, tn as i64, v as i64, p.ignore_index, flags);
        let mut args: [*mut c_void; 5] = [
            &mut tp as *mut _ as *mut c_void,
            &mut n64 as *mut _ as *mut c_void,
            &mut v64 as *mut _ as *mut c_void,
            &mut ig as *mut _ as *mut c_void,
            &mut fl as *mut _ as *mut c_void,
        ];
        launch(kval, (tn as u32).div_ceil(256).clamp(1, 1024), 256, 0, stream, &mut args)?;
        let mut host = [0u64; 2];
        drv_ok("cuMemcpyDtoHAsync", drv::cuMemcpyDtoHAsync_v2(host.as_mut_ptr() as *mut c_void, flags, 16, stream))?;
        drv_ok("cuStreamSynchronize", drv::cuStreamSynchronize(stream))?;
        if host[1] != u64::MAX {
            let i = host[1] as usize;
            let mut val = 0i64;
            drv_ok("cuMemcpyDtoH", drv::cuMemcpyDtoH_v2(&mut val as *mut i64 as *mut c_void, p.targets + 8 * i as u64, 8))?;
            return Err(Error::Target { index: i, value: val, vocab: v, ignore_index: p.ignore_index });
        }
        counted = host[0] as usize;
    }
    let norm = crate::normalizer(reduction, counted);
    let seed_scale = if reduction == Reduction::None { 1.0f32 } else { (1.0 / norm) as f32 };

    // Pack parameters.
    let pack = |ptrs: &[u64], off: Option<usize>, len: usize| -> Result<u64, Error> {
        let Some(off) = off else { return Ok(0) };
        for (k, &src) in ptrs.iter().enumerate() {
            drv_ok("cuMemcpyDtoDAsync", drv::cuMemcpyDtoDAsync_v2(ws(off) + (k * len * 4) as u64, src, len * 4, stream))?;
        }
        Ok(ws(off))
    };
    let tp = pack(&p.token_params, lay.token_params, tn)?;
    let cp = pack(&p.class_params, lay.class_params, v)?;
    let per_token = if o.per_token != 0 { o.per_token } else { ws(lay.per_token.expect("per-token in workspace")) };
    let dw_target = match lay.dw_acc {
        Some(off) => ws(off),
        None => o.dw,
    };
    let db_acc = lay.db_acc.map(ws);
    if let Some(d) = db_acc {
        drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(d, 0, v * 4, stream))?;
    }
    let zbuf = ws(lay.logits);
    let bt = DataType::from(dt);
    let tbuf = lay.teacher.map(ws);
    let es = dt.size() as u64;
    let mut t0 = 0usize;
    while t0 < tn {
        let rows = chunk.min(tn - t0);
        let xc = p.student.x + (t0 * hd) as u64 * es;
        h.gemm("logits GEMM", Op::T, Op::N, v, rows, hd, 1.0, Mat::new(p.student.w, bt, hd), Mat::new(xc, bt, hd), 0.0, Mat::new(zbuf, bt, v))?;
        if let (Some(tb), Some(th)) = (tbuf, p.teacher) {
            let txc = th.x + (t0 * th.hidden) as u64 * es;
            h.gemm("teacher logits GEMM", Op::T, Op::N, v, rows, th.hidden, 1.0, Mat::new(th.w, bt, th.hidden), Mat::new(txc, bt, th.hidden), 0.0, Mat::new(tb, bt, v))?;
        }
        let la = LossArgs {
            z: zbuf,
            zt: tbuf.unwrap_or(0),
            bias: p.student.bias,
            tbias: if spec.teacher_bias { p.teacher.map_or(0, |t| t.bias) } else { 0 },
            targets: if p.targets != 0 { p.targets + 8 * t0 as u64 } else { 0 },
            ignore_index: p.ignore_index,
            // Token parameters are indexed `tp[k * stride + row]`: offset the base by t0.
            tp: if tp != 0 { tp + 4 * t0 as u64 } else { 0 },
            tp_stride: tn as i64,
            cp,
            grad_tokens: if p.grad_tokens != 0 { p.grad_tokens + 4 * t0 as u64 } else { 0 },
            seed_scale,
            loss_out: per_token + 4 * t0 as u64,
            flags: flags + 16,
            t0: t0 as i64,
            rows,
        };
        launch_loss(loss, spec, &la, stream)?;
        if o.dx != 0 {
            let dxc = o.dx + (t0 * hd) as u64 * es;
            h.gemm("dX GEMM", Op::N, Op::N, hd, rows, v, 1.0, Mat::new(p.student.w, bt, hd), Mat::new(zbuf, bt, v), 0.0, Mat::new(dxc, bt, hd))?;
        }
        if o.dw != 0 {
            let beta = if t0 == 0 && !(o.accumulate && lay.dw_acc.is_none()) { 0.0 } else { 1.0 };
            h.gemm("dW GEMM", Op::N, Op::T, hd, v, rows, 1.0, Mat::new(xc, bt, hd), Mat::new(zbuf, bt, v), beta, Mat::new(dw_target, DataType::F32, hd))?;
            if o.db != 0 && p.student.bias != 0 {
                let acc = db_acc.unwrap_or(o.db);
                if t0 == 0 && db_acc.is_none() && !o.accumulate {
                    drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(acc, 0, v * 4, stream))?;
                }
                let (mut g, mut r, mut c, mut a) = (zbuf, rows as i64, v as i64, acc);
                let mut args: [*mut c_void; 4] =
                    [&mut g as *mut _ as *mut c_void, &mut r as *mut _ as *mut c_void, &mut c as *mut _ as *mut c_void, &mut a as *mut _ as *mut c_void];
                launch(kbias, (v as u32).div_ceil(256), 256, 0, stream, &mut args)?;
            }
        }
        t0 += rows;
    }
    let round = |acc: u64, dst: u64, len: usize| -> Result<(), Error> {
        let (mut a, mut d, mut n64, mut accu) = (acc, dst, len as i64, i32::from(o.accumulate));
        let mut args: [*mut c_void; 4] =
            [&mut a as *mut _ as *mut c_void, &mut d as *mut _ as *mut c_void, &mut n64 as *mut _ as *mut c_void, &mut accu as *mut _ as *mut c_void];
        launch(kround, (len as u32).div_ceil(256).clamp(1, 4096), 256, 0, stream, &mut args)
            .map_err(Error::from)
    };
    if let Some(off) = lay.dw_acc {
        round(ws(off), o.dw, v * hd)?;
    }
    if let Some(acc) = db_acc {
        round(acc, o.db, v)?;
    }
    if o.loss != 0 {
        let (mut l, mut n64, mut sc, mut out) = (per_token, tn as i64, if reduction == Reduction::None { 1.0f64 } else { 1.0 / norm }, o.loss);
        let mut args: [*mut c_void; 4] =
            [&mut l as *mut _ as *mut c_void, &mut n64 as *mut _ as *mut c_void, &mut sc as *mut _ as *mut c_void, &mut out as *mut _ as *mut c_void];
        launch(ksum, 1, 1024, 0, stream, &mut args)?;
    }
    let mut host = [0u64; 2];
    drv_ok("cuMemcpyDtoHAsync", drv::cuMemcpyDtoHAsync_v2(host.as_mut_ptr() as *mut c_void, flags + 16, 16, stream))?;
    drv_ok("cuStreamSynchronize", drv::cuStreamSynchronize(stream))?;
    if host[0] & 4 != 0 {
        return bad("a target outside the vocabulary reached the loss kernel (validated targets changed during the call?)".into());
    }
    if host[0] & 3 != 0 {
        // Error path only: name the input at fault, if one is.
        let kfin = f(&hsrc, "first_nonfinite")?;
        let kfin32 = f(&helpers(Dtype::F32), "first_nonfinite")?;
        // (name, pointer, elements, columns, element type)
        let mut inputs: Vec<(String, u64, usize, usize, Dtype)> =
            vec![("x".into(), p.student.x, tn * hd, hd, dt), ("w".into(), p.student.w, v * hd, hd, dt), ("bias".into(), p.student.bias, v, 1, dt)];
        if let Some(t) = p.teacher {
            inputs.extend([
                ("teacher.x".into(), t.x, tn * t.hidden, t.hidden, dt),
                ("teacher.w".into(), t.w, v * t.hidden, t.hidden, dt),
                ("teacher.bias".into(), t.bias, v, 1, dt),
            ]);
        }
        for (name, &ptr) in loss.token_params().iter().zip(&p.token_params) {
            inputs.push((format!("token parameter `{name}`"), ptr, tn, 1, Dtype::F32));
        }
        for (name, &ptr) in loss.class_params().iter().zip(&p.class_params) {
            inputs.push((format!("class parameter `{name}`"), ptr, v, 1, Dtype::F32));
        }
        inputs.push(("grad_tokens".into(), p.grad_tokens, tn, 1, Dtype::F32));
        for (name, ptr, len, cols, et) in inputs {
            if ptr == 0 {
                continue;
            }
            drv_ok("cuMemsetD8Async", drv::cuMemsetD8Async(flags, 0xff, 8, stream))?;
            let (mut a, mut n64, mut out) = (ptr, len as i64, flags);
            let mut args: [*mut c_void; 3] = [&mut a as *mut _ as *mut c_void, &mut n64 as *mut _ as *mut c_void, &mut out as *mut _ as *mut c_void];
            let k = if et == Dtype::F32 { kfin32 } else { kfin };
            launch(k, (len as u32).div_ceil(256).clamp(1, 4096), 256, 0, stream, &mut args)?;
            let mut first = [0u64; 1];
            drv_ok("cuMemcpyDtoHAsync", drv::cuMemcpyDtoHAsync_v2(first.as_mut_ptr() as *mut c_void, flags, 8, stream))?;
            drv_ok("cuStreamSynchronize", drv::cuStreamSynchronize(stream))?;
            if first[0] != u64::MAX {
                let i = first[0] as usize;
                let at = if cols > 1 { format!("[{}, {}]", i / cols, i % cols) } else { format!("[{i}]") };
                let mut raw = [0u8; 4];
                drv_ok("cuMemcpyDtoH", drv::cuMemcpyDtoH_v2(raw.as_mut_ptr() as *mut c_void, ptr + (i * et.size()) as u64, et.size()))?;
                let value = match et {
                    Dtype::F32 => f32::from_le_bytes(raw),
                    Dtype::F16 => half::f16::from_le_bytes([raw[0], raw[1]]).to_f32(),
                    Dtype::Bf16 => half::bf16::from_le_bytes([raw[0], raw[1]]).to_f32(),
                };
                return Err(Error::NonFinite { arg: name, at, value: format!("{value}") });
            }
        }
        let what = if host[0] & 1 != 0 { "loss" } else { "gradient" };
        return Err(Error::NonFiniteResult { token: host[1] as usize, what: what.into() });
    }
    drop(hs);
    Ok(RunInfo { counted, normalizer: norm, chunk, workspace: lay.total })
}

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::{Chunk, Elem};

/// One head on the device.
pub struct DeviceHead<'a, T> {
    /// `[tokens, hidden]`.
    pub x: &'a CudaSlice<T>,
    /// `[vocab, hidden]`.
    pub w: &'a CudaSlice<T>,
    /// `[vocab]`.
    pub bias: Option<&'a CudaSlice<T>>,
    /// Hidden size.
    pub hidden: usize,
}

/// A problem on the device (see [`crate::Problem`] for the meaning of each field).
pub struct DeviceProblem<'a, T> {
    /// Tokens.
    pub tokens: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// The student head.
    pub student: DeviceHead<'a, T>,
    /// The teacher head.
    pub teacher: Option<DeviceHead<'a, T>>,
    /// `[tokens]`.
    pub targets: Option<&'a CudaSlice<i64>>,
    /// Ignored target value.
    pub ignore_index: i64,
    /// Per-token parameters by name.
    pub token_params: Vec<(&'a str, &'a CudaSlice<f32>)>,
    /// Per-class parameters by name.
    pub class_params: Vec<(&'a str, &'a CudaSlice<f32>)>,
    /// Per-token upstream gradients (Reduction::None).
    pub grad_tokens: Option<&'a CudaSlice<f32>>,
}

/// A dW / dbias output: f32 (accumulated in place) or the input dtype (rounded once from
/// an f32 accumulator in the workspace).
pub enum GradBuf<'a, T> {
    /// f32.
    F32(&'a mut CudaSlice<f32>),
    /// The input dtype.
    Same(&'a mut CudaSlice<T>),
}

/// Gradient outputs (None: not computed; no dw: frozen head).
pub struct DeviceGrads<'a, T> {
    /// `[tokens, hidden]`.
    pub dx: Option<&'a mut CudaSlice<T>>,
    /// `[vocab, hidden]`.
    pub dw: Option<GradBuf<'a, T>>,
    /// `[vocab]` (same kind as dw).
    pub db: Option<GradBuf<'a, T>>,
    /// Add into dw / db instead of overwriting.
    pub accumulate: bool,
}

/// Results of [`run`].
#[derive(Clone, Debug)]
pub struct DeviceOutput {
    /// The reduced loss.
    pub loss: f32,
    /// Per-token losses.
    pub per_token: Vec<f32>,
    /// What the call did.
    pub info: RunInfo,
}

fn check_len(arg: &str, got: usize, expected: usize, why: &str) -> Result<(), Error> {
    if got != expected {
        return Err(Error::Shape { arg: arg.into(), got, expected, why: why.into() });
    }
    Ok(())
}

/// Runs `loss` on the device `gpu` (its stream), allocating the workspace for `chunk`.
pub fn run<T: Elem + DeviceRepr>(
    gpu: &cudakit::Gpu,
    loss: &Loss,
    p: &DeviceProblem<'_, T>,
    reduction: Reduction,
    chunk: Chunk,
    mut g: DeviceGrads<'_, T>,
) -> Result<DeviceOutput, Error> {
    gpu.bind()?;
    let s = gpu.stream();
    let (tn, v) = (p.tokens, p.vocab);
    let mut heads = vec![("student", &p.student)];
    if let Some(t) = &p.teacher {
        heads.push(("teacher", t));
    }
    for (who, h) in &heads {
        let why = format!("[tokens={tn}, hidden={}]", h.hidden);
        check_len(&format!("{who}.x"), h.x.len(), tn * h.hidden, &why)?;
        check_len(&format!("{who}.w"), h.w.len(), v * h.hidden, &format!("[vocab={v}, hidden={}]", h.hidden))?;
        if let Some(b) = h.bias {
            check_len(&format!("{who}.bias"), b.len(), v, &format!("[vocab={v}]"))?;
        }
    }
    if let Some(t) = p.targets {
        check_len("targets", t.len(), tn, &format!("[tokens={tn}]"))?;
    }
    if let Some(t) = p.grad_tokens {
        check_len("grad_tokens", t.len(), tn, &format!("[tokens={tn}]"))?;
    }
    let hd = p.student.hidden;
    let bind = |declared: &[String], given: &[(&str, &CudaSlice<f32>)], len: usize, kind: &str| -> Result<Vec<u64>, Error> {
        let bufs = crate::bind_named(loss, kind, declared, given, len, |b| b.len())?;
        Ok(bufs.into_iter().map(|b| b.device_ptr(s).0).collect())
    };
    let token_params = bind(loss.token_params(), &p.token_params, tn, "token")?;
    let class_params = bind(loss.class_params(), &p.class_params, v, "class")?;
    let raw_head = |h: &DeviceHead<'_, T>| RawHead { x: h.x.device_ptr(s).0, w: h.w.device_ptr(s).0, bias: h.bias.map_or(0, |b| b.device_ptr(s).0), hidden: h.hidden };
    let rp = RawProblem {
        tokens: tn,
        vocab: v,
        dtype: T::DTYPE,
        student: raw_head(&p.student),
        teacher: p.teacher.as_ref().map(raw_head),
        targets: p.targets.map_or(0, |t| t.device_ptr(s).0),
        ignore_index: p.ignore_index,
        token_params,
        class_params,
        grad_tokens: p.grad_tokens.map_or(0, |t| t.device_ptr(s).0),
    };
    let grad_ptr = |b: &mut Option<GradBuf<'_, T>>, len: usize, arg: &str| -> Result<(u64, Dtype), Error> {
        Ok(match b {
            None => (0, T::DTYPE),
            Some(GradBuf::F32(x)) => {
                check_len(arg, x.len(), len, "")?;
                (x.device_ptr_mut(s).0, Dtype::F32)
            }
            Some(GradBuf::Same(x)) => {
                check_len(arg, x.len(), len, "")?;
                (x.device_ptr_mut(s).0, T::DTYPE)
            }
        })
    };
    let (dw, dw_dtype) = grad_ptr(&mut g.dw, v * hd, "dw")?;
    let (db, db_dtype) = grad_ptr(&mut g.db, v, "db")?;
    if db != 0 && (dw == 0 || db_dtype != dw_dtype) {
        return Err(Error::Options("db needs dw, of the same kind (f32 or the input dtype)".into()));
    }
    let dx = match g.dx.as_mut() {
        None => 0,
        Some(x) => {
            check_len("dx", x.len(), tn * hd, "[tokens, hidden]")?;
            x.device_ptr_mut(s).0
        }
    };
    let mut loss_buf = s.alloc_zeros::<f32>(1).map_err(GpuError::driver("cuMemAlloc"))?;
    let mut per_token = s.alloc_zeros::<f32>(tn).map_err(GpuError::driver("cuMemAlloc"))?;
    let ro = RawOutputs {
        loss: loss_buf.device_ptr_mut(s).0,
        per_token: per_token.device_ptr_mut(s).0,
        dx,
        dw,
        dw_dtype,
        db,
        accumulate: g.accumulate,
    };
    let n = needs(loss, &rp, &ro);
    let c = match chunk {
        Chunk::Tokens(c) => c.clamp(1, tn),
        Chunk::Budget(b) => chunk_for_budget(tn, hd, v, T::DTYPE, n, b as usize)
            .ok_or_else(|| Error::Options(format!("a budget of {b} bytes does not fit even one token's chunk")))?,
    };
    let total = layout(tn, hd, v, T::DTYPE, c, n).total;
    // SAFETY: u8 workspace, fully written before read by the call.
    let mut ws = unsafe { s.alloc::<u8>(total) }.map_err(GpuError::driver("cuMemAlloc"))?;
    let wsp = ws.device_ptr_mut(s).0;
    // SAFETY: every pointer above comes from a live buffer of the checked length and dtype,
    // in this context; the call synchronizes the stream before returning.
    let info = unsafe { run_raw(loss, &rp, reduction, &ro, c, wsp, total, s.cu_stream()) }?;
    let l = s.clone_dtoh(&loss_buf).map_err(GpuError::driver("cuMemcpyDtoH"))?;
    let pt = s.clone_dtoh(&per_token).map_err(GpuError::driver("cuMemcpyDtoH"))?;
    drop(ws);
    Ok(DeviceOutput { loss: l[0], per_token: pt, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_chunks_are_equal_tile_multiples_within_the_maximum() {
        assert_eq!(balanced_chunk(843, 16384), 768);
        assert_eq!(balanced_chunk(15462, 16384), 8192);
        assert_eq!(balanced_chunk(3767, 16384), 3328);
        assert_eq!(balanced_chunk(100, 1000), 100);
        assert_eq!(balanced_chunk(7, 37), 7);
        assert_eq!(balanced_chunk(37, 37), 37);
        assert_eq!(balanced_chunk(1, 5), 1);
        assert_eq!(balanced_chunk(200, 150), 150);
        for max in 1..600 {
            for t in [1, 127, 128, 129, 1000, 4097] {
                let c = balanced_chunk(max, t);
                assert!(c >= 1 && c <= max.min(t), "max {max} tokens {t} -> {c}");
            }
        }
    }

    #[test]
    fn layout_grows_with_the_chunk_and_budget_search_is_tight() {
        let n = Needs { teacher: false, per_token: true, token_params: 0, class_params: 0, dw_acc: false, db_acc: false };
        let c = chunk_for_budget(16384, 4096, 128256, Dtype::Bf16, n, 250_000_000).unwrap();
        assert!(layout(16384, 4096, 128256, Dtype::Bf16, c, n).total <= 250_000_000);
        assert!(layout(16384, 4096, 128256, Dtype::Bf16, c + 1, n).total > 250_000_000);
        assert_eq!(chunk_for_budget(16384, 4096, 128256, Dtype::Bf16, n, 1000), None);
        let acc = Needs { dw_acc: true, ..n };
        assert!(layout(10, 4, 7, Dtype::Bf16, 5, acc).dw_acc.is_some());
    }
}
