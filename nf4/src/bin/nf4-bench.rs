//! nf4-bench: throughput of this crate's dequantizers, written as JSON.
//!
//! ```text
//! nf4-bench cpu --json FILE   CPU quantize/dequantize throughput vs. this machine's memcpy bandwidth
//! nf4-bench gpu --json FILE   CUDA kernel sweep (UNITS per thread) vs. device copy bandwidth;
//!                             exits 3, saying why, when there is no usable GPU
//! nf4-bench ptx DIR [SM]      writes the kernel's PTX for each UNITS variant (needs NVRTC only,
//!                             no GPU), e.g. to read registers with `ptxas -v -arch=sm_90`
//! ```
//!
//! `cargo xtask bench` runs it (and, on a GPU machine, the Python comparison against
//! bitsandbytes and the Unsloth-style path). Timing: warm-up, then the median of many
//! runs; GPU runs use CUDA events and rotate inputs so each call reads from HBM, not L2.

use std::time::Instant;

use cudakit::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use cudakit::timing::{median, time_us};
use half::bf16;
use nf4::gpu::{launch_dequant_with, source_variant, DequantArgs, Variant};
use nf4::testing::Rng;
use nf4::{FloatDtype, QuantizeOptions};

const USAGE: &str = "usage: nf4-bench (cpu|gpu) --json FILE | nf4-bench ptx DIR [SM]\n\n  cpu  CPU quantize/dequantize throughput vs memcpy bandwidth\n  gpu  CUDA dequant kernel sweep vs device copy bandwidth (exit 3 if no GPU)\n  ptx  write the kernel's PTX per UNITS variant for arch SM (default 90)";
const VARIANTS: [Variant; 6] = [
    Variant { units: 8, min_blocks: 0, stream_stores: false },
    Variant { units: 8, min_blocks: 8, stream_stores: false },
    Variant { units: 8, min_blocks: 0, stream_stores: true },
    Variant { units: 4, min_blocks: 8, stream_stores: true },
    Variant { units: 16, min_blocks: 4, stream_stores: true },
    Variant { units: 8, min_blocks: 8, stream_stores: true },
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") || args.is_empty() {
        println!("{USAGE}");
        return;
    }
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let result = match args[0].as_str() {
        "cpu" => cpu(),
        "ptx" => {
            let dir = args.get(1).cloned().unwrap_or_else(|| ".".into());
            let sm: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(90);
            let arch = cudakit::Arch { major: sm / 10, minor: sm % 10 };
            for v in VARIANTS {
                let ptx = cudakit::kernel::compile_ptx(&source_variant(v), arch).unwrap_or_else(|e| {
                    eprintln!("nf4-bench ptx: {e}");
                    std::process::exit(1)
                });
                let path = format!("{dir}/dequant_{}_sm{sm}.ptx", v.label());
                std::fs::write(&path, ptx.to_bytes()).unwrap_or_else(|e| {
                    eprintln!("nf4-bench ptx: {path}: {e}");
                    std::process::exit(1)
                });
                println!("{path}");
            }
            return;
        }
        "gpu" => match gpu() {
            Ok(v) => Ok(v),
            Err(e) => {
                eprintln!("nf4-bench gpu: skipped: {e}");
                std::process::exit(3);
            }
        },
        other => {
            eprintln!("unknown suite `{other}`\n{USAGE}");
            std::process::exit(2);
        }
    };
    match result {
        Ok(v) => {
            let text = serde_json::to_string_pretty(&v).expect("serializable");
            match json {
                Some(path) => std::fs::write(&path, text).unwrap_or_else(|e| {
                    eprintln!("nf4-bench: cannot write {path}: {e}");
                    std::process::exit(1)
                }),
                None => println!("{text}"),
            }
        }
        Err(e) => {
            eprintln!("nf4-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into())
}

fn med_secs<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut t)
}

fn cpu() -> Result<serde_json::Value, String> {
    let threads = rayon::current_num_threads();
    // memcpy bandwidth with the same threads: the floor for a streaming kernel.
    let n_bytes = 512usize << 20;
    let src = vec![1u8; n_bytes];
    let mut dst = vec![0u8; n_bytes];
    let copy_s = med_secs(5, || {
        use rayon::prelude::*;
        dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
    });
    let copy_gbps = 2.0 * n_bytes as f64 / copy_s / 1e9;
    drop((src, dst));
    let mut rng = Rng::new(42);
    let mut rows = vec![];
    for (r, c) in [(4096usize, 4096usize), (8192, 8192)] {
        let n = r * c;
        let x: Vec<bf16> = rng.normal_vec(n, 0.02);
        let opts = QuantizeOptions::default();
        let mut q = None;
        let quant_s = med_secs(3, || q = Some(nf4::quantize("w", &x, &[r, c], &opts).expect("quantize")));
        let q = q.expect("ran");
        let mut out = vec![bf16::ZERO; n];
        let deq_s = med_secs(5, || nf4::dequantize_into("w", &q.packed, &q.state, &mut out).expect("dequantize"));
        let bytes = n as f64 * (0.5 + 1.0 / 64.0 + 4.0 / 16384.0 + 2.0);
        let row = serde_json::json!({
            "shape": [r, c], "dtype": "bf16", "blocksize": 64, "nested": true,
            "dequant_ms": deq_s * 1e3, "dequant_GBps": bytes / deq_s / 1e9,
            "dequant_fraction_of_memcpy": bytes / deq_s / 1e9 / copy_gbps,
            "quantize_ms": quant_s * 1e3, "quantize_Melem_per_s": n as f64 / quant_s / 1e6,
        });
        println!(
            "cpu {r}x{c} bf16: dequant {:.1} ms ({:.1} GB/s, {:.0}% of memcpy {:.1} GB/s), quantize {:.1} ms",
            deq_s * 1e3,
            bytes / deq_s / 1e9,
            100.0 * bytes / deq_s / 1e9 / copy_gbps,
            copy_gbps,
            quant_s * 1e3
        );
        rows.push(row);
    }
    Ok(serde_json::json!({"suite": "nf4-cpu", "cpu": host_name(), "threads": threads, "memcpy_GBps": copy_gbps, "rows": rows}))
}

