//! `QuantState`: everything needed to turn packed 4-bit codes back into floats.

use crate::codes::{dynamic_map, QuantType};
use crate::element::{mul_ftz, FloatDtype};
use crate::error::{Nf4Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the nested (double-quant) absmax, as bitsandbytes uses it.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The per-block scales.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`compress_statistics=False`, or pre-expanded by a loader).
    Plain(Vec<f32>),
    /// Double quantization: `absmax[b] = code2[q[b]] * absmax2[b / blocksize2] + offset`,
    /// the multiply and the add each rounded to f32 (bitsandbytes does them as two ops).
    Nested {
        /// One 8-bit code per block.
        q: Vec<u8>,
        /// One f32 scale per `blocksize2` blocks (`nested_absmax`).
        absmax2: Vec<f32>,
        /// The 8-bit code book (`nested_quant_map`), normally the signed dynamic map.
        code2: Box<[f32; 256]>,
        /// The mean that was subtracted before quantizing (`nested_offset`).
        offset: f32,
        /// Block size of the nested quantization (`nested_blocksize`, 256 in practice).
        blocksize2: usize,
    },
}

impl Absmax {
    /// Number of 4-bit blocks this covers.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { q, .. } => q.len(),
        }
    }
    /// Whether it covers no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether this is double-quantized.
    pub fn is_nested(&self) -> bool {
        matches!(self, Absmax::Nested { .. })
    }
    /// The f32 absmax of every block, decoding the nested form the way bitsandbytes does:
    /// its 8-bit dequant kernel multiplies (flushing denormals, it is built with fast
    /// math), then PyTorch adds the offset (no flush): two f32 roundings.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested { q, absmax2, code2, offset, blocksize2 } => q
                .iter()
                .enumerate()
                .map(|(b, &c)| {
                    let scaled = mul_ftz(code2[c as usize], absmax2[b / blocksize2]);
                    scaled + offset
                })
                .collect(),
        }
    }
}

/// How the packed bytes were stored (bitsandbytes' `quant_storage`): the bytes are the
/// same whatever the dtype; only the tensor's dtype and shape in the file differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedStorage {
    /// The safetensors dtype of the packed tensor (U8 unless saved for FSDP, e.g. BF16).
    pub dtype: safetensors::Dtype,
    /// The packed tensor's shape in the file, e.g. `[n/2, 1]`; `[1, n/2]` is the legacy
    /// transposed layout.
    pub shape: Vec<usize>,
}

impl PackedStorage {
    /// bitsandbytes' default: `uint8` of shape `[(n + 1) / 2, 1]`.
    pub fn default_for(numel: usize) -> Self {
        PackedStorage { dtype: safetensors::Dtype::U8, shape: vec![numel.div_ceil(2), 1] }
    }
}

/// Everything needed to dequantize one 4-bit tensor, as bitsandbytes' `QuantState` holds it.
///
/// Layout facts: blocks run over the flattened row-major tensor (element `i` uses block
/// `i / blocksize`), and byte `j` holds element `2j` in its high nibble and `2j + 1` in its
/// low nibble.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    /// nf4 or fp4.
    pub quant_type: QuantType,
    /// Elements per absmax block: a power of two in 32..=4096.
    pub blocksize: usize,
    /// The dtype the tensor had, and dequantizes to by default.
    pub dtype: FloatDtype,
    /// The original shape.
    pub shape: Vec<usize>,
    /// The 16 code values (`quant_map`).
    pub code: [f32; 16],
    /// Per-block scales.
    pub absmax: Absmax,
    /// How the packed bytes are stored in a checkpoint.
    pub storage: PackedStorage,
}

