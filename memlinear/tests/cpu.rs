//! CPU correctness: derived gradients against finite differences, the chunked CPU
//! implementation against the unchunked f64 reference for every loss, option, dtype and
//! chunk size, and bad input.

mod common;

use common::{rel, rel_norm, Draws, Rng};
use half::bf16;
use memlinear::eval::{Interp, RowInputs};
use memlinear::losses::{self, CrossEntropy, Divergence, Policy};
use memlinear::{cpu, Chunk, Elem, Error, Head, Loss, Options, Problem, Reduction};

/// A loss with what it needs.
struct Case {
    name: String,
    /// Temperature of a policy loss (its log-probabilities are taken at it).
    temperature: f64,
    loss: Loss,
    token_params: Vec<&'static str>,
    class_params: Vec<&'static str>,
}

fn case(name: &str, loss: Loss) -> Case {
    let token_params = loss.token_params().iter().map(|s| &*Box::leak(s.clone().into_boxed_str())).collect();
    let class_params = loss.class_params().iter().map(|s| &*Box::leak(s.clone().into_boxed_str())).collect();
    Case { name: name.into(), temperature: 1.0, loss, token_params, class_params }
}

fn cases() -> Vec<Case> {
    let ce = |o: CrossEntropy| losses::cross_entropy(&o);
    vec![
        case("ce", ce(CrossEntropy::default())),
        case("ce+label_smoothing", ce(CrossEntropy { label_smoothing: 0.1, ..Default::default() })),
        case("ce+z_loss", ce(CrossEntropy { z_loss: 1e-2, ..Default::default() })),
        case("ce+softcap", ce(CrossEntropy { softcap: Some(3.0), ..Default::default() })),
        case("ce+logit_scale", ce(CrossEntropy { logit_scale: 0.7, ..Default::default() })),
        case("ce+class_weights", ce(CrossEntropy { class_weights: true, ..Default::default() })),
        case(
            "ce+everything",
            ce(CrossEntropy { label_smoothing: 0.2, z_loss: 1e-3, softcap: Some(5.0), logit_scale: 1.3, class_weights: true }),
        ),
        case("kl", losses::distillation(Divergence::ForwardKl, 1.0)),
        case("kl_t2", losses::distillation(Divergence::ForwardKl, 2.0)),
        case("reverse_kl", losses::distillation(Divergence::ReverseKl, 1.5)),
        case("jsd", losses::distillation(Divergence::Jsd { beta: 0.3 }, 1.0)),
        case("policy", losses::policy(&Policy::default())),
        Case { temperature: 0.8, ..case("policy+kl", losses::policy(&Policy { clip_low: 0.1, clip_high: 0.3, temperature: 0.8, kl_beta: 0.05 })) },
        // A user's loss: focal loss, written as its forward only.
        case(
            "user_focal",
            Loss::new("focal", |b| {
                let lp = b.logits().log_softmax().at_target();
                let p = lp.exp();
                -((1.0 - p).square() * lp)
            })
            .unwrap(),
        ),
    ]
}

fn param_values(rng: &mut Rng, name: &str, n: usize, vocab: usize) -> Vec<f32> {
    match name {
        "advantage" => rng.normals(n, 1.0),
        "old_logprob" | "ref_logprob" => (0..n).map(|_| (-(vocab as f64).ln() + rng.normal() * 0.5) as f32).collect(),
        "class_weight" => (0..n).map(|_| (0.2 + 1.6 * rng.uniform()) as f32).collect(),
        other => panic!("no generator for parameter {other}"),
    }
}

