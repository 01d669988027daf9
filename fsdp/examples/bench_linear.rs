//! Times the NF4 + LoRA linear (`fsdp::gpu::linear`) on the Llama-3.2-1B projection groups:
//! forward and backward per group, split into NF4 dequantization, base GEMM and LoRA, with
//! the base GEMMs' TFLOP/s.
//!
//! ```text
//! cargo run -p fsdp --release --example bench_linear -- [--rows 8192] [--rank 16] [--json out.json]
//! ```
//!
//! Per group: `q|k|v` (2048 -> 2048+512+512), `o` (2048 -> 2048), `gate|up`
//! (2048 -> 8192+8192), `down` (8192 -> 2048); bf16, LoRA on every part. `y` is bf16 for
//! `q|k|v` and `gate|up` and f32 accumulated (`beta = 1`) for `o` and `down`, as in the
//! model's residual stream; `dx` is f32, overwritten.
//!
//! What is timed (CUDA events, median of `reps` after warm-up; inputs and weights rotate
//! over 4 copies (distinct addresses, same values) so that no repetition finds its operands in L2):
//! - `dequant`: the group's NF4 dequantizations into scratch (one nf4 kernel per part);
//! - `gemm fwd` / `gemm bwd`: the base GEMM alone (`y = x W^T`, `dx = dy W`) on an
//!   already dequantized weight;
//! - the LoRA GEMMs one kind at a time (second table);
//! - `fwd` / `bwd`: the whole call; `fwd no-LoRA` / `bwd no-LoRA`: the same group without
//!   adapters (dequant + base GEMM + call overhead). LoRA = full - no-LoRA;
//! - the whole calls again with LoRA dropout (`--dropout P`, default 0.1) on every part
//!   (third table): its cost over the same calls without dropout;
//! - the whole calls with the fused adapter (fourth table: `xa` in `x`'s tail, `g'` in
//!   `dy`'s tail, one GEMM each way) against the separate adapter GEMMs, interleaved
//!   (separate, fused, fused, separate) because the card's clocks drift down under a long
//!   run of large GEMMs; the fifth table splits the fused calls into their pieces;
//! - the one-pass backward for `g'` and `dB` (`linear::LoraPass`, sixth table): the fused
//!   backward with `dx` and without (`dx` null: only `g'`, `dB`, `dA` remain) under
//!   `LoraPass::Cublas` (the GEMMs) and `LoraPass::Always` (the pass), interleaved as above;
//!   cuBLAS's `g'`, `dB` and `dA` GEMMs alone (pass ~ no-`dx` call - `dA`);
//!   the no-`dx` call again at 132 / 264 / 528 target blocks; and a determinism check
//!   (two no-`dx` calls from the same state: `dB` and `g'` bit for bit).
//!   `--pass-only` runs only this table (and `--ptx DIR` writes linear.cu's sm_90 PTX there);
//!   `--probe` times nothing and only makes two no-`dx` calls each way per group, for
//!   `ncu`.

use std::error::Error;

use cudakit::blas::{Blas, DataType, Mat, Op};
use cudakit::timing::{median, time_us};
use cudakit::Gpu;
use cudarc::driver::{CudaSlice, DevicePtr};
use fsdp::dropout::Dropout;
use fsdp::gpu::linear::{self, Group, LoraRef, Nf4Ref, Part};
use fsdp::gpu::Dtype;
use nf4::testing::Rng;
use nf4::{GpuQuantized, QuantizeOptions};

const COPIES: usize = 4;

struct Spec {
    name: &'static str,
    inf: usize,
    outs: &'static [usize],
    /// y in f32, accumulated (o, down) or bf16 (q|k|v, gate|up).
    y_f32: bool,
}

const GROUPS: [Spec; 4] = [
    Spec { name: "q|k|v", inf: 2048, outs: &[2048, 512, 512], y_f32: false },
    Spec { name: "o", inf: 2048, outs: &[2048], y_f32: true },
    Spec { name: "gate|up", inf: 2048, outs: &[8192, 8192], y_f32: false },
    Spec { name: "down", inf: 8192, outs: &[2048], y_f32: true },
];

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(gpu.stream()).0
}

