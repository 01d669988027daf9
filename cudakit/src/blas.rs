//! cuBLAS GEMMs: one handle type, [`Blas`], and one call, [`Blas::gemm`] (over
//! `cublasGemmEx`).
//!
//! # Convention: column-major, as cuBLAS
//!
//! [`Blas::gemm`] computes `C = alpha * op(A) op(B) + beta * C` with every matrix
//! **column-major**, exactly cuBLAS's convention; nothing is flipped behind the caller's
//! back. The workspace's tensors are row-major, and a row-major `M [r, c]` with row
//! stride `ld` *is* the column-major `M^T [c, r]` with leading dimension `ld`. So a
//! row-major `Y [rows, out] = X [rows, in] W^T` (`W [out, in]`, PyTorch's layout) is the
//! column-major `Y^T = W X^T`:
//!
//! ```text
//! gemm(Op::T, Op::N, m = out, n = rows, k = in,
//!      A = (W, ld = in), B = (X, ld = ldx), C = (Y, ld = ldy))
//! ```
//!
//! Every GEMM takes 16-bit or f32 `A` and `B` (of the same type), accumulates in f32
//! (`CUBLAS_COMPUTE_32F`, default math mode: no TF32 for f32 inputs), and writes `C` in
//! the type asked for (16-bit or f32; `bf16 x bf16 -> f32` is supported). With
//! `beta == 0`, `C` is not read (NaN in it does not propagate).
//!
//! # Handle
//!
//! A [`Blas`] owns a `cublasHandle_t` created in the calling thread's current context,
//! bound to one stream and one workspace (owned, allocated here, or borrowed from the
//! caller), with host pointer mode (alpha and beta are host `f32`s). `Drop` destroys the
//! handle and frees an owned workspace. A handle is `Send` but not `Sync`: cuBLAS allows
//! a handle on any thread, not on two at once.
//!
//! `cudarc` loads `libcublas` lazily and *panics* when it is missing, so every
//! constructor checks [`cublas_present`] first and returns [`GpuError::NoCublas`].
//!
//! # Example
//!
//! ```no_run
//! use cudakit::blas::{Blas, DataType, Mat, Op};
//! let gpu = cudakit::Gpu::open(0)?;
//! let blas = Blas::on(&gpu, 32 << 20)?;
//! # let (w, x, y, rows, inf, outf) = (0u64, 0u64, 0u64, 1usize, 1usize, 1usize);
//! // y [rows, out] = x [rows, in] w^T, bf16 in, f32 out (device addresses w, x, y).
//! unsafe {
//!     blas.gemm("y = x w^T", Op::T, Op::N, outf, rows, inf, 1.0,
//!               Mat::new(w, DataType::Bf16, inf), Mat::new(x, DataType::Bf16, inf),
//!               0.0, Mat::new(y, DataType::F32, outf))?;
//! }
//! # Ok::<(), cudakit::GpuError>(())
//! ```

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys as cb;
use cudarc::driver::sys as drv;
use cudarc::driver::CudaStream;

use crate::{driver_present, Gpu, GpuError};

/// Whether the cuBLAS library can be loaded. Never panics.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names; no symbol is called.
    unsafe { cb::is_culib_present() }
}

/// Element type of a GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `float`.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl DataType {
    fn cuda(self) -> cb::cudaDataType {
        match self {
            DataType::F32 => cb::cudaDataType::CUDA_R_32F,
            DataType::F16 => cb::cudaDataType::CUDA_R_16F,
            DataType::Bf16 => cb::cudaDataType::CUDA_R_16BF,
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::F32 => 4,
            DataType::F16 | DataType::Bf16 => 2,
        }
    }
}

/// Whether a GEMM operand is used as stored (`N`) or transposed (`T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

impl Op {
    fn cuda(self) -> cb::cublasOperation_t {
        match self {
            Op::N => cb::cublasOperation_t::CUBLAS_OP_N,
            Op::T => cb::cublasOperation_t::CUBLAS_OP_T,
        }
    }
}

