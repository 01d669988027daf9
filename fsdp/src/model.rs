//! The Llama-family decoder on the CPU, f32, with LoRA on a chosen subset of the seven
//! projections: forward (keeping what the backward needs), the LM head + cross-entropy
//! through `memlinear`, and the hand-written backward to every LoRA `A` and `B`.
//!
//! One decoder layer (HF `LlamaDecoderLayer`):
//! ```text
//! n1 = rmsnorm(x) ; q, k, v = lora_linear(n1) ; q, k = rope(q, k) ; a = attention(q, k, v)
//! h = x + o_proj(a) ; n2 = rmsnorm(h) ; out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))
//! ```
//! Every frozen tensor is its own buffer (see [`crate::weights::Linear`]), as is every LoRA
//! tensor ([`crate::lora::Lora`]): the later FSDP step shards each on dim 0. The GPU
//! runtime will replace the calls into [`crate::ops`] one by one, layer by layer, with
//! kernels of the same signatures; this file is the schedule they plug into.
//!
//! LoRA dropout ([`crate::dropout`]) is a training-time thing: [`Llama::forward_train`] and
//! [`Llama::step`] take the micro-step's [`StepDropout`] (each projection of each layer
//! draws its own mask from it, and the backward regenerates the same masks);
//! [`Llama::forward`] and [`Llama::loss`] never drop (evaluation).
//!
//! Not implemented in this CPU reference: activation checkpointing (the forward keeps every
//! layer's activations; the GPU runtime has it, [`crate::gpu::model::Checkpointing`]),
//! sliding-window attention for sequences longer than the window (refused).

use std::collections::HashMap;

use memlinear::{losses, Head, Options, Problem, Reduction};

use crate::batch::{Batch, IGNORE_INDEX};
use crate::config::Config;
use crate::dropout::{Dropout, StepDropout};
use crate::error::{Error, Result};
use crate::lora::Lora;
use crate::ops::{self, Adapter, AdapterGrads, AttnShape, Frozen, Rope};
use crate::proj::Proj;
use crate::weights::{random_weights, weight_specs, BaseFormat, Linear, TensorData, WeightKind, WeightSpec};

/// One decoder layer's frozen weights.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `input_layernorm.weight`, `[hidden]`.
    pub input_norm: Vec<f32>,
    /// `post_attention_layernorm.weight`, `[hidden]`.
    pub post_norm: Vec<f32>,
    /// The seven projections, indexed by [`Proj::index`].
    pub proj: Vec<Linear>,
}

/// A Llama-family model (frozen base) on the CPU.
#[derive(Clone, Debug)]
pub struct Llama {
    /// Its configuration.
    pub config: Config,
    /// `model.embed_tokens.weight`, `[vocab, hidden]`.
    pub embed: Vec<f32>,
    /// The decoder layers.
    pub layers: Vec<Layer>,
    /// `model.norm.weight`, `[hidden]`.
    pub norm: Vec<f32>,
    /// `lm_head.weight`, `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<f32>>,
    /// RoPE frequencies.
    pub rope: Rope,
}

/// What one layer's forward keeps for its backward.
#[derive(Clone, Debug)]
struct LayerActs {
    x: Vec<f32>,
    n1: Vec<f32>,
    r1: Vec<f32>,
    q: Vec<f32>, // after RoPE
    k: Vec<f32>, // after RoPE
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    h: Vec<f32>,
    n2: Vec<f32>,
    r2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// `x A^T` of each adapted projection (empty otherwise), by [`Proj::index`].
    xa: Vec<Vec<f32>>,
}

/// The forward's output and everything its backward needs.
#[derive(Clone, Debug)]
pub struct Activations {
    /// The final hidden states (after `model.norm`), `[tokens, hidden]`: the LM head's input.
    pub hidden: Vec<f32>,
    layers: Vec<LayerActs>,
    /// The last layer's output (the final norm's input) and the norm's `rstd`.
    last: Vec<f32>,
    last_rstd: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The LoRA dropout of the forward (the backward regenerates its masks).
    dropout: Option<StepDropout>,
}

