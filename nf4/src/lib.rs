//! bitsandbytes-compatible 4-bit (NF4 and FP4) quantization.
//!
//! # What it does
//!
//! - [`quantize`] on the CPU, bit-identical to `bitsandbytes.functional.quantize_4bit`
//!   (packed codes, absmax, nested absmax; see [`quantize`'s module](mod@quantize) for the
//!   one caveat, the nested offset's summation order).
//! - [`dequantize`] (fast, multi-threaded) and [`dequantize_reference`] (plain) on the CPU,
//!   identical to bitsandbytes' `dequantize_4bit`.
//! - [`GpuQuantized`]: one fused CUDA kernel per tensor that decodes the nested absmax in
//!   registers and writes f32, f16 or bf16, on the caller's stream, allocating nothing but
//!   the output (or writing the caller's buffer). [`capi`] exposes it on raw pointers as
//!   `libnf4.so` for PyTorch (ctypes) and others.
//! - [`Checkpoint`] / [`checkpoint::save`]: bitsandbytes' safetensors keys and quant-state
//!   JSON, read with every field validated, written so that bitsandbytes loads them.
//!
//! # Design choices
//!
//! - **Bit-exactness is the contract.** Every rounding step mirrors bitsandbytes': one f32
//!   multiply then one rounding to the output type; the nested absmax as a multiply and an
//!   add rounded separately (the kernel is compiled with `--fmad=false` and uses
//!   `__fmul_rn`/`__fadd_rn`); the quantizer uses their decision-tree thresholds and
//!   8-bit search verbatim. Tests hold CPU and GPU to fixtures produced by real
//!   bitsandbytes, and to each other.
//! - **One launch.** bitsandbytes (and Unsloth's `fast_dequantize`) decode the nested
//!   absmax with a separate kernel, add the offset with a third, then run the 4-bit kernel.
//!   Ours reads the 8-bit absmax code and does that arithmetic inline: less traffic, one
//!   launch.
//! - **No GPU needed to build or test.** CUDA is loaded at run time (see `cudakit`); GPU
//!   paths return errors, never panic, when there is no driver.
//!
//! # Example
//!
//! ```
//! use half::bf16;
//! use nf4::{dequantize, quantize, QuantizeOptions};
//!
//! let w: Vec<bf16> = (0..4096).map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0)).collect();
//! let q = quantize("w", &w, &[64, 64], &QuantizeOptions::default())?; // nf4, blocksize 64, nested
//! let back: Vec<bf16> = dequantize("w", &q.packed, &q.state)?;
//! let err = w.iter().zip(&back).map(|(a, b)| (a.to_f32() - b.to_f32()).abs()).fold(0f32, f32::max);
//! assert!(err < 0.2);
//! # Ok::<(), nf4::Nf4Error>(())
//! ```
#![deny(missing_docs)]

pub mod capi;
pub mod checkpoint;
pub mod codes;
pub mod dequant;
pub mod element;
mod error;
pub mod gpu;
pub mod quantize;
pub mod rcp;
pub mod state;
#[doc(hidden)]
pub mod testing;

pub use checkpoint::Checkpoint;
pub use codes::QuantType;
pub use dequant::{dequantize, dequantize_into, dequantize_reference};
pub use element::{Element, FloatDtype};
pub use error::{Nf4Error, Result};
pub use gpu::GpuQuantized;
pub use quantize::{quantize, QuantizeOptions, Quantized};
pub use state::{Absmax, PackedStorage, QuantState};
