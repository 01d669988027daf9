//! GPU tests of `fsdp::gpu::attention` against the CPU reference `fsdp::ops::attention`.
//!
//! Every case draws fresh random inputs (seed printed; replay with `NF4_TEST_SEED`), rounds
//! them to the case's 16-bit dtype, and lays q|k|v out as column slices of one fused buffer
//! (as the model's fused projection writes them), with padding columns. Outputs, the
//! gradient buffer and the workspace are poisoned (NaN) first; padding columns must come
//! back untouched. The reference runs in f32 on the same rounded inputs; the backward's
//! reference is given the GPU's own rounded `o` and its `lse` (what the GPU backward reads).
//!
//! Tolerances (relative to the reference's norm; `u` is the dtype's unit roundoff, 2^-8 for
//! bf16 and 2^-11 for f16). The GPU rounds each output to 16 bits (RMS relative error about
//! u/sqrt(3)) and, on the tensor-core path, rounds the probabilities `P` and `dS` to 16 bits
//! as GEMM operands (another term of the same size, averaged over the keys). So relative L2
//! error should sit below u; we allow 2.5u (bf16 9.8e-3, f16 1.2e-3). The max-norm error
//! (largest element error over the largest reference element) is allowed 4u. Measured on an
//! H100 (four runs, the last in `fsdp/results/attention-h100/tests.log`): L2 at most 0.65u,
//! max-norm at most 1.4u, over every case, path and tiling. `lse` is f32 throughout (scores from 16-bit inputs with f32 accumulation on both
//! sides; measured <= 6e-6): absolute error <= 5e-5. A wrongly masked key in these short sequences or short
//! documents moves `o` and the gradients of its row by far more than these tolerances.
//!
//! `ATTN_TESTS_SHORT=1` leaves the 2048-token cases out of `every_tiling_matches_reference`
//! (for compute-sanitizer, which is slow): `compute-sanitizer --tool racecheck <exe>
//! every_tiling tensor_core --test-threads=1`.

use cudakit::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use cudakit::testing::{gpu_or_skip, poison};
use cudakit::Gpu;
use fsdp::gpu::attention::{self as att, AttnBackward, AttnForward, Path, Tiling};
use fsdp::gpu::{Dtype, GpuError};
use fsdp::ops::attention::{attention_backward, attention_forward, AttnShape};
use nf4::testing::Rng;

const POISON: u16 = 0xffff;

/// Unit roundoff of the dtype.
fn unit(dt: Dtype) -> f64 {
    match dt {
        Dtype::Bf16 => 2f64.powi(-8),
        _ => 2f64.powi(-11),
    }
}

#[derive(Clone, Copy, Debug)]
enum Docs {
    None,
    /// Random boundaries (one every ~`avg` tokens), plus a length-1 document, a boundary on
    /// a 64-token tile edge and one at token 1 of the first sequence.
    Packed { avg: usize },
}

#[derive(Clone, Copy, Debug)]
struct Case {
    seqs: usize,
    len: usize,
    heads: usize,
    kv: usize,
    d: usize,
    docs: Docs,
    dtype: Dtype,
    /// Extra columns in every strided buffer (a multiple of 8).
    pad: usize,
    /// Standard deviation of q (scores scale with it: 3 gives peaked rows).
    qscale: f64,
}

fn cases() -> Vec<Case> {
    use Docs::*;
    use Dtype::*;
    let c = |seqs, len, heads, kv, d, docs, dtype, pad| Case { seqs, len, heads, kv, d, docs, dtype, pad, qscale: 1.0 };
    vec![
        c(2, 17, 4, 4, 64, None, Bf16, 0),
        c(3, 127, 8, 2, 64, Packed { avg: 40 }, Bf16, 8),
        c(1, 127, 4, 1, 64, Packed { avg: 6 }, Bf16, 0),
        c(2, 200, 4, 1, 128, None, Bf16, 8),
        c(2, 200, 4, 2, 128, Packed { avg: 50 }, Bf16, 0),
        c(1, 1, 2, 1, 128, Packed { avg: 1 }, F16, 8),
        c(2, 1, 4, 4, 64, None, Bf16, 0),
        c(2, 200, 6, 2, 64, Packed { avg: 30 }, F16, 0),
        c(2, 127, 8, 8, 128, Packed { avg: 20 }, F16, 8),
        c(2, 129, 4, 1, 64, None, F16, 8),
        Case { qscale: 3.0, ..c(2, 200, 4, 1, 64, Packed { avg: 70 }, Bf16, 8) },
        Case { qscale: 3.0, ..c(1, 200, 2, 1, 128, None, F16, 0) },
    ]
}

