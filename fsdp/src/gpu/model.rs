//! The decoder's training step on the GPU: the schedule of [`crate::model`] with every op
//! replaced by its kernel, in bf16 (or f16) with f32 accumulation.
//!
//! One layer, forward (`T` tokens, `W = (heads + 2 kv_heads) * head_dim`, `I` intermediate):
//! ```text
//! n   = rmsnorm(x)                      kernels::rms_norm_forward        (n: scratch)
//! qkv = [q|k|v](n)                      linear::forward, one GEMM       (saved, [T, W])
//! q,k = rope(q, k)                      kernels::rope_forward, in place
//! o   = attention(q, k, v)              attention::forward              (saved, + lse)
//! h   = x + o_proj(o)                   h = x (written by the norm above), beta 1
//! n   = rmsnorm(h)
//! gu  = [gate|up](n)                    one GEMM                        (saved, [T, 2I])
//! a   = silu(gate) * up                 kernels::swiglu_forward         (a: scratch)
//! out = h + down(a)                     out = h (written by the norm of h), beta 1
//! ```
//! The residual stream is kept in the compute dtype (as transformers does in bf16
//! training), so the layer inputs `x` and `h` are what the backward's norms read. The
//! SwiGLU product is **recomputed** in the backward rather than saved (`T x I` 16-bit
//! values per layer), and so are the norm outputs under checkpointing; without it they
//! are kept ([`RuntimeOptions::keep_norms`], `2 x T x H` per layer for two row kernels).
//!
//! Backward of one layer, from `dres` (f32, the gradient of the layer's output):
//! ```text
//! down:   dy = dres (as 16-bit)                 -> da (f32 -> 16-bit), dB of down
//! swiglu: dgate, dup written over gu (in place), a recomputed beside them; dA of down
//! gate|up: n recomputed = rmsnorm(h)           -> dn (f32), dA/dB
//! norm 2: dres += rmsnorm'(dn)                 (the residual's gradient now d/dh)
//! o_proj: dy = dres (16-bit)                   -> do (f32 -> 16-bit), dA/dB
//! attention backward                           -> dq|dk|dv, un-rotated in place
//! q|k|v:  n recomputed = rmsnorm(x)            -> dn, dA/dB
//! norm 1: dres += rmsnorm'(dn)                 (now d/dx: the previous layer's output)
//! ```
//! `down`'s `dA` needs `a`, which the SwiGLU backward recomputes from the same read of
//! `gate|up` as its gradients, so `dA` waits for it (fused adapters without dropout; else
//! `a` is recomputed first by its own pass). Layer 0 stops after its adapters' gradients:
//! no `dn` for `q|k|v` (its GEMM and dequantization skipped) and no norm-1 backward, since
//! the embedding below is frozen.
//! **Fused adapters** ([`RuntimeOptions::fused_lora`], on by default): each linear's
//! adapter rides in its base GEMM ([`linear`]'s "Fused adapter"). The buffers that feed
//! the linears carry `R` more columns per row (`Strides`): `n` (`H + max(R_qkv, R_gu)`),
//! the saved `o` (`nq + R_o`), `act` (`I + R_down`) for `x A^T`; `dy16`, `gate|up` and
//! `dqkv` for `s dy B` in the backward. `n` and `act` are overwritten (by the next group,
//! the next layer) before the backward runs, so `q|k|v`'s, `gate|up`'s and `down`'s `xa`
//! are copied out dense after their forward (`[T, R]`, a few µs); `o` is saved with its
//! tail, so `o_proj`'s `xa` is read from there (no copy, no buffer of its own). The
//! extra memory is `T R` 16-bit values per buffer (about 10 MB at the Llama-3.2-1B shape,
//! 8192 tokens, without checkpointing; 2-3 MB with).
//!
//! The LM head and the loss go through `memlinear`'s GPU driver (`run_raw`, frozen head,
//! chunked by a memory budget). Loss normalisation, clipping and AdamW follow the CPU
//! [`crate::train::Trainer`] exactly, so the two can be compared step by step; so do the
//! LoRA dropout masks ([`crate::dropout`]: the same seeds per step, micro-batch, layer and
//! projection, handed to [`linear`] with each part; a recomputed layer draws the same ones).
//!
//! **Activation checkpointing** ([`Checkpointing`]): `Off` keeps every layer's saved
//! activations; `On` keeps only each layer's input and recomputes the layer's forward
//! just before its backward (one layer's activations live at a time); `Offload` also moves
//! the layer inputs, and each layer's attention output (with its adapter tail) and
//! log-sum-exp, to pinned host memory during the forward and prefetches them back during
//! the backward, through rings of device slots (three for the inputs, two for the
//! attention outputs) on a second stream ordered by events, so the copies overlap compute
//! and the recomputation skips the attention forward. The recomputation stops short of the layer's output: `down`'s base and adapter
//! GEMMs are skipped (only its adapter input `a A^T` is recomputed), and the backward
//! reuses the SwiGLU product it left in `act`.
//!
//! Every buffer is allocated once for the largest batch seen and reused; the
//! [`Memory`] report counts them. Buffers whose lifetimes never overlap share memory: the
//! LM head's workspace lives in the MLP's `act | dact (| gate|up)` allocation, dead while
//! the head runs; the attention backward's workspace in `dn`.
//!
//! With [`RuntimeOptions::profile`], CUDA events around the phases say where a step's
//! time went ([`GpuTrainer::phase_times`]; `qlora bench --phases`).

use cudakit::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudakit::Gpu;
use memlinear::gpu::{balanced_chunk, chunk_for_budget, layout, Needs, RawHead, RawOutputs, RawProblem};
use memlinear::{losses, Reduction};

use super::{attention, kernels, linear, Dtype, GpuError};
use crate::batch::{count_targets, Batch, IGNORE_INDEX};
use crate::config::Config;
use crate::dropout::StepDropout;
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig};
use crate::model::Llama;
use crate::ops::{AttnShape, Rope};
use crate::optim::AdamWConfig;
use crate::proj::Proj;
use crate::train::{MicroBatch, StepReport, TrainConfig};

/// Device bytes of an NF4 tensor: packed payload and (nested) absmax.
fn nf4_bytes(q: &nf4::Quantized) -> usize {
    q.state.packed_len()
        + match &q.state.absmax {
            nf4::Absmax::Plain(v) => v.len() * 4,
            nf4::Absmax::Nested { q, absmax2, .. } => q.len() + absmax2.len() * 4 + 256 * 4,
        }
}

/// Device bytes of `model`'s frozen weights on the GPU: NF4 projections, everything else
/// in a 16-bit dtype.
fn weight_bytes(model: &Llama) -> usize {
    let b16 = |v: &[f32]| v.len() * 2;
    let mut bytes = b16(&model.embed) + model.lm_head.as_deref().map_or(0, b16) + b16(&model.norm);
    for w in &model.layers {
        bytes += b16(&w.input_norm) + b16(&w.post_norm);
        for lin in &w.proj {
            bytes += lin.bias.as_deref().map_or(0, b16) + lin.nf4.as_ref().map_or(0, nf4_bytes);
        }
    }
    bytes
}

/// The device's free and total memory, when the driver tells.
fn device_memory(gpu: &Gpu) -> Option<(usize, usize)> {
    gpu.ctx().mem_get_info().ok()
}

fn gpu_err(what: &'static str) -> impl Fn(cudakit::cudarc::driver::DriverError) -> Error {
    move |e| Error::Gpu(GpuError::driver(what)(e))
}

/// A device address.
fn addr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}
fn addr_mut<T>(s: &mut CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr_mut(stream).0
}

/// Counts the bytes of every buffer the runtime allocates (the model's weights, adapters,
/// optimizer state, activations and scratch), so memory can be reported as exactly what
/// we hold, like `torch.cuda.max_memory_allocated`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Frozen weights: NF4 projections, embedding, norms, biases, LM head.
    pub weights: usize,
    /// LoRA master weights, gradients, AdamW moments, 16-bit copies.
    pub adapters: usize,
    /// Saved activations of the forward (for the backward).
    pub activations: usize,
    /// Scratch of the forward and backward (dequantized weights, recomputed values,
    /// gradients in flight, the LM head's workspace).
    pub scratch: usize,
    /// Pinned host memory holding offloaded layer inputs (not device memory).
    pub host: usize,
}

impl Memory {
    /// All device memory of it.
    pub fn total(&self) -> usize {
        self.weights + self.adapters + self.activations + self.scratch
    }
}

fn alloc<T: cudakit::cudarc::driver::DeviceRepr + cudakit::cudarc::driver::ValidAsZeroBits>(
    s: &std::sync::Arc<CudaStream>,
    n: usize,
    counter: &mut usize,
) -> Result<CudaSlice<T>> {
    *counter += n.max(1) * std::mem::size_of::<T>();
    s.alloc_zeros::<T>(n.max(1)).map_err(gpu_err("cuMemAlloc"))
}


struct GpuLayer {
    input_norm: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    /// By [`Proj::index`].
    proj: Vec<nf4::GpuQuantized>,
    bias: Vec<Option<CudaSlice<u16>>>,
}

/// The frozen base model on the GPU: NF4 projections (the same bytes as the CPU model's),
/// embedding, norms, biases and LM head in the compute dtype.
pub struct GpuModel {
    gpu: Gpu,
    /// The configuration.
    pub config: Config,
    /// The compute dtype.
    pub dtype: Dtype,
    embed: CudaSlice<u16>,
    lm_head: Option<CudaSlice<u16>>,
    norm: CudaSlice<u16>,
    layers: Vec<GpuLayer>,
    rope: Rope,
    weight_bytes: usize,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("device", &self.gpu.info().name)
            .field("model_type", &self.config.model_type)
            .field("layers", &self.layers.len())
            .field("dtype", &self.dtype)
            .field("weight_bytes", &self.weight_bytes)
            .finish()
    }
}

