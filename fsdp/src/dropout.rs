//! LoRA dropout masks: a counter-based hash, the same function on the CPU (here) and on
//! the GPU (`gpu/linear.cu`, `dropout_keep`), so a GPU run draws exactly the CPU's masks and
//! the two can be compared step by step.
//!
//! # The mask
//!
//! PEFT applies `nn.Dropout(p)` to each LoRA module's input: `xd = D ⊙ x / (1 - p)` with
//! `D` a 0/1 keep mask over the `[rows, in]` input, `P(keep) = 1 - p`; the base path sees
//! `x` unchanged. Here element `index = row * in + col` of one adapter call is kept iff
//!
//! ```text
//! mix64(z) = z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^ (z >> 31)
//! keep(seed, index, p) = (mix64(seed ^ index * 0x9E3779B97F4A7C15) >> 32) >= round(p * 2^32)
//! ```
//!
//! (64-bit wrapping arithmetic; `mix64` is SplitMix64's finalizer, and
//! `seed ^ index * golden` walks a Weyl sequence as SplitMix64 does). The top 32 bits are
//! compared with the threshold `round(p * 2^32)` (a `u64`, so `p` close to 1 may drop
//! everything), which makes `P(keep) = 1 - threshold / 2^32`, within `2^-33` of `1 - p`.
//! A kept element is `x * scale`, `scale = (1 / (1 - p))` computed in f64 and rounded to
//! f32 once, the product in f32 (the GPU then rounds it to the compute dtype).
//! `p = 0` means no dropout at all: every call site skips the mask (bit-identical to a run
//! without dropout).
//!
//! # Seeds
//!
//! Every (optimizer step, micro-batch, layer, projection) draws its own mask, so `q`, `k`
//! and `v` of a fused group get independent masks (each LoRA module has its own dropout,
//! as in PEFT), and each micro-step new ones:
//!
//! ```text
//! absorb(h, v)  = mix64((h + 0x9E3779B97F4A7C15) ^ v)
//! step_seed     = absorb(absorb(absorb(0x6C6F_7261_2D64_726F, run_seed), step), micro)
//! mask_seed     = absorb(absorb(step_seed, layer), proj.index())
//! ```
//!
//! `run_seed` is [`crate::train::TrainConfig::dropout_seed`], `step` the optimizer step
//! (0-based, [`crate::train::Trainer::step`]), `micro` the micro-batch's index within that
//! step. Each `absorb` is a bijection of `v` for a fixed `h`. Both trainers derive their
//! seeds through [`StepDropout::new`] and [`StepDropout::mask`]; only `keep` exists twice.

use crate::proj::Proj;

/// The golden-ratio increment of SplitMix64 (`2^64 / phi`, odd).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Domain tag of the seed chain (ASCII "lora-dro").
const DOMAIN: u64 = 0x6C6F_7261_2D64_726F;

/// SplitMix64's finalizer: a bijection of `u64` with full avalanche.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 32 random bits of element `index` under `seed` (see the module docs).
pub fn hash32(seed: u64, index: u64) -> u32 {
    (mix64(seed ^ index.wrapping_mul(GOLDEN)) >> 32) as u32
}

/// `round(p * 2^32)`: an element is kept when its [`hash32`] is at least this.
///
/// # Panics
/// When `p` is not in `[0, 1)`.
pub fn threshold(p: f64) -> u64 {
    assert!((0.0..1.0).contains(&p), "dropout probability {p} is outside [0, 1)");
    (p * 4_294_967_296.0).round() as u64
}

/// Whether element `index` survives under `seed` and `threshold` (see [`threshold`]).
pub fn keep(seed: u64, index: u64, threshold: u64) -> bool {
    u64::from(hash32(seed, index)) >= threshold
}

fn absorb(h: u64, v: u64) -> u64 {
    mix64(h.wrapping_add(GOLDEN) ^ v)
}

/// The dropout of one adapter call (one projection, one micro-step): the drop probability
/// and the seed of its mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Drop probability, in `[0, 1)`; 0 disables the mask.
    pub p: f64,
    /// The mask's seed (usually [`StepDropout::mask`]'s).
    pub seed: u64,
}

impl Dropout {
    /// Whether it drops anything (`p > 0`).
    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// The keep threshold ([`threshold`]).
    pub fn threshold(&self) -> u64 {
        threshold(self.p)
    }

    /// `1 / (1 - p)` rounded to f32: the factor of a kept element.
    pub fn scale(&self) -> f32 {
        (1.0 / (1.0 - self.p)) as f32
    }

    /// Whether element `index` (`row * in + col`) is kept.
    pub fn keep(&self, index: u64) -> bool {
        keep(self.seed, index, self.threshold())
    }

    /// The mask over `n` elements starting at element 0.
    pub fn mask(&self, n: usize) -> Vec<bool> {
        let t = self.threshold();
        (0..n as u64).map(|i| keep(self.seed, i, t)).collect()
    }

    /// `xd = D ⊙ x * scale` over a row-major `[rows, in]` input (element `i` of `x` has
    /// index `i`): kept elements are `x * scale` (one f32 product), dropped ones `0`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let (t, s) = (self.threshold(), self.scale());
        x.iter().enumerate().map(|(i, &v)| if keep(self.seed, i as u64, t) { v * s } else { 0.0 }).collect()
    }
}

/// The LoRA dropout of one micro-step: the probability and the micro-step's seed, from
/// which every (layer, projection) derives its own mask ([`StepDropout::mask`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepDropout {
    /// Drop probability, in `[0, 1)`.
    pub p: f64,
    /// The micro-step's seed ([`step_seed`]).
    pub seed: u64,
}

