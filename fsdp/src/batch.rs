//! A micro-batch: token ids, position ids and optional document ids, `seqs x seq_len`
//! flattened to tokens; and its next-token targets.

use crate::error::{Error, Result};

/// The value of a target that counts for nothing (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// `seqs` sequences of `seq_len` tokens, flattened sequence-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, `[seqs * seq_len]`.
    pub ids: Vec<u32>,
    /// Position ids (RoPE), `[seqs * seq_len]`.
    pub positions: Vec<u32>,
    /// Document ids for packed sequences, `[seqs * seq_len]`: a token attends only to
    /// earlier tokens of its own sequence with the same document id. `None`: one document
    /// per sequence.
    pub docs: Option<Vec<u32>>,
    /// Tokens per sequence.
    pub seq_len: usize,
}

impl Batch {
    /// Unpacked sequences: positions `0..seq_len` in every sequence, no documents.
    pub fn new(ids: Vec<u32>, seq_len: usize) -> Result<Batch> {
        check_len("ids", ids.len(), seq_len)?;
        let positions = (0..ids.len()).map(|t| (t % seq_len) as u32).collect();
        Ok(Batch { ids, positions, docs: None, seq_len })
    }

    /// Packed sequences: positions restart at 0 where the document id changes (and at the
    /// start of each sequence), as packing collators do.
    pub fn packed(ids: Vec<u32>, docs: Vec<u32>, seq_len: usize) -> Result<Batch> {
        check_len("ids", ids.len(), seq_len)?;
        if docs.len() != ids.len() {
            return Err(Error::arg("docs", format!("{} document ids for {} tokens", docs.len(), ids.len())));
        }
        let mut positions = Vec::with_capacity(ids.len());
        let mut p = 0u32;
        for t in 0..ids.len() {
            p = if t % seq_len == 0 || docs[t] != docs[t - 1] { 0 } else { p + 1 };
            positions.push(p);
        }
        Ok(Batch { ids, positions, docs: Some(docs), seq_len })
    }

    /// From explicit parts, lengths checked.
    pub fn from_parts(ids: Vec<u32>, positions: Vec<u32>, docs: Option<Vec<u32>>, seq_len: usize) -> Result<Batch> {
        let b = Batch { ids, positions, docs, seq_len };
        b.validate()?;
        Ok(b)
    }

    /// Checks the lengths of every part.
    pub fn validate(&self) -> Result<()> {
        check_len("ids", self.ids.len(), self.seq_len)?;
        if self.positions.len() != self.ids.len() {
            return Err(Error::arg("positions", format!("{} position ids for {} tokens", self.positions.len(), self.ids.len())));
        }
        if let Some(d) = &self.docs {
            if d.len() != self.ids.len() {
                return Err(Error::arg("docs", format!("{} document ids for {} tokens", d.len(), self.ids.len())));
            }
        }
        Ok(())
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Number of sequences.
    pub fn seqs(&self) -> usize {
        self.ids.len() / self.seq_len
    }

    /// Next-token targets: `targets[t] = ids[t + 1]` when token `t + 1` is in the same
    /// sequence and document, else [`IGNORE_INDEX`] (the last token of each sequence and of
    /// each document predicts nothing).
    pub fn next_token_targets(&self) -> Vec<i64> {
        (0..self.ids.len())
            .map(|t| {
                let next = t + 1;
                let same_seq = next % self.seq_len != 0;
                let same_doc = self.docs.as_ref().is_none_or(|d| next < d.len() && d[next] == d[t]);
                if same_seq && same_doc {
                    i64::from(self.ids[next])
                } else {
                    IGNORE_INDEX
                }
            })
            .collect()
    }
}

/// The number of targets that count (not [`IGNORE_INDEX`]): sum it over the micro-batches
/// of one optimizer step for the loss's normalizer.
pub fn count_targets(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
}

fn check_len(arg: &str, n: usize, seq_len: usize) -> Result<()> {
    if seq_len == 0 || n == 0 || n % seq_len != 0 {
        return Err(Error::arg(arg, format!("{n} tokens is not a positive multiple of seq_len {seq_len}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacked_positions_and_targets() {
        let b = Batch::new(vec![5, 6, 7, 8, 9, 10], 3).unwrap();
        assert_eq!(b.positions, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(b.next_token_targets(), vec![6, 7, -100, 9, 10, -100]);
        assert_eq!(b.seqs(), 2);
        assert_eq!(count_targets(&b.next_token_targets()), 4);
    }

    #[test]
    fn packed_positions_and_targets() {
        let b = Batch::packed(vec![1, 2, 3, 4, 5, 6, 7, 8], vec![0, 0, 1, 1, 1, 1, 2, 2], 4).unwrap();
        assert_eq!(b.positions, vec![0, 1, 0, 1, 0, 1, 0, 1]); // a sequence boundary also restarts
        assert_eq!(b.next_token_targets(), vec![2, -100, 4, -100, 6, -100, 8, -100]);
    }

    #[test]
    fn bad_lengths() {
        assert!(Batch::new(vec![1, 2, 3], 2).unwrap_err().to_string().contains("not a positive multiple of seq_len 2"));
        assert!(Batch::new(vec![], 2).is_err());
        assert!(Batch::packed(vec![1, 2], vec![0], 2).unwrap_err().to_string().contains("argument `docs`"));
        assert!(Batch::from_parts(vec![1, 2], vec![0], None, 2).unwrap_err().to_string().contains("argument `positions`"));
    }
}