#[test]
fn derived_gradients_match_finite_differences() {
    let mut rng = Rng::fresh("finite_differences");
    let v = 37;
    for c in cases() {
        for _ in 0..3 {
            let z: Vec<f64> = (0..v).map(|_| rng.normal() * 2.0).collect();
            let t: Vec<f64> = (0..v).map(|_| rng.normal() * 2.0).collect();
            let target = rng.below(v);
            let tp: Vec<f64> = c.token_params.iter().map(|n| f64::from(param_values(&mut rng, n, 1, v)[0])).collect();
            let cp_vals: Vec<Vec<f32>> = c.class_params.iter().map(|n| param_values(&mut rng, n, v, v)).collect();
            let cp: Vec<&[f32]> = cp_vals.iter().map(|x| &x[..]).collect();
            let seed = 0.5 + rng.uniform();
            let eval = |zz: &[f64], grad: Option<&mut [f64]>| {
                let inp = RowInputs { logits: zz, teacher: Some(&t), target: Some(target), token_params: &tp, class_params: &cp, seed };
                Interp::new(&c.loss).run(&inp, grad)
            };
            let mut g = vec![0.0; v];
            eval(&z, Some(&mut g));
            let h = 1e-5;
            for j in 0..v {
                let mut zp = z.clone();
                zp[j] += h;
                let mut zm = z.clone();
                zm[j] -= h;
                let fd = seed * (eval(&zp, None) - eval(&zm, None)) / (2.0 * h);
                assert!(
                    (fd - g[j]).abs() <= 1e-7 + 1e-6 * g[j].abs(),
                    "{}: d/dz[{j}]: derived {} vs finite difference {fd}\n{}",
                    c.name,
                    g[j],
                    c.loss.dump()
                );
            }
        }
    }
}

#[test]
fn cross_entropy_gradient_is_softmax_minus_onehot() {
    let mut rng = Rng::fresh("ce_closed_form");
    let ce = losses::cross_entropy(&CrossEntropy::default());
    let v = 50;
    let z: Vec<f64> = (0..v).map(|_| rng.normal() * 3.0).collect();
    let target = rng.below(v);
    let mut g = vec![0.0; v];
    let l = Interp::new(&ce).run(&RowInputs { logits: &z, teacher: None, target: Some(target), token_params: &[], class_params: &[], seed: 1.0 }, Some(&mut g));
    let m = z.iter().copied().fold(f64::MIN, f64::max);
    let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
    let lse = m + s.ln();
    assert!(rel(l, lse - z[target]) < 1e-14);
    for j in 0..v {
        let want = (z[j] - lse).exp() - f64::from(u8::from(j == target));
        assert!((g[j] - want).abs() < 1e-14, "{j}: {} vs {want}", g[j]);
    }
}

struct Data {
    t: usize,
    h: usize,
    v: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    tx: Vec<f32>,
    tw: Vec<f32>,
    targets: Vec<i64>,
    token: Vec<(&'static str, Vec<f32>)>,
    class: Vec<(&'static str, Vec<f32>)>,
    grad_tokens: Vec<f32>,
}

fn data(rng: &mut Rng, c: &Case, t: usize, h: usize, v: usize) -> Data {
    // Logits of std ~1.5; ~0.5 for the policy loss, whose value exponentiates a difference of
    // log-probabilities: 16-bit logits carry an absolute rounding error proportional to
    // their size, which the ratio turns into a relative one (a property of the loss, not of
    // the implementation, that would otherwise eat the whole 1e-2 budget).
    let ws = if c.token_params.contains(&"old_logprob") { 0.5 } else { 1.5 } / (h as f64).sqrt();
    Data {
        t,
        h,
        v,
        x: rng.normals(t * h, 1.0),
        w: rng.normals(v * h, ws),
        b: rng.normals(v, 0.3),
        tx: rng.normals(t * h, 1.0),
        tw: rng.normals(v * h, ws),
        targets: rng.targets(t, v, 0.15),
        token: c.token_params.iter().map(|n| (*n, param_values(rng, n, t, v))).collect(),
        class: c.class_params.iter().map(|n| (*n, param_values(rng, n, v, v))).collect(),
        grad_tokens: rng.normals(t, 1.0),
    }
}

fn cast<T: Elem>(xs: &[f32]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x)).collect()
}

struct Typed<T> {
    x: Vec<T>,
    w: Vec<T>,
    b: Vec<T>,
    tx: Vec<T>,
    tw: Vec<T>,
}

fn typed<T: Elem>(d: &Data) -> Typed<T> {
    Typed { x: cast(&d.x), w: cast(&d.w), b: cast(&d.b), tx: cast(&d.tx), tw: cast(&d.tw) }
}

fn problem<'a, T: Elem>(d: &'a Data, ty: &'a Typed<T>, bias: bool) -> Problem<'a, T> {
    let mut student = Head::new(&ty.x[..], &ty.w[..], d.h);
    if bias {
        student = student.bias(&ty.b);
    }
    let mut p = Problem::new(d.t, d.v, student).teacher(Head::new(&ty.tx[..], &ty.tw[..], d.h)).targets(&d.targets, -100);
    for (n, v) in &d.token {
        p = p.token_param(n, v);
    }
    for (n, v) in &d.class {
        p = p.class_param(n, v);
    }
    p
}

