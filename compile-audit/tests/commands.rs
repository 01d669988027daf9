//! `diff`, `parity` and `run` on the real fixtures.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_compile-audit"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("compile-audit-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn diff_clean_against_breaks() {
    let a = compile_audit::audit_paths(&[fixture("clean.log")]).unwrap();
    let b = compile_audit::audit_paths(&[fixture("breaks.log")]).unwrap();
    let d = compile_audit::diff::diff(&a, &b);
    assert!(compile_audit::diff::diff(&a, &a).is_empty());
    assert!(d.breaks.iter().all(|c| c.a == 0 && c.b == 3), "{:?}", d.breaks);
    insta::assert_snapshot!("diff_clean_breaks", compile_audit::diff::markdown(&d));
}

#[test]
fn parity_passes_equal_runs_and_fails_a_drift() {
    let ok = exe().arg("parity").arg(fixture("breaks_losses.jsonl")).arg(fixture("breaks_losses.jsonl")).output().unwrap();
    assert!(ok.status.success());
    let dir = tmp("parity");
    let drifted = dir.join("compiled.jsonl");
    let text = std::fs::read_to_string(fixture("breaks_losses.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut v: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    v["loss"] = (v["loss"].as_f64().unwrap() * 1.01).into();
    lines[2] = v.to_string();
    std::fs::write(&drifted, lines.join("\n")).unwrap();
    let bad = exe().arg("parity").arg(fixture("breaks_losses.jsonl")).arg(&drifted).args(["--rtol", "1e-3"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("FAIL step 2"));
    std::fs::write(&drifted, "{\"step\": 0}\n").unwrap();
    let broken = exe().arg("parity").arg(&drifted).arg(&drifted).output().unwrap();
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("compiled.jsonl:1"), "names the file and line");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_points_torch_trace_at_a_fresh_folder_and_gates() {
    let dir = tmp("run");
    let src = fixture("clean.log");
    let cmd = format!("cp '{}' \"$TORCH_TRACE/rank0.log\"", src.display());
    let out = exe().arg("run").arg("--trace-dir").arg(&dir).args(["--max-graph-breaks", "0", "--", "sh", "-c", &cmd]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(dir.join("rank0.log").exists());
    let failing = exe().arg("run").arg("--trace-dir").arg(&dir).args(["--", "sh", "-c", "exit 7"]).output().unwrap();
    assert_eq!(failing.status.code(), Some(7), "the command's own failure wins");
    let _ = std::fs::remove_dir_all(dir);
}
