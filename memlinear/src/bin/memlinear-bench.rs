//! memlinear-bench: throughput of the chunked linear + loss.
//!
//!   memlinear-bench cpu [--json PATH]   CPU implementation, f32, cross-entropy
//!   memlinear-bench gpu [--json PATH]   CUDA implementation, bf16, at the shapes:
//!                                       forward only / frozen head / trainable head (dW in
//!                                       f32 and in bf16) for several workspace budgets
//!   memlinear-bench kernel [--json PATH] the loss kernel alone (cross-entropy, bf16, with
//!                                       gradient), every kernel shape (multi-pass, row
//!                                       cached, cluster sizes, block sizes, cache hints)
//!                                       against the multi-pass kernel, at 1638 x 128256
//!                                       (the fsdp runtime's chunk) and other shapes; then
//!                                       the trainable head at 8192x2048x128256, chunks of
//!                                       1638, multi-pass vs automatic plan
//!   memlinear-bench source CLUSTER      print the generated kernel (cross-entropy, bf16,
//!                                       vocab 128256) for a cluster size (0: multi-pass)
//!
//! The comparison against torch, Liger and Cut Cross-Entropy is memlinear/py/bench_lce.py
//! (run by `bash bundle/run.sh memlinear` on the GPU machine).

use std::time::Instant;

use memlinear::gpu::{self, Needs, RawHead, RawOutputs, RawProblem};
use memlinear::losses::{cross_entropy, CrossEntropy};
use memlinear::{cpu, Chunk, Dtype, Head, Options, Problem, Reduction};
use serde_json::json;

const HELP: &str = "memlinear-bench cpu|gpu|kernel [--json PATH] | source [CLUSTER]\n\n  cpu: the CPU implementation (f32 cross-entropy), trainable and frozen head.\n  gpu: the CUDA implementation at 16384x4096x128256 and 8192x2048x128256 (bf16): forward\n       only, frozen head, trainable head with dW in f32 and bf16, for workspace budgets\n       of 0.25, 1 and 4 GB, each with the loss kernel at 512 and 1024 threads per row.\n       Needs a GPU.\n  kernel: the loss kernel alone, every kernel shape vs the multi-pass kernel (GPU).\n  source: print a generated loss kernel.\n";

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    // Sum of two uniforms minus 1: cheap, bell-shaped, in (-1, 1), std 0.41.
    let a = (*seed >> 40) as f32 / (1u64 << 24) as f32;
    let b = ((*seed >> 16) & 0xff_ffff) as f32 / (1u64 << 24) as f32;
    a + b - 1.0
}

