//! Times the fused attention kernels (`fsdp::gpu::attention`) on the training shapes, every
//! compiled tiling, with and without a document mask. Run on the GPU machine next to
//! `py/bench_sdpa.py` (PyTorch SDPA on the same shapes) and compare the TFLOP/s.
//!
//! ```text
//! cargo run -p fsdp --release --example bench_attention [-- --quick] [--no-wgmma]
//! ```
//!
//! Timing: CUDA events around 10 back-to-back calls (so launch gaps do not count), after
//! warm-up; the median over the repetitions, divided by 10. The
//! backward is its three launches (`D` pass, main kernel, dq cast). FLOPs are the nominal
//! causal ones: forward `4 * seqs * heads * L^2 * d / 2`, backward 2.5x that (the same
//! convention as FlashAttention's benchmarks), also for the document-masked runs, which do
//! less work; their `eff` column counts only the (query, key) pairs a document mask leaves.
//! One JSON object per line on stdout (`"kind": "attention"`), and a table on stderr.

use std::error::Error;

use cudakit::cudarc::driver::{DevicePtr, DevicePtrMut};
use cudakit::timing::{median, time_us};
use cudakit::Gpu;
use fsdp::gpu::attention::{self as att, AttnBackward, AttnForward, Path, Tiling};
use fsdp::gpu::Dtype;
use fsdp::ops::attention::AttnShape;
use half::bf16;
use nf4::testing::Rng;

/// Calls per timed sample.
const BATCH: usize = 10;

/// Documents of cycling lengths (a packed batch of short and long samples).
fn packed_docs(seqs: usize, len: usize) -> Vec<u32> {
    let lengths = [700usize, 120, 333, 1024, 64, 517];
    let mut out = Vec::with_capacity(seqs * len);
    let mut k = 0;
    for _ in 0..seqs {
        let (mut id, mut left) = (0u32, lengths[k % lengths.len()]);
        for _ in 0..len {
            if left == 0 {
                id += 1;
                k += 1;
                left = lengths[k % lengths.len()];
            }
            out.push(id);
            left -= 1;
        }
        k += 1;
    }
    out
}

/// (query, key) pairs visible under the mask, summed over sequences.
fn visible_pairs(seqs: usize, len: usize, docs: Option<&[u32]>) -> f64 {
    let mut n = 0f64;
    for s in 0..seqs {
        let mut start = 0;
        for i in 0..len {
            if let Some(d) = docs {
                if i > 0 && d[s * len + i] != d[s * len + i - 1] {
                    start = i;
                }
            }
            n += (i - start + 1) as f64;
        }
    }
    n
}

