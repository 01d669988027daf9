//! Writes everything `fsdp/py/parity_hf.py` needs to compare the CPU f32 reference, and
//! with `--gpu` also the GPU runtime, with transformers + peft + bitsandbytes (see
//! `fsdp/PARITY.md`):
//!
//! ```text
//! cargo run --release -p fsdp --example parity_dump -- target/fsdp-parity
//! parity_dump --gpu target/fsdp-parity-gpu      # on a machine with an NVIDIA GPU
//! ```
//!
//! Without `--gpu`, the variants `llama` (untied head, Llama 3 RoPE scaling, 8/4 heads of
//! 32) and `llama-tied` (tied embeddings, default RoPE, 8/2 heads, another eps), 2 x 64
//! tokens. With `--gpu`, variants whose head width the GPU attention supports (64 and 128):
//! `llama-gpu` (hidden 512, 8/4 heads of 64, untied, Llama 3 RoPE scaling) and
//! `llama-gpu-tied` (hidden 512, 4/2 heads of 128, tied, default RoPE), 2 x 128 tokens. For
//! each variant, into `DIR/<variant>/`:
//!
//! | file | what |
//! |---|---|
//! | `model/` | `config.json` + `model.safetensors`, random weights in bf16 (what HF loads and bnb quantizes) |
//! | `adapter/` | the initial adapter in PEFT's format: r 8, alpha 16, all 7 projections, `A` PEFT's init, `B` small random (so `dA` is not zero) |
//! | `nf4.safetensors` | our NF4 bytes of every projection, in bitsandbytes' serialization (packed, `absmax`, `nested_absmax`, quant-state JSON) |
//! | `grads.safetensors` | d(mean loss)/d(every LoRA tensor) at the initial adapter, f32, PEFT keys |
//! | `hidden.safetensors` | `normed_{k}`, `[tokens, hidden]`: the final norm of the residual stream after `k` layers, initial adapter (locates a divergence along the depth) |
//! | `logits.safetensors` | `logits` `[seqs, seq_len, vocab]` at the initial adapter, `logits_final` after the 20 steps |
//! | `adapter_final/` | the adapter after 20 AdamW steps |
//! | `meta.json` | the batch (`input_ids`), hyper-parameters, our per-step losses and gradient norms |
//!
//! and with `--gpu`, the **GPU runtime's** results (bf16, [`Checkpointing::Off`]; the same
//! 20 steps are run again with [`Checkpointing::On`], whose losses must match):
//!
//! | file | what |
//! |---|---|
//! | `grads_gpu.safetensors` | the GPU runtime's step-0 LoRA gradients (`GpuLora::download_grads`), f32, PEFT keys |
//! | `adapter_final_gpu/` | the GPU-trained adapter after the 20 steps (`fsdp::peft::save`) |
//! | `logits.safetensors` | also `logits_final_gpu`: the logits of the GPU-trained adapter **computed by the CPU f32 model** (the GPU runtime has no logits output: its LM head goes straight into the chunked loss, no `[tokens, vocab]` tensor exists) |
//! | `meta.json` | also `gpu`: device, step-0 loss, per-step losses and gradient norms (both checkpointing modes), and how they compare with the CPU f32 reference |
//!
//! The loss is next-token cross-entropy averaged over the `seqs x (seq_len - 1)` targets
//! (the last token of each row predicts nothing), i.e. transformers' `labels=input_ids`.
//! On a machine without a usable GPU, `--gpu` fails before writing anything, with an
//! error that says so.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cudakit::Gpu;
use fsdp::gpu::model::{Checkpointing, GpuModel, GpuTrainer, RuntimeOptions};
use fsdp::gpu::Dtype as GpuDtype;
use fsdp::optim::{AdamWConfig, Schedule};
use fsdp::rng::Rng;
use fsdp::train::{MicroBatch, StepReport, TrainConfig, Trainer};
use fsdp::weights::random_weights;
use fsdp::{hf, peft, BaseFormat, Batch, Llama, Lora, LoraConfig};
use safetensors::Dtype;
use serde_json::json;

