//! The element-wise and row kernels of `fsdp::gpu::kernels` against the CPU reference
//! (`fsdp::ops`, `fsdp::optim`): fresh random data (seed printed; replay with
//! `NF4_TEST_SEED`), odd sizes, strided and misaligned operands (so both the vector and
//! the scalar builds run), bf16 and f16, outputs poisoned first and their padding checked
//! untouched. The CPU reference runs on the same 16-bit-rounded inputs.
//!
//! Tolerances follow from what differs between the two sides:
//! - embedding, cast, RoPE, AdamW: nothing (same operations in the same order): exact.
//! - SwiGLU: `expf` vs Rust's `exp` (a few f32 ulps): the 16-bit output is within one ulp
//!   of the CPU's f32 value (half an ulp of rounding plus a flip at a rounding boundary);
//!   `dgate` adds the `1 + g (1 - s)` cancellation, bounded by its terms.
//! - RMSNorm: f32 row sums vs the CPU's f64: `rstd` within 2e-6 relative, `y` within one
//!   16-bit ulp, `dx` within 1e-5 of the magnitude of its terms.
//!
//! Skipped without a GPU; failures under `REQUIRE_GPU=1` (the GPU machine).

use cudakit::cudarc::driver::{CudaSlice, DevicePtr};
use cudakit::testing::{gpu_or_skip, poison};
use cudakit::{Gpu, GpuError};
use fsdp::gpu::kernels as k;
use fsdp::gpu::Dtype;
use fsdp::{ops, optim};
use nf4::testing::Rng;

const DT16: [Dtype; 2] = [Dtype::Bf16, Dtype::F16];
const ROWS: [usize; 4] = [1, 3, 37, 129];
const WIDTHS: [usize; 4] = [8, 40, 2050, 4097];
/// Operand layouts: dense, strided with 16-byte aligned rows, strided with an odd stride,
/// dense starting one element into the buffer, and each operand a different one of those.
const MODES: [&str; 5] = ["dense", "strided-aligned", "strided-odd", "offset-1", "mixed"];

// ------------------------------------------------------------------ 16-bit helpers

/// The spacing of `d` at `|x|` (f32's for f32).
fn ulp(d: Dtype, x: f32) -> f32 {
    let a = x.abs();
    match d {
        Dtype::F32 => f32::from_bits(a.to_bits() + 1) - a,
        _ => {
            let b = d.to_bits16(a);
            d.from_bits16(b + 1) - d.from_bits16(b)
        }
    }
}

fn encode(d: Dtype, x: f32, out: &mut [u8]) {
    match d {
        Dtype::F32 => out.copy_from_slice(&x.to_le_bytes()),
        _ => out.copy_from_slice(&d.to_bits16(x).to_le_bytes()),
    }
}

fn decode(d: Dtype, b: &[u8]) -> f32 {
    match d {
        Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        _ => d.from_bits16(u16::from_le_bytes([b[0], b[1]])),
    }
}

fn normals(r: &mut Rng, n: usize, scale: f64, d: Dtype) -> Vec<f32> {
    (0..n).map(|_| d.round((r.normal() * scale) as f32)).collect()
}

// ------------------------------------------------------------------ strided operands

/// Where a `[rows, cols]` operand lives in its buffer (elements).
#[derive(Clone, Copy, Debug)]
struct Lay {
    rows: usize,
    cols: usize,
    ld: usize,
    off: usize,
}

impl Lay {
    /// Layout of operand `j` in mode `mode` (see [`MODES`]).
    fn new(mode: usize, rows: usize, cols: usize, j: usize) -> Lay {
        let m = if mode == 4 { j % 4 } else { mode };
        let (ld, off) = match m {
            0 => (cols, 0),
            1 => (cols.next_multiple_of(8) + 8, 0),
            2 => (cols + 3, 0),
            _ => (cols, 1),
        };
        Lay { rows, cols, ld, off }
    }
    fn dense(rows: usize, cols: usize) -> Lay {
        Lay { rows, cols, ld: cols, off: 0 }
    }
    fn elems(&self) -> usize {
        self.off + self.rows.saturating_sub(1) * self.ld + self.cols + 5
    }
    fn at(&self, r: usize, c: usize) -> usize {
        self.off + r * self.ld + c
    }
    fn inside(&self, i: usize) -> bool {
        i >= self.off && (i - self.off) / self.ld < self.rows && (i - self.off) % self.ld < self.cols
    }
}

/// A device operand: its bytes (host copy at upload time), buffer and layout.
struct Op {
    d: Dtype,
    lay: Lay,
    host: Vec<u8>,
    buf: CudaSlice<u8>,
}

