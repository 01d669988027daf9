//! The auditor on real traces captured on the GPU machine (torch 2.11, H100) by
//! `compile-audit/py/capture_traces.py`, trimmed by `trim_trace.py`:
//! - clean: a transformer block, fullgraph, fixed shapes;
//! - breaks: print + .item() branch, shapes changing with dynamic=False up to the
//!   recompile limit (3);
//! - qlora_gc: 2-layer Llama shape, bitsandbytes NF4 + PEFT LoRA, gradient checkpointing.
//!
//! And one from the QLoRA compile recipe's GPU runs (`recipe/runs/recipe-layers-16.tar.gz`,
//! config `sdpa`, compiled; H100, torch 2.11): recipe_sdpa_restart, regional compile of a
//! 16-layer NF4 + LoRA Llama, 4 compiled frames, the decoder layer's trace restarted once.
//! Trimmed from that (already `trim_trace.py`-trimmed) trace by dropping the bulky
//! `inductor_config` key from its 4 `compilation_metrics` records (they carry no payload);
//! every other line is verbatim, payload checksums intact.

use std::path::PathBuf;

use compile_audit::gate::Gate;
use compile_audit::{audit_paths, render, Report};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn audit(names: &[&str]) -> Report {
    let paths: Vec<PathBuf> = names.iter().map(|n| fixture(n)).collect();
    audit_paths(&paths).expect("fixtures are readable")
}

/// Report text without the machine-specific fixture paths.
fn md(r: &Report) -> String {
    let mut r = r.clone();
    r.sources = r.sources.iter().map(|s| s.rsplit('/').next().unwrap_or(s).to_string()).collect();
    r.issues.iter_mut().for_each(|i| i.what = i.what.rsplit('/').next().unwrap_or(&i.what).to_string());
    render::markdown(&r)
}

#[test]
fn clean_run_has_one_graph_and_nothing_else() {
    let r = audit(&["clean.log", "clean_torch_logs.txt"]);
    assert_eq!((r.graph_breaks, r.recompiles, r.graphs, r.fallbacks.len()), (0, 0, 1, 0));
    assert_eq!(r.issue_count, 0, "{:?}", r.issues);
    assert!(r.captured.matches("scaled_dot_product_attention"));
    assert!(r.captured.matches("qkv"), "module paths from parameter inputs: {:?}", r.captured.modules);
    assert_eq!(r.logs.as_ref().map(|l| l.graph_breaks), Some(0));
    insta::assert_snapshot!("clean", md(&r));
}

#[test]
fn breaks_and_recompiles_up_to_the_limit() {
    let r = audit(&["breaks.log", "breaks_torch_logs.txt"]);
    assert_eq!(r.graph_breaks, 6);
    let ids: Vec<_> = r.breaks.iter().filter_map(|b| b.registry_id.clone()).collect();
    assert_eq!(ids, ["GB0059", "GB0124"]);
    assert!(r.breaks[0].location.as_deref().unwrap().ends_with("capture_traces.py:41"));
    assert!(!r.breaks[0].hints.is_empty() && r.breaks[0].explanation.is_some());
    // 0/1, 0/2, 0/3 (refused by the limit), 1/1, 1/2, 2/1, 2/2: as many as TORCH_LOGS printed.
    assert_eq!(r.recompiles, 7);
    assert_eq!(r.logs.as_ref().map(|l| l.recompiles), Some(7));
    assert!(r.recompile_reasons.iter().any(|rc| rc.reasons.iter().any(|s| s.contains("size mismatch at index 1"))));
    assert_eq!(r.recompile_limit_hits(), 1);
    assert_eq!(r.fallbacks[0].frame, "forward");
    assert_eq!(r.logs.as_ref().map(|l| l.recompile_limit_hits), Some(1));
    insta::assert_snapshot!("breaks", md(&r));
}

