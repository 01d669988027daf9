//! A fix's verification: the committed manifests, bad manifests, and checks that pass, fail
//! and are skipped (tiny shell commands, no pytest), run as `cargo xtask pr` runs them.

use std::path::{Path, PathBuf};

use issue_fixes::verify::{run_checks, Context, Machine, Manifest, ManifestError, Outcome, Report, Source};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("issue-fixes-verify-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("tree")).unwrap();
    std::fs::create_dir_all(d.join("out")).unwrap();
    d
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn no_gpu() -> Machine {
    Machine { python: "python3".into(), gpu: None }
}

fn run(d: &Path, manifest: &str, machine: &Machine, gpu_results: Option<&Path>, no_verify: bool) -> Report {
    let m = Manifest::parse(manifest, &d.join("verify.json")).unwrap();
    let cx = Context { repo: d, tree: &d.join("tree"), out: &d.join("out"), machine, gpu_results, no_verify };
    let mut lines = vec![];
    let r = run_checks(&m, &cx, &mut |l| lines.push(l.to_string()));
    assert_eq!(lines.len(), 2 * (m.cpu.len() + m.gpu.len()), "a line as each check starts and ends: {lines:?}");
    r
}

#[test]
fn every_committed_series_has_a_manifest_that_parses() {
    let patches = repo_root().join("issue-fixes/patches");
    let mut seen = 0;
    for dir in std::fs::read_dir(&patches).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let m = Manifest::read(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(!m.cpu.is_empty(), "{}: no CPU check", m.path.display());
        for g in &m.gpu {
            for path in g.carry.iter().chain(std::iter::once(&g.recorded)) {
                assert!(!path.starts_with('/'), "{}: `{path}` must be relative to the repository root", m.path.display());
            }
            let script = g.run.split_whitespace().nth(1).unwrap_or("");
            assert!(repo_root().join(script).is_file(), "{}: the device command runs `{script}`, which is not in the repository", m.path.display());
        }
        seen += 1;
    }
    assert!(seen >= 3, "the three series");
}

#[test]
fn the_committed_gpu_runs_show_what_each_series_claims() {
    // Read as a draft reads them on a machine with no GPU: every GPU check of every series
    // has a committed run, and every fact holds there.
    for dir in std::fs::read_dir(repo_root().join("issue-fixes/patches")).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let mut m = Manifest::read(&dir).unwrap();
        m.cpu.clear();
        let d = tmp(&format!("committed-{}", dir.file_name().unwrap().to_string_lossy()));
        let cx = Context { repo: &repo_root(), tree: &d.join("tree"), out: &d.join("out"), machine: &no_gpu(), gpu_results: None, no_verify: false };
        let report = run_checks(&m, &cx, &mut |_| {});
        for r in &report.records {
            assert_eq!(r.outcome, Outcome::Passed, "{}: {} {:?} {:#?}", dir.display(), r.name, r.reason, r.facts);
            assert_eq!(r.source, Source::GpuRecorded);
            let run = r.run.as_ref().unwrap();
            assert!(run.card.starts_with("NVIDIA H100"), "{}: card {:?}", dir.display(), run.card);
            assert_eq!(run.date.len(), 10, "{run:?}");
        }
        assert_eq!(report.device_commands.len(), m.gpu.len(), "the device commands are printed for each GPU check");
        let _ = std::fs::remove_dir_all(d);
    }
}

