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
use nf4::gpu::{launch_dequant_with, source_variant, DequantArgs};
use nf4::testing::Rng;
use nf4::{FloatDtype, QuantizeOptions};

const USAGE: &str = "usage: nf4-bench (cpu|gpu) --json FILE | nf4-bench ptx DIR [SM]\n\n  cpu  CPU quantize/dequantize throughput vs memcpy bandwidth\n  gpu  CUDA dequant kernel sweep vs device copy bandwidth (exit 3 if no GPU)\n  ptx  write the kernel's PTX per UNITS variant for arch SM (default 90)";
use nf4::gpu::TUNING_VARIANTS as VARIANTS;

/// The same memory traffic as the dequant kernel (a 32-bit load per 8 elements, a 16-byte
/// store, per-warp striding) with no decoding: what this read/write mix can reach at all.
const CEILING: &str = r#"
extern "C" __global__ void __launch_bounds__(256, 8) traffic_ceiling(const unsigned* __restrict__ in, uint4* __restrict__ out, unsigned long long units) {
    const unsigned long long warps = (unsigned long long)gridDim.x * 8;
    for (unsigned long long u = ((unsigned long long)blockIdx.x * 8 + (threadIdx.x >> 5)) * 128 + (threadIdx.x & 31); u < units; u += warps * 128) {
        unsigned w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = u + k * 32 < units ? __ldg(in + u + k * 32) : 0u;
#pragma unroll
        for (int k = 0; k < 4; k++) if (u + k * 32 < units) out[u + k * 32] = make_uint4(w[k], w[k] ^ 1u, w[k] ^ 2u, w[k] ^ 3u);
    }
}
"#;

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

fn rng_words(n: usize) -> Vec<u32> {
    let mut r = Rng::new(99);
    (0..n).map(|_| r.next_u64() as u32).collect()
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
    // Write-only bandwidth (memset), and the ceiling of the dequant kernel's 1:4 read:write mix.
    let mut c: CudaSlice<u8> = s.alloc_zeros(n_bytes).map_err(e)?;
    let mut t = time_us(&s, 3, 20, |_| {
        let (p, _g) = c.device_ptr_mut(&s);
        // SAFETY: writes exactly the buffer's bytes on its own stream.
        unsafe { cudakit::cudarc::driver::result::memset_d8_async(p, 0x5a, n_bytes, s.cu_stream()) }
            .map_err(cudakit::GpuError::driver("cuMemsetD8Async"))
    })
    .map_err(|e| e.to_string())?;
    let memset_gbps = n_bytes as f64 / (median(&mut t) * 1e-6) / 1e9;
    drop(c);
    let ceiling_src = cudakit::KernelSource::new("nf4-bench/traffic_ceiling", CEILING);
    gpu.bind().map_err(|e| e.to_string())?;
    let f = cudakit::kernel::function_in_current_context(&ceiling_src, "traffic_ceiling").map_err(|e| e.to_string())?;
    let resident = cudakit::kernel::resident_blocks(f, 256).map_err(|e| e.to_string())?;
    let ceil_units: usize = 8192 * 8192 / 8;
    let copies = 4;
    let mut ceil_bufs = vec![];
    for _ in 0..copies {
        let i: CudaSlice<u32> = s.clone_htod(&rng_words(ceil_units)).map_err(e)?;
        let o: CudaSlice<u8> = unsafe { s.alloc::<u8>(ceil_units * 16) }.map_err(e)?;
        ceil_bufs.push((i, o));
    }
    let mut t = time_us(&s, 5, 50, |i| {
        let (inp, out) = &mut ceil_bufs[i % copies];
        let mut pi = inp.device_ptr(&s).0;
        let mut po = out.device_ptr_mut(&s).0;
        let mut nu = ceil_units as u64;
        let mut params = [
            &mut pi as *mut u64 as *mut std::ffi::c_void,
            &mut po as *mut u64 as *mut std::ffi::c_void,
            &mut nu as *mut u64 as *mut std::ffi::c_void,
        ];
        let grid = (ceil_units.div_ceil(128 * 8) as u32).min(resident);
        // SAFETY: in holds `ceil_units` words, out `ceil_units` 16-byte units.
        unsafe { cudakit::kernel::launch(f, grid, 256, 0, s.cu_stream(), &mut params) }
    })
    .map_err(|e| e.to_string())?;
    let ceil_us = median(&mut t);
    let ceil_bytes = ceil_units as f64 * 20.0;
    let ceiling_gbps = ceil_bytes / (ceil_us * 1e-6) / 1e9;
    drop(ceil_bufs);
    println!(
        "{}: copy {copy_gbps:.0} GB/s, memset (write only) {memset_gbps:.0} GB/s, 1:4 read:write traffic ceiling {ceiling_gbps:.0} GB/s ({:.0}% of copy)",
        gpu.info().name,
        100.0 * ceiling_gbps / copy_gbps
    );
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
                unsafe { launch_dequant_with(src, *v, &args, s.cu_stream()) }
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
    Ok(serde_json::json!({"suite": "nf4-gpu-sweep", "memset_GBps": memset_gbps, "traffic_ceiling_GBps": ceiling_gbps, "traffic_ceiling_8192x8192_us": ceil_us, "variants": labels, "default": nf4::gpu::DEFAULT_VARIANT.label(), "device": gpu.info().name, "arch": gpu.info().arch.to_string(), "copy_GBps": copy_gbps, "rows": rows}))
}
