//! The device-side check every GPU test shares: one call of `gpu::run` against the f64
//! reference on the same inputs (outputs poisoned first).

use super::{rel_norm, Draws, Rng};
use cudakit::testing::poison;
use cudarc::driver::{CudaSlice, DeviceRepr};
use memlinear::gpu::{self, DeviceGrads, DeviceHead, DeviceProblem, GradBuf};
use memlinear::losses::{self, CrossEntropy, Divergence, Policy};
use memlinear::{cpu, Chunk, Elem, Head, Loss, Options, Problem, Reduction};

pub fn losses_under_test() -> Vec<Loss> {
    vec![
        losses::cross_entropy(&CrossEntropy::default()),
        losses::cross_entropy(&CrossEntropy { label_smoothing: 0.1, z_loss: 1e-3, softcap: Some(4.0), logit_scale: 1.2, class_weights: true }),
        losses::distillation(Divergence::ForwardKl, 2.0),
        losses::distillation(Divergence::Jsd { beta: 0.4 }, 1.0),
        losses::policy(&Policy { kl_beta: 0.05, ..Default::default() }),
    ]
}

pub struct Host {
    pub t: usize,
    pub h: usize,
    pub v: usize,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub tx: Vec<f32>,
    pub tw: Vec<f32>,
    pub targets: Vec<i64>,
    pub grad_tokens: Vec<f32>,
    pub adv: Vec<f32>,
    pub old: Vec<f32>,
    pub refp: Vec<f32>,
    pub cw: Vec<f32>,
}

pub fn host(rng: &mut Rng, t: usize, h: usize, v: usize) -> Host {
    let ws = 1.0 / (h as f64).sqrt();
    let lnv = (v as f64).ln() as f32;
    Host {
        t,
        h,
        v,
        x: rng.normals(t * h, 1.0),
        w: rng.normals(v * h, ws),
        b: rng.normals(v, 0.2),
        tx: rng.normals(t * h, 1.0),
        tw: rng.normals(v * h, ws),
        targets: rng.targets(t, v, 0.1),
        grad_tokens: rng.normals(t, 1.0),
        adv: rng.normals(t, 1.0),
        old: rng.normals(t, 0.01).iter().map(|x| x - lnv).collect(),
        refp: rng.normals(t, 0.01).iter().map(|x| x - lnv).collect(),
        cw: (0..v).map(|_| (0.5 + rng.uniform()) as f32).collect(),
    }
}

pub fn cast<T: Elem>(xs: &[f32]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x)).collect()
}

pub fn up<T: DeviceRepr + Clone>(gpu: &cudakit::Gpu, xs: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(xs).expect("upload")
}

pub fn down<T: DeviceRepr + Default + Clone>(gpu: &cudakit::Gpu, xs: &CudaSlice<T>) -> Vec<T> {
    gpu.stream().clone_dtoh(xs).expect("download")
}

