//! `qlora`: QLoRA fine-tuning of Llama-family models (NF4 frozen base + LoRA adapters).
//!
//! ```text
//! qlora train --model DIR --data FILE.jsonl --out DIR [options]   fine-tune, save a PEFT adapter
//! qlora bench [--layers N] [--batch 4] [--seq-len 2048]            tokens/s and memory, random weights
//! ```
//! Run `qlora train --help` for every option.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use fsdp::gpu::model::{Checkpointing, GpuModel, GpuTrainer, RuntimeOptions};
use fsdp::gpu::Dtype;
use fsdp::optim::{AdamWConfig, Decay, Schedule};
use fsdp::report::{loss_svg, MetricsWriter, StepMetrics};
use fsdp::train::{MicroBatch, StepReport, TrainConfig, Trainer};
use fsdp::{BaseFormat, Batch, Config, Llama, Lora, LoraConfig, Proj};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "qlora", version, about = "QLoRA fine-tuning of Llama-family models: NF4 frozen base + LoRA adapters, on one GPU (or the CPU reference).")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a model folder on a JSONL file and save the adapter in PEFT's format.
    ///
    /// The model folder is a Hugging Face one (config.json, *.safetensors or a sharded
    /// index; bf16/f16/f32 weights are quantized to NF4 at load, bitsandbytes 4-bit
    /// checkpoints are read as they are). Each JSONL line holds `text` (tokenized with
    /// tokenizer.json) or `input_ids`; documents are packed into rows of --seq-len tokens
    /// and never attend across each other.
    ///
    /// Writes into --out: metrics.jsonl (one line per optimizer step, flushed as written),
    /// loss.svg (the loss curve), and adapter_config.json + adapter_model.safetensors, which
    /// `peft.PeftModel.from_pretrained` loads. Nothing is written over an existing adapter
    /// unless --overwrite.
    ///
    /// Example: `qlora train --model ./Llama-3.2-1B --data train.jsonl --out ./run1 --seq-len 2048
    /// --batch 4 --steps 500 --lr 2e-4 --warmup 20 --rank 16 --checkpointing offload`
    Train(TrainArgs),
    /// Benchmark one training step of a random-weight model (default: the Llama-3.2-1B
    /// shape) on the GPU: tokens/s, step time, memory, MFU; JSON with --json.
    ///
    /// Exit status 3 when no GPU can be opened (nothing measured): `cargo xtask bench fsdp`
    /// reports that as skipped.
    ///
    /// To compare the runtime's paths with one binary, the environment changes its defaults
    /// (for `bench` and `train` alike): `FSDP_FUSED_LORA=0` (adapters in GEMMs of their own),
    /// `FSDP_KEEP_NORMS=0` (without checkpointing, recompute the norm outputs instead of
    /// keeping them: 1.1 GB less at the default shape), `FSDP_LORA_PASS=cublas` (the
    /// adapters' backward as cuBLAS GEMMs instead of one pass over dy).
    ///
    /// Example: `qlora bench --checkpointing off,on,offload --phases --json bench.json`
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    /// The GPU runtime (bf16, or f16 on GPUs without bf16).
    Gpu,
    /// The f32 CPU reference (slow; for tiny models and checks).
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum CkptArg {
    /// Keep every layer's activations (fastest).
    Off,
    /// Keep only layer inputs; recompute each layer before its backward.
    On,
    /// As `on`, with the layer inputs in pinned host memory.
    Offload,
}

