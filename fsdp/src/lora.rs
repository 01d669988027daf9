//! LoRA adapters: configuration, fp32 weights (one buffer per tensor), PEFT's default
//! initialisation.
//!
//! Every `A` (`[r, in]`) and `B` (`[out, r]`) is its own `Vec<f32>`, so a sharded run can
//! split each on dim 0 (FSDP2's per-parameter sharding). [`Lora`] also serves as the
//! gradient container: same shapes, same order ([`Lora::zeros_like`]).
//!
//! Initialisation follows PEFT's default (`init_lora_weights=True`):
//! `A ~ kaiming_uniform(a = sqrt(5))`, i.e. `U(-1/sqrt(in), 1/sqrt(in))`, and `B = 0`, so
//! the adapted model starts equal to the base. Each `A` draws from its own stream keyed by
//! the seed and its PEFT name ([`crate::rng::Rng::for_tensor`]): the values do not depend
//! on which other projections are targeted or on sharding. They are not PyTorch's random
//! numbers (a different generator), only the same distribution.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::proj::Proj;
use crate::rng::Rng;

/// Which projections get an adapter, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter's input (PEFT's `lora_dropout`, recorded in
    /// `adapter_config.json`), in `[0, 1)`: applied by training steps only, with the masks
    /// of [`crate::dropout`]; evaluation forwards never drop.
    pub dropout: f64,
    /// The targeted projections, in [`Proj::ALL`] order, no repeats.
    pub targets: Vec<Proj>,
}

impl LoraConfig {
    /// Rank `r`, `alpha`, dropout 0, all seven projections.
    pub fn new(r: usize, alpha: f64) -> LoraConfig {
        LoraConfig { r, alpha, dropout: 0.0, targets: Proj::ALL.to_vec() }
    }

    /// The same with these targets (sorted into [`Proj::ALL`] order, repeats dropped).
    pub fn with_targets(mut self, targets: &[Proj]) -> LoraConfig {
        let mut t = targets.to_vec();
        t.sort();
        t.dedup();
        self.targets = t;
        self
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.r as f64) as f32
    }

    /// Whether `p` is targeted.
    pub fn targets(&self, p: Proj) -> bool {
        self.targets.contains(&p)
    }

    /// Checks rank, alpha, dropout (in [0, 1)) and targets.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::arg("lora.r", "the rank must be positive"));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::arg("lora.alpha", format!("{} must be positive", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::arg("lora.dropout", format!("{} is outside [0, 1)", self.dropout)));
        }
        if self.targets.is_empty() {
            return Err(Error::arg("lora.targets", "no projection is targeted"));
        }
        Ok(())
    }
}

/// One adapter's weights: `a` is `[r, in]`, `b` is `[out, r]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Vec<f32>,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Vec<f32>,
}

/// All adapters of a model (or their gradients, or optimizer moments: same layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Lora {
    /// The configuration.
    pub config: LoraConfig,
    /// `(out, in)` of each projection, indexed by [`Proj::index`].
    shapes: [(usize, usize); 7],
    /// `[layer][proj]`: `Some` for targeted projections.
    pairs: Vec<[Option<LoraPair>; 7]>,
}

impl Lora {
    /// Adapters for `model` with every tensor zero.
    pub fn zeros(model: &Config, config: LoraConfig) -> Result<Lora> {
        config.validate()?;
        let shapes = Proj::ALL.map(|p| p.shape(model));
        let r = config.r;
        let pairs = (0..model.num_hidden_layers)
            .map(|_| {
                Proj::ALL.map(|p| {
                    config.targets(p).then(|| {
                        let (o, i) = shapes[p.index()];
                        LoraPair { a: vec![0.0; r * i], b: vec![0.0; o * r] }
                    })
                })
            })
            .collect();
        Ok(Lora { config, shapes, pairs })
    }

