//! GPU tests: the CUDA implementation against the f64 reference (fresh random inputs, odd
//! sizes, outputs poisoned first), every loss and option, both dW output kinds, the C ABI,
//! and bad input. Skipped without a GPU; failures under REQUIRE_GPU=1.

mod common;

use common::device::{cast, check, down, host, losses_under_test, up};
use common::{rel_norm, Rng};
use cudakit::testing::{gpu_or_skip, poison};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use memlinear::gpu::{self, DeviceGrads, DeviceHead, DeviceProblem, GradBuf};
use memlinear::losses::{self, CrossEntropy, Policy};
use memlinear::{Chunk, Error, Reduction};

#[test]
fn every_loss_matches_the_reference_f32_and_bf16() {
    let Some(gpu) = gpu_or_skip("every_loss_matches_the_reference_f32_and_bf16") else { return };
    let mut rng = Rng::fresh("gpu_every_loss");
    for loss in losses_under_test() {
        let d = host(&mut rng, 37, 29, 253);
        // The clipped policy loss's gradient jumps where a ratio crosses a clip bound, and
        // 16-bit logits move ratios by ~1e-2: the 16-bit checks use bounds no ratio here
        // reaches (the f32 checks keep the default bounds, and exercise the clipping).
        let loss16 = if loss.name() == "policy" {
            losses::policy(&Policy { clip_low: 0.999, clip_high: 1e3, kl_beta: 0.05, ..Default::default() })
        } else {
            loss.clone()
        };
        for (chunk, f32_dw) in [(Chunk::Tokens(1), true), (Chunk::Tokens(7), false), (Chunk::Tokens(37), true)] {
            check::<f32>(&gpu, &loss, &d, Reduction::Mean(None), chunk, f32_dw, 1e-5);
            check::<bf16>(&gpu, &loss16, &d, Reduction::Mean(None), chunk, f32_dw, 1e-2);
        }
        check::<half::f16>(&gpu, &loss16, &d, Reduction::Sum, Chunk::Tokens(5), false, 1e-2);
        check::<f32>(&gpu, &loss, &d, Reduction::None, Chunk::Tokens(9), true, 1e-5);
    }
}

#[test]
fn vocab_sizes_vectorized_and_not() {
    let Some(gpu) = gpu_or_skip("vocab_sizes_vectorized_and_not") else { return };
    let mut rng = Rng::fresh("gpu_vocab_sizes");
    let ce = losses::cross_entropy(&CrossEntropy::default());
    for (t, h, v) in [(300, 128, 32000), (130, 96, 50257), (64, 64, 8), (3, 40, 1)] {
        let d = host(&mut rng, t, h, v);
        check::<bf16>(&gpu, &ce, &d, Reduction::Mean(None), Chunk::Tokens(t.div_ceil(3)), false, 1e-2);
        check::<f32>(&gpu, &ce, &d, Reduction::Mean(None), Chunk::Budget(64 << 20), true, 1e-5);
    }
}

