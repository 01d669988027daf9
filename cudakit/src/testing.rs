//! The one rule for GPU tests: skip with a printed reason where there is no GPU, fail
//! where `REQUIRE_GPU=1` says there must be one (the GPU machine sets it).

use crate::Gpu;

/// Whether `REQUIRE_GPU=1` is set.
pub fn gpu_required() -> bool {
    std::env::var("REQUIRE_GPU").map(|v| v.trim() == "1").unwrap_or(false)
}

/// Opens device 0 for test `test`, or prints why the test is skipped and returns `None`.
///
/// # Panics
/// When no GPU can be opened and `REQUIRE_GPU=1`: on the GPU machine a skipped GPU test
/// is a failure.
pub fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
        Err(e) if gpu_required() => panic!("{test}: REQUIRE_GPU=1 but no usable GPU: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: no usable GPU ({e}); set REQUIRE_GPU=1 to make this a failure");
            None
        }
    }
}

/// Fills a device buffer with 0xFF bytes (NaN in f32, f16 and bf16) on `stream`, so a test
/// can tell every element a kernel wrote from one it skipped.
pub fn poison<T: cudarc::driver::DeviceRepr>(
    stream: &cudarc::driver::CudaStream,
    buf: &mut cudarc::driver::CudaSlice<T>,
) -> Result<(), crate::GpuError> {
    use cudarc::driver::DevicePtrMut;
    let bytes = buf.num_bytes();
    let (ptr, _sync) = buf.device_ptr_mut(stream);
    // SAFETY: writes exactly the buffer's own bytes, on the stream that owns it.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }
        .map_err(crate::GpuError::driver("cuMemsetD8Async"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_without_a_gpu_unless_required() {
        if crate::Gpu::open(0).is_ok() {
            return; // on a GPU machine there is nothing to skip
        }
        if gpu_required() {
            assert!(std::panic::catch_unwind(|| gpu_or_skip("probe")).is_err(), "REQUIRE_GPU=1 must fail");
        } else {
            assert!(gpu_or_skip("probe").is_none());
        }
    }
}