    /// PEFT's default initialisation (see the module docs), reproducible from `seed`.
    pub fn init(model: &Config, config: LoraConfig, seed: u64) -> Result<Lora> {
        let mut l = Lora::zeros(model, config)?;
        let shapes = l.shapes;
        for (layer, projs) in l.pairs.iter_mut().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &mut projs[p.index()] {
                    let bound = 1.0 / (shapes[p.index()].1 as f64).sqrt();
                    let mut rng = Rng::for_tensor(seed, &peft_key(layer, p, "lora_A"));
                    pair.a.iter_mut().for_each(|x| *x = rng.uniform_in(-bound, bound));
                }
            }
        }
        Ok(l)
    }

    /// The same layout, all zeros (for gradients and optimizer moments).
    pub fn zeros_like(&self) -> Lora {
        let mut z = self.clone();
        z.tensors_mut().into_iter().for_each(|t| t.fill(0.0));
        z
    }

    /// Number of decoder layers.
    pub fn layers(&self) -> usize {
        self.pairs.len()
    }

    /// `(out, in)` of a projection.
    pub fn shape(&self, p: Proj) -> (usize, usize) {
        self.shapes[p.index()]
    }

    /// The adapter of one projection, if targeted.
    pub fn get(&self, layer: usize, p: Proj) -> Option<&LoraPair> {
        self.pairs.get(layer)?[p.index()].as_ref()
    }

    /// Mutable access to one adapter, if targeted.
    pub fn get_mut(&mut self, layer: usize, p: Proj) -> Option<&mut LoraPair> {
        self.pairs.get_mut(layer)?[p.index()].as_mut()
    }

    /// Every tensor with its PEFT key and shape, in a fixed order (layer, projection,
    /// A then B).
    pub fn named_tensors(&self) -> Vec<(String, [usize; 2], &[f32])> {
        let r = self.config.r;
        let mut out = Vec::new();
        for (layer, projs) in self.pairs.iter().enumerate() {
            for p in Proj::ALL {
                if let Some(pair) = &projs[p.index()] {
                    let (o, i) = self.shapes[p.index()];
                    out.push((peft_key(layer, p, "lora_A"), [r, i], &pair.a[..]));
                    out.push((peft_key(layer, p, "lora_B"), [o, r], &pair.b[..]));
                }
            }
        }
        out
    }

    /// Every tensor, in [`Lora::named_tensors`]'s order.
    pub fn tensors(&self) -> Vec<&[f32]> {
        self.pairs.iter().flat_map(|ps| ps.iter().flatten().flat_map(|p| [&p.a[..], &p.b[..]])).collect()
    }

    /// Every tensor, mutable, in [`Lora::named_tensors`]'s order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.pairs.iter_mut().flat_map(|ps| ps.iter_mut().flatten().flat_map(|p| [&mut p.a, &mut p.b])).collect()
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.tensors().iter().map(|t| t.len()).sum()
    }

    /// Sets every tensor to zero (between optimizer steps, for gradients).
    pub fn zero(&mut self) {
        self.tensors_mut().into_iter().for_each(|t| t.fill(0.0));
    }
}

/// PEFT's state-dict key of one adapter tensor: `which` is `lora_A` or `lora_B`.
pub fn peft_key(layer: usize, p: Proj, which: &str) -> String {
    format!("base_model.model.{}.{which}.weight", p.path(layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::config::tiny(32, 48, 2, 4, 2, 101)
    }

    #[test]
    fn init_is_peft_default_and_seeded() {
        let c = cfg();
        let l = Lora::init(&c, LoraConfig::new(4, 8.0), 1).unwrap();
        assert_eq!(l.named_tensors().len(), 2 * 7 * 2);
        let (name, shape, _) = &l.named_tensors()[0];
        assert_eq!(name, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        assert_eq!(shape, &[4, 32]);
        for (name, [_, i], t) in l.named_tensors() {
            if name.contains("lora_B") {
                assert!(t.iter().all(|&x| x == 0.0), "{name}");
            } else {
                let bound = 1.0 / (i as f32).sqrt();
                assert!(t.iter().all(|&x| x.abs() <= bound) && t.iter().any(|&x| x.abs() > 0.8 * bound), "{name}");
            }
        }
        assert_eq!(l, Lora::init(&c, LoraConfig::new(4, 8.0), 1).unwrap());
        assert_ne!(l, Lora::init(&c, LoraConfig::new(4, 8.0), 2).unwrap());
        // a tensor's values do not depend on the other targets
        let only_v = Lora::init(&c, LoraConfig::new(4, 8.0).with_targets(&[Proj::V]), 1).unwrap();
        assert_eq!(only_v.get(1, Proj::V), l.get(1, Proj::V));
        assert!(only_v.get(1, Proj::Q).is_none());
        assert_eq!(only_v.num_params(), 2 * (4 * 32 + 16 * 4));
    }

    #[test]
    fn invalid_configs() {
        let c = cfg();
        let e = |lc: LoraConfig| Lora::zeros(&c, lc).unwrap_err().to_string();
        assert!(e(LoraConfig::new(0, 8.0)).contains("lora.r"));
        assert!(e(LoraConfig::new(4, 0.0)).contains("lora.alpha"));
        assert!(e(LoraConfig { dropout: 1.0, ..LoraConfig::new(4, 8.0) }).contains("lora.dropout"));
        assert!(e(LoraConfig::new(4, 8.0).with_targets(&[])).contains("lora.targets"));
    }
}
