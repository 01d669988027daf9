//! AdamW on fp32 master weights, learning-rate schedules, global-norm gradient clipping.
//!
//! AdamW is `torch.optim.AdamW`'s single-tensor algorithm, operation for operation in f32:
//! `p *= 1 - lr * wd` (decoupled decay), `m = lerp(m, g, 1 - b1)`, `v = b2 v + (1 - b2) g^2`,
//! `p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. The moments have the
//! adapters' layout (one buffer per tensor), so a sharded optimizer steps on shards of
//! each. The schedules are transformers' `get_{linear,cosine}_schedule_with_warmup`.

use crate::lora::Lora;

/// AdamW hyper-parameters (defaults: PyTorch's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// `beta1`, `beta2`.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW state: first and second moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// First moments, the parameters' layout.
    pub m: Lora,
    /// Second moments.
    pub v: Lora,
    /// Steps taken.
    pub t: u64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(config: AdamWConfig, params: &Lora) -> AdamW {
        AdamW { config, m: params.zeros_like(), v: params.zeros_like(), t: 0 }
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut Lora, grads: &Lora, lr: f64) {
        self.t += 1;
        let (b1, b2) = self.config.betas;
        let t = self.t as i32;
        let decay = (1.0 - lr * self.config.weight_decay) as f32;
        let step_size = (lr / (1.0 - b1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
        let (w1, b2f, w2, eps) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32, self.config.eps as f32);
        let tensors = params.tensors_mut().into_iter().zip(grads.tensors()).zip(self.m.tensors_mut()).zip(self.v.tensors_mut());
        for (((p, g), m), v) in tensors {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *p *= decay;
                *m = lerp(*m, g, w1);
                *v = *v * b2f + w2 * g * g;
                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
            }
        }
    }
}

/// PyTorch's `lerp` (exact at both ends).
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

/// How the learning rate falls after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// Stays at the peak.
    Constant,
    /// Linearly to 0 at `total_steps`.
    Linear,
    /// Half a cosine to 0 at `total_steps`.
    Cosine,
}

/// Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then `decay`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// The learning rate at the end of warm-up.
    pub peak_lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Total optimizer steps (the decay reaches 0 there).
    pub total_steps: u64,
    /// The decay.
    pub decay: Decay,
}

impl Schedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> Schedule {
        Schedule { peak_lr: lr, warmup_steps: 0, total_steps: 0, decay: Decay::Constant }
    }

    /// The learning rate of optimizer step `step` (0-based: the first update uses
    /// `lr(0)`, which is 0 with warm-up, as in transformers).
    pub fn lr(&self, step: u64) -> f64 {
        let s = step as f64;
        if step < self.warmup_steps {
            return self.peak_lr * s / self.warmup_steps.max(1) as f64;
        }
        let progress = (s - self.warmup_steps as f64) / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        self.peak_lr * factor
    }
}

/// The global L2 norm of all gradients (accumulated in f64).
pub fn grad_norm(grads: &Lora) -> f64 {
    grads.tensors().iter().flat_map(|t| t.iter()).map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut Lora, max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef < 1.0 {
        let c = coef as f32;
        grads.tensors_mut().into_iter().for_each(|t| t.iter_mut().for_each(|g| *g *= c));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraConfig;
    use crate::proj::Proj;

    fn one_param() -> Lora {
        let c = crate::config::tiny(2, 2, 1, 1, 1, 3);
        Lora::zeros(&c, LoraConfig::new(1, 1.0).with_targets(&[Proj::Q])).unwrap()
    }

    /// Three steps against the textbook formulas in f64.
    #[test]
    fn adamw_matches_the_formula() {
        let mut p = one_param();
        p.tensors_mut()[0][0] = 0.5;
        let mut g = p.zeros_like();
        let cfg = AdamWConfig { betas: (0.8, 0.95), eps: 1e-6, weight_decay: 0.1 };
        let mut opt = AdamW::new(cfg, &p);
        let (mut x, mut m, mut v) = (0.5f64, 0.0f64, 0.0f64);
        for (t, (grad, lr)) in [(0.3f64, 0.01f64), (-1.2, 0.02), (0.7, 0.005)].into_iter().enumerate() {
            g.tensors_mut()[0][0] = grad as f32;
            opt.step(&mut p, &g, lr);
            let t = t as i32 + 1;
            x *= 1.0 - lr * 0.1;
            m = 0.8 * m + 0.2 * grad;
            v = 0.95 * v + 0.05 * grad * grad;
            x -= lr * (m / (1.0 - 0.8f64.powi(t))) / ((v / (1.0 - 0.95f64.powi(t))).sqrt() + 1e-6);
            assert!((f64::from(p.tensors()[0][0]) - x).abs() < 1e-6, "step {t}: {} vs {x}", p.tensors()[0][0]);
        }
        assert_eq!(opt.t, 3);
        // untouched entries with zero gradient only decay
        assert_eq!(p.tensors()[0][1], 0.0);
    }

    #[test]
    fn schedules() {
        let s = Schedule { peak_lr: 1.0, warmup_steps: 10, total_steps: 110, decay: Decay::Cosine };
        assert_eq!((s.lr(0), s.lr(5), s.lr(10)), (0.0, 0.5, 1.0));
        assert!((s.lr(60) - 0.5).abs() < 1e-12 && s.lr(110) < 1e-12 && s.lr(200) >= 0.0);
        let l = Schedule { decay: Decay::Linear, ..s };
        assert!((l.lr(35) - 0.75).abs() < 1e-12 && l.lr(110) == 0.0 && l.lr(500) == 0.0);
        assert_eq!(Schedule::constant(3e-4).lr(1000), 3e-4);
        let no_warmup = Schedule { warmup_steps: 0, ..l };
        assert_eq!(no_warmup.lr(0), 1.0);
    }

    #[test]
    fn clipping() {
        let mut g = one_param();
        g.tensors_mut()[0][0] = 3.0;
        g.tensors_mut()[1][0] = 4.0;
        assert!((clip_grad_norm(&mut g, 10.0) - 5.0).abs() < 1e-9);
        assert_eq!(g.tensors()[0][0], 3.0); // under the limit: unchanged
        assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
    }
}