impl GpuModel {
    /// Uploads `model` (which must hold NF4 projections: [`crate::BaseFormat::Nf4`]) to
    /// `gpu`, converting the unquantized tensors to `dtype` (`Bf16`, or `F16` on GPUs
    /// without bf16).
    ///
    /// Running out of device memory is an [`Error::OutOfMemory`] that gives the weights'
    /// size and the device's free memory.
    pub fn upload(gpu: &Gpu, model: &Llama, dtype: Dtype) -> Result<GpuModel> {
        let bytes = weight_bytes(model);
        Self::upload_weights(gpu, model, dtype, bytes).map_err(|e| {
            e.naming_out_of_memory(
                || format!("the frozen base model ({:.2} GB: NF4 projections, the rest in {})", bytes as f64 / 1e9, dtype.name()),
                0,
                device_memory(gpu),
                "The base model alone does not fit this device: free memory held by other processes, or use a larger device.",
            )
        })
    }

    fn upload_weights(gpu: &Gpu, model: &Llama, dtype: Dtype, bytes: usize) -> Result<GpuModel> {
        if dtype == Dtype::F32 {
            return Err(Error::arg("dtype", "the GPU runtime computes in bf16 or f16"));
        }
        if dtype == Dtype::Bf16 && gpu.info().arch.major < 8 {
            return Err(Error::arg("dtype", format!("{} (sm_{}) has no bf16: use f16", gpu.info().name, gpu.info().arch)));
        }
        gpu.bind()?;
        let s = gpu.stream();
        let up16 = |v: &[f32]| -> Result<CudaSlice<u16>> {
            s.clone_htod(&v.iter().map(|&x| dtype.to_bits16(x)).collect::<Vec<_>>()).map_err(gpu_err("cuMemcpyHtoD"))
        };
        let embed = up16(&model.embed)?;
        let lm_head = model.lm_head.as_deref().map(up16).transpose()?;
        let norm = up16(&model.norm)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        for (l, w) in model.layers.iter().enumerate() {
            let input_norm = up16(&w.input_norm)?;
            let post_norm = up16(&w.post_norm)?;
            let mut proj = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(7);
            for p in Proj::ALL {
                let lin = &w.proj[p.index()];
                let name = format!("{}.weight", p.path(l));
                let q = lin.nf4.as_ref().ok_or_else(|| {
                    Error::arg("model", format!("`{name}` is not NF4: the GPU runtime needs the model built with BaseFormat::Nf4"))
                })?;
                proj.push(nf4::GpuQuantized::upload(gpu, &name, q)?);
                bias.push(lin.bias.as_deref().map(up16).transpose()?);
            }
            layers.push(GpuLayer { input_norm, post_norm, proj, bias });
        }
        Ok(GpuModel {
            gpu: gpu.clone(),
            config: model.config.clone(),
            dtype,
            embed,
            lm_head,
            norm,
            layers,
            rope: model.rope.clone(),
            weight_bytes: bytes,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn attn_shape(&self, b: &Batch) -> AttnShape {
        let c = &self.config;
        AttnShape { seqs: b.seqs(), seq_len: b.seq_len, heads: c.num_attention_heads, kv_heads: c.num_key_value_heads, head_dim: c.head_dim }
    }
}

/// The adapters on the device, in five flat buffers of the same layout: f32 master
/// weights, f32 gradients, the two AdamW moments, and the 16-bit copies the GEMMs read
/// (refreshed after every optimizer step). Each tensor is a contiguous range (its own
/// parameter: the FSDP step shards each on dim 0); within a layer the tensors are ordered
/// by projection group (`q|k|v`, `o`, `gate|up`, `down`), the group's `A`s first, then its
/// `B`s, so a group's `A` (and `dA`) are one `[sum r, in]` matrix the fused GEMMs use in
/// place, and the optimizer and the norm are one launch each.
pub struct GpuLora {
    /// The adapters' configuration.
    pub config: LoraConfig,
    /// The model's configuration (to rebuild host copies).
    model: Config,
    /// `layer * 7 + proj`: element offsets of `A` and `B` in the flat buffers.
    index: Vec<Option<(usize, usize)>>,
    n: usize,
    p: CudaSlice<f32>,
    g: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
    p16: CudaSlice<u16>,
    bytes: usize,
    /// Micro-steps accumulated into the gradients since they were zeroed: the micro-batch
    /// index of the LoRA dropout seeds (as [`crate::train::Trainer::accumulate`]'s).
    accumulated: u64,
    /// The LoRA dropout of the micro-step being computed (`None`: no dropout), set by
    /// [`GpuTrainer::micro_step`]; every (layer, projection) derives its mask from it.
    dropout: Option<StepDropout>,
}

impl GpuLora {
    /// Uploads `lora` (zero gradients and moments).
    pub fn upload(gpu: &Gpu, model: &Config, lora: &Lora, dtype: Dtype) -> Result<GpuLora> {
        gpu.bind()?;
        let s = gpu.stream();
        let mut index = vec![None; lora.layers() * 7];
        let mut host: Vec<f32> = Vec::with_capacity(lora.num_params());
        for layer in 0..lora.layers() {
            for group in GROUPS {
                let offs: Vec<(Proj, usize)> = group
                    .iter()
                    .filter_map(|&p| {
                        let pair = lora.get(layer, p)?;
                        let at = host.len();
                        host.extend_from_slice(&pair.a);
                        Some((p, at))
                    })
                    .collect();
                for (p, a_off) in offs {
                    let pair = lora.get(layer, p).expect("listed above");
                    index[layer * 7 + p.index()] = Some((a_off, host.len()));
                    host.extend_from_slice(&pair.b);
                }
            }
        }
        let n = host.len();
        let mut bytes = n * 4;
        let p = s.clone_htod(&host).map_err(gpu_err("cuMemcpyHtoD"))?;
        let (g, m, v) = (alloc::<f32>(s, n, &mut bytes)?, alloc::<f32>(s, n, &mut bytes)?, alloc::<f32>(s, n, &mut bytes)?);
        let p16 = alloc::<u16>(s, n, &mut bytes)?;
        let mut out = GpuLora { config: lora.config.clone(), model: model.clone(), index, n, p, g, m, v, p16, bytes, accumulated: 0, dropout: None };
        out.refresh_copies(gpu, dtype)?;
        Ok(out)
    }

    /// Rewrites the 16-bit copies from the f32 master weights.
    fn refresh_copies(&mut self, gpu: &Gpu, dtype: Dtype) -> Result<()> {
        let s = gpu.stream();
        let n = self.n;
        // SAFETY: both buffers hold n elements of the stated dtypes.
        unsafe { kernels::cast(Dtype::F32, addr(&self.p, s), n, dtype, addr_mut(&mut self.p16, s), n, 1, n, s.cu_stream()) }?;
        Ok(())
    }

    fn zero_grads(&mut self, gpu: &Gpu) -> Result<()> {
        self.accumulated = 0;
        gpu.stream().memset_zeros(&mut self.g).map_err(gpu_err("cuMemsetD8"))
    }

    fn download_from(&self, gpu: &Gpu, buf: &CudaSlice<f32>) -> Result<Lora> {
        let s = gpu.stream();
        let flat = s.clone_dtoh(buf).map_err(gpu_err("cuMemcpyDtoH"))?;
        s.synchronize().map_err(gpu_err("cuStreamSynchronize"))?;
        let mut out = Lora::zeros(&self.model, self.config.clone())?;
        for layer in 0..self.index.len() / 7 {
            for p in Proj::ALL {
                if let (Some((a, b)), Some(dst)) = (self.index[layer * 7 + p.index()], out.get_mut(layer, p)) {
                    let (na, nb) = (dst.a.len(), dst.b.len());
                    dst.a.copy_from_slice(&flat[a..a + na]);
                    dst.b.copy_from_slice(&flat[b..b + nb]);
                }
            }
        }
        Ok(out)
    }

    /// The f32 master weights, back on the host.
    pub fn download(&self, gpu: &Gpu) -> Result<Lora> {
        self.download_from(gpu, &self.p)
    }

    /// The accumulated gradients, back on the host (the adapters' layout).
    pub fn download_grads(&self, gpu: &Gpu) -> Result<Lora> {
        self.download_from(gpu, &self.g)
    }
}

/// Whether and how the forward's activations are kept for the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every layer's activations stay on the device (fastest, most memory).
    #[default]
    Off,
    /// Only each layer's input stays on the device; the layer's forward is recomputed
    /// before its backward.
    On,
    /// As `On`, with the layer inputs, and each layer's attention output and log-sum-exp,
    /// copied to pinned host memory during the forward and prefetched back during the
    /// backward, on a second stream (overlapped with compute); the recomputation then skips
    /// the attention forward.
    Offload,
}

impl Checkpointing {
    /// Its name in lower case, as `qlora --checkpointing` spells it: `off`, `on`, `offload`.
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::Off => "off",
            Checkpointing::On => "on",
            Checkpointing::Offload => "offload",
        }
    }
}

/// What one layer's forward keeps for its backward (its input `x` is held apart: see
/// [`Checkpointing`]).
struct Saved {
    r1: CudaSlice<f32>,
    /// `q|k|v` after RoPE, `[T, W]`.
    qkv: CudaSlice<u16>,
    o: CudaSlice<u16>,
    lse: CudaSlice<f32>,
    /// `x + o_proj(o)`, `[T, H]`.
    h: CudaSlice<u16>,
    r2: CudaSlice<f32>,
    /// `gate|up`, `[T, 2I]` (`Off`; with checkpointing it lives in [`Buffers::mlp`]).
    gu: Option<CudaSlice<u16>>,
    /// The two norm outputs (inputs of q|k|v and gate|up, with the fused adapters' `x A^T`
    /// in their tails), `[T, ld.n]` each: kept with [`RuntimeOptions::keep_norms`] (`Off`),
    /// else recomputed in the backward.
    norms: Option<[CudaSlice<u16>; 2]>,
    /// `x A^T` of each group's adapters.
    xa: [CudaSlice<u16>; 4],
}

/// Page-locked host memory (for offloaded layer inputs).
struct Pinned {
    ptr: *mut std::ffi::c_void,
    bytes: usize,
}

