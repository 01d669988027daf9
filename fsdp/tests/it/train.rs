//! Training: gradient accumulation equals the whole batch; AdamW steps reduce the loss,
//! with and without LoRA dropout; adapters survive a PEFT round trip mid-training.

use fsdp::dropout::StepDropout;
use fsdp::optim::{AdamWConfig, Decay, Schedule};
use fsdp::rng::Rng;
use fsdp::train::{MicroBatch, TrainConfig, Trainer};
use fsdp::{peft, BaseFormat, Batch, Llama, Lora, LoraConfig};

use crate::common::{batch, config, lora_nonzero, TINY_LLAMA};

fn rows(b: &Batch, range: std::ops::Range<usize>) -> Batch {
    let l = b.seq_len;
    let cut = |v: &Vec<u32>| v[range.start * l..range.end * l].to_vec();
    Batch::from_parts(cut(&b.ids), cut(&b.positions), b.docs.as_ref().map(cut), l).unwrap()
}

#[test]
fn accumulation_equals_the_whole_batch() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 201, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&m, LoraConfig::new(4, 8.0), 201);
    let whole = batch(&mut Rng::new(201), cfg.vocab_size, 3, 10);
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-3), max_grad_norm: None, dropout_seed: 0 };

    let mut one = Trainer::new(lora.clone(), tc.clone()).unwrap();
    let (loss1, n1) = one.accumulate(&m, &[MicroBatch::next_token(whole.clone())]).unwrap();
    let mut split = Trainer::new(lora, tc).unwrap();
    let micro = [MicroBatch::next_token(rows(&whole, 0..1)), MicroBatch::next_token(rows(&whole, 1..3))];
    let (loss2, n2) = split.accumulate(&m, &micro).unwrap();
    assert_eq!(n1, n2);
    assert!((loss1 - loss2).abs() < 1e-6 * loss1.abs(), "{loss1} vs {loss2}");
    for ((name, _, a), b) in one.grads.named_tensors().into_iter().zip(split.grads.tensors()) {
        let (num, den) = a.iter().zip(b).fold((0.0, 0.0), |(n, d), (&x, &y)| (n + f64::from(x - y).powi(2), d + f64::from(x).powi(2)));
        assert!((num / den).sqrt() < 1e-5, "{name}: relative difference {}", (num / den).sqrt());
    }
}

#[test]
fn adamw_steps_reduce_the_loss() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 202, &BaseFormat::default()).unwrap();
    let lora = Lora::init(&cfg, LoraConfig::new(8, 16.0), 202).unwrap(); // PEFT init: B = 0
    let mut r = Rng::new(202);
    let micro = [MicroBatch::next_token(batch(&mut r, cfg.vocab_size, 2, 12)), MicroBatch::next_token(batch(&mut r, cfg.vocab_size, 1, 12))];
    let schedule = Schedule { peak_lr: 1e-2, warmup_steps: 3, total_steps: 30, decay: Decay::Cosine };
    let mut t = Trainer::new(lora, TrainConfig { adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() }, schedule, max_grad_norm: Some(1.0), dropout_seed: 0 }).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let rep = t.train_step(&m, &micro).unwrap();
        assert!(rep.loss.is_finite() && rep.grad_norm.is_finite());
        losses.push(rep.loss);
    }
    let n = fsdp::count_targets(&micro[0].targets) + fsdp::count_targets(&micro[1].targets);
    let last: f64 = micro.iter().map(|mb| m.loss(&t.lora, &mb.batch, &mb.targets, n as f64).unwrap()).sum();
    eprintln!("loss {:.4} -> {:.4} ({:?})", losses[0], last, losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>());
    assert!(last < 0.8 * losses[0], "loss {} -> {last}", losses[0]);
    assert_eq!(t.step, 30);

    // save, load, and the loss is the same
    let dir = tempfile::tempdir().unwrap();
    peft::save(dir.path(), &t.lora, "tiny").unwrap();
    let back = peft::load(dir.path(), &cfg).unwrap();
    assert_eq!(back, t.lora);
    let again: f64 = micro.iter().map(|mb| m.loss(&back, &mb.batch, &mb.targets, n as f64).unwrap()).sum();
    assert_eq!(again, last);
}