impl Op {
    /// Uploads dense `vals` in layout `lay`; the padding is random bytes (NaNs included),
    /// which no kernel may read into an output or write over.
    fn input(gpu: &Gpu, r: &mut Rng, d: Dtype, lay: Lay, vals: &[f32]) -> Op {
        assert_eq!(vals.len(), lay.rows * lay.cols);
        let mut host = r.bytes(lay.elems() * d.size());
        for i in 0..lay.rows {
            for c in 0..lay.cols {
                let at = lay.at(i, c) * d.size();
                encode(d, vals[i * lay.cols + c], &mut host[at..at + d.size()]);
            }
        }
        let buf = gpu.stream().clone_htod(&host).expect("upload");
        Op { d, lay, host, buf }
    }
    /// An output: every byte 0xff (NaN) first.
    fn poisoned(gpu: &Gpu, d: Dtype, lay: Lay) -> Op {
        let mut buf = gpu.stream().alloc_zeros::<u8>(lay.elems() * d.size()).expect("alloc");
        poison(gpu.stream(), &mut buf).expect("poison");
        Op { d, lay, host: vec![0xff; lay.elems() * d.size()], buf }
    }
    fn addr(&self, gpu: &Gpu) -> u64 {
        self.buf.device_ptr(gpu.stream()).0 + (self.lay.off * self.d.size()) as u64
    }
    fn ld(&self) -> usize {
        self.lay.ld
    }
    /// The operand's values now, dense; panics if a byte outside it changed.
    fn read(&self, gpu: &Gpu, what: &str) -> Vec<f32> {
        let now = self.bytes(gpu, what);
        let s = self.d.size();
        let l = self.lay;
        let mut out = Vec::with_capacity(l.rows * l.cols);
        for i in 0..l.rows {
            for c in 0..l.cols {
                out.push(decode(self.d, &now[l.at(i, c) * s..]));
            }
        }
        out
    }
    /// Raw 16-bit values, dense.
    fn bits(&self, gpu: &Gpu, what: &str) -> Vec<u16> {
        let now = self.bytes(gpu, what);
        let l = self.lay;
        let mut out = Vec::with_capacity(l.rows * l.cols);
        for i in 0..l.rows {
            for c in 0..l.cols {
                let at = l.at(i, c) * 2;
                out.push(u16::from_le_bytes([now[at], now[at + 1]]));
            }
        }
        out
    }
    fn bytes(&self, gpu: &Gpu, what: &str) -> Vec<u8> {
        let now: Vec<u8> = gpu.stream().clone_dtoh(&self.buf).expect("download");
        let s = self.d.size();
        for (e, (a, b)) in now.chunks(s).zip(self.host.chunks(s)).enumerate() {
            assert!(self.lay.inside(e) || a == b, "{what}: element {e} outside the operand ({:?}) was written", self.lay);
        }
        now
    }
}

fn gpu_stream(gpu: &Gpu) -> cudakit::cudarc::driver::sys::CUstream {
    gpu.bind().expect("bind");
    gpu.stream().cu_stream()
}

/// Checks `got` (16-bit `d`) against the CPU's f32 `want`: within `ulp(d, want) + extra[i]`.
fn check16(what: &str, d: Dtype, got: &[f32], want: &[f32], extra: impl Fn(usize) -> f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = ulp(d, w) + extra(i);
        assert!(err <= tol, "{what}: [{i}] = {g}, CPU {w} (err {err:e} > tol {tol:e})");
    }
}

// ------------------------------------------------------------------ NVRTC

#[test]
fn kernels_compile_for_sm75_sm80_sm90() {
    if !cudakit::nvrtc_present() {
        eprintln!("SKIPPED kernels_compile_for_sm75_sm80_sm90: no NVRTC");
        return;
    }
    for arch in [cudakit::Arch::SM75, cudakit::Arch { major: 8, minor: 0 }, cudakit::Arch { major: 9, minor: 0 }] {
        cudakit::kernel::compile_ptx(k::source(), arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
    }
}

// ------------------------------------------------------------------ embedding

#[test]
fn embedding_matches_cpu() {
    let Some(gpu) = gpu_or_skip("embedding_matches_cpu") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("embedding_matches_cpu");
    let vocab = 50;
    for dt in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        for (ci, (&tokens, &hidden)) in ROWS.iter().zip(&WIDTHS).chain(ROWS.iter().zip(WIDTHS.iter().rev())).enumerate() {
            // (table, out) one element into their buffers or not: vector and scalar builds
            for (mode, (t_off, o_off)) in [(0, 0), (1, 1), (0, 1), (1, 0)].into_iter().enumerate() {
                let table = normals(&mut r, vocab * hidden, 1.0, dt);
                let mut ids: Vec<u32> = (0..tokens).map(|_| r.below(vocab) as u32).collect();
                // out-of-range ids: zeros, the table never read outside
                if tokens > 2 {
                    ids[1] = vocab as u32;
                    ids[tokens - 1] = u32::MAX;
                }
                let valid: Vec<u32> = ids.iter().map(|&i| if (i as usize) < vocab { i } else { 0 }).collect();
                let mut want = vec![f32::NAN; tokens * hidden];
                ops::embedding_forward(&table, hidden, &valid, &mut want);
                for (t, &id) in ids.iter().enumerate() {
                    if id as usize >= vocab {
                        want[t * hidden..(t + 1) * hidden].fill(0.0);
                    }
                }
                let tab = Op::input(&gpu, &mut r, dt, Lay { off: t_off, ..Lay::dense(vocab, hidden) }, &table);
                let idb = gpu.stream().clone_htod(&ids).unwrap();
                let out = Op::poisoned(&gpu, Dtype::F32, Lay { off: o_off, ..Lay::dense(tokens, hidden) });
                unsafe { k::embedding_forward(dt, tab.addr(&gpu), vocab, hidden, idb.device_ptr(gpu.stream()).0, tokens, out.addr(&gpu), st) }.unwrap();
                let got = out.read(&gpu, "out");
                let what = format!("embedding {} case {ci} {tokens}x{hidden} layout {mode}", dt.name());
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: not exact");
            }
        }
    }
}