#[test]
fn accumulate_adds_and_frozen_head_matches() {
    let Some(gpu) = gpu_or_skip("accumulate_adds_and_frozen_head_matches") else { return };
    let s = gpu.stream();
    let mut rng = Rng::fresh("gpu_accumulate");
    let ce = losses::cross_entropy(&CrossEntropy::default());
    let d = host(&mut rng, 50, 32, 777);
    let (xd, wd, tgd) = (up(&gpu, &cast::<bf16>(&d.x)), up(&gpu, &cast::<bf16>(&d.w)), up(&gpu, &d.targets));
    let dp = DeviceProblem {
        tokens: d.t,
        vocab: d.v,
        student: DeviceHead { x: &xd, w: &wd, bias: None, hidden: d.h },
        teacher: None,
        targets: Some(&tgd),
        ignore_index: -100,
        token_params: vec![],
        class_params: vec![],
        grad_tokens: None,
    };
    for f32_dw in [true, false] {
        let mut dx = s.alloc_zeros::<bf16>(d.t * d.h).unwrap();
        let mut once32 = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
        let mut twice32 = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
        let mut once = s.alloc_zeros::<bf16>(d.v * d.h).unwrap();
        let mut twice = s.alloc_zeros::<bf16>(d.v * d.h).unwrap();
        let mk = |b32: &mut CudaSlice<f32>, b: &mut CudaSlice<bf16>| -> Vec<f64> {
            if f32_dw {
                down(&gpu, b32).into_iter().map(f64::from).collect()
            } else {
                down(&gpu, b).into_iter().map(|x| f64::from(x.to_f32())).collect()
            }
        };
        for (buf32, buf, times) in [(&mut once32, &mut once, 1), (&mut twice32, &mut twice, 2)] {
            for k in 0..times {
                let dw = if f32_dw { GradBuf::F32(&mut *buf32) } else { GradBuf::Same(&mut *buf) };
                gpu::run(&gpu, &ce, &dp, Reduction::Mean(None), Chunk::Tokens(16), DeviceGrads { dx: Some(&mut dx), dw: Some(dw), db: None, accumulate: k > 0 }).unwrap();
            }
        }
        let a = mk(&mut once32, &mut once);
        let b = mk(&mut twice32, &mut twice);
        let e = rel_norm(b.iter().copied(), a.iter().map(|x| 2.0 * x));
        assert!(e < 1e-2, "accumulate twice != 2x once (f32_dw {f32_dw}): {e:e}");
    }
    let mut dx_full = s.alloc_zeros::<bf16>(d.t * d.h).unwrap();
    let mut dx_frozen = s.alloc_zeros::<bf16>(d.t * d.h).unwrap();
    poison(s, &mut dx_frozen).unwrap();
    let mut dw = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
    let full = gpu::run(&gpu, &ce, &dp, Reduction::Mean(None), Chunk::Tokens(16), DeviceGrads { dx: Some(&mut dx_full), dw: Some(GradBuf::F32(&mut dw)), db: None, accumulate: false }).unwrap();
    let frozen = gpu::run(&gpu, &ce, &dp, Reduction::Mean(None), Chunk::Tokens(16), DeviceGrads { dx: Some(&mut dx_frozen), dw: None, db: None, accumulate: false }).unwrap();
    assert_eq!(full.loss, frozen.loss);
    assert!(frozen.info.workspace < full.info.workspace || full.info.workspace == frozen.info.workspace);
    let (a, b) = (down(&gpu, &dx_full), down(&gpu, &dx_frozen));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "frozen-head dx differs from the trainable head's");
}

