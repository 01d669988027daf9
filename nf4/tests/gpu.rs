//! GPU tests: the CUDA kernel against the CPU reference (which the fixture tests hold to
//! bitsandbytes) on fresh random data, odd sizes and tails, every output dtype, outputs
//! poisoned first. They skip without a GPU and fail when `REQUIRE_GPU=1`.

mod common;

use common::*;
use cudakit::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};
use cudakit::testing::{gpu_or_skip, gpu_required, poison};
use cudakit::{Arch, Gpu};
use half::{bf16, f16};
use nf4::gpu::{launch_dequant, DequantArgs};
use nf4::testing::Rng;
use nf4::{Absmax, Element, FloatDtype, GpuQuantized, QuantState, QuantType, QuantizeOptions, Quantized};

fn gpu_dequant<T: Element + DeviceRepr>(gpu: &Gpu, name: &str, q: &Quantized) -> Vec<T> {
    let g = GpuQuantized::upload(gpu, name, q).unwrap();
    let mut out: CudaSlice<T> = unsafe { gpu.stream().alloc::<T>(q.state.numel()) }.unwrap();
    poison(gpu.stream(), &mut out).unwrap();
    g.dequantize_into(&mut out).unwrap();
    gpu.stream().clone_dtoh(&out).unwrap()
}

fn check_all_dtypes(gpu: &Gpu, name: &str, q: &Quantized) {
    fn one<T: Element + DeviceRepr>(gpu: &Gpu, name: &str, q: &Quantized) {
        let cpu: Vec<T> = nf4::dequantize(name, &q.packed, &q.state).unwrap();
        let got: Vec<T> = gpu_dequant(gpu, name, q);
        let (a, b) = (bytes_of(&got), bytes_of(&cpu));
        assert!(a == b, "{name} -> {:?}: first differing element {:?} of {}", T::DTYPE, first_diff(&a, &b, T::DTYPE.size()), cpu.len());
    }
    one::<f32>(gpu, name, q);
    one::<f16>(gpu, name, q);
    one::<bf16>(gpu, name, q);
}

#[test]
fn kernel_compiles_for_every_supported_arch() {
    if !cudakit::nvrtc_present() {
        assert!(!gpu_required(), "REQUIRE_GPU=1 but NVRTC is missing");
        eprintln!("SKIPPED kernel_compiles_for_every_supported_arch: no NVRTC");
        return;
    }
    for (major, minor) in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0)] {
        let arch = Arch { major, minor };
        cudakit::kernel::compile_ptx(nf4::gpu::source(), arch).unwrap_or_else(|e| panic!("sm_{arch}: {e}"));
    }
    for v in nf4::gpu::TUNING_VARIANTS {
        for arch in [Arch::SM75, Arch { major: 9, minor: 0 }] {
            cudakit::kernel::compile_ptx(&nf4::gpu::source_variant(v), arch).unwrap_or_else(|e| panic!("{} sm_{arch}: {e}", v.label()));
        }
    }
}

#[test]
fn gpu_equals_bitsandbytes_fixtures() {
    let Some(gpu) = gpu_or_skip("gpu_equals_bitsandbytes_fixtures") else { return };
    let ck = nf4::Checkpoint::open(fixture("nf4_fixtures.safetensors")).unwrap();
    let st = ck.tensors().unwrap();
    for w in ck.quantized_weights().unwrap() {
        let q = ck.read(&w).unwrap();
        let case = w.trim_end_matches(".weight");
        let want = st.tensor(&format!("{case}.dequant")).unwrap();
        let got = match q.state.dtype {
            FloatDtype::F32 => bytes_of(&gpu_dequant::<f32>(&gpu, &w, &q)),
            FloatDtype::F16 => bytes_of(&gpu_dequant::<f16>(&gpu, &w, &q)),
            FloatDtype::Bf16 => bytes_of(&gpu_dequant::<bf16>(&gpu, &w, &q)),
        };
        assert!(got == want.data(), "{w}: first diff {:?}", first_diff(&got, want.data(), q.state.dtype.size()));
    }
}

#[test]
fn gpu_equals_cpu_on_random_odd_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_equals_cpu_on_random_odd_shapes") else { return };
    let mut rng = Rng::fresh("gpu_equals_cpu_on_random_odd_shapes");
    let shapes: [&[usize]; 7] = [&[1], &[7], &[33], &[3, 333], &[17, 129], &[257, 511], &[4097, 3]];
    for &bs in &nf4::state::BLOCKSIZES {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for nested in [false, true] {
                let shape = shapes[rng.below(shapes.len())];
                let n: usize = shape.iter().product();
                let x: Vec<bf16> = rng.normal_vec(n, 0.05);
                let opts = QuantizeOptions { quant_type: qt, blocksize: bs, nested, ..Default::default() };
                let q = nf4::quantize("w", &x, shape, &opts).unwrap();
                check_all_dtypes(&gpu, &format!("{qt:?} bs{bs} nested={nested} {shape:?}"), &q);
            }
        }
    }
}