/// LoRA dropout 0.1: the loss (evaluated without dropout) falls; the run is reproducible
/// from its seed; another seed, or no dropout, trains differently; every micro-batch of
/// every step draws its own masks.
#[test]
fn dropout_training_reduces_the_loss_and_is_seeded() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 204, &BaseFormat::default()).unwrap();
    let mut r = Rng::new(204);
    let micro = [MicroBatch::next_token(batch(&mut r, cfg.vocab_size, 2, 12)), MicroBatch::next_token(batch(&mut r, cfg.vocab_size, 1, 12))];
    let n: usize = micro.iter().map(|mb| fsdp::count_targets(&mb.targets)).sum();
    let eval = |l: &Lora| -> f64 { micro.iter().map(|mb| m.loss(l, &mb.batch, &mb.targets, n as f64).unwrap()).sum() };
    let run = |dropout: f64, seed: u64, steps: usize| {
        let lora = Lora::init(&cfg, LoraConfig { dropout, ..LoraConfig::new(8, 16.0) }, 204).unwrap();
        let schedule = Schedule { peak_lr: 1e-2, warmup_steps: 3, total_steps: 30, decay: Decay::Cosine };
        let tc = TrainConfig { adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() }, schedule, max_grad_norm: Some(1.0), dropout_seed: seed };
        let mut t = Trainer::new(lora, tc).unwrap();
        let losses: Vec<f64> = (0..steps).map(|_| t.train_step(&m, &micro).unwrap().loss).collect();
        (losses, t)
    };
    let (losses, t) = run(0.1, 7, 30);
    let first = eval(&Lora::init(&cfg, LoraConfig::new(8, 16.0), 204).unwrap());
    let last = eval(&t.lora);
    eprintln!("dropout 0.1: eval loss {first:.4} -> {last:.4}; training losses {:?}", losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>());
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    // the same seed, the same run, bit for bit; another seed or no dropout, another run
    let (again, t2) = run(0.1, 7, 30);
    assert_eq!(again, losses);
    assert_eq!(t2.lora, t.lora);
    let (other_seed, _) = run(0.1, 8, 3);
    assert_ne!(other_seed[1..], losses[1..3]);
    let (none, _) = run(0.0, 7, 3);
    assert_ne!(none[1..], losses[1..3]);
    // step 0's loss is the same for all (B = 0: the adapters add nothing yet)
    assert!((none[0] - losses[0]).abs() < 1e-9 && (other_seed[0] - losses[0]).abs() < 1e-9);
    // masks: per (step, micro-batch)
    let d = |step: u64, micro: u64| StepDropout::new(0.1, 7, step, micro).unwrap().seed;
    let mut t3 = run(0.1, 7, 0).1;
    assert_eq!(t3.dropout(0).unwrap().seed, d(0, 0));
    assert_eq!(t3.dropout(1).unwrap().seed, d(0, 1));
    t3.train_step(&m, &micro).unwrap();
    assert_eq!(t3.dropout(0).unwrap().seed, d(1, 0));
    assert!(d(0, 0) != d(0, 1) && d(0, 0) != d(1, 0) && d(0, 1) != d(1, 0));
}

/// `p = 0` is no dropout at all, bit for bit, whatever the seed.
#[test]
fn dropout_zero_is_bit_identical_to_none() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 205, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&m, LoraConfig::new(4, 8.0), 205);
    let b = batch(&mut Rng::new(205), cfg.vocab_size, 2, 9);
    let targets = b.next_token_targets();
    let run = |d: Option<StepDropout>| {
        let mut g = lora.zeros_like();
        let out = m.step(&lora, &b, &targets, 10.0, d, &mut g).unwrap();
        (out.loss.to_bits(), g.tensors().iter().flat_map(|t| t.iter().map(|x| x.to_bits())).collect::<Vec<_>>())
    };
    let plain = run(None);
    assert_eq!(run(Some(StepDropout { p: 0.0, seed: 123 })), plain);
    assert_ne!(run(StepDropout::new(0.1, 123, 0, 0)), plain);
}

#[test]
fn empty_batches_are_refused() {
    let cfg = config(TINY_LLAMA);
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-3), max_grad_norm: None, dropout_seed: 0 };
    let m = Llama::random(cfg.clone(), 1, &BaseFormat::F32).unwrap();
    let mut t = Trainer::new(Lora::init(&cfg, LoraConfig::new(4, 8.0), 1).unwrap(), tc).unwrap();
    let b = Batch::new(vec![1, 2, 3], 3).unwrap();
    let e = t.train_step(&m, &[MicroBatch { targets: vec![-100; 3], batch: b }]).unwrap_err().to_string();
    assert!(e.contains("no micro-batch has a counted target"), "{e}");
}

/// JSONL -> packed rows -> micro-batches -> training steps.
#[test]
fn jsonl_to_training() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 203, &BaseFormat::default()).unwrap();
    let mut r = Rng::new(203);
    let jsonl: String = (0..6)
        .map(|i| {
            let ids: Vec<u32> = (0..(3 + 2 * i)).map(|_| r.below(cfg.vocab_size - 1) as u32 + 1).collect();
            format!("{{\"input_ids\": {ids:?}}}\n")
        })
        .collect();
    let docs = fsdp::data::parse_jsonl(&jsonl, "mem.jsonl", &fsdp::data::TextOptions { eos: Some(0), ..Default::default() }).unwrap();
    let packed = fsdp::data::pack(&docs, 16, 0).unwrap();
    let micro = packed.micro_batches(2).unwrap();
    assert_eq!(micro.iter().map(|mb| fsdp::count_targets(&mb.targets)).sum::<usize>(), docs.iter().map(|d| d.len() - 1).sum::<usize>());
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-2), max_grad_norm: Some(1.0), dropout_seed: 0 };
    let mut t = Trainer::new(Lora::init(&cfg, LoraConfig::new(8, 16.0), 203).unwrap(), tc).unwrap();
    let first = t.train_step(&m, &micro).unwrap().loss;
    let mut last = first;
    for _ in 0..9 {
        last = t.train_step(&m, &micro).unwrap().loss;
    }
    assert!(last < 0.9 * first, "{first} -> {last}");
}
