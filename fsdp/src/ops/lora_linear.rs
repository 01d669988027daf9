//! The LoRA linear: `y = x W^T (+ b) + s * (x A^T) B^T`, `s = alpha / r`, with `W` (`[out, in]`)
//! and `b` frozen, `A` (`[r, in]`) and `B` (`[out, r]`) trained.
//!
//! The forward keeps `xa = x A^T` (`[rows, r]`, small) for the backward. Backward, with
//! `g = dy B` (`[rows, r]`):
//! `dx = dy W + s * g A`, `dB += s * dy^T xa`, `dA += s * g^T x`.
//! FLOPs per row: `2 * in * out` for the base (forward; twice that backward for dx only:
//! no dW), `2 * r * (in + out)` for the adapter. The GPU version will run the base GEMM on
//! the dequantized NF4 weight and the adapter GEMMs on fp32 A/B.
//!
//! **LoRA dropout** (PEFT's, on the adapter's input only; [`crate::dropout`]): with a mask
//! `D` over the `[rows, in]` input and `xd = D ⊙ x / (1 - p)`, the adapter reads `xd`:
//! `y = x W^T (+ b) + s * (xd A^T) B^T`, `xa = xd A^T`, and the backward is
//! `dx = dy W + D ⊙ (s * g A) / (1 - p)`, `dB += s * dy^T xa`, `dA += s * g^T xd` (`xd`
//! regenerated from `x` and the mask's seed, never stored). `None` or `p = 0` is the plain
//! computation, bit for bit.

use super::gemm::{gemm, Trans};
use crate::dropout::Dropout;

/// The frozen part: weight `[out, in]`, optional bias `[out]`.
#[derive(Clone, Copy, Debug)]
pub struct Frozen<'a> {
    /// `[out, in]`, row-major (PyTorch's `nn.Linear.weight`).
    pub w: &'a [f32],
    /// `[out]`.
    pub bias: Option<&'a [f32]>,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
}

/// The adapter: `A [r, in]`, `B [out, r]`, and the scale `alpha / r`.
#[derive(Clone, Copy, Debug)]
pub struct Adapter<'a> {
    /// `[r, in]`.
    pub a: &'a [f32],
    /// `[out, r]`.
    pub b: &'a [f32],
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
    pub scale: f32,
}

/// The adapter's gradients, accumulated into (`+=`): `da [r, in]`, `db [out, r]`.
#[derive(Debug)]
pub struct AdapterGrads<'a> {
    /// `[r, in]`.
    pub da: &'a mut [f32],
    /// `[out, r]`.
    pub db: &'a mut [f32],
}

impl Frozen<'_> {
    fn check(&self, x: &[f32]) -> usize {
        assert_eq!(self.w.len(), self.in_features * self.out_features, "lora_linear: weight length");
        assert_eq!(x.len() % self.in_features, 0, "lora_linear: x length");
        if let Some(b) = self.bias {
            assert_eq!(b.len(), self.out_features, "lora_linear: bias length");
        }
        x.len() / self.in_features
    }
}

impl Adapter<'_> {
    fn check(&self, f: &Frozen<'_>) {
        assert_eq!(self.a.len(), self.r * f.in_features, "lora_linear: A length");
        assert_eq!(self.b.len(), f.out_features * self.r, "lora_linear: B length");
    }
}

/// The dropout to apply, if any: `None` when absent or `p == 0`.
fn active(dropout: Option<&Dropout>) -> Option<&Dropout> {
    dropout.filter(|d| d.is_active())
}

/// Forward: writes `y` (`[rows, out]`) and returns `xa = xd A^T` (`[rows, r]`; empty without
/// an adapter), which the backward needs. `xd` is `x` with the adapter's `dropout` applied
/// (`x` itself without dropout or with `p = 0`); the base always reads `x`.
pub fn lora_linear_forward(x: &[f32], base: &Frozen<'_>, adapter: Option<&Adapter<'_>>, dropout: Option<&Dropout>, y: &mut [f32]) -> Vec<f32> {
    let rows = base.check(x);
    let (inf, outf) = (base.in_features, base.out_features);
    assert_eq!(y.len(), rows * outf, "lora_linear_forward: y length");
    gemm(Trans::N, Trans::T, rows, outf, inf, 1.0, x, base.w, 0.0, y);
    if let Some(b) = base.bias {
        for row in y.chunks_mut(outf) {
            row.iter_mut().zip(b).for_each(|(o, &bv)| *o += bv);
        }
    }
    let Some(ad) = adapter else { return Vec::new() };
    ad.check(base);
    let mut xa = vec![0f32; rows * ad.r];
    let xd = active(dropout).map(|d| d.apply(x));
    gemm(Trans::N, Trans::T, rows, ad.r, inf, 1.0, xd.as_deref().unwrap_or(x), ad.a, 0.0, &mut xa);
    gemm(Trans::N, Trans::T, rows, outf, ad.r, ad.scale, &xa, ad.b, 1.0, y);
    xa
}