#[test]
fn bad_input_names_the_argument_and_index() {
    let Some(gpu) = gpu_or_skip("bad_input_names_the_argument_and_index") else { return };
    let s = gpu.stream();
    let ce = losses::cross_entropy(&CrossEntropy::default());
    let (t, h, v) = (20, 16, 100);
    let mut rng = Rng::fresh("gpu_bad_input");
    let d = host(&mut rng, t, h, v);
    let mut x = d.x.clone();
    let w = up(&gpu, &d.w);
    let mut tg = d.targets.clone();
    tg[13] = v as i64;
    let tgd = up(&gpu, &tg);
    let xd = up(&gpu, &x);
    let run = |xd: &CudaSlice<f32>, tgd: &CudaSlice<i64>| {
        let mut dx = s.alloc_zeros::<f32>(t * h).unwrap();
        let dp = DeviceProblem { tokens: t, vocab: v, student: DeviceHead { x: xd, w: &w, bias: None, hidden: h }, teacher: None, targets: Some(tgd), ignore_index: -100, token_params: vec![], class_params: vec![], grad_tokens: None };
        gpu::run(&gpu, &ce, &dp, Reduction::Mean(None), Chunk::Tokens(8), DeviceGrads { dx: Some(&mut dx), dw: None, db: None, accumulate: false })
    };
    match run(&xd, &tgd) {
        Err(Error::Target { index: 13, value, .. }) if value == v as i64 => {}
        other => panic!("expected a target error at 13, got {other:?}"),
    }
    x[7 * h + 5] = f32::NAN;
    let xd = up(&gpu, &x);
    let tgd = up(&gpu, &d.targets);
    let mut tg_ok = d.targets.clone();
    tg_ok[7] = 3;
    let tgd_ok = up(&gpu, &tg_ok);
    drop(tgd);
    let m = run(&xd, &tgd_ok).map(|_| ()).unwrap_err().to_string();
    assert!(m.contains("`x`") && m.contains("[7, 5]") && m.contains("NaN"), "{m}");
    // A NaN in a loss parameter is named too.
    let pol = losses::policy(&Policy::default());
    let xd_ok = up(&gpu, &d.x);
    let mut adv = d.adv.clone();
    let bad = tg_ok.iter().position(|&x| x != -100).expect("a counted token"); // ignored tokens are skipped
    adv[bad] = f32::NAN;
    let (advd, oldd) = (up(&gpu, &adv), up(&gpu, &d.old));
    let mut dx = s.alloc_zeros::<f32>(t * h).unwrap();
    let dp = DeviceProblem {
        tokens: t,
        vocab: v,
        student: DeviceHead { x: &xd_ok, w: &w, bias: None, hidden: h },
        teacher: None,
        targets: Some(&tgd_ok),
        ignore_index: -100,
        token_params: vec![("advantage", &advd), ("old_logprob", &oldd)],
        class_params: vec![],
        grad_tokens: None,
    };
    let m = gpu::run(&gpu, &pol, &dp, Reduction::Mean(None), Chunk::Tokens(8), DeviceGrads { dx: Some(&mut dx), dw: None, db: None, accumulate: false })
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(m.contains("advantage") && m.contains(&format!("[{bad}]")), "{m}");
    // Shapes.
    let short = up(&gpu, &d.x[1..]);
    let m = run(&short, &tgd_ok).map(|_| ()).unwrap_err().to_string();
    assert!(m.contains("student.x"), "{m}");
}

