//! The CPU f32 reference ops: forward and hand-written backward of every op of a Llama
//! decoder layer with LoRA, one op per file.
//!
//! Conventions: row-major, contiguous; batch x sequence flattened to tokens
//! (`[tokens, features]`). Forward functions write their outputs (and return or write what
//! the backward needs); backward functions overwrite input gradients (`dx`) and accumulate
//! (`+=`) parameter gradients, so gradient accumulation over micro-batches is free.
//! Shapes are asserted: a wrong length is a bug in the caller (the model validates user
//! input and returns errors before calling these).
//!
//! Every backward is tested against central finite differences of `sum(c * forward(x))`
//! (random `c`, random non-zero inputs, odd sizes). These functions are the reference the
//! GPU kernels will be compared with, one kernel per op, same signatures on device buffers.

pub mod attention;
pub mod embedding;
pub mod gemm;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod lora_linear;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub use attention::{attention_backward, attention_forward, AttnShape};
pub use embedding::{embedding_backward, embedding_forward};
pub use gemm::{gemm, Trans};
pub use lora_linear::{lora_linear_backward, lora_linear_forward, Adapter, AdapterGrads, Frozen};
pub use rmsnorm::{rms_norm_backward, rms_norm_forward};
pub use rope::{rope_backward, rope_forward, Rope};
pub use swiglu::{swiglu_backward, swiglu_forward};
