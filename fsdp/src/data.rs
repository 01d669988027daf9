//! Training data: JSONL records (`input_ids` lists, or `text` through a `tokenizer.json`)
//! packed into fixed-length rows with document ids.
//!
//! Packing is order-preserving "next fit": documents are appended to the current row while
//! they fit; the rest of the row is padding and the next document starts a new row. A
//! document longer than a row is cut into row-sized pieces, each its own document. Within
//! a row every document has its own id (attention never crosses documents, positions
//! restart at each), padding has [`PAD_DOC`] and no targets. Whole documents per row (no
//! cross-row splitting) is what supervised fine-tuning wants; the padding it costs is
//! reported by [`Packed::fill`].

use std::path::Path;

use serde_json::Value;

use crate::batch::{Batch, IGNORE_INDEX};
use crate::error::{Error, Result};
use crate::train::MicroBatch;

/// The document id of padding tokens.
pub const PAD_DOC: u32 = u32::MAX;

/// How `text` records become token ids.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextOptions<'a> {
    /// The tokenizer; `text` records are an error without one.
    pub tokenizer: Option<&'a tokenizers::Tokenizer>,
    /// Let the tokenizer add its special tokens (e.g. BOS), as `tokenizer(text)` does.
    pub add_special_tokens: bool,
    /// Appended to every document (`text` and `input_ids` alike), e.g. the EOS id.
    pub eos: Option<u32>,
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<tokenizers::Tokenizer> {
    let path = path.as_ref();
    tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Data { at: path.display().to_string(), problem: format!("not a usable tokenizer.json: {e}") })
}

/// Reads a JSONL file into documents of token ids (see [`parse_jsonl`]).
pub fn read_jsonl(path: impl AsRef<Path>, opts: &TextOptions<'_>) -> Result<Vec<Vec<u32>>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
    parse_jsonl(&text, &path.display().to_string(), opts)
}

/// Parses JSONL text: one JSON object per non-blank line, with `input_ids` (a list of
/// non-negative integers) or `text` (a string). `file` names it in errors, with the line.
pub fn parse_jsonl(text: &str, file: &str, opts: &TextOptions<'_>) -> Result<Vec<Vec<u32>>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |problem: String| Error::Data { at: format!("{file}:{}", i + 1), problem };
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let mut ids: Vec<u32> = match (obj.get("input_ids"), obj.get("text")) {
            (Some(ids), _) => {
                let arr = ids.as_array().ok_or_else(|| err("field `input_ids`: expected a list of token ids".into()))?;
                arr.iter()
                    .enumerate()
                    .map(|(j, x)| {
                        x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| err(format!("field `input_ids`: element {j} ({x}) is not a token id")))
                    })
                    .collect::<Result<_>>()?
            }
            (None, Some(Value::String(s))) => {
                let tok = opts.tokenizer.ok_or_else(|| err("a `text` record needs a tokenizer (or give `input_ids`)".into()))?;
                tok.encode(s.as_str(), opts.add_special_tokens).map_err(|e| err(format!("field `text`: the tokenizer failed: {e}")))?.get_ids().to_vec()
            }
            (None, Some(_)) => return Err(err("field `text`: expected a string".into())),
            (None, None) => return Err(err("neither `input_ids` nor `text`".into())),
        };
        ids.extend(opts.eos);
        docs.push(ids);
    }
    Ok(docs)
}

/// Rows of `seq_len` tokens with document ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packed {
    /// Tokens per row.
    pub seq_len: usize,
    /// Token ids, `[rows * seq_len]`.
    pub ids: Vec<u32>,
    /// Document ids, `[rows * seq_len]` ([`PAD_DOC`] for padding).
    pub docs: Vec<u32>,
}

/// Packs documents into rows (see the module docs); padding uses token `pad_id`.
/// Empty documents are skipped.
pub fn pack(docs: &[Vec<u32>], seq_len: usize, pad_id: u32) -> Result<Packed> {
    if seq_len == 0 {
        return Err(Error::arg("seq_len", "must be positive"));
    }
    let mut p = Packed { seq_len, ids: Vec::new(), docs: Vec::new() };
    let mut next_doc = 0u32;
    let pieces = docs.iter().flat_map(|d| d.chunks(seq_len));
    for piece in pieces {
        let used = p.ids.len() % seq_len;
        if used != 0 && used + piece.len() > seq_len {
            p.pad_row(pad_id);
        }
        p.ids.extend_from_slice(piece);
        p.docs.extend(std::iter::repeat_n(next_doc, piece.len()));
        // ids stay unique within a row; wrap far below PAD_DOC
        next_doc = (next_doc + 1) % (PAD_DOC - 1);
    }
    p.pad_row(pad_id);
    Ok(p)
}

