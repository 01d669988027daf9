//! GPU tests of `fsdp::gpu::linear` (NF4 base + LoRA, fused groups) against the CPU
//! reference `fsdp::ops::lora_linear`, part by part, on 16-bit-rounded inputs and the NF4
//! weights dequantized on the CPU (bit-identical to the GPU's dequantization).
//!
//! Fresh random data each run (seed printed; replay with `NF4_TEST_SEED`), outputs,
//! scratch, `xa` and stride padding poisoned (0xFF bytes: NaN) first; padding and the gaps
//! between non-contiguous adapter buffers are checked to be untouched afterwards. Skipped
//! without a GPU, failures under `REQUIRE_GPU=1`.
//!
//! LoRA dropout: the mask kernel against `fsdp::dropout` bit for bit (64-bit indices
//! included), the dropped-input and fused masked-dx kernels bit for bit against the same
//! f32 operations on the CPU, groups with dropout (independent masks per part, mixed with parts
//! without) against the CPU op with the same masks, `forward_adapter_input` against
//! `forward`'s `xa`, and `p = 0` bit-identical to no dropout.
//!
//! The one-pass backward for `g'` and `dB` (`linear::LoraPass`): every supported rank,
//! both dtypes, rows 1 / 37 / 300, odd and multi-span part widths, the aligned (cp.async)
//! and the element-load paths, one and several row chunks, against the CPU; two runs give
//! the same bits; the tensor-core and the portable kernel against cuBLAS's GEMMs (modes
//! `Always` and `Portable`). The other tests run with the default (`Auto`: the pass on
//! groups of several adapted parts or a `dy` larger than L2).

use cudakit::blas::Blas;
use cudakit::testing::{gpu_or_skip, poison};
use cudakit::Gpu;
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use fsdp::dropout::Dropout;
use fsdp::gpu::linear::{self, Group, LoraRef, Nf4Ref, Part};
use fsdp::gpu::Dtype;
use fsdp::ops::{lora_linear_backward, lora_linear_forward, Adapter, AdapterGrads, Frozen};
use nf4::testing::Rng;
use nf4::{GpuQuantized, QuantizeOptions};

const POISON16: u16 = 0xffff;
/// The f32 NaN `cudakit::testing::poison` writes (all bits set), used for padding too.
fn poison32() -> f32 {
    f32::from_bits(u32::MAX)
}

fn normals(rng: &mut Rng, dt: Dtype, n: usize, scale: f64) -> Vec<f32> {
    (0..n).map(|_| dt.round((rng.normal() * scale) as f32)).collect()
}

fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> u64 {
    s.device_ptr(gpu.stream()).0
}

fn up<T: DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(v).expect("upload")
}

fn down<T: DeviceRepr + Default + Clone>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<T> {
    gpu.stream().clone_dtoh(s).expect("download")
}

/// A `[rows, cols]` matrix stored with row stride `ld`, the padding filled with `pad`.
fn strided<T: Copy>(dense: &[T], rows: usize, cols: usize, ld: usize, pad: T) -> Vec<T> {
    let mut out = vec![pad; rows * ld];
    for r in 0..rows {
        out[r * ld..r * ld + cols].copy_from_slice(&dense[r * cols..(r + 1) * cols]);
    }
    out
}

/// ||a - b|| / ||b||, and max |a - b| / rms(b).
fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
        max = max.max(d.abs());
    }
    let rms = (den / want.len() as f64).sqrt().max(1e-30);
    ((num / den.max(1e-30)).sqrt(), if max.is_nan() || got.iter().any(|g| !g.is_finite()) { f64::INFINITY } else { max / rms })
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let (rel, max) = errors(got, want);
    assert!(rel <= tol && max <= 8.0 * tol, "{what}: relative error {rel:.3e}, max error / rms {max:.3e} (tolerance {tol:.1e})");
}

/// One test case: a group and how it is called.
#[derive(Clone, Debug)]
struct Case {
    dt: Dtype,
    rows: usize,
    inf: usize,
    outs: Vec<usize>,
    /// Rank per part (None: no adapter).
    ranks: Vec<Option<usize>>,
    bias: Vec<bool>,
    /// Extra elements per row of x, y, dy, dx.
    pad: usize,
    y_f32: bool,
    /// y: 0 overwrite, 1 accumulate.
    beta: f32,
    /// dx in the compute dtype (else f32).
    dx16: bool,
    dx_beta: f32,
    /// Adapters' A and dA buffers adjacent in part order (else separated by gaps).
    contiguous: bool,
    blocksize: usize,
    /// LoRA dropout probability per part (None: no dropout); the mask seeds are random.
    dropout: Vec<Option<f64>>,
    /// The fused adapter: `xa` in `x`'s tail (forward), `g'` in `dy`'s tail (backward).
    fused: bool,
    /// How the backward is called.
    bwd: Bwd,
}

/// The backward's entry points.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bwd {
    /// `linear::backward`.
    Full,
    /// `linear::backward` with `dx` null: adapter gradients only.
    NoDx,
    /// `backward_deferring_a_grads`, then `backward_a_grads` (fused, no dropout).
    Deferred,
}

impl Case {
    fn new(dt: Dtype, rows: usize, inf: usize, outs: &[usize]) -> Case {
        Case {
            dt,
            rows,
            inf,
            outs: outs.to_vec(),
            ranks: vec![None; outs.len()],
            bias: vec![false; outs.len()],
            pad: 0,
            y_f32: false,
            beta: 0.0,
            dx16: false,
            dx_beta: 0.0,
            contiguous: true,
            blocksize: 64,
            dropout: vec![None; outs.len()],
            fused: false,
            bwd: Bwd::Full,
        }
    }
}

/// Host side of one part.
struct HostPart {
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
    dropout: Option<Dropout>,
}

