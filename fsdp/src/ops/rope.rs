//! Rotary position embedding, HF Llama's "rotate half" convention, with Llama 3 frequency
//! scaling.
//!
//! For a head vector `x` of width `d` and `i < d/2`, with `a = pos * inv_freq[i]`:
//! `y[i] = x[i] cos a - x[i + d/2] sin a`, `y[i + d/2] = x[i + d/2] cos a + x[i] sin a`
//! (`q * cos + rotate_half(q) * sin`). The backward is the rotation by `-a`.
//!
//! Precision mirrors transformers: `inv_freq` is computed in f32 (`1 / theta^(2i/d)`, then
//! the Llama 3 rescaling in f32), the angle `pos * inv_freq` is rounded to f32 (as its f32
//! matmul does), and only then is cos/sin taken. At position 100k that angle carries an
//! f32 rounding error of ~4e-3 radians: that is the model's behaviour, so the GPU kernel
//! must compute the angle the same way, not in higher precision.

use rayon::prelude::*;

use crate::config::{Config, Llama3Scaling};

/// Per-pair inverse frequencies of one head.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Head width (even).
    pub head_dim: usize,
    /// `[head_dim / 2]`.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// The frequencies of a model.
    pub fn new(cfg: &Config) -> Rope {
        Rope::with_params(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref())
    }

    /// From head width, base and optional Llama 3 scaling (as transformers'
    /// `_compute_default_rope_parameters` and `_compute_llama3_parameters`).
    pub fn with_params(head_dim: usize, theta: f64, scaling: Option<&Llama3Scaling>) -> Rope {
        assert!(head_dim % 2 == 0 && head_dim > 0, "head_dim must be positive and even");
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        if let Some(s) = scaling {
            let factor = s.factor as f32;
            let (low, high) = (s.low_freq_factor as f32, s.high_freq_factor as f32);
            let old_len = s.original_max_position_embeddings as f32;
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen > low_freq_wavelen {
                    *f / factor // long wavelengths: slowed down by the factor
                } else if wavelen < high_freq_wavelen {
                    *f // short wavelengths: unchanged
                } else {
                    let smooth = (old_len / wavelen - low) / (high - low);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        Rope { head_dim, inv_freq }
    }

    /// `cos` and `sin` of every token's angles, each `[positions.len(), head_dim / 2]`.
    pub fn cos_sin(&self, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let mut cos = vec![0f32; positions.len() * half];
        let mut sin = vec![0f32; positions.len() * half];
        cos.par_chunks_mut(half).zip(sin.par_chunks_mut(half)).zip(positions.par_iter()).for_each(|((c, s), &p)| {
            for ((c, s), &f) in c.iter_mut().zip(s.iter_mut()).zip(&self.inv_freq) {
                let angle = f64::from(p as f32 * f); // rounded to f32 first, as transformers does
                *c = angle.cos() as f32;
                *s = angle.sin() as f32;
            }
        });
        (cos, sin)
    }
}

/// Rotates `x` (`[tokens, heads * head_dim]`) in place by each token's angles (`cos`, `sin`
/// from [`Rope::cos_sin`]); `inverse` rotates by the negative angles.
fn rotate(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = head_dim / 2;
    let tokens = cos.len() / half;
    assert!(tokens > 0 || x.is_empty(), "rope: no angles");
    assert!(x.len() % (tokens.max(1) * head_dim) == 0 && sin.len() == cos.len(), "rope: lengths");
    let width = x.len() / tokens.max(1);
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for head in row.chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2, si) = (a[i], b[i], sign * s[i]);
                a[i] = x1 * c[i] - x2 * si;
                b[i] = x2 * c[i] + x1 * si;
            }
        }
    });
}

/// Forward, in place: `x` is `[tokens, heads * head_dim]` (q or k after its projection).
pub fn rope_forward(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    rotate(x, head_dim, cos, sin, false);
}

/// Backward, in place: turns `dy` into `dx` (the transpose of a rotation is the rotation
/// by the opposite angle).
pub fn rope_backward(dy: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    rotate(dy, head_dim, cos, sin, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, dot, nonzero};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = Rng::new(9);
        let (tokens, heads, d) = (5, 3, 6);
        let rope = Rope::with_params(d, 10000.0, None);
        let pos = [0u32, 7, 3, 1000, 42];
        let (cos, sin) = rope.cos_sin(&pos);
        let x = nonzero(&mut r, tokens * heads * d, 1.0);
        let c = nonzero(&mut r, x.len(), 1.0);
        let mut dx = c.clone();
        rope_backward(&mut dx, d, &cos, &sin);
        check("dx", &x, &dx, None, 1e-2, 1e-4, 1e-3, |xp| {
            let mut y = xp.to_vec();
            rope_forward(&mut y, d, &cos, &sin);
            dot(&c, &y)
        });
    }

    #[test]
    fn position_zero_is_identity_and_pairs_rotate() {
        let rope = Rope::with_params(4, 10000.0, None);
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let (cos, sin) = rope.cos_sin(&[0, 1]);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        rope_forward(&mut x, 4, &cos, &sin);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        // token 1, pair 0 is (x[0], x[2]) = (1, 3) rotated by 1 radian
        let (c1, s1) = (1f64.cos(), 1f64.sin());
        assert!((x[4] as f64 - (c1 - 3.0 * s1)).abs() < 1e-6);
        assert!((x[6] as f64 - (3.0 * c1 + s1)).abs() < 1e-6);
    }

    /// Llama 3.1/3.2's scaling (theta 500000, factor 32, 1/4, 8192) on head_dim 64, checked
    /// against the rule written out in f64: low frequencies divided by 32, high ones kept,
    /// the band between interpolated; and five values computed by numpy in float32 with
    /// transformers' formula.
    #[test]
    fn llama3_scaling() {
        let s = Llama3Scaling { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
        let plain = Rope::with_params(64, 500000.0, None);
        let scaled = Rope::with_params(64, 500000.0, Some(&s));
        let (mut kept, mut divided, mut mixed) = (0, 0, 0);
        for (i, (&p, &q)) in plain.inv_freq.iter().zip(&scaled.inv_freq).enumerate() {
            let wavelen = std::f64::consts::TAU / p as f64;
            let want = if wavelen < 8192.0 / 4.0 {
                kept += 1;
                p as f64
            } else if wavelen > 8192.0 {
                divided += 1;
                p as f64 / 32.0
            } else {
                mixed += 1;
                let sm = (8192.0 / wavelen - 1.0) / 3.0;
                (1.0 - sm) * p as f64 / 32.0 + sm * p as f64
            };
            assert!((q as f64 - want).abs() <= 2e-7 * want, "inv_freq[{i}] = {q}, want {want}");
        }
        assert!(kept > 0 && divided > 0 && mixed > 0, "{kept} {divided} {mixed}");
        // numpy float32: 1/500000**(2i/64) then the llama3 rule (16 is in the mixed band)
        for (i, want) in [(0, 1.0f64), (13, 4.839_421_25e-3), (16, 4.295_567_05e-4), (20, 8.570_255_89e-6), (31, 9.418_306_49e-8)] {
            let got = f64::from(scaled.inv_freq[i]);
            assert!(((got - want) / want).abs() < 1e-6, "inv_freq[{i}] = {got:e}, numpy {want:e}");
        }
    }
}