impl Pinned {
    fn new(bytes: usize) -> Result<Pinned> {
        // SAFETY: plain allocation; freed in Drop.
        let ptr = unsafe { cudakit::cudarc::driver::result::malloc_host(bytes.max(1), 0) }.map_err(gpu_err("cuMemHostAlloc"))?;
        Ok(Pinned { ptr, bytes })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc; every copy into or out of it has been
        // synchronized before the trainer (its only owner) drops it.
        unsafe { cudakit::cudarc::driver::result::free_host(self.ptr) }.ok();
    }
}

/// Per-layer tensors staged between pinned host memory and a ring of device slots
/// (offload mode). Layer `l` uses slot `l % slots`. A slot is rewritten (by the forward, or
/// by a prefetch) only after its previous copy to the host has finished, and read only after
/// its copy from the host has arrived: events order the copy stream against the compute
/// stream.
struct HostRing {
    /// `host[layer][tensor]`.
    host: Vec<Vec<Pinned>>,
    /// `slots[slot][tensor]`.
    slots: Vec<Vec<CudaSlice<u8>>>,
    /// Which layer each slot holds, and the events after which it may be overwritten /
    /// read.
    holds: Vec<Option<usize>>,
    free: Vec<Option<cudakit::cudarc::driver::CudaEvent>>,
    ready: Vec<Option<cudakit::cudarc::driver::CudaEvent>>,
}

