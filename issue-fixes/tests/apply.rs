//! git2 patch application and the PR draft, on a small upstream made here.

use std::path::{Path, PathBuf};

use git2::{Repository, Signature};
use issue_fixes::apply::{apply_series, base_commit, head_name, read_series, repo_from_release, series_on_branch, undo_series, upstream_version, ApplyError, RELEASE_TAG};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("issue-fixes-apply-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An "extracted release": unsloth/_version.py and one module.
fn release(dir: &Path) {
    std::fs::create_dir_all(dir.join("unsloth")).unwrap();
    std::fs::write(dir.join("unsloth/_version.py"), "__version__ = \"2026.10.9\"\n").unwrap();
    std::fs::write(dir.join("unsloth/attn.py"), "def pick(cc):\n    if cc[0] >= 12:\n        return \"sdpa\"\n    return \"xformers\"\n").unwrap();
}

const PATCH_1: &str = "Probe instead of disabling by capability\n\nRun one forward at sm_120 and keep xformers if it works.\n---\ndiff --git a/unsloth/attn.py b/unsloth/attn.py\n--- a/unsloth/attn.py\n+++ b/unsloth/attn.py\n@@ -1,4 +1,4 @@\n def pick(cc):\n-    if cc[0] >= 12:\n+    if cc[0] >= 12 and not probe():\n         return \"sdpa\"\n     return \"xformers\"\n";
const PATCH_2: &str = "Add the probe\n---\ndiff --git a/unsloth/probe.py b/unsloth/probe.py\nnew file mode 100644\n--- /dev/null\n+++ b/unsloth/probe.py\n@@ -0,0 +1,2 @@\n+def probe():\n+    return True\n";

fn series(dir: &Path, patches: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, p) in patches.iter().enumerate() {
        std::fs::write(dir.join(format!("{:04}-p.patch", i + 1)), p).unwrap();
    }
}

fn sig() -> Signature<'static> {
    Signature::now("test", "test@localhost").unwrap()
}