impl Lay {
    /// The same offset with a dense stride (operands the API takes without a stride).
    fn dense_if(self, dense: bool) -> Lay {
        if dense {
            Lay { ld: self.cols, ..self }
        } else {
            self
        }
    }
}

// ------------------------------------------------------------------ RMSNorm

/// The odd sizes, plus rows longer than the 8192 elements a block keeps in registers.
fn rms_shapes() -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = ROWS.iter().flat_map(|&r| WIDTHS.iter().map(move |&w| (r, w))).collect();
    v.extend([(3, 8200), (2, 16389)]);
    v
}

#[test]
fn rms_norm_forward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("rms_norm_forward_matches_cpu") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("rms_norm_forward_matches_cpu");
    let eps = 1e-5f32;
    for dt in DT16 {
        for x_dt in [Dtype::F32, dt] {
            for (rows, hidden) in rms_shapes() {
                {
                    for (mode, mode_name) in MODES.iter().enumerate() {
                        let x = normals(&mut r, rows * hidden, 1.5, x_dt);
                        let w: Vec<f32> = (0..hidden).map(|_| dt.round((1.0 + 0.2 * r.normal()) as f32)).collect();
                        let (mut y, mut rs) = (vec![f32::NAN; rows * hidden], vec![f32::NAN; rows]);
                        ops::rms_norm_forward(&x, &w, eps, &mut y, &mut rs);

                        let xo = Op::input(&gpu, &mut r, x_dt, Lay::new(mode, rows, hidden, 0), &x);
                        let wo = Op::input(&gpu, &mut r, dt, Lay::new(mode, 1, hidden, 1).dense_if(true), &w);
                        let yo = Op::poisoned(&gpu, dt, Lay::new(mode, rows, hidden, 2));
                        let ro = Op::poisoned(&gpu, Dtype::F32, Lay::dense(1, rows));
                        // Every other layout also copies x out (the model's residual stream).
                        let copy = (mode % 2 == 1).then(|| Op::poisoned(&gpu, x_dt, Lay::new(mode, rows, hidden, 3)));
                        let (ca, cld) = copy.as_ref().map_or((0, 0), |c| (c.addr(&gpu), c.ld()));
                        unsafe {
                            k::rms_norm_forward_copy(x_dt, dt, xo.addr(&gpu), xo.ld(), wo.addr(&gpu), rows, hidden, eps, yo.addr(&gpu), yo.ld(), ro.addr(&gpu), ca, cld, st)
                        }
                        .unwrap();
                        let what = format!("rms fwd x {} y {} {rows}x{hidden} {}", x_dt.name(), dt.name(), mode_name);
                        if let Some(c) = &copy {
                            let got: Vec<u32> = c.read(&gpu, "xcopy").iter().map(|v| v.to_bits()).collect();
                            assert!(got == x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>(), "{what}: xcopy is not x");
                        }
                        let grs = ro.read(&gpu, "rstd");
                        for (i, (&g, &c)) in grs.iter().zip(&rs).enumerate() {
                            assert!((g - c).abs() <= 2e-6 * c, "{what}: rstd[{i}] {g} vs CPU {c}");
                        }
                        check16(&what, dt, &yo.read(&gpu, "y"), &y, |i| 1e-6 * y[i].abs());
                    }
                }
            }
        }
    }
}