impl StepDropout {
    /// The dropout of micro-batch `micro` of optimizer step `step` in a run seeded
    /// `run_seed`; `None` when `p == 0` (no dropout: nothing is masked).
    pub fn new(p: f64, run_seed: u64, step: u64, micro: u64) -> Option<StepDropout> {
        (p != 0.0).then(|| StepDropout { p, seed: step_seed(run_seed, step, micro) })
    }

    /// The mask of one projection of one layer; `None` when `p == 0`.
    pub fn mask(&self, layer: usize, proj: Proj) -> Option<Dropout> {
        (self.p != 0.0).then(|| Dropout { p: self.p, seed: mask_seed(self.seed, layer, proj) })
    }
}

/// The seed of micro-batch `micro` of optimizer step `step` (see the module docs).
pub fn step_seed(run_seed: u64, step: u64, micro: u64) -> u64 {
    absorb(absorb(absorb(DOMAIN, run_seed), step), micro)
}

/// The seed of one projection's mask within a micro-step (see the module docs).
pub fn mask_seed(step_seed: u64, layer: usize, proj: Proj) -> u64 {
    absorb(absorb(step_seed, layer as u64), proj.index() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers, computed independently (Python, from the formula in the module
    /// docs): the Rust and CUDA versions are pinned to the documented function.
    #[test]
    fn hash_matches_the_documented_formula() {
        assert_eq!(hash32(0, 0), 0);
        assert_eq!(hash32(0, 1), 0xe220_a839);
        assert_eq!(hash32(1, 0), 0x5692_161d);
        assert_eq!(hash32(0x0123_4567_89ab_cdef, 5), 0xac3d_49a6);
        assert_eq!(hash32(0xdead_beef, (1 << 33) + 7), 0x5537_fe86);
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(0.25), 1 << 30);
        assert_eq!(threshold(0.1), 429_496_730); // 429496729.6 rounded
        assert_eq!(threshold(1.0 - 1e-12), 1 << 32); // drops everything
    }

    #[test]
    fn keep_fraction_and_scaling() {
        let n = 1 << 20;
        let x = vec![1.5f32; n];
        for (p, seed) in [(0.1, 1u64), (0.5, 2), (0.05, 0xffff_ffff_ffff_ffff), (0.9, 3)] {
            let d = Dropout { p, seed };
            let xd = d.apply(&x);
            let kept = xd.iter().filter(|&&v| v != 0.0).count();
            let frac = kept as f64 / n as f64;
            let sigma = (p * (1.0 - p) / n as f64).sqrt();
            assert!((frac - (1.0 - p)).abs() < 5.0 * sigma, "p {p}: kept {frac}, expected {}", 1.0 - p);
            // kept elements are exactly x * scale, so E[xd] = x
            assert!(xd.iter().all(|&v| v == 0.0 || v == 1.5 * d.scale()));
            let mean: f64 = xd.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            assert!((mean - 1.5).abs() < 1.5 * 5.0 * sigma / (1.0 - p), "p {p}: mean {mean}");
            assert_eq!(d.mask(n), xd.iter().map(|&v| v != 0.0).collect::<Vec<_>>());
            // no long-range structure: each quarter keeps its share too
            for q in xd.chunks(n / 4) {
                let f = q.iter().filter(|&&v| v != 0.0).count() as f64 / q.len() as f64;
                assert!((f - (1.0 - p)).abs() < 10.0 * sigma);
            }
        }
        assert_eq!(Dropout { p: 0.5, seed: 0 }.scale(), 2.0);
        assert!(!Dropout { p: 0.0, seed: 9 }.is_active());
        assert!(Dropout { p: 0.0, seed: 9 }.mask(1000).iter().all(|&k| k));
    }

    /// Masks of different micro-steps, layers and projections are independent: two of them
    /// agree on a fraction `(1-p)^2 + p^2` of the elements, not more.
    #[test]
    fn seeds_differ_by_step_micro_layer_and_projection() {
        let p = 0.3;
        let n = 1 << 16;
        let m = |d: Option<Dropout>| d.unwrap().mask(n);
        let s00 = StepDropout::new(p, 7, 0, 0).unwrap();
        let masks = [
            m(s00.mask(0, Proj::Q)),
            m(s00.mask(0, Proj::K)),
            m(s00.mask(0, Proj::V)),
            m(s00.mask(1, Proj::Q)),
            m(StepDropout::new(p, 7, 1, 0).unwrap().mask(0, Proj::Q)),
            m(StepDropout::new(p, 7, 0, 1).unwrap().mask(0, Proj::Q)),
            m(StepDropout::new(p, 8, 0, 0).unwrap().mask(0, Proj::Q)),
        ];
        let want = (1.0 - p) * (1.0 - p) + p * p;
        let sigma = (want * (1.0 - want) / n as f64).sqrt();
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                let agree = masks[i].iter().zip(&masks[j]).filter(|(a, b)| a == b).count() as f64 / n as f64;
                assert!((agree - want).abs() < 6.0 * sigma, "masks {i} and {j} agree on {agree}, independent ones on {want}");
            }
        }
        // the same (step, micro, layer, projection) gives the same mask
        assert_eq!(m(StepDropout::new(p, 7, 0, 0).unwrap().mask(0, Proj::Q)), masks[0]);
        assert!(StepDropout::new(0.0, 7, 0, 0).is_none());
        assert!(StepDropout { p: 0.0, seed: 1 }.mask(0, Proj::Q).is_none());
    }
}
