//! Kernel sources, NVRTC compilation per architecture, and loading into the current context.
//!
//! Two caches, both for the life of the process:
//! - PTX per (source, arch): NVRTC runs once per source and compute capability.
//! - `CUfunction` per (context, source, function name): a module is loaded once into each
//!   context that uses it and never unloaded. Contexts here are primary contexts, which
//!   [`crate::Gpu::open`] keeps retained for the life of the process: a context destroyed
//!   and re-created at the same address would otherwise see stale entries. (A foreign
//!   runtime calling us through the C ABIs keeps its own context alive the same way.)

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr};
use cudarc::driver::result;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use crate::{driver_present, nvrtc_present, Arch, GpuError};

/// A CUDA C source embedded in a crate, compiled at first use.
///
/// `name` identifies the source in errors and caches; `src` is the text, usually
/// `include_str!("kernel.cu")` with a generated prelude (tables, constants) prepended.
#[derive(Clone, Debug)]
pub struct KernelSource {
    name: String,
    src: String,
    key: u64,
    arch_specific: bool,
}

/// FNV-1a: stable, dependency-free; collisions are irrelevant at this size.
fn fnv(bytes: impl Iterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
const FNV_SEED: u64 = 0xcbf29ce484222325;

impl KernelSource {
    /// A source from its name (short, for errors and cache keys, e.g. `nf4/dequant.cu`)
    /// and its CUDA C text. Hashed once here: launches look kernels up by that key.
    pub fn new(name: impl Into<String>, src: impl Into<String>) -> Self {
        let (name, src) = (name.into(), src.into());
        let key = fnv(name.bytes().chain([0u8]).chain(src.bytes()), FNV_SEED);
        KernelSource { name, src, key, arch_specific: false }
    }
    /// Compiles for the arch-specific target (`compute_90a` rather than `compute_90`) on
    /// compute capability 9.0 and newer, where instructions such as `wgmma` exist only
    /// there (the source sees `__CUDA_ARCH_FEAT_SM90_ALL` on 9.0). Such PTX loads only on
    /// that exact architecture, which is the one [`function_in_current_context`] compiles
    /// for anyway. Older architectures are unaffected.
    pub fn arch_specific(mut self) -> Self {
        self.arch_specific = true;
        self.key = fnv([1u8].into_iter(), self.key);
        self
    }
    /// The `--gpu-architecture` NVRTC gets for `arch`.
    fn target(&self, arch: Arch) -> String {
        if self.arch_specific && arch.major >= 9 {
            format!("{}a", arch.compute_name())
        } else {
            arch.compute_name()
        }
    }
    fn key(&self) -> u64 {
        self.key
    }
}

type PtxCache = Mutex<HashMap<(u64, Arch), Arc<CString>>>;
fn ptx_cache() -> &'static PtxCache {
    static C: OnceLock<PtxCache> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// Compiles `source` to PTX for `arch` with NVRTC (cached). Needs NVRTC, not a GPU, so it
/// also serves to check that a kernel builds for every architecture we claim.
///
/// `--fmad=false` keeps NVRTC from fusing a multiply and an add that the source wrote
/// separately: bit-exact parity with other libraries depends on it.
pub fn compile_ptx(source: &KernelSource, arch: Arch) -> Result<Arc<CString>, GpuError> {
    if !nvrtc_present() {
        return Err(GpuError::NoNvrtc);
    }
    let key = (source.key(), arch);
    if let Some(p) = ptx_cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    if source.src.as_bytes().contains(&0) {
        return Err(GpuError::InvalidArgument { arg: "source", problem: "contains a NUL byte".into() });
    }
    let opts = CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={}", source.target(arch)), "--std=c++17".into()],
        name: Some(source.name.replace('/', "_")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&source.src, opts).map_err(|e| GpuError::Compile {
        kernel: source.name.clone(),
        arch: source.target(arch),
        log: match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        },
    })?;
    let text = CString::new(ptx.to_src()).map_err(|_| GpuError::Compile {
        kernel: source.name.clone(),
        arch: arch.compute_name(),
        log: "NVRTC returned PTX with a NUL byte".into(),
    })?;
    let text = Arc::new(text);
    ptx_cache().lock().unwrap_or_else(|p| p.into_inner()).insert(key, text.clone());
    Ok(text)
}

/// A loaded kernel function. Plain handle: valid while its context lives.
#[derive(Clone, Copy, Debug)]
pub struct Function(pub sys::CUfunction);
// SAFETY: a CUfunction is an opaque driver handle usable from any thread whose current
// context is the one it was loaded into; we only launch it after checking that.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

type FnCache = Mutex<HashMap<(usize, u64), Function>>;
fn fn_cache() -> &'static FnCache {
    static C: OnceLock<FnCache> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// How many blocks of `block` threads of `f` can be resident on the whole device at once
/// (SMs x blocks per SM at `f`'s register and shared-memory use), cached per function:
/// the size of a persistent grid.
pub fn resident_blocks(f: Function, block: u32) -> Result<u32, GpuError> {
    static C: OnceLock<Mutex<HashMap<(usize, u32), u32>>> = OnceLock::new();
    let cache = C.get_or_init(Default::default);
    let key = (f.0 as usize, block);
    if let Some(&n) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(n);
    }
    let (_, dev) = current_context()?;
    // SAFETY: `dev` came from cuCtxGetDevice on a live context; `f` was loaded into it.
    let sms = unsafe { result::device::get_attribute(dev, Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT) }
        .map_err(GpuError::driver("cuDeviceGetAttribute"))? as u32;
    let mut per_sm: i32 = 0;
    // SAFETY: out-pointer to a local; `f` is a live function handle.
    unsafe { sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut per_sm, f.0, block as i32, 0) }
        .result()
        .map_err(GpuError::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
    let n = sms * per_sm.max(1) as u32;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, n);
    Ok(n)
}