fn f64s<T: Elem>(xs: &[T]) -> impl Iterator<Item = f64> + '_ {
    xs.iter().map(|x| f64::from(x.to_f32()))
}

/// Chunked run vs the f64 reference on the same (T-rounded) inputs.
fn check<T: Elem>(c: &Case, d: &Data, bias: bool, reduction: Reduction, chunks: &[Chunk], tol: f64) {
    let ty = typed::<T>(d);
    // A clipped policy loss has a gradient that jumps where the ratio crosses a clip bound;
    // 16-bit logits may move a token across one, which no implementation can avoid. So the
    // old log-probabilities are placed relative to the true ones: ratios near 1 (unclipped)
    // or e^-1 / e^1 (clipped), clear of the bounds.
    let mut d2;
    let d = if c.token_params.contains(&"old_logprob") {
        d2 = Data { token: d.token.clone(), targets: d.targets.clone(), x: vec![], w: vec![], b: vec![], tx: vec![], tw: vec![], grad_tokens: d.grad_tokens.clone(), class: d.class.clone(), ..*d };
        let mut rng = Rng::fresh("policy offsets");
        let mut logps = vec![0f32; d.t];
        for (t, (lp, &target)) in logps.iter_mut().zip(&d.targets).enumerate() {
            let Ok(tg) = usize::try_from(target) else { continue };
            let z: Vec<f64> = (0..d.v)
                .map(|j| {
                    let s: f64 = (0..d.h).map(|k| f64::from(ty.x[t * d.h + k].to_f32()) * f64::from(ty.w[j * d.h + k].to_f32())).sum();
                    (s + if bias { f64::from(ty.b[j].to_f32()) } else { 0.0 }) / c.temperature
                })
                .collect();
            let m = z.iter().copied().fold(f64::MIN, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            *lp = (z[tg] - lse) as f32;
        }
        for (name, vals) in d2.token.iter_mut() {
            for (val, &lp) in vals.iter_mut().zip(&logps) {
                *val = match *name {
                    "old_logprob" => lp + [rng.normal() * 0.02, 1.0, -1.0][rng.below(3)] as f32,
                    // A reference policy near the current one (k3's gradient grows as e^(ref-logp)).
                    "ref_logprob" => lp + (rng.normal() * 0.1) as f32,
                    _ => *val,
                };
            }
        }
        d2.x = d.x.clone();
        d2.w = d.w.clone();
        d2.b = d.b.clone();
        d2.tx = d.tx.clone();
        d2.tw = d.tw.clone();
        &d2
    } else {
        d
    };
    let p = problem(d, &ty, bias);
    let grad_tokens = (reduction == Reduction::None).then_some(&d.grad_tokens[..]);
    let base = Options { reduction, grad_tokens, ..Default::default() };
    let r = cpu::reference(&p, &c.loss, &base).unwrap();
    for &chunk in chunks {
        let o = Options { chunk, ..base.clone() };
        let out = cpu::run(&p, &c.loss, &o).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let what = format!("{} ({}, bias {bias}, {reduction:?}, {chunk:?} -> {} tokens)", c.name, T::DTYPE.name(), out.chunk_tokens);
        // Relative to the loss's scale: a signed loss (policy) may sum to nearly zero.
        let n = normalizer_of(reduction, &d.targets);
        let scale = r.loss.abs().max(r.per_token.iter().map(|x| x.abs()).sum::<f64>() / n);
        assert!((out.loss - r.loss).abs() <= tol * scale, "{what}: loss {} vs reference {} (scale {scale})", out.loss, r.loss);
        let e = rel_norm(out.per_token.iter().map(|&x| f64::from(x)), r.per_token.iter().copied());
        assert!(e <= tol, "{what}: per-token losses off by {e:e}");
        let e = rel_norm(f64s(out.dx.as_ref().unwrap()), r.dx.iter().copied());
        assert!(e <= tol, "{what}: dx off by {e:e} (relative norm)");
        let e = rel_norm(f64s(out.dw.as_ref().unwrap()), r.dw.iter().copied());
        assert!(e <= tol, "{what}: dw off by {e:e}");
        if bias {
            let e = rel_norm(f64s(out.db.as_ref().unwrap()), r.db.iter().copied());
            assert!(e <= tol, "{what}: db off by {e:e}");
        }
    }
}

fn normalizer_of(r: Reduction, targets: &[i64]) -> f64 {
    match r {
        Reduction::Mean(Some(n)) => n,
        Reduction::Mean(None) => targets.iter().filter(|&&t| t != -100).count().max(1) as f64,
        _ => 1.0,
    }
}

#[test]
fn every_loss_f32_matches_the_unchunked_reference_at_every_chunk_size() {
    let mut rng = Rng::fresh("f32_vs_reference");
    let chunks = [Chunk::Tokens(1), Chunk::Tokens(7), Chunk::Tokens(29), Chunk::Budget(37 * 4 * 2 * 5)];
    for c in cases() {
        let d = data(&mut rng, &c, 29, 19, 37);
        check::<f32>(&c, &d, false, Reduction::Mean(None), &chunks, 1e-5);
    }
}

#[test]
fn reductions_bias_and_upstream_gradients() {
    let mut rng = Rng::fresh("reductions");
    let c = &cases()[6]; // ce+everything
    let d = data(&mut rng, c, 23, 16, 41);
    for r in [Reduction::Sum, Reduction::Mean(Some(1234.5)), Reduction::None] {
        check::<f32>(c, &d, true, r, &[Chunk::Tokens(1), Chunk::Tokens(5), Chunk::Tokens(23)], 1e-5);
    }
    let kl = &cases()[9];
    let d = data(&mut rng, kl, 23, 16, 41);
    check::<f32>(kl, &d, true, Reduction::None, &[Chunk::Tokens(4)], 1e-5);
}

#[test]
fn bf16_and_f16_inputs_within_1e2() {
    let mut rng = Rng::fresh("16bit_vs_reference");
    for c in cases() {
        let d = data(&mut rng, &c, 33, 24, 61);
        check::<bf16>(&c, &d, true, Reduction::Mean(None), &[Chunk::Tokens(1), Chunk::Tokens(10), Chunk::Tokens(33)], 1e-2);
        check::<half::f16>(&c, &d, false, Reduction::Mean(None), &[Chunk::Tokens(8)], 1e-2);
    }
}

#[test]
fn a_realistic_size_f32() {
    let mut rng = Rng::fresh("realistic");
    let c = case("ce", losses::cross_entropy(&CrossEntropy::default()));
    let d = data(&mut rng, &c, 64, 96, 3001);
    check::<f32>(&c, &d, false, Reduction::Mean(None), &[Chunk::Tokens(13), Chunk::Budget(1 << 20)], 1e-5);
}

#[test]
fn microbatches_with_a_global_normalizer_add_up_to_the_batch() {
    let mut rng = Rng::fresh("microbatches");
    let ce = losses::cross_entropy(&CrossEntropy { label_smoothing: 0.1, ..Default::default() });
    let (t, h, v) = (40, 12, 29);
    let x = rng.normals(t * h, 1.0);
    let w = rng.normals(v * h, 0.3);
    let tg = rng.targets(t, v, 0.2);
    let n = tg.iter().filter(|&&x| x != -100).count() as f64;
    let whole = cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100), &ce, &Options::default()).unwrap();
    let mut loss = 0.0;
    let mut dw = vec![0f64; v * h];
    for half in 0..2 {
        let r = half * 20 * h..(half + 1) * 20 * h;
        let p = Problem::new(20, v, Head::new(&x[r], &w, h)).targets(&tg[half * 20..(half + 1) * 20], -100);
        let o = cpu::run(&p, &ce, &Options { reduction: Reduction::Mean(Some(n)), ..Default::default() }).unwrap();
        loss += o.loss;
        for (a, b) in dw.iter_mut().zip(o.dw.unwrap()) {
            *a += f64::from(b);
        }
    }
    assert!(rel(loss, whole.loss) < 1e-6, "{loss} vs {}", whole.loss);
    assert!(rel_norm(dw.iter().copied(), whole.dw.unwrap().iter().map(|&x| f64::from(x))) < 1e-6);
}