/// Backward. Writes `dx` (`[rows, in]`, overwritten) when asked, and adds the adapter's
/// gradients into `grads` when given (both need `xa` from the forward, and the same
/// `dropout` as the forward).
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_backward(
    dy: &[f32],
    x: &[f32],
    xa: &[f32],
    base: &Frozen<'_>,
    adapter: Option<&Adapter<'_>>,
    dropout: Option<&Dropout>,
    dx: Option<&mut [f32]>,
    grads: Option<AdapterGrads<'_>>,
) {
    let rows = base.check(x);
    let (inf, outf) = (base.in_features, base.out_features);
    assert_eq!(dy.len(), rows * outf, "lora_linear_backward: dy length");
    let g = adapter.map(|ad| {
        ad.check(base);
        assert_eq!(xa.len(), rows * ad.r, "lora_linear_backward: xa length");
        let mut g = vec![0f32; rows * ad.r];
        gemm(Trans::N, Trans::N, rows, ad.r, outf, 1.0, dy, ad.b, 0.0, &mut g);
        g
    });
    if let Some(dx) = dx {
        assert_eq!(dx.len(), x.len(), "lora_linear_backward: dx length");
        gemm(Trans::N, Trans::N, rows, inf, outf, 1.0, dy, base.w, 0.0, dx);
        if let (Some(ad), Some(g)) = (adapter, g.as_ref()) {
            match active(dropout) {
                None => gemm(Trans::N, Trans::N, rows, inf, ad.r, ad.scale, g, ad.a, 1.0, dx),
                Some(d) => {
                    // dx += D ⊙ (s g A) / (1 - p)
                    let mut t = vec![0f32; dx.len()];
                    gemm(Trans::N, Trans::N, rows, inf, ad.r, ad.scale, g, ad.a, 0.0, &mut t);
                    let (th, sc) = (d.threshold(), d.scale());
                    for (i, (o, &v)) in dx.iter_mut().zip(&t).enumerate() {
                        if crate::dropout::keep(d.seed, i as u64, th) {
                            *o += v * sc;
                        }
                    }
                }
            }
        }
    }
    if let (Some(ad), Some(g), Some(gr)) = (adapter, g.as_ref(), grads) {
        assert!(gr.da.len() == ad.a.len() && gr.db.len() == ad.b.len(), "lora_linear_backward: grad lengths");
        gemm(Trans::T, Trans::N, outf, ad.r, rows, ad.scale, dy, xa, 1.0, gr.db);
        let xd = active(dropout).map(|d| d.apply(x));
        gemm(Trans::T, Trans::N, ad.r, inf, rows, ad.scale, g, xd.as_deref().unwrap_or(x), 1.0, gr.da);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, dot, nonzero};
    use crate::rng::Rng;

    fn gradcheck(seed: u64, dropout: Option<Dropout>) {
        let mut r = Rng::new(seed);
        let (rows, inf, outf, rank) = (7, 11, 9, 3);
        let x = nonzero(&mut r, rows * inf, 1.0);
        let w = nonzero(&mut r, outf * inf, 0.3);
        let bias = nonzero(&mut r, outf, 1.0);
        let a = nonzero(&mut r, rank * inf, 0.3);
        let b = nonzero(&mut r, outf * rank, 0.3);
        let c = nonzero(&mut r, rows * outf, 1.0);
        let scale = 16.0 / rank as f32;
        let base = Frozen { w: &w, bias: Some(&bias), in_features: inf, out_features: outf };
        // The mask is a fixed function of (seed, index): the forward is smooth in x, A, B.
        let run = |x: &[f32], a: &[f32], b: &[f32]| {
            let mut y = vec![f32::NAN; rows * outf];
            let xa = lora_linear_forward(x, &base, Some(&Adapter { a, b, r: rank, scale }), dropout.as_ref(), &mut y);
            (y, xa)
        };
        let (_, xa) = run(&x, &a, &b);
        let mut dx = vec![f32::NAN; x.len()];
        let (mut da, mut db) = (vec![1.0f32; a.len()], vec![1.0f32; b.len()]);
        let ad = Adapter { a: &a, b: &b, r: rank, scale };
        lora_linear_backward(&c, &x, &xa, &base, Some(&ad), dropout.as_ref(), Some(&mut dx), Some(AdapterGrads { da: &mut da, db: &mut db }));
        da.iter_mut().chain(db.iter_mut()).for_each(|g| *g -= 1.0); // accumulated onto ones
        let (h, atol, rtol) = (1e-2, 1e-3, 2e-3);
        check("dx", &x, &dx, None, h, atol, rtol, |v| dot(&c, &run(v, &a, &b).0));
        check("dA", &a, &da, None, h, atol, rtol, |v| dot(&c, &run(&x, v, &b).0));
        check("dB", &b, &db, None, h, atol, rtol, |v| dot(&c, &run(&x, &a, v).0));
    }

    #[test]
    fn backward_matches_finite_differences() {
        gradcheck(41, None);
    }

    #[test]
    fn backward_with_dropout_matches_finite_differences() {
        for (p, seed) in [(0.3, 5u64), (0.1, 6), (0.8, 7)] {
            let d = Dropout { p, seed };
            let dropped = d.mask(7 * 11).iter().filter(|&&k| !k).count();
            assert!(dropped > 0 && dropped < 77, "p {p}: the mask must drop some elements and keep others");
            gradcheck(43, Some(d));
        }
    }

    /// Dropout reaches the adapter only: `xa` is `xd A^T` exactly, the base sees `x`, and
    /// `p = 0` is bit-identical to no dropout (forward and backward).
    #[test]
    fn dropout_masks_the_adapter_input_only() {
        let mut r = Rng::new(44);
        let (rows, inf, outf, rank) = (5, 13, 6, 2);
        let x = nonzero(&mut r, rows * inf, 1.0);
        let w = nonzero(&mut r, outf * inf, 0.3);
        let (a, b) = (nonzero(&mut r, rank * inf, 0.3), nonzero(&mut r, outf * rank, 0.3));
        let dy = nonzero(&mut r, rows * outf, 1.0);
        let base = Frozen { w: &w, bias: None, in_features: inf, out_features: outf };
        let ad = Adapter { a: &a, b: &b, r: rank, scale: 2.0 };
        let run = |d: Option<&Dropout>| {
            let mut y = vec![f32::NAN; rows * outf];
            let xa = lora_linear_forward(&x, &base, Some(&ad), d, &mut y);
            let (mut dx, mut da, mut db) = (vec![f32::NAN; x.len()], vec![0f32; a.len()], vec![0f32; b.len()]);
            lora_linear_backward(&dy, &x, &xa, &base, Some(&ad), d, Some(&mut dx), Some(AdapterGrads { da: &mut da, db: &mut db }));
            (y, xa, dx, da, db)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let plain = run(None);
        let zero = run(Some(&Dropout { p: 0.0, seed: 3 }));
        for (u, v) in [(&plain.0, &zero.0), (&plain.1, &zero.1), (&plain.2, &zero.2), (&plain.3, &zero.3), (&plain.4, &zero.4)] {
            assert_eq!(bits(u), bits(v), "p = 0 must be bit-identical to no dropout");
        }
        let d = Dropout { p: 0.4, seed: 3 };
        let on = run(Some(&d));
        // xa from the dropped input
        let xd = d.apply(&x);
        let mut want = vec![0f32; rows * rank];
        gemm(Trans::N, Trans::T, rows, rank, inf, 1.0, &xd, &a, 0.0, &mut want);
        assert_eq!(bits(&on.1), bits(&want));
        assert_ne!(bits(&on.1), bits(&plain.1));
        // dx: where the mask drops, only the base's dy W remains
        let mut base_dx = vec![0f32; x.len()];
        gemm(Trans::N, Trans::N, rows, inf, outf, 1.0, &dy, &w, 0.0, &mut base_dx);
        let mask = d.mask(x.len());
        assert!(mask.iter().any(|&k| !k) && mask.iter().any(|&k| k));
        for i in 0..x.len() {
            if mask[i] {
                assert_ne!(on.2[i], base_dx[i], "kept element {i} has the adapter's term");
            } else {
                assert_eq!(on.2[i], base_dx[i], "dropped element {i}");
            }
        }
    }

    #[test]
    fn without_adapter_is_a_plain_linear() {
        let mut r = Rng::new(42);
        let (rows, inf, outf) = (3, 5, 4);
        let x = nonzero(&mut r, rows * inf, 1.0);
        let w = nonzero(&mut r, outf * inf, 1.0);
        let base = Frozen { w: &w, bias: None, in_features: inf, out_features: outf };
        let mut y = vec![f32::NAN; rows * outf];
        assert!(lora_linear_forward(&x, &base, None, None, &mut y).is_empty());
        for t in 0..rows {
            for o in 0..outf {
                let want: f32 = (0..inf).map(|i| x[t * inf + i] * w[o * inf + i]).sum();
                assert!((y[t * outf + o] - want).abs() < 1e-5);
            }
        }
        let c = nonzero(&mut r, rows * outf, 1.0);
        let mut dx = vec![f32::NAN; x.len()];
        lora_linear_backward(&c, &x, &[], &base, None, None, Some(&mut dx), None);
        check("dx", &x, &dx, None, 1e-2, 1e-4, 1e-3, |v| {
            let mut y = vec![0f32; rows * outf];
            lora_linear_forward(v, &base, None, None, &mut y);
            dot(&c, &y)
        });
    }
}