const SEQS: usize = 2;
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
    seq_len: usize,
    config: serde_json::Value,
}

/// The sizes that differ between the CPU and the GPU variants.
struct Shape {
    hidden: usize,
    intermediate: usize,
    heads: usize,
    head_dim: usize,
}

/// Fields transformers' LlamaConfig reads (v5 `rope_parameters` layout, which
/// fsdp::Config reads too).
fn llama_config(s: &Shape, tied: bool, kv: usize, eps: f64, rope: serde_json::Value) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": 4,
        "num_attention_heads": s.heads,
        "num_key_value_heads": kv,
        "head_dim": s.head_dim,
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
}

/// Llama 3 scaling with a short original context (64), so all three frequency bands occur.
fn llama3_rope() -> serde_json::Value {
    json!({"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
}

/// The CPU reference's variants: head_dim 32.
fn variants() -> Vec<Variant> {
    let s = Shape { hidden: 256, intermediate: 512, heads: 8, head_dim: 32 };
    vec![
        Variant { name: "llama", seed: 11, seq_len: 64, config: llama_config(&s, false, 4, 1e-5, llama3_rope()) },
        Variant {
            name: "llama-tied",
            seed: 12,
            seq_len: 64,
            config: llama_config(&s, true, 2, 1e-6, json!({"rope_type": "default", "rope_theta": 100000.0})),
        },
    ]
}

/// The GPU runtime's variants: its attention supports head_dim 64 and 128 (one each).
fn gpu_variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "llama-gpu",
            seed: 21,
            seq_len: 128,
            config: llama_config(&Shape { hidden: 512, intermediate: 1024, heads: 8, head_dim: 64 }, false, 4, 1e-5, llama3_rope()),
        },
        Variant {
            name: "llama-gpu-tied",
            seed: 22,
            seq_len: 128,
            config: llama_config(
                &Shape { hidden: 512, intermediate: 1024, heads: 4, head_dim: 128 },
                true,
                2,
                1e-6,
                json!({"rope_type": "default", "rope_theta": 100000.0}),
            ),
        },
    ]
}

const USAGE: &str = "usage: parity_dump [--gpu] [DIR]   (DIR defaults to target/fsdp-parity, with --gpu target/fsdp-parity-gpu)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("parity_dump: error: {e}");
        std::process::exit(1);
    }
}

