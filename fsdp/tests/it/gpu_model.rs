//! The GPU training step against the CPU f32 reference: loss, every LoRA gradient, and a
//! few AdamW steps, on tiny models whose head width the attention kernel supports (64),
//! with odd sequence lengths and packed documents, without and with LoRA dropout (the
//! same masks on both). Skips without a GPU (fails with `REQUIRE_GPU=1`).

use cudakit::testing::gpu_or_skip;
use fsdp::gpu::model::{Checkpointing, GpuModel, GpuTrainer, RuntimeOptions};
use fsdp::gpu::Dtype;
use fsdp::optim::{AdamWConfig, Schedule};
use fsdp::rng::Rng;
use fsdp::train::{MicroBatch, TrainConfig, Trainer};
use fsdp::{BaseFormat, Batch, Llama, Lora, LoraConfig, Proj};

use super::common::{batch, config, lora_nonzero};

/// Llama: untied head, GQA 4/2 heads of 64, Llama 3 RoPE scaling.
const GPU_LLAMA: &str = r#"{"model_type":"llama","hidden_size":256,"intermediate_size":320,"num_hidden_layers":2,
  "num_attention_heads":4,"num_key_value_heads":2,"head_dim":64,"vocab_size":301,"rms_norm_eps":1e-5,"rope_theta":10000.0,
  "rope_scaling":{"rope_type":"llama3","factor":4.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64},
  "tie_word_embeddings":false}"#;

/// Qwen2: q/k/v biases, tied embeddings, 2/1 heads of 64.
const GPU_QWEN2: &str = r#"{"model_type":"qwen2","hidden_size":128,"intermediate_size":192,"num_hidden_layers":2,
  "num_attention_heads":2,"num_key_value_heads":1,"vocab_size":203,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
  "tie_word_embeddings":true}"#;

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn train_config() -> TrainConfig {
    TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(2e-3), max_grad_norm: Some(1.0), dropout_seed: 0 }
}