impl HostRing {
    /// `layers` layers of tensors of `sizes` bytes each, through `slots` device slots.
    fn new(s: &std::sync::Arc<CudaStream>, layers: usize, slots: usize, sizes: &[usize], device: &mut usize, host: &mut usize) -> Result<HostRing> {
        let h = (0..layers)
            .map(|_| {
                sizes
                    .iter()
                    .map(|&b| {
                        *host += b;
                        Pinned::new(b)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let d = (0..slots).map(|_| sizes.iter().map(|&b| alloc::<u8>(s, b, device)).collect::<Result<Vec<_>>>()).collect::<Result<_>>()?;
        Ok(HostRing { host: h, slots: d, holds: vec![None; slots], free: (0..slots).map(|_| None).collect(), ready: (0..slots).map(|_| None).collect() })
    }

    fn addrs(&mut self, slot: usize, s: &CudaStream) -> Vec<u64> {
        self.slots[slot].iter_mut().map(|b| addr_mut(b, s)).collect()
    }

    /// Layer `l`'s slot for a forward that writes it: the compute stream first waits until
    /// the slot's previous copy to the host has finished.
    unsafe fn for_write(&mut self, l: usize, s: &CudaStream) -> Result<Vec<u64>> {
        let slot = l % self.slots.len();
        if let Some(ev) = self.free[slot].take() {
            s.wait(&ev).map_err(gpu_err("cuStreamWaitEvent"))?;
        }
        self.holds[slot] = Some(l);
        Ok(self.addrs(slot, s))
    }

    /// Layer `l`'s slot, which must hold it (or be receiving it: then the compute stream
    /// waits for the copy).
    unsafe fn for_read(&mut self, l: usize, what: &str, s: &CudaStream) -> Result<Vec<u64>> {
        let slot = self.holds.iter().position(|h| *h == Some(l)).ok_or_else(|| {
            Error::arg("offload", format!("internal: layer {l}'s {what} is neither on the device nor being fetched"))
        })?;
        if let Some(ev) = self.ready[slot].take() {
            s.wait(&ev).map_err(gpu_err("cuStreamWaitEvent"))?;
        }
        Ok(self.addrs(slot, s))
    }

    /// Queues the copy of layer `l`'s slot to the host on `copy`, after the compute
    /// stream's work so far (layer `l`'s forward wrote and read it).
    unsafe fn offload(&mut self, l: usize, s: &CudaStream, copy: &CudaStream) -> Result<()> {
        let slot = l % self.slots.len();
        copy.join(s).map_err(gpu_err("cuStreamWaitEvent"))?;
        for (b, h) in self.slots[slot].iter().zip(&self.host[l]) {
            cudakit::cudarc::driver::sys::cuMemcpyDtoHAsync_v2(h.ptr, addr(b, copy), h.bytes, copy.cu_stream())
                .result()
                .map_err(gpu_err("cuMemcpyDtoHAsync"))?;
        }
        self.free[slot] = Some(copy.record_event(None).map_err(gpu_err("cuEventRecord"))?);
        Ok(())
    }

    /// Brings layer `l` back into its slot on `copy` (unless the slot still holds it),
    /// after the compute stream is done with the slot and its last copy out has finished.
    unsafe fn prefetch(&mut self, l: usize, s: &CudaStream, copy: &CudaStream) -> Result<()> {
        let slot = l % self.slots.len();
        if self.holds[slot] == Some(l) {
            return Ok(());
        }
        copy.join(s).map_err(gpu_err("cuStreamWaitEvent"))?;
        if let Some(ev) = self.free[slot].take() {
            copy.wait(&ev).map_err(gpu_err("cuStreamWaitEvent"))?;
        }
        for (b, h) in self.slots[slot].iter_mut().zip(&self.host[l]) {
            cudakit::cudarc::driver::sys::cuMemcpyHtoDAsync_v2(addr_mut(b, copy), h.ptr, h.bytes, copy.cu_stream())
                .result()
                .map_err(gpu_err("cuMemcpyHtoDAsync"))?;
        }
        self.holds[slot] = Some(l);
        self.ready[slot] = Some(copy.record_event(None).map_err(gpu_err("cuEventRecord"))?);
        Ok(())
    }

    /// Layer `l`'s backward is queued: its slot may be refilled after it.
    fn release(&mut self, l: usize) {
        let slot = l % self.slots.len();
        if self.holds[slot] == Some(l) {
            self.holds[slot] = None;
        }
    }

    /// Forgets every event and holding (the streams are joined).
    fn reset(&mut self) {
        self.holds.iter_mut().for_each(|h| *h = None);
        self.free.iter_mut().for_each(|e| *e = None);
        self.ready.iter_mut().for_each(|e| *e = None);
    }
}

/// The layer inputs `x_0 .. x_L` (`x_L` is the final norm's input). One per trainer, so
/// the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Inputs {
    /// All on the device.
    Device(Vec<CudaSlice<u16>>),
    /// `x_L` on the device; the other inputs in pinned host memory through a ring of three
    /// device slots, and each layer's attention output `o` (with its adapter tail) and
    /// `lse` through a ring of two, so the recomputation skips the attention forward.
    Offload {
        /// `x_0 .. x_{L-1}`.
        x: HostRing,
        /// `o`, `lse` of each layer.
        attn: HostRing,
        last: CudaSlice<u16>,
        copy: std::sync::Arc<CudaStream>,
    },
}

/// Row strides (elements) of the buffers that feed the linears, and each group's adapter
/// rank sum. With [`RuntimeOptions::fused_lora`] the buffers carry `R` more columns per
/// row, where the linear writes `x A^T` (forward) and `s dy B` (backward) so that the
/// adapter rides in the base GEMM (see [`linear`]'s "Fused adapter"); without, the
/// strides are the dense widths and the tails are empty.
#[derive(Clone, Copy, Debug)]
struct Strides {
    fused: bool,
    /// `R` of q|k|v, o, gate|up, down.
    r: [usize; 4],
    /// `n` (feeds q|k|v and gate|up): `H + max(R_qkv, R_gu)`.
    n: usize,
    /// `o` (feeds o_proj): `nq + R_o`.
    o: usize,
    /// `act` (feeds down): `I + R_down`.
    act: usize,
    /// `gate|up` (dy of gate|up in the backward): `2I + R_gu`.
    gu: usize,
    /// `dy16` (dy of o and down): `H + max(R_o, R_down)`.
    dy16: usize,
    /// `dqkv` (dy of q|k|v): `W + R_qkv`.
    dqkv: usize,
}

impl Strides {
    fn new(k: &Dims, r: [usize; 4], fused: bool) -> Strides {
        let x = |v: usize| if fused { v } else { 0 };
        Strides {
            fused,
            r,
            n: k.hd + x(r[0].max(r[2])),
            o: k.nq + x(r[1]),
            act: k.inter + x(r[3]),
            gu: 2 * k.inter + x(r[2]),
            dy16: k.hd + x(r[1].max(r[3])),
            dqkv: k.w + x(r[0]),
        }
    }
}

/// Buffers for batches of up to `tokens` tokens.
struct Buffers {
    tokens: usize,
    ld: Strides,
    /// Intermediate size (for [`MlpArena`]).
    inter: usize,
    mode: Checkpointing,
    /// [`RuntimeOptions::keep_norms`] in effect (`Off` only).
    keep_norms: bool,
    /// One per layer (`Off`), or one reused by every layer.
    saved: Vec<Saved>,
    inputs: Inputs,
    last_rstd: CudaSlice<f32>,
    /// A norm's output inside a layer; between the layers' forward and backward, the
    /// final norm's output (the LM head's input).
    n: CudaSlice<u16>,
    /// One allocation shared by two lifetimes that never overlap. Inside a layer: the
    /// SwiGLU product `act [T, I]`, its gradient `dact [T, I]` and, with checkpointing,
    /// the layer's `gate|up [T, 2I]` (see [`MlpArena`]). Between the last layer's forward
    /// and the first backward, none of those is live: the LM head + loss use it as their
    /// workspace. So the head's budget costs only what exceeds the MLP's buffers.
    mlp: CudaSlice<u8>,
    rstd_tmp: CudaSlice<f32>,
    dres: CudaSlice<f32>,
    /// f32 `[T, H]`: the embedding's output at the start of the forward; a norm's input
    /// gradient in the backward; the attention backward's workspace in between (when dn
    /// is dead), so sized for the larger of the two.
    dn: CudaSlice<u8>,
    /// 16-bit `[T, H]`: an output gradient in the backward; the LM head's `dhidden`; the
    /// (unread) output of a recomputed layer.
    dy16: CudaSlice<u16>,
    do16: CudaSlice<u16>,
    dqkv: CudaSlice<u16>,
    linear_scratch: CudaSlice<u8>,
    /// Bytes of [`Buffers::mlp`] the head may use.
    head_ws_bytes: usize,
    head_chunk: usize,
    ids: CudaSlice<u32>,
    docs: CudaSlice<u32>,
    targets: CudaSlice<i64>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    loss: CudaSlice<f32>,
    norm_acc: CudaSlice<f64>,
    clip: CudaSlice<f32>,
    activation_bytes: usize,
    scratch_bytes: usize,
    host_bytes: usize,
}

/// Where `act`, `dact` and (with checkpointing) `gate|up` sit in [`Buffers::mlp`]:
/// `[act | dact | gate|up]`, each 256-byte aligned (`act` with row stride `ld.act`,
/// `gate|up` with `ld.gu`).
struct MlpArena {
    dact: usize,
    gu: usize,
    total: usize,
}

impl MlpArena {
    fn new(tokens: usize, inter: usize, ld: &Strides, gate_up: bool) -> MlpArena {
        let up = |b: usize| b.div_ceil(256) * 256;
        let dact = up(tokens * ld.act * 2);
        let gu = dact + up(tokens * inter * 2);
        MlpArena { dact, gu, total: gu + if gate_up { up(tokens * ld.gu * 2) } else { 0 } }
    }

    /// `(gate|up in the arena (meaningful with checkpointing), act, dact)`.
    fn addrs(bufs: &mut Buffers, s: &CudaStream) -> (u64, u64, u64) {
        let tokens = bufs.tokens;
        let inter = bufs.inter;
        let lay = MlpArena::new(tokens, inter, &bufs.ld, false);
        let base = addr_mut(&mut bufs.mlp, s);
        (base + lay.gu as u64, base, base + lay.dact as u64)
    }
}

/// Options of the GPU runtime.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Bytes the LM head + loss may use for its logits chunks and workspace.
    pub head_budget: usize,
    /// Activation checkpointing.
    pub checkpointing: Checkpointing,
    /// Record CUDA events around the phases of each micro-step and optimizer step (see
    /// [`GpuTrainer::phase_times`]). Off by default: the events cost a little.
    pub profile: bool,
    /// Fold the LoRA adapters into the base GEMMs (K-concatenation, [`linear`]'s "Fused
    /// adapter"): on by default; `FSDP_FUSED_LORA=0` in the environment turns the default
    /// off (for comparing the two paths with one binary).
    pub fused_lora: bool,
    /// Without checkpointing, keep each layer's two RMSNorm outputs for the backward
    /// instead of recomputing them there (`2 T (H + R)` 16-bit values per layer: 1.1 GB at
    /// the Llama-3.2-1B shape and 8192 tokens, for two row kernels per layer). On by
    /// default (`FSDP_KEEP_NORMS=0` in the environment turns the default off, to compare);
    /// ignored with checkpointing (a recomputed layer has them at hand).
    pub keep_norms: bool,
    /// How the linears' backward computes the adapters' `g'` and `dB` ([`linear::LoraPass`]):
    /// `Auto` by default; `FSDP_LORA_PASS=cublas` (or `always`, `portable`) in the
    /// environment changes the default, to compare.
    pub lora_pass: linear::LoraPass,
}

/// Where the last micro-step and optimizer step spent their time ([`RuntimeOptions::profile`]):
/// GPU time between CUDA events, and the host's time to queue each phase. When the host's
/// time to queue a phase comes close to the GPU's time for it, the GPU waited on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Embedding, every layer's forward and the final norm (GPU, ms).
    pub forward_ms: f64,
    /// LM head + loss, forward and backward (GPU, ms).
    pub head_ms: f64,
    /// Every layer's backward, with its recomputation under checkpointing (GPU, ms).
    pub backward_ms: f64,
    /// Gradient norm, clipping, AdamW, 16-bit copies (GPU, ms).
    pub optimizer_ms: f64,
    /// Host time to queue the forward (ms).
    pub host_forward_ms: f64,
    /// Host time to queue the backward (ms).
    pub host_backward_ms: f64,
}

/// The events of one profiled step.
#[derive(Default)]
struct PhaseEvents {
    marks: Vec<(&'static str, cudakit::cudarc::driver::CudaEvent)>,
    host_forward_ms: f64,
    host_backward_ms: f64,
}

impl PhaseEvents {
    fn mark(&mut self, name: &'static str, s: &CudaStream) -> Result<()> {
        let ev = s.record_event(Some(cudakit::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(gpu_err("cuEventRecord"))?;
        self.marks.retain(|(n, _)| *n != name);
        self.marks.push((name, ev));
        Ok(())
    }
    fn between(&self, a: &str, b: &str) -> Result<f64> {
        let find = |n: &str| self.marks.iter().find(|(m, _)| *m == n).map(|(_, e)| e);
        match (find(a), find(b)) {
            (Some(x), Some(y)) => Ok(x.elapsed_ms(y).map_err(gpu_err("cuEventElapsedTime"))? as f64),
            _ => Ok(0.0),
        }
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions::for_checkpointing(Checkpointing::Off)
    }
}

impl RuntimeOptions {
    /// The defaults for a checkpointing mode: the LM head may use 512 MiB in every mode.
    /// Its workspace shares one allocation with the MLP's buffers (`act`, `dact`, and with
    /// checkpointing `gate|up`), which are dead while the head runs, so it costs only what
    /// exceeds them: with checkpointing at the Llama-3.2-1B shape and 8192 tokens, nothing.
    pub fn for_checkpointing(checkpointing: Checkpointing) -> RuntimeOptions {
        let head_budget = 512 << 20;
        let fused_lora = std::env::var("FSDP_FUSED_LORA").map_or(true, |v| v != "0");
        let keep_norms = std::env::var("FSDP_KEEP_NORMS").map_or(true, |v| v != "0");
        let lora_pass = match std::env::var("FSDP_LORA_PASS").as_deref() {
            Ok("cublas") => linear::LoraPass::Cublas,
            Ok("always") => linear::LoraPass::Always,
            Ok("portable") => linear::LoraPass::Portable,
            _ => linear::LoraPass::Auto,
        };
        RuntimeOptions { head_budget, checkpointing, profile: false, fused_lora, keep_norms, lora_pass }
    }
}

/// QLoRA training on one GPU: the model, its adapters, AdamW, and the step's buffers.
pub struct GpuTrainer {
    /// The adapters (master weights, gradients, moments).
    pub lora: GpuLora,
    /// Hyper-parameters.
    pub config: TrainConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Options.
    pub options: RuntimeOptions,
    blas: cudakit::blas::Blas,
    bufs: Option<Buffers>,
    phases: PhaseEvents,
}

/// The LoRA references of one projection (16-bit copies and f32 gradients).
fn lora_ref(lora: &GpuLora, layer: usize, p: Proj, s: &CudaStream) -> Option<linear::LoraRef> {
    let (a, b) = lora.index[layer * 7 + p.index()]?;
    let (p16, g) = (addr(&lora.p16, s), addr(&lora.g, s));
    Some(linear::LoraRef {
        a: p16 + (a * 2) as u64,
        b: p16 + (b * 2) as u64,
        r: lora.config.r,
        scale: lora.config.scale(),
        da: g + (a * 4) as u64,
        db: g + (b * 4) as u64,
        dropout: lora.dropout.and_then(|d| d.mask(layer, p)),
    })
}

fn part<'a>(m: &'a GpuModel, lora: &GpuLora, layer: usize, p: Proj, s: &CudaStream) -> linear::Part<'a> {
    let w = &m.layers[layer];
    linear::Part {
        weight: linear::Nf4Ref { weight: &w.proj[p.index()] },
        out_features: p.shape(&m.config).0,
        bias: w.bias[p.index()].as_ref().map_or(0, |b| addr(b, s)),
        lora: lora_ref(lora, layer, p, s),
    }
}

/// The four projection groups of a layer, in schedule order.
const GROUPS: [&[Proj]; 4] = [&[Proj::Q, Proj::K, Proj::V], &[Proj::O], &[Proj::Gate, Proj::Up], &[Proj::Down]];

/// Sizes of one step.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    hd: usize,
    inter: usize,
    nh: usize,
    nkv_h: usize,
    d: usize,
    nq: usize,
    nkv: usize,
    w: usize,
    eps: f32,
    dt: Dtype,
}

impl Dims {
    fn new(m: &GpuModel, tokens: usize) -> Dims {
        let c = &m.config;
        let (nh, nkv_h, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        Dims {
            t: tokens,
            hd: c.hidden_size,
            inter: c.intermediate_size,
            nh,
            nkv_h,
            d,
            nq: nh * d,
            nkv: nkv_h * d,
            w: (nh + 2 * nkv_h) * d,
            eps: c.rms_norm_eps as f32,
            dt: m.dtype,
        }
    }
    /// Byte offset of column `c` in a 16-bit row.
    fn col(c: usize) -> u64 {
        (c * 2) as u64
    }
}

impl GpuTrainer {
    /// A trainer for `lora` on `model`'s device.
    pub fn new(model: &GpuModel, lora: &Lora, config: TrainConfig, options: RuntimeOptions) -> Result<GpuTrainer> {
        lora.config.validate()?;
        crate::model::check_lora(&model.config, lora)?;
        let gpu = model.gpu();
        gpu.bind()?;
        let named = |e: Error| {
            e.naming_out_of_memory(
                || format!("the adapters with their gradients and optimizer state ({} parameters) and cuBLAS's workspace", lora.num_params()),
                model.weight_bytes,
                device_memory(gpu),
                "The base model fits but little is left: free memory held by other processes, or use a smaller rank or fewer target modules.",
            )
        };
        let blas = cudakit::blas::Blas::on(gpu, 32 << 20).map_err(|e| named(e.into()))?;
        let lora = GpuLora::upload(gpu, &model.config, lora, model.dtype).map_err(named)?;
        Ok(GpuTrainer { lora, config, step: 0, options, blas, bufs: None, phases: PhaseEvents::default() })
    }