fn long_cases() -> Vec<Case> {
    let c = |docs, d, heads, kv| Case { seqs: 1, len: 2048, heads, kv, d, docs, dtype: Dtype::Bf16, pad: 8, qscale: 1.0 };
    vec![c(Docs::None, 64, 4, 1), c(Docs::Packed { avg: 300 }, 64, 4, 2), c(Docs::Packed { avg: 400 }, 128, 2, 1)]
}

fn make_docs(r: &mut Rng, seqs: usize, len: usize, avg: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(seqs * len);
    for s in 0..seqs {
        let mut cut = vec![false; len + 1];
        for (p, c) in cut.iter_mut().enumerate().take(len).skip(1) {
            *c = r.below(avg) == 0 || p == 64;
        }
        if len > 3 {
            let p = 1 + r.below(len - 2); // a length-1 document at p
            cut[p] = true;
            cut[p + 1] = true;
        }
        if s == 0 && len > 1 {
            cut[1] = true; // the sequence's first token alone
        }
        let mut id = 0u32;
        for c in &cut[..len] {
            id += *c as u32;
            out.push(id); // ids restart per sequence: equal ids across sequences must not matter
        }
    }
    out
}

struct Errors {
    l2: f64,
    max: f64,
}

fn errors(got: &[f32], want: &[f32]) -> Errors {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den, mut emax, mut rmax) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        let e = if g.is_finite() { (g - w).abs() } else { f64::INFINITY };
        num += e * e;
        den += w * w;
        emax = emax.max(e);
        rmax = rmax.max(w.abs());
    }
    Errors { l2: (num / den.max(1e-300)).sqrt(), max: emax / rmax.max(1e-300) }
}

fn check(what: &str, label: &str, dt: Dtype, got: &[f32], want: &[f32]) {
    let e = errors(got, want);
    let u = unit(dt);
    eprintln!("  {label} {what}: rel L2 {:.2e} (tol {:.1e}), rel max {:.2e} (tol {:.1e})", e.l2, 2.5 * u, e.max, 4.0 * u);
    assert!(e.l2 <= 2.5 * u && e.max <= 4.0 * u, "{label}: {what} differs from the reference: rel L2 {:.3e}, rel max {:.3e}", e.l2, e.max);
}

fn up<T: cudakit::cudarc::driver::DeviceRepr>(gpu: &Gpu, x: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(x).expect("upload")
}

fn down<T: cudakit::cudarc::driver::DeviceRepr + Default + Clone>(gpu: &Gpu, x: &CudaSlice<T>) -> Vec<T> {
    gpu.stream().clone_dtoh(x).expect("download")
}

/// Columns [c0, c0 + w) of a `[rows, ld]` 16-bit matrix, as f32.
fn cols(dt: Dtype, x: &[u16], ld: usize, c0: usize, w: usize) -> Vec<f32> {
    x.chunks(ld).flat_map(|r| r[c0..c0 + w].iter().map(|&b| dt.from_bits16(b))).collect()
}

/// Every element outside columns [c0, c0 + w) of every row is still the poison.
fn untouched_outside(x: &[u16], ld: usize, ranges: &[(usize, usize)]) -> bool {
    x.chunks(ld).all(|r| r.iter().enumerate().all(|(c, &b)| ranges.iter().any(|&(c0, w)| c >= c0 && c < c0 + w) || b == POISON))
}

