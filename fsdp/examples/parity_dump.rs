//! Writes everything `fsdp/py/parity_hf.py` needs to compare the CPU f32 reference with
//! transformers + peft + bitsandbytes (see `fsdp/PARITY.md`):
//!
//! ```text
//! cargo run --release -p fsdp --example parity_dump -- target/fsdp-parity
//! ```
//!
//! For each variant (`llama`: untied head, Llama 3 RoPE scaling, 8/4 heads;
//! `llama-tied`: tied embeddings, default RoPE, 8/2 heads, another eps), into `DIR/<variant>/`:
//!
//! | file | what |
//! |---|---|
//! | `model/` | `config.json` + `model.safetensors`, random weights in bf16 (what HF loads and bnb quantizes) |
//! | `adapter/` | the initial adapter in PEFT's format: r 8, alpha 16, all 7 projections, `A` PEFT's init, `B` small random (so `dA` is not zero) |
//! | `nf4.safetensors` | our NF4 bytes of every projection, in bitsandbytes' serialization (packed, `absmax`, `nested_absmax`, quant-state JSON) |
//! | `grads.safetensors` | d(mean loss)/d(every LoRA tensor) at the initial adapter, f32, PEFT keys |
//! | `hidden.safetensors` | `normed_{k}`, `[128, hidden]`: the final norm of the residual stream after `k` layers, initial adapter (locates a divergence along the depth) |
//! | `logits.safetensors` | `logits` `[2, 64, vocab]` at the initial adapter, `logits_final` after the 20 steps |
//! | `adapter_final/` | the adapter after 20 AdamW steps |
//! | `meta.json` | the batch (`input_ids`), hyper-parameters, our per-step losses and gradient norms |
//!
//! The loss is next-token cross-entropy averaged over the 2 x 63 targets (the last token of
//! each row predicts nothing), i.e. transformers' `labels=input_ids`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fsdp::optim::{AdamWConfig, Schedule};
use fsdp::rng::Rng;
use fsdp::train::{MicroBatch, TrainConfig, Trainer};
use fsdp::weights::random_weights;
use fsdp::{hf, peft, BaseFormat, Batch, Llama, Lora, LoraConfig};
use safetensors::Dtype;
use serde_json::json;

const SEQS: usize = 2;
const SEQ_LEN: usize = 64;
const STEPS: usize = 20;
const LR: f64 = 1e-3;
const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;
const WEIGHT_DECAY: f64 = 0.01;
const MAX_GRAD_NORM: f64 = 1.0;
const RANK: usize = 8;
const ALPHA: f64 = 16.0;
/// Standard deviation of the random `B` (PEFT initialises it to 0, which would make every
/// `dA` zero at the first step and leave half the gradients untested).
const B_STD: f64 = 0.04;

struct Variant {
    name: &'static str,
    seed: u64,
    config: serde_json::Value,
}

fn variants() -> Vec<Variant> {
    // Fields transformers' LlamaConfig reads (v5 `rope_parameters` layout, which
    // fsdp::Config reads too).
    let base = |tied: bool, kv: usize, eps: f64, rope: serde_json::Value| {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": kv,
            "head_dim": 32,
            "vocab_size": 1000,
            "max_position_embeddings": 256,
            "rms_norm_eps": eps,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "tie_word_embeddings": tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": null,
            "use_cache": false,
            "dtype": "bfloat16"
        })
    };
    vec![
        Variant {
            name: "llama",
            seed: 11,
            // Llama 3 scaling with a short original context, so all three frequency bands
            // occur within head_dim 32.
            config: base(
                false,
                4,
                1e-5,
                json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            ),
        },
        Variant { name: "llama-tied", seed: 12, config: base(true, 2, 1e-6, json!({"rope_type": "default", "rope_theta": 100000.0})) },
    ]
}

