//! Shared test helpers: a seeded generator (fresh seed per run, printed), comparisons.
#![allow(dead_code)]

pub struct Rng(u64);

impl Rng {
    /// A generator seeded from MEMLINEAR_SEED or the clock; prints the seed.
    pub fn fresh(test: &str) -> Rng {
        let seed = std::env::var("MEMLINEAR_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("{test}: MEMLINEAR_SEED={seed}");
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    /// Targets in [0, vocab) with about `ignored` of them set to -100.
    pub fn targets(&mut self, n: usize, vocab: usize, ignored: f64) -> Vec<i64> {
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