#[test]
fn gpu_equals_cpu_on_benchmark_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_equals_cpu_on_benchmark_shapes") else { return };
    let mut rng = Rng::fresh("gpu_equals_cpu_on_benchmark_shapes");
    for (r, c) in [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)] {
        let x: Vec<bf16> = rng.normal_vec(r * c, 0.02);
        let q = nf4::quantize("w", &x, &[r, c], &QuantizeOptions::default()).unwrap();
        check_all_dtypes(&gpu, &format!("{r}x{c} nf4 nested"), &q);
    }
}

#[test]
fn every_tuning_variant_equals_the_cpu() {
    let Some(gpu) = gpu_or_skip("every_tuning_variant_equals_the_cpu") else { return };
    let mut rng = Rng::fresh("every_tuning_variant_equals_the_cpu");
    let s = gpu.stream();
    // Sizes: one warp tile short, a ragged tail, and enough for several grid-stride rounds.
    for (n, nested, bs) in [(1001usize, true, 32usize), (40_000 + 24, false, 64), (3_000_000 + 17, true, 64)] {
        let x: Vec<bf16> = rng.normal_vec(n, 0.1);
        let q = nf4::quantize("w", &x, &[n], &QuantizeOptions { nested, blocksize: bs, ..Default::default() }).unwrap();
        let cpu: Vec<bf16> = nf4::dequantize("w", &q.packed, &q.state).unwrap();
        let packed = s.clone_htod(&q.packed).unwrap();
        let (absmax, absmax2, offset): (CudaSlice<u8>, Option<CudaSlice<f32>>, f32) = match &q.state.absmax {
            Absmax::Plain(v) => (s.clone_htod(&bytes_of(v)).unwrap(), None, 0.0),
            Absmax::Nested { q, absmax2, offset, .. } => (s.clone_htod(q).unwrap(), Some(s.clone_htod(absmax2).unwrap()), *offset),
        };
        for v in nf4::gpu::TUNING_VARIANTS {
            let src = nf4::gpu::source_variant(v);
            let mut out: CudaSlice<bf16> = unsafe { s.alloc::<bf16>(n) }.unwrap();
            poison(s, &mut out).unwrap();
            let args = DequantArgs {
                packed: packed.device_ptr(s).0,
                absmax: absmax.device_ptr(s).0,
                absmax2: absmax2.as_ref().map_or(0, |a| a.device_ptr(s).0),
                code2: 0,
                offset,
                code: 0,
                quant_type: QuantType::Nf4,
                n: n as u64,
                blocksize: bs as u32,
                nested_blocksize: 256,
                transposed: None,
                out: out.device_ptr_mut(s).0,
                out_dtype: FloatDtype::Bf16,
            };
            gpu.bind().unwrap();
            unsafe { nf4::gpu::launch_dequant_with(&src, v, &args, s.cu_stream()) }.unwrap();
            let got = s.clone_dtoh(&out).unwrap();
            let (a, b) = (bytes_of(&got), bytes_of(&cpu));
            assert!(a == b, "{} n={n}: first diff {:?}", v.label(), first_diff(&a, &b, 2));
        }
    }
}

#[test]
fn misaligned_buffers_and_the_legacy_transposed_layout() {
    let Some(gpu) = gpu_or_skip("misaligned_buffers_and_the_legacy_transposed_layout") else { return };
    let mut rng = Rng::fresh("misaligned_buffers_and_the_legacy_transposed_layout");
    let (rows, cols) = (37, 91);
    let x: Vec<f16> = rng.normal_vec(rows * cols, 1.0);
    let mut q = nf4::quantize("w", &x, &[rows, cols], &QuantizeOptions { nested: false, ..Default::default() }).unwrap();

    // Packed at an odd byte address, output at an odd element address.
    let cpu: Vec<f16> = nf4::dequantize("w", &q.packed, &q.state).unwrap();
    let s = gpu.stream();
    let mut shifted = vec![0xAAu8];
    shifted.extend_from_slice(&q.packed);
    let packed = s.clone_htod(&shifted).unwrap();
    let Absmax::Plain(am) = &q.state.absmax else { unreachable!() };
    let absmax = s.clone_htod(am).unwrap();
    let mut out: CudaSlice<f16> = s.alloc_zeros(rows * cols + 1).unwrap();
    poison(s, &mut out).unwrap();
    let args = DequantArgs {
        packed: packed.device_ptr(s).0 + 1,
        absmax: absmax.device_ptr(s).0,
        absmax2: 0,
        code2: 0,
        offset: 0.0,
        code: 0,
        quant_type: QuantType::Nf4,
        n: (rows * cols) as u64,
        blocksize: 64,
        nested_blocksize: 0,
        transposed: None,
        out: out.device_ptr_mut(s).0 + 2,
        out_dtype: FloatDtype::F16,
    };
    gpu.bind().unwrap();
    unsafe { launch_dequant(&args, s.cu_stream()) }.unwrap();
    let got = s.clone_dtoh(&out).unwrap();
    assert_eq!(got[0].to_bits(), 0xffff, "the element before the output was written");
    assert!(bytes_of(&got[1..]) == bytes_of(&cpu), "misaligned: first diff {:?}", first_diff(&bytes_of(&got[1..]), &bytes_of(&cpu), 2));

    // Legacy layout: packed stored as [1, n/2]; the result is the transpose.
    q.state.storage.shape = vec![1, q.state.packed_len()];
    assert!(q.state.is_transposed());
    let cpu_t: Vec<f16> = nf4::dequantize("w", &q.packed, &q.state).unwrap();
    let reference: Vec<f16> = nf4::dequantize_reference("w", &q.packed, &q.state).unwrap();
    assert!(bytes_of(&cpu_t) == bytes_of(&reference));
    assert_eq!(cpu_t[1].to_bits(), cpu[cols].to_bits(), "element (0,1) of the transpose is (1,0)");
    let got_t: Vec<f16> = gpu_dequant(&gpu, "w", &q);
    assert!(bytes_of(&got_t) == bytes_of(&cpu_t), "transposed: first diff {:?}", first_diff(&bytes_of(&got_t), &bytes_of(&cpu_t), 2));
}