/// One case on one path: forward then backward against the reference.
fn run_case(gpu: &Gpu, c: &Case, path: Path, rng: &mut Rng) {
    let label = format!("{c:?} {path:?}");
    eprintln!("{label}");
    let dt = c.dtype;
    let s = AttnShape { seqs: c.seqs, seq_len: c.len, heads: c.heads, kv_heads: c.kv, head_dim: c.d };
    let t = c.seqs * c.len;
    let (qw, kw) = (c.heads * c.d, c.kv * c.d);
    let ld = qw + 2 * kw + c.pad; // the fused q|k|v (and dq|dk|dv) row
    let ldo = qw + c.pad;
    let stream = gpu.stream();

    // Inputs: random, rounded to the dtype; the padding columns hold random values too.
    let mut fused = vec![0u16; t * ld];
    for (i, x) in fused.iter_mut().enumerate() {
        let sd = if i % ld < qw { c.qscale } else { 1.0 };
        *x = dt.to_bits16((rng.normal() * sd) as f32);
    }
    let (q, k, v) = (cols(dt, &fused, ld, 0, qw), cols(dt, &fused, ld, qw, kw), cols(dt, &fused, ld, qw + kw, kw));
    let docs = match c.docs {
        Docs::None => None,
        Docs::Packed { avg } => Some(make_docs(rng, c.seqs, c.len, avg)),
    };
    let dout16: Vec<u16> = (0..t * ldo).map(|_| dt.to_bits16(rng.normal() as f32)).collect();
    let dout = cols(dt, &dout16, ldo, 0, qw);

    let fused_d = up(gpu, &fused);
    let docs_d = docs.as_ref().map(|d| up(gpu, d));
    let dout_d = up(gpu, &dout16);
    let mut o_d = up(gpu, &vec![0u16; t * ldo]);
    let mut lse_d = up(gpu, &vec![0f32; t * c.heads]);
    let mut grad_d = up(gpu, &vec![0u16; t * ld]);
    let ws_bytes = att::backward_workspace_bytes(&s);
    let mut ws_d = up(gpu, &vec![0u8; ws_bytes]);
    for r in [poison(stream, &mut o_d), poison(stream, &mut lse_d), poison(stream, &mut grad_d), poison(stream, &mut ws_d)] {
        r.expect("poison");
    }

    let (base, _g0) = fused_d.device_ptr(stream);
    let docs_p = docs_d.as_ref().map_or(0, |d| d.device_ptr(stream).0);
    let (dout_p, _g2) = dout_d.device_ptr(stream);
    let (o_p, _g3) = o_d.device_ptr_mut(stream);
    let (lse_p, _g4) = lse_d.device_ptr_mut(stream);
    let (grad_p, _g5) = grad_d.device_ptr_mut(stream);
    let (ws_p, _g6) = ws_d.device_ptr_mut(stream);
    let f = AttnForward {
        shape: s,
        dtype: dt,
        q: base,
        ldq: ld,
        k: base + 2 * qw as u64,
        ldk: ld,
        v: base + 2 * (qw + kw) as u64,
        ldv: ld,
        docs: docs_p,
        o: o_p,
        ldo,
        lse: lse_p,
    };
    let b = AttnBackward {
        fwd: f,
        dout: dout_p,
        lddout: ldo,
        dq: grad_p,
        lddq: ld,
        dk: grad_p + 2 * qw as u64,
        lddk: ld,
        dv: grad_p + 2 * (qw + kw) as u64,
        lddv: ld,
        workspace: ws_p,
        workspace_bytes: ws_bytes,
    };
    // SAFETY: every buffer above is sized for the shape and strides, on this stream.
    unsafe {
        if path == Path::Auto {
            att::forward(&f, stream.cu_stream()).expect("forward");
            att::backward(&b, stream.cu_stream()).expect("backward");
        } else {
            att::forward_with(&f, path, stream.cu_stream()).expect("forward");
            att::backward_with(&b, path, stream.cu_stream()).expect("backward");
        }
    }
    stream.synchronize().expect("synchronize");
    drop((_g3, _g4, _g5, _g6));
    let (o16, lse_g, grad16) = (down(gpu, &o_d), down(gpu, &lse_d), down(gpu, &grad_d));

    // Forward.
    let (mut o_ref, mut lse_ref) = (vec![0f32; t * qw], vec![0f32; t * c.heads]);
    attention_forward(&s, &q, &k, &v, docs.as_deref(), &mut o_ref, &mut lse_ref);
    assert!(untouched_outside(&o16, ldo, &[(0, qw)]), "{label}: o padding columns were written");
    let o_gpu = cols(dt, &o16, ldo, 0, qw);
    check("o", &label, dt, &o_gpu, &o_ref);
    let lse_err = lse_g.iter().zip(&lse_ref).map(|(a, b)| if a.is_finite() { (a - b).abs() } else { f32::INFINITY }).fold(0f32, f32::max);
    eprintln!("  {label} lse: max abs error {lse_err:.2e} (tol 5e-5)");
    assert!(lse_err <= 5e-5, "{label}: lse max abs error {lse_err}");

    // Backward, against the reference given the GPU's own o and lse.
    let (mut dq, mut dk, mut dv) = (vec![0f32; t * qw], vec![0f32; t * kw], vec![0f32; t * kw]);
    attention_backward(&s, &q, &k, &v, docs.as_deref(), &o_gpu, &lse_g, &dout, &mut dq, &mut dk, &mut dv);
    assert!(untouched_outside(&grad16, ld, &[(0, qw + 2 * kw)]), "{label}: gradient padding columns were written");
    let (dq_gpu, dk_gpu) = (cols(dt, &grad16, ld, 0, qw), cols(dt, &grad16, ld, qw, kw));
    if c.len == 1 {
        // Every query sees only itself: P = 1, so dS = P (dP - D) = 0 and dq = dk = 0
        // exactly; both sides hold only the cancellation noise of dP - D (f32 sums of the same
        // products, about 1e-7 of |dout| |v|), so a relative comparison means nothing. A wrong
        // D (stride, rounding, missing row) would give O(0.1) values.
        for (what, g) in [("dq", &dq_gpu), ("dk", &dk_gpu)] {
            let m = g.iter().map(|x| if x.is_finite() { x.abs() } else { f32::INFINITY }).fold(0f32, f32::max);
            eprintln!("  {label} {what}: max abs {m:.2e} (exactly 0 in exact arithmetic; tol 1e-3)");
            assert!(m <= 1e-3, "{label}: {what} should be ~0, max abs {m}");
        }
    } else {
        check("dq", &label, dt, &dq_gpu, &dq);
        check("dk", &label, dt, &dk_gpu, &dk);
    }
    check("dv", &label, dt, &cols(dt, &grad16, ld, qw + kw, kw), &dv);
}