#[test]
fn rms_norm_backward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("rms_norm_backward_matches_cpu") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("rms_norm_backward_matches_cpu");
    let eps = 1e-5f32;
    for dt in DT16 {
        for (dy_dt, x_dt) in [(Dtype::F32, Dtype::F32), (Dtype::F32, dt), (dt, Dtype::F32), (dt, dt)] {
            for (rows, hidden) in rms_shapes() {
                {
                    for (mode, mode_name) in MODES.iter().enumerate() {
                        let accumulate = (rows + hidden + mode) % 2 == 0;
                        let x = normals(&mut r, rows * hidden, 1.5, x_dt);
                        let dy = normals(&mut r, rows * hidden, 1.0, dy_dt);
                        let w: Vec<f32> = (0..hidden).map(|_| dt.round((1.0 + 0.2 * r.normal()) as f32)).collect();
                        let (mut y, mut rs) = (vec![f32::NAN; rows * hidden], vec![f32::NAN; rows]);
                        ops::rms_norm_forward(&x, &w, eps, &mut y, &mut rs);
                        let mut dx = vec![f32::NAN; rows * hidden];
                        ops::rms_norm_backward(&dy, &x, &w, &rs, &mut dx, None);
                        let prior = normals(&mut r, rows * hidden, 1.0, Dtype::F32);
                        let want: Vec<f32> = if accumulate { prior.iter().zip(&dx).map(|(a, b)| a + b).collect() } else { dx.clone() };
                        // |error| bound: the terms' magnitudes (f32 sums vs f64) and the final rounding
                        let mean_abs: Vec<f64> = (0..rows)
                            .map(|row| {
                                let rr = rs[row] as f64;
                                (0..hidden).map(|c| (dy[row * hidden + c] as f64 * w[c] as f64 * x[row * hidden + c] as f64 * rr).abs()).sum::<f64>()
                                    / hidden as f64
                            })
                            .collect();
                        let tol: Vec<f32> = (0..rows * hidden)
                            .map(|i| {
                                let (row, rr) = (i / hidden, rs[i / hidden] as f64);
                                let mean_abs = mean_abs[row];
                                let g = (dy[i] as f64 * w[i % hidden] as f64).abs();
                                let xhat = (x[i] as f64 * rr).abs();
                                (1e-5 * rr * (g + xhat * mean_abs)) as f32 + 2.0 * ulp(Dtype::F32, want[i])
                            })
                            .collect();

                        let dyo = Op::input(&gpu, &mut r, dy_dt, Lay::new(mode, rows, hidden, 0), &dy);
                        let xo = Op::input(&gpu, &mut r, x_dt, Lay::new(mode, rows, hidden, 1), &x);
                        let wo = Op::input(&gpu, &mut r, dt, Lay::new(mode, 1, hidden, 2).dense_if(true), &w);
                        let ro = Op::input(&gpu, &mut r, Dtype::F32, Lay::dense(1, rows), &rs);
                        let dxl = Lay::new(mode, rows, hidden, 3);
                        let dxo = if accumulate { Op::input(&gpu, &mut r, Dtype::F32, dxl, &prior) } else { Op::poisoned(&gpu, Dtype::F32, dxl) };
                        // Every other case also writes the 16-bit copy (rms_norm_backward_cast).
                        let cast = (rows + mode) % 2 == 1;
                        let d16 = Op::poisoned(&gpu, dt, Lay::new(mode, rows, hidden, 4));
                        unsafe {
                            k::rms_norm_backward_cast(
                                dy_dt,
                                x_dt,
                                dt,
                                dyo.addr(&gpu),
                                dyo.ld(),
                                xo.addr(&gpu),
                                xo.ld(),
                                wo.addr(&gpu),
                                ro.addr(&gpu),
                                rows,
                                hidden,
                                dxo.addr(&gpu),
                                dxo.ld(),
                                accumulate,
                                if cast { d16.addr(&gpu) } else { 0 },
                                d16.ld(),
                                st,
                            )
                        }
                        .unwrap();
                        let what = format!("rms bwd dy {} x {} w {} acc {accumulate} cast {cast} {rows}x{hidden} {}", dy_dt.name(), x_dt.name(), dt.name(), mode_name);
                        let got = dxo.read(&gpu, "dx");
                        for (i, (&g, &c)) in got.iter().zip(&want).enumerate() {
                            assert!((g - c).abs() <= tol[i], "{what}: dx[{i}] = {g}, CPU {c} (tol {:e})", tol[i]);
                        }
                        if cast {
                            // Exactly the f32 result rounded once, as `cast` would give.
                            let got16 = d16.read(&gpu, "dx16");
                            for (i, (&h, &g)) in got16.iter().zip(&got).enumerate() {
                                assert_eq!(h.to_bits(), dt.round(g).to_bits(), "{what}: dx16[{i}] = {h}, round(dx) = {}", dt.round(g));
                            }
                        }
                        // unchanged inputs
                        assert_eq!(dyo.read(&gpu, "dy"), dy, "{what}: dy changed");
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ RoPE

#[test]
fn rope_matches_cpu_exactly() {
    let Some(gpu) = gpu_or_skip("rope_matches_cpu_exactly") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("rope_matches_cpu_exactly");
    // (heads, head_dim): vector builds need head_dim % 16 == 0
    let shapes = [(1, 2), (3, 6), (4, 64), (5, 128), (2, 18), (7, 16)];
    for dt in DT16 {
        for &rows in &ROWS {
            for &(heads, head_dim) in &shapes {
                for (mode, mode_name) in MODES.iter().enumerate() {
                    for inverse in [false, true] {
                        let width = heads * head_dim;
                        let rope = ops::Rope::with_params(head_dim, 500000.0, None);
                        let pos: Vec<u32> = (0..rows).map(|_| r.below(100_000) as u32).collect();
                        let (cos, sin) = rope.cos_sin(&pos);
                        let x = normals(&mut r, rows * width, 1.0, dt);
                        let mut want = x.clone();
                        if inverse {
                            ops::rope_backward(&mut want, head_dim, &cos, &sin);
                        } else {
                            ops::rope_forward(&mut want, head_dim, &cos, &sin);
                        }
                        let xo = Op::input(&gpu, &mut r, dt, Lay::new(mode, rows, width, 0), &x);
                        let co = Op::input(&gpu, &mut r, Dtype::F32, Lay::new(mode, rows, head_dim / 2, 1).dense_if(true), &cos);
                        let so = Op::input(&gpu, &mut r, Dtype::F32, Lay::new(mode, rows, head_dim / 2, 2).dense_if(true), &sin);
                        let f = if inverse { k::rope_backward } else { k::rope_forward };
                        unsafe { f(dt, xo.addr(&gpu), xo.ld(), rows, heads, head_dim, co.addr(&gpu), so.addr(&gpu), st) }.unwrap();
                        let what = format!("rope {} inverse {inverse} {rows}x{heads}x{head_dim} {}", dt.name(), mode_name);
                        let got = xo.bits(&gpu, "x");
                        for (i, (&g, &c)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(g, dt.to_bits16(c), "{what}: [{i}] = {}, CPU {c}", dt.from_bits16(g));
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ SwiGLU

/// Gate values: normal, plus saturating ones (exp overflow on both sides).
fn gates(r: &mut Rng, n: usize, dt: Dtype) -> Vec<f32> {
    let mut g = normals(r, n, 3.0, dt);
    for (i, v) in [-100.0f32, 100.0, -20.0, 20.0, 0.0].into_iter().enumerate() {
        if i < n {
            g[(i * 7919) % n] = dt.round(v);
        }
    }
    g
}

#[test]
fn swiglu_forward_matches_cpu() {
    let Some(gpu) = gpu_or_skip("swiglu_forward_matches_cpu") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("swiglu_forward_matches_cpu");
    for dt in DT16 {
        for &rows in &ROWS {
            for &cols in &WIDTHS {
                for (mode, mode_name) in MODES.iter().enumerate() {
                    let g = gates(&mut r, rows * cols, dt);
                    let u = normals(&mut r, rows * cols, 1.0, dt);
                    let mut want = vec![f32::NAN; rows * cols];
                    ops::swiglu_forward(&g, &u, &mut want);
                    let go = Op::input(&gpu, &mut r, dt, Lay::new(mode, rows, cols, 0), &g);
                    let uo = Op::input(&gpu, &mut r, dt, Lay::new(mode, rows, cols, 1), &u);
                    let oo = Op::poisoned(&gpu, dt, Lay::new(mode, rows, cols, 2));
                    unsafe { k::swiglu_forward(dt, go.addr(&gpu), go.ld(), uo.addr(&gpu), uo.ld(), oo.addr(&gpu), oo.ld(), rows, cols, st) }.unwrap();
                    let what = format!("swiglu fwd {} {rows}x{cols} {}", dt.name(), mode_name);
                    check16(&what, dt, &oo.read(&gpu, "out"), &want, |_| 0.0);
                }
            }
        }
    }
}

#[test]
fn swiglu_backward_matches_cpu_also_in_place() {
    let Some(gpu) = gpu_or_skip("swiglu_backward_matches_cpu_also_in_place") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("swiglu_backward_matches_cpu_also_in_place");
    for dt in DT16 {
        for &rows in &ROWS {
            for &cols in &WIDTHS {
                for (mode, label) in MODES.iter().chain(&["in-place gate|up"]).enumerate() {
                    let in_place = mode == MODES.len();
                    let g = gates(&mut r, rows * cols, dt);
                    let u = normals(&mut r, rows * cols, 1.0, dt);
                    let d = normals(&mut r, rows * cols, 1.0, dt);
                    let (mut dg, mut du) = (vec![f32::NAN; rows * cols], vec![f32::NAN; rows * cols]);
                    ops::swiglu_backward(&d, &g, &u, &mut dg, &mut du);
                    // dgate: the cancellation in 1 + g (1 - s) moves a few f32 ulps of the terms
                    let dg_extra = |i: usize| 2e-6 * (d[i] * u[i]).abs() * (1.0 + g[i].abs());
                    let what = format!("swiglu bwd {} {rows}x{cols} {}", dt.name(), label);
                    let dout = Op::input(&gpu, &mut r, dt, Lay::new(mode % MODES.len(), rows, cols, 0), &d);
                    if in_place {
                        // gate|up as one [rows, 2 cols] GEMM output, gradients written over it
                        let gu: Vec<f32> = (0..rows)
                            .flat_map(|i| g[i * cols..(i + 1) * cols].iter().chain(&u[i * cols..(i + 1) * cols]).copied().collect::<Vec<_>>())
                            .collect();
                        let guo = Op::input(&gpu, &mut r, dt, Lay { rows, cols: 2 * cols, ld: 2 * cols + 8, off: 0 }, &gu);
                        let (ga, ua, ld) = (guo.addr(&gpu), guo.addr(&gpu) + (cols * 2) as u64, guo.ld());
                        // as the model runs it: the forward's product written beside, into a
                        // strided buffer (the fused adapter's tail columns after it)
                        let ao = Op::poisoned(&gpu, dt, Lay { rows, cols, ld: cols + 16, off: 0 });
                        unsafe { k::swiglu_backward_and_product(dt, dout.addr(&gpu), dout.ld(), ga, ld, ua, ld, ga, ld, ua, ld, ao.addr(&gpu), ao.ld(), rows, cols, st) }.unwrap();
                        let mut act = vec![f32::NAN; rows * cols];
                        ops::swiglu_forward(&g, &u, &mut act);
                        check16(&format!("{what} product"), dt, &ao.read(&gpu, "act"), &act, |_| 0.0);
                        let both = guo.read(&gpu, "gate|up");
                        let gd: Vec<f32> = (0..rows).flat_map(|i| both[i * 2 * cols..i * 2 * cols + cols].to_vec()).collect();
                        let ud: Vec<f32> = (0..rows).flat_map(|i| both[i * 2 * cols + cols..(i + 1) * 2 * cols].to_vec()).collect();
                        check16(&format!("{what} dgate"), dt, &gd, &dg, dg_extra);
                        check16(&format!("{what} dup"), dt, &ud, &du, |_| 0.0);
                    } else {
                        let go = Op::input(&gpu, &mut r, dt, Lay::new(mode, rows, cols, 1), &g);
                        let uo = Op::input(&gpu, &mut r, dt, Lay::new(mode, rows, cols, 2), &u);
                        let dgo = Op::poisoned(&gpu, dt, Lay::new(mode, rows, cols, 3));
                        let duo = Op::poisoned(&gpu, dt, Lay::new(mode, rows, cols, 4));
                        unsafe {
                            k::swiglu_backward(
                                dt,
                                dout.addr(&gpu),
                                dout.ld(),
                                go.addr(&gpu),
                                go.ld(),
                                uo.addr(&gpu),
                                uo.ld(),
                                dgo.addr(&gpu),
                                dgo.ld(),
                                duo.addr(&gpu),
                                duo.ld(),
                                rows,
                                cols,
                                st,
                            )
                        }
                        .unwrap();
                        check16(&format!("{what} dgate"), dt, &dgo.read(&gpu, "dgate"), &dg, dg_extra);
                        check16(&format!("{what} dup"), dt, &duo.read(&gpu, "dup"), &du, |_| 0.0);
                        assert_eq!(
                            go.read(&gpu, "gate").iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{what}: gate changed"
                        );
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ casts

/// Values of `d` covering every exponent (random bits for 16-bit types, NaN excluded),
/// plus f32 values that overflow or underflow the 16-bit types and ties.
fn cast_inputs(r: &mut Rng, d: Dtype, n: usize) -> Vec<f32> {
    let specials = [
        0.0f32,
        -0.0,
        65504.0,
        65520.0,
        -65536.0,
        1e5,
        3e38,
        -1e-8,
        6e-8,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
    ];
    (0..n)
        .map(|i| {
            if i % 3 == 0 && i / 3 < specials.len() {
                return d.round(specials[i / 3]);
            }
            loop {
                let v = match d {
                    Dtype::F32 => f32::from_bits(r.next_u64() as u32),
                    _ => d.from_bits16(r.next_u64() as u16),
                };
                if !v.is_nan() {
                    return v;
                }
            }
        })
        .collect()
}

#[test]
fn cast_matches_half_exactly() {
    let Some(gpu) = gpu_or_skip("cast_matches_half_exactly") else { return };
    let st = gpu_stream(&gpu);
    let mut r = Rng::fresh("cast_matches_half_exactly");
    let all = [Dtype::F32, Dtype::F16, Dtype::Bf16];
    for s in all {
        for d in all {
            for (&rows, &cols) in ROWS.iter().zip(&WIDTHS).chain(ROWS.iter().rev().zip(&WIDTHS)) {
                for (mode, mode_name) in MODES.iter().enumerate() {
                    let x = cast_inputs(&mut r, s, rows * cols);
                    let so = Op::input(&gpu, &mut r, s, Lay::new(mode, rows, cols, 0), &x);
                    let dl = Lay::new(mode, rows, cols, 1);
                    let o = Op::poisoned(&gpu, d, dl);
                    unsafe { k::cast(s, so.addr(&gpu), so.ld(), d, o.addr(&gpu), o.ld(), rows, cols, st) }.unwrap();
                    let what = format!("cast {} -> {} {rows}x{cols} {}", s.name(), d.name(), mode_name);
                    let got = o.read(&gpu, "dst");
                    for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                        let want = d.round(v);
                        assert_eq!(g.to_bits(), want.to_bits(), "{what}: [{i}] {v:e} -> {g:e}, half says {want:e}");
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ norm, clipping, AdamW

fn tiny_lora(r: &mut Rng) -> (fsdp::Config, fsdp::Lora) {
    // intermediate 70: tensors of 210 values (not a multiple of 4: the vector loop's tail)
    let config = fsdp::Config::from_json_str(
        r#"{"model_type": "llama", "hidden_size": 36, "intermediate_size": 70, "num_hidden_layers": 2,
            "num_attention_heads": 3, "num_key_value_heads": 1, "vocab_size": 11}"#,
        "config.json",
    )
    .unwrap();
    let mut lora = fsdp::Lora::init(&config, fsdp::LoraConfig::new(3, 6.0), 1).unwrap();
    for t in lora.tensors_mut() {
        for v in t.iter_mut() {
            *v = (r.normal() * 0.1) as f32;
        }
    }
    (config, lora)
}

#[test]
fn adamw_norm_and_clipping_match_cpu_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("adamw_norm_and_clipping_match_cpu_bit_for_bit") else { return };
    let st = gpu_stream(&gpu);
    let s = gpu.stream();
    let mut r = Rng::fresh("adamw_norm_and_clipping_match_cpu_bit_for_bit");
    let configs = [
        optim::AdamWConfig::default(),
        // 1 - beta1 >= 0.5: the other branch of lerp
        optim::AdamWConfig { betas: (0.4, 0.95), eps: 1e-6, weight_decay: 0.1 },
    ];
    for cfg in configs {
        for clip in [None, Some(1.0)] {
            let (_, mut params) = tiny_lora(&mut r);
            let mut opt = optim::AdamW::new(cfg, &params);
            // device copies, every other tensor one element into its buffer (scalar path)
            let host: Vec<Vec<f32>> = params.tensors().iter().map(|t| t.to_vec()).collect();
            let off = |i: usize| i % 2;
            let up = |v: &[f32], i: usize| {
                let mut b = vec![0f32; off(i)];
                b.extend_from_slice(v);
                s.clone_htod(&b).unwrap()
            };
            let p: Vec<CudaSlice<f32>> = host.iter().enumerate().map(|(i, t)| up(t, i)).collect();
            let m: Vec<CudaSlice<f32>> = host.iter().enumerate().map(|(i, t)| up(&vec![0.0; t.len()], i)).collect();
            let v: Vec<CudaSlice<f32>> = host.iter().enumerate().map(|(i, t)| up(&vec![0.0; t.len()], i)).collect();
            let addr = |b: &CudaSlice<f32>, i: usize| b.device_ptr(s).0 + 4 * off(i) as u64;
            let mut acc = s.alloc_zeros::<f64>(1).unwrap();
            let mut scale = s.alloc_zeros::<f32>(1).unwrap();
            for (step, (gscale, lr)) in [(0.001, 1e-3), (0.5, 3e-3), (0.005, 2e-2), (20.0, 5e-4), (0.005, 1e-1)].into_iter().enumerate() {
                let what = format!("{cfg:?} clip {clip:?} step {}", step + 1);
                let mut grads = params.zeros_like();
                for t in grads.tensors_mut() {
                    for x in t.iter_mut() {
                        *x = (r.normal() * gscale) as f32;
                    }
                }
                let g: Vec<CudaSlice<f32>> = grads.tensors().iter().enumerate().map(|(i, t)| up(t, i)).collect();
                // CPU
                let mut clipped = grads.clone();
                let norm = match clip {
                    Some(max) => optim::clip_grad_norm(&mut clipped, max),
                    None => optim::grad_norm(&clipped),
                };
                opt.step(&mut params, &clipped, lr);
                // GPU
                s.memset_zeros(&mut acc).unwrap();
                poison(s, &mut scale).unwrap();
                let h = k::AdamWStep { lr, beta1: cfg.betas.0, beta2: cfg.betas.1, eps: cfg.eps, weight_decay: cfg.weight_decay, step: opt.t };
                let (acc_a, scale_a) = (acc.device_ptr(s).0, scale.device_ptr(s).0);
                unsafe {
                    for (i, gi) in g.iter().enumerate() {
                        k::sum_squares(addr(gi, i), host[i].len(), acc_a, st).unwrap();
                    }
                    if let Some(max) = clip {
                        k::clip_factor(acc_a, max, scale_a, st).unwrap();
                    }
                    for i in 0..g.len() {
                        let gs = if clip.is_some() { scale_a } else { 0 };
                        k::adamw_step(addr(&p[i], i), addr(&g[i], i), addr(&m[i], i), addr(&v[i], i), host[i].len(), &h, gs, st).unwrap();
                    }
                }
                let sumsq = s.clone_dtoh(&acc).unwrap()[0];
                assert!((sumsq - norm * norm).abs() <= 1e-12 * norm * norm, "{what}: sum of squares {sumsq} vs CPU norm^2 {}", norm * norm);
                let mut exact = true;
                if let Some(max) = clip {
                    let coef = (max / (norm + 1e-6)).min(1.0);
                    let want = if coef < 1.0 { coef as f32 } else { 1.0 };
                    let got = s.clone_dtoh(&scale).unwrap()[0];
                    // The f64 sums differ in order only; the f32 factor can then differ by one
                    // ulp (probability ~1e-7 per step): compare loosely in that case.
                    assert!(got.to_bits().abs_diff(want.to_bits()) <= 1, "{what}: clip factor {got} vs CPU {want}");
                    if got != want {
                        eprintln!("{what}: clip factor 1 ulp off the CPU's ({got} vs {want}): parameters compared within 1e-6");
                        exact = false;
                    }
                    assert_eq!(coef < 1.0, step % 2 == 1, "{what}: the test means to clip on steps 2 and 4 only (norm {norm})");
                }
                for (name, dev, cpu) in [("p", &p, params.tensors()), ("m", &m, opt.m.tensors()), ("v", &v, opt.v.tensors())] {
                    for (i, (d, c)) in dev.iter().zip(cpu).enumerate() {
                        let got = &s.clone_dtoh(d).unwrap()[off(i)..];
                        for (j, (&a, &b)) in got.iter().zip(c.iter()).enumerate() {
                            let ok = if exact { a.to_bits() == b.to_bits() } else { (a - b).abs() <= 1e-6 * b.abs().max(1e-6) };
                            assert!(ok, "{what}: {name} tensor {i} [{j}] = {a:e}, CPU {b:e}");
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ bad arguments

fn refused(r: Result<(), GpuError>, want: &str) {
    match r {
        Err(GpuError::InvalidArgument { arg, problem }) => {
            assert_eq!(arg, want, "refused for `{arg}` ({problem}), expected `{want}`");
            assert!(!problem.is_empty());
        }
        other => panic!("expected InvalidArgument for `{want}`, got {other:?}"),
    }
}

/// Every check runs before anything touches the driver: this test needs no GPU.
#[test]
fn bad_arguments_are_refused_and_zero_sizes_are_no_ops() {
    let st = std::ptr::null_mut();
    let (a, b, c, d) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
    let (bf, h, f) = (Dtype::Bf16, Dtype::F16, Dtype::F32);
    unsafe {
        // dtypes
        refused(k::rms_norm_forward(f, f, a, 8, b, 2, 8, 1e-5, c, 8, d, st), "dt");
        refused(k::rms_norm_forward(h, bf, a, 8, b, 2, 8, 1e-5, c, 8, d, st), "x_dt");
        refused(k::rms_norm_backward(h, bf, bf, a, 8, b, 8, c, d, 2, 8, a, 8, false, st), "dy_dt");
        refused(k::rms_norm_backward(f, h, bf, a, 8, b, 8, c, d, 2, 8, a, 8, false, st), "x_dt");
        refused(k::rope_forward(f, a, 8, 2, 1, 8, b, c, st), "dt");
        refused(k::swiglu_forward(f, a, 8, b, 8, c, 8, 2, 8, st), "dt");
        refused(k::swiglu_backward(f, a, 8, b, 8, c, 8, d, 8, a + 64, 8, 2, 8, st), "dt");
        // null and misaligned pointers
        refused(k::rms_norm_forward(f, bf, 0, 8, b, 2, 8, 1e-5, c, 8, d, st), "x");
        refused(k::rms_norm_forward(f, bf, a + 2, 8, b, 2, 8, 1e-5, c, 8, d, st), "x");
        refused(k::rms_norm_forward(f, bf, a, 8, b, 2, 8, 1e-5, c, 8, 0, st), "rstd");
        refused(k::embedding_forward(bf, a, 10, 8, 0, 3, c, st), "ids");
        refused(k::embedding_forward(bf, a, 10, 8, b, 3, c + 1, st), "out");
        refused(k::swiglu_forward(bf, a, 8, b, 8, 0, 8, 2, 8, st), "out");
        refused(k::swiglu_backward(bf, a, 8, b, 8, c, 8, d + 1, 8, a + 64, 8, 2, 8, st), "dgate");
        refused(k::cast(f, a + 2, 8, bf, b, 8, 2, 8, st), "src");
        refused(k::rope_forward(bf, a, 8, 2, 1, 8, 0, c, st), "cos");
        refused(k::sum_squares(a, 10, 0, st), "acc");
        refused(k::sum_squares(a + 1, 10, b, st), "x");
        refused(k::clip_factor(a, 1.0, 0, st), "scale");
        let hp = k::AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1 };
        refused(k::adamw_step(a, b, 0, d, 10, &hp, 0, st), "m");
        refused(k::adamw_step(a, b, c, d, 10, &hp, 0x5002, st), "grad_scale");
        // strides
        refused(k::rms_norm_forward(f, bf, a, 7, b, 2, 8, 1e-5, c, 8, d, st), "ldx");
        refused(k::rms_norm_forward(f, bf, a, 8, b, 2, 8, 1e-5, c, 7, d, st), "ldy");
        refused(k::rms_norm_backward(f, bf, bf, a, 8, b, 8, c, d, 2, 8, a, 4, true, st), "lddx");
        refused(k::rms_norm_backward_cast(f, bf, bf, a, 8, b, 8, c, d, 2, 8, a, 8, true, b, 4, st), "lddx16");
        refused(k::rope_forward(bf, a, 3 * 64 - 1, 2, 3, 64, b, c, st), "ld");
        refused(k::swiglu_forward(bf, a, 8, b, 5, c, 8, 2, 8, st), "ldu");
        refused(k::swiglu_backward(bf, a, 8, b, 16, c, 16, b, 8, c, 16, 2, 8, st), "lddg"); // in place, other stride
        refused(k::swiglu_backward(bf, a, 8, b, 16, c, 16, d, 16, c, 8, 2, 8, st), "lddu");
        refused(k::swiglu_backward(bf, a, 8, b, 16, c, 16, d, 16, d, 16, 2, 8, st), "dup");
        refused(k::cast(f, a, 8, bf, b, 6, 2, 8, st), "ldd");
        refused(k::cast(f, a, 8, bf, a, 8, 2, 8, st), "dst"); // in place across dtypes
                                                              // shapes and hyper-parameters
        refused(k::rope_forward(bf, a, 21, 2, 3, 7, b, c, st), "head_dim");
        refused(k::rope_backward(bf, a, 21, 2, 3, 7, b, c, st), "head_dim");
        refused(k::rms_norm_forward(f, bf, a, 8, b, 2, 8, f32::NAN, c, 8, d, st), "eps");
        refused(k::rms_norm_forward(f, bf, a, 8, b, 2, 8, -1e-5, c, 8, d, st), "eps");
        refused(k::clip_factor(a, 0.0, b, st), "max_norm");
        refused(k::clip_factor(a, f64::INFINITY, b, st), "max_norm");
        refused(k::adamw_step(a, b, c, d, 10, &k::AdamWStep { step: 0, ..hp }, 0, st), "step");
        refused(k::adamw_step(a, b, c, d, 10, &k::AdamWStep { beta1: 1.0, ..hp }, 0, st), "beta1");
        refused(k::adamw_step(a, b, c, d, 10, &k::AdamWStep { beta2: -0.1, ..hp }, 0, st), "beta2");
        refused(k::adamw_step(a, b, c, d, 10, &k::AdamWStep { lr: f64::NAN, ..hp }, 0, st), "lr");
        // zero sizes: no-ops, whatever the pointers
        k::embedding_forward(bf, 0, 10, 8, 0, 0, 0, st).unwrap();
        k::embedding_forward(bf, 0, 10, 0, 0, 5, 0, st).unwrap();
        k::rms_norm_forward(f, bf, 0, 0, 0, 0, 8, 1e-5, 0, 0, 0, st).unwrap();
        k::rms_norm_backward(f, bf, bf, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, true, st).unwrap();
        k::rope_forward(bf, 0, 0, 0, 4, 64, 0, 0, st).unwrap();
        k::rope_backward(bf, 0, 0, 5, 0, 64, 0, 0, st).unwrap();
        k::swiglu_forward(bf, 0, 0, 0, 0, 0, 0, 4, 0, st).unwrap();
        k::swiglu_backward(h, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, st).unwrap();
        k::cast(f, 0, 0, h, 0, 0, 0, 9, st).unwrap();
        k::sum_squares(0, 0, 0, st).unwrap();
        k::adamw_step(0, 0, 0, 0, 0, &hp, 0, st).unwrap();
    }
}
