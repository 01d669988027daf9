//! The registry holds together, and every claim is backed by the committed evidence run.

use std::collections::HashSet;
use std::path::Path;

use issue_fixes::{check, find, registry, Evidence, Package, Status, PINNED};

#[test]
fn slugs_are_unique_and_entries_complete() {
    let mut seen = HashSet::new();
    for b in registry() {
        assert!(seen.insert(b.slug), "duplicate slug {}", b.slug);
        assert!(!b.issues.is_empty() || !b.prs.is_empty(), "{}: no upstream reference", b.slug);
        assert!(!b.evidence.is_empty(), "{}: a status needs evidence", b.slug);
        assert_eq!(b.status == Status::Solved, b.open.is_empty(), "{}: `open` is empty exactly when solved", b.slug);
    }
    assert_eq!(registry().len(), 8, "the eight bounties");
    assert!(find("attention-refactor").is_some() && find("nope").is_none());
}

#[test]
fn every_claim_is_backed_by_the_committed_verification() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("upstream-{PINNED}.json"));
    let text = std::fs::read_to_string(&path).expect("run `cargo xtask pr --verify-upstream` and commit its output");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["pinned"], PINNED);
    for b in registry() {
        let entry = v["bounties"].as_array().unwrap().iter().find(|e| e["slug"] == b.slug).unwrap_or_else(|| panic!("{} not verified", b.slug));
        let outcomes = entry["outcomes"].as_array().unwrap();
        for e in b.evidence {
            let o = outcomes
                .iter()
                .find(|o| o["needle"] == e.needle && o["file"] == format!("{}:{}", e.package.pypi(), e.path))
                .unwrap_or_else(|| panic!("{}: evidence {:?} in {} was never run: rerun --verify-upstream", b.slug, e.needle, e.path));
            assert_eq!(o["result"], "found", "{}: {:?} not found in {}", b.slug, e.needle, e.path);
        }
    }
}

#[test]
fn checks_tell_found_absent_and_missing_apart() {
    let dir = std::env::temp_dir().join(format!("issue-fixes-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("unsloth")).unwrap();
    std::fs::write(dir.join("unsloth/x.py"), "def select_attention_backend():\n    pass\n").unwrap();
    let e = |path, needle| Evidence { package: Package::Unsloth, path, needle, shows: "" };
    assert_eq!(check(&dir, &e("unsloth/x.py", "def select_attention_backend")).result, "found");
    assert_eq!(check(&dir, &e("unsloth/x.py", "def other")).result, "absent");
    assert_eq!(check(&dir, &e("unsloth/y.py", "anything")).result, "no such file");
    let _ = std::fs::remove_dir_all(dir);
}