#[test]
fn more_than_2_pow_31_elements() {
    let Some(gpu) = gpu_or_skip("more_than_2_pow_31_elements") else { return };
    let mut rng = Rng::fresh("more_than_2_pow_31_elements");
    let n: usize = (1usize << 31) + 4099; // odd: a half-used last byte, a partial last block
    let bs = 64;
    let nb = n.div_ceil(bs);
    let q_codes = rng.bytes(nb);
    let absmax2: Vec<f32> = (0..nb.div_ceil(256)).map(|_| rng.uniform() as f32 * 0.1 + 0.01).collect();
    let state = QuantState {
        quant_type: QuantType::Nf4,
        blocksize: bs,
        dtype: FloatDtype::Bf16,
        shape: vec![n],
        code: nf4::codes::NF4_CODE,
        absmax: QuantState::nested_default(q_codes, absmax2, 0.03),
        storage: nf4::PackedStorage::default_for(n),
    };
    let packed = rng.bytes(n.div_ceil(2));
    let q = Quantized { packed, state };
    let g = GpuQuantized::upload(&gpu, "big", &q).unwrap();
    let mut out: CudaSlice<bf16> = gpu.stream().alloc_zeros(n).unwrap();
    poison(gpu.stream(), &mut out).unwrap();
    g.dequantize_into(&mut out).unwrap();
    let absmax = q.state.absmax.to_f32();
    let mut windows = vec![0..8192, (1 << 31) - 8192..n, n - 8192..n];
    for _ in 0..8 {
        let a = rng.below(n - 4096);
        windows.push(a..a + 4096);
    }
    assert_eq!(out.len(), n);
    for w in windows {
        let view = out.try_slice(w.clone()).unwrap_or_else(|| panic!("window {w:?} is outside 0..{}", out.len()));
        let got = gpu.stream().clone_dtoh(&view).unwrap();
        for (k, i) in w.clone().enumerate() {
            let b = q.packed[i / 2];
            let nib = if i % 2 == 0 { b >> 4 } else { b & 15 };
            let want = bf16::from_f32(nf4::codes::NF4_CODE[nib as usize] * absmax[i / bs]);
            assert_eq!(got[k].to_bits(), want.to_bits(), "element {i}");
        }
    }
}

#[test]
fn bad_arguments_are_errors_not_crashes() {
    let Some(gpu) = gpu_or_skip("bad_arguments_are_errors_not_crashes") else { return };
    gpu.bind().unwrap();
    let base = DequantArgs {
        packed: 0,
        absmax: 0,
        absmax2: 0,
        code2: 0,
        offset: 0.0,
        code: 0,
        quant_type: QuantType::Nf4,
        n: 100,
        blocksize: 64,
        nested_blocksize: 256,
        transposed: None,
        out: 0,
        out_dtype: FloatDtype::Bf16,
    };
    let e = unsafe { launch_dequant(&base, std::ptr::null_mut()) }.unwrap_err().to_string();
    assert!(e.contains("packed") && e.contains("null"), "{e}");
    let e = unsafe { launch_dequant(&DequantArgs { blocksize: 48, ..base }, std::ptr::null_mut()) }.unwrap_err().to_string();
    assert!(e.contains("blocksize"), "{e}");

    let x: Vec<f32> = Rng::new(3).normal_vec(1000, 1.0);
    let q = nf4::quantize("w", &x, &[1000], &QuantizeOptions::default()).unwrap();
    let g = GpuQuantized::upload(&gpu, "w", &q).unwrap();
    let mut small: CudaSlice<f32> = gpu.stream().alloc_zeros(999).unwrap();
    let e = g.dequantize_into(&mut small).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("999"), "{e}");
}