#[test]
fn qlora_gradient_checkpointing_breaks_on_requires_grad() {
    let r = audit(&["qlora_gc.log"]);
    // The stock measurement (ARCHITECTURE.md): 5 breaks, "Unsupported Tensor.requires_grad_() call".
    assert_eq!(r.graph_breaks, 5);
    assert!(r.breaks.iter().all(|b| b.kind == "Unsupported Tensor.requires_grad_() call" && b.registry_id.as_deref() == Some("GB0125")));
    assert_eq!(r.fallbacks.len(), 3, "frames skipped after the break run eager");
    // The user stack: the training script, PEFT, transformers; not dynamo's interpreter.
    let stack = &r.breaks[0].stack;
    assert_eq!(stack.last().map(String::as_str), Some("transformers/modeling_utils.py:2141 in make_inputs_require_grads"));
    assert!(stack.iter().any(|f| f.starts_with("peft/")) && !stack.iter().any(|f| f.contains("symbolic_convert")), "{stack:?}");
    // What ran inside graphs: the LoRA projections and the 4-bit linear's forward.
    for p in ["q_proj", "lora_A", "bitsandbytes"] {
        assert!(r.captured.matches(p), "{p} not captured: {:?}", r.captured.user_functions.keys().collect::<Vec<_>>());
    }
    insta::assert_snapshot!("qlora_gc", md(&r));
}

/// The trace text without one record (its JSON line and its payload lines).
fn without_record(text: &str, record_line_contains: &[&str]) -> String {
    let mut out = String::new();
    let (mut dropping, mut dropped) = (false, 0);
    for l in text.split_inclusive('\n') {
        if !l.starts_with('\t') {
            dropping = record_line_contains.iter().all(|p| l.contains(p));
            dropped += usize::from(dropping);
        }
        if !dropping {
            out.push_str(l);
        }
    }
    assert_eq!(dropped, 1, "exactly one record matches {record_line_contains:?}");
    out
}

fn audit_text(text: &str) -> Report {
    let mut a = compile_audit::Auditor::new();
    compile_audit::feed_trace(&mut a, "mem", text.as_bytes());
    a.finish()
}

#[test]
fn a_restarted_trace_is_not_an_extra_graph() {
    let text = std::fs::read_to_string(fixture("recipe_sdpa_restart.log")).expect("fixture");
    // The trace logs 5 graphs: compile id 0/0 (the decoder layer) once per attempt.
    assert_eq!(text.lines().filter(|l| l.contains("] {\"dynamo_output_graph\"")).count(), 5);
    let r = audit_text(&text);
    assert_eq!(r.issue_count, 0, "{:?}", r.issues);
    // 4 compiled frames (decoder layer, final norm, LM head, loss), one compile each: 4 graphs.
    assert_eq!(r.frames.len(), 4);
    assert!(r.frames.iter().all(|f| f.compiles.len() == 1));
    assert_eq!((r.graphs, r.graph_breaks, r.recompiles), (4, 0, 0));
    // The restart is reported on its own, with its reason.
    assert_eq!((r.restarts, r.superseded_graphs, r.restarted.len()), (1, 1, 1));
    let rs = &r.restarted[0];
    assert_eq!((rs.compile_id.as_str(), rs.frame.as_str(), rs.attempts, rs.superseded_graphs), ("0/0", "forward", 2, 1));
    assert_eq!(rs.reasons, ["<class 'torch._dynamo.exc.TensorifyScalarRestartAnalysis'>"]);
    assert_eq!(r.frames[0].compiles[0].superseded_graphs, 1);

    // Only the installed (last) attempt's graph counts, in graphs and in what was captured:
    // without attempt 0's record the report is the same; without attempt 1's it is not.
    let no_first = audit_text(&without_record(&text, &["{\"dynamo_output_graph\"", "\"frame_id\": 0, \"frame_compile_id\": 0, \"attempt\": 0,"]));
    let no_last = audit_text(&without_record(&text, &["{\"dynamo_output_graph\"", "\"frame_id\": 0, \"frame_compile_id\": 0, \"attempt\": 1,"]));
    assert_eq!((no_first.graphs, no_first.superseded_graphs, no_first.restarts), (4, 0, 1));
    assert_eq!(no_first.captured.ops, r.captured.ops);
    assert_eq!(no_first.captured.user_functions, r.captured.user_functions);
    assert_eq!(no_first.captured.modules, r.captured.modules);
    assert_eq!(no_last.graphs, 4);
    // Attempt 0 read attention dropout and scale with `.item()`; the restart specialized them.
    let items = |r: &Report| r.captured.ops.get("Tensor.item").copied().unwrap_or(0);
    assert_eq!(items(&no_last), items(&r) + 2);
    // One decoder layer graph: each LoRA projection's ops appear once, not once per attempt.
    assert_eq!(r.captured.ops.get("torch.ops.bitsandbytes.dequantize_4bit.default"), Some(&7));

    // What the recipe's gate requires is captured by the installed graphs alone.
    for p in ["bitsandbytes.dequantize_4bit", "lora_A", "lora_B", "autograd_function_apply", "scaled_dot_product_attention",
        "mlp.down_proj", "silu", "input_layernorm", "rsqrt", "cross_entropy", "ForCausalLMLoss"]
    {
        assert!(r.captured.matches(p), "{p} not captured");
    }
    let table = render::table(&r);
    assert!(table.starts_with("graph breaks 0 | unique 0 | recompiles 0 | graphs 4 |"), "{table}");
    assert!(table.contains("restart   0/0    forward: 2 attempts, 1 graph(s) discarded"), "{table}");
    insta::assert_snapshot!("recipe_sdpa_restart", md(&r));
}

