//! # fsdp
//!
//! A QLoRA fine-tuning runtime for Llama-family models (`llama`, `mistral`, `qwen2`): a
//! frozen NF4 base plus LoRA adapters. Two implementations of the same training step:
//! the **CPU f32 reference** ([`model`], [`train`]) and the **GPU runtime** ([`gpu`]: bf16
//! kernels with hand-written backward, activation checkpointing with optional offload to
//! pinned host memory), tested against it. The `qlora` command (`qlora train`, `qlora
//! bench`) drives both. FSDP2 sharding comes next.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | `config.json` (transformers 4 and 5 rope layouts, Llama 3 scaling), errors naming file and field |
//! | [`ops`] | one op per file, forward + hand-written backward, each checked against finite differences |
//! | [`model`] | the decoder's schedule: forward, LM head + cross-entropy through `memlinear`, backward to every LoRA tensor |
//! | [`weights`], [`hf`] | HF names and shapes; model folders (single file or sharded; bf16/f16/f32 or bitsandbytes 4-bit); NF4 at load |
//! | [`lora`], [`peft`] | adapters (PEFT's default init, seeded per tensor) and PEFT's file format |
//! | [`dropout`] | LoRA dropout masks: one counter-based hash on the CPU and the GPU, seeded per micro-step, layer and projection |
//! | [`optim`], [`train`] | AdamW, warm-up + linear/cosine decay, global-norm clipping, gradient accumulation |
//! | [`batch`] | micro-batches: positions, packed documents, next-token targets |
//! | [`data`] | JSONL (`input_ids`, or `text` through a `tokenizer.json`) packed into rows with document ids |
//! | [`gpu`] | the GPU runtime: kernels, flash attention, NF4 + LoRA linear, the training step |
//! | [`report`] | training metrics (JSONL) and the loss-curve SVG |
//!
//! # Design choices
//!
//! - **One buffer per parameter.** Every frozen tensor and every LoRA `A` / `B` (and each
//!   optimizer moment) is its own `Vec<f32>`, never a slice of a flat buffer: FSDP2 shards
//!   each parameter on dim 0, and NF4 payloads on quantization-block boundaries.
//! - **NF4 is decided at load.** The projections are quantized with the `nf4` crate
//!   (bitsandbytes-identical bytes, kept in [`weights::Linear::nf4`]) and the reference
//!   multiplies with their dequantized f32 values, so GPU and CPU share the NF4 bytes and
//!   differ only in arithmetic.
//! - **Gradients are accumulated, never overwritten.** Backward ops add parameter
//!   gradients (`+=`) and the loss is divided by the global count of counted targets of the
//!   whole optimizer step ([`memlinear::Reduction::Mean`]`(Some(n))`), so any split into
//!   micro-batches (or, later, ranks) gives the same gradient.
//! - **Attention keeps the log-sum-exp, not the probabilities**: the flash-attention
//!   contract, so the GPU kernel's saved state can be compared with this one's.
//! - **The LM head never materialises `tokens x vocab`**: it goes through
//!   `memlinear::cpu::run` (frozen head: no dW).
//! - **LoRA dropout draws the same masks on the CPU and the GPU**: a counter-based hash of
//!   (seed, element index) ([`dropout`]), seeded per (step, micro-batch, layer, projection),
//!   so the GPU's training step is tested against the CPU's with dropout on. Only training
//!   drops: [`Llama::forward`] and [`Llama::loss`] are the evaluation forward.
//! - **Out of device memory is [`Error::OutOfMemory`]**: it names what was being allocated
//!   (the base model, the adapters, or a micro-batch's activations in a checkpointing mode),
//!   what the run held, the device's free memory and the option that needs less. A failed
//!   micro-step leaves no buffers behind: the trainer can go on with a smaller batch.
//!
//! Not implemented yet: sliding-window attention beyond the window (refused), rsLoRA/DoRA,
//! sharding across GPUs.
//!
//! Parity with transformers + peft + bitsandbytes (same NF4 bytes, loss, LoRA gradients,
//! 20 AdamW steps, logits of our adapter loaded into peft) is measured on the GPU machine by
//! `examples/parity_dump.rs` + `py/parity_hf.py`; method and numbers in `PARITY.md`.
//!
//! # Example: one training step of a tiny random model
//!
//! ```
//! use fsdp::{BaseFormat, Batch, Config, Llama, Lora, LoraConfig};
//! use fsdp::optim::{AdamWConfig, Schedule};
//! use fsdp::train::{MicroBatch, TrainConfig, Trainer};
//!
//! let config = Config::from_json_str(
//!     r#"{"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
//!         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
//!         "vocab_size": 101}"#,
//!     "config.json",
//! )?;
//! let model = Llama::random(config.clone(), 0, &BaseFormat::default())?; // NF4 projections
//! let lora = Lora::init(&config, LoraConfig::new(8, 16.0), 0)?;            // all 7 projections
//! let train = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-2), max_grad_norm: Some(1.0), dropout_seed: 0 };
//! let mut trainer = Trainer::new(lora, train)?;
//!
//! // two packed documents in one sequence of 8 tokens
//! let batch = Batch::packed(vec![5, 17, 42, 8, 99, 3, 3, 70], vec![0, 0, 0, 1, 1, 1, 1, 1], 8)?;
//! let micro = [MicroBatch::next_token(batch)];
//! let first = trainer.train_step(&model, &micro)?;
//! let second = trainer.train_step(&model, &micro)?;
//! assert_eq!(first.targets, 6); // the last token of each document predicts nothing
//! assert!(second.loss < first.loss);
//!
//! // the adapter, in PEFT's format
//! let dir = std::env::temp_dir().join(format!("fsdp-doctest-{}", std::process::id()));
//! fsdp::peft::save(&dir, &trainer.lora, "tiny-random-llama")?;
//! assert_eq!(fsdp::peft::load(&dir, &config)?, trainer.lora);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), fsdp::Error>(())
//! ```
#![deny(missing_docs)]

pub mod atomic;
pub mod batch;
pub mod config;
pub mod data;
pub mod dropout;
mod error;
pub mod gpu;
pub mod hf;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod proj;
pub mod report;
pub mod rng;
pub mod train;
pub mod weights;

pub use batch::{count_targets, Batch, IGNORE_INDEX};
pub use config::{Config, Llama3Scaling, ModelType};
pub use error::{Error, Result};
pub use lora::{Lora, LoraConfig, LoraPair};
pub use model::{Activations, Llama, StepOutput};
pub use proj::Proj;
pub use weights::{BaseFormat, Linear, TensorData};