/// `n` values uniform in `[-sqrt(3), sqrt(3)) * scale` (unit variance times `scale`): cheap,
/// which matters for the hundreds of millions of elements here.
fn bf16s(rng: &mut Rng, n: usize, scale: f64) -> Vec<half::bf16> {
    let k = (2.0 * 3f64.sqrt() * scale) as f32;
    (0..n).map(|_| half::bf16::from_f32(((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * k)).collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: usize = arg(&args, "--rows").map_or(Ok(8192), |v| v.parse())?;
    let rank: usize = arg(&args, "--rank").map_or(Ok(16), |v| v.parse())?;
    let dropout: f64 = arg(&args, "--dropout").map_or(Ok(0.1), |v| v.parse())?;
    let probe = args.iter().any(|a| a == "--probe");
    let pass_only = probe || args.iter().any(|a| a == "--pass-only");
    let (warmup, reps) = (3, 20);
    if let Some(dir) = arg(&args, "--ptx") {
        let ptx = cudakit::kernel::compile_ptx(linear::kernel_source(), cudakit::Arch { major: 9, minor: 0 })?;
        std::fs::write(format!("{dir}/linear_sm90.ptx"), ptx.to_bytes())?;
    }
    let gpu = Gpu::open(0)?;
    let blas = Blas::on(&gpu, 32 << 20)?;
    let s = gpu.stream().clone();
    let st = s.cu_stream();
    let mut rng = Rng::new(7);
    println!("{} (sm_{}), rows {rows}, LoRA r {rank}, bf16; median of {reps} (us)", gpu.info().name, gpu.info().arch);
    // (with --pass-only the first five tables stay empty and are not printed)
    if !pass_only {
        println!(
        "{:<8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "group", "dequant", "gemm fwd", "fwd", "fwd noLR", "LoRA fwd", "gemm bwd", "bwd", "bwd noLR", "LoRA bwd", "TF/s fwd", "TF/s bwd", "fwd+bwd"
        );
    }
    let mut results = Vec::new();
    let mut lora_rows = Vec::new();
    let mut dropout_rows = Vec::new();
    let mut fused_rows = Vec::new();
    let mut probe_rows = Vec::new();
    let mut probes = Vec::new();
    let mut pass_rows = Vec::new();
    let mut pass_json = Vec::new();
    for spec in &GROUPS {
        let (inf, o) = (spec.inf, spec.outs.iter().sum::<usize>());
        let r_sum = rank * spec.outs.len();
        // Weights: quantized once per part, uploaded COPIES times (distinct addresses).
        let mut qs: Vec<Vec<GpuQuantized>> = (0..COPIES).map(|_| Vec::new()).collect();
        for (p, &out) in spec.outs.iter().enumerate() {
            let w = bf16s(&mut rng, out * inf, 1.0 / (inf as f64).sqrt());
            let q = nf4::quantize(&format!("{}.{p}", spec.name), &w, &[out, inf], &QuantizeOptions::default())?;
            for c in qs.iter_mut() {
                c.push(GpuQuantized::upload(&gpu, spec.name, &q)?);
            }
        }
        let up = |v: &[half::bf16]| s.clone_htod(v);
        // COPIES uploads of one host buffer each: distinct addresses are what defeats L2.
        let (xh, dyh) = (bf16s(&mut rng, rows * inf, 1.0), bf16s(&mut rng, rows * o, 1.0));
        let mut xs = Vec::new();
        let mut dys = Vec::new();
        for _ in 0..COPIES {
            xs.push(up(&xh)?);
            dys.push(up(&dyh)?);
        }
        // The fused layout: x [rows, in + R], dy [rows, O + R] (the tails are written).
        let widen = |v: &[half::bf16], cols: usize| -> Vec<half::bf16> {
            let mut out = vec![half::bf16::ZERO; rows * (cols + r_sum)];
            for r in 0..rows {
                out[r * (cols + r_sum)..r * (cols + r_sum) + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
            }
            out
        };
        let (xwh, dywh) = (widen(&xh, inf), widen(&dyh, o));
        let mut xws = Vec::new();
        let mut dyws = Vec::new();
        for _ in 0..COPIES {
            xws.push(up(&xwh)?);
            dyws.push(up(&dywh)?);
        }
        drop((xwh, dywh));
        // For the K-alignment probe: x and dy with R rounded up to 64 columns.
        let r64 = r_sum.div_ceil(64) * 64;
        let widen64 = |v: &[half::bf16], cols: usize| -> Vec<half::bf16> {
            let ld = cols + r64;
            let mut out = vec![half::bf16::ZERO; rows * ld];
            for r in 0..rows {
                out[r * ld..r * ld + cols].copy_from_slice(&v[r * cols..(r + 1) * cols]);
            }
            out
        };
        let (xph, dyph) = (widen64(&xh, inf), widen64(&dyh, o));
        let mut xps = Vec::new();
        let mut dyps = Vec::new();
        for _ in 0..COPIES {
            xps.push(up(&xph)?);
            dyps.push(up(&dyph)?);
        }
        drop((xph, dyph));
        let wpad = s.alloc_zeros::<half::bf16>((o * (inf + r64)).max((o + r64) * inf))?;
        // Adapters, contiguous per group (A stacked [R, in], dA likewise).
        let a = up(&bf16s(&mut rng, r_sum * inf, 1.0 / (inf as f64).sqrt()))?;
        let b = up(&bf16s(&mut rng, o * rank, 0.1))?;
        let da = s.alloc_zeros::<f32>(r_sum * inf)?;
        let db = s.alloc_zeros::<f32>(o * rank)?;
        let y = if spec.y_f32 { s.alloc_zeros::<u8>(rows * o * 4)? } else { s.alloc_zeros::<u8>(rows * o * 2)? };
        let dx = s.alloc_zeros::<f32>(rows * inf)?;
        let xa = s.alloc_zeros::<half::bf16>(rows * r_sum)?;
        let parts_of = |c: usize, lora: bool, drop: bool| -> Vec<Part> {
            let mut col = 0;
            spec.outs
                .iter()
                .enumerate()
                .map(|(p, &out)| {
                    let l = LoraRef {
                        a: ptr(&gpu, &a) + (p * rank * inf * 2) as u64,
                        b: ptr(&gpu, &b) + (col * rank * 2) as u64,
                        r: rank,
                        scale: 2.0,
                        da: ptr(&gpu, &da) + (p * rank * inf * 4) as u64,
                        db: ptr(&gpu, &db) + (col * rank * 4) as u64,
                        dropout: drop.then_some(Dropout { p: dropout, seed: 1000 + p as u64 }),
                    };
                    col += out;
                    Part { weight: Nf4Ref { weight: &qs[c][p] }, out_features: out, bias: 0, lora: lora.then_some(l) }
                })
                .collect()
        };
        let full: Vec<Vec<Part>> = (0..COPIES).map(|c| parts_of(c, true, false)).collect();
        let bare: Vec<Vec<Part>> = (0..COPIES).map(|c| parts_of(c, false, false)).collect();
        let dropped: Vec<Vec<Part>> = (0..COPIES).map(|c| parts_of(c, true, true)).collect();
        // The largest need: with dropout (the calls without use a prefix of it), or the
        // one-pass backward's partials at the sweep's largest target.
        linear::set_lora_pass_target_blocks(528);
        let sb = linear::scratch_bytes(&Group { parts: &dropped[0], in_features: inf, dtype: Dtype::Bf16 }, rows)
            .max(linear::scratch_bytes(&Group { parts: &full[0], in_features: inf, dtype: Dtype::Bf16 }, rows));
        linear::set_lora_pass_target_blocks(0);
        let scratch = s.alloc_zeros::<u8>(sb)?;
        let (scr, yp, dxp, xap) = (ptr(&gpu, &scratch), ptr(&gpu, &y), ptr(&gpu, &dx), ptr(&gpu, &xa));
        let (y_dt, beta) = if spec.y_f32 { (Dtype::F32, 1.0) } else { (Dtype::Bf16, 0.0) };
        let (xs, dys, blas, gpu) = (&xs, &dys, &blas, &gpu);

        let t = |f: &mut dyn FnMut(usize) -> Result<(), cudakit::GpuError>| -> Result<f64, cudakit::GpuError> {
            let mut v = time_us(&s, warmup, reps, f)?;
            Ok(median(&mut v))
        };
        // --probe: the first three timings are not wanted either (fewer kernels to profile).
        let t0 = |f: &mut dyn FnMut(usize) -> Result<(), cudakit::GpuError>| if probe { Ok(0.0) } else { t(f) };
        let dequant = t0(&mut |i| {
            let c = i % COPIES;
            let mut row = 0u64;
            for q in &qs[c] {
                let args = q.dequant_args(scr + row * inf as u64 * 2, nf4::FloatDtype::Bf16);
                unsafe { nf4::gpu::launch_dequant(&args, st) }?;
                row += q.state().shape[0] as u64;
            }
            Ok(())
        })?;
        let ydt = if spec.y_f32 { DataType::F32 } else { DataType::Bf16 };
        let gemm_fwd = t0(&mut |i| unsafe {
            let x = ptr(gpu, &xs[i % COPIES]);
            blas.gemm("bench y = x W^T", Op::T, Op::N, o, rows, inf, 1.0, Mat::new(scr, DataType::Bf16, inf), Mat::new(x, DataType::Bf16, inf), beta, Mat::new(yp, ydt, o))
        })?;
        let gemm_bwd = t0(&mut |i| unsafe {
            let dy = ptr(gpu, &dys[i % COPIES]);
            blas.gemm("bench dx = dy W", Op::N, Op::N, inf, rows, o, 1.0, Mat::new(scr, DataType::Bf16, inf), Mat::new(dy, DataType::Bf16, o), 0.0, Mat::new(dxp, DataType::F32, inf))
        })?;
        let fwd_call = |sets: &[Vec<Part>], i: usize| unsafe {
            let c = i % COPIES;
            let g = Group { parts: &sets[c], in_features: inf, dtype: Dtype::Bf16 };
            let xa = if g.lora_rank_sum() > 0 { xap } else { 0 };
            linear::forward(blas, &g, rows, ptr(gpu, &xs[c]), inf, yp, o, y_dt, beta, xa, r_sum, scr, sb, st)
        };
        let bwd_call = |sets: &[Vec<Part>], i: usize| unsafe {
            let c = i % COPIES;
            let g = Group { parts: &sets[c], in_features: inf, dtype: Dtype::Bf16 };
            let xa = if g.lora_rank_sum() > 0 { xap } else { 0 };
            linear::backward(blas, &g, rows, ptr(gpu, &xs[c]), inf, xa, r_sum, ptr(gpu, &dys[c]), o, false, dxp, inf, Dtype::F32, 0.0, scr, sb, st)
        };
        let (ldxw, lddyw) = (inf + r_sum, o + r_sum);
        let fwd_fused_call = |i: usize| unsafe {
            let c = i % COPIES;
            let g = Group { parts: &full[c], in_features: inf, dtype: Dtype::Bf16 };
            let x = ptr(gpu, &xws[c]);
            linear::forward(blas, &g, rows, x, ldxw, yp, o, y_dt, beta, x + 2 * inf as u64, ldxw, scr, sb, st)
        };
        let bwd_fused_call = |i: usize| unsafe {
            let c = i % COPIES;
            let g = Group { parts: &full[c], in_features: inf, dtype: Dtype::Bf16 };
            let x = ptr(gpu, &xws[c]);
            linear::backward(blas, &g, rows, x, ldxw, x + 2 * inf as u64, ldxw, ptr(gpu, &dyws[c]), lddyw, true, dxp, inf, Dtype::F32, 0.0, scr, sb, st)
        };
        // ---- the one-pass backward (sixth table) ----
        let bwd_nodx_call = |i: usize| unsafe {
            let c = i % COPIES;
            let g = Group { parts: &full[c], in_features: inf, dtype: Dtype::Bf16 };
            let x = ptr(gpu, &xws[c]);
            linear::backward(blas, &g, rows, x, ldxw, x + 2 * inf as u64, ldxw, ptr(gpu, &dyws[c]), lddyw, true, 0, inf, Dtype::F32, 0.0, scr, sb, st)
        };
        let with = |mode: linear::LoraPass, f: &dyn Fn(usize) -> Result<(), cudakit::GpuError>| -> Result<f64, cudakit::GpuError> {
            linear::set_lora_pass(mode);
            let v = t(&mut |i| f(i));
            linear::set_lora_pass(linear::LoraPass::Auto);
            v
        };
        use linear::LoraPass::{Always, Cublas};
        if probe {
            // For a profiler (ncu): two no-dx calls each way, nothing timed.
            for mode in [Always, Always, Cublas, Cublas] {
                linear::set_lora_pass(mode);
                bwd_nodx_call(0)?;
            }
            linear::set_lora_pass(linear::LoraPass::Auto);
            s.synchronize()?;
            continue;
        }
        // What the pass replaces, as the fused backward issues it: the g' GEMMs (into dy's
        // tail), the dB GEMMs (xa in x's tail); and the dA GEMM, which stays.
        let bf = DataType::Bf16;
        let (bp0, dap0, dbp0) = (ptr(gpu, &b), ptr(gpu, &da), ptr(gpu, &db));
        let blas_g = t(&mut |i| {
            let dy = ptr(gpu, &dyws[i % COPIES]);
            let mut col = 0;
            for (p, &out) in spec.outs.iter().enumerate() {
                let dst = dy + ((o + p * rank) * 2) as u64;
                unsafe { blas.gemm("g", Op::N, Op::N, rank, rows, out, 2.0, Mat::new(bp0 + (col * rank * 2) as u64, bf, rank), Mat::new(dy + (col * 2) as u64, bf, lddyw), 0.0, Mat::new(dst, bf, lddyw)) }?;
                col += out;
            }
            Ok(())
        })?;
        let blas_db = t(&mut |i| {
            let (dy, x) = (ptr(gpu, &dyws[i % COPIES]), ptr(gpu, &xws[i % COPIES]));
            let mut col = 0;
            for (p, &out) in spec.outs.iter().enumerate() {
                let xa = x + ((inf + p * rank) * 2) as u64;
                unsafe { blas.gemm("dB", Op::N, Op::T, rank, out, rows, 2.0, Mat::new(xa, bf, ldxw), Mat::new(dy + (col * 2) as u64, bf, lddyw), 1.0, Mat::new(dbp0 + (col * rank * 4) as u64, DataType::F32, rank)) }?;
                col += out;
            }
            Ok(())
        })?;
        let blas_da = t(&mut |i| unsafe {
            let (dy, x) = (ptr(gpu, &dyws[i % COPIES]), ptr(gpu, &xws[i % COPIES]));
            blas.gemm("dA", Op::N, Op::T, inf, r_sum, rows, 1.0, Mat::new(x, bf, ldxw), Mat::new(dy + (o * 2) as u64, bf, lddyw), 1.0, Mat::new(dap0, DataType::F32, inf))
        })?;
        let (b1, a1) = (with(Cublas, &bwd_fused_call)?, with(Always, &bwd_fused_call)?);
        let (a2, b2) = (with(Always, &bwd_fused_call)?, with(Cublas, &bwd_fused_call)?);
        let (bwd_cublas, bwd_pass) = ((b1 + b2) / 2.0, (a1 + a2) / 2.0);
        let (n1, p1) = (with(Cublas, &bwd_nodx_call)?, with(Always, &bwd_nodx_call)?);
        let (p2, n2) = (with(Always, &bwd_nodx_call)?, with(Cublas, &bwd_nodx_call)?);
        let (nodx_cublas, nodx_pass) = ((n1 + n2) / 2.0, (p1 + p2) / 2.0);
        let mut sweep = Vec::new();
        for target in [132usize, 264, 528] {
            linear::set_lora_pass_target_blocks(target);
            sweep.push((target, with(Always, &bwd_nodx_call)?));
        }
        linear::set_lora_pass_target_blocks(0);
        // Determinism at full size: the same call twice from the same dB (zeros), same dy.
        let db_bytes = o * rank * 4;
        let mut runs = Vec::new();
        linear::set_lora_pass(Always);
        for _ in 0..2 {
            unsafe { cudarc::driver::sys::cuMemsetD8Async(ptr(gpu, &db), 0, db_bytes, st) }.result()?;
            bwd_nodx_call(0)?;
            s.synchronize()?;
            runs.push((s.clone_dtoh(&db)?, s.clone_dtoh(&dyws[0])?));
        }
        linear::set_lora_pass(linear::LoraPass::Auto);
        let same = runs[0].0.iter().zip(&runs[1].0).all(|(a, b)| a.to_bits() == b.to_bits()) && runs[0].1.iter().zip(&runs[1].1).all(|(a, b)| a.to_bits() == b.to_bits());
        let finite = runs[0].0.iter().all(|v| v.is_finite());
        drop(runs);
        pass_rows.push(format!(
            "{:<8} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}   {}",
            spec.name, bwd_cublas, bwd_pass, bwd_cublas / bwd_pass, nodx_cublas, nodx_pass, nodx_cublas - nodx_pass, blas_g, blas_db, blas_da, nodx_pass - blas_da, sweep[0].1, sweep[1].1, sweep[2].1,
            if same && finite { "yes" } else if same { "yes (non-finite dB!)" } else { "NO" }
        ));
        pass_json.push(serde_json::json!({ "group": spec.name, "in": inf, "outs": spec.outs, "rows": rows, "rank": rank,
            "bwd_fused_cublas_us": bwd_cublas, "bwd_fused_pass_us": bwd_pass,
            "bwd_no_dx_cublas_us": nodx_cublas, "bwd_no_dx_pass_us": nodx_pass, "saved_us": nodx_cublas - nodx_pass,
            "cublas_g_gemms_us": blas_g, "cublas_db_gemms_us": blas_db, "cublas_da_gemm_us": blas_da, "pass_estimate_us": nodx_pass - blas_da,
            "no_dx_pass_by_target_blocks_us": sweep.iter().map(|(t, v)| serde_json::json!({ "target": t, "us": v })).collect::<Vec<_>>(),
            "deterministic": same, "db_finite": finite }));
        if pass_only {
            continue;
        }
        let fwd = t(&mut |i| fwd_call(&full, i))?;
        let fwd_bare = t(&mut |i| fwd_call(&bare, i))?;
        let bwd = t(&mut |i| bwd_call(&full, i))?;
        let bwd_bare = t(&mut |i| bwd_call(&bare, i))?;
        // Interleaved (separate, fused, fused, separate; means of the pairs): a long run of
        // large GEMMs heats the card and lowers its clocks, so whatever is timed later looks
        // slower; the mirrored order cancels that drift to first order.
        let pair = |a: &mut dyn FnMut(usize) -> Result<(), cudakit::GpuError>, b: &mut dyn FnMut(usize) -> Result<(), cudakit::GpuError>| -> Result<(f64, f64), cudakit::GpuError> {
            let (a1, b1) = (t(a)?, t(b)?);
            let (b2, a2) = (t(b)?, t(a)?);
            Ok(((a1 + a2) / 2.0, (b1 + b2) / 2.0))
        };
        let (fwd_sep, fwd_fused) = pair(&mut |i| fwd_call(&full, i), &mut |i| fwd_fused_call(i))?;
        let (bwd_sep, bwd_fused) = pair(&mut |i| bwd_call(&full, i), &mut |i| bwd_fused_call(i))?;
        // Where the fused calls' time goes: the strided dequant, and the base GEMMs over
        // K = in + R (fwd) / O + R (bwd), against K rounded up to 64 and the plain K with
        // the wide strides (all on finite data; the weights' values do not matter here).
        // Timed one after the other: later columns carry the clock drift described above.
        let wp = ptr(gpu, &wpad);
        let dq_rows = t(&mut |i| {
            let c = i % COPIES;
            let mut row = 0u64;
            for q in &qs[c] {
                let args = q.dequant_args(wp + row * (inf + r_sum) as u64 * 2, nf4::FloatDtype::Bf16);
                unsafe { nf4::gpu::launch_dequant_rows(&args, inf as u64, (inf + r_sum) as u64, st) }?;
                row += q.state().shape[0] as u64;
            }
            Ok(())
        })?;
        let bf = DataType::Bf16;
        let g_fwd = |k: usize, ld: usize, xs_: &[CudaSlice<half::bf16>]| {
            t(&mut |i| unsafe { blas.gemm("probe fwd", Op::T, Op::N, o, rows, k, 1.0, Mat::new(wp, bf, ld), Mat::new(ptr(gpu, &xs_[i % COPIES]), bf, ld), beta, Mat::new(yp, ydt, o)) })
        };
        let g_bwd = |k: usize, ld: usize, dys_: &[CudaSlice<half::bf16>]| {
            t(&mut |i| unsafe { blas.gemm("probe bwd", Op::N, Op::N, inf, rows, k, 1.0, Mat::new(wp, bf, inf), Mat::new(ptr(gpu, &dys_[i % COPIES]), bf, ld), 0.0, Mat::new(dxp, DataType::F32, inf)) })
        };
        let (pf_k, pf_ld, pf_64) = (g_fwd(inf + r_sum, inf + r_sum, &xws)?, g_fwd(inf, inf + r_sum, &xws)?, g_fwd(inf + r64, inf + r64, &xps)?);
        let (pb_k, pb_ld, pb_64) = (g_bwd(o + r_sum, o + r_sum, &dyws)?, g_bwd(o, o + r_sum, &dyws)?, g_bwd(o + r64, o + r64, &dyps)?);
        probe_rows.push(format!(
            "{:<8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            spec.name, dequant, dq_rows, gemm_fwd, pf_ld, pf_k, pf_64, gemm_bwd, pb_ld, pb_k, pb_64
        ));
        probes.push(serde_json::json!({ "group": spec.name, "dequant": dequant, "dequant_rows": dq_rows,
            "gemm_fwd": gemm_fwd, "gemm_fwd_wide_ld": pf_ld, "gemm_fwd_k_in_plus_r": pf_k, "gemm_fwd_k_pad64": pf_64,
            "gemm_bwd": gemm_bwd, "gemm_bwd_wide_ld": pb_ld, "gemm_bwd_k_o_plus_r": pb_k, "gemm_bwd_k_pad64": pb_64 }));
        fused_rows.push(format!(
            "{:<8} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>9.1} {:>9.2} {:>9.1} {:>9.1}",
            spec.name, fwd_sep, fwd_fused, fwd_sep / fwd_fused, bwd_sep, bwd_fused, bwd_sep / bwd_fused, fwd_fused - fwd_bare, bwd_fused - bwd_bare
        ));
        let (fwd_drop, bwd_drop) = if dropout > 0.0 { (t(&mut |i| fwd_call(&dropped, i))?, t(&mut |i| bwd_call(&dropped, i))?) } else { (fwd, bwd) };
        dropout_rows.push(format!("{:<8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}", spec.name, fwd, fwd_drop, fwd_drop - fwd, bwd, bwd_drop, bwd_drop - bwd));
        // The LoRA GEMMs one kind at a time, as `linear` issues them (contiguous adapters).
        let gbuf = s.alloc_zeros::<half::bf16>(rows * r_sum)?;
        let gp = ptr(gpu, &gbuf);
        let (ap, bp, dap, dbp) = (ptr(gpu, &a), ptr(gpu, &b), ptr(gpu, &da), ptr(gpu, &db));
        let bf = DataType::Bf16;
        let per_part = |f: &mut dyn FnMut(usize, usize, usize) -> Result<(), cudakit::GpuError>| {
            let mut col = 0;
            for (p, &out) in spec.outs.iter().enumerate() {
                f(p, col, out)?;
                col += out;
            }
            Ok::<(), cudakit::GpuError>(())
        };
        let l_xa = t(&mut |i| unsafe {
            blas.gemm("xa", Op::T, Op::N, r_sum, rows, inf, 1.0, Mat::new(ap, bf, inf), Mat::new(ptr(gpu, &xs[i % COPIES]), bf, inf), 0.0, Mat::new(xap, bf, r_sum))
        })?;
        let l_up = t(&mut |_| {
            per_part(&mut |p, col, out| unsafe {
                let yc = yp + (col * if spec.y_f32 { 4 } else { 2 }) as u64;
                blas.gemm("up", Op::T, Op::N, out, rows, rank, 2.0, Mat::new(bp + (col * rank * 2) as u64, bf, rank), Mat::new(xap + (p * rank * 2) as u64, bf, r_sum), 1.0, Mat::new(yc, ydt, o))
            })
        })?;
        let l_g = t(&mut |i| {
            let dy = ptr(gpu, &dys[i % COPIES]);
            per_part(&mut |p, col, out| unsafe {
                blas.gemm("g", Op::N, Op::N, rank, rows, out, 2.0, Mat::new(bp + (col * rank * 2) as u64, bf, rank), Mat::new(dy + (col * 2) as u64, bf, o), 0.0, Mat::new(gp + (p * rank * 2) as u64, bf, r_sum))
            })
        })?;
        let l_dxa = t(&mut |_| unsafe {
            blas.gemm("dx+=gA", Op::N, Op::N, inf, rows, r_sum, 1.0, Mat::new(ap, bf, inf), Mat::new(gp, bf, r_sum), 1.0, Mat::new(dxp, DataType::F32, inf))
        })?;
        let l_db = t(&mut |i| {
            let dy = ptr(gpu, &dys[i % COPIES]);
            per_part(&mut |p, col, out| unsafe {
                blas.gemm("dB", Op::N, Op::T, rank, out, rows, 2.0, Mat::new(xap + (p * rank * 2) as u64, bf, r_sum), Mat::new(dy + (col * 2) as u64, bf, o), 1.0, Mat::new(dbp + (col * rank * 4) as u64, DataType::F32, rank))
            })
        })?;
        let l_da = t(&mut |i| unsafe {
            blas.gemm("dA", Op::N, Op::T, inf, r_sum, rows, 1.0, Mat::new(ptr(gpu, &xs[i % COPIES]), bf, inf), Mat::new(gp, bf, r_sum), 1.0, Mat::new(dap, DataType::F32, inf))
        })?;
        lora_rows.push(format!(
            "{:<8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            spec.name, l_xa, l_up, l_g, l_dxa, l_db, l_da
        ));
        let flops = 2.0 * rows as f64 * inf as f64 * o as f64;
        let tf = |us: f64| flops / us * 1e-6;
        println!(
            "{:<8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>9.0} {:>9.0} {:>9.1}",
            spec.name,
            dequant,
            gemm_fwd,
            fwd,
            fwd_bare,
            fwd - fwd_bare,
            gemm_bwd,
            bwd,
            bwd_bare,
            bwd - bwd_bare,
            tf(gemm_fwd),
            tf(gemm_bwd),
            fwd + bwd
        );
        results.push(serde_json::json!({
            "group": spec.name, "in": inf, "outs": spec.outs, "rows": rows, "rank": rank, "dtype": "bf16",
            "y": if spec.y_f32 { "f32 accumulate" } else { "bf16" },
            "us": { "dequant": dequant, "gemm_fwd": gemm_fwd, "fwd": fwd, "fwd_no_lora": fwd_bare, "lora_fwd": fwd - fwd_bare,
                    "gemm_bwd": gemm_bwd, "bwd": bwd, "bwd_no_lora": bwd_bare, "lora_bwd": bwd - bwd_bare },
            "fused": { "fwd_separate_us": fwd_sep, "bwd_separate_us": bwd_sep, "fwd_us": fwd_fused, "bwd_us": bwd_fused, "lora_fwd_us": fwd_fused - fwd_bare, "lora_bwd_us": bwd_fused - bwd_bare },
            "dropout": { "p": dropout, "fwd_us": fwd_drop, "bwd_us": bwd_drop, "fwd_extra_us": fwd_drop - fwd, "bwd_extra_us": bwd_drop - bwd },
            "lora_gemms_us": { "fwd_xa": l_xa, "fwd_up": l_up, "bwd_g": l_g, "bwd_dx": l_dxa, "bwd_db": l_db, "bwd_da": l_da },
            "base_gemm_tflops": { "fwd": tf(gemm_fwd), "bwd": tf(gemm_bwd) },
            "base_flops_per_direction": flops,
        }));
    }
    if !pass_only {
        println!("LoRA GEMMs alone (us): fwd xa = x A^T, fwd y += s xa B^T (all parts); bwd g = s dy B (all parts), dx += g A, dB (all parts), dA");
        println!("{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "group", "xa", "up", "g", "dx+=gA", "dB", "dA");
        for r in &lora_rows {
            println!("{r}");
        }
        println!("LoRA dropout {dropout} on every part (us): the whole calls with and without it");
        println!("{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "group", "fwd", "fwd drop", "extra", "bwd", "bwd drop", "extra");
        for r in &dropout_rows {
            println!("{r}");
        }
        println!("Fused adapter (us): separate adapter GEMMs vs. K-concatenated into the base GEMM; LoRA = fused - no-LoRA");
        println!("{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "group", "fwd sep", "fwd fused", "speedup", "bwd sep", "bwd fused", "speedup", "LoRA fwd", "LoRA bwd");
        for r in &fused_rows {
            println!("{r}");
        }
        println!("Fused pieces (us): dequant dense / strided (ld in+R); base GEMM fwd: K=in dense, K=in wide ld, K=in+R, K=in+R64; bwd likewise with O");
        println!("{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "group", "dq", "dq rows", "fwd K", "fwd ld", "fwd K+R", "fwd K+64", "bwd K", "bwd ld", "bwd K+R", "bwd K+64");
        for r in &probe_rows {
            println!("{r}");
        }
    }
    println!("One-pass g'/dB (us; fused layout): bwd with dx, cuBLAS vs pass; bwd without dx (g', dB, dA only) likewise; cuBLAS's g' GEMMs, dB GEMMs, dA GEMM alone; pass ~ nodx pass - dA; the no-dx call at 132/264/528 target blocks; bit-identical reruns");
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   deterministic",
        "group", "bwd blas", "bwd pass", "speedup", "nodx blas", "nodx pass", "saved", "blas g", "blas dB", "blas dA", "pass", "t132", "t264", "t528"
    );
    for r in &pass_rows {
        println!("{r}");
    }
    let v = serde_json::json!({ "device": gpu.info().name, "arch": gpu.info().arch.to_string(), "results": results, "fused_probes": probes, "lora_pass": pass_json });
    if let Some(p) = arg(&args, "--json") {
        std::fs::write(&p, serde_json::to_string_pretty(&v)?)?;
        println!("wrote {p}");
    }
    Ok(())
}
