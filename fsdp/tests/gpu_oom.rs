//! Running out of device memory. A test binary of its own: it takes nearly all of the
//! device's memory for a moment, which would fail any test running beside it in the same
//! process. Skips without a GPU (fails with `REQUIRE_GPU=1`).

use cudakit::testing::gpu_or_skip;
use fsdp::gpu::model::{GpuModel, GpuTrainer, RuntimeOptions};
use fsdp::gpu::Dtype;
use fsdp::optim::{AdamWConfig, Schedule};
use fsdp::rng::Rng;
use fsdp::train::TrainConfig;
use fsdp::{BaseFormat, Batch, Config, Error, Llama, Lora, LoraConfig};

/// Llama, 2 layers, 4/2 heads of 64 (the attention kernel's head width).
const LLAMA: &str = r#"{"model_type":"llama","hidden_size":256,"intermediate_size":320,"num_hidden_layers":2,
  "num_attention_heads":4,"num_key_value_heads":2,"head_dim":64,"vocab_size":301,"rms_norm_eps":1e-5,"rope_theta":10000.0,
  "tie_word_embeddings":false}"#;

fn random_batch(r: &mut Rng, vocab: usize, seqs: usize, len: usize) -> (Batch, Vec<i64>) {
    let b = Batch::new((0..seqs * len).map(|_| r.below(vocab) as u32).collect(), len).unwrap();
    let t = b.next_token_targets();
    (b, t)
}

/// Out of device memory, a micro-step is an `Error::OutOfMemory` that names the buffers of
/// its micro-batch and suggests checkpointing; it leaves nothing half-allocated: once the
/// memory is back, the same trainer takes the step and gets the loss of a trainer that
/// never failed.
#[test]
fn out_of_memory_is_named_and_the_trainer_recovers() {
    let Some(gpu) = gpu_or_skip("gpu_oom") else { return };
    let dtype = if gpu.info().arch.major >= 8 { Dtype::Bf16 } else { Dtype::F16 };
    let c = Config::from_json_str(LLAMA, "gpu_oom config").unwrap();
    let model = Llama::random(c.clone(), 7, &BaseFormat::default()).unwrap();
    let gm = GpuModel::upload(&gpu, &model, dtype).unwrap();
    let lora = Lora::init(&c, LoraConfig::new(8, 16.0), 7).unwrap();
    let config = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-3), max_grad_norm: None, dropout_seed: 0 };
    let mut r = Rng::new(11);
    let (small, small_t) = random_batch(&mut r, c.vocab_size, 2, 45);
    // 8 x 512 tokens: tens of MB of activations, far more than the few MB left below.
    let (big, big_t) = random_batch(&mut r, c.vocab_size, 8, 512);

    let mut g = GpuTrainer::new(&gm, &lora, config.clone(), RuntimeOptions::default()).unwrap();
    // A first step loads every kernel and cuBLAS's state while memory is free.
    g.micro_step(&gm, &small, &small_t, 90.0).unwrap();
    gpu.stream().synchronize().unwrap();

    // Take the device's memory in ever smaller pieces until not even 2 MiB is left.
    let mut hog = Vec::new();
    for piece in [1usize << 30, 64 << 20, 2 << 20] {
        while let Ok(b) = gpu.stream().alloc_zeros::<u8>(piece) {
            hog.push(b);
        }
    }
    assert!(!hog.is_empty(), "could not take any device memory");
    let e = g.micro_step(&gm, &big, &big_t, 4096.0).unwrap_err();
    let text = e.to_string();
    let Error::OutOfMemory { what, detail } = &e else { panic!("not an OutOfMemory error: {text}") };
    assert!(what.contains("4096-token micro-batch") && what.contains("checkpointing off"), "{text}");
    assert!(detail.contains("free of") && detail.contains("--checkpointing on"), "{text}");
    assert!(g.memory(&gm).activations == 0 && g.memory(&gm).scratch == 0, "buffers left after the failure: {:?}", g.memory(&gm));
    drop(hog);

    let got = g.micro_step(&gm, &big, &big_t, 4096.0).unwrap();
    let mut fresh = GpuTrainer::new(&gm, &lora, config, RuntimeOptions::default()).unwrap();
    let want = fresh.micro_step(&gm, &big, &big_t, 4096.0).unwrap();
    assert!(got.is_finite() && (got - want).abs() <= 1e-6 * want.abs(), "loss after recovering {got}, fresh trainer {want}");
}