impl From<CkptArg> for Checkpointing {
    fn from(c: CkptArg) -> Checkpointing {
        match c {
            CkptArg::Off => Checkpointing::Off,
            CkptArg::On => Checkpointing::On,
            CkptArg::Offload => Checkpointing::Offload,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DecayArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// JSONL training data (`text` or `input_ids` per line).
    #[arg(long)]
    data: PathBuf,
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// tokenizer.json (default: the model folder's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens per packed row.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step (losses normalised by the step's total target count).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Optimizer steps (default: one pass over the data).
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Decay after warm-up.
    #[arg(long, value_enum, default_value_t = DecayArg::Linear)]
    decay: DecayArg,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout on the adapters' input (PEFT's `lora_dropout`, in [0, 1)); new masks
    /// every micro-batch, seeded by --seed. Saved in adapter_config.json.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Projections to adapt, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
    targets: String,
    /// Seed of the LoRA initialisation and of the dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Append the EOS token id to every document (default: config.json's eos_token_id, if any).
    #[arg(long)]
    eos: Option<u32>,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = Device::Gpu)]
    device: Device,
    /// Activation checkpointing (GPU).
    #[arg(long, value_enum, default_value_t = CkptArg::Off)]
    checkpointing: CkptArg,
    /// Replace an adapter already in --out.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Decoder layers (default: the preset's 16).
    #[arg(long)]
    layers: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// LoRA rank (alpha = rank), on all seven projections.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Measured steps (after the warm-up).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Warm-up steps (not measured).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Bytes the LM head + loss may use for its logits chunks (default: 512 MiB; the head
    /// shares that memory with the MLP's buffers, which are dead while it runs).
    #[arg(long)]
    head_budget: Option<usize>,
    /// Activation checkpointing modes to measure, comma-separated (one model, one run each).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off")]
    checkpointing: Vec<CkptArg>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// After the measured steps, run a few more with CUDA events around the phases
    /// (forward, LM head, backward, optimizer) and print where the time went, with the
    /// host's time to queue each phase and the GPU's idle time (not part of the step times).
    #[arg(long)]
    phases: bool,
    /// A Hugging Face model folder instead of random weights (NF4 at load). With
    /// --adapter and --batches, reproduces another tool's run step by step: AdamW lr 2e-4,
    /// betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping (what
    /// `fsdp/py/bench_baselines.py --dump` records).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Initial adapters in PEFT's format (instead of PEFT's default initialisation here).
    #[arg(long, requires = "model")]
    adapter: Option<PathBuf>,
    /// The batches as JSON `[step][row][token]` (one per step; warm-up + measured steps of them).
    #[arg(long, requires = "model")]
    batches: Option<PathBuf>,
}

/// `bench --phases`: five more steps with the phase events on; prints and returns the
/// medians (ms).
fn profile_phases(trainer: &mut GpuTrainer, m: &GpuModel, micros: &[MicroBatch], name: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    trainer.options.profile = true;
    let mut cols: [Vec<f64>; 7] = Default::default();
    for i in 0..5 {
        let t = Instant::now();
        trainer.train_step(m, std::slice::from_ref(&micros[i % micros.len()]))?;
        let wall = t.elapsed().as_secs_f64() * 1e3;
        let p = trainer.phase_times()?.expect("profile is on");
        for (c, v) in cols.iter_mut().zip([wall, p.forward_ms, p.head_ms, p.backward_ms, p.optimizer_ms, p.host_forward_ms, p.host_backward_ms]) {
            c.push(v);
        }
    }
    trainer.options.profile = false;
    let [wall, fwd, head, bwd, opt, hf, hb] = cols.map(|mut c| cudakit::timing::median(&mut c));
    let idle = wall - fwd - head - bwd - opt;
    eprintln!(
        "[{name}] phases (median of 5, ms): step {wall:.1} = forward {fwd:.1} + head {head:.1} + backward {bwd:.1} + optimizer {opt:.1} + GPU idle {idle:.1}; host queued the forward in {hf:.1}, the backward in {hb:.1}"
    );
    Ok(serde_json::json!({"step_ms": wall, "forward_ms": fwd, "head_ms": head, "backward_ms": bwd, "optimizer_ms": opt,
                          "gpu_idle_ms": idle, "host_forward_ms": hf, "host_backward_ms": hb}))
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Bench(a) => bench(a),
    };
    if let Err(e) = r {
        eprintln!("qlora: error: {e:#}");
        std::process::exit(1);
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn parse_targets(s: &str) -> AnyResult<Vec<Proj>> {
    s.split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| Proj::from_name(t).ok_or_else(|| format!("--targets: unknown projection `{t}` (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)").into()))
        .collect()
}

enum Engine {
    Cpu(Box<Trainer>, Llama),
    Gpu(Box<GpuTrainer>, GpuModel),
}

impl Engine {
    fn step(&mut self, micro: &[MicroBatch]) -> fsdp::Result<StepReport> {
        match self {
            Engine::Cpu(t, m) => t.train_step(m, micro),
            Engine::Gpu(t, m) => t.train_step(m, micro),
        }
    }
    fn lora(&self) -> fsdp::Result<Lora> {
        match self {
            Engine::Cpu(t, _) => Ok(t.lora.clone()),
            Engine::Gpu(t, m) => t.lora.download(m.gpu()),
        }
    }
    fn memory(&self) -> usize {
        match self {
            Engine::Cpu(..) => 0,
            Engine::Gpu(t, m) => t.memory(m).total(),
        }
    }
}

