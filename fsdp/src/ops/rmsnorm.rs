//! RMSNorm as HF Llama computes it: `y = w * (x * rstd)`, `rstd = 1 / sqrt(mean(x^2) + eps)`
//! per row.
//!
//! Backward, with `xhat = x * rstd` and `g = dy * w`:
//! `dx = rstd * (g - xhat * mean(g * xhat))`, `dw = sum over rows of dy * xhat`.
//! Bytes per row: forward reads x and w, writes y (+ one rstd); backward reads dy, x, w,
//! rstd, writes dx. Reductions are accumulated in f64 here (the reference); the GPU kernel
//! will accumulate in f32 and is compared within tolerance.

use rayon::prelude::*;

/// Forward. `x`, `y`: `[rows, hidden]` with `hidden = w.len()`; `rstd`: `[rows]` (saved for
/// the backward).
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let h = w.len();
    assert!(x.len() == y.len() && x.len() == rstd.len() * h, "rms_norm_forward: lengths");
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), rs)| {
        let ms = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / h as f64;
        let r = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
        *rs = r;
        for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * r);
        }
    });
}

/// Backward. Writes `dx` (`[rows, hidden]`, overwritten) and, when given, adds the weight's
/// gradient into `dw` (`[hidden]`, accumulated).
pub fn rms_norm_backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: Option<&mut [f32]>) {
    let h = w.len();
    assert!(x.len() == dy.len() && x.len() == dx.len() && x.len() == rstd.len() * h, "rms_norm_backward: lengths");
    dx.par_chunks_mut(h).zip(dy.par_chunks(h)).zip(x.par_chunks(h)).zip(rstd.par_iter()).for_each(|(((dxr, dyr), xr), &r)| {
        let r64 = f64::from(r);
        let mean_gx: f64 =
            dyr.iter().zip(w).zip(xr).map(|((&d, &wv), &xv)| f64::from(d) * f64::from(wv) * f64::from(xv) * r64).sum::<f64>() / h as f64;
        for (((o, &d), &wv), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            let xhat = f64::from(xv) * r64;
            *o = (r64 * (f64::from(d) * f64::from(wv) - xhat * mean_gx)) as f32;
        }
    });
    if let Some(dw) = dw {
        assert_eq!(dw.len(), h, "rms_norm_backward: dw length");
        let acc = dy
            .par_chunks(h)
            .zip(x.par_chunks(h))
            .zip(rstd.par_iter())
            .fold(
                || vec![0f64; h],
                |mut acc, ((dyr, xr), &r)| {
                    for ((a, &d), &xv) in acc.iter_mut().zip(dyr).zip(xr) {
                        *a += f64::from(d) * f64::from(xv * r);
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f64; h],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        for (d, a) in dw.iter_mut().zip(acc) {
            *d += a as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, dot, nonzero};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = Rng::new(5);
        let (rows, h, eps) = (5, 13, 1e-5);
        let x = nonzero(&mut r, rows * h, 1.0);
        let w = nonzero(&mut r, h, 1.0);
        let c = nonzero(&mut r, rows * h, 1.0);
        let run = |x: &[f32], w: &[f32]| {
            let mut y = vec![f32::NAN; rows * h];
            let mut rs = vec![f32::NAN; rows];
            rms_norm_forward(x, w, eps, &mut y, &mut rs);
            (y, rs)
        };
        let (_, rs) = run(&x, &w);
        let mut dx = vec![f32::NAN; rows * h];
        let mut dw = vec![0.5f32; h];
        rms_norm_backward(&c, &x, &w, &rs, &mut dx, Some(&mut dw));
        dw.iter_mut().for_each(|d| *d -= 0.5);
        check("dx", &x, &dx, None, 1e-2, 2e-4, 2e-3, |xp| dot(&c, &run(xp, &w).0));
        check("dw", &w, &dw, None, 1e-2, 2e-4, 2e-3, |wp| dot(&c, &run(&x, wp).0));
    }

    #[test]
    fn forward_normalises() {
        let x = [3.0f32, 4.0];
        let (mut y, mut rs) = ([0f32; 2], [0f32; 1]);
        rms_norm_forward(&x, &[1.0, 2.0], 0.0, &mut y, &mut rs);
        let s = (12.5f64).sqrt();
        assert!((y[0] as f64 - 3.0 / s).abs() < 1e-6 && (y[1] as f64 - 8.0 / s).abs() < 1e-6);
    }
}