    /// The phase times of the last micro-step and optimizer step, when
    /// [`RuntimeOptions::profile`] is on (`None` otherwise). Waits for them to finish.
    pub fn phase_times(&self) -> Result<Option<PhaseTimes>> {
        if !self.options.profile {
            return Ok(None);
        }
        let p = &self.phases;
        Ok(Some(PhaseTimes {
            forward_ms: p.between("start", "forward")?,
            head_ms: p.between("forward", "head")?,
            backward_ms: p.between("head", "backward")?,
            optimizer_ms: p.between("optimizer start", "optimizer")?,
            host_forward_ms: p.host_forward_ms,
            host_backward_ms: p.host_backward_ms,
        }))
    }

    fn mark(&mut self, name: &'static str, s: &CudaStream) -> Result<()> {
        if self.options.profile {
            self.phases.mark(name, s)?;
        }
        Ok(())
    }

    /// Bytes held, by kind (after the first step has sized the buffers).
    pub fn memory(&self, model: &GpuModel) -> Memory {
        let (activations, scratch, host) = self.bufs.as_ref().map_or((0, 0, 0), |b| (b.activation_bytes, b.scratch_bytes, b.host_bytes));
        Memory { weights: model.weight_bytes, adapters: self.lora.bytes, activations, scratch, host }
    }

    /// Sizes the activation and scratch buffers for micro-batches of `tokens` tokens (kept
    /// when they are large enough). Out of memory, it leaves none allocated and says which
    /// option would need less.
    fn ensure_buffers(&mut self, m: &GpuModel, tokens: usize) -> Result<()> {
        let mode = self.options.checkpointing;
        let keep_norms = mode == Checkpointing::Off && self.options.keep_norms;
        if self.bufs.as_ref().is_some_and(|b| b.tokens >= tokens && b.mode == mode && b.ld.fused == self.options.fused_lora && b.keep_norms == keep_norms) {
            return Ok(());
        }
        self.bufs = None; // free the old ones first
        self.allocate_buffers(m, tokens, mode, keep_norms).map_err(|e| {
            let fewer = "fewer tokens per micro-batch (qlora: --batch or --seq-len, with --grad-accum to keep the tokens per step)";
            let hint = match mode {
                Checkpointing::Off => format!("Activation checkpointing keeps one layer's activations instead of all (qlora: --checkpointing on, or offload for the least memory); or {fewer}."),
                Checkpointing::On => format!("Checkpointing with offload keeps the layer inputs in host memory (qlora: --checkpointing offload); or {fewer}."),
                Checkpointing::Offload => format!("Use {fewer}."),
            };
            e.naming_out_of_memory(
                || format!("the activations and scratch of a {tokens}-token micro-batch (checkpointing {})", mode.name()),
                m.weight_bytes + self.lora.bytes,
                device_memory(m.gpu()),
                &hint,
            )
        })
    }

    fn allocate_buffers(&mut self, m: &GpuModel, tokens: usize, mode: Checkpointing, keep_norms: bool) -> Result<()> {
        let c = &m.config;
        let s = m.gpu().stream();
        let k = Dims::new(m, tokens);
        let t = tokens;
        let r = self.lora.config.r;
        let rsum = |ps: &[Proj]| ps.iter().filter(|p| self.lora.config.targets(**p)).count() * r;
        let rg = [rsum(GROUPS[0]), rsum(GROUPS[1]), rsum(GROUPS[2]), rsum(GROUPS[3])];
        let ld = Strides::new(&k, rg, self.options.fused_lora);
        let mut act_bytes = 0usize;
        let n_saved = if mode == Checkpointing::Off { c.num_hidden_layers } else { 1 };
        let mut saved = Vec::with_capacity(n_saved);
        for _ in 0..n_saved {
            let a = &mut act_bytes;
            saved.push(Saved {
                r1: alloc(s, t, a)?,
                qkv: alloc(s, t * k.w, a)?,
                // Offload: o and lse live in the attention ring instead.
                o: alloc(s, if mode == Checkpointing::Offload { 0 } else { t * ld.o }, a)?,
                lse: alloc(s, if mode == Checkpointing::Offload { 0 } else { t * k.nh }, a)?,
                h: alloc(s, t * k.hd, a)?,
                r2: alloc(s, t, a)?,
                gu: if mode == Checkpointing::Off { Some(alloc(s, t * ld.gu, a)?) } else { None },
                norms: if keep_norms { Some([alloc(s, t * ld.n, a)?, alloc(s, t * ld.n, a)?]) } else { None },
                // Fused, o_proj's xa stays in o's tail (o is saved): no copy of its own;
                // likewise q|k|v's and gate|up's in the kept norms' tails.
                xa: [
                    alloc(s, if ld.fused && keep_norms { 0 } else { t * rg[0] }, a)?,
                    alloc(s, if ld.fused { 0 } else { t * rg[1] }, a)?,
                    alloc(s, if ld.fused && keep_norms { 0 } else { t * rg[2] }, a)?,
                    alloc(s, t * rg[3], a)?,
                ],
            });
        }
        let mut host_bytes = 0usize;
        let inputs = match mode {
            Checkpointing::Off | Checkpointing::On => {
                Inputs::Device((0..=c.num_hidden_layers).map(|_| alloc(s, t * k.hd, &mut act_bytes)).collect::<Result<_>>()?)
            }
            Checkpointing::Offload => {
                let (a, h, nl) = (&mut act_bytes, &mut host_bytes, c.num_hidden_layers);
                Inputs::Offload {
                    x: HostRing::new(s, nl, 3, &[t * k.hd * 2], a, h)?,
                    attn: HostRing::new(s, nl, 2, &[t * ld.o * 2, t * k.nh * 4], a, h)?,
                    last: alloc(s, t * k.hd, a)?,
                    copy: m.gpu().ctx().new_stream().map_err(gpu_err("cuStreamCreate"))?,
                }
            }
        };
        let last_rstd = alloc(s, t, &mut act_bytes)?;
        let mut sc = 0usize;
        let x = &mut sc;
        // The largest group's scratch (dequantized weights + LoRA temporaries).
        let shape = AttnShape { seqs: 1, seq_len: t, heads: k.nh, kv_heads: k.nkv_h, head_dim: k.d };
        let mut lin = 0usize;
        for (gi, ps) in GROUPS.iter().enumerate() {
            let parts: Vec<_> = ps.iter().map(|&p| part(m, &self.lora, 0, p, s)).collect();
            let in_f = [k.hd, k.nq, k.hd, k.inter][gi];
            let g = linear::Group { parts: &parts, in_features: in_f, dtype: m.dtype };
            lin = lin.max(linear::scratch_bytes(&g, t));
        }
        let n_ = Needs { teacher: false, per_token: true, token_params: 0, class_params: 0, dw_acc: false, db_acc: false };
        let budget = self.options.head_budget;
        let max_chunk = chunk_for_budget(t, k.hd, c.vocab_size, m.dtype, n_, budget)
            .ok_or_else(|| Error::arg("head_budget", format!("{budget} bytes cannot hold even one token's logits")))?;
        let head_chunk = balanced_chunk(max_chunk, t);
        let head_ws_bytes = layout(t, k.hd, c.vocab_size, m.dtype, head_chunk, n_).total;
        let arena = MlpArena::new(t, k.inter, &ld, mode != Checkpointing::Off);
        self.bufs = Some(Buffers {
            tokens: t,
            ld,
            inter: k.inter,
            mode,
            keep_norms,
            saved,
            inputs,
            last_rstd,
            n: alloc(s, t * ld.n, x)?,
            mlp: alloc(s, arena.total.max(head_ws_bytes), x)?,
            rstd_tmp: alloc(s, t, x)?,
            dres: alloc(s, t * k.hd, x)?,
            dn: alloc(s, (t * k.hd * 4).max(attention::backward_workspace_bytes(&shape)), x)?,
            dy16: alloc(s, t * ld.dy16, x)?,
            do16: alloc(s, t * k.nq, x)?,
            dqkv: alloc(s, t * ld.dqkv, x)?,
            linear_scratch: alloc(s, lin, x)?,
            head_ws_bytes,
            head_chunk,
            ids: alloc(s, t, x)?,
            docs: alloc(s, t, x)?,
            targets: alloc(s, t, x)?,
            cos: alloc(s, t * k.d / 2, x)?,
            sin: alloc(s, t * k.d / 2, x)?,
            loss: alloc(s, 1, x)?,
            norm_acc: alloc(s, 1, x)?,
            clip: alloc(s, 1, x)?,
            activation_bytes: act_bytes,
            scratch_bytes: sc,
            host_bytes,
        });
        Ok(())
    }

    /// Uploads a micro-batch's ids, documents, targets and RoPE tables.
    fn upload_batch(&mut self, m: &GpuModel, b: &Batch, targets: &[i64]) -> Result<()> {
        let s = m.gpu().stream();
        let bufs = self.bufs.as_mut().expect("buffers sized before upload");
        let t = b.tokens();
        let (cos, sin) = m.rope.cos_sin(&b.positions);
        s.memcpy_htod(&b.ids, &mut bufs.ids.slice_mut(..t)).map_err(gpu_err("cuMemcpyHtoD"))?;
        if let Some(d) = &b.docs {
            s.memcpy_htod(d, &mut bufs.docs.slice_mut(..t)).map_err(gpu_err("cuMemcpyHtoD"))?;
        }
        s.memcpy_htod(targets, &mut bufs.targets.slice_mut(..t)).map_err(gpu_err("cuMemcpyHtoD"))?;
        s.memcpy_htod(&cos, &mut bufs.cos.slice_mut(..cos.len())).map_err(gpu_err("cuMemcpyHtoD"))?;
        s.memcpy_htod(&sin, &mut bufs.sin.slice_mut(..sin.len())).map_err(gpu_err("cuMemcpyHtoD"))?;
        Ok(())
    }