#[test]
fn applies_a_series_one_commit_per_patch_on_a_new_branch() {
    let root = tmp("ok");
    release(&root.join("rel"));
    repo_from_release(&root.join("rel"), &root.join("up"), "2026.10.9").unwrap();
    assert_eq!(upstream_version(&root.join("up")).as_deref(), Some("2026.10.9"));
    series(&root.join("patches"), &[PATCH_1, PATCH_2]);
    let patches = read_series(&root.join("patches")).unwrap();
    assert_eq!(patches[0].subject(), "Probe instead of disabling by capability");
    let ids = apply_series(&root.join("up"), "fix/4631-attention", &patches, &sig()).unwrap();
    assert_eq!(ids.len(), 2);
    let repo = Repository::open(root.join("up")).unwrap();
    assert_eq!(repo.head().unwrap().shorthand().ok(), Some("fix/4631-attention"));
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    assert_eq!(head.summary().ok().flatten(), Some("Add the probe"));
    assert_eq!(head.parent(0).unwrap().summary().ok().flatten(), Some("Probe instead of disabling by capability"));
    assert!(std::fs::read_to_string(root.join("up/unsloth/attn.py")).unwrap().contains("and not probe()"));
    assert!(root.join("up/unsloth/probe.py").exists(), "working tree updated too");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_dirty_checkout_is_refused_and_left_alone() {
    let root = tmp("dirty");
    release(&root.join("rel"));
    repo_from_release(&root.join("rel"), &root.join("up"), "2026.10.9").unwrap();
    std::fs::write(root.join("up/notes.txt"), "mine").unwrap();
    series(&root.join("patches"), &[PATCH_1]);
    let e = apply_series(&root.join("up"), "fix/x", &read_series(&root.join("patches")).unwrap(), &sig()).unwrap_err();
    assert!(matches!(e, ApplyError::Dirty { .. }), "{e}");
    assert!(e.to_string().contains("notes.txt"));
    let repo = Repository::open(root.join("up")).unwrap();
    assert!(repo.find_branch("fix/x", git2::BranchType::Local).is_err(), "no branch was made");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_patch_that_does_not_apply_names_file_and_hunk_and_changes_nothing() {
    let root = tmp("bad");
    release(&root.join("rel"));
    repo_from_release(&root.join("rel"), &root.join("up"), "2026.10.9").unwrap();
    let stale = PATCH_1.replace("-    if cc[0] >= 12:", "-    if cc[0] >= 13:");
    series(&root.join("patches"), &[PATCH_2, &stale]);
    let e = apply_series(&root.join("up"), "fix/y", &read_series(&root.join("patches")).unwrap(), &sig()).unwrap_err();
    match &e {
        ApplyError::DoesNotApply { patch, file, hunk, .. } => {
            assert!(patch.ends_with("0002-p.patch"), "{patch}");
            assert_eq!(file, "unsloth/attn.py");
            assert!(hunk.starts_with("@@ -1,4 +1,4 @@"), "{hunk}");
        }
        other => panic!("{other}"),
    }
    assert!(!root.join("up/unsloth/probe.py").exists(), "the first patch was not applied either");
    let repo = Repository::open(root.join("up")).unwrap();
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    assert_eq!(head.summary().ok().flatten(), Some("unsloth 2026.10.9 (PyPI wheels, import packages)"), "HEAD is still the base");
    assert!(repo.find_branch("fix/y", git2::BranchType::Local).is_err());
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_branch_holding_the_series_is_recognised_and_an_applied_series_can_be_undone() {
    let root = tmp("again");
    release(&root.join("rel"));
    let up = root.join("up");
    repo_from_release(&root.join("rel"), &up, "2026.10.9").unwrap();
    series(&root.join("patches"), &[PATCH_1, PATCH_2]);
    let patches = read_series(&root.join("patches")).unwrap();
    assert!(series_on_branch(&up, "fix/z", &patches).unwrap().is_none(), "no branch yet");
    let before = head_name(&up).unwrap();
    assert_eq!(before, "refs/heads/master");
    let ids = apply_series(&up, "fix/z", &patches, &sig()).unwrap();
    assert_eq!(series_on_branch(&up, "fix/z", &patches).unwrap(), Some(ids), "a re-run finds the series");
    let e = series_on_branch(&up, "fix/z", &patches[..1]).unwrap_err();
    assert!(matches!(e, ApplyError::BranchHoldsOther { .. }), "{e}");
    assert!(e.to_string().contains("Add the probe"), "{e}");

    undo_series(&up, "fix/z", &before).unwrap();
    assert_eq!(head_name(&up).unwrap(), before);
    assert!(!up.join("unsloth/probe.py").exists(), "the working tree is back too");
    assert!(!std::fs::read_to_string(up.join("unsloth/attn.py")).unwrap().contains("probe"));
    let repo = Repository::open(&up).unwrap();
    assert!(repo.find_branch("fix/z", git2::BranchType::Local).is_err(), "the branch is gone");
    issue_fixes::apply::ensure_clean(&repo).unwrap();
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_second_series_starts_from_the_release_not_from_the_first() {
    let root = tmp("second");
    release(&root.join("rel"));
    let up = root.join("up");
    repo_from_release(&root.join("rel"), &up, "2026.10.9").unwrap();
    series(&root.join("a"), &[PATCH_1, PATCH_2]);
    apply_series(&up, "fix/a", &read_series(&root.join("a")).unwrap(), &sig()).unwrap();
    // A series that adds its own file, applied while fix/a is checked out.
    const OTHER: &str = "Add notes\n---\ndiff --git a/unsloth/notes.py b/unsloth/notes.py\nnew file mode 100644\n--- /dev/null\n+++ b/unsloth/notes.py\n@@ -0,0 +1 @@\n+NOTES = 1\n";
    series(&root.join("b"), &[OTHER]);
    let ids = apply_series(&up, "fix/b", &read_series(&root.join("b")).unwrap(), &sig()).unwrap();
    let repo = Repository::open(&up).unwrap();
    let b = repo.find_commit(ids[0]).unwrap();
    assert_eq!(b.parent(0).unwrap().summary().ok().flatten(), Some("unsloth 2026.10.9 (PyPI wheels, import packages)"), "fix/b sits on the release");
    assert!(b.tree().unwrap().get_path(Path::new("unsloth/probe.py")).is_err(), "fix/a's file is not in fix/b");
    assert!(up.join("unsloth/notes.py").exists() && !up.join("unsloth/probe.py").exists(), "the working tree is fix/b's");
    assert!(!std::fs::read_to_string(up.join("unsloth/attn.py")).unwrap().contains("probe"));
    assert_eq!(repo.head().unwrap().shorthand().ok(), Some("fix/b"));
    issue_fixes::apply::ensure_clean(&repo).unwrap();
    // Both branches are still recognised by a re-run.
    assert!(series_on_branch(&up, "fix/a", &read_series(&root.join("a")).unwrap()).unwrap().is_some());
    assert!(series_on_branch(&up, "fix/b", &read_series(&root.join("b")).unwrap()).unwrap().is_some());
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn an_untagged_checkout_of_an_older_run_gets_its_release_tagged() {
    let root = tmp("untagged");
    release(&root.join("rel"));
    let up = root.join("up");
    repo_from_release(&root.join("rel"), &up, "2026.10.9").unwrap();
    series(&root.join("a"), &[PATCH_1]);
    apply_series(&up, "fix/a", &read_series(&root.join("a")).unwrap(), &sig()).unwrap();
    let repo = Repository::open(&up).unwrap();
    repo.find_reference(&format!("refs/tags/{RELEASE_TAG}")).unwrap().delete().unwrap();
    // Without the tag the base is HEAD (fix/a), as in a checkout made elsewhere ...
    assert_eq!(base_commit(&repo).unwrap().summary().ok().flatten(), Some("Probe instead of disabling by capability"));
    // ... until repo_from_release finds the existing checkout and tags its first commit.
    repo_from_release(&root.join("rel"), &up, "2026.10.9").unwrap();
    assert_eq!(base_commit(&repo).unwrap().summary().ok().flatten(), Some("unsloth 2026.10.9 (PyPI wheels, import packages)"));
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn pr_draft_text() {
    let root = tmp("draft");
    series(&root.join("patches"), &[PATCH_1, PATCH_2]);
    let patches = read_series(&root.join("patches")).unwrap();
    let b = issue_fixes::find("vlm-data-collator").unwrap();
    let (title, body) = issue_fixes::draft::pr_text(b, &patches, &no_checks(), "Measured on an H100: ...");
    insta::assert_snapshot!("draft", format!("# {title}\n\n{body}"));
    let _ = std::fs::remove_dir_all(root);
}

/// A report with no check in it (the draft's verification records are tested in verify.rs).
fn no_checks() -> issue_fixes::verify::Report {
    issue_fixes::verify::Report { manifest: "verify.json".into(), machine: "test".into(), no_verify: false, records: vec![], device_commands: vec![] }
}