/// What the GPU computed, as raw bits (for bit-for-bit comparisons between runs).
#[derive(Debug, PartialEq)]
struct Outputs {
    y: Vec<u32>,
    xa: Vec<u32>,
    dx: Vec<u32>,
    da: Vec<u32>,
    db: Vec<u32>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `c` forward and backward on the GPU and checks both against the CPU reference.
fn run_case(gpu: &Gpu, blas: &Blas, rng: &mut Rng, c: &Case) -> Outputs {
    let what = format!("{c:?}");
    let s = gpu.stream();
    let dt = c.dt;
    let (rows, inf) = (c.rows, c.inf);
    let o: usize = c.outs.iter().sum();
    let r_sum: usize = c.ranks.iter().flatten().sum();
    let gap = if c.contiguous { 0 } else { 7 }; // elements between adapters' A / dA rows
    let opts = QuantizeOptions { blocksize: c.blocksize, ..Default::default() };

    // Host data, rounded to the compute dtype where the GPU holds it so.
    let mut host = Vec::new();
    let mut qs = Vec::new();
    for (p, &out) in c.outs.iter().enumerate() {
        let w0: Vec<f32> = (0..out * inf).map(|_| (rng.normal() / (inf as f64).sqrt()) as f32).collect();
        let q = nf4::quantize(&format!("part{p}"), &w0, &[out, inf], &opts).expect("quantize");
        let w: Vec<f32> = match dt {
            Dtype::Bf16 => nf4::dequantize::<half::bf16>("w", &q.packed, &q.state).unwrap().iter().map(|x| x.to_f32()).collect(),
            _ => nf4::dequantize::<half::f16>("w", &q.packed, &q.state).unwrap().iter().map(|x| x.to_f32()).collect(),
        };
        let r = c.ranks[p].unwrap_or(0);
        let seed = rng.next_u64(); // drawn for every part, so cases differing only in dropout see the same data
        host.push(HostPart {
            w,
            bias: c.bias[p].then(|| normals(rng, dt, out, 0.5)),
            a: normals(rng, dt, r * inf, 1.0 / (inf as f64).sqrt()),
            b: normals(rng, dt, out * r, 1.0 / (r.max(1) as f64).sqrt()),
            r,
            scale: if r > 0 { 16.0 / r as f32 } else { 0.0 },
            dropout: c.dropout[p].map(|p| Dropout { p, seed }),
        });
        qs.push(GpuQuantized::upload(gpu, &format!("part{p}"), &q).expect("upload"));
    }
    let x = normals(rng, dt, rows * inf, 1.0);
    let dy = normals(rng, dt, rows * o, 1.0);

    // Device buffers. Adapters: one buffer each for A, B, dA, dB, parts in order, with
    // `gap` elements (poison) between parts' A and dA when not contiguous.
    let adapted: Vec<usize> = (0..c.outs.len()).filter(|&p| host[p].r > 0).collect();
    let mut a_all = Vec::new();
    let mut a_off = vec![0usize; c.outs.len()];
    let mut b_all = Vec::new();
    let mut b_off = vec![0usize; c.outs.len()];
    let mut da0 = Vec::new();
    let mut da_off = vec![0usize; c.outs.len()];
    let mut db0 = Vec::new();
    let mut db_off = vec![0usize; c.outs.len()];
    for &p in &adapted {
        let h = &host[p];
        a_off[p] = a_all.len();
        a_all.extend(h.a.iter().map(|&v| dt.to_bits16(v)));
        a_all.extend(std::iter::repeat_n(POISON16, gap));
        b_off[p] = b_all.len();
        b_all.extend(h.b.iter().map(|&v| dt.to_bits16(v)));
        da_off[p] = da0.len();
        da0.extend((0..h.r * inf).map(|_| rng.normal() as f32));
        da0.extend(std::iter::repeat_n(f32::NAN, gap));
        db_off[p] = db0.len();
        db0.extend((0..c.outs[p] * h.r).map(|_| rng.normal() as f32));
    }
    let keep = |v: &mut Vec<u16>| if v.is_empty() { v.push(0) };
    keep(&mut a_all);
    keep(&mut b_all);
    if da0.is_empty() {
        da0.push(0.0);
        db0.push(0.0);
    }
    let (a_d, b_d) = (up(gpu, &a_all), up(gpu, &b_all));
    let (da_d, db_d) = (up(gpu, &da0), up(gpu, &db0));
    let bias_d: Vec<Option<CudaSlice<u16>>> =
        host.iter().map(|h| h.bias.as_ref().map(|b| up(gpu, &b.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>()))).collect();

    let parts: Vec<Part> = (0..c.outs.len())
        .map(|p| Part {
            weight: Nf4Ref { weight: &qs[p] },
            out_features: c.outs[p],
            bias: bias_d[p].as_ref().map_or(0, |b| ptr(gpu, b)),
            lora: (host[p].r > 0).then(|| LoraRef {
                a: ptr(gpu, &a_d) + 2 * a_off[p] as u64,
                b: ptr(gpu, &b_d) + 2 * b_off[p] as u64,
                r: host[p].r,
                scale: host[p].scale,
                da: ptr(gpu, &da_d) + 4 * da_off[p] as u64,
                db: ptr(gpu, &db_d) + 4 * db_off[p] as u64,
                dropout: host[p].dropout,
            }),
        })
        .collect();
    let g = Group { parts: &parts, in_features: inf, dtype: dt };
    assert_eq!(g.out_features(), o);
    assert_eq!(g.lora_rank_sum(), r_sum);

    // Fused: x carries R more columns (xa is written there), dy too (g' is written there).
    let tail = if c.fused { r_sum } else { 0 };
    let (ldx, ldy) = (inf + tail + c.pad, o + c.pad);
    let x16: Vec<u16> = x.iter().map(|&v| dt.to_bits16(v)).collect();
    let x_d = up(gpu, &strided(&x16, rows, inf, ldx, POISON16));
    let mut xa_d = s.alloc_zeros::<u16>((rows * r_sum).max(1)).unwrap();
    poison(s, &mut xa_d).unwrap();
    // Without adapters xa is not used: pass null to check that it is allowed.
    let (xa_p, ldxa) = if r_sum == 0 {
        (0, 0)
    } else if c.fused {
        (ptr(gpu, &x_d) + 2 * inf as u64, ldx)
    } else {
        (ptr(gpu, &xa_d), r_sum)
    };
    let sb = linear::scratch_bytes(&g, rows);
    let mut scratch = s.alloc_zeros::<u8>(sb).unwrap();
    poison(s, &mut scratch).unwrap();

    // ---- forward ----
    let mut y0: Vec<f32> = if c.beta != 0.0 { (0..rows * o).map(|_| rng.normal() as f32).collect() } else { vec![0.0; rows * o] };
    if !c.y_f32 {
        y0.iter_mut().for_each(|v| *v = dt.from_bits16(dt.to_bits16(*v)));
    }
    let (y_got, y_pad_ok): (Vec<f32>, bool) = if c.y_f32 {
        let mut y_d = if c.beta != 0.0 { up(gpu, &strided(&y0, rows, o, ldy, poison32())) } else { s.alloc_zeros::<f32>(rows * ldy).unwrap() };
        if c.beta == 0.0 {
            poison(s, &mut y_d).unwrap();
        }
        unsafe {
            linear::forward(blas, &g, rows, ptr(gpu, &x_d), ldx, ptr(gpu, &y_d), ldy, Dtype::F32, c.beta, xa_p, ldxa, ptr(gpu, &scratch), sb, s.cu_stream())
        }
        .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
        let v = down(gpu, &y_d);
        let pad_ok = (0..rows).all(|r| v[r * ldy + o..(r + 1) * ldy].iter().all(|x| x.to_bits() == u32::MAX));
        ((0..rows).flat_map(|r| v[r * ldy..r * ldy + o].to_vec()).collect(), pad_ok)
    } else {
        let mut y_d = up(gpu, &strided(&y0.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>(), rows, o, ldy, POISON16));
        if c.beta == 0.0 {
            poison(s, &mut y_d).unwrap();
        }
        unsafe { linear::forward(blas, &g, rows, ptr(gpu, &x_d), ldx, ptr(gpu, &y_d), ldy, dt, c.beta, xa_p, ldxa, ptr(gpu, &scratch), sb, s.cu_stream()) }
            .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
        let v = down(gpu, &y_d);
        let pad_ok = (0..rows).all(|r| v[r * ldy + o..(r + 1) * ldy].iter().all(|&x| x == POISON16));
        ((0..rows).flat_map(|r| v[r * ldy..r * ldy + o].iter().map(|&b| dt.from_bits16(b)).collect::<Vec<_>>()).collect(), pad_ok)
    };
    assert!(y_pad_ok, "{what}: forward wrote into y's row padding");

    // Reference forward, part by part.
    let mut y_ref = y0.clone();
    let mut xa_ref = vec![0f32; rows * r_sum];
    let mut xa_parts = Vec::new();
    let (mut col, mut rc) = (0, 0);
    for (p, h) in host.iter().enumerate() {
        let out = c.outs[p];
        let base = Frozen { w: &h.w, bias: h.bias.as_deref(), in_features: inf, out_features: out };
        let ad = (h.r > 0).then(|| Adapter { a: &h.a, b: &h.b, r: h.r, scale: h.scale });
        let mut yp = vec![f32::NAN; rows * out];
        let xa = lora_linear_forward(&x, &base, ad.as_ref(), h.dropout.as_ref(), &mut yp);
        for t in 0..rows {
            for j in 0..out {
                y_ref[t * o + col + j] += yp[t * out + j];
            }
            for k in 0..h.r {
                xa_ref[t * r_sum + rc + k] = xa[t * h.r + k];
            }
        }
        xa_parts.push(xa);
        col += out;
        rc += h.r;
    }
    let tol16 = if dt == Dtype::Bf16 { 1e-2 } else { 2e-3 };
    assert_close(&format!("{what}: y"), &y_got, &y_ref, tol16);
    // xa as the forward left it: its own dense matrix, or x's tail (then x's own columns
    // must be unchanged and the padding after the tail untouched).
    let xa_bits: Vec<u16> = if c.fused {
        let v = down(gpu, &x_d);
        for r in 0..rows {
            assert!(v[r * ldx..r * ldx + inf] == x16[r * inf..(r + 1) * inf], "{what}: the fused forward changed x (row {r})");
            assert!(v[r * ldx + inf + r_sum..(r + 1) * ldx].iter().all(|&b| b == POISON16), "{what}: forward wrote into x's padding (row {r})");
        }
        assert!(down(gpu, &xa_d).iter().all(|&b| b == POISON16), "{what}: the fused forward wrote the dense xa");
        (0..rows).flat_map(|r| v[r * ldx + inf..r * ldx + inf + r_sum].to_vec()).collect()
    } else {
        down(gpu, &xa_d)
    };
    let xa_got: Vec<f32> = xa_bits.iter().map(|&b| dt.from_bits16(b)).collect();
    if r_sum > 0 {
        assert_close(&format!("{what}: xa"), &xa_got, &xa_ref, tol16);
        // The adapter-input-only forward (checkpointing's recompute) writes the same xa,
        // masks included, bit for bit (into a dense matrix, also when x has the tail).
        let mut xa2_d = s.alloc_zeros::<u16>(rows * r_sum).unwrap();
        poison(s, &mut xa2_d).unwrap();
        poison(s, &mut scratch).unwrap();
        unsafe { linear::forward_adapter_input(blas, &g, rows, ptr(gpu, &x_d), ldx, ptr(gpu, &xa2_d), r_sum, ptr(gpu, &scratch), sb, s.cu_stream()) }
            .unwrap_or_else(|e| panic!("{what}: forward_adapter_input: {e}"));
        assert_eq!(down(gpu, &xa2_d), xa_bits, "{what}: forward_adapter_input's xa differs from forward's");
    } else {
        assert!(xa_bits.iter().all(|&b| b == POISON16), "{what}: xa written without adapters");
    }

    // ---- backward ----
    let lddy = o + tail + c.pad;
    let lddx = inf + c.pad;
    let dy_d = up(gpu, &strided(&dy.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>(), rows, o, lddy, POISON16));
    let mut dx0: Vec<f32> = if c.dx_beta != 0.0 { (0..rows * inf).map(|_| rng.normal() as f32).collect() } else { vec![0.0; rows * inf] };
    let mut dx_d = up(gpu, &strided(&dx0, rows, inf, lddx, poison32()));
    // A 16-bit dx lives in the same bytes' first half: its own buffer.
    let mut dx16_d = up(gpu, &strided(&dx0.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>(), rows, inf, lddx, POISON16));
    if c.dx16 {
        dx0.iter_mut().for_each(|v| *v = dt.from_bits16(dt.to_bits16(*v)));
    }
    if c.dx_beta == 0.0 {
        poison(s, &mut dx_d).unwrap();
        poison(s, &mut dx16_d).unwrap();
    }
    let (dx_ptr, dx_dt) = if c.dx16 { (ptr(gpu, &dx16_d), dt) } else { (ptr(gpu, &dx_d), Dtype::F32) };
    poison(s, &mut scratch).unwrap();
    let dx_before = if c.dx16 { down(gpu, &dx16_d).iter().map(|&b| b as u32).collect::<Vec<u32>>() } else { bits(&down(gpu, &dx_d)) };
    match c.bwd {
        Bwd::Full | Bwd::NoDx => unsafe {
            let dx_ptr = if c.bwd == Bwd::NoDx { 0 } else { dx_ptr };
            linear::backward(
                blas,
                &g,
                rows,
                ptr(gpu, &x_d),
                ldx,
                xa_p,
                ldxa,
                ptr(gpu, &dy_d),
                lddy,
                c.fused,
                dx_ptr,
                lddx,
                dx_dt,
                c.dx_beta,
                ptr(gpu, &scratch),
                sb,
                s.cu_stream(),
            )
        }
        .unwrap_or_else(|e| panic!("{what}: backward: {e}")),
        Bwd::Deferred => unsafe {
            assert!(c.fused, "{what}: deferring dA needs the fused layout");
            linear::backward_deferring_a_grads(blas, &g, rows, xa_p, ldxa, ptr(gpu, &dy_d), lddy, dx_ptr, lddx, dx_dt, c.dx_beta, ptr(gpu, &scratch), sb, s.cu_stream())
                .unwrap_or_else(|e| panic!("{what}: backward_deferring_a_grads: {e}"));
            // dA not written yet; scratch clobbered in between (the model runs other
            // kernels there): dA must come from dy's tail alone.
            assert!(r_sum == 0 || bits(&down(gpu, &da_d)) == bits(&da0), "{what}: dA written before backward_a_grads");
            poison(s, &mut scratch).unwrap();
            linear::backward_a_grads(blas, &g, rows, ptr(gpu, &x_d), ldx, ptr(gpu, &dy_d), lddy, s.cu_stream()).unwrap_or_else(|e| panic!("{what}: backward_a_grads: {e}"));
        },
    }
    if c.bwd == Bwd::NoDx {
        let after = if c.dx16 { down(gpu, &dx16_d).iter().map(|&b| b as u32).collect::<Vec<u32>>() } else { bits(&down(gpu, &dx_d)) };
        assert!(after == dx_before, "{what}: backward without dx wrote dx");
    }
    let dx_all: Vec<f32> = if c.dx16 {
        let v = down(gpu, &dx16_d);
        assert!((0..rows).all(|r| v[r * lddx + inf..(r + 1) * lddx].iter().all(|&x| x == POISON16)), "{what}: backward wrote into dx's row padding");
        v.iter().map(|&b| dt.from_bits16(b)).collect()
    } else {
        let v = down(gpu, &dx_d);
        assert!((0..rows).all(|r| v[r * lddx + inf..(r + 1) * lddx].iter().all(|x| x.to_bits() == u32::MAX)), "{what}: backward wrote into dx's row padding");
        v
    };
    let dx_got: Vec<f32> = (0..rows).flat_map(|r| dx_all[r * lddx..r * lddx + inf].to_vec()).collect();
    // dy: its own columns unchanged, the padding after the tail untouched.
    let dy_after = down(gpu, &dy_d);
    for r in 0..rows {
        assert!(dy_after[r * lddy..r * lddy + o].iter().zip(&dy[r * o..(r + 1) * o]).all(|(&b, &v)| b == dt.to_bits16(v)), "{what}: backward changed dy (row {r})");
        assert!(dy_after[r * lddy + o + tail..(r + 1) * lddy].iter().all(|&b| b == POISON16), "{what}: backward wrote into dy's padding (row {r})");
    }
    let (da_got, db_got) = (down(gpu, &da_d), down(gpu, &db_d));

    // Reference backward: dx summed over parts, dA / dB accumulated onto their start values.
    let mut dx_ref = dx0.clone();
    let (mut da_ref, mut db_ref) = (da0.clone(), db0.clone());
    let mut col = 0;
    for (p, h) in host.iter().enumerate() {
        let out = c.outs[p];
        let base = Frozen { w: &h.w, bias: h.bias.as_deref(), in_features: inf, out_features: out };
        let ad = (h.r > 0).then(|| Adapter { a: &h.a, b: &h.b, r: h.r, scale: h.scale });
        let dyp: Vec<f32> = (0..rows).flat_map(|t| dy[t * o + col..t * o + col + out].to_vec()).collect();
        let mut dxp = vec![f32::NAN; rows * inf];
        let grads = ad.as_ref().map(|_| {
            let (da, db) = (&mut da_ref[da_off[p]..da_off[p] + h.r * inf], &mut db_ref[db_off[p]..db_off[p] + out * h.r]);
            AdapterGrads { da, db }
        });
        lora_linear_backward(&dyp, &x, &xa_parts[p], &base, ad.as_ref(), h.dropout.as_ref(), Some(&mut dxp), grads);
        dx_ref.iter_mut().zip(&dxp).for_each(|(a, b)| *a += b);
        col += out;
    }
    // Without an adapter dx is exact inputs with f32 accumulation; with one, g' is rounded.
    let dx_tol = if r_sum == 0 && !c.dx16 { 1e-5 } else { tol16 };
    if c.bwd != Bwd::NoDx {
        assert_close(&format!("{what}: dx"), &dx_got, &dx_ref, dx_tol);
    }
    if r_sum > 0 {
        for &p in &adapted {
            let h = &host[p];
            let (a0, n) = (da_off[p], h.r * inf);
            assert_close(&format!("{what}: dA of part {p}"), &da_got[a0..a0 + n], &da_ref[a0..a0 + n], tol16);
            assert!(da_got[a0 + n..a0 + n + gap].iter().all(|x| x.is_nan()), "{what}: dA gap after part {p} was written");
            let (b0, n) = (db_off[p], c.outs[p] * h.r);
            assert_close(&format!("{what}: dB of part {p}"), &db_got[b0..b0 + n], &db_ref[b0..b0 + n], tol16);
        }
    }
    Outputs { y: bits(&y_got), xa: bits(&xa_got), dx: bits(&dx_got), da: bits(&da_got), db: bits(&db_got) }
}

fn setup(test: &str) -> Option<(Gpu, Blas, Rng)> {
    let gpu = gpu_or_skip(test)?;
    let blas = Blas::on(&gpu, 32 << 20).expect("cuBLAS handle");
    Some((gpu, blas, Rng::fresh(test)))
}

#[test]
fn single_part_without_and_with_lora_and_bias() {
    let Some((gpu, blas, mut rng)) = setup("single_part_without_and_with_lora_and_bias") else { return };
    for dt in [Dtype::Bf16, Dtype::F16] {
        // Plain NF4 linear, odd sizes (numel not a multiple of the block).
        run_case(&gpu, &blas, &mut rng, &Case::new(dt, 37, 77, &[45]));
        // With LoRA and bias, one row.
        let mut c = Case::new(dt, 1, 96, &[80]);
        c.ranks = vec![Some(8)];
        c.bias = vec![true];
        run_case(&gpu, &blas, &mut rng, &c);
        // 300 rows, odd sizes, LoRA, strided, f32 y accumulated, dx accumulated.
        let mut c = Case::new(dt, 300, 67, &[131]);
        c.ranks = vec![Some(16)];
        c.pad = 5;
        c.y_f32 = true;
        c.beta = 1.0;
        c.dx_beta = 1.0;
        c.blocksize = 128;
        run_case(&gpu, &blas, &mut rng, &c);
    }
}

#[test]
fn fused_qkv_groups_with_gqa_sizes() {
    let Some((gpu, blas, mut rng)) = setup("fused_qkv_groups_with_gqa_sizes") else { return };
    for dt in [Dtype::Bf16, Dtype::F16] {
        for rows in [1, 37, 300] {
            // q|k|v with GQA (q 4 heads, k/v 1 head of 24), LoRA on q and v only, Qwen2 bias.
            let mut c = Case::new(dt, rows, 96, &[96, 24, 24]);
            c.ranks = vec![Some(8), None, Some(8)];
            c.bias = vec![true, true, true];
            c.pad = 3;
            run_case(&gpu, &blas, &mut rng, &c);
            // Bias on some parts only, f32 y overwritten, adapters not contiguous, dx accumulated.
            let mut c = Case::new(dt, rows, 72, &[72, 40, 40]);
            c.ranks = vec![Some(4), Some(8), Some(16)];
            c.bias = vec![false, true, false];
            c.y_f32 = true;
            c.contiguous = false;
            c.dx_beta = 1.0;
            run_case(&gpu, &blas, &mut rng, &c);
        }
    }
}

#[test]
fn gate_up_and_down_shapes_contiguous_and_not() {
    let Some((gpu, blas, mut rng)) = setup("gate_up_and_down_shapes_contiguous_and_not") else { return };
    for contiguous in [true, false] {
        // gate|up: two equal parts, different ranks.
        let mut c = Case::new(Dtype::Bf16, 129, 64, &[176, 176]);
        c.ranks = vec![Some(16), Some(8)];
        c.contiguous = contiguous;
        run_case(&gpu, &blas, &mut rng, &c);
        // down: one part, f32 residual accumulate, strided.
        let mut c = Case::new(Dtype::Bf16, 129, 176, &[64]);
        c.ranks = vec![Some(16)];
        c.y_f32 = true;
        c.beta = 1.0;
        c.pad = 8;
        c.contiguous = contiguous;
        run_case(&gpu, &blas, &mut rng, &c);
        // down as the model runs it: a 16-bit residual accumulated, dx in 16 bits (both
        // overwritten and accumulated).
        for dx_beta in [0.0, 1.0] {
            let mut c = Case::new(Dtype::Bf16, 129, 176, &[64]);
            c.ranks = vec![Some(16)];
            c.beta = 1.0;
            c.dx16 = true;
            c.dx_beta = dx_beta;
            c.bias = vec![dx_beta == 1.0]; // a bias added into the 16-bit residual too
            c.pad = 3;
            c.contiguous = contiguous;
            run_case(&gpu, &blas, &mut rng, &c);
        }
    }
    // No adapters in a fused group: xa may be null.
    run_case(&gpu, &blas, &mut rng, &Case::new(Dtype::Bf16, 50, 48, &[48, 16, 16]));
}

#[test]
fn dropout_in_fused_groups_matches_the_cpu_masks() {
    let Some((gpu, blas, mut rng)) = setup("dropout_in_fused_groups_matches_the_cpu_masks") else { return };
    for dt in [Dtype::Bf16, Dtype::F16] {
        for rows in [1, 37, 300] {
            // q|k|v, each part dropped with its own mask and probability, Qwen2 bias, strided.
            let mut c = Case::new(dt, rows, 96, &[96, 24, 24]);
            c.ranks = vec![Some(8), Some(4), Some(8)];
            c.bias = vec![true, true, true];
            c.pad = 3;
            c.dropout = vec![Some(0.1), Some(0.3), Some(0.5)];
            run_case(&gpu, &blas, &mut rng, &c);
            // Mixed: no adapter, an adapter without dropout, p = 0, p > 0; adapters not
            // contiguous, f32 y overwritten, dx accumulated.
            let mut c = Case::new(dt, rows, 72, &[72, 40, 40, 24]);
            c.ranks = vec![None, Some(8), Some(16), Some(4)];
            c.dropout = vec![None, None, Some(0.0), Some(0.2)];
            c.bias = vec![false, true, false, false];
            c.y_f32 = true;
            c.contiguous = false;
            c.dx_beta = 1.0;
            run_case(&gpu, &blas, &mut rng, &c);
        }
    }
    // gate|up as the model runs it (f32 dx overwritten), both parts dropped.
    let mut c = Case::new(Dtype::Bf16, 129, 64, &[176, 176]);
    c.ranks = vec![Some(16), Some(16)];
    c.dropout = vec![Some(0.1), Some(0.1)];
    run_case(&gpu, &blas, &mut rng, &c);
    // down as the model runs it: 16-bit residual accumulated, dx in 16 bits (overwritten
    // and accumulated), odd sizes, blocksize 128.
    for dx_beta in [0.0, 1.0] {
        let mut c = Case::new(Dtype::Bf16, 131, 177, &[67]);
        c.ranks = vec![Some(16)];
        c.beta = 1.0;
        c.dx16 = true;
        c.dx_beta = dx_beta;
        c.pad = 3;
        c.blocksize = 128;
        c.dropout = vec![Some(0.25)];
        run_case(&gpu, &blas, &mut rng, &c);
    }
}

/// The fused adapter (xa in x's tail, g' in dy's tail, one GEMM each way) against the CPU:
/// the model's four groups at odd sizes, parts with and without adapters, biases, f32 and
/// 16-bit y overwritten and accumulated, dx in both dtypes, strided, adapters contiguous or
/// not, dropout on some parts (the backward falls back there) and off.
#[test]
fn fused_adapter_matches_the_cpu() {
    let Some((gpu, blas, mut rng)) = setup("fused_adapter_matches_the_cpu") else { return };
    for dt in [Dtype::Bf16, Dtype::F16] {
        for rows in [1, 37, 300] {
            // q|k|v with GQA, LoRA on q and v only (Bd has a zero block), bias, padding.
            let mut c = Case::new(dt, rows, 96, &[96, 24, 24]);
            c.ranks = vec![Some(8), None, Some(8)];
            c.bias = vec![true, true, true];
            c.pad = 3;
            c.fused = true;
            run_case(&gpu, &blas, &mut rng, &c);
            // Every part adapted, different ranks, not contiguous, f32 y, dx accumulated.
            let mut c = Case::new(dt, rows, 72, &[72, 40, 40]);
            c.ranks = vec![Some(4), Some(8), Some(16)];
            c.bias = vec![false, true, false];
            c.y_f32 = true;
            c.contiguous = false;
            c.dx_beta = 1.0;
            c.fused = true;
            run_case(&gpu, &blas, &mut rng, &c);
        }
    }
    // gate|up (odd in: the strided dequant's element path; blocks straddle rows).
    let mut c = Case::new(Dtype::Bf16, 129, 67, &[176, 176]);
    c.ranks = vec![Some(16), Some(8)];
    c.fused = true;
    run_case(&gpu, &blas, &mut rng, &c);
    // down and o as the model runs them: 16-bit residual accumulated, dx 16-bit, both dx
    // modes, a bias on one, blocksize 128.
    for dx_beta in [0.0, 1.0] {
        let mut c = Case::new(Dtype::Bf16, 131, 176, &[64]);
        c.ranks = vec![Some(16)];
        c.beta = 1.0;
        c.dx16 = true;
        c.dx_beta = dx_beta;
        c.bias = vec![dx_beta == 1.0];
        c.pad = 5;
        c.blocksize = 128;
        c.fused = true;
        run_case(&gpu, &blas, &mut rng, &c);
    }
    // Dropout: on every part (backward falls back), and mixed with p = 0 / none / no adapter.
    let mut c = Case::new(Dtype::Bf16, 37, 96, &[96, 24, 24]);
    c.ranks = vec![Some(8), Some(4), Some(8)];
    c.dropout = vec![Some(0.1), Some(0.3), Some(0.5)];
    c.pad = 3;
    c.fused = true;
    run_case(&gpu, &blas, &mut rng, &c);
    let mut c = Case::new(Dtype::Bf16, 45, 72, &[72, 40, 40, 24]);
    c.ranks = vec![None, Some(8), Some(16), Some(4)];
    c.dropout = vec![None, None, Some(0.0), Some(0.2)];
    c.bias = vec![false, true, false, false];
    c.y_f32 = true;
    c.contiguous = false;
    c.dx_beta = 1.0;
    c.fused = true;
    run_case(&gpu, &blas, &mut rng, &c);
    // p = 0 everywhere: the fused backward runs (no fallback).
    let mut c = Case::new(Dtype::Bf16, 45, 64, &[64, 32]);
    c.ranks = vec![Some(16), Some(16)];
    c.dropout = vec![Some(0.0), Some(0.0)];
    c.fused = true;
    run_case(&gpu, &blas, &mut rng, &c);
    // No adapters: fused is a no-op (xa null).
    let mut c = Case::new(Dtype::Bf16, 50, 48, &[48, 16, 16]);
    c.fused = true;
    run_case(&gpu, &blas, &mut rng, &c);
}

/// The model's two other backward entry points: no `dx` (the first layer, above a frozen
/// embedding) and `dA` deferred until the input is written (`down`, whose input the
/// SwiGLU backward writes): the same adapter gradients as the full backward, checked
/// against the CPU, and the deferred `dx`/`dB`/`dA` bit-identical to the full call's.
#[test]
fn backward_without_dx_and_with_deferred_a_grads() {
    let Some((gpu, blas, rng)) = setup("backward_without_dx_and_with_deferred_a_grads") else { return };
    for fused in [false, true] {
        // q|k|v-like with GQA, an unadapted part, padding; dx f32 as the model's q|k|v.
        let mut c = Case::new(Dtype::Bf16, 77, 96, &[96, 24, 24]);
        c.ranks = vec![Some(16), None, Some(8)];
        c.pad = 3;
        c.fused = fused;
        c.bwd = Bwd::NoDx;
        run_case(&gpu, &blas, &mut rng.clone(), &c);
    }
    // down as the model runs it: 16-bit dx, fused; the deferred path vs the full one.
    for (rows, contiguous) in [(131, true), (64, false)] {
        let mut c = Case::new(Dtype::Bf16, rows, 176, &[64]);
        c.ranks = vec![Some(16)];
        c.beta = 1.0;
        c.dx16 = true;
        c.pad = 5;
        c.fused = true;
        c.contiguous = contiguous;
        let full = run_case(&gpu, &blas, &mut rng.clone(), &c);
        c.bwd = Bwd::Deferred;
        let deferred = run_case(&gpu, &blas, &mut rng.clone(), &c);
        assert_eq!(deferred, full, "deferred dA: different bits than the full backward ({rows} rows)");
    }
    // Two adapted parts, f16, not contiguous: per-part dA from the tail.
    let mut c = Case::new(Dtype::F16, 45, 64, &[64, 32]);
    c.ranks = vec![Some(16), Some(8)];
    c.contiguous = false;
    c.fused = true;
    c.bwd = Bwd::Deferred;
    run_case(&gpu, &blas, &mut rng.clone(), &c);
}

/// The fused and the separate adapter GEMMs agree closely on the same data (they differ
/// only in rounding: fused rounds y and dx once).
#[test]
fn fused_and_separate_adapter_agree() {
    let Some((gpu, blas, rng)) = setup("fused_and_separate_adapter_agree") else { return };
    let mut c = Case::new(Dtype::Bf16, 300, 128, &[128, 64, 64]);
    c.ranks = vec![Some(16), Some(16), Some(16)];
    c.pad = 2;
    let sep = run_case(&gpu, &blas, &mut rng.clone(), &c);
    c.fused = true;
    let fused = run_case(&gpu, &blas, &mut rng.clone(), &c);
    let f = |v: &[u32]| v.iter().map(|&b| f32::from_bits(b)).collect::<Vec<f32>>();
    assert_eq!(fused.xa, sep.xa, "xa is the same GEMM either way");
    assert_close("y fused vs separate", &f(&fused.y), &f(&sep.y), 1e-2);
    assert_close("dx fused vs separate", &f(&fused.dx), &f(&sep.dx), 1e-2);
    assert_close("dA fused vs separate", &f(&fused.da), &f(&sep.da), 1e-3);
    assert_close("dB fused vs separate", &f(&fused.db), &f(&sep.db), 1e-3);
    assert_ne!(fused.y, sep.y, "the fused path did not run (bit-identical y)");
}

/// `p = 0` on every part runs exactly the code without dropout: the same bits out.
#[test]
fn dropout_zero_is_bit_identical_to_none() {
    let Some((gpu, blas, rng)) = setup("dropout_zero_is_bit_identical_to_none") else { return };
    for dt in [Dtype::Bf16, Dtype::F16] {
        let mut c = Case::new(dt, 37, 96, &[96, 24, 24]);
        c.ranks = vec![Some(8), Some(8), Some(8)];
        c.pad = 3;
        c.dx_beta = 1.0;
        let none = run_case(&gpu, &blas, &mut rng.clone(), &c);
        c.dropout = vec![Some(0.0); 3];
        let zero = run_case(&gpu, &blas, &mut rng.clone(), &c);
        assert!(none == zero, "{}: p = 0 differs from no dropout", dt.name());
        c.dropout = vec![Some(0.1); 3];
        let on = run_case(&gpu, &blas, &mut rng.clone(), &c);
        assert!(on.xa != none.xa && on.dx != none.dx && on.da != none.da, "{}: dropout 0.1 changed nothing", dt.name());
    }
}

/// The mask kernel equals `fsdp::dropout` bit for bit (indices beyond 2^32 too); the
/// dropped-input and fused masked-dx kernels equal the same f32 operations on the CPU.
#[test]
fn dropout_kernels_match_the_cpu_bit_for_bit() {
    let Some((gpu, _blas, mut rng)) = setup("dropout_kernels_match_the_cpu_bit_for_bit") else { return };
    let s = gpu.stream();
    for (p, first, n) in [(0.1, 0u64, 100_003usize), (0.5, (1 << 33) - 50_000, 100_003), (0.9, u64::MAX - 70_000, 70_001), (0.0, 17, 1000)] {
        let d = Dropout { p, seed: rng.next_u64() };
        let mut m = s.alloc_zeros::<u8>(n).unwrap();
        poison(s, &mut m).unwrap();
        unsafe { linear::dropout_mask(&d, first, n, ptr(&gpu, &m), s.cu_stream()) }.unwrap();
        let got = down(&gpu, &m);
        let want: Vec<u8> = (0..n as u64).map(|i| u8::from(d.keep(first + i))).collect();
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(bad.is_none(), "p {p} seed {:#x}: mask differs at index {}", d.seed, first + bad.unwrap_or(0) as u64);
        let kept = want.iter().filter(|&&k| k == 1).count() as f64 / n as f64;
        assert!((kept - (1.0 - p)).abs() < 0.01, "p {p}: kept {kept}");
    }
    for dt in [Dtype::Bf16, Dtype::F16] {
        for (rows, cols, ldx, ldxd) in [(1usize, 5usize, 5usize, 5usize), (37, 77, 80, 79), (300, 257, 257, 260)] {
            let d = Dropout { p: 0.3, seed: rng.next_u64() };
            let x = normals(&mut rng, dt, rows * cols, 2.0);
            let x_d = up(&gpu, &strided(&x.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>(), rows, cols, ldx, POISON16));
            let mut xd_d = s.alloc_zeros::<u16>(rows * ldxd).unwrap();
            poison(s, &mut xd_d).unwrap();
            unsafe { linear::dropout_input(dt, ptr(&gpu, &x_d), ldx, rows, cols, &d, ptr(&gpu, &xd_d), ldxd, s.cu_stream()) }.unwrap();
            let got = down(&gpu, &xd_d);
            // The CPU reference's xd (f32), rounded once to the compute dtype.
            let want: Vec<u16> = d.apply(&x).iter().map(|&v| dt.to_bits16(v)).collect();
            for r in 0..rows {
                assert_eq!(&got[r * ldxd..r * ldxd + cols], &want[r * cols..(r + 1) * cols], "{} {rows}x{cols}: xd row {r}", dt.name());
                assert!(got[r * ldxd + cols..(r + 1) * ldxd].iter().all(|&v| v == POISON16), "dropout_input wrote into the padding");
            }
        }
    }
    // The fused masked adapter dx: 5 parts (two launches of at most 4), ranks 1..16, odd
    // sizes, strided dx; the CPU repeats the kernel's operations in its order.
    let (rows, cols, lddx) = (45usize, 131usize, 133usize);
    let ranks = [4usize, 8, 16, 1, 3];
    let r_all: usize = ranks.iter().sum::<usize>() + 2; // two unused columns in g'
    for (dx_dt, dt) in [(Dtype::F32, Dtype::Bf16), (Dtype::F32, Dtype::F16), (Dtype::Bf16, Dtype::Bf16), (Dtype::F16, Dtype::F16)] {
        let g = normals(&mut rng, dt, rows * r_all, 1.0);
        let g_d = up(&gpu, &g.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>());
        let mut col = 1; // parts start at column 1
        let mut parts = Vec::new();
        let mut host_a = Vec::new();
        let mut keep_a = Vec::new();
        for (i, &r) in ranks.iter().enumerate() {
            let a = normals(&mut rng, dt, r * cols, 0.3);
            let a_d = up(&gpu, &a.iter().map(|&v| dt.to_bits16(v)).collect::<Vec<_>>());
            let d = Dropout { p: [0.1, 0.5, 0.3, 0.05, 0.9][i], seed: rng.next_u64() };
            parts.push(linear::DroppedPart { a: ptr(&gpu, &a_d), r, g_col: col, dropout: d });
            host_a.push(a);
            keep_a.push(a_d);
            col += r;
        }
        let dx0: Vec<f32> = (0..rows * cols).map(|_| dx_dt.round(rng.normal() as f32)).collect();
        let mut want = dx0.clone();
        for chunk in (0..parts.len()).collect::<Vec<_>>().chunks(4) {
            for row in 0..rows {
                for c in 0..cols {
                    let mut add = 0f32;
                    for &pi in chunk {
                        let p = &parts[pi];
                        let mut acc = 0f32;
                        for k in 0..p.r {
                            acc = g[row * r_all + p.g_col + k].mul_add(host_a[pi][k * cols + c], acc);
                        }
                        if p.dropout.keep((row * cols + c) as u64) {
                            add += acc * p.dropout.scale();
                        }
                    }
                    let w = &mut want[row * cols + c];
                    *w = dx_dt.round(*w + add);
                }
            }
        }
        let got: Vec<f32> = if dx_dt == Dtype::F32 {
            let dx_d = up(&gpu, &strided(&dx0, rows, cols, lddx, poison32()));
            unsafe { linear::dropout_lora_dx(dx_dt, dt, ptr(&gpu, &dx_d), lddx, ptr(&gpu, &g_d), r_all, rows, cols, &parts, s.cu_stream()) }.unwrap();
            let v = down(&gpu, &dx_d);
            assert!((0..rows).all(|r| v[r * lddx + cols..(r + 1) * lddx].iter().all(|x| x.to_bits() == u32::MAX)), "dropout_lora_dx wrote into the padding");
            (0..rows).flat_map(|r| v[r * lddx..r * lddx + cols].to_vec()).collect()
        } else {
            let dx_d = up(&gpu, &strided(&dx0.iter().map(|&v| dx_dt.to_bits16(v)).collect::<Vec<_>>(), rows, cols, lddx, POISON16));
            unsafe { linear::dropout_lora_dx(dx_dt, dt, ptr(&gpu, &dx_d), lddx, ptr(&gpu, &g_d), r_all, rows, cols, &parts, s.cu_stream()) }.unwrap();
            let v = down(&gpu, &dx_d);
            assert!((0..rows).all(|r| v[r * lddx + cols..(r + 1) * lddx].iter().all(|&x| x == POISON16)), "dropout_lora_dx wrote into the padding");
            (0..rows).flat_map(|r| v[r * lddx..r * lddx + cols].iter().map(|&b| dx_dt.from_bits16(b)).collect::<Vec<_>>()).collect()
        };
        assert_eq!(bits(&got), bits(&want), "dropout_lora_dx, dx {} compute {}", dx_dt.name(), dt.name());
        assert_ne!(bits(&got), bits(&dx0));
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_culprit() {
    let Some((gpu, blas, _)) = setup("bad_arguments_are_errors_naming_the_culprit") else { return };
    let s = gpu.stream();
    let (inf, out, rows) = (64usize, 32usize, 4usize);
    let w: Vec<f32> = (0..out * inf).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = nf4::quantize("w", &w, &[out, inf], &QuantizeOptions::default()).unwrap();
    let qd = GpuQuantized::upload(&gpu, "w", &q).unwrap();
    // Distinct regions of one zeroed buffer for every operand (x, y, xa, scratch, ...).
    let buf = s.alloc_zeros::<u8>(4 << 20).unwrap();
    let p = ptr(&gpu, &buf);
    let (yp, xap, sp) = (p + (1 << 20), p + (2 << 20), p + (3 << 20));
    let lora = LoraRef { a: p, b: p, r: 4, scale: 2.0, da: p, db: p, dropout: None };
    let part = Part { weight: Nf4Ref { weight: &qd }, out_features: out, bias: 0, lora: Some(lora) };
    let parts = [part];
    let g = Group { parts: &parts, in_features: inf, dtype: Dtype::Bf16 };
    let sb = linear::scratch_bytes(&g, rows);
    assert!(sb >= out * inf * 2 + 4 * inf * 2 + rows * 4 * 2);
    let st = s.cu_stream();
    let fwd = |g: &Group, rows, ldx, ldy, y_dt, beta, xa, sb| unsafe { linear::forward(&blas, g, rows, p, ldx, yp, ldy, y_dt, beta, xa, 4, sp, sb, st) };
    let msg = |r: Result<(), fsdp::gpu::GpuError>| r.expect_err("must be an error").to_string();
    assert!(fwd(&g, rows, inf, out, Dtype::Bf16, 0.0, xap, sb).is_ok());
    assert!(msg(fwd(&g, 0, inf, out, Dtype::Bf16, 0.0, xap, sb)).contains("rows"));
    assert!(msg(fwd(&g, rows, inf - 1, out, Dtype::Bf16, 0.0, xap, sb)).contains("ldx"));
    assert!(msg(fwd(&g, rows, inf, out - 1, Dtype::Bf16, 0.0, xap, sb)).contains("ldy"));
    assert!(fwd(&g, rows, inf, out, Dtype::Bf16, 1.0, xap, sb).is_ok());
    assert!(msg(fwd(&g, rows, inf, out, Dtype::Bf16, 0.5, xap, sb)).contains("beta"));
    assert!(msg(fwd(&g, rows, inf, out, Dtype::F32, 0.5, xap, sb)).contains("beta"));
    assert!(msg(fwd(&g, rows, inf, out, Dtype::F16, 0.0, xap, sb)).contains("y_dt"));
    assert!(msg(fwd(&g, rows, inf, out, Dtype::Bf16, 0.0, 0, sb)).contains("xa"));
    assert!(msg(fwd(&g, rows, inf, out, Dtype::Bf16, 0.0, xap, sb - 1)).contains("scratch"));
    let g32 = Group { dtype: Dtype::F32, ..g };
    assert!(msg(fwd(&g32, rows, inf, out, Dtype::F32, 0.0, xap, sb)).contains("bf16 or f16"));
    let wrong = [Part { out_features: out + 1, ..part }];
    let e = msg(fwd(&Group { parts: &wrong, ..g }, rows, inf, out + 1, Dtype::Bf16, 0.0, xap, sb * 2));
    assert!(e.contains("part 0") && e.contains("[32, 64]"), "{e}");
    let two = [Part { lora: None, ..part }, Part { lora: Some(LoraRef { a: 0, ..lora }), ..part }];
    let e = msg(fwd(&Group { parts: &two, ..g }, rows, inf, 2 * out, Dtype::Bf16, 0.0, xap, 1 << 20));
    assert!(e.contains("part 1") && e.contains("`a`"), "{e}");
    let zero_rank = [Part { lora: Some(LoraRef { r: 0, ..lora }), ..part }];
    assert!(msg(fwd(&Group { parts: &zero_rank, ..g }, rows, inf, out, Dtype::Bf16, 0.0, xap, sb)).contains("rank"));
    assert!(msg(fwd(&Group { parts: &[], ..g }, rows, inf, out, Dtype::Bf16, 0.0, xap, sb)).contains("no parts"));
    // Dropout: p = 0 needs no more scratch than none; p > 0 needs [rows, in] f32 more; p
    // outside [0, 1) is refused.
    let with_p = |pr: f64| [Part { lora: Some(LoraRef { dropout: Some(Dropout { p: pr, seed: 1 }), ..lora }), ..part }];
    let (zero, some, one) = (with_p(0.0), with_p(0.1), with_p(1.0));
    assert_eq!(linear::scratch_bytes(&Group { parts: &zero, ..g }, rows), sb);
    assert!(!Group { parts: &zero, ..g }.has_dropout() && Group { parts: &some, ..g }.has_dropout());
    assert_eq!(linear::scratch_bytes(&Group { parts: &some, ..g }, rows), sb + (rows * inf * 2).div_ceil(256) * 256);
    let e = msg(fwd(&Group { parts: &one, ..g }, rows, inf, out, Dtype::Bf16, 0.0, xap, 1 << 20));
    assert!(e.contains("part 0") && e.contains("dropout"), "{e}");
    // Backward: gradients required.
    let no_grad = [Part { lora: Some(LoraRef { da: 0, ..lora }), ..part }];
    let gb = Group { parts: &no_grad, ..g };
    let bwd = |g: &Group, ldxa, lddy, tail, lddx, dx_dt| unsafe { linear::backward(&blas, g, rows, p, inf, xap, ldxa, yp, lddy, tail, p + (512 << 10), lddx, dx_dt, 0.0, sp, sb, st) };
    let e = msg(bwd(&gb, 4, out, false, inf, Dtype::F32));
    assert!(e.contains("part 0") && e.contains("da"), "{e}");
    assert!(msg(bwd(&g, 4, out, false, inf - 1, Dtype::F32)).contains("lddx"));
    assert!(msg(bwd(&g, 4, out, false, inf, Dtype::F16)).contains("dx_dt"));
    assert!(msg(bwd(&g, 3, out, false, inf, Dtype::F32)).contains("ldxa"));
    // The fused backward needs R writable columns after dy's O.
    assert!(msg(bwd(&g, 4, out + 3, true, inf, Dtype::F32)).contains("lddy"));
    assert!(bwd(&g, 4, out + 4, true, inf, Dtype::F32).is_ok());
    // A dense xa narrower than R; xa in x's tail with too small a row stride.
    assert!(msg(unsafe { linear::forward(&blas, &g, rows, p, inf, yp, out, Dtype::Bf16, 0.0, xap, 3, sp, sb, st) }).contains("ldxa"));
    let tail = p + 2 * inf as u64;
    assert!(msg(unsafe { linear::forward(&blas, &g, rows, p, inf + 3, yp, out, Dtype::Bf16, 0.0, tail, inf + 3, sp, sb, st) }).contains("ldx"));
    assert!(unsafe { linear::forward(&blas, &g, rows, p, inf + 4, yp, out, Dtype::Bf16, 0.0, tail, inf + 4, sp, sb, st) }.is_ok());
    assert!(msg(unsafe { linear::forward_adapter_input(&blas, &g, rows, p, inf, xap, 3, sp, sb, st) }).contains("ldxa"));
    // The handle must be bound to the call's stream.
    let other = gpu.ctx().new_stream().unwrap();
    let e = msg(unsafe { linear::forward(&blas, &g, rows, p, inf, yp, out, Dtype::Bf16, 0.0, xap, 4, sp, sb, other.cu_stream()) });
    assert!(e.contains("stream"), "{e}");
    s.synchronize().unwrap();
}

/// Restores this thread's pass settings when dropped (a failing case must not leak them).
struct PassSettings;
impl PassSettings {
    fn set(mode: linear::LoraPass, target: usize) -> PassSettings {
        linear::set_lora_pass(mode);
        linear::set_lora_pass_target_blocks(target);
        PassSettings
    }
}
impl Drop for PassSettings {
    fn drop(&mut self) {
        linear::set_lora_pass(linear::LoraPass::Auto);
        linear::set_lora_pass_target_blocks(0);
    }
}

/// The one-pass `g'`/`dB` kernels (tensor-core and portable) against the CPU for every
/// supported rank, both dtypes, odd rows, odd and multi-span widths, aligned (fused
/// layout, widths multiples of 8: cp.async) and not (odd widths, padded strides: element
/// loads), one and several row chunks and several 64-row steps per chunk; deterministic
/// (two runs, same bits); close to cuBLAS's GEMMs and not the same code (bits differ).
#[test]
fn lora_pass_matches_the_cpu_and_is_deterministic() {
    use linear::LoraPass::{Always, Cublas, Portable};
    let Some((gpu, blas, rng)) = setup("lora_pass_matches_the_cpu_and_is_deterministic") else { return };
    let mut rng = rng;
    // LORA_PASS_TESTS_SHORT=1 (for compute-sanitizer): fewer sizes, the same code paths.
    let short = std::env::var("LORA_PASS_TESTS_SHORT").is_ok_and(|v| v == "1");
    let (row_set, rank_set): (&[usize], &[usize]) = if short { (&[37], &[8, 64]) } else { (&[1, 37, 300], &[8, 16, 32, 64]) };
    for mode in [Always, Portable] {
        for dt in [Dtype::Bf16, Dtype::F16] {
            for &rows in row_set {
                for &r in rank_set {
                    // Aligned: q|k|v-like with a wide first part (several spans, a tail
                    // span), fused tails, 16-bit dx accumulated. Target 4 blocks: chunks
                    // of several 64-row steps; default target: 64-row chunks.
                    let targets: &[usize] = if rows > 64 { &[4, 0] } else { &[0] };
                    for &target in targets {
                        let _s = PassSettings::set(mode, target);
                        let mut c = Case::new(dt, rows, 32, &[1048, 40, 136]);
                        c.ranks = vec![Some(r), None, Some(r)];
                        c.fused = true;
                        c.dx16 = true;
                        c.dx_beta = 1.0;
                        let seed = rng.clone();
                        let a = run_case(&gpu, &blas, &mut seed.clone(), &c);
                        let b = run_case(&gpu, &blas, &mut seed.clone(), &c);
                        assert!(a == b, "{mode:?} {c:?}: two runs differ");
                        rng.next_u64();
                    }
                    // Not aligned: odd widths and strides, dense xa, two adapted parts of
                    // different widths, f32 dx overwritten.
                    let _s = PassSettings::set(mode, 0);
                    let mut c = Case::new(dt, rows, 72, &[45, 131, 67]);
                    c.ranks = vec![Some(r), Some(r), None];
                    c.pad = 3;
                    c.contiguous = false;
                    run_case(&gpu, &blas, &mut rng, &c);
                }
                // Mixed ranks in one group (one launch per rank, one reduce) and a part
                // of an unsupported rank (the whole group on cuBLAS).
                let _s = PassSettings::set(mode, 0);
                let mut c = Case::new(dt, rows, 64, &[256, 64, 64, 128]);
                c.ranks = vec![Some(16), Some(8), Some(64), Some(32)];
                c.fused = true;
                run_case(&gpu, &blas, &mut rng, &c);
                c.ranks = vec![Some(16), Some(4), None, Some(8)];
                run_case(&gpu, &blas, &mut rng, &c);
            }
        }
    }
    // The pass (either kernel) and cuBLAS on the same data: close, and not bit-identical
    // (dB sums 300 rows in another order): the pass did run.
    let mut c = Case::new(Dtype::Bf16, 300, 64, &[520, 136]);
    c.ranks = vec![Some(16), Some(16)];
    c.fused = true;
    let run = |mode| {
        let _s = PassSettings::set(mode, 0);
        run_case(&gpu, &blas, &mut rng.clone(), &c)
    };
    let (blas_out, pass, portable) = (run(Cublas), run(Always), run(Portable));
    let f = |v: &[u32]| v.iter().map(|&b| f32::from_bits(b)).collect::<Vec<f32>>();
    for (name, o) in [("tensor-core pass", &pass), ("portable pass", &portable)] {
        assert_close(&format!("{name} vs cuBLAS: dB"), &f(&o.db), &f(&blas_out.db), 1e-5);
        assert_close(&format!("{name} vs cuBLAS: dA"), &f(&o.da), &f(&blas_out.da), 1e-2);
        assert_close(&format!("{name} vs cuBLAS: dx"), &f(&o.dx), &f(&blas_out.dx), 1e-2);
        assert_ne!(o.db, blas_out.db, "{name}: dB bit-identical to cuBLAS's (did the pass run?)");
    }
}

#[test]
fn kernel_source_compiles_for_sm75_sm80_sm90() {
    if !cudakit::nvrtc_present() {
        eprintln!("SKIPPED kernel_source_compiles_for_sm75_sm80_sm90: no NVRTC");
        return;
    }
    for arch in [cudakit::Arch::SM75, cudakit::Arch { major: 8, minor: 0 }, cudakit::Arch { major: 9, minor: 0 }] {
        cudakit::kernel::compile_ptx(linear::kernel_source(), arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
    }
}