    /// Forward, loss and backward of one micro-batch: adds its LoRA gradients (of
    /// `sum(token losses) / normalizer`) into the gradient buffers (zero after
    /// [`GpuTrainer::new`] and at the start of every [`GpuTrainer::train_step`]); returns
    /// its loss. With LoRA dropout it draws the masks of micro-batch `i` of optimizer step
    /// [`GpuTrainer::step`], `i` counting the micro-steps since the gradients were last
    /// zeroed: the CPU [`crate::train::Trainer`]'s masks.
    pub fn micro_step(&mut self, m: &GpuModel, b: &Batch, targets: &[i64], normalizer: f64) -> Result<f64> {
        check_batch(m, b, targets)?;
        m.gpu().bind()?;
        // The linears read it per thread; this micro-step runs on this one.
        linear::set_lora_pass(self.options.lora_pass);
        // This micro-step's LoRA dropout: the CPU Trainer's seeds for (step, micro-batch).
        self.lora.dropout = StepDropout::new(self.lora.config.dropout, self.config.dropout_seed, self.step, self.lora.accumulated);
        self.ensure_buffers(m, b.tokens())?;
        self.upload_batch(m, b, targets)?;
        let k = Dims::new(m, b.tokens());
        let shape = m.attn_shape(b);
        let s = m.gpu().stream().clone();
        // SAFETY: every address used below comes from a buffer sized for `b.tokens()`
        // tokens by `ensure_buffers`, in this device's context; all compute runs on its one
        // stream, and the offload copies are ordered against it with events.
        let host = std::time::Instant::now();
        self.mark("start", &s)?;
        unsafe {
            let x0 = self.input_for_write(0, &s)?;
            let bufs = self.bufs.as_mut().expect("sized");
            let emb = addr_mut(&mut bufs.dn, &s);
            kernels::embedding_forward(k.dt, addr(&m.embed, &s), m.config.vocab_size, k.hd, addr(&bufs.ids, &s), k.t, emb, s.cu_stream())?;
            kernels::cast(Dtype::F32, emb, k.hd, k.dt, x0, k.hd, k.t, k.hd, s.cu_stream())?;
            let nl = m.config.num_hidden_layers;
            for l in 0..nl {
                let x = self.input_for_read(l, &s)?;
                let out = self.input_for_write(l + 1, &s)?;
                let slot = if self.options.checkpointing == Checkpointing::Off { l } else { 0 };
                self.layer_forward(m, &k, &shape, b.docs.is_some(), l, slot, x, out, false, &s)?;
                self.offload_input(l, &s)?;
            }
            let last = self.input_for_read_unchecked(nl, &s);
            let bufs = self.bufs.as_mut().expect("sized");
            let (lr, hidden) = (addr_mut(&mut bufs.last_rstd, &s), addr_mut(&mut bufs.n, &s));
            kernels::rms_norm_forward(k.dt, k.dt, last, k.hd, addr(&m.norm, &s), k.t, k.hd, k.eps, hidden, k.hd, lr, s.cu_stream())?;
            self.mark("forward", &s)?;
            self.phases.host_forward_ms = host.elapsed().as_secs_f64() * 1e3;
            let loss = self.head(m, b, normalizer)?;
            let host = std::time::Instant::now();
            let bufs = self.bufs.as_mut().expect("sized");
            let dres = addr_mut(&mut bufs.dres, &s);
            kernels::rms_norm_backward(k.dt, k.dt, k.dt, addr(&bufs.dy16, &s), k.hd, last, k.hd, addr(&m.norm, &s), addr(&bufs.last_rstd, &s), k.t, k.hd, dres, k.hd, false, s.cu_stream())?;
            for l in (0..nl).rev() {
                if l > 0 {
                    self.prefetch_input(l - 1, &s)?;
                }
                let x = self.input_for_read(l, &s)?;
                let recomputed = self.options.checkpointing != Checkpointing::Off;
                if recomputed {
                    // Recompute the layer up to what its backward reads (not its output).
                    self.layer_forward(m, &k, &shape, b.docs.is_some(), l, 0, x, 0, true, &s)?;
                }
                let slot = if recomputed { 0 } else { l };
                // dy16 holds the 16-bit dres for down except for the last layer: the final
                // norm's backward reads dy16 (the head's dhidden), so it cannot write it.
                self.layer_backward(m, &k, &shape, b.docs.is_some(), l, slot, x, recomputed, l + 1 < nl, &s)?;
                self.release_input(l)?;
            }
            // Layer 0 stopped at its adapters: the embedding is frozen, so no gradient flows
            // into it (dres holds layer 1's input gradient, unused).
            self.finish_offload(&s)?;
            self.mark("backward", &s)?;
            self.phases.host_backward_ms = host.elapsed().as_secs_f64() * 1e3;
            self.lora.accumulated += 1;
            Ok(loss)
        }
    }

    /// The device address of layer input `l` (`l == layers`: the final norm's input) for
    /// a forward that writes it; in offload mode, waits until its ring slot's previous copy
    /// to the host has finished.
    unsafe fn input_for_write(&mut self, l: usize, s: &std::sync::Arc<CudaStream>) -> Result<u64> {
        let bufs = self.bufs.as_mut().expect("sized");
        Ok(match &mut bufs.inputs {
            Inputs::Device(v) => addr_mut(&mut v[l], s),
            Inputs::Offload { x, last, .. } if l == x.host.len() => addr_mut(last, s),
            Inputs::Offload { x, .. } => x.for_write(l, s)?[0],
        })
    }

    /// The device address of layer input `l`, which must be on the device (or on its way
    /// there: then the compute stream waits for the copy).
    unsafe fn input_for_read(&mut self, l: usize, s: &std::sync::Arc<CudaStream>) -> Result<u64> {
        let bufs = self.bufs.as_mut().expect("sized");
        Ok(match &mut bufs.inputs {
            Inputs::Device(v) => addr(&v[l], s),
            Inputs::Offload { x, last, .. } if l == x.host.len() => addr(last, s),
            Inputs::Offload { x, .. } => x.for_read(l, "input", s)?[0],
        })
    }

    fn input_for_read_unchecked(&self, l: usize, s: &CudaStream) -> u64 {
        let bufs = self.bufs.as_ref().expect("sized");
        match &bufs.inputs {
            Inputs::Device(v) => addr(&v[l], s),
            Inputs::Offload { last, .. } => addr(last, s),
        }
    }

    /// Offload mode: layer `l`'s attention output and lse for a forward that writes them
    /// (`restored`: the recomputation, which reads them back instead); `None` in the other
    /// modes (they live in `saved`).
    unsafe fn attn_ring(&mut self, l: usize, restored: bool, s: &CudaStream) -> Result<Option<(u64, u64)>> {
        let bufs = self.bufs.as_mut().expect("sized");
        Ok(match &mut bufs.inputs {
            Inputs::Offload { attn, .. } => {
                let a = if restored { attn.for_read(l, "attention output", s)? } else { attn.for_write(l, s)? };
                Some((a[0], a[1]))
            }
            Inputs::Device(_) => None,
        })
    }

    /// Offload mode: queues the copies of layer `l`'s input, attention output and lse to
    /// the host on the copy stream, after the compute stream's work so far (layer `l`'s
    /// forward).
    unsafe fn offload_input(&mut self, l: usize, s: &std::sync::Arc<CudaStream>) -> Result<()> {
        let bufs = self.bufs.as_mut().expect("sized");
        if let Inputs::Offload { x, attn, copy, .. } = &mut bufs.inputs {
            x.offload(l, s, copy)?;
            attn.offload(l, s, copy)?;
        }
        Ok(())
    }

    /// Offload mode: brings layer `l`'s input, attention output and lse back into their
    /// ring slots on the copy stream (unless still there), after the compute stream is done
    /// with the slots.
    unsafe fn prefetch_input(&mut self, l: usize, s: &std::sync::Arc<CudaStream>) -> Result<()> {
        let bufs = self.bufs.as_mut().expect("sized");
        if let Inputs::Offload { x, attn, copy, .. } = &mut bufs.inputs {
            x.prefetch(l, s, copy)?;
            attn.prefetch(l, s, copy)?;
        }
        Ok(())
    }

    /// Offload mode: layer `l`'s backward is queued; its slots may be refilled after it.
    unsafe fn release_input(&mut self, l: usize) -> Result<()> {
        let bufs = self.bufs.as_mut().expect("sized");
        if let Inputs::Offload { x, attn, .. } = &mut bufs.inputs {
            x.release(l);
            attn.release(l);
        }
        Ok(())
    }

    /// Offload mode: the compute stream waits for every copy (so the host buffers and the
    /// rings are quiet between steps).
    unsafe fn finish_offload(&mut self, s: &std::sync::Arc<CudaStream>) -> Result<()> {
        let bufs = self.bufs.as_mut().expect("sized");
        if let Inputs::Offload { x, attn, copy, .. } = &mut bufs.inputs {
            s.join(copy).map_err(gpu_err("cuStreamWaitEvent"))?;
            x.reset();
            attn.reset();
        }
        Ok(())
    }