fn field_error(text: &str) -> (String, String) {
    match Manifest::parse(text, Path::new("patches/x/verify.json")).unwrap_err() {
        ManifestError::Field { file, field, problem } => {
            assert_eq!(file, "patches/x/verify.json");
            (field, problem)
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_bad_manifest_names_the_file_and_the_field() {
    let e = Manifest::parse("{\"cpu\": [", Path::new("patches/x/verify.json")).unwrap_err().to_string();
    assert!(e.starts_with("patches/x/verify.json: not valid JSON") && e.contains("line 1"), "{e}");
    let e = Manifest::read(Path::new("/nonexistent/series")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/series/verify.json: "), "{e}");

    assert_eq!(field_error(r#"{"cpu": [{"name": "x"}]}"#), ("cpu[0].run".into(), "missing (a bash command)".into()));
    assert_eq!(field_error(r#"{"cpu": [{"name": "x", "run": ["pytest"]}]}"#).0, "cpu[0].run");
    assert_eq!(field_error(r#"{"cpu": [{"name": "x", "run": "true", "timeout": 5}]}"#).0, "cpu[0].timeout");
    assert_eq!(field_error(r#"{"cpu": [{"name": "x", "run": "true", "timeout_s": 0}]}"#).0, "cpu[0].timeout_s");
    assert_eq!(field_error(r#"{"cpu": [{"name": "x", "run": "true", "needs": {"python": "torch"}}]}"#).0, "cpu[0].needs.python");
    assert_eq!(field_error(r#"{"cpu": [{"name": "x", "run": "true", "env": {"A": 1}}]}"#).0, "cpu[0].env.A");
    assert_eq!(field_error("{}").1, "no checks: a series needs at least one CPU or GPU check");
    let gpu = |fact: &str| format!(r#"{{"gpu": [{{"name": "g", "run": "bash x.sh", "recorded": "r", "card": {{"file": "a", "line": 1}}, "facts": [{fact}]}}]}}"#);
    assert_eq!(field_error(&gpu(r#"{"label": "l", "file": "a", "pointer": "/x"}"#)).0, "gpu[0].facts[0].expect");
    assert_eq!(field_error(&gpu(r#"{"label": "l", "file": "a", "pointer": "/x", "expect": {}}"#)).0, "gpu[0].facts[0].expect");
    assert_eq!(field_error(&gpu(r#"{"label": "l", "file": "a", "pointer": "/x", "expect": {"at_least": "1"}}"#)).0, "gpu[0].facts[0].expect.at_least");
    assert_eq!(field_error(&gpu(r#"{"label": "l", "file": "a", "pointer": "x", "expect": {"equals": "1"}}"#)).0, "gpu[0].facts[0].pointer");
    let (field, problem) = field_error(&gpu(r#"{"label": "l", "file": "a", "pointer": "/x", "line": 2, "expect": {"equals": "1"}}"#));
    assert_eq!((field.as_str(), problem.as_str()), ("gpu[0].facts[0]", "give exactly one of `pointer`, `line_with`, `line`"));
    assert_eq!(field_error(r#"{"gpu": [{"name": "g", "run": "x", "recorded": "r", "facts": []}]}"#).0, "gpu[0].card");
}

const CHECKS: &str = r#"{
  "cpu": [
    {"name": "passes", "run": "touch \"$OUT/ran\"; cat input.txt; echo '3 passed in 0.01s'", "summary": ["passed", "failed"]},
    {"name": "fails", "run": "touch \"$OUT/ran\"; echo 'E   AssertionError: 1 != 2'; echo '1 failed, 2 passed in 0.02s'; exit 1", "summary": ["passed", "failed"]},
    {"name": "needs a missing tool", "run": "touch \"$OUT/ran\"", "needs": {"tools": ["qlora-kit-no-such-tool"]}},
    {"name": "needs a missing module", "run": "touch \"$OUT/ran\"", "needs": {"python": ["qlora_kit_no_such_module"]}},
    {"name": "hangs", "run": "touch \"$OUT/ran\"; sleep 30", "timeout_s": 1}
  ]
}"#;

#[test]
fn checks_pass_fail_or_are_skipped_and_nothing_passes_without_running() {
    let d = tmp("cpu");
    std::fs::write(d.join("tree/input.txt"), "the patched tree\n").unwrap();
    let report = run(&d, CHECKS, &no_gpu(), None, false);
    let by = |name: &str| report.records.iter().find(|r| r.name == name).unwrap();
    let ran = |i: usize| d.join(format!("out/cpu-{i}/ran")).exists();

    let p = by("passes");
    assert_eq!((p.outcome, p.source, p.summary.as_deref()), (Outcome::Passed, Source::Here, Some("3 passed in 0.01s")));
    assert!(ran(1), "it ran");
    let log = std::fs::read_to_string(p.log.as_ref().unwrap()).unwrap();
    assert!(log.contains("the patched tree"), "it ran in the tree: {log}");

    let f = by("fails");
    assert_eq!(f.outcome, Outcome::Failed);
    assert_eq!(f.reason.as_deref(), Some("exit code 1 (1 failed, 2 passed in 0.02s)"));
    assert!(f.tail.as_deref().unwrap().contains("E   AssertionError: 1 != 2"));
    assert!(ran(2));

    let t = by("needs a missing tool");
    assert_eq!((t.outcome, t.reason.as_deref()), (Outcome::Skipped, Some("this machine has no qlora-kit-no-such-tool (not on PATH)")));
    assert!(!ran(3), "a skipped check never runs");

    let m = by("needs a missing module");
    assert_eq!(m.outcome, Outcome::Skipped);
    let why = m.reason.as_deref().unwrap();
    assert!(why.contains("has no qlora_kit_no_such_module") || why.contains("no Python interpreter `python3`"), "{why}");
    assert!(!ran(4));

    let h = by("hangs");
    assert_eq!((h.outcome, h.reason.as_deref()), (Outcome::Failed, Some("timed out after 1 s and was stopped")));
    assert!(h.seconds.unwrap() < 10.0);

    assert!(!report.ready());
    assert_eq!(report.failed().len(), 2);
    // Passed means it ran and exited 0: nothing else is reported as passed.
    for (i, r) in report.records.iter().enumerate() {
        if r.outcome == Outcome::Passed {
            assert!(ran(i + 1), "{} passed without running", r.name);
        }
        if r.outcome == Outcome::Skipped {
            assert!(r.log.is_none() && r.seconds.is_none() && r.reason.is_some(), "{r:?}");
        }
    }
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_missing_interpreter_skips_python_checks_and_says_so() {
    let d = tmp("nopython");
    let machine = Machine { python: "/nonexistent/bin/python3".into(), gpu: None };
    let report = run(&d, CHECKS, &machine, None, false);
    let m = report.records.iter().find(|r| r.name == "needs a missing module").unwrap();
    assert_eq!(m.outcome, Outcome::Skipped);
    assert_eq!(m.reason.as_deref(), Some("no Python interpreter `/nonexistent/bin/python3` (not on PATH or not a file)"));
    assert!(report.machine.starts_with("no Python interpreter"), "{}", report.machine);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn no_verify_runs_nothing() {
    let d = tmp("noverify");
    let report = run(&d, CHECKS, &no_gpu(), None, true);
    assert!(report.records.iter().all(|r| r.outcome == Outcome::Skipped && r.reason.as_deref() == Some("--no-verify")));
    assert!(!d.join("out/cpu-1").exists() && !d.join("out/cpu-2/ran").exists());
    assert!(!report.ready(), "an unverified draft is never ready");
    assert!(report.markdown().contains("`--no-verify`, so no check ran"));
    let _ = std::fs::remove_dir_all(d);
}

const GPU: &str = r#"{
  "gpu": [{
    "name": "kernel test on a GPU",
    "bundle": "mkdir -p bundle && echo built > bundle/stamp",
    "run": "bash run.sh",
    "carry": ["bundle"],
    "timeout_s": 120,
    "recorded": "recorded",
    "card": {"file": "gpu.txt", "line": 1},
    "facts": [
      {"label": "tests", "file": "pytest.log", "line_with": "passed", "expect": {"contains": "passed", "not_contains": "failed"}},
      {"label": "speed-up", "file": "m.json", "pointer": "/speedup", "expect": {"at_least": 1.2}}
    ]
  }]
}"#;

fn recorded(d: &Path, name: &str, card: &str, log: &str, speedup: f64) -> PathBuf {
    let r = d.join("recorded").join(name);
    std::fs::create_dir_all(&r).unwrap();
    std::fs::write(r.join("gpu.txt"), format!("{card}\nextra line\n")).unwrap();
    std::fs::write(r.join("pytest.log"), log).unwrap();
    std::fs::write(r.join("m.json"), format!("{{\"speedup\": {speedup}}}")).unwrap();
    r
}

#[test]
fn without_a_gpu_the_newest_recorded_run_is_read_and_cited() {
    let d = tmp("recorded");
    let report = run(&d, GPU, &no_gpu(), None, false);
    let r = &report.records[0];
    assert_eq!((r.outcome, r.source), (Outcome::Skipped, Source::GpuRecorded));
    assert_eq!(
        r.reason.as_deref(),
        Some("no GPU here (nvidia-smi lists none) and no recorded run under recorded (one with gpu.txt): run it on the GPU machine")
    );
    assert!(report.device_commands[0].contains("here, from the repository root:  mkdir -p bundle"), "{}", report.device_commands[0]);
    assert!(
        report.device_commands[0].contains(r#"run(command="bash run.sh", carry=["bundle"], kind="nvidia-h100-x1", timeout_s=120)"#),
        "{}",
        report.device_commands[0]
    );
    assert!(!d.join("bundle").exists(), "nothing was built or run here");

    recorded(&d, "h100-2026-10-01", "NVIDIA H100 80GB HBM3", "== 4 passed in 1.0s ==\n", 1.3);
    recorded(&d, "h100-2026-11-02", "NVIDIA H100 80GB HBM3", "..\n== 5 passed in 1.2s ==\n", 1.5);
    std::fs::create_dir_all(d.join("recorded/notes")).unwrap();
    let report = run(&d, GPU, &no_gpu(), None, false);
    let r = &report.records[0];
    assert_eq!(r.outcome, Outcome::Passed, "{r:#?}");
    let run_info = r.run.as_ref().unwrap();
    assert_eq!((run_info.dir.as_str(), run_info.date.as_str(), run_info.card.as_str()), ("recorded/h100-2026-11-02", "2026-11-02", "NVIDIA H100 80GB HBM3"));
    assert_eq!(r.summary.as_deref(), Some("tests: 5 passed in 1.2s; speed-up: 1.5"));
    assert!(report.ready());

    // A run that does not show the fix fails the check, naming the fact.
    let bad = recorded(&d, "h100-2026-11-20", "NVIDIA H100 80GB HBM3", "== 1 failed, 4 passed ==\n", 1.1);
    let report = run(&d, GPU, &no_gpu(), None, false);
    let r = &report.records[0];
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.reason.as_deref(), Some("tests: expected no \"failed\"; speed-up: expected at least 1.2"));
    assert!(!report.ready());

    // --gpu-results: the user's device run instead of the recorded ones.
    std::fs::remove_dir_all(&bad).unwrap();
    let mine = d.join("files_at/run-x");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("gpu.txt"), "NVIDIA H200\n").unwrap();
    std::fs::write(mine.join("pytest.log"), "6 passed in 1s\n").unwrap();
    let report = run(&d, GPU, &no_gpu(), Some(&mine), false);
    let r = &report.records[0];
    assert_eq!(r.outcome, Outcome::Failed, "m.json is missing there");
    assert_eq!(r.reason.as_deref(), Some("speed-up: m.json: No such file or directory (os error 2)"));
    assert_eq!(r.run.as_ref().unwrap().card, "NVIDIA H200");
    assert_eq!(r.run.as_ref().unwrap().dir, "files_at/run-x");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn with_a_gpu_the_bundle_is_built_and_the_check_runs_here() {
    let d = tmp("gpu-here");
    std::fs::write(
        d.join("run.sh"),
        "test -f bundle/stamp || exit 7\necho 'NVIDIA RTX 4090' > \"$OUT/gpu.txt\"\necho '2 passed' > \"$OUT/pytest.log\"\necho '{\"speedup\": 1.25}' > \"$OUT/m.json\"\n",
    )
    .unwrap();
    let machine = Machine { python: "python3".into(), gpu: Some("GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-x)".into()) };
    let report = run(&d, GPU, &machine, None, false);
    let r = &report.records[0];
    assert_eq!((r.outcome, r.source), (Outcome::Passed, Source::GpuHere), "{r:#?}");
    assert_eq!(r.run.as_ref().unwrap().card, "NVIDIA RTX 4090");
    assert_eq!(r.run.as_ref().unwrap().dir, "out/gpu-1");
    assert!(report.device_commands.is_empty(), "it ran here");
    assert!(report.markdown().contains("| kernel test on a GPU | this machine's GPU (NVIDIA RTX 4090), now | **passed**: tests: 2 passed; speed-up: 1.25 |"));

    // A run that exits non-zero fails, with its output's end.
    std::fs::write(d.join("run.sh"), "echo 'CUDA error: no kernel image'; exit 2\n").unwrap();
    let report = run(&d, GPU, &machine, None, false);
    let r = &report.records[0];
    assert_eq!((r.outcome, r.reason.as_deref()), (Outcome::Failed, Some("exit code 2")));
    assert!(r.tail.as_deref().unwrap().contains("no kernel image"));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn the_draft_cites_what_ran_here_and_the_recorded_gpu_run() {
    let d = tmp("draft");
    std::fs::write(d.join("tree/input.txt"), "x\n").unwrap();
    recorded(&d, "h100-2026-11-26", "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB", "== 57 passed in 87s ==\n", 1.4);
    let both = format!(
        "{{\"cpu\": {}, \"gpu\": {}}}",
        &CHECKS[CHECKS.find('[').unwrap()..CHECKS.rfind(']').unwrap() + 1],
        &GPU[GPU.find('[').unwrap()..GPU.rfind(']').unwrap() + 1]
    );
    let mut report = run(&d, &both, &no_gpu(), None, false);
    // The missing-module check reads the same whether or not this machine has python3.
    report.records[3].reason = Some("`python3` (/usr/bin/python3, Python 3.12.3) has no qlora_kit_no_such_module".into());
    let patch_dir = d.join("patches");
    std::fs::create_dir_all(&patch_dir).unwrap();
    std::fs::write(
        patch_dir.join("0001-a.patch"),
        "Guard every GPU above sm_90\n\nThe condition is now a function.\n---\ndiff --git a/unsloth/a.py b/unsloth/a.py\n--- a/unsloth/a.py\n+++ b/unsloth/a.py\n@@ -1 +1 @@\n-x = 1\n+x = 2\n",
    )
    .unwrap();
    let patches = issue_fixes::apply::read_series(&patch_dir).unwrap();
    let b = issue_fixes::find("attention-refactor").unwrap();
    let (title, body) = issue_fixes::draft::pr_text(b, &patches, &report, "Measured on an H100: ...");
    insta::assert_snapshot!("draft_with_verification", format!("# {title}\n\n{body}"));
    let _ = std::fs::remove_dir_all(d);
}
