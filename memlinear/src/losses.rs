//! The built-in losses, each written as its forward only (gradients are derived).
//!
//! Every loss here is an ordinary [`Loss`]: nothing in the chunked op knows them by name.

use crate::expr::{Expr, Loss, LossBuilder};

/// Options of [`cross_entropy`]. `Default` is plain cross-entropy.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropy {
    /// Label smoothing epsilon in [0, 1): (1-eps) * nll + eps * mean over classes of -log p
    /// (PyTorch's definition).
    pub label_smoothing: f64,
    /// z-loss coefficient: adds `z_loss * logsumexp(z)^2` (PaLM).
    pub z_loss: f64,
    /// Logit soft-capping (Gemma 2): z -> cap * tanh(z / cap). `None`: off.
    pub softcap: Option<f64>,
    /// Multiplies the logits before anything else (Cohere's logit_scale). 1 = off.
    pub logit_scale: f64,
    /// Per-class weights (PyTorch's `weight=`), bound as the class parameter
    /// `"class_weight"`. With weights, PyTorch's `mean` divides by the sum of the weights of
    /// the non-ignored targets: pass that as the normalizer.
    pub class_weights: bool,
}

impl Default for CrossEntropy {
    fn default() -> Self {
        CrossEntropy { label_smoothing: 0.0, z_loss: 0.0, softcap: None, logit_scale: 1.0, class_weights: false }
    }
}

/// The logits after `logit_scale` and `softcap`.
fn transformed<'b>(b: &'b LossBuilder, scale: f64, softcap: Option<f64>) -> Expr<'b> {
    let mut z = b.logits();
    if scale != 1.0 {
        z = z * scale;
    }
    if let Some(c) = softcap {
        z = z.softcap(c);
    }
    z
}

/// Cross-entropy with the options of [`CrossEntropy`].
pub fn cross_entropy(o: &CrossEntropy) -> Loss {
    let o = o.clone();
    Loss::new("cross_entropy", move |b| {
        let z = transformed(b, o.logit_scale, o.softcap);
        let lse = z.logsumexp();
        let eps = o.label_smoothing;
        let mut loss = if o.class_weights {
            let w = b.class_param("class_weight");
            let nll = (lse - z.at_target()) * w.at_target();
            if eps != 0.0 {
                (1.0 - eps) * nll + (eps / 1.0) * (w * (lse - z)).sum() / b.vocab_size()
            } else {
                nll
            }
        } else {
            let nll = lse - z.at_target();
            if eps != 0.0 {
                (1.0 - eps) * nll + eps * (lse - z.mean())
            } else {
                nll
            }
        };
        if o.z_loss != 0.0 {
            loss = loss + o.z_loss * lse.square();
        }
        loss
    })
    .expect("cross_entropy is a well-formed loss")
}

/// Which divergence [`distillation`] computes between teacher T and student S
/// distributions (both at the same temperature).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// KL(T || S) = sum T (log T - log S): the usual distillation loss.
    ForwardKl,
    /// KL(S || T).
    ReverseKl,
    /// Generalized Jensen-Shannon with weight `beta` in (0, 1): with M = beta T + (1-beta) S,
    /// beta KL(T || M) + (1-beta) KL(S || M).
    Jsd {
        /// Weight of the teacher in the mixture.
        beta: f64,
    },
}

/// Distillation against a teacher head: the divergence between softmax(teacher /
/// temperature) and softmax(student / temperature), per token.
pub fn distillation(div: Divergence, temperature: f64) -> Loss {
    Loss::new("distillation", move |b| {
        let s = (b.logits() / temperature).log_softmax();
        let t = (b.teacher() / temperature).log_softmax();
        match div {
            Divergence::ForwardKl => (t.exp() * (t - s)).sum(),
            Divergence::ReverseKl => (s.exp() * (s - t)).sum(),
            Divergence::Jsd { beta } => {
                let m = (beta * t.exp() + (1.0 - beta) * s.exp()).ln();
                beta * (t.exp() * (t - m)).sum() + (1.0 - beta) * (s.exp() * (s - m)).sum()
            }
        }
    })
    .expect("distillation is a well-formed loss")
}

/// Options of [`policy`].
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Lower clip: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    pub clip_low: f64,
    /// Upper clip.
    pub clip_high: f64,
    /// Sampling temperature the log-probabilities are taken at.
    pub temperature: f64,
    /// Coefficient of the k3 KL penalty against a reference policy's per-token
    /// log-probability (token parameter `"ref_logprob"`); 0 = off.
    pub kl_beta: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { clip_low: 0.2, clip_high: 0.2, temperature: 1.0, kl_beta: 0.0 }
    }
}

/// A clipped per-token policy-gradient loss (PPO / GRPO): with logp the log-probability
/// of the taken token (the target), ratio = exp(logp - old_logprob),
/// loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
/// (+ kl_beta * (exp(r - logp) - (r - logp) - 1) with r = ref_logprob).
/// Token parameters: `"advantage"`, `"old_logprob"` (and `"ref_logprob"` with kl_beta).
pub fn policy(o: &Policy) -> Loss {
    let o = o.clone();
    Loss::new("policy", move |b| {
        let logp = (b.logits() / o.temperature).log_softmax().at_target();
        let adv = b.token_param("advantage");
        let old = b.token_param("old_logprob");
        let ratio = (logp - old).exp();
        let clipped = ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high);
        let mut loss = -((ratio * adv).min(clipped * adv));
        if o.kl_beta != 0.0 {
            let d = b.token_param("ref_logprob") - logp;
            loss = loss + o.kl_beta * (d.exp() - d - 1.0);
        }
        loss
    })
    .expect("policy is a well-formed loss")
}
