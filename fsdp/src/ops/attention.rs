//! Causal grouped-query attention, naive (full `L x L` scores per head), f32 GEMMs.
//!
//! `q`: `[tokens, heads * d]`, `k`, `v`: `[tokens, kv_heads * d]`, `tokens = seqs * seq_len`
//! (sequence-major). Query head `h` reads key/value head `h / (heads / kv_heads)` (HF's
//! `repeat_kv`). Token `i` of a sequence attends to token `j` of the same sequence iff
//! `j <= i` and, with document ids, `docs[j] == docs[i]` (packed sequences: each document
//! sees only itself). Scores are `q.k / sqrt(d)`.
//!
//! The forward also returns each row's log-sum-exp, `lse[t, h]`, and the backward
//! recomputes the probabilities from it (`p = exp(s - lse)`) rather than storing them: the
//! same contract as a flash-attention kernel, so the GPU kernel's `lse` can be compared
//! with this one. Backward: `dp = do v^T`, `ds = p (dp - rowsum(do * o))`,
//! `dq = ds k / sqrt(d)`, `dk = ds^T q / sqrt(d)` and `dv = p^T do` summed over the heads
//! of a group.
//!
//! FLOPs: `4 * seqs * heads * seq_len^2 * d` forward (masked half included), twice that
//! backward. Memory: one `L x L` f32 score block per worker.

use rayon::prelude::*;

use super::gemm::{gemm, Trans};

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequences (batch rows).
    pub seqs: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
}

impl AttnShape {
    fn tokens(&self) -> usize {
        self.seqs * self.seq_len
    }
    fn check(&self, q: &[f32], k: &[f32], v: &[f32], docs: Option<&[u32]>) {
        let t = self.tokens();
        assert!(self.kv_heads > 0 && self.heads % self.kv_heads == 0, "attention: kv_heads must divide heads");
        assert_eq!(q.len(), t * self.heads * self.head_dim, "attention: q length");
        assert_eq!(k.len(), t * self.kv_heads * self.head_dim, "attention: k length");
        assert_eq!(v.len(), k.len(), "attention: v length");
        if let Some(d) = docs {
            assert_eq!(d.len(), t, "attention: docs length");
        }
    }
}

/// Copies head `head` of sequence `seq` out of `x` (`[tokens, nheads * d]`) as `[L, d]`.
fn gather(x: &[f32], s: &AttnShape, seq: usize, head: usize, nheads: usize) -> Vec<f32> {
    let (l, d) = (s.seq_len, s.head_dim);
    let mut out = Vec::with_capacity(l * d);
    for i in 0..l {
        let at = ((seq * l + i) * nheads + head) * d;
        out.extend_from_slice(&x[at..at + d]);
    }
    out
}

/// The inverse of [`gather`].
fn scatter(x: &mut [f32], s: &AttnShape, seq: usize, head: usize, nheads: usize, block: &[f32]) {
    let (l, d) = (s.seq_len, s.head_dim);
    for i in 0..l {
        let at = ((seq * l + i) * nheads + head) * d;
        x[at..at + d].copy_from_slice(&block[i * d..(i + 1) * d]);
    }
}

/// Scaled scores `q k^T / sqrt(d)` of one head, `[L, L]`.
fn scores(s: &AttnShape, qh: &[f32], kg: &[f32]) -> Vec<f32> {
    let (l, d) = (s.seq_len, s.head_dim);
    let mut sc = vec![0f32; l * l];
    gemm(Trans::N, Trans::T, l, l, d, 1.0 / (d as f32).sqrt(), qh, kg, 0.0, &mut sc);
    sc
}

/// Whether query `i` may see key `j` in sequence `seq`.
#[inline]
fn visible(docs: Option<&[u32]>, base: usize, i: usize, j: usize) -> bool {
    j <= i && docs.is_none_or(|d| d[base + j] == d[base + i])
}

