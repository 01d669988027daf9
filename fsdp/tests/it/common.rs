//! Shared helpers: tiny configurations and batches.
#![allow(dead_code)]

use fsdp::{Batch, Config, Llama, Lora, LoraConfig};
use fsdp::rng::Rng;

/// hidden 32, 2 layers, 4/2 heads (head_dim 8), intermediate 48, vocab 101, Llama 3 RoPE
/// scaling with a short original context so all three frequency bands occur.
pub const TINY_LLAMA: &str = r#"{"model_type":"llama","hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,
  "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":101,"rms_norm_eps":1e-5,"rope_theta":10000.0,
  "rope_scaling":{"rope_type":"llama3","factor":4.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64},
  "tie_word_embeddings":false}"#;

/// Qwen2-style: q/k/v biases, tied embeddings, head_dim 6 (hidden 24, 4 heads, 1 kv head).
pub const TINY_QWEN2: &str = r#"{"model_type":"qwen2","hidden_size":24,"intermediate_size":40,"num_hidden_layers":2,
  "num_attention_heads":4,"num_key_value_heads":1,"vocab_size":67,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
  "tie_word_embeddings":true}"#;

pub fn config(json: &str) -> Config {
    Config::from_json_str(json, "test-config.json").unwrap()
}

/// A random batch of `seqs x len` ids; the second sequence (if any) packs three documents.
pub fn batch(r: &mut Rng, vocab: usize, seqs: usize, len: usize) -> Batch {
    let ids: Vec<u32> = (0..seqs * len).map(|_| r.below(vocab) as u32).collect();
    let docs: Vec<u32> = (0..seqs * len)
        .map(|t| {
            let (s, i) = (t / len, t % len);
            if s == 1 { (i * 3 / len) as u32 + 10 } else { s as u32 }
        })
        .collect();
    Batch::packed(ids, docs, len).unwrap()
}

/// Adapters with B random too (PEFT's B = 0 would make every dA zero).
pub fn lora_nonzero(m: &Llama, lc: LoraConfig, seed: u64) -> Lora {
    let mut l = Lora::init(&m.config, lc, seed).unwrap();
    let mut r = Rng::new(seed ^ 0xb);
    for t in l.tensors_mut() {
        if t.iter().all(|&x| x == 0.0) {
            t.iter_mut().for_each(|x| *x = (r.normal() * 0.2) as f32);
        }
    }
    l
}