/// [`gpu_or_skip`], keeping the device's context alive for the rest of the process: the
/// kernel cache is per context (`cudakit::kernel`), and dropping the last handle would
/// release the primary context, which the next test would re-create, possibly at the same
/// address, where cached kernel handles are stale (`CUDA_ERROR_INVALID_HANDLE`).
fn gpu(test: &str) -> Option<Gpu> {
    static KEEP: std::sync::Mutex<Vec<Gpu>> = std::sync::Mutex::new(Vec::new());
    let gpu = gpu_or_skip(test)?;
    gpu.bind().expect("bind");
    KEEP.lock().unwrap_or_else(|p| p.into_inner()).push(gpu.clone());
    Some(gpu)
}

fn tensor_cores(gpu: &Gpu) -> bool {
    let a = gpu.info().arch;
    a.major >= 8
}

/// The tilings of `head_dim` whose kernels exist on this GPU (wgmma ones on sm_90 only).
fn tilings_here(gpu: &Gpu, head_dim: usize) -> Vec<Tiling> {
    let a = gpu.info().arch;
    Tiling::available(head_dim).iter().copied().filter(|t| t.runs_on(a.major, a.minor)).collect()
}

#[test]
fn tensor_core_path_matches_reference() {
    let Some(gpu) = gpu("tensor_core_path_matches_reference") else { return };
    if !tensor_cores(&gpu) {
        eprintln!("SKIPPED tensor_core_path_matches_reference: sm_{} has no bf16 tensor cores", gpu.info().arch);
        return;
    }
    let mut rng = Rng::fresh("tensor_core_path_matches_reference");
    for c in cases() {
        let t = match c.docs {
            Docs::None => Tiling::default_for(c.d),
            Docs::Packed { .. } => Tiling::default_with_docs(c.d),
        };
        run_case(&gpu, &c, Path::TensorCore(t.unwrap()), &mut rng);
    }
}

