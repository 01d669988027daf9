//! Embedding lookup: `out[t] = table[ids[t]]`; backward scatter-adds into the table.
//!
//! Bytes: forward reads and writes `tokens * hidden` floats. The embedding is frozen in
//! QLoRA, so the backward is not on the training path; it exists for completeness (and
//! for a trainable-embedding variant later).

use rayon::prelude::*;

/// `out[t, :] = table[ids[t], :]`; `table` is `[rows, hidden]`, `out` `[ids.len(), hidden]`.
///
/// # Panics
/// If an id is `>= rows` or a length is off (callers validate ids first:
/// [`crate::model::Llama::forward`] does).
pub fn embedding_forward(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * hidden, "embedding_forward: out length");
    out.par_chunks_mut(hidden).zip(ids.par_iter()).for_each(|(row, &id)| {
        let s = id as usize * hidden;
        row.copy_from_slice(&table[s..s + hidden]);
    });
}

/// `dtable[ids[t], :] += dout[t, :]` (accumulates: repeated ids add up).
pub fn embedding_backward(dout: &[f32], hidden: usize, ids: &[u32], dtable: &mut [f32]) {
    assert_eq!(dout.len(), ids.len() * hidden, "embedding_backward: dout length");
    // Sequential: rows repeat, and this is off the training path.
    for (row, &id) in dout.chunks(hidden).zip(ids) {
        let s = id as usize * hidden;
        for (d, &g) in dtable[s..s + hidden].iter_mut().zip(row) {
            *d += g;
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
        let mut r = Rng::new(11);
        let (rows, hidden) = (7, 5);
        let table = nonzero(&mut r, rows * hidden, 1.0);
        let ids = vec![3u32, 0, 3, 6, 1, 3, 6, 2, 5];
        let c = nonzero(&mut r, ids.len() * hidden, 1.0);
        let f = |t: &[f32]| {
            let mut out = vec![f32::NAN; ids.len() * hidden];
            embedding_forward(t, hidden, &ids, &mut out);
            dot(&c, &out)
        };
        let mut dtable = nonzero(&mut r, rows * hidden, 1.0); // accumulates onto this
        let before = dtable.clone();
        embedding_backward(&c, hidden, &ids, &mut dtable);
        let grad: Vec<f32> = dtable.iter().zip(&before).map(|(a, b)| a - b).collect();
        check("dtable", &table, &grad, None, 1e-2, 1e-4, 1e-3, f);
        // row 4 is never looked up: its gradient is exactly zero
        assert!(grad[4 * hidden..5 * hidden].iter().all(|&g| g == 0.0));
    }
}
