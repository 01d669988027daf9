//! CUDA plumbing shared by every GPU crate of the workspace.
//!
//! # Design
//!
//! The workspace must build, link and run its CPU tests on machines with no CUDA at all
//! (CI, laptops), and use the GPU when one is there. So:
//!
//! - `cudarc` is built with `dynamic-loading`: nothing links against `libcuda` or
//!   `libnvrtc`. cudarc itself *panics* when a library is missing at the first call, so
//!   every entry point here checks [`driver_present`] / [`nvrtc_present`] first and turns
//!   absence into a [`GpuError`] value. Code above this crate never calls cudarc before
//!   going through [`Gpu::open`] or [`kernel::function_in_current_context`].
//! - Kernels are CUDA C sources embedded in the crates that own them ([`KernelSource`]),
//!   compiled with NVRTC at first use for the compute capability of the device that runs
//!   them, and cached per (source, arch) for the life of the process. No `cuda_fp16.h`:
//!   kernels treat half/bf16 as raw 16-bit values (NVRTC in CUDA 13 cannot find the
//!   headers without extra include paths), so the same source compiles for sm_75..sm_90.
//! - Kernels are loaded into *the calling thread's current context* and cached per
//!   context. This is what lets a C ABI entry point run on tensors owned by another
//!   runtime (PyTorch uses the device's primary context, as [`Gpu::open`] does).
//!
//! | layer | what | where |
//! |---|---|---|
//! | raw | `cudarc::driver::sys`, `cudarc::nvrtc::sys` | unsafe, used only in [`kernel`] |
//! | checked | [`driver_present`], [`nvrtc_present`], [`GpuError`] | never panics |
//! | safe | [`Gpu`], [`kernel::compile_ptx`], [`timing`], [`testing`] | what crates use |
//! | cuBLAS | [`blas::Blas`] (a handle bound to a stream and workspace), [`blas::Blas::gemm`] | GEMMs, column-major |
//!
//! # Example
//!
//! ```no_run
//! match cudakit::Gpu::open(0) {
//!     Ok(gpu) => println!("{} (sm_{})", gpu.info().name, gpu.info().arch),
//!     Err(e) => println!("no GPU here: {e}"),
//! }
//! ```
#![deny(missing_docs)]

pub mod blas;
mod device;
mod error;
pub mod kernel;
pub mod testing;
pub mod timing;

pub use cudarc;
pub use device::{device_count, driver_present, nvrtc_present, Arch, DeviceInfo, Gpu};
pub use error::GpuError;
pub use kernel::KernelSource;