#[test]
fn every_tiling_matches_reference() {
    let Some(gpu) = gpu("every_tiling_matches_reference") else { return };
    if !tensor_cores(&gpu) {
        eprintln!("SKIPPED every_tiling_matches_reference: sm_{} has no bf16 tensor cores", gpu.info().arch);
        return;
    }
    let mut rng = Rng::fresh("every_tiling_matches_reference");
    let all = cases();
    // Plus a case long enough for every tiling to have several query and key blocks, whole
    // tiles skipped by documents, and warps whose rows (forward) or keys (backward) lie past
    // the sequence's end, after a whole tile or before it in another document (the warps'
    // skips), and the long cases (so that any tiling may become a default).
    let mid = |d, dtype| Case { seqs: 2, len: 601, heads: 4, kv: 2, d, docs: Docs::Packed { avg: 150 }, dtype, pad: 8, qscale: 2.0 };
    let mut list = vec![all[1], all[2], all[4], all[7], all[8], all[9], mid(64, Dtype::Bf16), mid(128, Dtype::F16)];
    if std::env::var_os("ATTN_TESTS_SHORT").is_none() {
        list.extend(long_cases()); // left out under compute-sanitizer, which is slow
    }
    for c in list {
        for t in tilings_here(&gpu, c.d).into_iter().filter(|t| !t.fwd_wgmma) {
            run_case(&gpu, &c, Path::TensorCore(t), &mut rng);
        }
    }
}

/// Every wgmma tiling (sm_90 only) on every head_dim-64 case, the mid-length one and (unless
/// `ATTN_TESTS_SHORT`) the 2048-token ones. Each tiling runs all its cases even when one
/// fails, and the test prints which tilings passed before failing on any that did not (so a
/// single device run tells which variants hold).
#[test]
fn wgmma_tilings_match_reference() {
    let Some(gpu) = gpu("wgmma_tilings_match_reference") else { return };
    let wg: Vec<Tiling> = tilings_here(&gpu, 64).into_iter().filter(|t| t.fwd_wgmma).collect();
    if wg.is_empty() {
        eprintln!("SKIPPED wgmma_tilings_match_reference: sm_{} runs no wgmma tiling", gpu.info().arch);
        return;
    }
    let mut rng = Rng::fresh("wgmma_tilings_match_reference");
    let mid = Case { seqs: 2, len: 601, heads: 4, kv: 2, d: 64, docs: Docs::Packed { avg: 150 }, dtype: Dtype::Bf16, pad: 8, qscale: 2.0 };
    let mut list: Vec<Case> = cases().into_iter().filter(|c| c.d == 64).collect();
    list.push(mid);
    list.push(Case { docs: Docs::None, dtype: Dtype::F16, ..mid });
    if std::env::var_os("ATTN_TESTS_SHORT").is_none() {
        list.extend(long_cases().into_iter().filter(|c| c.d == 64));
    }
    let mut failed = Vec::new();
    for t in wg {
        let mut bad = 0;
        for c in &list {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&gpu, c, Path::TensorCore(t), &mut rng)));
            bad += r.is_err() as usize;
        }
        eprintln!("WGMMA {} {}: {} of {} cases failed", t.label(), if bad == 0 { "PASS" } else { "FAIL" }, bad, list.len());
        if bad > 0 {
            failed.push(t.label());
        }
    }
    assert!(failed.is_empty(), "wgmma tilings differing from the reference: {failed:?}");
}

