//! Test support: central finite differences of a scalar function of f32 inputs, the
//! function evaluated in f32 and accumulated in f64.

use crate::rng::Rng;

/// `sum_i c[i] * y[i]` in f64: the scalar whose gradient w.r.t. `y` is `c`.
pub fn dot(c: &[f32], y: &[f32]) -> f64 {
    assert_eq!(c.len(), y.len());
    c.iter().zip(y).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()
}

/// Random values that are never zero (|x| >= 0.1), with random signs.
pub fn nonzero(r: &mut Rng, n: usize, scale: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let x = r.normal() * scale;
            let min = 0.1 * scale;
            (if x.abs() < min { min.copysign(x) } else { x }) as f32
        })
        .collect()
}

/// Compares `analytic[i]` with `(f(x + h e_i) - f(x - h e_i)) / (2h)` for the indices
/// `idx` (all of them when `None`), with `|fd - an| <= atol + rtol * max(|fd|, |an|)`.
/// The step actually taken (after rounding to f32) is the divisor.
#[allow(clippy::too_many_arguments)]
pub fn check(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    idx: Option<&[usize]>,
    h: f32,
    atol: f64,
    rtol: f64,
    f: impl Fn(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let all: Vec<usize> = (0..x.len()).collect();
    let idx = idx.unwrap_or(&all);
    let mut xs = x.to_vec();
    let mut worst = (0.0f64, 0usize, 0.0, 0.0);
    for &i in idx {
        let x0 = xs[i];
        let (xp, xm) = (x0 + h, x0 - h);
        xs[i] = xp;
        let fp = f(&xs);
        xs[i] = xm;
        let fm = f(&xs);
        xs[i] = x0;
        let fd = (fp - fm) / (f64::from(xp) - f64::from(xm));
        let an = f64::from(analytic[i]);
        let err = (fd - an).abs() / (atol + rtol * fd.abs().max(an.abs()));
        if err > worst.0 {
            worst = (err, i, fd, an);
        }
    }
    let (err, i, fd, an) = worst;
    assert!(err <= 1.0, "{what}[{i}]: finite difference {fd:.6e} vs analytic {an:.6e} (error {err:.2} x tolerance)");
}
