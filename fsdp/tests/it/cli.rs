//! The `qlora` command line: `train` on the CPU reference end to end (model folder, JSONL,
//! metrics, plot, PEFT adapter), and its errors. The GPU path is the same code with the
//! GPU trainer behind it (tested in `gpu_model`).

use std::path::Path;
use std::process::Command;

use fsdp::weights::random_weights;
use fsdp::{hf, peft};
use safetensors::Dtype;

use crate::common::{config, TINY_LLAMA};

fn model_dir(dir: &Path) {
    let w = random_weights(&config(TINY_LLAMA), 11);
    let t: Vec<(String, Vec<usize>, &[f32])> = w.iter().map(|(s, v)| (s.name.clone(), s.shape.clone(), &v[..])).collect();
    hf::write_folder(dir, TINY_LLAMA, &t, Dtype::BF16, 1).unwrap();
}

/// The `qlora` binary cargo built for this test, or, where the test executable was moved
/// (the GPU machine's bundle: `tests/` beside `bin/`), the bundle's.
fn qlora(args: &[&str]) -> std::process::Output {
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_qlora"));
    let exe = if built.exists() {
        built
    } else {
        let here = std::env::current_exe().unwrap();
        here.parent().and_then(Path::parent).map(|b| b.join("bin/qlora")).filter(|p| p.exists()).unwrap_or(built)
    };
    Command::new(&exe).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()))
}

fn data(dir: &Path, lines: &[&str]) -> String {
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.display().to_string()
}

#[test]
fn train_on_the_cpu_writes_metrics_plot_and_a_peft_adapter() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    model_dir(&model);
    let docs: Vec<String> = (0..2).map(|i| format!(r#"{{"input_ids": [{}]}}"#, (0..13).map(|j| ((i * 7 + j * 5) % 100).to_string()).collect::<Vec<_>>().join(","))).collect();
    let data = data(d.path(), &docs.iter().map(String::as_str).collect::<Vec<_>>());
    let out = d.path().join("run");
    let (m, o) = (model.display().to_string(), out.display().to_string());
    let args = ["train", "--device", "cpu", "--model", &m, "--data", &data, "--out", &o, "--seq-len", "16", "--batch", "2", "--steps", "6", "--lr", "1e-2", "--rank", "4", "--alpha", "8", "--eos", "100"];
    let r = qlora(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 6);
    let loss = |i: usize| rows[i]["loss"].as_f64().unwrap();
    // two documents, one row each: every step sees the same micro-batch, so the loss falls
    assert!(loss(0).is_finite() && loss(5) < loss(0), "the loss should fall: {metrics}");
    assert!(rows.iter().all(|r| r["tokens"] == 32 && r["tokens_per_s"].as_f64().unwrap() > 0.0));
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<polyline"));
    let lora = peft::load(&out, &config(TINY_LLAMA)).unwrap();
    assert_eq!((lora.config.r, lora.config.alpha), (4, 8.0));
    // A second run refuses to overwrite the adapter, then does with --overwrite.
    let r = qlora(&args);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--overwrite"));
    let mut again = args.to_vec();
    again.push("--overwrite");
    let r = qlora(&again);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

#[test]
fn bad_inputs_name_what_is_wrong_and_write_no_adapter() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    model_dir(&model);
    let m = model.display().to_string();
    let out = d.path().join("run");
    let o = out.display().to_string();
    let run = |data: &str, extra: &[&str]| {
        let mut a = vec!["train", "--device", "cpu", "--model", &m, "--data", data, "--out", &o, "--seq-len", "8", "--steps", "1"];
        a.extend_from_slice(extra);
        let r = qlora(&a);
        assert!(!r.status.success());
        String::from_utf8_lossy(&r.stderr).into_owned()
    };
    let bad_line = data(d.path(), &[r#"{"input_ids": [1, 2, 3]}"#, r#"{"input_ids": [1, "x"]}"#]);
    let e = run(&bad_line, &[]);
    assert!(e.contains("data.jsonl") && e.contains('2'), "{e}");
    let outside = data(d.path(), &[r#"{"input_ids": [1, 2, 300]}"#]);
    assert!(run(&outside, &[]).contains("outside the model's vocabulary"));
    let ok = data(d.path(), &[r#"{"input_ids": [1, 2, 3, 4, 5]}"#]);
    assert!(run(&ok, &["--targets", "q_proj,attn"]).contains("unknown projection `attn`"));
    let r = qlora(&["train", "--device", "cpu", "--model", "/nonexistent-model-dir", "--data", &ok, "--out", &o]);
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("/nonexistent-model-dir"), "{e}");
    assert!(!out.join("adapter_model.safetensors").exists());
    let help = qlora(&["train", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("adapter_model.safetensors"));
}

#[test]
fn train_with_lora_dropout_is_seeded_and_saved() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("model");
    model_dir(&model);
    let docs: Vec<String> = (0..2).map(|i| format!(r#"{{"input_ids": [{}]}}"#, (0..13).map(|j| ((i * 11 + j * 3) % 100).to_string()).collect::<Vec<_>>().join(","))).collect();
    let data = data(d.path(), &docs.iter().map(String::as_str).collect::<Vec<_>>());
    let m = model.display().to_string();
    let train = |out: &str, dropout: &str| {
        let o = d.path().join(out);
        let os = o.display().to_string();
        let args = ["train", "--device", "cpu", "--model", &m, "--data", &data, "--out", &os, "--seq-len", "16", "--batch", "1", "--grad-accum", "2", "--steps", "6", "--lr", "1e-2", "--rank", "4", "--alpha", "8", "--eos", "100", "--lora-dropout", dropout];
        let r = qlora(&args);
        (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned(), o)
    };
    let losses = |o: &Path| -> Vec<f64> {
        std::fs::read_to_string(o.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    let (ok, err, a) = train("a", "0.1");
    assert!(ok, "{err}");
    let la = losses(&a);
    assert_eq!(la.len(), 6);
    assert!(la[5] < la[0], "the loss should fall with dropout 0.1: {la:?}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_dropout"], 0.1);
    assert_eq!(peft::load(&a, &config(TINY_LLAMA)).unwrap().config.dropout, 0.1);
    // the same run again: the same masks, the same losses; without dropout: other losses
    let (ok, err, b) = train("b", "0.1");
    assert!(ok, "{err}");
    assert_eq!(losses(&b), la);
    let (ok, err, c) = train("c", "0");
    assert!(ok, "{err}");
    let lc = losses(&c);
    assert_eq!(lc[0], la[0], "step 0: B = 0, so dropout cannot change the loss yet");
    assert_ne!(lc[1..], la[1..]);
    let (ok, err, _) = train("d", "1.0");
    assert!(!ok && err.contains("lora.dropout"), "{err}");
}
