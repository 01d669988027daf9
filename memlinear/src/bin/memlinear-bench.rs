//! memlinear-bench: throughput of the chunked linear + loss.
//!
//!   memlinear-bench cpu [--json PATH]   CPU implementation, f32, cross-entropy
//!   memlinear-bench gpu [--json PATH]   CUDA implementation, bf16, at the shapes:
//!                                       forward only / frozen head / trainable head (dW in
//!                                       f32 and in bf16) for several workspace budgets
//!
//! The comparison against torch, Liger and Cut Cross-Entropy is memlinear/py/bench_lce.py
//! (run by `bash bundle/run.sh memlinear` on the GPU machine).

use std::time::Instant;

use memlinear::gpu::{self, Needs, RawHead, RawOutputs, RawProblem};
use memlinear::losses::{cross_entropy, CrossEntropy};
use memlinear::{cpu, Chunk, Dtype, Head, Options, Problem, Reduction};
use serde_json::json;

const HELP: &str = "memlinear-bench cpu|gpu [--json PATH]\n\n  cpu: the CPU implementation (f32 cross-entropy), trainable and frozen head.\n  gpu: the CUDA implementation at 16384x4096x128256 and 8192x2048x128256 (bf16): forward\n       only, frozen head, trainable head with dW in f32 and bf16, for workspace budgets\n       of 0.25, 1 and 4 GB, each with the loss kernel at 512 and 1024 threads per row.\n       Needs a GPU.\n";

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let v = match args.first().map(String::as_str) {
        Some("cpu") => cpu_bench(),
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