    /// One layer's forward from input `x` into output `out` (16-bit `[T, H]`), keeping its
    /// activations in `saved[slot]`. `recompute`: the checkpointed backward's recomputation,
    /// which needs the saved activations, the SwiGLU product `act` and `down`'s adapter
    /// input `x A^T` but not the output: `down`'s base and adapter GEMMs are skipped (`out`
    /// is not written and may be 0).
    #[allow(clippy::too_many_arguments)]
    unsafe fn layer_forward(&mut self, m: &GpuModel, k: &Dims, shape: &AttnShape, has_docs: bool, l: usize, slot: usize, x: u64, out: u64, recompute: bool, s: &std::sync::Arc<CudaStream>) -> Result<()> {
        let st = s.cu_stream();
        let Dims { t, hd, inter, nh, nkv_h, d, nq, nkv, w, eps, dt } = *k;
        // Offload: o and lse in the attention ring; the recomputation finds them restored.
        let ring = self.attn_ring(l, recompute, s)?;
        let bufs = self.bufs.as_mut().expect("sized");
        let n = addr_mut(&mut bufs.n, s);
        let (gu_arena, act, _) = MlpArena::addrs(bufs, s);
        let (ls, lsb) = (addr_mut(&mut bufs.linear_scratch, s), bufs.linear_scratch.len());
        let (cos, sin) = (addr(&bufs.cos, s), addr(&bufs.sin, s));
        let docs = if has_docs { addr(&bufs.docs, s) } else { 0 };
        let wl = &m.layers[l];
        let sv = &mut bufs.saved[slot];
        let (r1, qkv) = (addr_mut(&mut sv.r1, s), addr_mut(&mut sv.qkv, s));
        let (o, lse) = ring.unwrap_or_else(|| (addr_mut(&mut sv.o, s), addr_mut(&mut sv.lse, s)));
        let (h, r2) = (addr_mut(&mut sv.h, s), addr_mut(&mut sv.r2, s));
        let gu = sv.gu.as_mut().map_or(gu_arena, |g| addr_mut(g, s));
        let [xa0, xa1, xa2, xa3] = &mut sv.xa;
        let xa = [addr_mut(xa0, s), addr_mut(xa1, s), addr_mut(xa2, s), addr_mut(xa3, s)];
        // The norms' outputs: kept per layer (with their xa tails), or the shared scratch.
        let kept = sv.norms.is_some();
        let (n1, n2) = sv.norms.as_mut().map_or((n, n), |[a, b]| (addr_mut(a, s), addr_mut(b, s)));
        let ld = bufs.ld;
        let parts: Vec<Vec<linear::Part>> = GROUPS.iter().map(|ps| ps.iter().map(|&p| part(m, &self.lora, l, p, s)).collect()).collect();
        let group = |gi: usize, in_features: usize| linear::Group { parts: &parts[gi], in_features, dtype: dt };
        // Fused: xa goes into the input's tail (columns `cols ..` of `x`, stride `ldx`) and
        // is copied out dense to `keep` for the backward (n and act are overwritten before
        // it runs); o's tail is kept as it is (o is saved). Else the dense xa directly.
        let xa_at = |x: u64, cols: usize, ldx: usize, dense: u64, gi: usize| if ld.fused && ld.r[gi] > 0 { (x + Dims::col(cols), ldx) } else { (dense, ld.r[gi]) };
        let keep = |x: u64, cols: usize, ldx: usize, dense: u64, gi: usize| -> Result<()> {
            if ld.fused && ld.r[gi] > 0 && !(kept && (gi == 0 || gi == 2)) {
                kernels::cast(dt, x + Dims::col(cols), ldx, dt, dense, ld.r[gi], t, ld.r[gi], st)?;
            }
            Ok(())
        };

        // h starts as x (o_proj accumulates onto it): copied by the norm from its read of x.
        kernels::rms_norm_forward_copy(dt, dt, x, hd, addr(&wl.input_norm, s), t, hd, eps, n1, ld.n, r1, h, hd, st)?;
        let (xp, ldxa) = xa_at(n1, hd, ld.n, xa[0], 0);
        linear::forward(&self.blas, &group(0, hd), t, n1, ld.n, qkv, w, dt, 0.0, xp, ldxa, ls, lsb, st)?;
        keep(n1, hd, ld.n, xa[0], 0)?;
        let (kk, vv) = (qkv + Dims::col(nq), qkv + Dims::col(nq + nkv));
        kernels::rope_forward(dt, qkv, w, t, nh, d, cos, sin, st)?;
        kernels::rope_forward(dt, kk, w, t, nkv_h, d, cos, sin, st)?;
        if !(recompute && ring.is_some()) {
            let fwd = attention::AttnForward { shape: *shape, dtype: dt, q: qkv, ldq: w, k: kk, ldk: w, v: vv, ldv: w, docs, o, ldo: ld.o, lse };
            attention::forward(&fwd, st)?;
        }
        let (xp, ldxa) = xa_at(o, nq, ld.o, xa[1], 1);
        linear::forward(&self.blas, &group(1, nq), t, o, ld.o, h, hd, dt, 1.0, xp, ldxa, ls, lsb, st)?;
        // Likewise out starts as h (down accumulates onto it), unless recomputing.
        let copy = if recompute { 0 } else { out };
        kernels::rms_norm_forward_copy(dt, dt, h, hd, addr(&wl.post_norm, s), t, hd, eps, n2, ld.n, r2, copy, hd, st)?;
        let (xp, ldxa) = xa_at(n2, hd, ld.n, xa[2], 2);
        linear::forward(&self.blas, &group(2, hd), t, n2, ld.n, gu, ld.gu, dt, 0.0, xp, ldxa, ls, lsb, st)?;
        keep(n2, hd, ld.n, xa[2], 2)?;
        kernels::swiglu_forward(dt, gu, ld.gu, gu + Dims::col(inter), ld.gu, act, ld.act, t, inter, st)?;
        if recompute {
            linear::forward_adapter_input(&self.blas, &group(3, inter), t, act, ld.act, xa[3], ld.r[3], ls, lsb, st)?;
        } else {
            let (xp, ldxa) = xa_at(act, inter, ld.act, xa[3], 3);
            linear::forward(&self.blas, &group(3, inter), t, act, ld.act, out, hd, dt, 1.0, xp, ldxa, ls, lsb, st)?;
            keep(act, inter, ld.act, xa[3], 3)?;
        }
        Ok(())
    }

    /// The LM head + cross-entropy (frozen head) on the final hidden states; writes
    /// `dhidden` and returns the loss. Synchronizes the stream.
    unsafe fn head(&mut self, m: &GpuModel, b: &Batch, normalizer: f64) -> Result<f64> {
        let c = &m.config;
        let s = m.gpu().stream().clone();
        let t = b.tokens();
        let bufs = self.bufs.as_mut().expect("sized");
        let w = m.lm_head.as_ref().unwrap_or(&m.embed);
        let p = RawProblem {
            tokens: t,
            vocab: c.vocab_size,
            dtype: m.dtype,
            student: RawHead { x: addr(&bufs.n, &s), w: addr(w, &s), bias: 0, hidden: c.hidden_size },
            teacher: None,
            targets: addr(&bufs.targets, &s),
            ignore_index: IGNORE_INDEX,
            token_params: vec![],
            class_params: vec![],
            grad_tokens: 0,
        };
        let o = RawOutputs {
            loss: addr_mut(&mut bufs.loss, &s),
            per_token: 0,
            dx: addr_mut(&mut bufs.dy16, &s),
            dw: 0,
            dw_dtype: Dtype::F32,
            db: 0,
            accumulate: false,
        };
        let (ws, wsb) = (addr_mut(&mut bufs.mlp, &s), bufs.head_ws_bytes);
        memlinear::gpu::run_raw(head_loss(), &p, Reduction::Mean(Some(normalizer)), &o, bufs.head_chunk.min(t), ws, wsb, s.cu_stream())?;
        let mut loss = [0f32];
        s.memcpy_dtoh(&bufs.loss, &mut loss).map_err(gpu_err("cuMemcpyDtoH"))?;
        self.mark("head", &s)?;
        s.synchronize().map_err(gpu_err("cuStreamSynchronize"))?;
        Ok(loss[0] as f64)
    }