/// Loss and bookkeeping of one micro-batch's forward + backward.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Sum of the per-token losses divided by the normalizer given (so the losses of the
    /// micro-batches of one optimizer step add up to the step's mean loss).
    pub loss: f64,
    /// Targets that counted (not ignored) in this micro-batch.
    pub counted: usize,
}

impl Llama {
    /// Builds the model from a source of named tensors (called once per [`WeightSpec`] of
    /// [`weight_specs`]), quantizing the projections per `base`. The source checks shapes
    /// against its files; here only element counts are checked again.
    pub fn from_source(config: Config, base: &BaseFormat, mut source: impl FnMut(&WeightSpec) -> Result<TensorData>) -> Result<Llama> {
        let specs = weight_specs(&config);
        let mut get = |kind: WeightKind| -> Result<(String, TensorData)> {
            let spec = specs.iter().find(|s| s.kind == kind).expect("weight_specs lists every kind the model reads");
            let data = source(spec)?;
            let want: usize = spec.shape.iter().product();
            if data.numel() != want {
                return Err(Error::tensor("<source>", &spec.name, format!("{} elements, expected shape {:?}", data.numel(), spec.shape)));
            }
            Ok((spec.name.clone(), data))
        };
        let values = |got: Result<(String, TensorData)>| got.and_then(|(n, d)| d.to_f32(&n));
        let embed = values(get(WeightKind::Embedding))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let input_norm = values(get(WeightKind::Norm { layer: Some(layer), which: 0 }))?;
            let post_norm = values(get(WeightKind::Norm { layer: Some(layer), which: 1 }))?;
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (name, data) = get(WeightKind::Proj { layer, proj: p })?;
                let bias = if p.has_bias(&config) { Some(values(get(WeightKind::Bias { layer, proj: p }))?) } else { None };
                proj.push(Linear::new(&name, p.shape(&config), data, bias, base)?);
            }
            layers.push(Layer { input_norm, post_norm, proj });
        }
        let norm = values(get(WeightKind::Norm { layer: None, which: 0 }))?;
        let lm_head = if config.tie_word_embeddings { None } else { Some(values(get(WeightKind::LmHead))?) };
        let rope = Rope::new(&config);
        Ok(Llama { config, embed, layers, norm, lm_head, rope })
    }

    /// Builds the model from named f32 tensors in memory (HF names); a missing name is an
    /// error naming it, extra names are ignored.
    pub fn from_named(config: Config, weights: &HashMap<String, Vec<f32>>, base: &BaseFormat) -> Result<Llama> {
        Llama::from_source(config, base, |spec| {
            weights.get(&spec.name).map(|v| TensorData::F32(v.clone())).ok_or_else(|| Error::tensor("<memory>", &spec.name, "missing"))
        })
    }

    /// A model with [`random_weights`] (tests, examples, benchmarks).
    pub fn random(config: Config, seed: u64, base: &BaseFormat) -> Result<Llama> {
        let named: HashMap<String, Vec<f32>> = random_weights(&config, seed).into_iter().map(|(s, v)| (s.name, v)).collect();
        Llama::from_named(config, &named, base)
    }

    /// The LM head's weight (the embedding when tied).
    pub fn head_weight(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// Checks a batch against the model: lengths, token ids below the vocabulary size,
    /// sequences no longer than a sliding window.
    pub fn check_batch(&self, b: &Batch) -> Result<()> {
        check_batch(&self.config, b)
    }

    fn check_lora(&self, lora: &Lora) -> Result<()> {
        check_lora(&self.config, lora)
    }


    fn attn_shape(&self, b: &Batch) -> AttnShape {
        let c = &self.config;
        AttnShape { seqs: b.seqs(), seq_len: b.seq_len, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }

    /// One projection's forward: returns `(y, xa)`.
    fn proj_forward(&self, layer: usize, p: Proj, x: &[f32], lora: &Lora, dropout: Option<&StepDropout>) -> (Vec<f32>, Vec<f32>) {
        let lin = &self.layers[layer].proj[p.index()];
        let rows = x.len() / lin.in_features;
        let mut y = vec![0f32; rows * lin.out_features];
        let mask = mask(dropout, layer, p);
        let xa = ops::lora_linear_forward(x, &frozen(lin), adapter(lora, layer, p).as_ref(), mask.as_ref(), &mut y);
        (y, xa)
    }

    /// One projection's backward: adds its input gradient into `dx` and its adapter's
    /// gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn proj_backward(&self, layer: usize, p: Proj, dy: &[f32], x: &[f32], xa: &[f32], lora: &Lora, dropout: Option<&StepDropout>, grads: &mut Lora, dx: &mut [f32]) {
        let lin = &self.layers[layer].proj[p.index()];
        let mut d = vec![0f32; x.len()];
        let g = grads.get_mut(layer, p).map(|pair| AdapterGrads { da: &mut pair.a, db: &mut pair.b });
        let mask = mask(dropout, layer, p);
        ops::lora_linear_backward(dy, x, xa, &frozen(lin), adapter(lora, layer, p).as_ref(), mask.as_ref(), Some(&mut d), g);
        add(dx, &d);
    }

    /// The forward pass up to the final norm, as in evaluation: no LoRA dropout.
    pub fn forward(&self, lora: &Lora, b: &Batch) -> Result<Activations> {
        self.forward_train(lora, b, None)
    }

    /// The forward pass up to the final norm with the LoRA dropout of one training
    /// micro-step (`None`: none, as [`Llama::forward`]). [`Llama::backward`] regenerates the
    /// same masks.
    pub fn forward_train(&self, lora: &Lora, b: &Batch, dropout: Option<StepDropout>) -> Result<Activations> {
        self.check_batch(b)?;
        self.check_lora(lora)?;
        let c = &self.config;
        let (t, hd) = (b.tokens(), c.hidden_size);
        let eps = c.rms_norm_eps as f32;
        let (cos, sin) = self.rope.cos_sin(&b.positions);
        let shape = self.attn_shape(b);
        let mut x = vec![0f32; t * hd];
        ops::embedding_forward(&self.embed, hd, &b.ids, &mut x);
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, w) in self.layers.iter().enumerate() {
            let mut xa = vec![Vec::new(); 7];
            let (mut n1, mut r1) = (vec![0f32; t * hd], vec![0f32; t]);
            ops::rms_norm_forward(&x, &w.input_norm, eps, &mut n1, &mut r1);
            let mut run = |p: Proj, input: &[f32]| {
                let (y, a) = self.proj_forward(l, p, input, lora, dropout.as_ref());
                xa[p.index()] = a;
                y
            };
            let (mut q, mut k, v) = (run(Proj::Q, &n1), run(Proj::K, &n1), run(Proj::V, &n1));
            ops::rope_forward(&mut q, c.head_dim, &cos, &sin);
            ops::rope_forward(&mut k, c.head_dim, &cos, &sin);
            let (mut attn, mut lse) = (vec![0f32; q.len()], vec![0f32; t * c.num_attention_heads]);
            ops::attention_forward(&shape, &q, &k, &v, b.docs.as_deref(), &mut attn, &mut lse);
            let mut h = run(Proj::O, &attn);
            add(&mut h, &x);
            let (mut n2, mut r2) = (vec![0f32; t * hd], vec![0f32; t]);
            ops::rms_norm_forward(&h, &w.post_norm, eps, &mut n2, &mut r2);
            let (gate, up) = (run(Proj::Gate, &n2), run(Proj::Up, &n2));
            let mut act = vec![0f32; gate.len()];
            ops::swiglu_forward(&gate, &up, &mut act);
            let mut out = run(Proj::Down, &act);
            add(&mut out, &h);
            layers.push(LayerActs { x, n1, r1, q, k, v, attn, lse, h, n2, r2, gate, up, act, xa });
            x = out;
        }
        let (mut hidden, mut last_rstd) = (vec![0f32; t * hd], vec![0f32; t]);
        ops::rms_norm_forward(&x, &self.norm, eps, &mut hidden, &mut last_rstd);
        Ok(Activations { hidden, layers, last: x, last_rstd, cos, sin, dropout })
    }

    /// The backward pass from `dhidden` (the gradient of the final hidden states): adds the
    /// gradient of every LoRA tensor into `grads` (same layout as `lora`).
    pub fn backward(&self, lora: &Lora, b: &Batch, acts: &Activations, dhidden: &[f32], grads: &mut Lora) -> Result<()> {
        self.check_lora(lora)?;
        if grads.config.targets != lora.config.targets || grads.config.r != lora.config.r {
            return Err(Error::arg("grads", "the gradient buffers do not have the adapters' layout (use Lora::zeros_like)"));
        }
        let c = &self.config;
        let (t, hd) = (b.tokens(), c.hidden_size);
        if dhidden.len() != t * hd || acts.hidden.len() != t * hd {
            return Err(Error::arg("dhidden", format!("{} values, expected tokens x hidden = {}", dhidden.len(), t * hd)));
        }
        let shape = self.attn_shape(b);
        let drop = acts.dropout.as_ref();
        let mut dx = vec![0f32; t * hd];
        ops::rms_norm_backward(dhidden, &acts.last, &self.norm, &acts.last_rstd, &mut dx, None);
        for (l, (w, a)) in self.layers.iter().zip(&acts.layers).enumerate().rev() {
            // dx is d/d(layer output); the residual carries it to h and to x.
            let mut dact = vec![0f32; a.act.len()];
            self.proj_backward(l, Proj::Down, &dx, &a.act, &a.xa[Proj::Down.index()], lora, drop, grads, &mut dact);
            let (mut dgate, mut dup) = (vec![0f32; a.gate.len()], vec![0f32; a.up.len()]);
            ops::swiglu_backward(&dact, &a.gate, &a.up, &mut dgate, &mut dup);
            let mut dn2 = vec![0f32; t * hd];
            self.proj_backward(l, Proj::Gate, &dgate, &a.n2, &a.xa[Proj::Gate.index()], lora, drop, grads, &mut dn2);
            self.proj_backward(l, Proj::Up, &dup, &a.n2, &a.xa[Proj::Up.index()], lora, drop, grads, &mut dn2);
            let mut dh = vec![0f32; t * hd];
            ops::rms_norm_backward(&dn2, &a.h, &w.post_norm, &a.r2, &mut dh, None);
            add(&mut dh, &dx);
            let mut dattn = vec![0f32; a.attn.len()];
            self.proj_backward(l, Proj::O, &dh, &a.attn, &a.xa[Proj::O.index()], lora, drop, grads, &mut dattn);
            let (mut dq, mut dk, mut dv) = (vec![0f32; a.q.len()], vec![0f32; a.k.len()], vec![0f32; a.v.len()]);
            ops::attention_backward(&shape, &a.q, &a.k, &a.v, b.docs.as_deref(), &a.attn, &a.lse, &dattn, &mut dq, &mut dk, &mut dv);
            ops::rope_backward(&mut dq, c.head_dim, &acts.cos, &acts.sin);
            ops::rope_backward(&mut dk, c.head_dim, &acts.cos, &acts.sin);
            let mut dn1 = vec![0f32; t * hd];
            self.proj_backward(l, Proj::Q, &dq, &a.n1, &a.xa[Proj::Q.index()], lora, drop, grads, &mut dn1);
            self.proj_backward(l, Proj::K, &dk, &a.n1, &a.xa[Proj::K.index()], lora, drop, grads, &mut dn1);
            self.proj_backward(l, Proj::V, &dv, &a.n1, &a.xa[Proj::V.index()], lora, drop, grads, &mut dn1);
            ops::rms_norm_backward(&dn1, &a.x, &w.input_norm, &a.r1, &mut dx, None);
            add(&mut dx, &dh);
        }
        // dx is now the gradient of the (frozen) embedding output: nothing to train there.
        Ok(())
    }

    /// The LM head + cross-entropy on the final hidden states through `memlinear`'s
    /// chunked CPU path (frozen head: no dW). `normalizer` divides the summed token losses:
    /// pass the number of counted targets of the whole optimizer step (all micro-batches)
    /// so accumulated gradients equal the full batch's. Returns the loss, `d/dhidden` when
    /// `want_grad`, and the number of counted targets.
    pub fn head_loss(&self, hidden: &[f32], targets: &[i64], normalizer: f64, want_grad: bool) -> Result<(f64, Option<Vec<f32>>, usize)> {
        let (hd, v) = (self.config.hidden_size, self.config.vocab_size);
        let tokens = hidden.len() / hd;
        if targets.len() != tokens {
            return Err(Error::arg("targets", format!("{} targets for {tokens} tokens", targets.len())));
        }
        let p = Problem::new(tokens, v, Head::new(hidden, self.head_weight(), hd)).targets(targets, IGNORE_INDEX);
        let ce = losses::cross_entropy(&Default::default());
        let o = Options { reduction: Reduction::Mean(Some(normalizer)), want_dx: want_grad, want_dw: false, ..Default::default() };
        let out = memlinear::cpu::run(&p, &ce, &o)?;
        let counted = crate::batch::count_targets(targets);
        Ok((out.loss, out.dx, counted))
    }

    /// The loss of one micro-batch (forward only), normalised by `normalizer`.
    pub fn loss(&self, lora: &Lora, b: &Batch, targets: &[i64], normalizer: f64) -> Result<f64> {
        let acts = self.forward(lora, b)?;
        Ok(self.head_loss(&acts.hidden, targets, normalizer, false)?.0)
    }

    /// Forward, loss and backward of one micro-batch: adds the LoRA gradients of
    /// `loss = sum(token losses) / normalizer` into `grads`, with the LoRA dropout of this
    /// micro-step (`None`: none).
    pub fn step(&self, lora: &Lora, b: &Batch, targets: &[i64], normalizer: f64, dropout: Option<StepDropout>, grads: &mut Lora) -> Result<StepOutput> {
        let acts = self.forward_train(lora, b, dropout)?;
        let (loss, dhidden, counted) = self.head_loss(&acts.hidden, targets, normalizer, true)?;
        let dhidden = dhidden.expect("memlinear returns dx when asked");
        self.backward(lora, b, &acts, &dhidden, grads)?;
        Ok(StepOutput { loss, counted })
    }
}