#[test]
fn html_page_is_self_contained_and_escaped() {
    let r = audit(&["breaks.log", "breaks_torch_logs.txt"]);
    let h = compile_audit::render::html(&r);
    assert!(h.starts_with("<!doctype html>") && h.trim_end().ends_with("</html>"));
    assert!(!h.contains("<script") && !h.contains("http-equiv"), "no scripts");
    assert!(!h.contains("http://") , "no external assets");
    assert_eq!(h.matches("<table>").count(), h.matches("</table>").count());
    assert!(h.contains("GB0059") && h.contains("recompile limit: Dynamo recompile limit exceeded"));
    // Text from the trace is escaped: the reason "['str']" contains quotes, `<module>` angle brackets.
    assert!(h.contains("&lt;module&gt;"), "stack frames like <module> are escaped");
}

#[test]
fn gate_passes_clean_and_fails_each_rule() {
    let clean = audit(&["clean.log"]);
    let strict = Gate { max_graph_breaks: Some(0), max_recompiles: Some(0), require_captured: vec!["scaled_dot_product".into()] };
    assert!(strict.check(&clean).is_empty());
    let v = strict.check(&audit(&["breaks.log"]));
    let checks: Vec<&str> = v.iter().map(|x| x.check.as_str()).collect();
    assert_eq!(checks, ["max-graph-breaks", "max-recompiles", "recompile-limit"]);
    assert!(v[0].explanation.contains("GB0059") && v[0].explanation.contains("hint:"));
    let missing = Gate { require_captured: vec!["flex_attention".into()], ..Default::default() }.check(&clean);
    assert_eq!(missing.len(), 1);
    assert!(missing[0].explanation.contains("flex_attention"));
}

#[test]
fn cli_gate_exit_status() {
    let exe = env!("CARGO_BIN_EXE_compile-audit");
    let ok = std::process::Command::new(exe)
        .args(["gate", "--max-graph-breaks", "0", "--max-recompiles", "0"])
        .arg(fixture("clean.log"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let bad = std::process::Command::new(exe).args(["gate", "--max-graph-breaks", "0"]).arg(fixture("breaks.log")).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(out.contains("gate: FAIL max-graph-breaks") && out.contains("gate: FAIL recompile-limit"), "{out}");
    let json = std::process::Command::new(exe).args(["report", "--format", "json"]).arg(fixture("breaks.log")).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--format json is JSON");
    assert_eq!(v["graph_breaks"], 6);
    let missing = std::process::Command::new(exe).args(["report", "/nonexistent/trace"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/trace"));
}