fn main() -> Result<(), Box<dyn Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--no-wgmma`: leave the sm_90 wgmma forward tilings out (Path::Auto may still pick one).
    let skip_wgmma = std::env::args().any(|a| a == "--no-wgmma");
    let gpu = Gpu::open(0)?;
    gpu.bind()?;
    let card = gpu.info().name.clone();
    let stream = gpu.stream();
    let (warmup, reps) = if quick { (1, 3) } else { (2, 9) };
    eprintln!("{card} (sm_{}), warm-up {warmup}, median of {reps} samples of {BATCH} calls", gpu.info().arch);
    eprintln!("{:<10} {:<5} {:<12} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}", "model", "docs", "tiling", "fwd us", "fwd TF/s", "bwd us", "bwd TF/s", "f+b us", "eff TF/s");
    // (name, seqs, len, heads, kv_heads, head_dim): Llama-3.2-1B and -3B attention.
    let shapes = [("llama-1b", 4, 2048, 32, 8, 64), ("llama-3b", 4, 2048, 24, 8, 128)];
    let mut rng = Rng::new(7);
    for (name, seqs, len, heads, kv, d) in shapes {
        let s = AttnShape { seqs, seq_len: len, heads, kv_heads: kv, head_dim: d };
        let t = seqs * len;
        let (qw, kw) = (heads * d, kv * d);
        let ld = qw + 2 * kw;
        let fused: Vec<bf16> = (0..t * ld).map(|_| bf16::from_f32(rng.normal() as f32)).collect();
        let dout: Vec<bf16> = (0..t * qw).map(|_| bf16::from_f32(rng.normal() as f32)).collect();
        let fused_d = stream.clone_htod(&fused)?;
        let dout_d = stream.clone_htod(&dout)?;
        let mut o_d = stream.alloc_zeros::<bf16>(t * qw)?;
        let mut lse_d = stream.alloc_zeros::<f32>(t * heads)?;
        let mut grad_d = stream.alloc_zeros::<bf16>(t * ld)?;
        let ws = att::backward_workspace_bytes(&s);
        let mut ws_d = stream.alloc_zeros::<u8>(ws)?;
        let docs_host = packed_docs(seqs, len);
        let docs_d = stream.clone_htod(&docs_host)?;
        let nominal_fwd = 4.0 * (seqs * heads) as f64 * (len * len) as f64 * d as f64 / 2.0;
        for with_docs in [false, true] {
            let pairs = visible_pairs(seqs, len, with_docs.then_some(&docs_host[..]));
            let eff_fwd = 4.0 * heads as f64 * d as f64 * pairs;
            let (base, _g0) = fused_d.device_ptr(stream);
            let (dout_p, _g1) = dout_d.device_ptr(stream);
            let (o_p, _g2) = o_d.device_ptr_mut(stream);
            let (lse_p, _g3) = lse_d.device_ptr_mut(stream);
            let (grad_p, _g4) = grad_d.device_ptr_mut(stream);
            let (ws_p, _g5) = ws_d.device_ptr_mut(stream);
            let docs_p = if with_docs { docs_d.device_ptr(stream).0 } else { 0 };
            let f = AttnForward {
                shape: s,
                dtype: Dtype::Bf16,
                q: base,
                ldq: ld,
                k: base + 2 * qw as u64,
                ldk: ld,
                v: base + 2 * (qw + kw) as u64,
                ldv: ld,
                docs: docs_p,
                o: o_p,
                ldo: qw,
                lse: lse_p,
            };
            let b = AttnBackward {
                fwd: f,
                dout: dout_p,
                lddout: qw,
                dq: grad_p,
                lddq: ld,
                dk: grad_p + 2 * qw as u64,
                lddk: ld,
                dv: grad_p + 2 * (qw + kw) as u64,
                lddv: ld,
                workspace: ws_p,
                workspace_bytes: ws,
            };
            let arch = gpu.info().arch;
            let mut paths: Vec<Path> =
                Tiling::available(d).iter().filter(|t| t.runs_on(arch.major, arch.minor) && !(t.fwd_wgmma && skip_wgmma)).map(|&t| Path::TensorCore(t)).collect();
            let auto = Tiling::for_arch(d, with_docs, arch.major, arch.minor).map(Path::TensorCore);
            if name == "llama-1b" && !with_docs {
                paths.push(Path::Portable); // the sm_75 fallback, for scale
            }
            {
                // The backward's D pass alone (reads o and dout, writes D, lse2 and zeroes the
                // f32 dq accumulator): its bytes over its time.
                let cs = stream.cu_stream();
                // SAFETY: as below.
                let t_pre = median(&mut time_us(stream, warmup, reps, |_| (0..BATCH).try_for_each(|_| unsafe { att::backward_pre_only(&b, cs) }))?) / BATCH as f64;
                let rows = (t * heads) as f64;
                let bytes = rows * (2.0 * 2.0 * d as f64 + 4.0 + 8.0 + 4.0 * d as f64);
                eprintln!("{name:<10} {:<5} bwd D pass  {t_pre:>10.1} us, {:.0} GB/s ({:.1} MB)", if with_docs { "yes" } else { "no" }, bytes / (t_pre * 1e3), bytes / 1e6);
                println!(
                    "{{\"kind\":\"attention_bwd_pre\",\"card\":\"{card}\",\"model\":\"{name}\",\"docs\":{with_docs},\"us\":{t_pre:.2},\"bytes\":{bytes},\"gbps\":{:.1}}}",
                    bytes / (t_pre * 1e3)
                );
            }
            for path in paths {
                let (warmup, reps) = if path == Path::Portable { (1, 3) } else { (warmup, reps) };
                let cs = stream.cu_stream();
                // SAFETY: all buffers are sized for `s` and the strides above, on this stream.
                let n = if path == Path::Portable { 1 } else { BATCH };
                let per_call = |mut t: Vec<f64>| median(&mut t) / n as f64;
                let fwd = per_call(time_us(stream, warmup, reps, |_| (0..n).try_for_each(|_| unsafe { att::forward_with(&f, path, cs) }))?);
                let bwd = per_call(time_us(stream, warmup, reps, |_| (0..n).try_for_each(|_| unsafe { att::backward_with(&b, path, cs) }))?);
                let both = per_call(time_us(stream, warmup, reps, |_| {
                    (0..n).try_for_each(|_| unsafe {
                        att::forward_with(&f, path, cs)?;
                        att::backward_with(&b, path, cs)
                    })
                })?);
                let tf = |flops: f64, us: f64| flops / (us * 1e6);
                let label = match path {
                    Path::TensorCore(t) => t.label(),
                    _ => "portable".to_string(),
                };
                let docs = if with_docs { "yes" } else { "no" };
                eprintln!(
                    "{name:<10} {docs:<5} {label:<12} {fwd:>10.1} {:>9.1} {bwd:>10.1} {:>9.1} {both:>10.1} {:>9.1}",
                    tf(nominal_fwd, fwd),
                    tf(2.5 * nominal_fwd, bwd),
                    tf(3.5 * eff_fwd, both)
                );
                println!(
                    "{{\"kind\":\"attention\",\"card\":\"{card}\",\"model\":\"{name}\",\"seqs\":{seqs},\"seq_len\":{len},\"heads\":{heads},\"kv_heads\":{kv},\"head_dim\":{d},\"docs\":{with_docs},\"tiling\":\"{label}\",\"default\":{},\"fwd_us\":{fwd:.2},\"bwd_us\":{bwd:.2},\"fwd_bwd_us\":{both:.2},\"fwd_tflops\":{:.2},\"bwd_tflops\":{:.2},\"fwd_bwd_tflops\":{:.2},\"effective_fwd_bwd_tflops\":{:.2}}}",
                    auto == Some(path),
                    tf(nominal_fwd, fwd),
                    tf(2.5 * nominal_fwd, bwd),
                    tf(3.5 * nominal_fwd, both),
                    tf(3.5 * eff_fwd, both)
                );
            }
        }
    }
    Ok(())
}
