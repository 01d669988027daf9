//! Times the element-wise and row kernels (`fsdp::gpu::kernels`) on the runtime's shapes
//! (Llama-3.2-1B, 8192 tokens: hidden 2048, intermediate 8192, 32 + 2 x 8 heads of 64),
//! bf16, against their memory-traffic floor and against a device-to-device copy measured
//! in the same run.
//!
//! ```text
//! cargo run -p fsdp --release --example bench_kernels [-- --quick]
//! ```
//!
//! Timing: CUDA events around each call after warm-up, median of the repetitions; inputs
//! rotate over enough buffer sets that each call touches at least 3x the L2 cache, so no
//! call finds its inputs there. Bytes are what the kernel must read and write (see the
//! table in `fsdp::gpu::kernels`); `GB/s` is bytes / median time; `floor` is bytes at
//! 3000 GB/s (the H100's copy bandwidth, measured 3020 GB/s). One JSON object per line on
//! stdout (`"kind": "kernel"`), a table on stderr.

use std::error::Error;
use std::sync::Arc;

use cudakit::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudakit::timing::{median, time_us};
use cudakit::{Gpu, GpuError};
use fsdp::gpu::kernels as k;
use fsdp::gpu::Dtype;
use half::bf16;
use nf4::testing::Rng;

const FLOOR_GBS: f64 = 3000.0;

/// A device buffer of `n` random normal values of `d` (a random block tiled over it).
fn filled(s: &Arc<CudaStream>, r: &mut Rng, d: Dtype, n: usize) -> Result<CudaSlice<u8>, Box<dyn Error>> {
    let bytes = n * d.size();
    let block = bytes.min(32 << 20);
    let host: Vec<u8> = match d {
        Dtype::F32 => (0..block / 4).flat_map(|_| (r.normal() as f32).to_le_bytes()).collect(),
        _ => (0..block / 2).flat_map(|_| bf16::from_f64(r.normal()).to_bits().to_le_bytes()).collect(),
    };
    let mut buf = s.alloc_zeros::<u8>(bytes.max(1))?;
    let base = buf.device_ptr_mut(s).0;
    let mut at = 0;
    while at < bytes {
        let len = block.min(bytes - at);
        // SAFETY: `base + at .. + len` lies inside `buf`; the host slice outlives the copy
        // (the stream is synchronized before `host` is dropped).
        unsafe { cudakit::cudarc::driver::result::memcpy_htod_async(base + at as u64, &host[..len], s.cu_stream()) }?;
        at += len;
    }
    s.synchronize()?;
    Ok(buf)
}

fn addr(b: &CudaSlice<u8>, s: &CudaStream) -> u64 {
    b.device_ptr(s).0
}

struct Bench<'a> {
    gpu: &'a Gpu,
    warmup: usize,
    reps: usize,
    copy_gbs: f64,
}

