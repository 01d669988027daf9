//! The `nf4` command on the transformers-saved checkpoint fixtures of the nf4 crate.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../nf4/tests/fixtures").join(name)
}

fn nf4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nf4"))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("nf4-cli-{}-{name}", std::process::id()))
}

fn run(c: &mut Command) -> String {
    let o = c.output().expect("runs");
    assert!(o.status.success(), "{:?}: {}", c, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn inspect_lists_the_seven_projections() {
    let out = run(nf4().arg("inspect").arg("--json").arg(fixture("tiny_llama_fp4bf16.safetensors")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let q = v["quantized"].as_array().unwrap();
    assert_eq!(q.len(), 7);
    assert!(q.iter().all(|w| w["quant_type"] == "fp4" && w["nested"] == false && w["storage"].as_str().unwrap().starts_with("BF16")));
}

#[test]
fn dequantize_equals_bitsandbytes_and_copies_the_rest() {
    let out = tmp("deq.safetensors");
    run(nf4().arg("dequantize").arg(fixture("tiny_llama_nf4dq.safetensors")).arg(&out));
    let ours = std::fs::read(&out).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let refs = std::fs::read(fixture("tiny_llama_nf4dq_dequant.safetensors")).unwrap();
    let refs = safetensors::SafeTensors::deserialize(&refs).unwrap();
    let src = std::fs::read(fixture("tiny_llama_nf4dq.safetensors")).unwrap();
    let src = safetensors::SafeTensors::deserialize(&src).unwrap();
    let mut checked = 0;
    for name in ours.names() {
        let t = ours.tensor(name).unwrap();
        match refs.tensor(&format!("{name}.dequant")) {
            Ok(r) => {
                assert_eq!(t.data(), r.data(), "{name}: bitsandbytes' dequantize_4bit bytes");
                checked += 1;
            }
            Err(_) => assert_eq!(t.data(), src.tensor(name).unwrap().data(), "{name}: copied unchanged"),
        }
    }
    assert_eq!(checked, 7);
    assert!(ours.names().iter().all(|n| !n.contains("absmax") && !n.contains("quant_state")), "no quant-state leftovers");
    let _ = std::fs::remove_file(out);
}

#[test]
fn quantize_then_verify_round_trip() {
    let (deq, req) = (tmp("rt-deq.safetensors"), tmp("rt-req.safetensors"));
    run(nf4().arg("dequantize").arg(fixture("tiny_llama_nf4dq.safetensors")).arg(&deq));
    let out = run(nf4().arg("quantize").arg(&deq).arg(&req).args(["--type", "fp4", "--blocksize", "32", "--storage", "bf16"]));
    assert!(out.contains("7 of 12 tensors quantized"), "{out}");
    run(nf4().arg("verify").arg(&req));
    let ck = nf4::Checkpoint::open(&req).unwrap();
    let w = ck.quantized_weights().unwrap();
    assert_eq!(w.len(), 7);
    assert!(!w.iter().any(|n| n.contains("embed") || n.contains("lm_head") || n.contains("norm")));
    let q = ck.read(&w[0]).unwrap();
    assert_eq!((q.state.quant_type, q.state.blocksize, q.state.storage.dtype), (nf4::QuantType::Fp4, 32, safetensors::Dtype::BF16));
    // Quantizing a file that already holds 4-bit weights is refused, not doubled.
    let again = nf4().arg("quantize").arg(&req).arg(tmp("never.safetensors")).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds 7 4-bit weights"));
    let _ = (std::fs::remove_file(deq), std::fs::remove_file(req));
}

#[test]
fn bad_paths_name_the_file() {
    let o = nf4().args(["inspect", "/nonexistent/model.safetensors"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.safetensors"));
    let junk = tmp("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let o = nf4().arg("verify").arg(&junk).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("junk.safetensors") && err.contains("not a valid safetensors file"), "{err}");
    let _ = std::fs::remove_file(junk);
}
