//! The crate's error type: every variant names the file, tensor, field or argument at fault.

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `config.json` (or `adapter_config.json`) field is missing, has the wrong type, or
    /// holds a value we do not support.
    #[error("{file}: field `{field}`: {problem}")]
    Config {
        /// The file (or a caller-chosen label for an in-memory string).
        file: String,
        /// The field, dotted for nested ones (`rope_scaling.factor`).
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// A weight is missing, has the wrong shape or dtype, or holds non-finite values.
    #[error("{file}: tensor `{tensor}`: {problem}")]
    Tensor {
        /// The file (a safetensors shard, an index, or `<memory>`).
        file: String,
        /// The tensor's name.
        tensor: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// An argument of a call has the wrong length or an out-of-range value.
    #[error("argument `{arg}`: {problem}")]
    Arg {
        /// The argument.
        arg: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// A training-data record (or the tokenizer) is unusable.
    #[error("{at}: {problem}")]
    Data {
        /// `file:line`, or the file.
        at: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    #[error("{path}: not valid JSON: {source}")]
    Json {
        /// The file.
        path: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{path}: safetensors: {source}")]
    Safetensors {
        /// The file.
        path: String,
        /// The library's complaint.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// Quantizing, dequantizing or reading a 4-bit weight failed.
    #[error(transparent)]
    Nf4(#[from] nf4::Nf4Error),
    /// A GPU call failed (driver, NVRTC, cuBLAS, or an argument a kernel refused).
    #[error("GPU: {0}")]
    Gpu(#[from] cudakit::GpuError),
    /// The chunked LM head + loss refused its inputs.
    #[error("LM head + loss: {0}")]
    Loss(#[from] memlinear::Error),
    /// The GPU ran out of memory (see [`Error::naming_out_of_memory`]).
    #[error("out of GPU memory allocating {what}: {detail}")]
    OutOfMemory {
        /// What was being allocated, with its size where known.
        what: String,
        /// What the run held, what the device had free, and what to try.
        detail: String,
    },
}

impl Error {
    /// A [`Error::Config`].
    pub(crate) fn config(file: &str, field: &str, problem: impl Into<String>) -> Error {
        Error::Config { file: file.to_string(), field: field.to_string(), problem: problem.into() }
    }
    /// A [`Error::Tensor`].
    pub(crate) fn tensor(file: &str, tensor: &str, problem: impl Into<String>) -> Error {
        Error::Tensor { file: file.to_string(), tensor: tensor.to_string(), problem: problem.into() }
    }
    /// A [`Error::Arg`].
    pub(crate) fn arg(arg: &str, problem: impl Into<String>) -> Error {
        Error::Arg { arg: arg.to_string(), problem: problem.into() }
    }
    /// Whether this is an [`Error::OutOfMemory`], or the driver's `CUDA_ERROR_OUT_OF_MEMORY`
    /// or cuBLAS's `CUBLAS_STATUS_ALLOC_FAILED` is this error or one under it.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory { .. }) || self.out_of_memory_cause().is_some()
    }

    /// "`call` returned CODE" for the out-of-memory failure under this error, if any: named
    /// from the codes, since a driver error's text needs the driver.
    fn out_of_memory_cause(&self) -> Option<String> {
        use cudakit::{cudarc::driver::sys::CUresult, GpuError};
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            match e.downcast_ref::<GpuError>() {
                Some(GpuError::Driver { call, source }) if source.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                    return Some(format!("`{call}` returned {:?}", source.0))
                }
                Some(GpuError::Cublas { call, status, .. }) if status == "CUBLAS_STATUS_ALLOC_FAILED" => return Some(format!("`{call}` returned {status}")),
                _ => cur = e.source(),
            }
        }
        None
    }

    /// An out-of-memory failure becomes an [`Error::OutOfMemory`] that says what was being
    /// allocated, how much the run already held on the device (`held`, said when not 0), the
    /// device's free and total memory (`device`: from `cuMemGetInfo`, when it could be read)
    /// and `hint`: what to try. Any other error, or one already named, passes unchanged.
    pub(crate) fn naming_out_of_memory(self, what: impl FnOnce() -> String, held: usize, device: Option<(usize, usize)>, hint: &str) -> Error {
        let cause = match (&self, self.out_of_memory_cause()) {
            (Error::OutOfMemory { .. }, _) | (_, None) => return self,
            (_, Some(cause)) => cause,
        };
        let gb = |b: usize| format!("{:.2} GB", b as f64 / 1e9);
        let mut parts = Vec::new();
        if held > 0 {
            parts.push(format!("the run held {} on the device before it", gb(held)));
        }
        if let Some((free, total)) = device {
            parts.push(format!("the device has {} free of {}", gb(free), gb(total)));
        }
        let mut detail = parts.join(", and ");
        if !detail.is_empty() {
            detail.push(' ');
        }
        detail += &format!("({cause}).");
        if !hint.is_empty() {
            detail += &format!(" {hint}");
        }
        Error::OutOfMemory { what: what(), detail }
    }

    /// A [`Error::Io`] for `path`.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.display().to_string(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::Error;
    use cudakit::cudarc::driver::{result::DriverError, sys::CUresult};
    use cudakit::GpuError;

    fn driver(code: CUresult) -> GpuError {
        GpuError::driver("cuMemAlloc")(DriverError(code))
    }

    #[test]
    fn out_of_memory_is_named_with_what_held_free_and_hint() {
        let e = Error::Gpu(driver(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(e.is_out_of_memory());
        let named = e.naming_out_of_memory(|| "activations for 8192 tokens".into(), 3_250_000_000, Some((1_500_000_000, 85_000_000_000)), "Try checkpointing `on`.");
        let Error::OutOfMemory { what, detail } = &named else { panic!("not named: {named:?}") };
        assert_eq!(what, "activations for 8192 tokens");
        let expected = "the run held 3.25 GB on the device before it, and the device has 1.50 GB free of 85.00 GB \
                        (`cuMemAlloc` returned CUDA_ERROR_OUT_OF_MEMORY). Try checkpointing `on`.";
        assert_eq!(detail, expected);
        for part in ["3.25 GB on the device", "1.50 GB free of 85.00 GB", "cuMemAlloc", "Try checkpointing `on`."] {
            assert!(detail.contains(part), "`{part}` missing from: {detail}");
        }
        // Naming twice keeps the first (innermost) name.
        let again = named.naming_out_of_memory(|| "the step".into(), 0, None, "");
        assert!(matches!(&again, Error::OutOfMemory { what, .. } if what == "activations for 8192 tokens"), "{again}");
    }

    #[test]
    fn out_of_memory_is_found_under_other_crates_errors() {
        // nf4's upload wraps the driver's error in its own.
        let nf4 = Error::Nf4(nf4::Nf4Error::Gpu { tensor: "w".into(), source: driver(CUresult::CUDA_ERROR_OUT_OF_MEMORY) });
        assert!(nf4.is_out_of_memory(), "{nf4:?}");
        let named = nf4.naming_out_of_memory(|| "w".into(), 0, None, "");
        assert!(matches!(&named, Error::OutOfMemory { detail, .. } if detail == "(`cuMemAlloc` returned CUDA_ERROR_OUT_OF_MEMORY)."), "{named}");
        let blas = Error::Gpu(GpuError::Cublas { call: "cublasCreate", label: "x".into(), status: "CUBLAS_STATUS_ALLOC_FAILED".into(), code: 3 });
        assert!(blas.is_out_of_memory());
        let named = blas.naming_out_of_memory(|| "w".into(), 0, Some((0, 1)), "");
        assert!(matches!(&named, Error::OutOfMemory { detail, .. } if detail == "the device has 0.00 GB free of 0.00 GB (`cublasCreate` returned CUBLAS_STATUS_ALLOC_FAILED)."), "{named}");
    }

    #[test]
    fn other_errors_pass_unchanged() {
        // (A driver error's text needs the driver, absent in CI: compared by code.)
        let e = Error::Gpu(driver(CUresult::CUDA_ERROR_INVALID_VALUE));
        assert!(!e.is_out_of_memory());
        let after = e.naming_out_of_memory(|| unreachable!("not asked for"), 1, None, "hint");
        assert!(matches!(after, Error::Gpu(GpuError::Driver { call: "cuMemAlloc", source }) if source.0 == CUresult::CUDA_ERROR_INVALID_VALUE));
        for e in [
            Error::arg("batch", "empty"),
            Error::Gpu(GpuError::Cublas { call: "cublasGemmEx", label: "q".into(), status: "CUBLAS_STATUS_INVALID_VALUE".into(), code: 7 }),
        ] {
            let before = e.to_string();
            assert!(!e.is_out_of_memory(), "{before}");
            let after = e.naming_out_of_memory(|| unreachable!("not asked for"), 1, None, "hint");
            assert_eq!(after.to_string(), before);
        }
    }
}