/// The command: parses `args`, then dumps every variant.
fn run(args: &[String]) -> Result<(), Box<dyn Error>> {
    let mut gpu_mode = false;
    let mut dir = None;
    for a in args {
        match a.as_str() {
            "--gpu" => gpu_mode = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`\n{USAGE}").into()),
            s if dir.is_none() => dir = Some(PathBuf::from(s)),
            s => return Err(format!("unexpected argument `{s}`\n{USAGE}").into()),
        }
    }
    // Open the GPU first: without one, fail before anything is written.
    let gpu = if gpu_mode { Some(open_gpu()?) } else { None };
    let out = dir.unwrap_or_else(|| PathBuf::from(if gpu_mode { "target/fsdp-parity-gpu" } else { "target/fsdp-parity" }));
    std::fs::create_dir_all(&out)?;
    let mut names = Vec::new();
    for v in if gpu_mode { gpu_variants() } else { variants() } {
        let t = Instant::now();
        dump(&out.join(v.name), &v, gpu.as_ref())?;
        eprintln!("{}: {:.1} s", v.name, t.elapsed().as_secs_f64());
        names.push(v.name);
    }
    let index = if gpu_mode {
        json!({
            "generator": "parity_dump --gpu DIR",
            "device": gpu.as_ref().map(|g| g.info().name.clone()),
            "variants": names,
        })
    } else {
        json!({
            "generator": "cargo run --release -p fsdp --example parity_dump -- DIR",
            "variants": names,
        })
    };
    std::fs::write(out.join("index.json"), serde_json::to_string_pretty(&index)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Device 0 for `--gpu`, or an error that names what is missing.
fn open_gpu() -> Result<Gpu, Box<dyn Error>> {
    let gpu = Gpu::open(0).map_err(|e| format!("--gpu needs an NVIDIA GPU (CUDA driver, NVRTC and device 0), and none is usable here: {e}"))?;
    if gpu.info().arch.major < 8 {
        return Err(format!("--gpu runs the GPU runtime in bf16, which {} (sm_{}) does not have", gpu.info().name, gpu.info().arch).into());
    }
    Ok(gpu)
}

fn dump(dir: &Path, v: &Variant, gpu: Option<&Gpu>) -> Result<(), Box<dyn Error>> {
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
    let lora_init = lora.clone();

    let mut rb = Rng::new(v.seed ^ 0xba7c);
    let ids: Vec<u32> = (0..SEQS * v.seq_len).map(|_| rb.below(cfg.vocab_size) as u32).collect();
    let batch = Batch::new(ids.clone(), v.seq_len)?;
    let micro = [MicroBatch::next_token(batch.clone())];

    let logits0 = logits(&model, &lora, &batch)?;
    let depth = normed_by_depth(&model, &lora, &batch)?;
    let hidden_shape = vec![SEQS * v.seq_len, cfg.hidden_size];
    let named: Vec<(String, Vec<usize>, &[f32])> = depth.iter().enumerate().map(|(k, h)| (format!("normed_{k}"), hidden_shape.clone(), &h[..])).collect();
    hf::write_safetensors(&dir.join("hidden.safetensors"), &named, Dtype::F32, None)?;
    let train = train_config();
    let mut trainer = Trainer::new(lora, train.clone())?;
    let (loss0, targets) = trainer.accumulate(&model, &micro)?;
    let grads: Vec<(String, Vec<usize>, &[f32])> = trainer.grads.named_tensors().into_iter().map(|(n, s, d)| (n, s.to_vec(), d)).collect();
    hf::write_safetensors(&dir.join("grads.safetensors"), &grads, Dtype::F32, None)?;
    let cpu_grads = trainer.grads.clone();

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
    let shape = vec![SEQS, v.seq_len, cfg.vocab_size];
    let cpu = CpuResults { loss0, losses: &losses, norms: &norms, grads: &cpu_grads, targets };
    let gpu_part = gpu.map(|g| gpu_dump(dir, g, &model, &lora_init, &train, &micro, &cpu)).transpose()?;
    let mut logit_tensors = vec![("logits".to_string(), shape.clone(), &logits0[..]), ("logits_final".into(), shape.clone(), &logits1[..])];
    if let Some((_, lg)) = &gpu_part {
        logit_tensors.push(("logits_final_gpu".into(), shape, &lg[..]));
    }
    hf::write_safetensors(&dir.join("logits.safetensors"), &logit_tensors, Dtype::F32, None)?;

    let rows: Vec<&[u32]> = ids.chunks(v.seq_len).collect();
    let mut meta = json!({
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
    if let Some((g, _)) = gpu_part {
        meta["gpu"] = g;
    }
    std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    eprintln!("{}: loss {loss0:.6} -> {final_loss:.6} after {STEPS} steps ({:.0} ms/step)", v.name, step_s * 1e3);
    Ok(())
}

fn train_config() -> TrainConfig {
    TrainConfig {
        adamw: AdamWConfig { betas: BETAS, eps: EPS, weight_decay: WEIGHT_DECAY },
        schedule: Schedule::constant(LR),
        max_grad_norm: Some(MAX_GRAD_NORM),
        dropout_seed: 0,
    }
}

/// The CPU f32 reference's results the GPU runtime's are compared with.
struct CpuResults<'a> {
    loss0: f64,
    losses: &'a [f64],
    norms: &'a [f64],
    grads: &'a Lora,
    targets: usize,
}

/// The GPU runtime (bf16) on the same model, adapter and batch: step-0 loss and gradients,
/// 20 steps with checkpointing off and on, the trained adapter saved (`adapter_final_gpu/`)
/// and its logits computed by the CPU f32 model. Returns `meta.json`'s `gpu` object and
/// those logits.
fn gpu_dump(dir: &Path, gpu: &Gpu, model: &Llama, lora: &Lora, train: &TrainConfig, micro: &[MicroBatch], cpu: &CpuResults) -> Result<(serde_json::Value, Vec<f32>), Box<dyn Error>> {
    let t0 = Instant::now();
    let gm = GpuModel::upload(gpu, model, GpuDtype::Bf16)?;
    let mb = &micro[0];

    // Step 0: loss and LoRA gradients at the initial adapter.
    let mut g = GpuTrainer::new(&gm, lora, train.clone(), RuntimeOptions::for_checkpointing(Checkpointing::Off))?;
    let loss0 = g.micro_step(&gm, &mb.batch, &mb.targets, cpu.targets as f64)?;
    let grads = g.lora.download_grads(gm.gpu())?;
    let named: Vec<(String, Vec<usize>, &[f32])> = grads.named_tensors().into_iter().map(|(n, s, d)| (n, s.to_vec(), d)).collect();
    hf::write_safetensors(&dir.join("grads_gpu.safetensors"), &named, Dtype::F32, None)?;
    let mut grad_err: Vec<f64> = grads.tensors().iter().zip(cpu.grads.tensors()).map(|(got, want)| rel_l2(got, want)).collect();
    grad_err.sort_by(f64::total_cmp);
    drop(g);

    // 20 steps, checkpointing off, then on.
    let (off, secs_off, trained) = gpu_steps(&gm, lora, train, micro, Checkpointing::Off)?;
    let (on, secs_on, trained_on) = gpu_steps(&gm, lora, train, micro, Checkpointing::On)?;
    peft::save(dir.join("adapter_final_gpu"), &trained, "model")?;
    let losses: Vec<f64> = off.iter().map(|r| r.loss).collect();
    let norms: Vec<f64> = off.iter().map(|r| r.grad_norm).collect();
    let losses_on: Vec<f64> = on.iter().map(|r| r.loss).collect();
    let norms_on: Vec<f64> = on.iter().map(|r| r.grad_norm).collect();
    let max_rel = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs()).fold(0.0, f64::max);
    let ckpt_rel = max_rel(&losses_on, &losses);
    let ckpt_adapter = trained_on.tensors().iter().zip(trained.tensors()).map(|(a, b)| rel_l2(a, b)).fold(0.0, f64::max);

    // The trained adapter's loss on the GPU (one more forward) and, in f32, on the CPU.
    let mut g = GpuTrainer::new(&gm, &trained, train.clone(), RuntimeOptions::default())?;
    let final_loss = g.micro_step(&gm, &mb.batch, &mb.targets, cpu.targets as f64)?;
    drop(g);
    let final_loss_cpu = model.loss(&trained, &mb.batch, &mb.targets, cpu.targets as f64)?;
    let lg = logits(model, &trained, &mb.batch)?;

    let loss0_rel = (loss0 - cpu.loss0).abs() / cpu.loss0.abs();
    let steps_rel = max_rel(&losses, cpu.losses);
    let name = gpu.info().name.clone();
    println!(
        "{}: GPU runtime (bf16, {name}): loss0 {loss0:.6} (CPU f32 {:.6}, rel {loss0_rel:.1e}); 20 steps {:.4} -> {:.4}, max rel vs CPU {steps_rel:.1e}; \
         LoRA grads rel L2 vs CPU worst {:.1e} median {:.1e}; checkpointing on vs off: losses max rel {ckpt_rel:.1e}{}",
        dir.file_name().and_then(|s| s.to_str()).unwrap_or("?"),
        cpu.loss0,
        losses[0],
        losses[STEPS - 1],
        grad_err[grad_err.len() - 1],
        grad_err[grad_err.len() / 2],
        if ckpt_rel == 0.0 { " (identical)" } else { "" },
    );
    let meta = json!({
        "device": name,
        "dtype": "bf16",
        "checkpointing": "off",
        "loss0": loss0,
        "losses": losses,
        "grad_norms": norms,
        "final_loss": final_loss,
        "final_loss_cpu_f32": final_loss_cpu,
        "grads_file": "grads_gpu.safetensors",
        "adapter_final_dir": "adapter_final_gpu",
        "logits_final_key": "logits_final_gpu",
        "logits_note": "logits_final_gpu: the GPU-trained adapter's logits computed by the CPU f32 model; the GPU runtime has no logits output (its LM head goes straight into the chunked loss)",
        "seconds_per_step": secs_off,
        "checkpointing_on": {"losses": losses_on, "grad_norms": norms_on, "seconds_per_step": secs_on,
                             "losses_max_rel_vs_off": ckpt_rel, "losses_identical": ckpt_rel == 0.0,
                             "trained_adapter_rel_l2_worst_vs_off": ckpt_adapter},
        "vs_cpu_f32": {"loss0_rel": loss0_rel, "step_losses_max_rel": steps_rel,
                       "grad_norms_max_rel": max_rel(&norms, cpu.norms),
                       "grad_rel_l2_worst": grad_err[grad_err.len() - 1], "grad_rel_l2_median": grad_err[grad_err.len() / 2]},
        "seconds": t0.elapsed().as_secs_f64(),
    });
    Ok((meta, lg))
}

/// `STEPS` optimizer steps of the GPU runtime from `lora`: the reports, seconds per step
/// and the trained adapter.
fn gpu_steps(gm: &GpuModel, lora: &Lora, train: &TrainConfig, micro: &[MicroBatch], mode: Checkpointing) -> Result<(Vec<StepReport>, f64, Lora), Box<dyn Error>> {
    let mut g = GpuTrainer::new(gm, lora, train.clone(), RuntimeOptions::for_checkpointing(mode))?;
    let t = Instant::now();
    let reports = (0..STEPS).map(|_| g.train_step(gm, micro)).collect::<fsdp::Result<Vec<_>>>()?;
    let secs = t.elapsed().as_secs_f64() / STEPS as f64;
    Ok((reports, secs, g.lora.download(gm.gpu())?))
}

/// `||got - want|| / ||want||`, in f64.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - f64::from(w)).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| f64::from(w).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a usable GPU, `--gpu` is an error that says a GPU is missing (not a panic),
    /// and nothing is written.
    #[test]
    fn gpu_mode_without_a_gpu_is_a_clear_error() {
        if let Ok(gpu) = Gpu::open(0) {
            eprintln!("SKIPPED gpu_mode_without_a_gpu_is_a_clear_error: this machine has a GPU ({})", gpu.info().name);
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let e = run(&["--gpu".into(), out.display().to_string()]).unwrap_err().to_string();
        assert!(e.contains("--gpu needs an NVIDIA GPU") && e.contains("none is usable here"), "{e}");
        assert!(!out.exists(), "--gpu without a GPU wrote {}", out.display());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let e = run(&["--gpus".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown option `--gpus`") && e.contains("usage:"), "{e}");
        let e = run(&["a".into(), "b".into()]).unwrap_err().to_string();
        assert!(e.contains("unexpected argument `b`"), "{e}");
    }

    /// The GPU variants' shapes are ones the GPU runtime supports, and both head widths
    /// it has occur.
    #[test]
    fn gpu_variants_use_the_gpu_attention_head_widths() {
        let mut widths = vec![];
        for v in gpu_variants() {
            let c = fsdp::Config::from_json_str(&v.config.to_string(), v.name).unwrap();
            widths.push(c.head_dim);
            assert_eq!(c.hidden_size, 512);
        }
        widths.sort();
        assert_eq!(widths, [64, 128]);
    }
}