#[test]
fn c_abi_matches_the_rust_api() {
    let Some(gpu) = gpu_or_skip("c_abi_matches_the_rust_api") else { return };
    let s = gpu.stream();
    let mut rng = Rng::fresh("gpu_capi");
    let (t, h, v) = (77, 64, 1001);
    let d = host(&mut rng, t, h, v);
    let o = CrossEntropy { label_smoothing: 0.1, z_loss: 1e-4, softcap: Some(30.0), logit_scale: 0.5, class_weights: false };
    let ce = losses::cross_entropy(&o);
    let (xd, wd, tgd) = (up(&gpu, &cast::<bf16>(&d.x)), up(&gpu, &cast::<bf16>(&d.w)), up(&gpu, &d.targets));
    let n = d.targets.iter().filter(|&&x| x != -100).count() as f32;
    let mut dx_a = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut dw_a = s.alloc_zeros::<f32>(v * h).unwrap();
    let dp = DeviceProblem { tokens: t, vocab: v, student: DeviceHead { x: &xd, w: &wd, bias: None, hidden: h }, teacher: None, targets: Some(&tgd), ignore_index: -100, token_params: vec![], class_params: vec![], grad_tokens: None };
    let a = gpu::run(&gpu, &ce, &dp, Reduction::Mean(Some(f64::from(n))), Chunk::Tokens(10), DeviceGrads { dx: Some(&mut dx_a), dw: Some(GradBuf::F32(&mut dw_a)), db: None, accumulate: false }).unwrap();

    let mut dx_b = s.alloc_zeros::<bf16>(t * h).unwrap();
    let mut dw_b = s.alloc_zeros::<f32>(v * h).unwrap();
    let mut loss_b = s.alloc_zeros::<f32>(1).unwrap();
    let ws_bytes = memlinear::capi::memlinear_workspace_bytes(t as i64, h as i64, v as i64, 2, 10, 1, 0);
    assert!(ws_bytes > 0);
    let mut ws = s.alloc_zeros::<u8>(ws_bytes as usize).unwrap();
    let rc = {
        let (xp, _g1) = xd.device_ptr(s);
        let (wp, _g2) = wd.device_ptr(s);
        let (tp, _g3) = tgd.device_ptr(s);
        let (lp, _g4) = loss_b.device_ptr_mut(s);
        let (dxp, _g5) = dx_b.device_ptr_mut(s);
        let (dwp, _g6) = dw_b.device_ptr_mut(s);
        let (wsp, _g7) = ws.device_ptr_mut(s);
        // SAFETY: live device buffers of the documented shapes, in the bound context.
        unsafe {
            memlinear::capi::memlinear_cross_entropy(
                xp as _, wp as _, tp as _, t as i64, h as i64, v as i64, 2, -100, 0.1, 1e-4, 30.0, 0.5, n, lp as _, dxp as _, dwp as _, 0, 0, 10,
                wsp as _, ws_bytes, s.cu_stream() as _,
            )
        }
    };
    assert_eq!(rc, 0, "{:?}", unsafe { std::ffi::CStr::from_ptr(memlinear::capi::memlinear_last_error()) });
    assert_eq!(down(&gpu, &loss_b)[0], a.loss);
    assert!(down(&gpu, &dx_a).iter().zip(&down(&gpu, &dx_b)).all(|(p, q)| p.to_bits() == q.to_bits()));
    assert!(down(&gpu, &dw_a).iter().zip(&down(&gpu, &dw_b)).all(|(p, q)| p.to_bits() == q.to_bits()));
    // A bad target through the C ABI: code 2 and the index in the message.
    let mut tg = d.targets.clone();
    tg[42] = -7;
    let tgd2 = up(&gpu, &tg);
    let rc = {
        let (xp, _g1) = xd.device_ptr(s);
        let (wp, _g2) = wd.device_ptr(s);
        let (tp, _g3) = tgd2.device_ptr(s);
        let (lp, _g4) = loss_b.device_ptr_mut(s);
        let (wsp, _g7) = ws.device_ptr_mut(s);
        // SAFETY: as above; dx and dw NULL.
        unsafe {
            memlinear::capi::memlinear_cross_entropy(
                xp as _, wp as _, tp as _, t as i64, h as i64, v as i64, 2, -100, 0.0, 0.0, 0.0, 1.0, n, lp as _, std::ptr::null_mut(), std::ptr::null_mut(), 2, 0, 10,
                wsp as _, ws_bytes, s.cu_stream() as _,
            )
        }
    };
    assert_eq!(rc, 2);
    let m = unsafe { std::ffi::CStr::from_ptr(memlinear::capi::memlinear_last_error()) }.to_string_lossy().into_owned();
    assert!(m.contains("targets[42]"), "{m}");
}

#[test]
fn generated_kernels_compile_for_sm75_through_sm90() {
    // NVRTC only (no device needed beyond the library); skipped without NVRTC.
    if !cudakit::nvrtc_present() {
        if cudakit::testing::gpu_required() {
            panic!("REQUIRE_GPU=1 but NVRTC is missing");
        }
        eprintln!("SKIPPED generated_kernels_compile_for_sm75_through_sm90: no NVRTC");
        return;
    }
    for dtype in [memlinear::Dtype::F32, memlinear::Dtype::F16, memlinear::Dtype::Bf16] {
        for arch in [cudakit::Arch::SM75, cudakit::Arch { major: 9, minor: 0 }] {
            cudakit::kernel::compile_ptx(&gpu::helpers(dtype), arch).unwrap_or_else(|e| panic!("helpers {dtype:?} {arch}: {e}"));
        }
    }
    for (i, loss) in losses_under_test().into_iter().enumerate() {
        for dtype in [memlinear::Dtype::F32, memlinear::Dtype::F16, memlinear::Dtype::Bf16] {
            for vectorized in [false, true] {
                let block = if i % 2 == 0 { 512 } else { 1024 };
                let spec = memlinear::codegen::Spec::passes(dtype, 128256, true, true, true, vectorized, block);
                let src = gpu::loss_source(&loss, spec);
                for arch in [cudakit::Arch::SM75, cudakit::Arch { major: 8, minor: 0 }, cudakit::Arch { major: 9, minor: 0 }] {
                    cudakit::kernel::compile_ptx(&src, arch).unwrap_or_else(|e| panic!("{} {dtype:?} {arch}: {e}", loss.name()));
                }
            }
        }
    }
}
