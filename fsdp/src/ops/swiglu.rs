//! SwiGLU: `h = silu(gate) * up`, `silu(g) = g * sigmoid(g)`.
//!
//! Backward: `dgate = dh * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))`,
//! `dup = dh * silu(g)`. Elementwise: reads 2 (forward) or 3 (backward) floats per element,
//! writes 1 or 2.

use rayon::prelude::*;

const GRAIN: usize = 4096;

#[inline]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// Forward: `out = silu(gate) * up`, all the same length.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len(), "swiglu_forward: lengths");
    out.par_chunks_mut(GRAIN).zip(gate.par_chunks(GRAIN)).zip(up.par_chunks(GRAIN)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
}

/// Backward: writes `dgate` and `dup` (overwritten).
pub fn swiglu_backward(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = dout.len();
    assert!(gate.len() == n && up.len() == n && dgate.len() == n && dup.len() == n, "swiglu_backward: lengths");
    dgate.par_chunks_mut(GRAIN).zip(dup.par_chunks_mut(GRAIN)).enumerate().for_each(|(c, (dg, du))| {
        let at = c * GRAIN;
        for (i, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
            let (d, g, u) = (dout[at + i], gate[at + i], up[at + i]);
            let s = sigmoid(g);
            *dg = d * u * s * (1.0 + g * (1.0 - s));
            *du = d * g * s;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, dot, nonzero};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut r = Rng::new(31);
        let n = 4099; // crosses a GRAIN boundary
        let g = nonzero(&mut r, n, 2.0);
        let u = nonzero(&mut r, n, 1.0);
        let c = nonzero(&mut r, n, 1.0);
        let run = |g: &[f32], u: &[f32]| {
            let mut o = vec![f32::NAN; n];
            swiglu_forward(g, u, &mut o);
            dot(&c, &o)
        };
        let (mut dg, mut du) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        swiglu_backward(&c, &g, &u, &mut dg, &mut du);
        let idx: Vec<usize> = (0..64).map(|_| r.below(n)).chain([0, 4095, 4096, 4098]).collect();
        check("dgate", &g, &dg, Some(&idx), 1e-2, 1e-3, 3e-3, |x| run(x, &u));
        check("dup", &u, &du, Some(&idx), 1e-2, 1e-3, 3e-3, |x| run(&g, x));
    }
}