/// A column-major matrix operand on the device: address, element type, leading
/// dimension (elements between the starts of consecutive columns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mat {
    /// Device address of element (0, 0).
    pub ptr: u64,
    /// Element type.
    pub dtype: DataType,
    /// Leading dimension, in elements.
    pub ld: usize,
}

impl Mat {
    /// An operand.
    pub fn new(ptr: u64, dtype: DataType, ld: usize) -> Mat {
        Mat { ptr, dtype, ld }
    }
}

enum Workspace {
    /// Allocated by [`Blas::on`] / [`Blas::new`]; freed on drop.
    Owned(drv::CUdeviceptr, usize),
    /// The caller's; outlives every GEMM queued while it is bound.
    Borrowed(u64, usize),
}

impl Workspace {
    fn raw(&self) -> (u64, usize) {
        match *self {
            Workspace::Owned(p, b) | Workspace::Borrowed(p, b) => (p, b),
        }
    }
}

/// A cuBLAS handle bound to a stream and a workspace (see the module docs).
pub struct Blas {
    handle: cb::cublasHandle_t,
    ctx: drv::CUcontext,
    stream: drv::CUstream,
    workspace: Workspace,
    /// Keeps the stream of [`Blas::on`] alive as long as the handle uses it.
    _keep: Option<Arc<CudaStream>>,
}

// SAFETY: cuBLAS allows a handle to be used from any thread as long as calls on it do not
// overlap; `&mut self` methods and `!Sync` (the raw pointer fields) ensure that.
unsafe impl Send for Blas {}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ws, bytes) = self.workspace.raw();
        f.debug_struct("Blas").field("stream", &self.stream).field("workspace", &ws).field("workspace_bytes", &bytes).finish()
    }
}

fn status_ok(call: &'static str, label: &str, s: cb::cublasStatus_t) -> Result<(), GpuError> {
    if s == cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Cublas { call, label: label.to_string(), status: format!("{s:?}"), code: s as i32 })
    }
}

fn current_ctx() -> Result<drv::CUcontext, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    let mut ctx: drv::CUcontext = std::ptr::null_mut();
    // SAFETY: out-pointer to a local. Without cuInit or a current context this returns an
    // error or a null context, both handled.
    let r = unsafe { drv::cuCtxGetCurrent(&mut ctx) };
    if r != drv::CUresult::CUDA_SUCCESS || ctx.is_null() {
        return Err(GpuError::NoCurrentContext);
    }
    Ok(ctx)
}

impl Blas {
    /// A handle on `gpu`'s context and stream, with a workspace of `workspace_bytes` it
    /// allocates and owns (32 MiB is NVIDIA's recommendation for Hopper; 0 for none).
    /// Binds `gpu`'s context to the calling thread.
    pub fn on(gpu: &Gpu, workspace_bytes: usize) -> Result<Blas, GpuError> {
        gpu.bind()?;
        // SAFETY: the stream belongs to the context just made current and is kept alive by
        // the Arc stored in the handle.
        let mut b = unsafe { Blas::new(gpu.stream().cu_stream(), workspace_bytes) }?;
        b._keep = Some(gpu.stream().clone());
        Ok(b)
    }

    /// A handle in the current context, bound to `stream`, with a workspace of
    /// `workspace_bytes` it allocates (`cuMemAlloc`) and owns.
    ///
    /// # Safety
    /// `stream` must be a stream of the current context (or null, the legacy default
    /// stream) that outlives the handle, and the handle must be used only while this
    /// context is current.
    pub unsafe fn new(stream: drv::CUstream, workspace_bytes: usize) -> Result<Blas, GpuError> {
        let ctx = current_ctx()?;
        let mut ptr: drv::CUdeviceptr = 0;
        if workspace_bytes > 0 {
            drv::cuMemAlloc_v2(&mut ptr, workspace_bytes).result().map_err(GpuError::driver("cuMemAlloc"))?;
        }
        // create() frees the workspace on every error path.
        Blas::create(ctx, stream, Workspace::Owned(ptr, workspace_bytes))
    }

