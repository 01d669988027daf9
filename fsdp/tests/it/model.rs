//! The full step's LoRA gradients against finite differences of the loss, without and
//! with LoRA dropout (a fixed mask: the same micro-step seed throughout).

use fsdp::dropout::StepDropout;
use fsdp::rng::Rng;
use fsdp::{count_targets, BaseFormat, Llama, Lora, LoraConfig, Proj};

use crate::common::{batch, config, lora_nonzero, TINY_LLAMA, TINY_QWEN2};

fn fd_check(json: &str, targets_of: &[Proj], seed: u64, dropout: Option<StepDropout>) {
    let cfg = config(json);
    let m = Llama::random(cfg.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&m, LoraConfig::new(4, 8.0).with_targets(targets_of), seed);
    let mut r = Rng::new(seed);
    let b = batch(&mut r, cfg.vocab_size, 2, 9);
    let targets = b.next_token_targets();
    let n = count_targets(&targets) as f64;
    let mut grads = lora.zeros_like();
    let out = m.step(&lora, &b, &targets, n, dropout, &mut grads).unwrap();
    // the training loss (with this micro-step's masks)
    let loss_of = |l: &Lora| {
        let acts = m.forward_train(l, &b, dropout).unwrap();
        m.head_loss(&acts.hidden, &targets, n, false).unwrap().0
    };
    assert!((out.loss - loss_of(&lora)).abs() < 1e-6);
    let eval = m.loss(&lora, &b, &targets, n).unwrap();
    if dropout.is_some() {
        assert!((out.loss - eval).abs() > 1e-4 * eval, "dropout did not change the training loss ({} vs {eval})", out.loss);
    } else {
        assert!((out.loss - eval).abs() < 1e-6);
    }
    assert_eq!(out.counted, count_targets(&targets));

    // the loss with one entry of one tensor moved to `value`
    let loss_with = |which: usize, idx: usize, value: f32| {
        let mut l: Lora = lora.clone();
        l.tensors_mut()[which][idx] = value;
        loss_of(&l)
    };
    let names = lora.named_tensors();
    let (mut worst, mut checked) = (0f64, 0);
    for _ in 0..6 {
        let which = r.below(names.len());
        let g = grads.tensors()[which];
        for _ in 0..3 {
            let idx = r.below(g.len());
            let x0 = lora.tensors()[which][idx];
            let h = 1e-2f32;
            let (xp, xm) = (x0 + h, x0 - h);
            let fd = (loss_with(which, idx, xp) - loss_with(which, idx, xm)) / (f64::from(xp) - f64::from(xm));
            let an = f64::from(g[idx]);
            let err = (fd - an).abs() / (2e-4 + 2e-2 * fd.abs().max(an.abs()));
            eprintln!("{}[{idx}]: fd {fd:.6e} analytic {an:.6e} err {err:.3}", names[which].0);
            worst = worst.max(err);
            checked += 1;
        }
    }
    assert!(worst <= 1.0, "worst error {worst} x tolerance over {checked} entries");

    // the gradient in a random direction over all tensors at once
    let dirs: Vec<Vec<f32>> = lora.tensors().iter().map(|t| (0..t.len()).map(|_| r.normal() as f32).collect()).collect();
    let moved = |s: f32| {
        let mut l = lora.clone();
        for (t, d) in l.tensors_mut().into_iter().zip(&dirs) {
            t.iter_mut().zip(d).for_each(|(x, &dx)| *x += s * dx);
        }
        loss_of(&l)
    };
    // fourth-order central difference: the loss is far from quadratic along a step that
    // moves every parameter at once
    let h = 1e-3f32;
    let fd = (8.0 * (moved(h) - moved(-h)) - (moved(2.0 * h) - moved(-2.0 * h))) / (12.0 * f64::from(h));
    let an: f64 = grads.tensors().iter().zip(&dirs).flat_map(|(g, d)| g.iter().zip(d).map(|(&a, &b)| f64::from(a) * f64::from(b))).sum();
    eprintln!("directional: fd {fd:.6e} analytic {an:.6e}");
    assert!((fd - an).abs() <= 2e-3 * an.abs().max(1e-2), "directional derivative: fd {fd} vs analytic {an}");
}

#[test]
fn llama_lora_gradients_match_finite_differences() {
    fd_check(TINY_LLAMA, &Proj::ALL, 101, None);
}

#[test]
fn llama_lora_gradients_with_dropout_match_finite_differences() {
    fd_check(TINY_LLAMA, &Proj::ALL, 103, StepDropout::new(0.3, 5, 2, 1));
}

#[test]
fn qwen2_biases_tied_head_subset_of_targets() {
    fd_check(TINY_QWEN2, &[Proj::Q, Proj::V, Proj::Down], 102, None);
}