/// The sm_90 defaults ([`Tiling::hopper_default`], where a wgmma forward goes once one is
/// the default) on every head_dim-64 case: odd lengths, a single token, documents (one of
/// length 1, boundaries on tile edges), GQA, both dtypes, peaked rows; and the 2048-token
/// cases unless `ATTN_TESTS_SHORT` is set. Also checks that Auto picks them on this device,
/// and, off sm_90, that a wgmma tiling is refused rather than launched as an empty kernel.
#[test]
fn hopper_defaults_match_reference() {
    let Some(gpu) = gpu("hopper_defaults_match_reference") else { return };
    let a = gpu.info().arch;
    let wg = Tiling::available(64).iter().copied().find(|t| t.fwd_wgmma).expect("a wgmma tiling");
    if (a.major, a.minor) != (9, 0) {
        let s = AttnShape { seqs: 1, seq_len: 8, heads: 1, kv_heads: 1, head_dim: 64 };
        let f = AttnForward { shape: s, dtype: Dtype::Bf16, q: 0x1000, ldq: 64, k: 0x2000, ldk: 64, v: 0x3000, ldv: 64, docs: 0, o: 0x4000, ldo: 64, lse: 0x5000 };
        // SAFETY: refused before any launch (checked by the assertion).
        let e = unsafe { att::forward_with(&f, Path::TensorCore(wg), std::ptr::null_mut()) }.unwrap_err();
        assert!(matches!(e, GpuError::InvalidArgument { arg: "path", .. }), "{e}");
        eprintln!("SKIPPED hopper_defaults_match_reference: sm_{} is not sm_90 (refusal checked)", a);
        return;
    }
    let mut rng = Rng::fresh("hopper_defaults_match_reference");
    let mut list: Vec<Case> = cases().into_iter().filter(|c| c.d == 64).collect();
    if std::env::var_os("ATTN_TESTS_SHORT").is_none() {
        list.extend(long_cases().into_iter().filter(|c| c.d == 64));
    }
    for c in list {
        let docs = !matches!(c.docs, Docs::None);
        let t = Tiling::hopper_default(64, docs).unwrap();
        assert_eq!(Tiling::for_arch(64, docs, 9, 0), Some(t));
        run_case(&gpu, &c, Path::TensorCore(t), &mut rng);
    }
}

#[test]
fn portable_path_matches_reference() {
    // The sm_75 path, run on whatever GPU is here.
    let Some(gpu) = gpu("portable_path_matches_reference") else { return };
    let mut rng = Rng::fresh("portable_path_matches_reference");
    for c in cases() {
        run_case(&gpu, &c, Path::Portable, &mut rng);
    }
}

#[test]
fn public_entry_points_and_long_sequences_match_reference() {
    let Some(gpu) = gpu("public_entry_points_and_long_sequences_match_reference") else { return };
    let mut rng = Rng::fresh("public_entry_points_and_long_sequences_match_reference");
    for c in long_cases() {
        run_case(&gpu, &c, Path::Auto, &mut rng);
    }
    run_case(&gpu, &cases()[1], Path::Auto, &mut rng);
}

/// Argument checks run before any driver call, so this runs on every machine.
#[test]
fn bad_arguments_are_refused() {
    let s = AttnShape { seqs: 2, seq_len: 10, heads: 8, kv_heads: 2, head_dim: 64 };
    let ld = (8 + 2 * 2) * 64;
    let f = AttnForward {
        shape: s,
        dtype: Dtype::Bf16,
        q: 0x1000_0000,
        ldq: ld,
        k: 0x1000_0400,
        ldk: ld,
        v: 0x1000_0500,
        ldv: ld,
        docs: 0,
        o: 0x2000_0000,
        ldo: 512,
        lse: 0x3000_0000,
    };
    let ws = att::backward_workspace_bytes(&s);
    let b = AttnBackward {
        fwd: f,
        dout: 0x4000_0000,
        lddout: 512,
        dq: 0x5000_0000,
        lddq: ld,
        dk: 0x5000_0400,
        lddk: ld,
        dv: 0x5000_0500,
        lddv: ld,
        workspace: 0x6000_0000,
        workspace_bytes: ws,
    };
    let fwd_err = |f: AttnForward| unsafe { att::forward(&f, std::ptr::null_mut()) }.unwrap_err();
    let bwd_err = |b: AttnBackward| unsafe { att::backward(&b, std::ptr::null_mut()) }.unwrap_err();
    let is = |e: GpuError, arg: &str, text: &str| match e {
        GpuError::InvalidArgument { arg: a, problem } => {
            assert_eq!(a, arg, "{problem}");
            assert!(problem.contains(text), "{arg}: {problem}");
        }
        other => panic!("expected InvalidArgument {arg}, got {other}"),
    };
    is(fwd_err(AttnForward { dtype: Dtype::F32, ..f }), "dtype", "f32");
    for d in [32, 80, 96, 256] {
        let shape = AttnShape { head_dim: d, ..s };
        is(fwd_err(AttnForward { shape, ..f }), "head_dim", &d.to_string());
    }
    is(fwd_err(AttnForward { shape: AttnShape { kv_heads: 3, ..s }, ..f }), "kv_heads", "divide");
    is(fwd_err(AttnForward { shape: AttnShape { kv_heads: 0, ..s }, ..f }), "kv_heads", "positive");
    is(fwd_err(AttnForward { ldq: 511, ..f }), "ldq", "smaller");
    is(fwd_err(AttnForward { ldk: 127, ..f }), "ldk", "smaller");
    is(fwd_err(AttnForward { ldv: 100, ..f }), "ldv", "smaller");
    is(fwd_err(AttnForward { ldo: 500, ..f }), "ldo", "smaller");
    is(fwd_err(AttnForward { ldq: 772, ..f }), "ldq", "multiple of 8");
    is(fwd_err(AttnForward { q: 0, ..f }), "q", "null");
    is(fwd_err(AttnForward { v: 0, ..f }), "v", "null");
    is(fwd_err(AttnForward { o: 0, ..f }), "o", "null");
    is(fwd_err(AttnForward { lse: 0, ..f }), "lse", "null");
    is(fwd_err(AttnForward { k: 0x1000_0402, ..f }), "k", "aligned");
    is(fwd_err(AttnForward { docs: 0x7000_0002, ..f }), "docs", "aligned");
    is(bwd_err(AttnBackward { workspace_bytes: ws - 1, ..b }), "workspace_bytes", "needed");
    is(bwd_err(AttnBackward { workspace: 0, ..b }), "workspace", "null");
    is(bwd_err(AttnBackward { dq: 0, ..b }), "dq", "null");
    is(bwd_err(AttnBackward { dout: 0, ..b }), "dout", "null");
    is(bwd_err(AttnBackward { lddk: 64, ..b }), "lddk", "smaller");
    is(bwd_err(AttnBackward { lddq: 500, ..b }), "lddq", "smaller");
    is(bwd_err(AttnBackward { dv: 0x5000_0508, ..b }), "dv", "aligned");
    is(bwd_err(AttnBackward { fwd: AttnForward { dtype: Dtype::F32, ..f }, ..b }), "dtype", "f32");
    // An unknown tiling is refused before any driver call too.
    let t = Tiling { fwd_wgmma: false, fwd_warps: 2, fwd_rows: 32, fwd_keys: 64, bwd_rows: 16, bwd_keys: 16, bwd_warps: 1 };
    let e = unsafe { att::forward_with(&f, Path::TensorCore(t), std::ptr::null_mut()) }.unwrap_err();
    is(e, "path", "not compiled");
}