    /// A handle in the current context, bound to `stream`, using the caller's
    /// `workspace` (`bytes` long, 256-byte aligned; may be 0 with `bytes == 0`).
    ///
    /// # Safety
    /// As [`Blas::new`], and `workspace` must stay allocated, and unused by anything
    /// else while GEMMs queued through this handle run, until the handle is rebound or
    /// dropped.
    pub unsafe fn with_workspace(stream: drv::CUstream, workspace: u64, bytes: usize) -> Result<Blas, GpuError> {
        let ctx = current_ctx()?;
        Blas::create(ctx, stream, Workspace::Borrowed(workspace, bytes))
    }

    unsafe fn create(ctx: drv::CUcontext, stream: drv::CUstream, workspace: Workspace) -> Result<Blas, GpuError> {
        if !cublas_present() {
            if let Workspace::Owned(p, _) = workspace {
                if p != 0 {
                    drv::cuMemFree_v2(p);
                }
            }
            return Err(GpuError::NoCublas);
        }
        let mut handle: cb::cublasHandle_t = std::ptr::null_mut();
        let created = status_ok("cublasCreate", "handle", cb::cublasCreate_v2(&mut handle));
        // From here on Drop cleans up (a null handle is not destroyed).
        let mut b = Blas { handle, ctx, stream, workspace, _keep: None };
        created?;
        let (ws, bytes) = b.workspace.raw();
        b.configure(stream, ws, bytes)?;
        Ok(b)
    }

    /// The four settings every GEMM relies on, in this order: stream, workspace, host
    /// pointer mode, default math mode (no TF32).
    unsafe fn configure(&mut self, stream: drv::CUstream, ws: u64, bytes: usize) -> Result<(), GpuError> {
        let h = self.handle;
        status_ok("cublasSetStream", "handle", cb::cublasSetStream_v2(h, stream as cb::cudaStream_t))?;
        self.stream = stream;
        status_ok("cublasSetWorkspace", "handle", cb::cublasSetWorkspace_v2(h, ws as *mut c_void, bytes))?;
        status_ok(
            "cublasSetPointerMode",
            "handle",
            cb::cublasSetPointerMode_v2(h, cb::cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST),
        )?;
        status_ok("cublasSetMathMode", "handle", cb::cublasSetMathMode(h, cb::cublasMath_t::CUBLAS_DEFAULT_MATH))
    }

    /// Rebinds the handle to `stream` and the caller's `workspace` (freeing an owned
    /// one), and re-asserts host pointer mode and default math mode. This is what a
    /// handle cached per context and reused by calls with different streams and
    /// workspaces does at the start of each call.
    ///
    /// # Safety
    /// As [`Blas::with_workspace`]; the handle's context must be current.
    pub unsafe fn rebind(&mut self, stream: drv::CUstream, workspace: u64, bytes: usize) -> Result<(), GpuError> {
        let old = std::mem::replace(&mut self.workspace, Workspace::Borrowed(workspace, bytes));
        if let Workspace::Owned(p, _) = old {
            if p != 0 {
                // cuMemFree waits for work using it; nothing queued later can use it.
                drv::cuMemFree_v2(p).result().map_err(GpuError::driver("cuMemFree"))?;
            }
        }
        self.configure(stream, workspace, bytes)
    }

    /// The stream GEMMs are queued on.
    pub fn stream(&self) -> drv::CUstream {
        self.stream
    }

    /// The context the handle was created in.
    pub fn context(&self) -> drv::CUcontext {
        self.ctx
    }