    /// One layer's backward from `dres` (the gradient of its output, f32, updated in place
    /// to the gradient of its input), with its activations in `saved[slot]` and input `x`.
    /// `act_ready`: the SwiGLU product is still in `act` (a recomputed forward just wrote
    /// it), so it is not recomputed again. `dy16_ready`: `dy16` already holds `dres` in
    /// 16-bit (the next layer's input-norm backward wrote it beside `dres`). Each norm's
    /// backward writes that 16-bit copy for the GEMM after it, instead of a cast pass; in
    /// between, nothing else writes `dy16` (the recomputed forward does not use it).
    #[allow(clippy::too_many_arguments)]
    unsafe fn layer_backward(&mut self, m: &GpuModel, k: &Dims, shape: &AttnShape, has_docs: bool, l: usize, slot: usize, x: u64, act_ready: bool, dy16_ready: bool, s: &std::sync::Arc<CudaStream>) -> Result<()> {
        let st = s.cu_stream();
        let Dims { t, hd, inter, nh, nkv_h, d, nq, nkv, w, eps, dt } = *k;
        let ring = self.attn_ring(l, true, s)?;
        let bufs = self.bufs.as_mut().expect("sized");
        let n = addr_mut(&mut bufs.n, s);
        let (gu_arena, act, dact) = MlpArena::addrs(bufs, s);
        let (dres, dn, dy16) = (addr_mut(&mut bufs.dres, s), addr_mut(&mut bufs.dn, s), addr_mut(&mut bufs.dy16, s));
        let (do16, dqkv) = (addr_mut(&mut bufs.do16, s), addr_mut(&mut bufs.dqkv, s));
        // A recomputed norm's rstd (equal to the saved one) goes here, not over it.
        let rstd_tmp = addr_mut(&mut bufs.rstd_tmp, s);
        let (ls, lsb) = (addr_mut(&mut bufs.linear_scratch, s), bufs.linear_scratch.len());
        let (aws, awsb) = (dn, bufs.dn.len());
        let (cos, sin) = (addr(&bufs.cos, s), addr(&bufs.sin, s));
        let docs = if has_docs { addr(&bufs.docs, s) } else { 0 };
        let wl = &m.layers[l];
        let sv = &mut bufs.saved[slot];
        let (r1, qkv) = (addr(&sv.r1, s), addr(&sv.qkv, s));
        let (o, lse) = ring.unwrap_or_else(|| (addr(&sv.o, s), addr(&sv.lse, s)));
        let (h, r2) = (addr(&sv.h, s), addr(&sv.r2, s));
        let gu = sv.gu.as_mut().map_or(gu_arena, |g| addr_mut(g, s));
        let ld = bufs.ld;
        let kept = sv.norms.as_ref().map(|[a, b]| (addr(a, s), addr(b, s)));
        // xa: o_proj's in o's tail when fused (o is saved with it), q|k|v's and gate|up's in
        // the kept norms' tails when fused, else their own.
        let tail_of = |x: Option<u64>, cols: usize, ldx: usize, own: &CudaSlice<u16>, gi: usize| match x {
            Some(x) if ld.fused && ld.r[gi] > 0 => (x + Dims::col(cols), ldx),
            _ => (addr(own, s), ld.r[gi]),
        };
        let xas = [
            tail_of(kept.map(|k| k.0), hd, ld.n, &sv.xa[0], 0),
            tail_of(Some(o), nq, ld.o, &sv.xa[1], 1),
            tail_of(kept.map(|k| k.1), hd, ld.n, &sv.xa[2], 2),
            tail_of(None, 0, 0, &sv.xa[3], 3),
        ];
        let (xa, ldxa) = (xas.map(|v| v.0), xas.map(|v| v.1));
        let parts: Vec<Vec<linear::Part>> = GROUPS.iter().map(|ps| ps.iter().map(|&p| part(m, &self.lora, l, p, s)).collect()).collect();
        let group = |gi: usize, in_features: usize| linear::Group { parts: &parts[gi], in_features, dtype: dt };
        // Fused: dy buffers carry R more columns for g' (the linear falls back by itself
        // where a part drops).
        let tail = ld.fused;

        // down_proj (its input, the SwiGLU product, recomputed)
        if !dy16_ready {
            kernels::cast(Dtype::F32, dres, hd, dt, dy16, ld.dy16, t, hd, st)?;
        }
        let up = gu + Dims::col(inter);
        // Fused without dropout, down's dA waits for the SwiGLU backward, which writes the
        // product beside its gradients from the same read of gate|up: no separate
        // recomputation pass. (g' stays in dy16's tail in between.)
        let defer = tail && !act_ready && !group(3, inter).has_dropout();
        if defer {
            linear::backward_deferring_a_grads(&self.blas, &group(3, inter), t, xa[3], ldxa[3], dy16, ld.dy16, dact, inter, dt, 0.0, ls, lsb, st)?;
            kernels::swiglu_backward_and_product(dt, dact, inter, gu, ld.gu, up, ld.gu, gu, ld.gu, up, ld.gu, act, ld.act, t, inter, st)?;
            linear::backward_a_grads(&self.blas, &group(3, inter), t, act, ld.act, dy16, ld.dy16, st)?;
        } else {
            if !act_ready {
                kernels::swiglu_forward(dt, gu, ld.gu, up, ld.gu, act, ld.act, t, inter, st)?;
            }
            linear::backward(&self.blas, &group(3, inter), t, act, ld.act, xa[3], ldxa[3], dy16, ld.dy16, tail, dact, inter, dt, 0.0, ls, lsb, st)?;
            // SwiGLU, in place over gate|up
            kernels::swiglu_backward(dt, dact, inter, gu, ld.gu, up, ld.gu, gu, ld.gu, up, ld.gu, t, inter, st)?;
        }
        // gate|up, post-attention norm (its output kept or recomputed)
        let n2 = match kept {
            Some((_, n2)) => n2,
            None => {
                kernels::rms_norm_forward(dt, dt, h, hd, addr(&wl.post_norm, s), t, hd, eps, n, ld.n, rstd_tmp, st)?;
                n
            }
        };
        linear::backward(&self.blas, &group(2, hd), t, n2, ld.n, xa[2], ldxa[2], gu, ld.gu, tail, dn, hd, Dtype::F32, 0.0, ls, lsb, st)?;
        // ... and dres in 16-bit into dy16: o_proj's dy.
        kernels::rms_norm_backward_cast(Dtype::F32, dt, dt, dn, hd, h, hd, addr(&wl.post_norm, s), r2, t, hd, dres, hd, true, dy16, ld.dy16, st)?;
        // o_proj
        linear::backward(&self.blas, &group(1, nq), t, o, ld.o, xa[1], ldxa[1], dy16, ld.dy16, tail, do16, nq, dt, 0.0, ls, lsb, st)?;
        // attention, RoPE
        let (kk, vv) = (qkv + Dims::col(nq), qkv + Dims::col(nq + nkv));
        let fwd = attention::AttnForward { shape: *shape, dtype: dt, q: qkv, ldq: w, k: kk, ldk: w, v: vv, ldv: w, docs, o, ldo: ld.o, lse };
        let (dk, dv) = (dqkv + Dims::col(nq), dqkv + Dims::col(nq + nkv));
        let lq = ld.dqkv;
        let bwd = attention::AttnBackward { fwd, dout: do16, lddout: nq, dq: dqkv, lddq: lq, dk, lddk: lq, dv, lddv: lq, workspace: aws, workspace_bytes: awsb };
        attention::backward(&bwd, st)?;
        kernels::rope_backward(dt, dqkv, lq, t, nh, d, cos, sin, st)?;
        kernels::rope_backward(dt, dk, lq, t, nkv_h, d, cos, sin, st)?;
        // q|k|v, input norm (its output kept or recomputed)
        let n1 = match kept {
            Some((n1, _)) => n1,
            None => {
                kernels::rms_norm_forward(dt, dt, x, hd, addr(&wl.input_norm, s), t, hd, eps, n, ld.n, rstd_tmp, st)?;
                n
            }
        };
        // The first layer's input gradient would only reach the frozen embedding: layer 0
        // computes its adapters' gradients but no dx (nor the input norm's backward).
        let dx = if l > 0 { dn } else { 0 };
        linear::backward(&self.blas, &group(0, hd), t, n1, ld.n, xa[0], ldxa[0], dqkv, lq, tail, dx, hd, Dtype::F32, 0.0, ls, lsb, st)?;
        // ... and dres in 16-bit into dy16: the previous layer's down dy.
        if l > 0 {
            kernels::rms_norm_backward_cast(Dtype::F32, dt, dt, dn, hd, x, hd, addr(&wl.input_norm, s), r1, t, hd, dres, hd, true, dy16, ld.dy16, st)?;
        }
        Ok(())
    }

    /// Zeroes the gradient buffers (as [`GpuTrainer::train_step`] does at its start).
    pub fn zero_grads(&mut self, m: &GpuModel) -> Result<()> {
        m.gpu().bind()?;
        self.lora.zero_grads(m.gpu())
    }

    /// One optimizer step over `micro` (gradient accumulation with the global count of
    /// counted targets as the normalizer, clipping, AdamW), as [`crate::train::Trainer`].
    pub fn train_step(&mut self, m: &GpuModel, micro: &[MicroBatch]) -> Result<StepReport> {
        let total: usize = micro.iter().map(|mb| count_targets(&mb.targets)).sum();
        if total == 0 {
            return Err(Error::arg("micro", "no micro-batch has a counted target: nothing to learn from"));
        }
        let gpu = m.gpu().clone();
        gpu.bind()?;
        self.lora.zero_grads(&gpu)?;
        let mut loss = 0.0;
        for mb in micro {
            loss += self.micro_step(m, &mb.batch, &mb.targets, total as f64)?;
        }
        let grad_norm = self.optimizer_step(m)?;
        let lr = self.config.schedule.lr(self.step);
        let report = StepReport { step: self.step, loss, grad_norm, lr, targets: total };
        self.step += 1;
        Ok(report)
    }

    /// Global norm, clip factor, AdamW on every adapter tensor, 16-bit copies refreshed.
    /// Returns the norm before clipping.
    fn optimizer_step(&mut self, m: &GpuModel) -> Result<f64> {
        let gpu = m.gpu().clone();
        let s = gpu.stream();
        self.mark("optimizer start", s)?;
        let st = s.cu_stream();
        let bufs = self.bufs.as_mut().expect("a micro-step ran");
        s.memset_zeros(&mut bufs.norm_acc).map_err(gpu_err("cuMemsetD8"))?;
        let acc = addr_mut(&mut bufs.norm_acc, s);
        let clip = addr_mut(&mut bufs.clip, s);
        let lr = self.config.schedule.lr(self.step);
        let AdamWConfig { betas: (beta1, beta2), eps, weight_decay } = self.config.adamw;
        let h = kernels::AdamWStep { lr, beta1, beta2, eps, weight_decay, step: self.step + 1 };
        let l = &mut self.lora;
        let n = l.n;
        // SAFETY: the flat adapter buffers hold n elements each, on this stream.
        unsafe {
            kernels::sum_squares(addr(&l.g, s), n, acc, st)?;
            let scale = match self.config.max_grad_norm {
                Some(max) => {
                    kernels::clip_factor(acc, max, clip, st)?;
                    clip
                }
                None => 0,
            };
            let (p, g, mm, v) = (addr_mut(&mut l.p, s), addr(&l.g, s), addr_mut(&mut l.m, s), addr_mut(&mut l.v, s));
            kernels::adamw_step(p, g, mm, v, n, &h, scale, st)?;
        }
        let mut sumsq = [0f64];
        s.memcpy_dtoh(&bufs.norm_acc, &mut sumsq).map_err(gpu_err("cuMemcpyDtoH"))?;
        self.lora.refresh_copies(&gpu, m.dtype)?;
        self.mark("optimizer", s)?;
        s.synchronize().map_err(gpu_err("cuStreamSynchronize"))?;
        Ok(sumsq[0].sqrt())
    }
}

fn head_loss() -> &'static memlinear::Loss {
    static L: std::sync::OnceLock<memlinear::Loss> = std::sync::OnceLock::new();
    L.get_or_init(|| losses::cross_entropy(&Default::default()))
}

fn check_batch(m: &GpuModel, b: &Batch, targets: &[i64]) -> Result<()> {
    crate::model::check_batch(&m.config, b)?;
    let v = m.config.vocab_size;
    if targets.len() != b.tokens() {
        return Err(Error::arg("targets", format!("{} targets for {} tokens", targets.len(), b.tokens())));
    }
    if let Some(i) = targets.iter().position(|&t| t != IGNORE_INDEX && (t < 0 || t as usize >= v)) {
        return Err(Error::arg("targets", format!("targets[{i}] = {} is outside the vocabulary [0, {v})", targets[i])));
    }
    Ok(())
}