impl QuantState {
    /// Number of elements of the original tensor (saturating: a shape whose product
    /// overflows reads as `usize::MAX`, which [`QuantState::validate`] rejects).
    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX)
    }
    /// Number of absmax blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }
    /// Bytes of packed codes needed: two elements per byte.
    pub fn packed_len(&self) -> usize {
        self.numel().div_ceil(2)
    }
    /// bitsandbytes' legacy layout: when the packed tensor's first dim is 1 and the
    /// original is 2-D, `dequantize_4bit` returns the transpose. We reproduce it.
    pub fn is_transposed(&self) -> bool {
        self.storage.shape.first() == Some(&1) && self.shape.len() == 2
    }
    /// The shape of what dequantization returns (the original, or its transpose in the
    /// legacy layout).
    pub fn output_shape(&self) -> Vec<usize> {
        if self.is_transposed() {
            vec![self.shape[1], self.shape[0]]
        } else {
            self.shape.clone()
        }
    }

    /// The code values the dequantizers use. bitsandbytes' CUDA kernels ignore the stored
    /// `quant_map` and use their built-in tables, whose FP4 code 8 is `-0.0` where the
    /// stored map has `+0.0`. To stay bit-identical we use the built-in table whenever the
    /// stored map equals it as numbers, and honour a map that really differs.
    pub fn dequant_code(&self) -> [f32; 16] {
        let builtin = self.quant_type.code();
        if self.uses_builtin_code() {
            *builtin
        } else {
            self.code
        }
    }

    /// Whether the stored `quant_map` is the standard table of `quant_type` (as numbers).
    pub fn uses_builtin_code(&self) -> bool {
        self.code.iter().zip(self.quant_type.code()).all(|(a, b)| a == b)
    }

    /// Checks every invariant the dequantizers rely on; `tensor` names it in errors.
    /// Cheap (one pass over the absmax values), done once at load.
    pub fn validate(&self, tensor: &str) -> Result<()> {
        if self.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > isize::MAX as usize / 4) {
            return Err(Nf4Error::field(tensor, "shape", format!("{:?} has more elements than memory can hold", self.shape)));
        }
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(Nf4Error::field(
                tensor,
                "blocksize",
                format!("{} is not supported (expected one of {:?})", self.blocksize, BLOCKSIZES),
            ));
        }
        let nb = self.num_blocks();
        if self.absmax.len() != nb {
            return Err(Nf4Error::field(
                tensor,
                "absmax",
                format!(
                    "holds {} values but shape {:?} ({} elements) in blocks of {} needs {}",
                    self.absmax.len(),
                    self.shape,
                    self.numel(),
                    self.blocksize,
                    nb
                ),
            ));
        }
        if let Some(i) = self.code.iter().position(|c| !c.is_finite()) {
            return Err(Nf4Error::field(tensor, "quant_map", format!("value {i} is {}", self.code[i])));
        }
        match &self.absmax {
            Absmax::Plain(v) => {
                if let Some(i) = v.iter().position(|a| !a.is_finite()) {
                    return Err(Nf4Error::field(tensor, "absmax", format!("block {i} is {}", v[i])));
                }
            }
            Absmax::Nested { absmax2, code2, offset, blocksize2, .. } => {
                if *blocksize2 == 0 {
                    return Err(Nf4Error::field(tensor, "nested_blocksize", "must be positive"));
                }
                let nb2 = nb.div_ceil(*blocksize2);
                if absmax2.len() != nb2 {
                    return Err(Nf4Error::field(
                        tensor,
                        "nested_absmax",
                        format!("holds {} values but {} blocks in groups of {} need {}", absmax2.len(), nb, blocksize2, nb2),
                    ));
                }
                if let Some(i) = absmax2.iter().position(|a| !a.is_finite()) {
                    return Err(Nf4Error::field(tensor, "nested_absmax", format!("value {i} is {}", absmax2[i])));
                }
                if let Some(i) = code2.iter().position(|c| !c.is_finite()) {
                    return Err(Nf4Error::field(tensor, "nested_quant_map", format!("value {i} is {}", code2[i])));
                }
                if !offset.is_finite() {
                    return Err(Nf4Error::field(tensor, "nested_offset", format!("is {offset}")));
                }
            }
        }
        Ok(())
    }

    /// [`QuantState::validate`], plus: `packed_bytes` holds every code (`ceil(n / 2)` bytes).
    pub fn validate_with_packed(&self, tensor: &str, packed_bytes: usize) -> Result<()> {
        self.validate(tensor)?;
        if packed_bytes < self.packed_len() {
            return Err(Nf4Error::field(
                tensor,
                "weight",
                format!("packed data holds {packed_bytes} bytes but shape {:?} needs {}", self.shape, self.packed_len()),
            ));
        }
        Ok(())
    }

    /// A nested absmax from its parts with the default code book.
    pub fn nested_default(q: Vec<u8>, absmax2: Vec<f32>, offset: f32) -> Absmax {
        Absmax::Nested { q, absmax2, code2: Box::new(dynamic_map()), offset, blocksize2: NESTED_BLOCKSIZE }
    }
}
