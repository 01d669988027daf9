//! Loading HF model folders: dtypes, shards, NF4 at load, pre-quantized checkpoints, errors.

use std::path::Path;

use fsdp::weights::{random_weights, WeightSpec};
use fsdp::{hf, BaseFormat, Llama, Proj};
use half::bf16;
use safetensors::Dtype;

use crate::common::{config, TINY_LLAMA, TINY_QWEN2};

fn tensors(specs: &[(WeightSpec, Vec<f32>)]) -> Vec<(String, Vec<usize>, &[f32])> {
    specs.iter().map(|(s, v)| (s.name.clone(), s.shape.clone(), &v[..])).collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn err(dir: &Path) -> String {
    hf::load(dir, &BaseFormat::F32).unwrap_err().to_string()
}

#[test]
fn bf16_folder_quantized_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&config(TINY_QWEN2), 7);
    hf::write_folder(dir.path(), TINY_QWEN2, &tensors(&w), Dtype::BF16, 1).unwrap();

    let plain = hf::load(dir.path(), &BaseFormat::F32).unwrap();
    let get = |name: &str| bf16_round(&w.iter().find(|(s, _)| s.name == name).unwrap().1);
    assert_eq!(plain.embed, get("model.embed_tokens.weight"));
    assert!(plain.lm_head.is_none()); // tied
    let q = &plain.layers[1].proj[Proj::Q.index()];
    assert_eq!(q.weight, get("model.layers.1.self_attn.q_proj.weight"));
    assert_eq!(q.bias.as_deref(), Some(&get("model.layers.1.self_attn.q_proj.bias")[..]));
    assert!(q.nf4.is_none());

    let nf = hf::load(dir.path(), &BaseFormat::default()).unwrap();
    for (l, layer) in nf.layers.iter().enumerate() {
        for p in Proj::ALL {
            let name = format!("{}.weight", p.path(l));
            let src: Vec<bf16> = get(&name).iter().map(|&x| bf16::from_f32(x)).collect();
            let (o, i) = p.shape(&nf.config);
            let want = nf4::quantize(&name, &src, &[o, i], &nf4::QuantizeOptions::default()).unwrap();
            let lin = &layer.proj[p.index()];
            assert_eq!(lin.nf4.as_ref(), Some(&want), "{name}: the NF4 bytes are bitsandbytes' of the bf16 weight");
            assert_eq!(lin.weight, nf4::dequantize::<f32>(&name, &want.packed, &want.state).unwrap());
        }
    }
    assert_eq!(nf.embed, plain.embed); // not quantized
}

#[test]
fn sharded_f16_equals_single_file() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let w = random_weights(&config(TINY_LLAMA), 8);
    hf::write_folder(a.path(), TINY_LLAMA, &tensors(&w), Dtype::F16, 1).unwrap();
    hf::write_folder(b.path(), TINY_LLAMA, &tensors(&w), Dtype::F16, 3).unwrap();
    assert!(b.path().join(hf::INDEX_FILE).exists() && b.path().join("model-00003-of-00003.safetensors").exists());
    let (ma, mb) = (hf::load(a.path(), &BaseFormat::default()).unwrap(), hf::load(b.path(), &BaseFormat::default()).unwrap());
    assert_eq!(ma.embed, mb.embed);
    assert_eq!(ma.lm_head, mb.lm_head);
    assert!(ma.lm_head.is_some());
    for (x, y) in ma.layers.iter().zip(&mb.layers) {
        for (p, q) in x.proj.iter().zip(&y.proj) {
            assert_eq!(p.nf4, q.nf4);
        }
    }
    // f32 files round-trip exactly
    let c = tempfile::tempdir().unwrap();
    hf::write_folder(c.path(), TINY_LLAMA, &tensors(&w), Dtype::F32, 2).unwrap();
    let m = hf::load(c.path(), &BaseFormat::F32).unwrap();
    assert_eq!(m.layers[0].proj[Proj::Down.index()].weight, w.iter().find(|(s, _)| s.name == "model.layers.0.mlp.down_proj.weight").unwrap().1);
}