fn arch_of(dev: sys::CUdevice) -> Result<Arch, GpuError> {
    // SAFETY: `dev` came from cuCtxGetDevice on a live context.
    let get = |a| unsafe { result::device::get_attribute(dev, a) }.map_err(GpuError::driver("cuDeviceGetAttribute"));
    Ok(Arch {
        major: get(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
        minor: get(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
    })
}

fn current_context() -> Result<(sys::CUcontext, sys::CUdevice), GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    static INIT: OnceLock<Result<(), cudarc::driver::DriverError>> = OnceLock::new();
    (*INIT.get_or_init(result::init)).map_err(GpuError::driver("cuInit"))?;
    let ctx = result::ctx::get_current()
        .map_err(GpuError::driver("cuCtxGetCurrent"))?
        .ok_or(GpuError::NoCurrentContext)?;
    let mut dev: sys::CUdevice = 0;
    // SAFETY: out-pointer to a local.
    unsafe { sys::cuCtxGetDevice(&mut dev) }.result().map_err(GpuError::driver("cuCtxGetDevice"))?;
    Ok((ctx, dev))
}

/// Loads `fn_name` of `source` into the calling thread's current context, compiling the
/// source for that context's device on first use. Errors (never panics) when there is no
/// driver, no NVRTC, or no current context.
pub fn function_in_current_context(source: &KernelSource, fn_name: &str) -> Result<Function, GpuError> {
    let (ctx, dev) = current_context()?;
    let key = (ctx as usize, fnv(fn_name.bytes(), source.key()));
    if let Some(f) = fn_cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(*f);
    }
    let ptx = compile_ptx(source, arch_of(dev)?)?;
    // SAFETY: `ptx` is a NUL-terminated PTX image that outlives the call (the driver
    // copies it); the module is deliberately never unloaded (see module docs).
    let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void) }
        .map_err(GpuError::driver("cuModuleLoadData"))?;
    let name = CString::new(fn_name)
        .map_err(|_| GpuError::InvalidArgument { arg: "fn_name", problem: "contains a NUL byte".into() })?;
    // SAFETY: module was just loaded into the current context.
    let f = unsafe { result::module::get_function(module, name) }.map_err(GpuError::driver("cuModuleGetFunction"))?;
    let f = Function(f);
    fn_cache().lock().unwrap_or_else(|p| p.into_inner()).insert(key, f);
    Ok(f)
}

/// Launches `f` on `stream` (may be null: the legacy default stream).
///
/// # Safety
/// `params` must point at values whose types and order match the kernel's signature,
/// every device pointer among them must be valid for what the kernel reads and writes,
/// and `f` must belong to the current context.
pub unsafe fn launch(
    f: Function,
    grid: u32,
    block: u32,
    shared_bytes: u32,
    stream: sys::CUstream,
    params: &mut [*mut c_void],
) -> Result<(), GpuError> {
    if grid == 0 {
        return Ok(());
    }
    result::launch_kernel(f.0, (grid, 1, 1), (block, 1, 1), shared_bytes, stream, params)
        .map_err(GpuError::driver("cuLaunchKernel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_keys_depend_on_name_and_text() {
        let a = KernelSource::new("a", "x");
        assert_eq!(a.key(), KernelSource::new("a", "x").key());
        assert_ne!(a.key(), KernelSource::new("b", "x").key());
        assert_ne!(a.key(), KernelSource::new("a", "y").key());
        // The NUL separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(KernelSource::new("ab", "c").key(), KernelSource::new("a", "bc").key());
    }

    #[test]
    fn missing_libraries_are_errors_not_panics() {
        if !nvrtc_present() {
            let e = compile_ptx(&KernelSource::new("t", "extern \"C\" __global__ void k() {}"), Arch::SM75).unwrap_err();
            assert!(matches!(e, GpuError::NoNvrtc), "{e}");
        }
        if !driver_present() {
            let e = function_in_current_context(&KernelSource::new("t", ""), "k").unwrap_err();
            assert!(matches!(e, GpuError::NoDriver), "{e}");
            assert!(matches!(crate::Gpu::open(0).unwrap_err(), GpuError::NoDriver));
            assert!(matches!(crate::device_count().unwrap_err(), GpuError::NoDriver));
        }
    }

    #[test]
    fn compile_errors_carry_nvrtc_log() {
        if !nvrtc_present() {
            eprintln!("SKIPPED compile_errors_carry_nvrtc_log: no NVRTC");
            return;
        }
        let e = compile_ptx(&KernelSource::new("broken", "this is not CUDA"), Arch::SM75).unwrap_err();
        match e {
            GpuError::Compile { kernel, arch, log } => {
                assert_eq!(kernel, "broken");
                assert_eq!(arch, "compute_75");
                assert!(!log.is_empty());
            }
            other => panic!("{other}"),
        }
    }
}
