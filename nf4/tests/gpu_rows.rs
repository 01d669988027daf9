//! GPU tests of `nf4::gpu::launch_dequant_rows` (the output written as rows of `cols`
//! elements with row stride `ld`): against the CPU dequantization placed at the same
//! strides, every output dtype, nested and plain, blocks that straddle rows, the vector
//! path (`cols`, `ld` multiples of 8) and the scalar one (odd `cols` or `ld`, a misaligned
//! output), with the whole output buffer poisoned first and the gaps checked untouched.
//! Skipped without a GPU, failures under `REQUIRE_GPU=1`.

mod common;

use common::*;
use cudakit::cudarc::driver::{CudaSlice, DevicePtrMut, DeviceRepr};
use cudakit::testing::{gpu_or_skip, poison};
use cudakit::Gpu;
use half::{bf16, f16};
use nf4::gpu::launch_dequant_rows;
use nf4::testing::Rng;
use nf4::{Element, GpuQuantized, QuantizeOptions, Quantized};

/// Dequantizes `q` (`[rows, cols]`) into a poisoned `[rows, ld]` buffer at element offset
/// `shift`; checks every element against the CPU and the gaps against the poison.
fn check<T: Element + DeviceRepr>(gpu: &Gpu, q: &Quantized, rows: usize, cols: usize, ld: usize, shift: usize) {
    let what = format!("{:?} {rows}x{cols} ld {ld} shift {shift} bs {}", T::DTYPE, q.state.blocksize);
    let cpu: Vec<T> = nf4::dequantize("w", &q.packed, &q.state).unwrap();
    let g = GpuQuantized::upload(gpu, "w", q).unwrap();
    let s = gpu.stream();
    let total = shift + rows * ld;
    let mut out: CudaSlice<T> = unsafe { s.alloc::<T>(total) }.unwrap();
    poison(s, &mut out).unwrap();
    let base = out.device_ptr_mut(s).0 + (shift * T::DTYPE.size()) as u64;
    let args = g.dequant_args(base, T::DTYPE);
    gpu.bind().unwrap();
    unsafe { launch_dequant_rows(&args, cols as u64, ld as u64, s.cu_stream()) }.unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = s.clone_dtoh(&out).unwrap();
    let got = bytes_of(&got);
    let want = bytes_of(&cpu);
    let e = T::DTYPE.size();
    let poisoned = |b: &[u8]| b.iter().all(|&x| x == 0xff);
    assert!(poisoned(&got[..shift * e]), "{what}: wrote before the output");
    for r in 0..rows {
        let row = &got[(shift + r * ld) * e..(shift + r * ld + cols) * e];
        let w = &want[r * cols * e..(r + 1) * cols * e];
        assert!(row == w, "{what}: row {r} differs, first at {:?}", first_diff(row, w, e));
        assert!(poisoned(&got[(shift + r * ld + cols) * e..(shift + (r + 1) * ld) * e]), "{what}: wrote into the gap after row {r}");
    }
}

#[test]
fn strided_rows_equal_the_cpu() {
    let Some(gpu) = gpu_or_skip("strided_rows_equal_the_cpu") else { return };
    let mut rng = Rng::fresh("strided_rows_equal_the_cpu");
    // (rows, cols, ld, shift, blocksize, nested): the fsdp linear's case (cols a multiple
    // of the block, ld = cols + R), blocks straddling rows (cols 72, 200 with blocksize 64
    // and 128), many rows for several grid rounds, odd cols / ld / a misaligned output
    // (scalar path), ld == cols.
    let cases = [
        (64usize, 128usize, 176usize, 0usize, 64usize, true),
        (300, 72, 80, 0, 64, true),
        (129, 200, 232, 0, 128, false),
        (2050, 2048, 2096, 0, 64, true),
        (37, 77, 83, 0, 64, true),
        (33, 64, 72, 1, 64, false),
        (45, 96, 96, 0, 32, true),
        (1, 8, 8, 0, 64, false),
    ];
    for (rows, cols, ld, shift, bs, nested) in cases {
        let x: Vec<bf16> = rng.normal_vec(rows * cols, 0.5);
        let q = nf4::quantize("w", &x, &[rows, cols], &QuantizeOptions { nested, blocksize: bs, ..Default::default() }).unwrap();
        check::<bf16>(&gpu, &q, rows, cols, ld, shift);
        check::<f16>(&gpu, &q, rows, cols, ld, shift);
        check::<f32>(&gpu, &q, rows, cols, ld, shift);
    }
}

#[test]
fn strided_rows_bad_arguments_are_errors() {
    let Some(gpu) = gpu_or_skip("strided_rows_bad_arguments_are_errors") else { return };
    let x: Vec<bf16> = (0..64 * 32).map(|i| bf16::from_f32((i as f32 * 0.1).sin())).collect();
    let q = nf4::quantize("w", &x, &[64, 32], &QuantizeOptions::default()).unwrap();
    let g = GpuQuantized::upload(&gpu, "w", &q).unwrap();
    let mut out: CudaSlice<bf16> = gpu.stream().alloc_zeros(64 * 40).unwrap();
    let args = g.dequant_args(out.device_ptr_mut(gpu.stream()).0, nf4::FloatDtype::Bf16);
    let st = gpu.stream().cu_stream();
    gpu.bind().unwrap();
    let msg = |r: Result<(), cudakit::GpuError>| r.expect_err("must fail").to_string();
    assert!(msg(unsafe { launch_dequant_rows(&args, 32, 31, st) }).contains("ld"));
    assert!(msg(unsafe { launch_dequant_rows(&args, 0, 40, st) }).contains("ld"));
    assert!(msg(unsafe { launch_dequant_rows(&args, 48, 48, st) }).contains("whole rows"));
    let t = nf4::gpu::DequantArgs { transposed: Some((64, 32)), ..args };
    assert!(msg(unsafe { launch_dequant_rows(&t, 32, 40, st) }).contains("transposed"));
    assert!(unsafe { launch_dequant_rows(&args, 32, 40, st) }.is_ok());
    gpu.stream().synchronize().unwrap();
}
