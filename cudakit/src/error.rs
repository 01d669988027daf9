use cudarc::driver::DriverError;

/// Everything that can go wrong between "is there a GPU?" and "the kernel was launched".
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// `libcuda.so` could not be loaded: no NVIDIA driver on this machine.
    #[error("the CUDA driver library (libcuda.so / nvcuda.dll) was not found: no NVIDIA driver on this machine")]
    NoDriver,
    /// `libnvrtc.so` could not be loaded: kernels cannot be compiled.
    #[error("the NVRTC library (libnvrtc.so.13) was not found: install the CUDA 13 runtime compiler or put it on the loader path")]
    NoNvrtc,
    /// The driver loaded but reports no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// The ordinal that was asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// `libcublas.so` could not be loaded: GEMMs cannot run.
    #[error("the cuBLAS library (libcublas.so.13) was not found: install the CUDA 13 cuBLAS runtime or put it on the loader path")]
    NoCublas,
    /// A cuBLAS call failed.
    #[error("cuBLAS call `{call}` ({label}) failed: {status} ({code})")]
    Cublas {
        /// Which cuBLAS call, e.g. `cublasGemmEx`.
        call: &'static str,
        /// The caller's name for what was being done, e.g. the GEMM's label.
        label: String,
        /// The status's name, e.g. `CUBLAS_STATUS_INVALID_VALUE`.
        status: String,
        /// The status's numeric value.
        code: i32,
    },
    /// No CUDA context is current on the calling thread (C ABI callers must make one current).
    #[error("no CUDA context is current on this thread: create or bind one first (PyTorch does so on its first CUDA call)")]
    NoCurrentContext,
    /// A CUDA driver call failed.
    #[error("CUDA driver call `{call}` failed: {source}")]
    Driver {
        /// Which driver call.
        call: &'static str,
        /// The driver's error code.
        #[source]
        source: DriverError,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile kernel source `{kernel}` for {arch}: {log}")]
    Compile {
        /// The kernel source's name.
        kernel: String,
        /// The target architecture, e.g. `compute_90`.
        arch: String,
        /// NVRTC's log (or error, when there is no log).
        log: String,
    },
    /// A caller passed something a kernel cannot take.
    #[error("invalid argument `{arg}`: {problem}")]
    InvalidArgument {
        /// The argument's name.
        arg: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl GpuError {
    /// Wraps a driver error with the name of the call that returned it.
    pub fn driver(call: &'static str) -> impl FnOnce(DriverError) -> GpuError {
        move |source| GpuError::Driver { call, source }
    }
}