fn main() -> Result<(), Box<dyn Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/fsdp-parity".into()));
    std::fs::create_dir_all(&out)?;
    let mut names = Vec::new();
    for v in variants() {
        let t = Instant::now();
        dump(&out.join(v.name), &v)?;
        eprintln!("{}: {:.1} s", v.name, t.elapsed().as_secs_f64());
        names.push(v.name);
    }
    let index = json!({
        "generator": "cargo run --release -p fsdp --example parity_dump -- DIR",
        "variants": names,
    });
    std::fs::write(out.join("index.json"), serde_json::to_string_pretty(&index)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn dump(dir: &Path, v: &Variant) -> Result<(), Box<dyn Error>> {
    std::fs::create_dir_all(dir)?;
    let config_text = serde_json::to_string_pretty(&v.config)?;
    let cfg = fsdp::Config::from_json_str(&config_text, "config.json")?;

    // The model folder in bf16, then loaded back the way any HF folder is: the reference
    // sees exactly the bf16 values HF sees, and quantizes them to NF4 as bnb does.
    let weights = random_weights(&cfg, v.seed);
    let tensors: Vec<(String, Vec<usize>, &[f32])> = weights.iter().map(|(s, w)| (s.name.clone(), s.shape.clone(), &w[..])).collect();
    let model_dir = dir.join("model");
    hf::write_folder(&model_dir, &config_text, &tensors, Dtype::BF16, 1)?;
    let model = hf::load(&model_dir, &BaseFormat::default())?;

    let mut nf4_tensors = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        for p in fsdp::Proj::ALL {
            let q = layer.proj[p.index()].nf4.as_ref().ok_or("the projections are NF4 with BaseFormat::default()")?;
            nf4_tensors.extend(nf4::checkpoint::to_tensors(&format!("{}.weight", p.path(l)), q)?);
        }
    }
    nf4::checkpoint::save(dir.join("nf4.safetensors"), &nf4_tensors, None)?;

    // LoRA: PEFT's A, a small random B.
    let mut lora = Lora::init(&cfg, LoraConfig::new(RANK, ALPHA), v.seed)?;
    let mut r = Rng::new(v.seed ^ 0xb0b);
    let keys: Vec<String> = lora.named_tensors().into_iter().map(|(n, _, _)| n).collect();
    for (key, t) in keys.iter().zip(lora.tensors_mut()) {
        if key.contains(".lora_B.") {
            t.iter_mut().for_each(|x| *x = (r.normal() * B_STD) as f32);
        }
    }
    peft::save(dir.join("adapter"), &lora, "model")?;

    let mut rb = Rng::new(v.seed ^ 0xba7c);
    let ids: Vec<u32> = (0..SEQS * SEQ_LEN).map(|_| rb.below(cfg.vocab_size) as u32).collect();
    let batch = Batch::new(ids.clone(), SEQ_LEN)?;
    let micro = [MicroBatch::next_token(batch.clone())];

    let logits0 = logits(&model, &lora, &batch)?;
    let depth = normed_by_depth(&model, &lora, &batch)?;
    let hidden_shape = vec![SEQS * SEQ_LEN, cfg.hidden_size];
    let named: Vec<(String, Vec<usize>, &[f32])> = depth.iter().enumerate().map(|(k, h)| (format!("normed_{k}"), hidden_shape.clone(), &h[..])).collect();
    hf::write_safetensors(&dir.join("hidden.safetensors"), &named, Dtype::F32, None)?;
    let train = TrainConfig {
        adamw: AdamWConfig { betas: BETAS, eps: EPS, weight_decay: WEIGHT_DECAY },
        schedule: Schedule::constant(LR),
        max_grad_norm: Some(MAX_GRAD_NORM),
        dropout_seed: 0,
    };
    let mut trainer = Trainer::new(lora, train)?;
    let (loss0, targets) = trainer.accumulate(&model, &micro)?;
    let grads: Vec<(String, Vec<usize>, &[f32])> = trainer.grads.named_tensors().into_iter().map(|(n, s, d)| (n, s.to_vec(), d)).collect();
    hf::write_safetensors(&dir.join("grads.safetensors"), &grads, Dtype::F32, None)?;

    let t = Instant::now();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let rep = trainer.train_step(&model, &micro)?;
        losses.push(rep.loss);
        norms.push(rep.grad_norm);
    }
    let step_s = t.elapsed().as_secs_f64() / STEPS as f64;
    let final_loss = model.loss(&trainer.lora, &batch, &micro[0].targets, targets as f64)?;
    peft::save(dir.join("adapter_final"), &trainer.lora, "model")?;
    let logits1 = logits(&model, &trainer.lora, &batch)?;
    let shape = vec![SEQS, SEQ_LEN, cfg.vocab_size];
    hf::write_safetensors(
        &dir.join("logits.safetensors"),
        &[("logits".into(), shape.clone(), &logits0[..]), ("logits_final".into(), shape, &logits1[..])],
        Dtype::F32,
        None,
    )?;

    let rows: Vec<&[u32]> = ids.chunks(SEQ_LEN).collect();
    let meta = json!({
        "variant": v.name,
        "seed": v.seed,
        "model_dir": "model",
        "adapter_dir": "adapter",
        "adapter_final_dir": "adapter_final",
        "input_ids": rows,
        "targets": targets,
        "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "b_init_std": B_STD, "targets": "all 7 projections"},
        "train": {"steps": STEPS, "lr": LR, "schedule": "constant", "betas": [BETAS.0, BETAS.1], "eps": EPS,
                  "weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM},
        "ours": {"loss0": loss0, "losses": losses, "grad_norms": norms, "final_loss": final_loss,
                 "seconds_per_step": step_s, "precision": "f32 (reductions in f64 where fsdp::ops says so)"},
    });
    std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    eprintln!("{}: loss {loss0:.6} -> {final_loss:.6} after {STEPS} steps ({:.0} ms/step)", v.name, step_s * 1e3);
    Ok(())
}

/// For `k` in `0..=layers`: the final norm applied to the residual stream after the first
/// `k` layers (the model truncated to `k` layers), `[tokens, hidden]` each: where along the
/// depth two implementations part, if they do.
fn normed_by_depth(model: &Llama, lora: &Lora, batch: &Batch) -> Result<Vec<Vec<f32>>, Box<dyn Error>> {
    let mut out = Vec::new();
    for k in 0..=model.layers.len() {
        let mut m = model.clone();
        m.layers.truncate(k);
        m.config.num_hidden_layers = k;
        let mut lk = Lora::zeros(&m.config, lora.config.clone())?;
        for l in 0..k {
            for p in fsdp::Proj::ALL {
                if let (Some(dst), Some(src)) = (lk.get_mut(l, p), lora.get(l, p)) {
                    *dst = src.clone();
                }
            }
        }
        out.push(m.forward(&lk, batch)?.hidden);
    }
    Ok(out)
}

/// `[tokens, vocab]` logits of the adapted model: the final hidden states times the head
/// (the training path never materialises them; here they are small).
fn logits(model: &Llama, lora: &Lora, batch: &Batch) -> Result<Vec<f32>, Box<dyn Error>> {
    let acts = model.forward(lora, batch)?;
    let (h, v) = (model.config.hidden_size, model.config.vocab_size);
    let w = model.head_weight();
    let mut out = vec![0f32; batch.tokens() * v];
    for (row, x) in out.chunks_mut(v).zip(acts.hidden.chunks(h)) {
        for (o, wr) in row.iter_mut().zip(w.chunks(h)) {
            *o = x.iter().zip(wr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() as f32;
        }
    }
    Ok(out)
}