#[test]
fn prequantized_bnb_checkpoint_is_read_as_is() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(TINY_LLAMA);
    let w = random_weights(&cfg, 9);
    let mut owned = Vec::new();
    let mut plain = Vec::new();
    for (s, v) in &w {
        if s.name.ends_with("_proj.weight") {
            let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let q = nf4::quantize(&s.name, &b, &s.shape, &nf4::QuantizeOptions::default()).unwrap();
            owned.extend(nf4::checkpoint::to_tensors(&s.name, &q).unwrap());
        } else {
            plain.push((s.name.clone(), s.shape.clone(), &v[..]));
        }
    }
    // the 4-bit weights in one shard, the rest in another
    hf::write_safetensors(&dir.path().join("b.safetensors"), &plain, Dtype::BF16, None).unwrap();
    nf4::checkpoint::save(dir.path().join("a.safetensors"), &owned, None).unwrap();
    let mut map = serde_json::Map::new();
    for (s, _) in &w {
        let f = if s.name.ends_with("_proj.weight") { "a.safetensors" } else { "b.safetensors" };
        map.insert(s.name.clone(), f.into());
    }
    std::fs::write(dir.path().join(hf::INDEX_FILE), serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    std::fs::write(dir.path().join("config.json"), TINY_LLAMA).unwrap();
    let m = hf::load(dir.path(), &BaseFormat::default()).unwrap();
    let direct = hf::load(dir.path(), &BaseFormat::F32).unwrap();
    let lin = &m.layers[1].proj[Proj::Up.index()];
    assert_eq!(lin.weight, direct.layers[1].proj[Proj::Up.index()].weight);
    let n = "model.layers.1.mlp.up_proj.weight";
    let src: Vec<bf16> = w.iter().find(|(s, _)| s.name == n).unwrap().1.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(lin.nf4, Some(nf4::quantize(n, &src, &[48, 32], &nf4::QuantizeOptions::default()).unwrap()));
}

#[test]
fn errors_name_file_and_tensor() {
    let cfg = config(TINY_LLAMA);
    let w = random_weights(&cfg, 10);
    let all = tensors(&w);

    // missing tensor
    let dir = tempfile::tempdir().unwrap();
    let without: Vec<_> = all.iter().filter(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight").cloned().collect();
    hf::write_folder(dir.path(), TINY_LLAMA, &without, Dtype::BF16, 1).unwrap();
    let file = dir.path().join("model.safetensors").display().to_string();
    assert_eq!(err(dir.path()), format!("{file}: tensor `model.layers.1.mlp.up_proj.weight`: missing"));

    // untied model without lm_head
    let without: Vec<_> = all.iter().filter(|(n, _, _)| n != "lm_head.weight").cloned().collect();
    hf::write_folder(dir.path(), TINY_LLAMA, &without, Dtype::BF16, 1).unwrap();
    assert_eq!(err(dir.path()), format!("{file}: tensor `lm_head.weight`: missing"));

    // wrong shape (transposed)
    let mut bad = all.clone();
    let i = bad.iter().position(|(n, _, _)| n == "model.layers.0.mlp.gate_proj.weight").unwrap();
    bad[i].1 = vec![32, 48];
    hf::write_folder(dir.path(), TINY_LLAMA, &bad, Dtype::BF16, 1).unwrap();
    assert_eq!(err(dir.path()), format!("{file}: tensor `model.layers.0.mlp.gate_proj.weight`: shape [32, 48], but config.json implies [48, 32]"));

    // unsupported dtype
    let ints = vec![0u8; 101 * 32 * 4];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        vec![("model.embed_tokens.weight".into(), safetensors::tensor::TensorView::new(Dtype::I32, vec![101, 32], &ints).unwrap())];
    views.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::write(dir.path().join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    assert_eq!(err(dir.path()), format!("{file}: tensor `model.embed_tokens.weight`: dtype I32 is not supported (expected BF16, F16 or F32)"));

    // not a safetensors file
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    assert!(err(dir.path()).contains(&file), "{}", err(dir.path()));

    // sharded: a tensor missing from the index, then a shard file missing
    let dir = tempfile::tempdir().unwrap();
    hf::write_folder(dir.path(), TINY_LLAMA, &all, Dtype::BF16, 2).unwrap();
    let index = dir.path().join(hf::INDEX_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    v["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
    std::fs::write(&index, v.to_string()).unwrap();
    assert_eq!(err(dir.path()), format!("{}: tensor `model.norm.weight`: missing from weight_map", index.display()));
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert!(err(dir.path()).contains("model-00002-of-00002.safetensors"), "{}", err(dir.path()));
    std::fs::write(&index, r#"{"metadata":{}}"#).unwrap();
    assert_eq!(err(dir.path()), format!("{}: field `weight_map`: missing", index.display()));

    // no weights at all; bad config
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("config.json"), TINY_LLAMA).unwrap();
    assert!(err(empty.path()).contains("neither model.safetensors nor model.safetensors.index.json"));
    std::fs::write(empty.path().join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    assert!(err(empty.path()).ends_with("config.json: field `hidden_size`: missing"));
}

#[test]
fn loaded_model_matches_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(TINY_LLAMA);
    let w = random_weights(&cfg, 11);
    hf::write_folder(dir.path(), TINY_LLAMA, &tensors(&w), Dtype::F32, 1).unwrap();
    let a = hf::load(dir.path(), &BaseFormat::default()).unwrap();
    let b = Llama::random(cfg, 11, &BaseFormat::default()).unwrap();
    assert_eq!(a.embed, b.embed);
    assert_eq!(a.layers[1].proj[6].nf4, b.layers[1].proj[6].nf4);
}
