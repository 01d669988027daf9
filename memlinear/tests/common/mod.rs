//! Shared test helpers: nf4's seeded generator (fresh seed per run, printed; replay with
//! NF4_TEST_SEED) with the two draws these tests add, and comparisons.
#![allow(dead_code)]

pub mod device;

pub use nf4::testing::Rng;

/// Draws these tests need beyond nf4's generator.
pub trait Draws {
    /// `n` normal values times `scale`.
    fn normals(&mut self, n: usize, scale: f64) -> Vec<f32>;
    /// Targets in [0, vocab) with about `ignored` of them set to -100.
    fn targets(&mut self, n: usize, vocab: usize, ignored: f64) -> Vec<i64>;
}

impl Draws for Rng {
    fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.normal_vec(n, scale)
    }
    fn targets(&mut self, n: usize, vocab: usize, ignored: f64) -> Vec<i64> {
        (0..n).map(|_| if self.uniform() < ignored { -100 } else { self.below(vocab) as i64 }).collect()
    }
}

/// ||a - b|| / ||b|| (0 when both are 0).
pub fn rel_norm(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.into_iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}