fn train(a: TrainArgs) -> AnyResult<()> {
    let adapter = a.out.join("adapter_model.safetensors");
    if adapter.exists() && !a.overwrite {
        return Err(format!("{} already holds an adapter: pass --overwrite to replace it", a.out.display()).into());
    }
    let targets = parse_targets(&a.targets)?;
    if a.batch == 0 || a.grad_accum == 0 {
        return Err("--batch and --grad-accum must be positive".into());
    }
    let t0 = Instant::now();
    eprintln!("loading {} (NF4 at load) ...", a.model.display());
    let model = fsdp::hf::load(&a.model, &BaseFormat::default())?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| a.model.join("tokenizer.json"));
    let tokenizer = if tok_path.exists() { Some(fsdp::data::load_tokenizer(&tok_path)?) } else { None };
    let eos = a.eos.or_else(|| eos_token_id(&a.model.join("config.json")));
    let opts = fsdp::data::TextOptions { tokenizer: tokenizer.as_ref(), add_special_tokens: true, eos };
    let docs = fsdp::data::read_jsonl(&a.data, &opts)?;
    if let Some((i, _)) = docs.iter().flatten().enumerate().find(|(_, &id)| id as usize >= model.config.vocab_size) {
        return Err(format!("{}: token {i} of the data is outside the model's vocabulary ({}): wrong tokenizer for this model?", a.data.display(), model.config.vocab_size).into());
    }
    let packed = fsdp::data::pack(&docs, a.seq_len, eos.unwrap_or(0))?;
    let micro = packed.micro_batches(a.batch)?;
    if micro.is_empty() {
        return Err(format!("{}: no tokens to train on", a.data.display()).into());
    }
    let per_epoch = micro.len().div_ceil(a.grad_accum) as u64;
    let steps = a.steps.unwrap_or(per_epoch);
    eprintln!(
        "{} documents -> {} rows of {} tokens ({:.1}% filled), {} micro-batches, {steps} steps; loaded in {:.1}s",
        docs.len(),
        packed.rows(),
        a.seq_len,
        packed.fill() * 100.0,
        micro.len(),
        t0.elapsed().as_secs_f64()
    );
    let lcfg = LoraConfig { dropout: a.lora_dropout, ..LoraConfig::new(a.rank, a.alpha) }.with_targets(&targets);
    let lora = Lora::init(&model.config, lcfg, a.seed)?;
    let decay = match a.decay {
        DecayArg::Constant => Decay::Constant,
        DecayArg::Linear => Decay::Linear,
        DecayArg::Cosine => Decay::Cosine,
    };
    let config = TrainConfig {
        adamw: AdamWConfig { weight_decay: a.weight_decay, ..Default::default() },
        schedule: Schedule { peak_lr: a.lr, warmup_steps: a.warmup, total_steps: steps, decay },
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        dropout_seed: a.seed,
    };
    let mut engine = match a.device {
        Device::Cpu => Engine::Cpu(Box::new(Trainer::new(lora, config)?), model),
        Device::Gpu => {
            let gpu = cudakit::Gpu::open(0)?;
            let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
            eprintln!("device: {} (sm_{}), {}", gpu.info().name, gpu.info().arch, dtype.name());
            let m = GpuModel::upload(&gpu, &model, dtype)?;
            drop(model);
            let o = RuntimeOptions::for_checkpointing(a.checkpointing.into());
            Engine::Gpu(Box::new(GpuTrainer::new(&m, &lora, config, o)?), m)
        }
    };
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let mut metrics = MetricsWriter::create(&a.out.join("metrics.jsonl"))?;
    let bar = ProgressBar::new(steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template"));
    let mut curve = Vec::new();
    let mut cursor = 0usize;
    for step in 0..steps {
        let group: Vec<MicroBatch> = (0..a.grad_accum).map(|i| micro[(cursor + i) % micro.len()].clone()).collect();
        cursor = (cursor + a.grad_accum) % micro.len();
        let tokens: usize = group.iter().map(|m| m.batch.tokens()).sum();
        let t = Instant::now();
        let r = engine.step(&group)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let m = StepMetrics {
            step,
            loss: r.loss,
            grad_norm: r.grad_norm,
            lr: r.lr,
            targets: r.targets,
            tokens,
            step_ms: ms,
            tokens_per_s: tokens as f64 / (ms / 1e3),
            memory_bytes: engine.memory(),
        };
        metrics.write(&m)?;
        curve.push((step, r.loss));
        bar.set_message(format!("loss {:.4} | {:.0} tok/s | {:.2} GB", r.loss, m.tokens_per_s, m.memory_bytes as f64 / 1e9));
        bar.inc(1);
        if !r.loss.is_finite() {
            bar.abandon();
            write_plot(&a.out, &curve)?;
            return Err(format!("step {step}: the loss is {} — stopping (metrics.jsonl and loss.svg kept; no adapter saved)", r.loss).into());
        }
    }
    bar.finish();
    write_plot(&a.out, &curve)?;
    let trained = engine.lora()?;
    fsdp::peft::save(&a.out, &trained, &a.model.display().to_string())?;
    eprintln!("saved {} (PEFT format), metrics.jsonl, loss.svg in {}", adapter.display(), a.out.display());
    Ok(())
}

