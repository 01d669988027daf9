//! The GPU runtime: bf16 (or f16) kernels for every op of the training step, each tested
//! against its CPU f32 reference in [`crate::ops`].
//!
//! | module | what |
//! |---|---|
//! | [`kernels`] | element-wise and row kernels: embedding, RMSNorm, RoPE, SwiGLU, casts, AdamW, norms |
//! | [`attention`] | fused causal GQA flash attention with document masks, forward + backward |
//! | [`linear`] | the NF4 base linear (dequantize + cuBLAS GEMM) plus the LoRA path, forward + backward |
//! | [`model`] | the decoder's schedule on the GPU: buffers, forward, backward, optimizer step |
//!
//! # Conventions (every module)
//!
//! - **Raw pointers, caller's stream.** Launchers are `unsafe fn`s taking device addresses
//!   (`u64`, a `CUdeviceptr`) and a `CUstream`, like [`memlinear::gpu::run_raw`]: the
//!   model owns its buffers (cudarc `CudaSlice`s) and hands out addresses. Launchers never
//!   allocate, never synchronize, and check every argument they can check without the
//!   buffers' sizes (zero sizes, null pointers, divisibility), returning [`GpuError`].
//! - **16-bit values are raw `u16`** (no `cuda_fp16.h`, see `cudakit`), with the compute
//!   dtype chosen at run time as [`Dtype`] (`Bf16`, or `F16` on GPUs without bf16):
//!   kernels are C++ templates instantiated for both (and for `f32` where an operand may
//!   be f32), named `<kernel>_<dtype...>`. Arithmetic is f32; rounding to 16 bits is
//!   round-to-nearest-even.
//! - **Token-major 2-D operands with explicit row strides** (elements): `x[t * ld + c]`.
//!   Strides let the fused projections (`q|k|v` in one GEMM output, `gate|up` in another)
//!   be read in place.
//! - **Gradients are accumulated where the CPU reference accumulates** (`+=` into f32
//!   buffers for LoRA gradients and the residual stream's gradient), overwritten elsewhere.
//! - Kernels compile with NVRTC for sm_75..sm_90 (`cudakit::kernel::compile_ptx`);
//!   tensor-core paths may require sm_80 and must then have a fallback that is correct on
//!   sm_75.

pub mod attention;
pub mod kernels;
pub mod linear;
pub mod model;

pub use cudakit::GpuError;
pub use memlinear::Dtype;