fn gpu() -> Result<serde_json::Value, String> {
    let gpu = cudakit::Gpu::open(0).map_err(|e| e.to_string())?;
    let s = gpu.stream().clone();
    let e = |e: cudakit::cudarc::driver::DriverError| e.to_string();
    // Device copy bandwidth (bytes read + written), the floor's denominator.
    let n_bytes = 1usize << 30;
    let a: CudaSlice<u8> = s.alloc_zeros(n_bytes).map_err(e)?;
    let mut b: CudaSlice<u8> = s.alloc_zeros(n_bytes).map_err(e)?;
    let mut t = time_us(&s, 3, 20, |_| s.memcpy_dtod(&a, &mut b).map_err(cudakit::GpuError::driver("cuMemcpyDtoD")))
        .map_err(|e| e.to_string())?;
    let copy_gbps = 2.0 * n_bytes as f64 / (median(&mut t) * 1e-6) / 1e9;
    drop((a, b));
    println!("{}: copy bandwidth {copy_gbps:.0} GB/s", gpu.info().name);
    let sources: Vec<_> = VARIANTS.iter().map(|&v| source_variant(v)).collect();
    let mut rng = Rng::new(7);
    let mut rows = vec![];
    for (r, c) in [(4096usize, 4096usize), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)] {
        let n = r * c;
        // Random packed codes and a nested absmax (content does not change the kernel's work).
        let nb = n / 64;
        let bytes_per_call = n as f64 * (0.5 + 1.0 / 64.0 + 4.0 / 16384.0 + 2.0);
        let copies = ((4.0 * gpu.info().l2_bytes as f64 / bytes_per_call).ceil() as usize).max(2);
        let mut sets = vec![];
        for _ in 0..copies {
            let packed = s.clone_htod(&rng.bytes(n / 2)).map_err(e)?;
            let q = s.clone_htod(&rng.bytes(nb)).map_err(e)?;
            let a2: Vec<f32> = (0..nb.div_ceil(256)).map(|_| rng.uniform() as f32 * 0.05).collect();
            let a2 = s.clone_htod(&a2).map_err(e)?;
            let out: CudaSlice<bf16> = unsafe { s.alloc::<bf16>(n) }.map_err(e)?;
            sets.push((packed, q, a2, out));
        }
        let floor_us = bytes_per_call / (copy_gbps * 1e9) * 1e6;
        let mut row = serde_json::json!({"shape": [r, c], "dtype": "bf16", "floor_us": floor_us});
        let mut line = format!("{r}x{c} bf16 (floor {floor_us:.1} us):");
        for (src, v) in sources.iter().zip(&VARIANTS) {
            gpu.bind().map_err(|e| e.to_string())?;
            let mut t = time_us(&s, 10, 100, |i| {
                let (packed, q, a2, out) = &mut sets[i % copies];
                let args = DequantArgs {
                    packed: packed.device_ptr(&s).0,
                    absmax: q.device_ptr(&s).0,
                    absmax2: a2.device_ptr(&s).0,
                    code2: 0,
                    offset: 0.01,
                    code: 0,
                    quant_type: nf4::QuantType::Nf4,
                    n: n as u64,
                    blocksize: 64,
                    nested_blocksize: 256,
                    transposed: None,
                    out: out.device_ptr_mut(&s).0,
                    out_dtype: FloatDtype::Bf16,
                };
                // SAFETY: buffers sized for n elements, nb blocks, nb/256 groups above.
                unsafe { launch_dequant_with(src, v.units, &args, s.cu_stream()) }
            })
            .map_err(|e| e.to_string())?;
            let us = median(&mut t);
            row[format!("{}_us", v.label())] = us.into();
            row[format!("{}_fraction_of_copy", v.label())] = (floor_us / us).into();
            line += &format!("  {}: {us:.1} us ({:.0}%)", v.label(), 100.0 * floor_us / us);
        }
        println!("{line}");
        rows.push(row);
    }
    let labels: Vec<String> = VARIANTS.iter().map(|v| v.label()).collect();
    Ok(serde_json::json!({"suite": "nf4-gpu-sweep", "variants": labels, "default": nf4::gpu::DEFAULT_VARIANT.label(), "device": gpu.info().name, "arch": gpu.info().arch.to_string(), "copy_GBps": copy_gbps, "rows": rows}))
}
