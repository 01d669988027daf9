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
    /// A [`Error::Io`] for `path`.
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io { path: path.display().to_string(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