fn cpu_bench() -> serde_json::Value {
    let ce = cross_entropy(&CrossEntropy::default());
    let mut rows = vec![];
    for (t, h, v) in [(1024usize, 1024usize, 32000usize), (2048, 512, 50257)] {
        let mut s = 42u64;
        let x: Vec<f32> = (0..t * h).map(|_| lcg(&mut s) * 2.4).collect();
        let w: Vec<f32> = (0..v * h).map(|_| lcg(&mut s) * 2.4 / (h as f32).sqrt()).collect();
        let tg: Vec<i64> = (0..t).map(|i| ((i * 7919) % v) as i64).collect();
        let p = Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100);
        for (mode, want_dw) in [("trainable", true), ("frozen", false)] {
            let o = Options { chunk: Chunk::Budget(64 << 20), want_dw, ..Default::default() };
            let mut best = f64::MAX;
            let mut last = None;
            for _ in 0..3 {
                let t0 = Instant::now();
                last = Some(cpu::run(&p, &ce, &o).expect("cpu run"));
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let out = last.expect("ran");
            let gemms = if want_dw { 3.0 } else { 2.0 };
            let flops = gemms * 2.0 * (t * h * v) as f64;
            println!("cpu {t}x{h}x{v} f32 {mode:9} chunk {:5}: {:8.1} ms  {:6.1} GFLOP/s  temp {:.1} MB (unchunked logits alone: {:.1} MB)", out.chunk_tokens, best * 1e3, flops / best / 1e9, out.temp_bytes as f64 / 1e6, (t * v * 4) as f64 / 1e6);
            rows.push(json!({"tokens": t, "hidden": h, "vocab": v, "dtype": "f32", "loss": "cross_entropy", "mode": mode,
                "chunk_tokens": out.chunk_tokens, "ms": best * 1e3, "gflops_per_s": flops / best / 1e9,
                "temp_bytes": out.temp_bytes, "unchunked_temp_bytes": (t * v * 4 * 2) as u64}));
        }
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_else(|| "unknown".into());
    json!({"suite": "memlinear-cpu", "cpu": cpu, "threads": rayon::current_num_threads(), "rows": rows})
}

fn gpu_bench() -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    use cudarc::driver::DevicePtrMut;
    let g = cudakit::Gpu::open(0)?;
    g.bind()?;
    let s = g.stream().clone();
    let ce = cross_entropy(&CrossEntropy::default());
    let mut rows = vec![];
    for (t, h, v) in [(16384usize, 4096usize, 128256usize), (8192, 2048, 128256)] {
        let mut seed = 7u64;
        let xs: Vec<half::bf16> = (0..t * h).map(|_| half::bf16::from_f32(lcg(&mut seed) * 2.4)).collect();
        let wsd = 2.4 / (h as f32).sqrt();
        let wv: Vec<half::bf16> = (0..v * h).map(|_| half::bf16::from_f32(lcg(&mut seed) * wsd)).collect();
        let tg: Vec<i64> = (0..t).map(|i| ((i as u64 * 2654435761) % v as u64) as i64).collect();
        let mut x = s.clone_htod(&xs)?;
        let mut w = s.clone_htod(&wv)?;
        drop((xs, wv));
        let mut tgd = s.clone_htod(&tg)?;
        let mut dx = s.alloc_zeros::<half::bf16>(t * h)?;
        let mut dw32 = s.alloc_zeros::<f32>(v * h)?;
        let mut dw16 = s.alloc_zeros::<half::bf16>(v * h)?;
        let mut lossb = s.alloc_zeros::<f32>(1)?;
        let p = RawProblem {
            tokens: t,
            vocab: v,
            dtype: Dtype::Bf16,
            student: RawHead { x: x.device_ptr_mut(&s).0, w: w.device_ptr_mut(&s).0, bias: 0, hidden: h },
            teacher: None,
            targets: tgd.device_ptr_mut(&s).0,
            ignore_index: -100,
            token_params: vec![],
            class_params: vec![],
            grad_tokens: 0,
        };
        let (dxp, dw32p, dw16p, lp) = (dx.device_ptr_mut(&s).0, dw32.device_ptr_mut(&s).0, dw16.device_ptr_mut(&s).0, lossb.device_ptr_mut(&s).0);
        for (budget, block) in [(250e6, 512), (250e6, 1024), (1e9, 512), (1e9, 1024), (4e9, 512), (4e9, 1024)] {
            memlinear::codegen::set_block(block);
            for (mode, dxo, dwo, dwt) in [("forward", 0, 0, Dtype::F32), ("frozen", dxp, 0, Dtype::F32), ("trainable_dw_f32", dxp, dw32p, Dtype::F32), ("trainable_dw_bf16", dxp, dw16p, Dtype::Bf16)] {
                let o = RawOutputs { loss: lp, per_token: 0, dx: dxo, dw: dwo, dw_dtype: dwt, db: 0, accumulate: false };
                let n = gpu::needs(&ce, &p, &o);
                // The bf16-dW mode carries a 2.1 GB f32 accumulator: give it that on top.
                let extra = if n.dw_acc { (v * h * 4) as f64 } else { 0.0 };
                let Some(chunk) = gpu::chunk_for_budget(t, h, v, Dtype::Bf16, Needs { ..n }, (budget + extra) as usize) else { continue };
                let total = gpu::layout(t, h, v, Dtype::Bf16, chunk, n).total;
                let mut ws = unsafe { s.alloc::<u8>(total) }?;
                let wsp = ws.device_ptr_mut(&s).0;
                let times = cudakit::timing::time_us(&s, 2, 7, |_| {
                    // SAFETY: all buffers above are live, of the documented shapes.
                    unsafe { gpu::run_raw(&ce, &p, Reduction::Mean(None), &o, chunk, wsp, total, s.cu_stream()) }
                        .map(|_| ())
                        .map_err(|e| cudakit::GpuError::InvalidArgument { arg: "run", problem: e.to_string() })
                })?;
                let mut ms: Vec<f64> = times.iter().map(|u| u / 1e3).collect();
                let med = cudakit::timing::median(&mut ms);
                let gemms = match mode {
                    "forward" => 1.0,
                    "frozen" => 2.0,
                    _ => 3.0,
                };
                let tflops = gemms * 2.0 * (t * h * v) as f64 / (med / 1e3) / 1e12;
                let used = gpu::balanced_chunk(chunk, t);
                println!("gpu {t}x{h}x{v} bf16 block {block:4} budget {:4.2} GB {mode:18} chunk {used:5} (max {chunk:5}): {med:8.2} ms  {tflops:6.1} TFLOP/s  workspace {:.3} GB", budget / 1e9, total as f64 / 1e9);
                rows.push(json!({"tokens": t, "hidden": h, "vocab": v, "mode": mode, "loss_block": block, "budget_bytes": budget, "chunk_tokens": used, "max_chunk_tokens": chunk,
                    "median_ms": med, "tflops": tflops, "workspace_bytes": total}));
                drop(ws);
            }
        }
    }
    Ok(json!({"suite": "memlinear-gpu-sweep", "device": g.info().name, "rows": rows}))
}