    /// Bytes of workspace cuBLAS may use.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.raw().1
    }

    /// The raw handle, for cuBLAS calls this module does not wrap.
    pub fn raw(&self) -> cb::cublasHandle_t {
        self.handle
    }

    /// Queues `C[m, n] = alpha * op(A) op(B) + beta * C`, column-major (see the module
    /// docs), f32 accumulation, on the handle's stream. `label` names the GEMM in errors.
    ///
    /// Checked here: sizes fit cuBLAS's 32-bit `int`, leading dimensions are at least the
    /// stored column heights, `A` and `B` share a type, pointers are non-null when the
    /// product is not empty. `m`, `n` or `k` may be 0 (cuBLAS then only scales `C`, or
    /// does nothing).
    ///
    /// # Safety
    /// Each operand must be a device allocation of the handle's context holding the
    /// matrix its shape, type and leading dimension imply (`op(A)` is `m x k`, `op(B)`
    /// `k x n`, `C` `m x n`), valid until the queued GEMM has run; `C` must not overlap
    /// `A` or `B`. The handle's context must be current.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        label: &str,
        ta: Op,
        tb: Op,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        c: Mat,
    ) -> Result<(), GpuError> {
        let bad = |problem: String| Err(GpuError::InvalidArgument { arg: "gemm", problem: format!("{label}: {problem}") });
        let int = |x: usize| i32::try_from(x).ok();
        let (a_rows, b_rows) = (if ta == Op::N { m } else { k }, if tb == Op::N { k } else { n });
        for (what, v) in [("m", m), ("n", n), ("k", k), ("lda", a.ld), ("ldb", b.ld), ("ldc", c.ld)] {
            if int(v).is_none() {
                return bad(format!("{what} = {v} does not fit cuBLAS's 32-bit int"));
            }
        }
        for (what, ld, rows) in [("lda", a.ld, a_rows), ("ldb", b.ld, b_rows), ("ldc", c.ld, m)] {
            if ld < rows.max(1) {
                return bad(format!("{what} = {ld} is less than the {rows} rows of the stored column-major matrix"));
            }
        }
        if a.dtype != b.dtype {
            return bad(format!("A is {:?} but B is {:?} (cuBLAS needs one input type)", a.dtype, b.dtype));
        }
        if m > 0 && n > 0 && (c.ptr == 0 || (k > 0 && (a.ptr == 0 || b.ptr == 0))) {
            return bad("a null operand pointer".into());
        }
        status_ok(
            "cublasGemmEx",
            label,
            cb::cublasGemmEx(
                self.handle,
                ta.cuda(),
                tb.cuda(),
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                a.ptr as *const c_void,
                a.dtype.cuda(),
                a.ld as i32,
                b.ptr as *const c_void,
                b.dtype.cuda(),
                b.ld as i32,
                &beta as *const f32 as *const c_void,
                c.ptr as *mut c_void,
                c.dtype.cuda(),
                c.ld as i32,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            ),
        )
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle and an owned workspace were created in `ctx`, which is made
        // current for the calls and restored after. Errors cannot be reported from drop.
        unsafe {
            let pushed = drv::cuCtxPushCurrent_v2(self.ctx) == drv::CUresult::CUDA_SUCCESS;
            if !self.handle.is_null() {
                cb::cublasDestroy_v2(self.handle);
            }
            if let Workspace::Owned(p, _) = self.workspace {
                if p != 0 {
                    drv::cuMemFree_v2(p);
                }
            }
            if pushed {
                let mut prev: drv::CUcontext = std::ptr::null_mut();
                drv::cuCtxPopCurrent_v2(&mut prev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_libraries_are_errors_not_panics() {
        if !driver_present() {
            // SAFETY: fails before touching the stream.
            let e = unsafe { Blas::new(std::ptr::null_mut(), 0) }.unwrap_err();
            assert!(matches!(e, GpuError::NoDriver), "{e}");
        }
        // Whatever is installed, asking must not panic.
        let _ = cublas_present();
    }

    #[test]
    fn dtype_sizes() {
        assert_eq!(DataType::F32.size(), 4);
        assert_eq!(DataType::Bf16.size(), 2);
        assert_eq!(DataType::F16.size(), 2);
    }
}
