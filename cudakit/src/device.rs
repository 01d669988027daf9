use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{result, CudaContext, CudaStream};

use crate::GpuError;

/// Whether the CUDA driver library can be loaded. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether the NVRTC library can be loaded. Never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of CUDA devices, or an error when there is no driver.
pub fn device_count() -> Result<usize, GpuError> {
    if !driver_present() {
        return Err(GpuError::NoDriver);
    }
    match result::init() {
        Ok(()) => {}
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        Err(e) => return Err(GpuError::driver("cuInit")(e)),
    }
    let n = result::device::get_count().map_err(GpuError::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// A compute capability, e.g. `Arch { major: 9, minor: 0 }` for an H100 (sm_90).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl Arch {
    /// The oldest architecture our kernels support (T4).
    pub const SM75: Arch = Arch { major: 7, minor: 5 };
    /// NVRTC's virtual architecture name, e.g. `compute_90`.
    pub fn compute_name(self) -> String {
        format!("compute_{}{}", self.major, self.minor)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.major, self.minor)
    }
}

/// What the benchmarks and reports need to know about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability.
    pub arch: Arch,
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: u64,
    /// Total device memory in bytes.
    pub total_mem: u64,
}

/// An open device: its primary context (shared with PyTorch and others) and one stream.
///
/// Invariant: all work issued through a `Gpu` goes to [`Gpu::stream`], so cudarc's
/// per-buffer event tracking is switched off (it would add an event record per launch
/// argument, which the benchmarks would pay for).
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`. An error value, never a panic, when there is no driver,
    /// no NVRTC (every kernel needs it) or no such device.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let count = device_count()?;
        if !nvrtc_present() {
            return Err(GpuError::NoNvrtc);
        }
        if ordinal >= count {
            return Err(GpuError::NoDevice { ordinal, count });
        }
        let ctx = primary_context(ordinal)?;
        // SAFETY: see the invariant in the type's docs: one stream per Gpu.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(GpuError::driver("cuStreamCreate"))?;
        let attr = |a| ctx.attribute(a).map_err(GpuError::driver("cuDeviceGetAttribute"));
        let (major, minor) = ctx.compute_capability().map_err(GpuError::driver("cuDeviceGetAttribute"))?;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(GpuError::driver("cuDeviceGetName"))?,
            arch: Arch { major: major as u32, minor: minor as u32 },
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64,
            total_mem: ctx.total_mem().map_err(GpuError::driver("cuDeviceTotalMem"))? as u64,
        };
        Ok(Gpu { ctx, stream, info })
    }

    /// The device's primary context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all of this handle's work runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Facts about the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Makes this device's context current on the calling thread (kernels are loaded
    /// into the current context).
    pub fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))
    }

}

/// The device's primary context, retained once and kept for the life of the process.
///
/// Kernels are cached per context ([`crate::kernel`]); if the last `Gpu` of a device
/// released its primary context, the driver would destroy it and a later `Gpu::open` could
/// get a new context at the same address, for which the cache would hand out functions of
/// the dead one (`CUDA_ERROR_INVALID_HANDLE` at launch). Holding one reference per device
/// forever rules that out, and matches what CUDA runtimes (PyTorch's included) do.
fn primary_context(ordinal: usize) -> Result<Arc<CudaContext>, GpuError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static HELD: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let mut held = HELD.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = held.get(&ordinal) {
        return Ok(c.clone());
    }
    let ctx = CudaContext::new(ordinal).map_err(GpuError::driver("cuDevicePrimaryCtxRetain"))?;
    held.insert(ordinal, ctx.clone());
    Ok(ctx)
}
