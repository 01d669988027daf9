//! The frozen base model's tensors: their HF names and shapes, the dtypes they arrive in,
//! and NF4 quantization of the projection weights at load.
//!
//! The seven projection weights of every layer become NF4 (bitsandbytes' format, through
//! the `nf4` crate) and the CPU reference computes with their dequantized values, so the
//! GPU path and this reference read identical NF4 bytes. The dequantized values are kept in
//! f32 (`code * absmax`, unrounded): the reference is f32 end to end. Embedding, norms,
//! biases and the LM head stay unquantized, as in bitsandbytes/PEFT QLoRA.

use half::{bf16, f16};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::proj::Proj;
use crate::rng::Rng;

/// One tensor as stored, before any conversion.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// float32.
    F32(Vec<f32>),
    /// bfloat16.
    Bf16(Vec<bf16>),
    /// float16.
    F16(Vec<f16>),
    /// Already 4-bit (a bitsandbytes checkpoint): packed bytes and quant state.
    Quantized(Box<nf4::Quantized>),
}

impl TensorData {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::Bf16(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::Quantized(q) => q.state.numel(),
        }
    }

    /// The values in f32 (exact for f32/bf16/f16; dequantized for 4-bit).
    pub fn to_f32(&self, name: &str) -> Result<Vec<f32>> {
        Ok(match self {
            TensorData::F32(v) => v.clone(),
            TensorData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::Quantized(q) => nf4::dequantize::<f32>(name, &q.packed, &q.state)?,
        })
    }

    /// Quantizes (from the stored dtype, as bitsandbytes quantizes a bf16 weight) unless
    /// already quantized.
    fn quantize(self, name: &str, shape: &[usize], opts: &nf4::QuantizeOptions) -> Result<nf4::Quantized> {
        Ok(match self {
            TensorData::F32(v) => nf4::quantize(name, &v, shape, opts)?,
            TensorData::Bf16(v) => nf4::quantize(name, &v, shape, opts)?,
            TensorData::F16(v) => nf4::quantize(name, &v, shape, opts)?,
            TensorData::Quantized(q) => *q,
        })
    }
}

/// How the frozen projection weights are held.
#[derive(Clone, Debug)]
pub enum BaseFormat {
    /// Plain f32 (a pre-quantized tensor is dequantized).
    F32,
    /// NF4 with these options (bitsandbytes' defaults: blocksize 64, nested absmax).
    Nf4(nf4::QuantizeOptions),
}

impl Default for BaseFormat {
    /// NF4, bitsandbytes' defaults.
    fn default() -> Self {
        BaseFormat::Nf4(nf4::QuantizeOptions::default())
    }
}

/// What a base-model tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightKind {
    /// `model.embed_tokens.weight`.
    Embedding,
    /// An RMSNorm weight: `layer` is `None` for the final `model.norm`.
    Norm {
        /// The layer, or `None` for `model.norm`.
        layer: Option<usize>,
        /// 0: `input_layernorm`, 1: `post_attention_layernorm` (0 for `model.norm`).
        which: usize,
    },
    /// A projection weight.
    Proj {
        /// The layer.
        layer: usize,
        /// The projection.
        proj: Proj,
    },
    /// A projection bias.
    Bias {
        /// The layer.
        layer: usize,
        /// The projection.
        proj: Proj,
    },
    /// `lm_head.weight` (absent with tied embeddings).
    LmHead,
}

/// A tensor the model needs: HF name, shape, role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSpec {
    /// The HF state-dict name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its role.
    pub kind: WeightKind,
}

/// Every tensor a model of this configuration reads, in HF's order.
pub fn weight_specs(c: &Config) -> Vec<WeightSpec> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let spec = |name: String, shape: Vec<usize>, kind| WeightSpec { name, shape, kind };
    let mut out = vec![spec("model.embed_tokens.weight".into(), vec![v, h], WeightKind::Embedding)];
    for layer in 0..c.num_hidden_layers {
        let norm = |which: usize, n: &str| spec(format!("model.layers.{layer}.{n}.weight"), vec![h], WeightKind::Norm { layer: Some(layer), which });
        out.push(norm(0, "input_layernorm"));
        for proj in Proj::ALL {
            let (o, i) = proj.shape(c);
            out.push(spec(format!("{}.weight", proj.path(layer)), vec![o, i], WeightKind::Proj { layer, proj }));
            if proj.has_bias(c) {
                out.push(spec(format!("{}.bias", proj.path(layer)), vec![o], WeightKind::Bias { layer, proj }));
            }
            if proj == Proj::O {
                out.push(norm(1, "post_attention_layernorm"));
            }
        }
    }
    out.push(spec("model.norm.weight".into(), vec![h], WeightKind::Norm { layer: None, which: 0 }));
    if !c.tie_word_embeddings {
        out.push(spec("lm_head.weight".into(), vec![v, h], WeightKind::LmHead));
    }
    out
}

/// A frozen linear layer: weight `[out, in]` (the dequantized values when NF4), the NF4
/// payload it came from, optional bias.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// `[out, in]` in f32: what the CPU reference multiplies with.
    pub weight: Vec<f32>,
    /// The NF4 payload (`BaseFormat::Nf4`): the bytes the GPU path will read.
    pub nf4: Option<nf4::Quantized>,
    /// `[out]`.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// Builds a projection from its stored tensor, quantizing per `base`.
    pub fn new(name: &str, shape: (usize, usize), data: TensorData, bias: Option<Vec<f32>>, base: &BaseFormat) -> Result<Linear> {
        let (out_features, in_features) = shape;
        let (weight, nf4) = match base {
            BaseFormat::F32 => (data.to_f32(name)?, None),
            BaseFormat::Nf4(opts) => {
                let q = data.quantize(name, &[out_features, in_features], opts)?;
                (nf4::dequantize::<f32>(name, &q.packed, &q.state)?, Some(q))
            }
        };
        if weight.len() != out_features * in_features {
            return Err(Error::tensor("<memory>", name, format!("{} elements, expected [{out_features}, {in_features}]", weight.len())));
        }
        Ok(Linear { in_features, out_features, weight, nf4, bias })
    }
}

/// Random weights for a configuration (tests, examples, benchmarks), scaled so that
/// activations and logits stay O(1): projections, head and embedding `N(0, 1/in)` (the
/// embedding too, so a tied head gives O(1) logits; RMSNorm rescales its rows), norm
/// weights `1 + N(0, 0.1^2)`, biases `N(0, 0.1^2)`. Each tensor has its own stream
/// (seed + name).
pub fn random_weights(c: &Config, seed: u64) -> Vec<(WeightSpec, Vec<f32>)> {
    use rayon::prelude::*;
    // One generator per tensor, seeded by its name: the same values in any order, so the
    // tensors are drawn in parallel (a 1B-parameter model in seconds, not a minute).
    weight_specs(c)
        .into_par_iter()
        .map(|s| {
            let mut r = Rng::for_tensor(seed, &s.name);
            let n: usize = s.shape.iter().product();
            let v = match s.kind {
                WeightKind::Norm { .. } => r.normals(n, 0.1).into_iter().map(|x| 1.0 + x).collect(),
                WeightKind::Bias { .. } => r.normals(n, 0.1),
                WeightKind::Proj { .. } | WeightKind::LmHead | WeightKind::Embedding => r.normals(n, 1.0 / (s.shape[1] as f64).sqrt()),
            };
            (s, v)
        })
        .collect()
}