/// Times one launch of the loss kernel per repetition, the logits restored from a pristine
/// copy before each (untimed); median of `reps` microseconds.
fn time_kernel(
    s: &std::sync::Arc<cudarc::driver::CudaStream>,
    reps: usize,
    mut restore: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
    mut launch: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let ctx = s.context();
    let mut us = vec![];
    for i in 0..reps + 2 {
        restore()?;
        let a = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let b = ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        a.record(s)?;
        launch()?;
        b.record(s)?;
        b.synchronize()?;
        if i >= 2 {
            us.push(f64::from(a.elapsed_ms(&b)?) * 1e3);
        }
    }
    Ok(cudakit::timing::median(&mut us))
}

fn kernel_bench() -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    use cudarc::driver::DevicePtrMut;
    use memlinear::codegen::{self, RowPlan, Spec};
    let g = cudakit::Gpu::open(0)?;
    g.bind()?;
    let s = g.stream().clone();
    let ce = cross_entropy(&CrossEntropy::default());
    let mut rows_json = vec![];
    println!("device: {}", g.info().name);
    for (rows, v) in [(1638usize, 128256usize), (768, 128256), (4096, 128256), (2048, 32000), (2048, 50257)] {
        let mut seed = 11u64;
        // Logits like a trained head's: N(0, ~2) with a few large ones.
        let host: Vec<half::bf16> = (0..rows * v).map(|i| half::bf16::from_f32(lcg(&mut seed) * 4.0 + if i % 977 == 0 { 8.0 } else { 0.0 })).collect();
        let tg: Vec<i64> = (0..rows).map(|i| if i % 53 == 7 { -100 } else { ((i as u64 * 2654435761) % v as u64) as i64 }).collect();
        let mut pristine = s.clone_htod(&host)?;
        drop(host);
        let mut work = s.alloc_zeros::<half::bf16>(rows * v)?;
        let mut tgd = s.clone_htod(&tg)?;
        let mut lossb = s.alloc_zeros::<f32>(rows)?;
        let mut flags = s.alloc_zeros::<u64>(8)?;
        let (zp, pp, tp, lp, fp) = (work.device_ptr_mut(&s).0, pristine.device_ptr_mut(&s).0, tgd.device_ptr_mut(&s).0, lossb.device_ptr_mut(&s).0, flags.device_ptr_mut(&s).0);
        let counted = tg.iter().filter(|&&t| t != -100).count();
        let args = gpu::LossArgs {
            z: zp, zt: 0, bias: 0, tbias: 0, targets: tp, ignore_index: -100, tp: 0, tp_stride: rows as i64, cp: 0, grad_tokens: 0,
            seed_scale: 1.0 / counted as f32, loss_out: lp, flags: fp + 16, t0: 0, rows,
        };
        let base = Spec::passes(Dtype::Bf16, v, true, false, false, (v * 2) % 16 == 0, 512);
        let mut variants: Vec<(String, Spec)> = vec![
            ("multi-pass, block 512 (old)".into(), base),
            ("multi-pass, block 1024".into(), Spec { block: 1024, ..base }),
            ("multi-pass, block 512, .cs hints".into(), Spec { streaming: true, ..base }),
        ];
        for (cluster, blocks) in [(1u32, vec![512u32, 1024]), (2, vec![1024]), (4, vec![256, 512, 1024]), (8, vec![256, 512])] {
            for block in blocks {
                for streaming in [false, true] {
                    let sp = Spec { cache: true, cluster, block, streaming, ..base };
                    if codegen::shared_bytes(&sp) + 1024 > 227 << 10 {
                        continue;
                    }
                    variants.push((format!("cached, cluster {cluster}, block {block}{}", if streaming { ", .cs hints" } else { "" }), sp));
                }
            }
        }
        codegen::set_plan(RowPlan::Auto);
        let auto = gpu::plan_spec(&ce, Dtype::Bf16, v, true, false, false, (v * 2) % 16 == 0)?;
        variants.push((format!("automatic plan (cluster {}, block {}, cached {})", auto.cluster, auto.block, auto.cache), auto));
        let bytes = 2.0 * (rows * v * 2) as f64;
        let mut reference: Option<(Vec<f32>, Vec<half::bf16>)> = None;
        let mut base_us = f64::NAN;
        for (name, spec) in variants {
            if spec.cluster > 1 && gpu::resident_clusters(&ce, spec).unwrap_or(0) == 0 {
                println!("{rows:5} x {v:6}  {name:48}: cannot be placed");
                continue;
            }
            let restore = || -> Result<(), Box<dyn std::error::Error>> {
                // SAFETY: both buffers hold rows * v bf16.
                unsafe { cudarc::driver::result::memcpy_dtod_async(zp, pp, rows * v * 2, s.cu_stream()) }?;
                Ok(())
            };
            // SAFETY: every pointer of `args` is a live buffer of the documented shape.
            let launch = || -> Result<(), Box<dyn std::error::Error>> { Ok(unsafe { gpu::launch_loss(&ce, spec, &args, s.cu_stream()) }?) };
            let us = match time_kernel(&s, 15, restore, launch) {
                Ok(us) => us,
                Err(e) => {
                    println!("{rows:5} x {v:6}  {name:48}: failed: {e}");
                    continue;
                }
            };
            // Check against the multi-pass kernel's output (its first variant).
            let losses = s.clone_dtoh(&lossb)?;
            // (The largest shape: losses only, to keep the run short.)
            let grad = if rows * v <= 300_000_000 { s.clone_dtoh(&work)? } else { vec![] };
            let fl = s.clone_dtoh(&flags)?;
            let (dl, dg) = match &reference {
                None => {
                    reference = Some((losses, grad));
                    base_us = us;
                    (0.0f64, 0.0f64)
                }
                Some((l0, g0)) => {
                    let dl = l0.iter().zip(&losses).map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs() / f64::from(a.abs()).max(1e-6)).fold(0.0, f64::max);
                    let dg = g0.iter().zip(&grad).map(|(a, b)| (a.to_f64() - b.to_f64()).abs()).fold(0.0, f64::max);
                    (dl, dg)
                }
            };
            let tbs = bytes / (us * 1e-6) / 1e12;
            println!("{rows:5} x {v:6}  {name:48}: {us:8.1} us  {tbs:5.2} TB/s  x{:5.2} vs old  | max rel loss diff {dl:.1e}, max abs grad diff {dg:.1e}, flags {:#x}", base_us / us, fl[2]);
            rows_json.push(json!({"rows": rows, "vocab": v, "variant": name, "cluster": spec.cluster, "block": spec.block, "cache": spec.cache,
                "streaming": spec.streaming, "median_us": us, "tb_per_s": tbs, "speedup_vs_old": base_us / us, "max_rel_loss_diff": dl, "max_abs_grad_diff": dg}));
        }
    }
    // The trainable head end to end at the fsdp runtime's shape and chunk.
    let (t, h, v, chunk) = (8192usize, 2048usize, 128256usize, 1638usize);
    let mut seed = 7u64;
    let xs: Vec<half::bf16> = (0..t * h).map(|_| half::bf16::from_f32(lcg(&mut seed) * 2.4)).collect();
    let wv: Vec<half::bf16> = (0..v * h).map(|_| half::bf16::from_f32(lcg(&mut seed) * 2.4 / (h as f32).sqrt())).collect();
    let tg: Vec<i64> = (0..t).map(|i| ((i as u64 * 2654435761) % v as u64) as i64).collect();
    let mut x = s.clone_htod(&xs)?;
    let mut w = s.clone_htod(&wv)?;
    let mut tgd = s.clone_htod(&tg)?;
    let mut dx = s.alloc_zeros::<half::bf16>(t * h)?;
    let mut dw = s.alloc_zeros::<f32>(v * h)?;
    let mut lossb = s.alloc_zeros::<f32>(1)?;
    let p = RawProblem {
        tokens: t, vocab: v, dtype: Dtype::Bf16,
        student: RawHead { x: x.device_ptr_mut(&s).0, w: w.device_ptr_mut(&s).0, bias: 0, hidden: h },
        teacher: None, targets: tgd.device_ptr_mut(&s).0, ignore_index: -100, token_params: vec![], class_params: vec![], grad_tokens: 0,
    };
    let o = RawOutputs { loss: lossb.device_ptr_mut(&s).0, per_token: 0, dx: dx.device_ptr_mut(&s).0, dw: dw.device_ptr_mut(&s).0, dw_dtype: Dtype::F32, db: 0, accumulate: false };
    let n = gpu::needs(&ce, &p, &o);
    let total = gpu::layout(t, h, v, Dtype::Bf16, chunk, n).total;
    let mut ws = unsafe { s.alloc::<u8>(total) }?;
    let wsp = ws.device_ptr_mut(&s).0;
    for (name, plan) in [("multi-pass (old)", RowPlan::Passes { streaming: false }), ("automatic plan", RowPlan::Auto)] {
        codegen::set_plan(plan);
        let times = cudakit::timing::time_us(&s, 2, 9, |_| {
            // SAFETY: all buffers above are live, of the documented shapes.
            unsafe { gpu::run_raw(&ce, &p, Reduction::Mean(None), &o, chunk, wsp, total, s.cu_stream()) }
                .map(|_| ())
                .map_err(|e| cudakit::GpuError::InvalidArgument { arg: "run", problem: e.to_string() })
        })?;
        let mut ms: Vec<f64> = times.iter().map(|u| u / 1e3).collect();
        let med = cudakit::timing::median(&mut ms);
        let l = s.clone_dtoh(&lossb)?[0];
        println!("trainable {t}x{h}x{v} bf16, dW f32, chunk {chunk}, {name:18}: {med:8.3} ms  loss {l}");
        rows_json.push(json!({"end_to_end": true, "tokens": t, "hidden": h, "vocab": v, "chunk": chunk, "variant": name, "median_ms": med, "loss": l}));
    }
    codegen::set_plan(RowPlan::Auto);
    Ok(json!({"suite": "memlinear-loss-kernel", "device": g.info().name, "rows": rows_json}))
}

fn source(cluster: u32) -> String {
    let ce = cross_entropy(&CrossEntropy::default());
    let base = memlinear::codegen::Spec::passes(Dtype::Bf16, 128256, true, false, false, true, 512);
    let spec = if cluster == 0 { base } else { memlinear::codegen::Spec { cache: true, cluster, ..base } };
    memlinear::codegen::generate(&ce, spec)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let v = match args.first().map(String::as_str) {
        Some("cpu") => cpu_bench(),
        Some("source") => {
            print!("{}", source(args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4)));
            return;
        }
        Some("kernel") => match kernel_bench() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("memlinear-bench kernel: {e}");
                std::process::exit(1);
            }
        },
        Some("gpu") => match gpu_bench() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("memlinear-bench gpu: {e}");
                std::process::exit(1);
            }
        },
        _ => {
            print!("{HELP}");
            std::process::exit(if args.iter().any(|a| a == "-h" || a == "--help") { 0 } else { 2 });
        }
    };
    if let Some(p) = json_path {
        if let Err(e) = std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json")) {
            eprintln!("memlinear-bench: cannot write {p}: {e}");
            std::process::exit(1);
        }
        println!("wrote {p}");
    }
}
