//! The model's forward against an independent naive f64 implementation written from the
//! HF modeling code's semantics (per-token loops, its own RoPE frequencies), and
//! model-level properties: packing, PEFT init, input errors.

use fsdp::rng::Rng;
use fsdp::{count_targets, BaseFormat, Batch, Config, Llama, Lora, LoraConfig, Proj};

use crate::common::{batch, config, lora_nonzero, TINY_LLAMA, TINY_QWEN2};

/// `W x + b + s * B (A x)` for one token, f64.
fn linear(m: &Llama, lora: &Lora, l: usize, p: Proj, x: &[f64]) -> Vec<f64> {
    let lin = &m.layers[l].proj[p.index()];
    let (o, i) = (lin.out_features, lin.in_features);
    let mut y: Vec<f64> = (0..o).map(|r| (0..i).map(|c| f64::from(lin.weight[r * i + c]) * x[c]).sum::<f64>() + lin.bias.as_ref().map_or(0.0, |b| f64::from(b[r]))).collect();
    if let Some(pair) = lora.get(l, p) {
        let rk = lora.config.r;
        let s = lora.config.alpha / rk as f64;
        let ax: Vec<f64> = (0..rk).map(|k| (0..i).map(|c| f64::from(pair.a[k * i + c]) * x[c]).sum()).collect();
        for (r, yr) in y.iter_mut().enumerate() {
            *yr += s * (0..rk).map(|k| f64::from(pair.b[r * rk + k]) * ax[k]).sum::<f64>();
        }
    }
    y
}

fn rms(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * f64::from(w)).collect()
}

fn inv_freq(c: &Config) -> Vec<f64> {
    let d = c.head_dim;
    (0..d / 2)
        .map(|i| {
            let f = c.rope_theta.powf(-((2 * i) as f64) / d as f64);
            let Some(s) = c.rope_scaling else { return f };
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let old = s.original_max_position_embeddings as f64;
            if wavelen < old / s.high_freq_factor {
                f
            } else if wavelen > old / s.low_freq_factor {
                f / s.factor
            } else {
                let sm = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - sm) * f / s.factor + sm * f
            }
        })
        .collect()
}

/// rotate_half convention on one head vector.
fn rope(v: &mut [f64], pos: u32, freqs: &[f64]) {
    let half = v.len() / 2;
    let orig = v.to_vec();
    for i in 0..half {
        let (c, s) = ((pos as f64 * freqs[i]).cos(), (pos as f64 * freqs[i]).sin());
        v[i] = orig[i] * c - orig[i + half] * s;
        v[i + half] = orig[i + half] * c + orig[i] * s;
    }
}

/// Final hidden states, `[tokens][hidden]`.
fn forward_f64(m: &Llama, lora: &Lora, b: &Batch) -> Vec<Vec<f64>> {
    let c = &m.config;
    let (hd, d, nh, nkv) = (c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let freqs = inv_freq(c);
    let t = b.tokens();
    let mut x: Vec<Vec<f64>> = b.ids.iter().map(|&id| m.embed[id as usize * hd..(id as usize + 1) * hd].iter().map(|&v| f64::from(v)).collect()).collect();
    for (l, w) in m.layers.iter().enumerate() {
        let n1: Vec<Vec<f64>> = x.iter().map(|v| rms(v, &w.input_norm, c.rms_norm_eps)).collect();
        let mut q: Vec<Vec<f64>> = n1.iter().map(|v| linear(m, lora, l, Proj::Q, v)).collect();
        let mut k: Vec<Vec<f64>> = n1.iter().map(|v| linear(m, lora, l, Proj::K, v)).collect();
        let v: Vec<Vec<f64>> = n1.iter().map(|v| linear(m, lora, l, Proj::V, v)).collect();
        for tok in 0..t {
            for h in 0..nh {
                rope(&mut q[tok][h * d..(h + 1) * d], b.positions[tok], &freqs);
            }
            for h in 0..nkv {
                rope(&mut k[tok][h * d..(h + 1) * d], b.positions[tok], &freqs);
            }
        }
        let mut attn = vec![vec![0f64; nh * d]; t];
        for i in 0..t {
            let seq = i / b.seq_len;
            let keys: Vec<usize> = (seq * b.seq_len..=i).filter(|&j| b.docs.as_ref().is_none_or(|dd| dd[j] == dd[i])).collect();
            for h in 0..nh {
                let g = h / (nh / nkv); // repeat_kv
                let s: Vec<f64> = keys.iter().map(|&j| (0..d).map(|e| q[i][h * d + e] * k[j][g * d + e]).sum::<f64>() / (d as f64).sqrt()).collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for (idx, &j) in keys.iter().enumerate() {
                    let p = (s[idx] - mx).exp() / z;
                    for e in 0..d {
                        attn[i][h * d + e] += p * v[j][g * d + e];
                    }
                }
            }
        }
        for i in 0..t {
            let o = linear(m, lora, l, Proj::O, &attn[i]);
            x[i].iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let n2 = rms(&x[i], &w.post_norm, c.rms_norm_eps);
            let (g, u) = (linear(m, lora, l, Proj::Gate, &n2), linear(m, lora, l, Proj::Up, &n2));
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let dn = linear(m, lora, l, Proj::Down, &act);
            x[i].iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    x.iter().map(|v| rms(v, &m.norm, c.rms_norm_eps)).collect()
}

fn compare(json: &str, seed: u64) {
    let cfg = config(json);
    let m = Llama::random(cfg.clone(), seed, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&m, LoraConfig::new(4, 8.0), seed);
    let mut r = Rng::new(seed);
    let b = batch(&mut r, cfg.vocab_size, 2, 11);
    let mut b = b;
    b.positions.iter_mut().for_each(|p| *p += 90); // beyond the llama3 test model's original context
    let got = m.forward(&lora, &b).unwrap().hidden;
    let want = forward_f64(&m, &lora, &b);
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.chunks(cfg.hidden_size).zip(&want) {
        for (&a, &b) in g.iter().zip(w) {
            num += (f64::from(a) - b).powi(2);
            den += b * b;
        }
    }
    let rel = (num / den).sqrt();
    eprintln!("hidden states: relative L2 difference {rel:.2e}");
    assert!(rel < 1e-5, "{rel}");

    // the loss through memlinear against log-softmax in f64
    let targets = b.next_token_targets();
    let n = count_targets(&targets);
    let head = m.head_weight();
    let mut want_loss = 0.0;
    for (t, &tg) in targets.iter().enumerate() {
        if tg < 0 {
            continue;
        }
        let z: Vec<f64> = (0..cfg.vocab_size).map(|v| (0..cfg.hidden_size).map(|k| f64::from(head[v * cfg.hidden_size + k]) * want[t][k]).sum()).collect();
        let mx = z.iter().cloned().fold(f64::MIN, f64::max);
        want_loss += mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() - z[tg as usize];
    }
    want_loss /= n as f64;
    let loss = m.loss(&lora, &b, &targets, n as f64).unwrap();
    assert!((loss - want_loss).abs() < 1e-5 * want_loss, "{loss} vs {want_loss}");
}

#[test]
fn llama_forward_matches_f64_reference() {
    compare(TINY_LLAMA, 301);
}

#[test]
fn qwen2_forward_matches_f64_reference() {
    compare(TINY_QWEN2, 302);
}

/// A packed row gives each document what it gets alone.
#[test]
fn packing_equals_separate_sequences() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 303, &BaseFormat::default()).unwrap();
    let lora = lora_nonzero(&m, LoraConfig::new(4, 8.0), 303);
    let mut r = Rng::new(303);
    let ids: Vec<u32> = (0..12).map(|_| r.below(cfg.vocab_size) as u32).collect();
    let packed = Batch::packed(ids.clone(), vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], 12).unwrap();
    let hp = m.forward(&lora, &packed).unwrap().hidden;
    let h = cfg.hidden_size;
    for (range, len) in [(0..5, 5), (5..12, 7)] {
        let alone = m.forward(&lora, &Batch::new(ids[range.clone()].to_vec(), len).unwrap()).unwrap().hidden;
        let part = &hp[range.start * h..range.end * h];
        let worst = part.iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "document {range:?}: {worst}");
    }
}

