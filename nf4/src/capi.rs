//! C ABI: dequantize tensors you own (PyTorch via ctypes, candle, C++).
//!
//! ```c
//! // Returns 0 on success; on failure a non-zero code, and nf4_last_error() says why.
//! int nf4_dequantize(
//!     const uint8_t *packed,    // device, ceil(n/2) bytes
//!     const void *absmax,       // device, float32[nblocks], or uint8[nblocks] if absmax2
//!     const float *absmax2,     // device, float32[ceil(nblocks/nested_blocksize)], or NULL
//!     const float *code2,       // device, float32[256], or NULL: bitsandbytes' dynamic map
//!     float offset,             // nested offset (ignored without absmax2)
//!     const float *code,        // device, float32[16], or NULL: standard table of quant_type
//!     int quant_type,           // 0 nf4, 1 fp4
//!     uint64_t n,               // elements
//!     uint32_t blocksize,       // 32..4096, power of two
//!     uint32_t nested_blocksize,// 256 for bitsandbytes
//!     void *out,                // device, n elements of out_dtype
//!     int out_dtype,            // 0 float32, 1 float16, 2 bfloat16
//!     void *stream);            // cudaStream_t / CUstream; NULL = legacy default stream
//! const char *nf4_last_error(void); // thread-local, valid until the next call on this thread
//! ```
//!
//! The kernel runs in the calling thread's current CUDA context (PyTorch makes the
//! device's primary context current), is compiled for that device on first use, and is
//! queued on `stream` without synchronizing. Panics never cross the boundary.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};

use crate::codes::QuantType;
use crate::element::FloatDtype;
use crate::gpu::{launch_dequant, DequantArgs};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) -> c_int {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
    1
}

/// See the module docs. Returns 0 on success.
///
/// # Safety
/// Pointers must be device addresses of the documented sizes in the current context.
#[no_mangle]
pub unsafe extern "C" fn nf4_dequantize(
    packed: *const u8,
    absmax: *const c_void,
    absmax2: *const f32,
    code2: *const f32,
    offset: f32,
    code: *const f32,
    quant_type: c_int,
    n: u64,
    blocksize: u32,
    nested_blocksize: u32,
    out: *mut c_void,
    out_dtype: c_int,
    stream: *mut c_void,
) -> c_int {
    let r = std::panic::catch_unwind(|| {
        let quant_type = match quant_type {
            0 => QuantType::Nf4,
            1 => QuantType::Fp4,
            q => return Err(format!("invalid argument `quant_type`: {q} (expected 0 = nf4, 1 = fp4)")),
        };
        let out_dtype = match out_dtype {
            0 => FloatDtype::F32,
            1 => FloatDtype::F16,
            2 => FloatDtype::Bf16,
            d => return Err(format!("invalid argument `out_dtype`: {d} (expected 0 = f32, 1 = f16, 2 = bf16)")),
        };
        let args = DequantArgs {
            packed: packed as u64,
            absmax: absmax as u64,
            absmax2: absmax2 as u64,
            code2: code2 as u64,
            offset,
            code: code as u64,
            quant_type,
            n,
            blocksize,
            nested_blocksize,
            transposed: None,
            out: out as u64,
            out_dtype,
        };
        launch_dequant(&args, stream as _).map_err(|e| e.to_string())
    });
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(msg)) => set_error(msg),
        Err(_) => set_error("internal error: nf4_dequantize panicked".into()),
    }
}

/// The last error of this thread, as a NUL-terminated string (empty if none).
#[no_mangle]
pub extern "C" fn nf4_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: nf4_last_error returns a NUL-terminated thread-local string.
        unsafe { std::ffi::CStr::from_ptr(nf4_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn bad_arguments_return_codes_and_messages_without_touching_cuda() {
        let p = 16 as *const u8; // never dereferenced: validation fails first
        let rc = unsafe {
            nf4_dequantize(p, p as _, std::ptr::null(), std::ptr::null(), 0.0, std::ptr::null(), 7, 64, 64, 256, p as _, 2, std::ptr::null_mut())
        };
        assert_eq!(rc, 1);
        assert!(last_error().contains("quant_type"), "{}", last_error());
        let rc = unsafe {
            nf4_dequantize(p, p as _, std::ptr::null(), std::ptr::null(), 0.0, std::ptr::null(), 0, 64, 64, 256, p as _, 9, std::ptr::null_mut())
        };
        assert_eq!(rc, 1);
        assert!(last_error().contains("out_dtype"), "{}", last_error());
        let rc = unsafe {
            nf4_dequantize(p, p as _, std::ptr::null(), std::ptr::null(), 0.0, std::ptr::null(), 0, 64, 48, 256, p as _, 2, std::ptr::null_mut())
        };
        assert_eq!(rc, 1);
        assert!(last_error().contains("blocksize"), "{}", last_error());
    }

    #[test]
    fn without_a_driver_it_is_an_error_not_a_crash() {
        if cudakit::driver_present() {
            return; // the GPU machine runs the real launch in the GPU tests
        }
        let p = 16 as *const u8;
        let rc = unsafe {
            nf4_dequantize(p, p as _, std::ptr::null(), std::ptr::null(), 0.0, std::ptr::null(), 0, 64, 64, 256, p as _, 2, std::ptr::null_mut())
        };
        assert_eq!(rc, 1);
        assert!(last_error().contains("driver"), "{}", last_error());
    }
}