/// `eos_token_id` of a config.json (a number, or the first of a list), if any.
fn eos_token_id(path: &Path) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let e = &v["eos_token_id"];
    e.as_u64().or_else(|| e.as_array()?.first()?.as_u64()).and_then(|x| u32::try_from(x).ok())
}

fn write_plot(out: &Path, curve: &[(u64, f64)]) -> AnyResult<()> {
    let svg = loss_svg(&format!("qlora train: {}", out.display()), curve);
    fsdp::atomic::write(&out.join("loss.svg"), svg.as_bytes())?;
    Ok(())
}

fn bench(a: BenchArgs) -> AnyResult<()> {
    let mut config = Config::from_json_str(fsdp::config::LLAMA_3_2_1B, "preset llama-3.2-1b")?;
    if let Some(l) = a.layers {
        config.num_hidden_layers = l;
    }
    let gpu = match cudakit::Gpu::open(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("qlora bench: skipped: no usable GPU: {e}");
            std::process::exit(3);
        }
    };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let t0 = Instant::now();
    let model = match &a.model {
        Some(dir) => {
            eprintln!("loading {} (NF4 at load) ...", dir.display());
            fsdp::hf::load(dir, &BaseFormat::default())?
        }
        None => {
            eprintln!("building a random {}-layer Llama-3.2-1B-shaped model (NF4) ...", config.num_hidden_layers);
            Llama::random(config.clone(), 0, &BaseFormat::default())?
        }
    };
    let config = model.config.clone();
    let m = GpuModel::upload(&gpu, &model, dtype)?;
    drop(model);
    eprintln!("ready in {:.1}s on {}", t0.elapsed().as_secs_f64(), gpu.info().name);
    let lora = match &a.adapter {
        Some(dir) => fsdp::peft::load(dir, &config)?,
        None => Lora::init(&config, LoraConfig::new(a.rank, a.rank as f64), 0)?,
    };
    // One micro-batch per step: the given batches in turn, or one random batch throughout.
    let micros: Vec<MicroBatch> = match &a.batches {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            let steps: Vec<Vec<Vec<u32>>> = serde_json::from_str(&text).map_err(|e| format!("{}: not [step][row][token] ids: {e}", p.display()))?;
            if steps.len() < a.warmup + a.steps {
                return Err(format!("{}: {} batches for {} steps", p.display(), steps.len(), a.warmup + a.steps).into());
            }
            steps
                .into_iter()
                .map(|rows| {
                    let seq = rows.first().map_or(0, Vec::len);
                    Ok(MicroBatch::next_token(Batch::new(rows.concat(), seq)?))
                })
                .collect::<fsdp::Result<_>>()?
        }
        None => {
            let mut rng = fsdp::rng::Rng::new(1234);
            let ids: Vec<u32> = (0..a.batch * a.seq_len).map(|_| (rng.next_u64() % config.vocab_size as u64) as u32).collect();
            vec![MicroBatch::next_token(Batch::new(ids, a.seq_len)?)]
        }
    };
    let (batch, seq_len) = (micros[0].batch.seqs(), micros[0].batch.seq_len);
    let t = batch * seq_len;
    let c = &config;
    // Model FLOPs of one step: forward + backward without weight gradients of the frozen
    // base (2 GEMMs per projection: 4 FLOPs per weight per token), LoRA (6 per parameter),
    // causal attention (half the square; backward 2.5x forward), the frozen LM head (2 GEMMs).
    let proj_params: usize = Proj::ALL.iter().map(|p| { let (o, i) = p.shape(c); o * i }).sum::<usize>() * c.num_hidden_layers;
    let attn = 4.0 * (batch * c.num_attention_heads * c.head_dim) as f64 * (seq_len * seq_len) as f64 / 2.0 * c.num_hidden_layers as f64;
    let flops = 4.0 * t as f64 * proj_params as f64 + 6.0 * t as f64 * lora.num_params() as f64 + attn * 3.5 + 4.0 * t as f64 * (c.vocab_size * c.hidden_size) as f64;
    let mut runs = Vec::new();
    for mode in &a.checkpointing {
        let ckpt = Checkpointing::from(*mode);
        let name = ckpt.name();
        let tc = if a.model.is_some() {
            // The baselines' optimizer (see --model).
            TrainConfig { adamw: AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.0 }, schedule: Schedule::constant(2e-4), max_grad_norm: None, dropout_seed: 0 }
        } else {
            TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-4), max_grad_norm: Some(1.0), dropout_seed: 0 }
        };
        let mut options = RuntimeOptions::for_checkpointing(ckpt);
        if let Some(b) = a.head_budget {
            options.head_budget = b;
        }
        let head_budget = options.head_budget;
        let mut trainer = GpuTrainer::new(&m, &lora, tc, options)?;
        let (mut times, mut losses) = (Vec::new(), Vec::new());
        for i in 0..a.warmup + a.steps {
            let t = Instant::now();
            let r = trainer.train_step(&m, std::slice::from_ref(&micros[i % micros.len()]))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            eprintln!("[{name}] step {i:>3}: loss {:.5} grad_norm {:.4} {:.1} ms", r.loss, r.grad_norm, ms);
            losses.push(r.loss);
            if i >= a.warmup {
                times.push(ms);
            }
        }
        let step_ms = cudakit::timing::median(&mut times.clone());
        let phases = if a.phases { Some(profile_phases(&mut trainer, &m, &micros, name)?) } else { None };
        let mem = trainer.memory(&m);
        let (free, total) = cudakit::cudarc::driver::result::mem_get_info().map_err(|e| format!("cuMemGetInfo: {e}"))?;
        let tokens_per_s = t as f64 / (step_ms / 1e3);
        let tflops = flops / (step_ms / 1e3) / 1e12;
        println!(
            "qlora bench on {} ({} layers, batch {} x {}, LoRA r={} on {} projections, {}, checkpointing {name})",
            gpu.info().name,
            c.num_hidden_layers,
            batch,
            seq_len,
            lora.config.r,
            lora.config.targets.len(),
            dtype.name()
        );
        println!("  step (median of {}): {:.1} ms  ->  {:.0} tokens/s, {:.0} model TFLOP/s", times.len(), step_ms, tokens_per_s, tflops);
        println!(
            "  memory held: {:.3} GB (weights {:.3}, adapters+optimizer {:.3}, activations {:.3}, scratch {:.3}); pinned host {:.3} GB; device in use {:.3} GB",
            mem.total() as f64 / 1e9,
            mem.weights as f64 / 1e9,
            mem.adapters as f64 / 1e9,
            mem.activations as f64 / 1e9,
            mem.scratch as f64 / 1e9,
            mem.host as f64 / 1e9,
            (total - free) as f64 / 1e9
        );
        runs.push(serde_json::json!({
            "checkpointing": name, "step_ms_median": step_ms, "step_ms": times, "tokens_per_s": tokens_per_s,
            "model_tflops": tflops, "losses": losses, "head_budget": head_budget, "phases": phases,
            "memory": {"total": mem.total(), "weights": mem.weights, "adapters": mem.adapters, "activations": mem.activations,
                       "scratch": mem.scratch, "host_pinned": mem.host, "device_in_use": total - free},
        }));
        drop(trainer);
    }
    if let Some(p) = &a.json {
        let j = serde_json::json!({
            "device": gpu.info().name, "layers": c.num_hidden_layers, "batch": batch, "seq_len": seq_len,
            "rank": lora.config.r, "model": a.model.as_ref().map(|p| p.display().to_string()),
            "adapter": a.adapter.as_ref().map(|p| p.display().to_string()), "batches": a.batches.as_ref().map(|p| p.display().to_string()), "dtype": dtype.name(), "warmup": a.warmup, "steps": a.steps,
            "model_flops_per_step": flops, "runs": runs,
        });
        fsdp::atomic::write(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
    }
    Ok(())
}
