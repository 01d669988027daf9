//! Training: gradient accumulation equals the whole batch; AdamW steps reduce the loss;
//! adapters survive a PEFT round trip mid-training.

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
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-3), max_grad_norm: None };

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
    let mut t = Trainer::new(lora, TrainConfig { adamw: AdamWConfig { weight_decay: 0.0, ..Default::default() }, schedule, max_grad_norm: Some(1.0) }).unwrap();
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

#[test]
fn dropout_and_empty_batches_are_refused() {
    let cfg = config(TINY_LLAMA);
    let lora = Lora::init(&cfg, LoraConfig { dropout: 0.1, ..LoraConfig::new(4, 8.0) }, 1).unwrap();
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-3), max_grad_norm: None };
    assert!(Trainer::new(lora, tc.clone()).unwrap_err().to_string().contains("dropout is not implemented"));
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
    let tc = TrainConfig { adamw: AdamWConfig::default(), schedule: Schedule::constant(1e-2), max_grad_norm: Some(1.0) };
    let mut t = Trainer::new(Lora::init(&cfg, LoraConfig::new(8, 16.0), 203).unwrap(), tc).unwrap();
    let first = t.train_step(&m, &micro).unwrap().loss;
    let mut last = first;
    for _ in 0..9 {
        last = t.train_step(&m, &micro).unwrap().loss;
    }
    assert!(last < 0.9 * first, "{first} -> {last}");
}