impl Packed {
    fn pad_row(&mut self, pad_id: u32) {
        let used = self.ids.len() % self.seq_len;
        if used != 0 {
            let n = self.seq_len - used;
            self.ids.extend(std::iter::repeat_n(pad_id, n));
            self.docs.extend(std::iter::repeat_n(PAD_DOC, n));
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.ids.len() / self.seq_len
    }

    /// The fraction of tokens that are not padding.
    pub fn fill(&self) -> f64 {
        if self.ids.is_empty() {
            return 0.0;
        }
        self.docs.iter().filter(|&&d| d != PAD_DOC).count() as f64 / self.ids.len() as f64
    }

    /// Micro-batches of `rows_per_batch` rows (the last may have fewer), with next-token
    /// targets inside each document and none on padding.
    pub fn micro_batches(&self, rows_per_batch: usize) -> Result<Vec<MicroBatch>> {
        if rows_per_batch == 0 {
            return Err(Error::arg("rows_per_batch", "must be positive"));
        }
        let step = rows_per_batch * self.seq_len;
        self.ids
            .chunks(step)
            .zip(self.docs.chunks(step))
            .map(|(ids, docs)| {
                let batch = Batch::packed(ids.to_vec(), docs.to_vec(), self.seq_len)?;
                let mut targets = batch.next_token_targets();
                for (t, &d) in targets.iter_mut().zip(docs) {
                    if d == PAD_DOC {
                        *t = IGNORE_INDEX;
                    }
                }
                Ok(MicroBatch { batch, targets })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDS: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
        "model":{"type":"WordLevel","vocab":{"<unk>":0,"</s>":1,"the":2,"cat":3,"sat":4,"on":5,"mat":6,".":7},"unk_token":"<unk>"}}"#;

    #[test]
    fn jsonl_ids_and_text() {
        let tok: tokenizers::Tokenizer = WORDS.parse().unwrap();
        let opts = TextOptions { tokenizer: Some(&tok), add_special_tokens: true, eos: Some(1) };
        let text = "{\"input_ids\": [5, 6, 7]}\n\n{\"text\": \"the cat sat on the mat.\", \"meta\": 1}\n{\"text\": \"the dog\"}\n";
        let docs = parse_jsonl(text, "data.jsonl", &opts).unwrap();
        assert_eq!(docs, vec![vec![5, 6, 7, 1], vec![2, 3, 4, 5, 2, 6, 7, 1], vec![2, 0, 1]]);
        // the same from a file and a tokenizer.json on disk
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("d.jsonl"), text).unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), WORDS).unwrap();
        let tok2 = load_tokenizer(dir.path().join("tokenizer.json")).unwrap();
        let opts2 = TextOptions { tokenizer: Some(&tok2), ..opts };
        assert_eq!(read_jsonl(dir.path().join("d.jsonl"), &opts2).unwrap(), docs);
        assert!(load_tokenizer(dir.path().join("d.jsonl")).unwrap_err().to_string().contains("not a usable tokenizer.json"));
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let e = |t: &str| parse_jsonl(t, "d.jsonl", &TextOptions::default()).unwrap_err().to_string();
        assert_eq!(e("{\"input_ids\": [1]}\n{\"text\": \"hi\"}"), "d.jsonl:2: a `text` record needs a tokenizer (or give `input_ids`)");
        assert_eq!(e("{\"input_ids\": [1, -2]}"), "d.jsonl:1: field `input_ids`: element 1 (-2) is not a token id");
        assert_eq!(e("{\"input_ids\": \"1 2\"}"), "d.jsonl:1: field `input_ids`: expected a list of token ids");
        assert_eq!(e("{\"text\": 3}"), "d.jsonl:1: field `text`: expected a string");
        assert_eq!(e("{\"prompt\": \"x\"}"), "d.jsonl:1: neither `input_ids` nor `text`");
        assert_eq!(e("[1, 2]"), "d.jsonl:1: expected a JSON object");
        assert!(e("\n\n{oops").starts_with("d.jsonl:3: not valid JSON"));
    }

    #[test]
    fn packing() {
        let docs = vec![vec![1, 2, 3], vec![4, 5], vec![], vec![6, 7, 8, 9, 10, 11, 12], vec![13]];
        let p = pack(&docs, 5, 0).unwrap();
        let d = PAD_DOC;
        assert_eq!(p.ids, vec![1, 2, 3, 4, 5, /**/ 6, 7, 8, 9, 10, /**/ 11, 12, 13, 0, 0]);
        assert_eq!(p.docs, vec![0, 0, 0, 1, 1, /**/ 2, 2, 2, 2, 2, /**/ 3, 3, 4, d, d]);
        assert_eq!(p.rows(), 3);
        assert!((p.fill() - 13.0 / 15.0).abs() < 1e-12);
        let mb = p.micro_batches(2).unwrap();
        assert_eq!(mb.len(), 2);
        assert_eq!(mb[0].batch.positions, vec![0, 1, 2, 0, 1, 0, 1, 2, 3, 4]);
        assert_eq!(mb[0].targets, vec![2, 3, -100, 5, -100, 7, 8, 9, 10, -100]);
        assert_eq!(mb[1].targets, vec![12, -100, -100, -100, -100]); // 13 alone; padding ignored
        assert_eq!(mb[1].batch.positions, vec![0, 1, 0, 0, 1]);
        // a document that does not fit the current row starts a new one
        let p = pack(&[vec![1, 2], vec![3, 4, 5, 6]], 5, 9).unwrap();
        assert_eq!(p.ids, vec![1, 2, 9, 9, 9, 3, 4, 5, 6, 9]);
        assert!(pack(&docs, 0, 0).is_err());
        assert_eq!(pack(&[], 4, 0).unwrap().rows(), 0);
    }
}