/// Forward. Writes `out` (`[tokens, heads * d]`) and `lse` (`[tokens, heads]`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], docs: Option<&[u32]>, out: &mut [f32], lse: &mut [f32]) {
    s.check(q, k, v, docs);
    assert_eq!(out.len(), q.len(), "attention_forward: out length");
    assert_eq!(lse.len(), s.tokens() * s.heads, "attention_forward: lse length");
    let (l, d, group) = (s.seq_len, s.head_dim, s.heads / s.kv_heads);
    let blocks: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = (0..s.seqs * s.kv_heads)
        .into_par_iter()
        .flat_map_iter(|task| {
            let (seq, g) = (task / s.kv_heads, task % s.kv_heads);
            let kg = gather(k, s, seq, g, s.kv_heads);
            let vg = gather(v, s, seq, g, s.kv_heads);
            (g * group..(g + 1) * group)
                .map(|h| {
                    let qh = gather(q, s, seq, h, s.heads);
                    let mut p = scores(s, &qh, &kg);
                    let mut lse_h = vec![0f32; l];
                    for (i, row) in p.chunks_mut(l).enumerate() {
                        let m = row[..=i].iter().enumerate().filter(|&(j, _)| visible(docs, seq * l, i, j)).fold(f32::NEG_INFINITY, |m, (_, &x)| m.max(x));
                        let mut sum = 0f64;
                        for (j, x) in row.iter_mut().enumerate() {
                            *x = if visible(docs, seq * l, i, j) { (*x - m).exp() } else { 0.0 };
                            sum += f64::from(*x);
                        }
                        let inv = (1.0 / sum) as f32;
                        row.iter_mut().for_each(|x| *x *= inv);
                        lse_h[i] = m + sum.ln() as f32;
                    }
                    let mut oh = vec![0f32; l * d];
                    gemm(Trans::N, Trans::N, l, d, l, 1.0, &p, &vg, 0.0, &mut oh);
                    (seq, h, oh, lse_h)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for (seq, h, oh, lse_h) in blocks {
        scatter(out, s, seq, h, s.heads, &oh);
        for (i, &x) in lse_h.iter().enumerate() {
            lse[(seq * l + i) * s.heads + h] = x;
        }
    }
}

/// Backward. Given the forward's inputs, `out`, `lse` and the output gradient `dout`,
/// writes `dq`, `dk`, `dv` (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    docs: Option<&[u32]>,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    s.check(q, k, v, docs);
    assert!(out.len() == q.len() && dout.len() == q.len() && dq.len() == q.len(), "attention_backward: q-shaped lengths");
    assert!(dk.len() == k.len() && dv.len() == v.len() && lse.len() == s.tokens() * s.heads, "attention_backward: lengths");
    let (l, d, group) = (s.seq_len, s.head_dim, s.heads / s.kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    type Block = (usize, usize, Vec<(usize, Vec<f32>)>, Vec<f32>, Vec<f32>);
    let blocks: Vec<Block> = (0..s.seqs * s.kv_heads)
        .into_par_iter()
        .map(|task| {
            let (seq, g) = (task / s.kv_heads, task % s.kv_heads);
            let kg = gather(k, s, seq, g, s.kv_heads);
            let vg = gather(v, s, seq, g, s.kv_heads);
            let (mut dkg, mut dvg) = (vec![0f32; l * d], vec![0f32; l * d]);
            let mut dqs = Vec::with_capacity(group);
            for h in g * group..(g + 1) * group {
                let qh = gather(q, s, seq, h, s.heads);
                let oh = gather(out, s, seq, h, s.heads);
                let doh = gather(dout, s, seq, h, s.heads);
                let mut p = scores(s, &qh, &kg);
                for (i, row) in p.chunks_mut(l).enumerate() {
                    let m = lse[(seq * l + i) * s.heads + h];
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if visible(docs, seq * l, i, j) { (*x - m).exp() } else { 0.0 };
                    }
                }
                let mut ds = vec![0f32; l * l];
                gemm(Trans::N, Trans::T, l, l, d, 1.0, &doh, &vg, 0.0, &mut ds); // dp
                for (i, (ds_row, p_row)) in ds.chunks_mut(l).zip(p.chunks(l)).enumerate() {
                    let di = (0..d).map(|c| f64::from(doh[i * d + c]) * f64::from(oh[i * d + c])).sum::<f64>() as f32;
                    for (x, &pv) in ds_row.iter_mut().zip(p_row) {
                        *x = pv * (*x - di);
                    }
                }
                let mut dqh = vec![0f32; l * d];
                gemm(Trans::N, Trans::N, l, d, l, scale, &ds, &kg, 0.0, &mut dqh);
                gemm(Trans::T, Trans::N, l, d, l, scale, &ds, &qh, 1.0, &mut dkg);
                gemm(Trans::T, Trans::N, l, d, l, 1.0, &p, &doh, 1.0, &mut dvg);
                dqs.push((h, dqh));
            }
            (seq, g, dqs, dkg, dvg)
        })
        .collect();
    for (seq, g, dqs, dkg, dvg) in blocks {
        for (h, dqh) in dqs {
            scatter(dq, s, seq, h, s.heads, &dqh);
        }
        scatter(dk, s, seq, g, s.kv_heads, &dkg);
        scatter(dv, s, seq, g, s.kv_heads, &dvg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, dot, nonzero};
    use crate::rng::Rng;

    fn fwd(s: &AttnShape, q: &[f32], k: &[f32], v: &[f32], docs: Option<&[u32]>) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; s.seqs * s.seq_len * s.heads];
        attention_forward(s, q, k, v, docs, &mut out, &mut lse);
        (out, lse)
    }

    fn grad_check(docs: Option<&[u32]>, seed: u64) {
        let mut r = Rng::new(seed);
        let s = AttnShape { seqs: 2, seq_len: 5, heads: 4, kv_heads: 2, head_dim: 3 };
        let t = s.seqs * s.seq_len;
        let q = nonzero(&mut r, t * s.heads * s.head_dim, 1.0);
        let k = nonzero(&mut r, t * s.kv_heads * s.head_dim, 1.0);
        let v = nonzero(&mut r, k.len(), 1.0);
        let c = nonzero(&mut r, q.len(), 1.0);
        let (out, lse) = fwd(&s, &q, &k, &v, docs);
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; q.len()], vec![f32::NAN; k.len()], vec![f32::NAN; v.len()]);
        attention_backward(&s, &q, &k, &v, docs, &out, &lse, &c, &mut dq, &mut dk, &mut dv);
        let (h, atol, rtol) = (1e-2, 3e-4, 3e-3);
        check("dq", &q, &dq, None, h, atol, rtol, |x| dot(&c, &fwd(&s, x, &k, &v, docs).0));
        check("dk", &k, &dk, None, h, atol, rtol, |x| dot(&c, &fwd(&s, &q, x, &v, docs).0));
        check("dv", &v, &dv, None, h, atol, rtol, |x| dot(&c, &fwd(&s, &q, &k, x, docs).0));
    }

    #[test]
    fn backward_matches_finite_differences() {
        grad_check(None, 21);
    }

    #[test]
    fn backward_matches_finite_differences_with_documents() {
        grad_check(Some(&[0, 0, 1, 1, 1, 4, 5, 5, 5, 5]), 22);
    }

    /// Packing: a packed row with document ids gives, for each document, what the document
    /// alone gives; and the first token of a sequence or document sees only itself.
    #[test]
    fn documents_are_independent() {
        let mut r = Rng::new(23);
        let (heads, kv, d) = (2, 1, 4);
        let packed = AttnShape { seqs: 1, seq_len: 7, heads, kv_heads: kv, head_dim: d };
        let q = nonzero(&mut r, 7 * heads * d, 1.0);
        let k = nonzero(&mut r, 7 * kv * d, 1.0);
        let v = nonzero(&mut r, 7 * kv * d, 1.0);
        let (out, lse) = fwd(&packed, &q, &k, &v, Some(&[3, 3, 3, 8, 8, 8, 8]));
        for (start, len) in [(0usize, 3usize), (3, 4)] {
            let alone = AttnShape { seq_len: len, ..packed };
            let sl = |x: &[f32], w: usize| x[start * w..(start + len) * w].to_vec();
            let (o2, l2) = fwd(&alone, &sl(&q, heads * d), &sl(&k, kv * d), &sl(&v, kv * d), None);
            let o1 = sl(&out, heads * d);
            assert!(o1.iter().zip(&o2).all(|(a, b)| (a - b).abs() < 1e-6), "document at {start}");
            assert!(sl(&lse, heads).iter().zip(&l2).all(|(a, b)| (a - b).abs() < 1e-6));
            // first token: output = its own value
            for h in 0..heads {
                let o = &o1[h * d..(h + 1) * d];
                assert!(o.iter().zip(&v[start * d..(start + 1) * d]).all(|(a, b)| (a - b).abs() < 1e-6));
            }
        }
    }

    /// GQA equals MHA with the key/value heads repeated.
    #[test]
    fn grouped_equals_repeated() {
        let mut r = Rng::new(24);
        let gqa = AttnShape { seqs: 2, seq_len: 6, heads: 6, kv_heads: 2, head_dim: 5 };
        let mha = AttnShape { kv_heads: 6, ..gqa };
        let t = 12;
        let q = nonzero(&mut r, t * 6 * 5, 1.0);
        let k = nonzero(&mut r, t * 2 * 5, 1.0);
        let v = nonzero(&mut r, t * 2 * 5, 1.0);
        let rep = |x: &[f32]| -> Vec<f32> { x.chunks(5).flat_map(|h| std::iter::repeat_n(h, 3).flatten().copied()).collect() };
        let (a, _) = fwd(&gqa, &q, &k, &v, None);
        let (b, _) = fwd(&mha, &q, &rep(&k), &rep(&v), None);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6));
    }
}