fn frozen(lin: &Linear) -> Frozen<'_> {
    Frozen { w: &lin.weight, bias: lin.bias.as_deref(), in_features: lin.in_features, out_features: lin.out_features }
}

fn adapter(lora: &Lora, layer: usize, p: Proj) -> Option<Adapter<'_>> {
    lora.get(layer, p).map(|pair| Adapter { a: &pair.a, b: &pair.b, r: lora.config.r, scale: lora.config.scale() })
}

/// One projection's mask of the micro-step's dropout (`None` without dropout or `p = 0`).
fn mask(dropout: Option<&StepDropout>, layer: usize, p: Proj) -> Option<Dropout> {
    dropout.and_then(|d| d.mask(layer, p))
}

fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}

/// Checks a batch against a model configuration: lengths, token ids below the vocabulary
/// size, sequences no longer than a sliding window (shared by the CPU and GPU models).
pub(crate) fn check_batch(config: &Config, b: &Batch) -> Result<()> {
    b.validate()?;
    let v = config.vocab_size;
    if let Some(i) = b.ids.iter().position(|&id| id as usize >= v) {
        return Err(Error::arg("ids", format!("ids[{i}] = {} is outside the vocabulary [0, {v})", b.ids[i])));
    }
    if let Some(w) = config.sliding_window {
        if b.seq_len > w {
            return Err(Error::arg(
                "seq_len",
                format!("{} exceeds the model's sliding window ({w}): only full causal attention is implemented, which equals the window's only up to that length", b.seq_len),
            ));
        }
    }
    Ok(())
}

/// Checks that adapters were made for a model of this configuration.
pub(crate) fn check_lora(config: &Config, lora: &Lora) -> Result<()> {
    if lora.layers() != config.num_hidden_layers || Proj::ALL.iter().any(|&p| lora.shape(p) != p.shape(config)) {
        return Err(Error::arg("lora", "the adapters were made for a model of another shape"));
    }
    Ok(())
}
