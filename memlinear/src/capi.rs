//! C ABI of `libmemlinear.so`, for PyTorch through ctypes: cross-entropy with its options
//! (the built-in loss most callers want) on device pointers, on the caller's stream, in
//! the CUDA context current on the calling thread, with a caller-allocated workspace (so
//! PyTorch's allocator accounts for every byte). See `memlinear/py/` for the Python side.
//!
//! Every function returns an error value (never unwinds across the boundary); the
//! message of the last error on this thread is `memlinear_last_error()`.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};

use crate::gpu::{self, RawHead, RawOutputs, RawProblem};
use crate::losses::{cross_entropy, CrossEntropy};
use crate::{Dtype, Reduction};

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(m: String) {
    LAST.with(|l| *l.borrow_mut() = CString::new(m.replace('\0', " ")).unwrap_or_default());
}

fn guard<R>(fail: R, f: impl FnOnce() -> Result<R, String>) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(r)) => r,
        Ok(Err(m)) => {
            set_error(m);
            fail
        }
        Err(_) => {
            set_error("internal error (panic) in memlinear".into());
            fail
        }
    }
}

/// The last error's message on this thread (empty if none). Valid until the next call.
#[no_mangle]
pub extern "C" fn memlinear_last_error() -> *const c_char {
    LAST.with(|l| l.borrow().as_ptr())
}

fn dims(tokens: i64, hidden: i64, vocab: i64, dtype: i32) -> Result<(usize, usize, usize, Dtype), String> {
    let d = Dtype::from_code(dtype).ok_or_else(|| format!("dtype code {dtype} is not 0 (f32), 1 (f16) or 2 (bf16)"))?;
    if tokens <= 0 || hidden <= 0 || vocab <= 0 {
        return Err(format!("tokens ({tokens}), hidden ({hidden}) and vocab ({vocab}) must be positive"));
    }
    Ok((tokens as usize, hidden as usize, vocab as usize, d))
}

fn ce_needs(want_dw: bool, dw_dtype: Dtype) -> gpu::Needs {
    gpu::Needs { teacher: false, per_token: true, token_params: 0, class_params: 0, dw_acc: want_dw && dw_dtype != Dtype::F32, db_acc: false }
}

/// Workspace bytes `memlinear_cross_entropy` needs for chunks of `chunk_tokens`; -1 on error.
#[no_mangle]
pub extern "C" fn memlinear_workspace_bytes(tokens: i64, hidden: i64, vocab: i64, dtype: i32, chunk_tokens: i64, want_dw: i32, dw_dtype: i32) -> i64 {
    guard(-1, || {
        let (t, h, v, d) = dims(tokens, hidden, vocab, dtype)?;
        let dwd = Dtype::from_code(dw_dtype).ok_or("bad dw_dtype")?;
        if chunk_tokens <= 0 {
            return Err("chunk_tokens must be positive".into());
        }
        Ok(gpu::layout(t, h, v, d, (chunk_tokens as usize).min(t), ce_needs(want_dw != 0, dwd)).total as i64)
    })
}

/// The largest chunk whose workspace fits `budget_bytes`; -1 if none (or on error).
#[no_mangle]
pub extern "C" fn memlinear_chunk_for_budget(tokens: i64, hidden: i64, vocab: i64, dtype: i32, want_dw: i32, dw_dtype: i32, budget_bytes: i64) -> i64 {
    guard(-1, || {
        let (t, h, v, d) = dims(tokens, hidden, vocab, dtype)?;
        let dwd = Dtype::from_code(dw_dtype).ok_or("bad dw_dtype")?;
        gpu::chunk_for_budget(t, h, v, d, ce_needs(want_dw != 0, dwd), budget_bytes.max(0) as usize)
            .map(|c| c as i64)
            .ok_or_else(|| format!("a budget of {budget_bytes} bytes does not fit one token's chunk"))
    })
}

/// Cross-entropy of `x @ w^T` against `targets`, its loss (sum / normalizer) into `loss`,
/// and the gradients asked for. Returns 0, or nonzero with `memlinear_last_error()` set:
/// 1 bad argument, 2 bad target, 3 non-finite input or result, 4 CUDA / cuBLAS error.
///
/// # Safety
/// Pointers must be device allocations of the documented shapes in the current context.
#[no_mangle]
pub unsafe extern "C" fn memlinear_cross_entropy(
    x: *const c_void,
    w: *const c_void,
    targets: *const i64,
    tokens: i64,
    hidden: i64,
    vocab: i64,
    dtype: i32,
    ignore_index: i64,
    label_smoothing: f32,
    z_loss: f32,
    softcap: f32,
    logit_scale: f32,
    normalizer: f32,
    loss: *mut f32,
    dx: *mut c_void,
    dw: *mut c_void,
    dw_dtype: i32,
    accumulate: i32,
    chunk_tokens: i64,
    workspace: *mut c_void,
    workspace_bytes: i64,
    stream: *mut c_void,
) -> i32 {
    let mut code = 1;
    let r = guard(-1, || {
        let (t, h, v, d) = dims(tokens, hidden, vocab, dtype)?;
        let dwd = Dtype::from_code(dw_dtype).ok_or_else(|| format!("dw_dtype code {dw_dtype} is not 0, 1 or 2"))?;
        if !(normalizer > 0.0 && normalizer.is_finite()) {
            return Err(format!("normalizer must be positive and finite, got {normalizer}"));
        }
        if !(0.0..1.0).contains(&label_smoothing) || !z_loss.is_finite() || z_loss < 0.0 || !softcap.is_finite() || softcap < 0.0 || !logit_scale.is_finite() {
            return Err(format!("bad options: label_smoothing {label_smoothing} (in [0,1)), z_loss {z_loss} (>= 0), softcap {softcap} (>= 0, 0 = off), logit_scale {logit_scale}"));
        }
        if x.is_null() || w.is_null() || targets.is_null() || loss.is_null() || workspace.is_null() {
            return Err("x, w, targets, loss and workspace must not be NULL".into());
        }
        let ce = cross_entropy(&CrossEntropy {
            label_smoothing: f64::from(label_smoothing),
            z_loss: f64::from(z_loss),
            softcap: (softcap > 0.0).then_some(f64::from(softcap)),
            logit_scale: f64::from(logit_scale),
            class_weights: false,
        });
        let p = RawProblem {
            tokens: t,
            vocab: v,
            dtype: d,
            student: RawHead { x: x as u64, w: w as u64, bias: 0, hidden: h },
            teacher: None,
            targets: targets as u64,
            ignore_index,
            token_params: vec![],
            class_params: vec![],
            grad_tokens: 0,
        };
        let o = RawOutputs { loss: loss as u64, per_token: 0, dx: dx as u64, dw: dw as u64, dw_dtype: dwd, db: 0, accumulate: accumulate != 0 };
        gpu::run_raw(&ce, &p, Reduction::Mean(Some(f64::from(normalizer))), &o, chunk_tokens.max(0) as usize, workspace as u64, workspace_bytes.max(0) as usize, stream as _)
            .map_err(|e| {
                code = match e {
                    crate::Error::Target { .. } => 2,
                    crate::Error::NonFinite { .. } | crate::Error::NonFiniteResult { .. } => 3,
                    crate::Error::Gpu(_) => 4,
                    _ => 1,
                };
                e.to_string()
            })?;
        Ok(0)
    });
    if r == 0 {
        0
    } else {
        code
    }
}