/// A random Llama (`GPU_LLAMA` with `layers` layers) on the GPU in `dtype`, non-zero adapters
/// (r 8, alpha 16), and one 2 x 45-token batch with its next-token targets: the model from
/// the seed `Rng::fresh(name)` prints, the batch from that seed `^ salt`.
fn small_llama(gpu: &cudakit::Gpu, name: &str, layers: usize, dtype: Dtype, salt: u64) -> (Lora, Batch, Vec<i64>, GpuModel) {
    let c = config(&GPU_LLAMA.replace(r#""num_hidden_layers":2"#, &format!(r#""num_hidden_layers":{layers}"#)));
    let seed = nf4::testing::Rng::fresh(name).next_u64();
    let model = Llama::random(c.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&model, LoraConfig::new(8, 16.0), seed);
    let mut r = Rng::new(seed ^ salt);
    let b = batch(&mut r, c.vocab_size, 2, 45);
    let t = b.next_token_targets();
    (lora, b, t, GpuModel::upload(gpu, &model, dtype).unwrap())
}

/// One micro-step (normaliser 90) from zeroed gradients with options `o`: its loss, the
/// adapters' gradients and the memory the trainer holds.
fn one_micro_step(gm: &GpuModel, lora: &Lora, b: &Batch, t: &[i64], o: RuntimeOptions) -> (f64, Lora, fsdp::gpu::model::Memory) {
    let mut g = GpuTrainer::new(gm, lora, train_config(), o).unwrap();
    g.zero_grads(gm).unwrap();
    let loss = g.micro_step(gm, b, t, 90.0).unwrap();
    (loss, g.lora.download_grads(gm.gpu()).unwrap(), g.memory(gm))
}

/// One micro-step's loss and gradients on the GPU vs the CPU, then 5 optimizer steps.
fn check(json: &str, dtype: Dtype, seqs: usize, len: usize, targets: &[Proj]) {
    check_with(json, dtype, seqs, len, targets, 0.0, 1);
}

/// As [`check`], with LoRA dropout `dropout` and `micros` micro-batches per step (each
/// draws its own masks, the CPU's and the GPU's alike).
fn check_with(json: &str, dtype: Dtype, seqs: usize, len: usize, targets: &[Proj], dropout: f64, micros: usize) {
    check_opts(json, dtype, seqs, len, targets, dropout, micros, RuntimeOptions::default());
}

/// As [`check_with`], with the runtime's options (the fused adapter on or off).
#[allow(clippy::too_many_arguments)]
fn check_opts(json: &str, dtype: Dtype, seqs: usize, len: usize, targets: &[Proj], dropout: f64, micros: usize, opts: RuntimeOptions) {
    let Some(gpu) = gpu_or_skip("gpu_model") else { return };
    if dtype == Dtype::Bf16 && gpu.info().arch.major < 8 {
        eprintln!("SKIPPED bf16 on sm_{}", gpu.info().arch);
        return;
    }
    let c = config(json);
    let seed = nf4::testing::Rng::fresh("gpu_model").next_u64();
    let model = Llama::random(c.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&model, LoraConfig { dropout, ..LoraConfig::new(8, 16.0) }.with_targets(targets), seed);
    let mut r = Rng::new(seed ^ 7);
    let micro: Vec<MicroBatch> = (0..micros).map(|_| MicroBatch::next_token(batch(&mut r, c.vocab_size, seqs, len))).collect();
    let train_config = || TrainConfig { dropout_seed: seed ^ 0xd, ..train_config() };

    // Gradients of one step (before any update).
    let mut cpu = Trainer::new(lora.clone(), train_config()).unwrap();
    let (cpu_loss, _) = cpu.accumulate(&model, &micro).unwrap();
    let gm = GpuModel::upload(&gpu, &model, dtype).unwrap();
    let mut g = GpuTrainer::new(&gm, &lora, train_config(), opts).unwrap();
    let n: usize = micro.iter().map(|mb| fsdp::count_targets(&mb.targets)).sum();
    let gpu_loss: f64 = micro.iter().map(|mb| g.micro_step(&gm, &mb.batch, &mb.targets, n as f64).unwrap()).sum();
    let what = format!("{} {} seqs={seqs} len={len} dropout={dropout} micros={micros} fused={} seed={seed:#x}", c.model_type.name(), dtype.name(), opts.fused_lora);
    if dropout > 0.0 {
        // the masks matter: the training loss is not the evaluation loss. By how much
        // depends on the adapters' share of the output (seed-dependent: 7e-5 relative was
        // seen); the f64 CPU loss's rounding is ~1e-15, so 1e-6 tells a mask from none.
        let eval: f64 = micro.iter().map(|mb| model.loss(&lora, &mb.batch, &mb.targets, n as f64).unwrap()).sum();
        assert!((cpu_loss - eval).abs() > 1e-6 * eval, "{what}: dropout did not change the CPU loss ({cpu_loss} vs {eval})");
    }
    let loss_err = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
    eprintln!("{what}: loss gpu {gpu_loss:.6} cpu {cpu_loss:.6} rel {loss_err:.2e}");
    assert!(loss_err < 1e-2, "{what}: loss {gpu_loss} vs {cpu_loss}");
    let grads = g.lora.download_grads(gm.gpu()).unwrap();
    let mut worst: f64 = 0.0;
    for ((name, _, got), (_, _, want)) in grads.named_tensors().into_iter().zip(cpu.grads.named_tensors()) {
        assert!(got.iter().all(|x| x.is_finite()), "{what}: {name} has non-finite gradients");
        let e = rel_l2(got, want);
        worst = worst.max(e);
        assert!(e < 6e-2, "{what}: gradient {name}: relative L2 error {e:.3e}");
    }
    eprintln!("{what}: worst LoRA gradient relative L2 error {worst:.2e}");

    // Five optimizer steps from the same start: per-step losses agree.
    let mut cpu = Trainer::new(lora.clone(), train_config()).unwrap();
    let mut g = GpuTrainer::new(&gm, &lora, train_config(), opts).unwrap();
    for step in 0..5 {
        let want = cpu.train_step(&model, &micro).unwrap();
        let got = g.train_step(&gm, &micro).unwrap();
        let e = (got.loss - want.loss).abs() / want.loss.abs();
        eprintln!("{what}: step {step}: loss gpu {:.6} cpu {:.6} rel {e:.2e}; grad norm {:.4} vs {:.4}", got.loss, want.loss, got.grad_norm, want.grad_norm);
        assert!(e < 2e-2, "{what}: step {step}: loss {} vs {}", got.loss, want.loss);
        assert!((got.grad_norm - want.grad_norm).abs() / want.grad_norm < 5e-2, "{what}: step {step}: grad norm");
    }
    let trained = g.lora.download(gm.gpu()).unwrap();
    let moved = rel_l2(trained.tensors()[0], lora.tensors()[0]);
    assert!(moved > 1e-4, "{what}: the adapters did not move");
    let agree = rel_l2(trained.tensors()[0], cpu.lora.tensors()[0]);
    assert!(agree < 5e-2 * moved.max(1e-3) / 1e-3, "{what}: trained adapters diverge from the CPU's ({agree:.2e})");
}

#[test]
fn llama_bf16_packed_odd_lengths() {
    check(GPU_LLAMA, Dtype::Bf16, 2, 37, &Proj::ALL);
}

#[test]
fn llama_f16_one_long_sequence_some_targets() {
    check(GPU_LLAMA, Dtype::F16, 1, 200, &[Proj::Q, Proj::V, Proj::Down]);
}

#[test]
fn qwen2_bias_tied_bf16() {
    check(GPU_QWEN2, Dtype::Bf16, 3, 65, &Proj::ALL);
}

#[test]
fn llama_bf16_dropout_two_micro_batches() {
    check_with(GPU_LLAMA, Dtype::Bf16, 2, 37, &Proj::ALL, 0.1, 2);
}

#[test]
fn qwen2_f16_dropout_some_targets() {
    check_with(GPU_QWEN2, Dtype::F16, 3, 65, &[Proj::Q, Proj::V, Proj::Down], 0.1, 1);
}

/// The adapters in GEMMs of their own (the path before the fused one, still supported):
/// the same checks against the CPU, with and without dropout, biases and some targets.
#[test]
fn separate_adapter_gemms_match_the_cpu() {
    let off = RuntimeOptions { fused_lora: false, ..Default::default() };
    check_opts(GPU_LLAMA, Dtype::Bf16, 2, 37, &Proj::ALL, 0.0, 1, off);
    check_opts(GPU_QWEN2, Dtype::F16, 3, 65, &[Proj::Q, Proj::V, Proj::Down], 0.1, 1, off);
}

/// The fused adapter (on by default) and the separate GEMMs give nearly the same step in
/// every checkpointing mode (they differ only in rounding; in f16), and the fused one holds at
/// most a little more memory (the input buffers' R extra columns).
#[test]
fn fused_and_separate_adapters_agree() {
    let Some(gpu) = gpu_or_skip("gpu_model_fused") else { return };
    // f16: its rounding noise (about 4e-3 relative on these gradients, against 3.5e-2 in
    // bf16, on either path vs the CPU) lets the comparison be tight.
    let dtype = Dtype::F16;
    let (lora, b, t, gm) = small_llama(&gpu, "gpu_model_fused", 3, dtype, 3);
    for mode in [Checkpointing::Off, Checkpointing::On, Checkpointing::Offload] {
        let run = |fused: bool| {
            one_micro_step(&gm, &lora, &b, &t, RuntimeOptions { checkpointing: mode, fused_lora: fused, ..Default::default() })
        };
        let (l0, g0, m0) = run(false);
        let (l1, g1, m1) = run(true);
        assert!((l1 - l0).abs() < 2e-3 * l0.abs(), "{mode:?}: loss fused {l1} vs separate {l0}");
        for ((name, _, got), (_, _, want)) in g1.named_tensors().into_iter().zip(g0.named_tensors()) {
            let e = rel_l2(got, want);
            assert!(e < 2e-2, "{mode:?}: gradient {name}: fused vs separate relative L2 {e:.2e}");
        }
        // Tiny shapes (hidden 256, R up to 24) make the extra columns weigh more than at
        // real ones (qlora bench reports those); bound it loosely here.
        assert!(m1.total() <= m0.total() + m0.total() / 8, "{mode:?}: fused holds {} bytes, separate {}", m1.total(), m0.total());
        eprintln!("{mode:?}: loss fused {l1:.6} separate {l0:.6}; memory fused {} separate {}", m1.total(), m0.total());
    }
}

/// Without checkpointing the backward reads the norm outputs the forward kept (and the
/// fused adapters' `x A^T` from their tails) or recomputes them: the same kernels on the
/// same inputs, so the same values (cuBLAS may pick another split for `dB` when `x A^T`'s
/// row stride differs, so only nearly the same bits); keeping them costs memory.
#[test]
fn kept_norm_outputs_change_no_bits() {
    let Some(gpu) = gpu_or_skip("gpu_model_keep_norms") else { return };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let (lora, b, t, gm) = small_llama(&gpu, "gpu_model_keep_norms", 3, dtype, 7);
    for fused in [true, false] {
        let run = |keep_norms: bool| {
            one_micro_step(&gm, &lora, &b, &t, RuntimeOptions { fused_lora: fused, keep_norms, ..Default::default() })
        };
        let (l0, g0, m0) = run(false);
        let (l1, g1, m1) = run(true);
        assert_eq!(l1, l0, "fused {fused}: the forward must be unchanged");
        let mut same = true;
        for ((name, _, got), (_, _, want)) in g1.named_tensors().into_iter().zip(g0.named_tensors()) {
            let e = rel_l2(got, want);
            assert!(e < 1e-5, "fused {fused}: gradient {name} with the norms kept: relative L2 {e:.2e}");
            same &= got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
        }
        eprintln!("fused {fused}: kept norms' gradients bit-identical: {same}");
        assert!(m1.activations > m0.activations, "fused {fused}: keeping the norms holds no more ({} vs {})", m1.activations, m0.activations);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let Some(gpu) = gpu_or_skip("gpu_model_bad_inputs") else { return };
    let c = config(GPU_QWEN2);
    let model = Llama::random(c.clone(), 1, &BaseFormat::default()).unwrap();
    assert!(GpuModel::upload(&gpu, &model, Dtype::F32).unwrap_err().to_string().contains("bf16 or f16"));
    let f32_model = Llama::random(c.clone(), 1, &BaseFormat::F32).unwrap();
    let e = GpuModel::upload(&gpu, &f32_model, Dtype::F16).err().unwrap().to_string();
    assert!(e.contains("is not NF4"), "{e}");
    let gm = GpuModel::upload(&gpu, &model, Dtype::F16).unwrap();
    let lora = Lora::init(&c, LoraConfig::new(4, 8.0), 0).unwrap();
    let mut g = GpuTrainer::new(&gm, &lora, train_config(), RuntimeOptions::default()).unwrap();
    let mut r = Rng::new(3);
    let mut b = batch(&mut r, c.vocab_size, 1, 16);
    b.ids[5] = c.vocab_size as u32;
    let t = b.next_token_targets();
    let e = g.micro_step(&gm, &b, &t, 1.0).unwrap_err().to_string();
    assert!(e.contains("ids[5]"), "{e}");
    let other = config(GPU_LLAMA);
    let wrong = Lora::init(&other, LoraConfig::new(4, 8.0), 0).unwrap();
    assert!(GpuTrainer::new(&gm, &wrong, train_config(), RuntimeOptions::default()).is_err());
}

/// Checkpointing (recompute) and offload (host round trip through a ring of three device
/// slots, so 5 layers exercise refills) give the unchanged forward and the same gradients.
#[test]
fn checkpointing_and_offload_match_no_checkpointing() {
    let Some(gpu) = gpu_or_skip("gpu_model_checkpointing") else { return };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let (lora, b, t, gm) = small_llama(&gpu, "gpu_model_checkpointing", 5, dtype, 5);
    let run = |mode: Checkpointing| {
        let o = RuntimeOptions { checkpointing: mode, ..Default::default() };
        let mut g = GpuTrainer::new(&gm, &lora, train_config(), o).unwrap();
        let mut losses = vec![];
        for _ in 0..2 {
            g.zero_grads(&gm).unwrap();
            losses.push(g.micro_step(&gm, &b, &t, 50.0).unwrap());
        }
        (losses, g.lora.download_grads(gm.gpu()).unwrap(), g.memory(&gm))
    };
    let (l0, g0, m0) = run(Checkpointing::Off);
    for mode in [Checkpointing::On, Checkpointing::Offload] {
        let (l, g, m) = run(mode);
        assert_eq!(l, l0, "{mode:?}: the forward must be unchanged");
        for ((name, _, got), (_, _, want)) in g.named_tensors().into_iter().zip(g0.named_tensors()) {
            let e = rel_l2(got, want);
            assert!(e < 2e-3, "{mode:?}: gradient {name}: relative L2 {e:.2e}");
        }
        assert!(m.activations < m0.activations, "{mode:?}: {} activation bytes, no less than without checkpointing ({})", m.activations, m0.activations);
        assert!(m.total() < m0.total(), "{mode:?}: {} bytes held, no less than without checkpointing ({})", m.total(), m0.total());
        if mode == Checkpointing::Offload {
            assert!(m.host > 0);
        }
    }
}

/// Phase events: none unless asked for; when on, every phase took GPU time, the forward's
/// queueing was timed, and the step's result is the same as without them.
#[test]
fn phase_times_only_when_asked_and_harmless() {
    let Some(gpu) = gpu_or_skip("gpu_model_phases") else { return };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let c = config(GPU_LLAMA);
    let seed = nf4::testing::Rng::fresh("gpu_model_phases").next_u64();
    let model = Llama::random(c.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&model, LoraConfig::new(8, 16.0), seed);
    let mut r = Rng::new(seed ^ 9);
    let micro = vec![MicroBatch::next_token(batch(&mut r, c.vocab_size, 2, 37))];
    let gm = GpuModel::upload(&gpu, &model, dtype).unwrap();
    let run = |profile: bool| {
        let o = RuntimeOptions { profile, ..Default::default() };
        let mut g = GpuTrainer::new(&gm, &lora, train_config(), o).unwrap();
        let rep = g.train_step(&gm, &micro).unwrap();
        (rep.loss, rep.grad_norm, g.phase_times().unwrap())
    };
    let (l0, n0, none) = run(false);
    assert!(none.is_none());
    let (l1, n1, some) = run(true);
    // The loss is deterministic; the gradient norm's f64 atomics sum in block order.
    assert_eq!(l1, l0, "the events changed the step's loss");
    assert!((n1 - n0).abs() <= 1e-12 * n0, "grad norm {n1} vs {n0}");
    let p = some.expect("profile on");
    for (name, v) in [("forward", p.forward_ms), ("head", p.head_ms), ("backward", p.backward_ms), ("optimizer", p.optimizer_ms), ("host forward", p.host_forward_ms)] {
        assert!(v > 0.0 && v.is_finite(), "{name}: {v} ms");
    }
}

/// With LoRA dropout, checkpointing (the recomputed layer draws the same masks) and
/// offload give the forward of no checkpointing exactly and the same gradients, over two
/// micro-batches (different masks) and a second optimizer step (new masks again).
#[test]
fn checkpointing_with_dropout_matches_no_checkpointing() {
    let Some(gpu) = gpu_or_skip("gpu_model_checkpointing_dropout") else { return };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let c = config(&GPU_LLAMA.replace(r#""num_hidden_layers":2"#, r#""num_hidden_layers":4"#));
    let seed = nf4::testing::Rng::fresh("gpu_model_checkpointing_dropout").next_u64();
    let model = Llama::random(c.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&model, LoraConfig { dropout: 0.1, ..LoraConfig::new(8, 16.0) }, seed);
    let mut r = Rng::new(seed ^ 6);
    let micro: Vec<MicroBatch> = (0..2).map(|_| MicroBatch::next_token(batch(&mut r, c.vocab_size, 2, 45))).collect();
    let gm = GpuModel::upload(&gpu, &model, dtype).unwrap();
    let tc = TrainConfig { dropout_seed: seed, ..train_config() };
    let run = |mode: Checkpointing| {
        let o = RuntimeOptions { checkpointing: mode, ..Default::default() };
        let mut g = GpuTrainer::new(&gm, &lora, tc.clone(), o).unwrap();
        let first = g.train_step(&gm, &micro).unwrap();
        let grads = g.lora.download_grads(gm.gpu()).unwrap();
        let second = g.train_step(&gm, &micro).unwrap();
        (first.loss, second.loss, grads)
    };
    let (a0, b0, g0) = run(Checkpointing::Off);
    for mode in [Checkpointing::On, Checkpointing::Offload] {
        let (a, b, g) = run(mode);
        assert_eq!(a, a0, "{mode:?}: the forward must be unchanged");
        assert!((b - b0).abs() < 1e-3 * b0.abs(), "{mode:?}: step 1 loss {b} vs {b0}");
        for ((name, _, got), (_, _, want)) in g.named_tensors().into_iter().zip(g0.named_tensors()) {
            let e = rel_l2(got, want);
            assert!(e < 2e-3, "{mode:?}: gradient {name}: relative L2 {e:.2e}");
        }
    }
    // and the step is the CPU's, masks included
    let mut cpu = Trainer::new(lora.clone(), tc.clone()).unwrap();
    let want = cpu.train_step(&model, &micro).unwrap().loss;
    assert!((a0 - want).abs() < 1e-2 * want, "step 0 loss: gpu {a0} cpu {want}");
}
