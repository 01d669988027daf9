//! PEFT's adapter format: `adapter_config.json` + `adapter_model.safetensors`, loadable by
//! `peft.PeftModel.from_pretrained` (and read back here).
//!
//! Keys are PEFT's without the adapter name: `base_model.model.model.layers.{i}.self_attn.
//! q_proj.lora_A.weight` (`[r, in]`) and `lora_B.weight` (`[out, r]`), f32. Each file is
//! written atomically ([`crate::atomic`]), weights first then config: an interrupted save
//! leaves each file either old or new, never partial, and [`load`] checks every tensor's
//! shape against the config, so a stale pair is an error, not a silent mix.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::{Config, Fields};
use crate::error::{Error, Result};
use crate::lora::{Lora, LoraConfig};
use crate::proj::Proj;

/// The adapter configuration file.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter weights file.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The JSON of `adapter_config.json` for `lora`.
pub fn config_json(lora: &LoraConfig, base_model_name_or_path: &str) -> Value {
    let alpha = if lora.alpha.fract() == 0.0 && lora.alpha.abs() < 1e15 { json!(lora.alpha as i64) } else { json!(lora.alpha) };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.r,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    })
}

/// Saves `lora` into the folder `dir` (created if needed).
pub fn save(dir: impl AsRef<Path>, lora: &Lora, base_model_name_or_path: &str) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let tensors: Vec<(String, Vec<usize>, &[f32])> = lora.named_tensors().into_iter().map(|(n, s, d)| (n, s.to_vec(), d)).collect();
    crate::hf::write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, safetensors::Dtype::F32, Some([("format".to_string(), "pt".to_string())].into()))?;
    let text = serde_json::to_string_pretty(&config_json(&lora.config, base_model_name_or_path)).expect("JSON of plain values");
    crate::atomic::write(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// Parses the text of an `adapter_config.json` (`file` names it in errors). Returns the
/// LoRA configuration and `base_model_name_or_path` (empty when absent or null).
pub fn parse_config(text: &str, file: &str) -> Result<(LoraConfig, String)> {
    let v: Value = serde_json::from_str(text).map_err(|source| Error::Json { path: file.to_string(), source })?;
    let obj = v.as_object().ok_or_else(|| Error::config(file, "<root>", "expected a JSON object"))?;
    let f = Fields { file, obj, prefix: "" };
    let peft_type = f.req_str("peft_type")?;
    if peft_type != "LORA" {
        return Err(f.err("peft_type", format!("unsupported value \"{peft_type}\" (expected \"LORA\")")));
    }
    let r = f.req_positive("r")?;
    let alpha = f.req_f64("lora_alpha")?;
    let dropout = f.opt_f64("lora_dropout")?.unwrap_or(0.0);
    let targets = match obj.get("target_modules") {
        None | Some(Value::Null) => return Err(f.err("target_modules", "missing")),
        Some(Value::String(s)) if s == "all-linear" => Proj::ALL.to_vec(),
        Some(Value::String(s)) => {
            return Err(f.err("target_modules", format!("unsupported value \"{s}\" (a pattern: list the module names instead)")))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|it| {
                let name = it.as_str().ok_or_else(|| f.err("target_modules", "wrong type: expected a list of strings"))?;
                Proj::from_name(name).ok_or_else(|| {
                    f.err("target_modules", format!("unsupported module \"{name}\" (expected among {:?})", Proj::ALL.map(|p| p.name())))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(f.err("target_modules", "wrong type: expected a list of strings")),
    };
    let bias = f.opt_str("bias")?.unwrap_or("none");
    if bias != "none" {
        return Err(f.err("bias", format!("unsupported value \"{bias}\" (only \"none\")")));
    }
    for flag in ["fan_in_fan_out", "use_rslora", "use_dora"] {
        if f.opt_bool(flag)?.unwrap_or(false) {
            return Err(f.err(flag, "unsupported value true"));
        }
    }
    for (field, empty) in [("layers_to_transform", "null"), ("modules_to_save", "null"), ("rank_pattern", "{}"), ("alpha_pattern", "{}")] {
        let set = match obj.get(field) {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(f.err(field, format!("unsupported: only {empty} (every layer, nothing else saved, one rank and alpha)")));
        }
    }
    let base = f.opt_str("base_model_name_or_path")?.unwrap_or("").to_string();
    let lc = LoraConfig { r, alpha, dropout, targets: Vec::new() }.with_targets(&targets);
    lc.validate().map_err(|e| f.err("<lora>", e.to_string()))?;
    Ok((lc, base))
}

/// Loads an adapter folder for a model of configuration `model`: every tensor present,
/// of the right shape (f32, bf16 or f16; kept as f32), no unexpected ones.
pub fn load(dir: impl AsRef<Path>, model: &Config) -> Result<Lora> {
    let dir = dir.as_ref();
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(Error::io(&cfg_path))?;
    let (lc, _) = parse_config(&text, &cfg_path.display().to_string())?;
    let mut lora = Lora::zeros(model, lc)?;
    let path = dir.join(WEIGHTS_FILE);
    let file = path.display().to_string();
    let ck = nf4::Checkpoint::open(&path)?;
    let st = ck.tensors()?;
    let expected: Vec<(String, [usize; 2])> = lora.named_tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
    let mut names = st.names();
    names.sort_unstable(); // report the same one every time
    if let Some(extra) = names.into_iter().find(|n| !expected.iter().any(|(e, _)| e == *n)) {
        return Err(Error::tensor(&file, extra, format!("unexpected: not an adapter of target_modules {:?} for this model", lora.config.targets.iter().map(|p| p.name()).collect::<Vec<_>>())));
    }
    for ((name, shape), dst) in expected.iter().zip(lora.tensors_mut()) {
        let view = st.tensor(name).map_err(|_| Error::tensor(&file, name, "missing"))?;
        if view.shape() != shape {
            return Err(Error::tensor(&file, name, format!("shape {:?}, expected {shape:?} (r and the model's shapes)", view.shape())));
        }
        *dst = match view.dtype() {
            safetensors::Dtype::F32 => nf4::element::from_le_bytes::<f32>(view.data()),
            safetensors::Dtype::BF16 => nf4::element::from_le_bytes::<half::bf16>(view.data()).iter().map(|x| x.to_f32()).collect(),
            safetensors::Dtype::F16 => nf4::element::from_le_bytes::<half::f16>(view.data()).iter().map(|x| x.to_f32()).collect(),
            other => return Err(Error::tensor(&file, name, format!("dtype {other:?} is not supported (expected F32, BF16 or F16)"))),
        };
    }
    Ok(lora)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Config {
        crate::config::tiny(16, 24, 2, 4, 2, 50)
    }

    fn random_lora(targets: &[Proj]) -> Lora {
        let mut l = Lora::init(&model(), LoraConfig::new(4, 8.0).with_targets(targets), 3).unwrap();
        let mut r = crate::rng::Rng::new(4);
        for t in l.tensors_mut() {
            t.iter_mut().for_each(|x| *x += r.normal() as f32);
        }
        l
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let l = random_lora(&[Proj::Q, Proj::V, Proj::Down]);
        save(dir.path(), &l, "HuggingFaceTB/SmolLM2-135M").unwrap();
        save(dir.path(), &l, "HuggingFaceTB/SmolLM2-135M").unwrap(); // overwriting is fine
        assert_eq!(load(dir.path(), &model()).unwrap(), l);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names.len(), 2, "no temporaries left: {names:?}");
        let v: Value = serde_json::from_slice(&std::fs::read(dir.path().join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["r"], 4);
        assert_eq!(v["lora_alpha"], 8);
        assert_eq!(v["lora_dropout"], 0.0);
        assert_eq!(v["target_modules"], json!(["q_proj", "v_proj", "down_proj"]));
        assert_eq!(v["bias"], "none");
        assert_eq!((v["fan_in_fan_out"].as_bool(), v["use_rslora"].as_bool()), (Some(false), Some(false)));
        assert_eq!(v["base_model_name_or_path"], "HuggingFaceTB/SmolLM2-135M");
        let st = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let a = st.tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight").unwrap();
        assert_eq!((a.dtype(), a.shape()), (safetensors::Dtype::F32, &[4usize, 24][..]));
        let b = st.tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").unwrap();
        assert_eq!(b.shape(), &[8usize, 4][..]);
        assert_eq!(st.len(), 2 * 3 * 2);
    }

    #[test]
    fn config_errors() {
        let good = config_json(&LoraConfig::new(8, 16.0), "m");
        let with = |k: &str, v: Value| {
            let mut x = good.clone();
            x[k] = v;
            parse_config(&x.to_string(), "adapter_config.json").unwrap_err().to_string()
        };
        assert_eq!(with("peft_type", json!("IA3")), "adapter_config.json: field `peft_type`: unsupported value \"IA3\" (expected \"LORA\")");
        assert!(with("r", json!("8")).contains("field `r`: wrong type"));
        assert!(with("target_modules", json!(".*proj")).contains("field `target_modules`: unsupported value \".*proj\""));
        assert!(with("target_modules", json!(["q_proj", "lm_head"])).contains("unsupported module \"lm_head\""));
        assert!(with("use_rslora", json!(true)).contains("field `use_rslora`: unsupported value true"));
        assert!(with("bias", json!("all")).contains("field `bias`"));
        assert!(with("layers_to_transform", json!([0])).contains("field `layers_to_transform`"));
        assert!(with("lora_dropout", json!(1.5)).contains("lora.dropout"));
        let mut x = good.clone();
        x.as_object_mut().unwrap().remove("lora_alpha");
        assert_eq!(parse_config(&x.to_string(), "a.json").unwrap_err().to_string(), "a.json: field `lora_alpha`: missing");
        let mut x = good.clone();
        x["target_modules"] = json!("all-linear");
        x["lora_dropout"] = json!(0.05);
        let (lc, base) = parse_config(&x.to_string(), "a.json").unwrap();
        assert_eq!((lc.targets.len(), lc.dropout, base.as_str()), (7, 0.05, "m"));
    }

    #[test]
    fn weight_errors() {
        let dir = tempfile::tempdir().unwrap();
        let l = random_lora(&[Proj::Q, Proj::K]);
        save(dir.path(), &l, "m").unwrap();
        let file = dir.path().join(WEIGHTS_FILE).display().to_string();
        let cfg_path = dir.path().join(CONFIG_FILE);
        // the config says r = 8 but the tensors have r = 4
        let mut v: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        v["r"] = json!(8);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = load(dir.path(), &model()).unwrap_err().to_string();
        assert_eq!(e, format!("{file}: tensor `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: shape [4, 16], expected [8, 16] (r and the model's shapes)"));
        // the config lists fewer modules than the file holds
        v["r"] = json!(4);
        v["target_modules"] = json!(["q_proj"]);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = load(dir.path(), &model()).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{file}: tensor `base_model.model.model.layers.0.self_attn.k_proj.lora_")) && e.contains("unexpected"), "{e}");
        // ... or more
        v["target_modules"] = json!(["q_proj", "k_proj", "o_proj"]);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        let e = load(dir.path(), &model()).unwrap_err().to_string();
        assert_eq!(e, format!("{file}: tensor `base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight`: missing"));
        // no weights file
        std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
        assert!(load(dir.path(), &model()).unwrap_err().to_string().contains(WEIGHTS_FILE));
    }
}