#[test]
fn frozen_head_and_forward_only_skip_their_work() {
    let mut rng = Rng::fresh("frozen");
    let ce = losses::cross_entropy(&CrossEntropy::default());
    let (t, h, v) = (9, 8, 13);
    let x = rng.normals(t * h, 1.0);
    let w = rng.normals(v * h, 0.3);
    let tg = rng.targets(t, v, 0.0);
    let p = Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100);
    let full = cpu::run(&p, &ce, &Options::default()).unwrap();
    let frozen = cpu::run(&p, &ce, &Options { want_dw: false, ..Default::default() }).unwrap();
    assert!(frozen.dw.is_none());
    assert_eq!(frozen.dx, full.dx);
    let fwd = cpu::run(&p, &ce, &Options { want_dw: false, want_dx: false, ..Default::default() }).unwrap();
    assert!(fwd.dx.is_none() && fwd.dw.is_none());
    assert_eq!(fwd.loss, full.loss);
}

fn err_of(r: Result<memlinear::Output<f32>, Error>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_an_error_naming_the_argument_and_index() {
    let ce = losses::cross_entropy(&CrossEntropy::default());
    let (t, h, v) = (6, 4, 10);
    let x: Vec<f32> = (0..t * h).map(|i| (i as f32).sin()).collect();
    let w: Vec<f32> = (0..v * h).map(|i| (i as f32).cos()).collect();
    let tg = vec![1i64, 2, -100, 3, 9, 0];
    let o = Options::default();
    let ok = Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100);
    assert!(cpu::run(&ok, &ce, &o).is_ok());

    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x[1..], &w, h)).targets(&tg, -100), &ce, &o));
    assert!(m.contains("student.x") && m.contains("23") && m.contains("24"), "{m}");
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w[..v * h - 4], h)).targets(&tg, -100), &ce, &o));
    assert!(m.contains("student.w"), "{m}");
    let bad_t = vec![1i64, 2, -100, 10, 9, 0];
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)).targets(&bad_t, -100), &ce, &o));
    assert!(m.contains("targets[3]") && m.contains("= 10"), "{m}");
    let neg_t = vec![1i64, 2, -1, 3, 9, 0];
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)).targets(&neg_t, -100), &ce, &o));
    assert!(m.contains("targets[2]"), "{m}");
    let mut xn = x.clone();
    xn[2 * h + 3] = f32::NAN;
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&xn, &w, h)).targets(&tg, -100), &ce, &o));
    assert!(m.contains("student.x") && m.contains("[2, 3]") && m.contains("NaN"), "{m}");
    let mut wn = w.clone();
    wn[7 * h] = f32::INFINITY;
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &wn, h)).targets(&tg, -100), &ce, &o));
    assert!(m.contains("student.w") && m.contains("[7, 0]") && m.contains("inf"), "{m}");
    // Finite inputs whose logits overflow.
    let xb = vec![1e20f32; t * h];
    let wb = vec![1e20f32; v * h];
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&xb, &wb, h)).targets(&tg, -100), &ce, &o));
    assert!(m.contains("token 0") && m.contains("not finite"), "{m}");
    // Loss needs what is missing.
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)), &ce, &o));
    assert!(m.contains("targets"), "{m}");
    let kl = losses::distillation(Divergence::ForwardKl, 1.0);
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)), &kl, &o));
    assert!(m.contains("teacher"), "{m}");
    let pol = losses::policy(&Policy::default());
    let adv = vec![1f32; t];
    let m = err_of(cpu::run(&Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100).token_param("advantage", &adv), &pol, &o));
    assert!(m.contains("old_logprob") && m.contains("missing"), "{m}");
    let m = err_of(cpu::run(
        &Problem::new(t, v, Head::new(&x, &w, h)).targets(&tg, -100).token_param("advantage", &adv[1..]).token_param("old_logprob", &adv),
        &pol,
        &o,
    ));
    assert!(m.contains("advantage") && m.contains("5 values"), "{m}");
    let m = err_of(cpu::run(&ok.clone().token_param("typo", &adv), &ce, &o));
    assert!(m.contains("typo"), "{m}");
    let m = err_of(cpu::run(&ok, &ce, &Options { reduction: Reduction::None, ..Default::default() }));
    assert!(m.contains("grad_tokens"), "{m}");
    let m = err_of(cpu::run(&ok, &ce, &Options { reduction: Reduction::Mean(Some(0.0)), ..Default::default() }));
    assert!(m.contains("normalizer"), "{m}");
    let m = err_of(cpu::run(&ok, &ce, &Options { chunk: Chunk::Tokens(0), ..Default::default() }));
    assert!(m.contains("chunk"), "{m}");
}
