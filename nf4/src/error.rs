/// What can go wrong, always naming the tensor (and field, file or index) at fault.
#[derive(Debug, thiserror::Error)]
pub enum Nf4Error {
    /// A quant-state field is missing, has the wrong type, or holds a value we cannot use.
    #[error("tensor `{tensor}`: field `{field}`: {problem}")]
    Field {
        /// The weight's name (e.g. `model.layers.0.mlp.down_proj.weight`).
        tensor: String,
        /// The field (`blocksize`, `shape`, `absmax`, ...).
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
    /// A tensor the quant state needs is not in the file.
    #[error("tensor `{tensor}`: the checkpoint has no `{key}` ({why})")]
    MissingTensor {
        /// The weight's name.
        tensor: String,
        /// The missing key.
        key: String,
        /// Why it is needed.
        why: String,
    },
    /// An input value we refuse to quantize (NaN or infinity).
    #[error("tensor `{tensor}`: element {index} is {value}: only finite values can be quantized")]
    NonFinite {
        /// The tensor's name.
        tensor: String,
        /// Flat index of the first bad element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The file is not valid safetensors (truncated, corrupt header, ...).
    #[error("{path}: not a valid safetensors file: {source}")]
    Safetensors {
        /// The file.
        path: String,
        /// The parser's complaint.
        #[source]
        source: safetensors::SafeTensorError,
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
    /// A GPU operation failed.
    #[error("tensor `{tensor}`: {source}")]
    Gpu {
        /// The tensor being processed.
        tensor: String,
        /// What the CUDA layer said.
        #[source]
        source: cudakit::GpuError,
    },
}

impl Nf4Error {
    pub(crate) fn field(tensor: &str, field: &str, problem: impl Into<String>) -> Self {
        Nf4Error::Field { tensor: tensor.to_string(), field: field.to_string(), problem: problem.into() }
    }
}

/// Result with [`Nf4Error`].
pub type Result<T, E = Nf4Error> = std::result::Result<T, E>;