impl Bench<'_> {
    /// How many buffer sets of `bytes` each make a rotation of at least 3 L2s.
    fn sets(&self, bytes: f64) -> usize {
        ((3.0 * self.gpu.info().l2_bytes as f64 / bytes).ceil() as usize).clamp(1, 8)
    }

    fn run(&self, name: &str, shape: &str, bytes: f64, f: impl FnMut(usize) -> Result<(), GpuError>) -> Result<f64, Box<dyn Error>> {
        let mut t = time_us(self.gpu.stream(), self.warmup, self.reps, f)?;
        let us = median(&mut t);
        let gbs = bytes / us / 1e3;
        let floor = bytes / FLOOR_GBS / 1e3;
        eprintln!(
            "{name:<34} {shape:<22} {:>8.1} MB {us:>9.1} us {gbs:>7.0} GB/s  floor {floor:>7.1} us ({:>3.0}%)  vs copy {:>3.0}%",
            bytes / 1e6,
            100.0 * floor / us,
            if self.copy_gbs > 0.0 { 100.0 * gbs / self.copy_gbs } else { 100.0 }
        );
        println!(
            "{{\"kind\": \"kernel\", \"card\": {:?}, \"name\": {name:?}, \"shape\": {shape:?}, \"bytes\": {bytes}, \"median_us\": {us:.2}, \"gb_per_s\": {gbs:.1}, \"floor_us\": {floor:.2}, \"copy_gb_per_s\": {:.1}}}",
            self.gpu.info().name,
            self.copy_gbs
        );
        Ok(us)
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let gpu = Gpu::open(0)?;
    gpu.bind()?;
    let s = gpu.stream().clone();
    let st = s.cu_stream();
    let mut r = Rng::new(7);
    let (warmup, reps) = if quick { (2, 5) } else { (5, 30) };
    eprintln!("{} (sm_{}, L2 {} MB), warm-up {warmup}, median of {reps}", gpu.info().name, gpu.info().arch, gpu.info().l2_bytes >> 20);
    let (t, h, inter, heads, kvh, hd) = (8192usize, 2048usize, 8192usize, 32usize, 8usize, 64usize);
    let bf = Dtype::Bf16;
    let mut b = Bench { gpu: &gpu, warmup, reps, copy_gbs: 0.0 };

    // The baseline: device-to-device copy of 256 MiB, bytes read + written.
    {
        let n = 256usize << 20;
        let src = filled(&s, &mut r, Dtype::F32, n / 4)?;
        let mut dst = s.alloc_zeros::<u8>(n)?;
        let (sa, da) = (addr(&src, &s), dst.device_ptr_mut(&s).0);
        let us = b.run("copy (cuMemcpyDtoDAsync)", "256 MiB", 2.0 * n as f64, |_| {
            // SAFETY: both buffers hold n bytes.
            unsafe { cudakit::cudarc::driver::result::memcpy_dtod_async(da, sa, n, st) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))
        })?;
        b.copy_gbs = 2.0 * n as f64 / us / 1e3;
    }

    // Embedding: bf16 table [128256, 2048] -> f32 [8192, 2048].
    {
        let vocab = 128256;
        let table = filled(&s, &mut r, bf, vocab * h)?;
        let ids: Vec<u32> = (0..t).map(|_| r.below(vocab) as u32).collect();
        let ids = s.clone_htod(&ids)?;
        let bytes = (t * h * (2 + 4)) as f64;
        let outs: Vec<_> = (0..b.sets(bytes)).map(|_| s.alloc_zeros::<f32>(t * h)).collect::<Result<_, _>>()?;
        let (ta, ia) = (addr(&table, &s), ids.device_ptr(&s).0);
        let oa: Vec<u64> = outs.iter().map(|o| o.device_ptr(&s).0).collect();
        b.run("embedding bf16 -> f32", "8192 x 2048", bytes, |i| unsafe { k::embedding_forward(bf, ta, vocab, h, ia, t, oa[i % oa.len()], st) })?;
    }

    // RMSNorm forward, x f32 or bf16 -> y bf16.
    let w = filled(&s, &mut r, bf, h)?;
    let wa = addr(&w, &s);
    for x_dt in [Dtype::F32, bf] {
        let bytes = (t * h * (x_dt.size() + 2) + 4 * t) as f64;
        let sets = b.sets(bytes);
        let xs: Vec<_> = (0..sets).map(|_| filled(&s, &mut r, x_dt, t * h)).collect::<Result<_, _>>()?;
        let ys: Vec<_> = (0..sets).map(|_| s.alloc_zeros::<u8>(t * h * 2)).collect::<Result<_, _>>()?;
        let rs = s.alloc_zeros::<f32>(t)?;
        let (xa, ya, ra): (Vec<u64>, Vec<u64>, u64) = (xs.iter().map(|x| addr(x, &s)).collect(), ys.iter().map(|y| addr(y, &s)).collect(), rs.device_ptr(&s).0);
        b.run(&format!("rms_norm_forward x {}", x_dt.name()), "8192 x 2048", bytes, |i| unsafe {
            k::rms_norm_forward(x_dt, bf, xa[i % sets], h, wa, t, h, 1e-5, ya[i % sets], h, ra, st)
        })?;
    }

    // RMSNorm backward: dy f32, x bf16, dx f32 accumulated (the runtime's use); dy and x bf16,
    // dx overwritten.
    for (dy_dt, acc) in [(Dtype::F32, true), (bf, false)] {
        let bytes = (t * h * (dy_dt.size() + 2 + 4 + if acc { 4 } else { 0 }) + 4 * t) as f64;
        let sets = b.sets(bytes);
        let dys: Vec<_> = (0..sets).map(|_| filled(&s, &mut r, dy_dt, t * h)).collect::<Result<_, _>>()?;
        let xs: Vec<_> = (0..sets).map(|_| filled(&s, &mut r, bf, t * h)).collect::<Result<_, _>>()?;
        let dxs: Vec<_> = (0..sets).map(|_| s.alloc_zeros::<f32>(t * h)).collect::<Result<_, _>>()?;
        let rs = filled(&s, &mut r, Dtype::F32, t)?;
        let (dya, xa): (Vec<u64>, Vec<u64>) = (dys.iter().map(|x| addr(x, &s)).collect(), xs.iter().map(|x| addr(x, &s)).collect());
        let dxa: Vec<u64> = dxs.iter().map(|x| x.device_ptr(&s).0).collect();
        let ra = addr(&rs, &s);
        b.run(&format!("rms_norm_backward dy {} acc {acc}", dy_dt.name()), "8192 x 2048", bytes, |i| unsafe {
            k::rms_norm_backward(dy_dt, bf, bf, dya[i % sets], h, xa[i % sets], h, wa, ra, t, h, dxa[i % sets], h, acc, st)
        })?;
    }

    // RoPE on q and on k, in place in the fused q|k|v GEMM output [8192, 3072].
    {
        let wqkv = (heads + 2 * kvh) * hd;
        let cos = filled(&s, &mut r, Dtype::F32, t * hd / 2)?;
        let sin = filled(&s, &mut r, Dtype::F32, t * hd / 2)?;
        let (ca, sa) = (addr(&cos, &s), addr(&sin, &s));
        let bytes = (t * heads * hd * 4 + t * hd * 4) as f64;
        let sets = b.sets(bytes);
        let qkvs: Vec<_> = (0..sets).map(|_| filled(&s, &mut r, bf, t * wqkv)).collect::<Result<_, _>>()?;
        let qa: Vec<u64> = qkvs.iter().map(|x| addr(x, &s)).collect();
        b.run("rope_forward q (ld 3072)", "8192 x 32 x 64", bytes, |i| unsafe { k::rope_forward(bf, qa[i % sets], wqkv, t, heads, hd, ca, sa, st) })?;
        b.run("rope_backward q (ld 3072)", "8192 x 32 x 64", bytes, |i| unsafe { k::rope_backward(bf, qa[i % sets], wqkv, t, heads, hd, ca, sa, st) })?;
        let kbytes = (t * kvh * hd * 4 + t * hd * 4) as f64;
        let ksets = b.sets(kbytes).min(sets);
        b.run("rope_forward k (ld 3072)", "8192 x 8 x 64", kbytes, |i| unsafe {
            k::rope_forward(bf, qa[i % ksets] + (heads * hd * 2) as u64, wqkv, t, kvh, hd, ca, sa, st)
        })?;
    }

    // SwiGLU on the fused gate|up GEMM output [8192, 16384].
    {
        let gu = filled(&s, &mut r, bf, t * 2 * inter)?;
        let dout = filled(&s, &mut r, bf, t * inter)?;
        let out = s.alloc_zeros::<u8>(t * inter * 2)?;
        let (ga, da, oa) = (addr(&gu, &s), addr(&dout, &s), addr(&out, &s));
        let ua = ga + (inter * 2) as u64;
        let bytes = (t * inter * 6) as f64;
        b.run("swiglu_forward (ld 16384)", "8192 x 8192", bytes, |_| unsafe { k::swiglu_forward(bf, ga, 2 * inter, ua, 2 * inter, oa, inter, t, inter, st) })?;
        // Into separate buffers (the runtime writes over gate|up: the same traffic; repeated
        // in-place calls would drift the values towards the division's slow path).
        let dgu = s.alloc_zeros::<u8>(t * 2 * inter * 2)?;
        let dga = addr(&dgu, &s);
        let dua = dga + (inter * 2) as u64;
        let bytes = (t * inter * 10) as f64;
        b.run("swiglu_backward (ld 16384)", "8192 x 8192", bytes, |_| unsafe {
            k::swiglu_backward(bf, da, inter, ga, 2 * inter, ua, 2 * inter, dga, 2 * inter, dua, 2 * inter, t, inter, st)
        })?;
    }

    // Casts.
    for (rows, cols) in [(t, inter), (t, h)] {
        for (src, dst) in [(Dtype::F32, bf), (bf, Dtype::F32)] {
            let bytes = (rows * cols * (src.size() + dst.size())) as f64;
            let sets = b.sets(bytes);
            let xs: Vec<_> = (0..sets).map(|_| filled(&s, &mut r, src, rows * cols)).collect::<Result<_, _>>()?;
            let ys: Vec<_> = (0..sets).map(|_| s.alloc_zeros::<u8>(rows * cols * dst.size())).collect::<Result<_, _>>()?;
            let (xa, ya): (Vec<u64>, Vec<u64>) = (xs.iter().map(|x| addr(x, &s)).collect(), ys.iter().map(|y| addr(y, &s)).collect());
            b.run(&format!("cast {} -> {}", src.name(), dst.name()), &format!("{rows} x {cols}"), bytes, |i| unsafe {
                k::cast(src, xa[i % sets], cols, dst, ya[i % sets], cols, rows, cols, st)
            })?;
        }
    }

    // Global norm and AdamW on 2^24 values (f32 master weights, gradients, moments).
    {
        let n = 1usize << 24;
        let (p, g) = (filled(&s, &mut r, Dtype::F32, n)?, filled(&s, &mut r, Dtype::F32, n)?);
        let m = filled(&s, &mut r, Dtype::F32, n)?;
        let mut v = s.alloc_zeros::<f32>(n)?;
        let mut acc = s.alloc_zeros::<f64>(1)?;
        let mut scale = s.alloc_zeros::<f32>(1)?;
        let (pa, ga, ma, va) = (addr(&p, &s), addr(&g, &s), addr(&m, &s), v.device_ptr_mut(&s).0);
        let (aa, sca) = (acc.device_ptr_mut(&s).0, scale.device_ptr_mut(&s).0);
        b.run("sum_squares", "2^24", (4 * n) as f64, |_| unsafe { k::sum_squares(ga, n, aa, st) })?;
        unsafe { k::clip_factor(aa, 1.0, sca, st) }?;
        let hp = k::AdamWStep { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 10 };
        b.run("adamw_step (clip factor)", "2^24", (28 * n) as f64, |_| unsafe { k::adamw_step(pa, ga, ma, va, n, &hp, sca, st) })?;
    }
    s.synchronize()?;

    // What the compiler made of the main builds: registers, spills, resident blocks per SM.
    eprintln!("\n{:<28} {:>5} {:>7} {:>6} {:>10}", "kernel", "regs", "local B", "block", "blocks/SM");
    let builds = [
        ("embedding_bf16_v", 256),
        ("rms_fwd_f32_bf16_v", 128),
        ("rms_fwd_bf16_bf16_v", 128),
        ("rms_bwd_f32_bf16_bf16_v", 128),
        ("rms_bwd_bf16_bf16_bf16_v", 128),
        ("rope_bf16_v", 256),
        ("swiglu_fwd_bf16_v", 256),
        ("swiglu_bwd_bf16_v", 256),
        ("cast_f32_bf16_v", 256),
        ("cast_bf16_f32_v", 256),
        ("sum_squares", 256),
        ("adamw_step", 256),
    ];
    for (name, block) in builds {
        use cudakit::cudarc::driver::sys::CUfunction_attribute as A;
        let f = cudakit::kernel::function_in_current_context(k::source(), name)?;
        // SAFETY: `f` is a live function of the current context; out-pointers are locals.
        let attr = |a| unsafe { cudakit::cudarc::driver::result::function::get_function_attribute(f.0, a) };
        let (regs, local) = (attr(A::CU_FUNC_ATTRIBUTE_NUM_REGS)?, attr(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?);
        let mut per_sm = 0i32;
        unsafe { cudakit::cudarc::driver::sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut per_sm, f.0, block, 0) }.result()?;
        eprintln!("{name:<28} {regs:>5} {local:>7} {block:>6} {per_sm:>10}");
        println!("{{\"kind\": \"kernel_build\", \"card\": {:?}, \"name\": {name:?}, \"regs\": {regs}, \"local_bytes\": {local}, \"block\": {block}, \"blocks_per_sm\": {per_sm}}}", gpu.info().name);
    }
    Ok(())
}