/// One GPU run vs the f64 reference.
pub fn check<T: Elem + DeviceRepr + cudarc::driver::ValidAsZeroBits>(gpu: &cudakit::Gpu, loss: &Loss, d: &Host, reduction: Reduction, chunk: Chunk, f32_dw: bool, tol: f64) {
    let s = gpu.stream();
    let (x, w, b, tx, tw) = (cast::<T>(&d.x), cast::<T>(&d.w), cast::<T>(&d.b), cast::<T>(&d.tx), cast::<T>(&d.tw));
    // Reference (host).
    let mut p = Problem::new(d.t, d.v, Head::new(&x[..], &w[..], d.h).bias(&b)).teacher(Head::new(&tx[..], &tw[..], d.h)).targets(&d.targets, -100);
    let params: [(&str, &[f32]); 3] = [("advantage", &d.adv), ("old_logprob", &d.old), ("ref_logprob", &d.refp)];
    for (n, v) in params {
        if loss.token_params().iter().any(|p| p == n) {
            p = p.token_param(n, v);
        }
    }
    if !loss.class_params().is_empty() {
        p = p.class_param("class_weight", &d.cw);
    }
    let gt = (reduction == Reduction::None).then_some(&d.grad_tokens[..]);
    let r = cpu::reference(&p, loss, &Options { reduction, grad_tokens: gt, ..Default::default() }).expect("reference");

    // Device.
    let (xd, wd, bd, txd, twd) = (up(gpu, &x), up(gpu, &w), up(gpu, &b), up(gpu, &tx), up(gpu, &tw));
    let tgd = up(gpu, &d.targets);
    let gtd = up(gpu, &d.grad_tokens);
    let (advd, oldd, refd, cwd) = (up(gpu, &d.adv), up(gpu, &d.old), up(gpu, &d.refp), up(gpu, &d.cw));
    let mut dp = DeviceProblem {
        tokens: d.t,
        vocab: d.v,
        student: DeviceHead { x: &xd, w: &wd, bias: Some(&bd), hidden: d.h },
        teacher: Some(DeviceHead { x: &txd, w: &twd, bias: None, hidden: d.h }),
        targets: Some(&tgd),
        ignore_index: -100,
        token_params: vec![],
        class_params: vec![],
        grad_tokens: (reduction == Reduction::None).then_some(&gtd),
    };
    for (n, v) in [("advantage", &advd), ("old_logprob", &oldd), ("ref_logprob", &refd)] {
        if loss.token_params().iter().any(|p| p == n) {
            dp.token_params.push((n, v));
        }
    }
    if !loss.class_params().is_empty() {
        dp.class_params.push(("class_weight", &cwd));
    }
    let mut dx = s.alloc_zeros::<T>(d.t * d.h).unwrap();
    poison(s, &mut dx).unwrap();
    let mut dw32 = s.alloc_zeros::<f32>(d.v * d.h).unwrap();
    let mut db32 = s.alloc_zeros::<f32>(d.v).unwrap();
    let mut dwt = s.alloc_zeros::<T>(d.v * d.h).unwrap();
    let mut dbt = s.alloc_zeros::<T>(d.v).unwrap();
    poison(s, &mut dw32).unwrap();
    poison(s, &mut db32).unwrap();
    poison(s, &mut dwt).unwrap();
    poison(s, &mut dbt).unwrap();
    let (dw, db) = if f32_dw { (GradBuf::F32(&mut dw32), GradBuf::F32(&mut db32)) } else { (GradBuf::Same(&mut dwt), GradBuf::Same(&mut dbt)) };
    let out = gpu::run(gpu, loss, &dp, reduction, chunk, DeviceGrads { dx: Some(&mut dx), dw: Some(dw), db: Some(db), accumulate: false })
        .unwrap_or_else(|e| panic!("{}: {e}", loss.name()));
    let what = format!("{} {} {reduction:?} chunk {} (of {}x{}x{}) f32_dw {f32_dw}", loss.name(), T::DTYPE.name(), out.info.chunk, d.t, d.h, d.v);
    let f = |v: Vec<T>| v.into_iter().map(|x| f64::from(x.to_f32())).collect::<Vec<_>>();
    let scale = r.loss.abs().max(r.per_token.iter().map(|x| x.abs()).sum::<f64>() / out.info.normalizer.max(1.0));
    assert!((f64::from(out.loss) - r.loss).abs() <= tol * scale, "{what}: loss {} vs {}", out.loss, r.loss);
    let e = rel_norm(out.per_token.iter().map(|&x| f64::from(x)), r.per_token.iter().copied());
    assert!(e <= tol, "{what}: per-token losses off by {e:e}");
    let e = rel_norm(f(down(gpu, &dx)), r.dx.iter().copied());
    assert!(e <= tol, "{what}: dx off by {e:e}");
    let (dwv, dbv) = if f32_dw {
        (down(gpu, &dw32).into_iter().map(f64::from).collect::<Vec<_>>(), down(gpu, &db32).into_iter().map(f64::from).collect::<Vec<_>>())
    } else {
        (f(down(gpu, &dwt)), f(down(gpu, &dbt)))
    };
    let e = rel_norm(dwv, r.dw.iter().copied());
    assert!(e <= tol, "{what}: dw off by {e:e}");
    let e = rel_norm(dbv, r.db.iter().copied());
    assert!(e <= tol, "{what}: db off by {e:e}");
}

