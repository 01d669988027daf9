//! The committed patch series (`issue-fixes/patches/<slug>/`) are what `cargo xtask pr`
//! expects: a known slug, patches git2 can parse, and a VERIFICATION.md. A series that only
//! adds files is also applied, here, to a release holding nothing but `unsloth/_version.py`.

use std::path::{Path, PathBuf};

use git2::{Diff, Repository, Signature};
use issue_fixes::apply::{apply_series, read_series, repo_from_release};
use issue_fixes::{find, PINNED};

fn series_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("patches");
    let Ok(entries) = std::fs::read_dir(&root) else { return vec![] };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs
}

#[test]
fn every_series_parses_and_has_its_verification() {
    for dir in series_dirs() {
        let slug = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(find(&slug).is_some(), "{}: no bounty with slug `{slug}` in the registry", dir.display());
        let patches = read_series(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!patches.is_empty(), "{}: no *.patch files", dir.display());
        for p in &patches {
            assert!(!p.subject().trim().is_empty(), "{}: empty subject", p.path.display());
            Diff::from_buffer(p.diff.as_bytes()).unwrap_or_else(|e| panic!("{}: git2 cannot parse the diff: {e}", p.path.display()));
        }
        let verification = std::fs::read_to_string(dir.join("VERIFICATION.md")).unwrap_or_default();
        assert!(verification.trim().len() > 100, "{}: VERIFICATION.md missing or empty", dir.display());
    }
}

#[test]
fn series_that_only_add_files_apply_one_commit_per_patch() {
    for dir in series_dirs() {
        let patches = read_series(&dir).unwrap();
        // Only new files: then no upstream content is needed to apply them.
        if !patches.iter().all(|p| p.diff.lines().filter(|l| l.starts_with("--- ")).all(|l| l == "--- /dev/null")) {
            continue;
        }
        let tmp = std::env::temp_dir().join(format!("issue-fixes-series-{}-{}", std::process::id(), dir.file_name().unwrap().to_string_lossy()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("rel/unsloth")).unwrap();
        std::fs::write(tmp.join("rel/unsloth/_version.py"), format!("__version__ = \"{PINNED}\"\n")).unwrap();
        repo_from_release(&tmp.join("rel"), &tmp.join("up"), PINNED).unwrap();
        let sig = Signature::now("test", "test@localhost").unwrap();
        let ids = apply_series(&tmp.join("up"), "fix/test", &patches, &sig).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_eq!(ids.len(), patches.len());
        let repo = Repository::open(tmp.join("up")).unwrap();
        let head = repo.head().unwrap().peel_to_commit().unwrap();
        assert_eq!(head.summary().ok().flatten(), patches.last().map(|p| p.subject()));
        // Every added file is in the working tree with the patch's lines.
        for p in &patches {
            for path in p.diff.lines().filter_map(|l| l.strip_prefix("+++ b/")) {
                let text = std::fs::read_to_string(tmp.join("up").join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
                let added = p.diff.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).count();
                assert!(text.lines().count() > 0 && added >= text.lines().count(), "{path}: {} lines, the patch adds {added}", text.lines().count());
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