/// With PEFT's initialisation (B = 0) the adapted model equals the base model, whatever
/// the targets.
#[test]
fn peft_init_leaves_the_model_unchanged() {
    let cfg = config(TINY_QWEN2);
    let m = Llama::random(cfg.clone(), 304, &BaseFormat::default()).unwrap();
    let b = batch(&mut Rng::new(304), cfg.vocab_size, 2, 6);
    let all = m.forward(&Lora::init(&cfg, LoraConfig::new(4, 8.0), 1).unwrap(), &b).unwrap().hidden;
    let one = m.forward(&Lora::init(&cfg, LoraConfig::new(2, 1.0).with_targets(&[Proj::Up]), 2).unwrap(), &b).unwrap().hidden;
    assert_eq!(all, one);
}

#[test]
fn input_errors() {
    let cfg = config(TINY_LLAMA);
    let m = Llama::random(cfg.clone(), 305, &BaseFormat::F32).unwrap();
    let lora = Lora::init(&cfg, LoraConfig::new(4, 8.0), 1).unwrap();
    let e = m.forward(&lora, &Batch::new(vec![1, 101, 3, 4], 2).unwrap()).unwrap_err().to_string();
    assert_eq!(e, "argument `ids`: ids[1] = 101 is outside the vocabulary [0, 101)");
    let other = config(TINY_QWEN2);
    let e = m.forward(&Lora::init(&other, LoraConfig::new(4, 8.0), 1).unwrap(), &Batch::new(vec![1, 2], 2).unwrap()).unwrap_err().to_string();
    assert!(e.contains("argument `lora`"), "{e}");
    let b = Batch::new(vec![1, 2, 3, 4], 2).unwrap();
    let e = m.loss(&lora, &b, &[1, 2, 3], 3.0).unwrap_err().to_string();
    assert!(e.contains("argument `targets`"), "{e}");
    let e = m.loss(&lora, &b, &[1, 2, 300, -100], 3.0).unwrap_err().to_string();
    assert!(e.contains("targets[2]` = 300 is outside the vocabulary"), "{e}");
    // a sliding window shorter than the sequence
    let mistral = config(r#"{"model_type":"mistral","hidden_size":16,"intermediate_size":24,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":20,"sliding_window":3}"#);
    let mm = Llama::random(mistral.clone(), 1, &BaseFormat::F32).unwrap();
    let ml = Lora::init(&mistral, LoraConfig::new(2, 4.0), 1).unwrap();
    assert!(mm.forward(&ml, &Batch::new(vec![1, 2, 3], 3).unwrap()).is_ok());
    let e = mm.forward(&ml, &Batch::new(vec![1, 2, 3, 4], 4).unwrap()).unwrap_err().to_string();
    assert!(e.contains("exceeds the model's sliding window (3)"), "{e}");
}