#[test]
fn kernels_compile_for_sm75_sm80_sm90() {
    if !cudakit::nvrtc_present() {
        if cudakit::testing::gpu_required() {
            panic!("REQUIRE_GPU=1 but NVRTC is missing");
        }
        eprintln!("SKIPPED kernels_compile_for_sm75_sm80_sm90: no NVRTC");
        return;
    }
    for arch in [cudakit::Arch::SM75, cudakit::Arch { major: 8, minor: 0 }, cudakit::Arch { major: 9, minor: 0 }] {
        let ptx = cudakit::kernel::compile_ptx(att::source(), arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
        let text = ptx.to_string_lossy();
        // Every entry point the launcher names exists for every arch (the tensor-core ones
        // are empty below sm_80, and no sm_80 instruction may reach sm_75's PTX).
        for dt in ["bf16", "f16"] {
            for d in [64, 128] {
                for name in ["attn_fwd_simple", "attn_bwd_pre", "attn_bwd_cast", "attn_bwd_dq_simple", "attn_bwd_dkdv_simple"] {
                    let n = format!("{name}_{dt}_d{d}");
                    assert!(text.contains(&format!(".entry {n}(")), "sm_{arch}: {n} missing");
                }
            }
        }
        for d in [64, 128] {
            for n in Tiling::kernel_names(d) {
                assert!(text.contains(&format!(".entry {n}(")), "sm_{arch}: {n} missing");
            }
        }
        let tc = text.contains("mma.sync") || text.contains("cp.async");
        assert_eq!(tc, arch.major >= 8, "sm_{arch}: tensor-core instructions present = {tc}");
        // sm_90 is compiled arch-specific (compute_90a), where the wgmma forward has a body.
        let wg = text.contains("wgmma.mma_async");
        assert_eq!(wg, arch.major == 9, "sm_{arch}: wgmma present = {wg}");
        if arch.major == 9 {
            assert!(text.contains(".target sm_90a"), "sm_90 PTX is not arch-specific");
        }
    }
}
