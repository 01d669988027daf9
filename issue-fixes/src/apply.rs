//! Applying a bounty's patch series to an upstream checkout, one commit per patch.
//!
//! A patch file is a commit message (first line: the subject) followed by a unified diff
//! starting at the first `diff --git` line, the way `git format-patch` bodies read.
//! Patches live in `issue-fixes/patches/<slug>/`, applied in file-name order.
//!
//! Safety rules: the checkout must be clean (nothing staged, modified or untracked), and
//! every patch is first checked against the tree the previous ones produce; if one does
//! not apply, nothing is written and the error names the patch, file and hunk.
//!
//! Every series starts from the release: in a checkout made by [`repo_from_release`] that is
//! the commit tagged [`RELEASE_TAG`], whatever branch an earlier series left checked out (one
//! checkout serves every bounty); in any other checkout, HEAD.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use git2::{ApplyLocation, ApplyOptions, Diff, Repository, Signature, StatusOptions};

/// Why a series could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading a patch or the checkout failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A git operation failed.
    #[error("{what}: {source}")]
    Git {
        /// What we were doing.
        what: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// The checkout has uncommitted changes.
    #[error("{repo}: the checkout is not clean ({files} changed or untracked file(s), e.g. `{example}`): commit or stash first; nothing was changed")]
    Dirty {
        /// The checkout.
        repo: String,
        /// How many files.
        files: usize,
        /// One of them.
        example: String,
    },
    /// A patch file has no diff.
    #[error("{patch}: no `diff --git` section")]
    NoDiff {
        /// The patch file.
        patch: String,
    },
    /// A patch does not apply.
    #[error("{patch} does not apply to {file}, hunk `{hunk}`: {source}; nothing was changed")]
    DoesNotApply {
        /// The patch file.
        patch: String,
        /// The file it was patching.
        file: String,
        /// The hunk header it failed at (the last one attempted).
        hunk: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
    /// The branch exists with other commits than the series.
    #[error("{repo}: branch {branch} exists and does not hold this series ({why}); delete or rename it; nothing was changed")]
    BranchHoldsOther {
        /// The checkout.
        repo: String,
        /// The branch.
        branch: String,
        /// The first difference.
        why: String,
    },
    /// The upstream checkout is not the pinned release.
    #[error("{repo}: upstream is unsloth {found}, expected {expected}; nothing was changed")]
    WrongVersion {
        /// The checkout.
        repo: String,
        /// Version found in `unsloth/_version.py`.
        found: String,
        /// The pinned version.
        expected: String,
    },
}

fn git(what: impl Into<String>) -> impl FnOnce(git2::Error) -> ApplyError {
    let what = what.into();
    move |source| ApplyError::Git { what, source }
}

/// One patch of a series.
#[derive(Debug, Clone)]
pub struct Patch {
    /// Its file.
    pub path: PathBuf,
    /// The commit message.
    pub message: String,
    /// The unified diff.
    pub diff: String,
}

impl Patch {
    /// The message's first line.
    pub fn subject(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }
}

/// Reads the `*.patch` files of a folder, in name order.
pub fn read_series(dir: &Path) -> Result<Vec<Patch>, ApplyError> {
    let io = |source| ApplyError::Io { path: dir.display().to_string(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| ApplyError::Io { path: path.display().to_string(), source })?;
            let at = text.find("\ndiff --git ").map(|i| i + 1).or_else(|| text.starts_with("diff --git ").then_some(0));
            let Some(at) = at else { return Err(ApplyError::NoDiff { patch: path.display().to_string() }) };
            let message = text[..at].trim_end_matches(['\n', '-']).trim().to_string();
            Ok(Patch { path, message, diff: text[at..].to_string() })
        })
        .collect()
}

/// The unsloth version of a checkout (`unsloth/_version.py`), if it has one.
pub fn upstream_version(repo: &Path) -> Option<String> {
    let text = std::fs::read_to_string(repo.join("unsloth/_version.py")).ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("__version__"))?;
    Some(line.split(['"', '\'']).nth(1)?.to_string())
}

/// Refuses a checkout with uncommitted or untracked files.
pub fn ensure_clean(repo: &Repository) -> Result<(), ApplyError> {
    let mut opts = StatusOptions::new();
    opts.include_untracked(true).include_ignored(false);
    let statuses = repo.statuses(Some(&mut opts)).map_err(git("reading the checkout's status"))?;
    if !statuses.is_empty() {
        return Err(ApplyError::Dirty {
            repo: repo.workdir().map(|p| p.display().to_string()).unwrap_or_default(),
            files: statuses.len(),
            example: statuses.get(0).and_then(|s| s.path().ok().map(String::from)).unwrap_or_default(),
        });
    }
    Ok(())
}

/// Applies the series in memory on `tree`; returns the tree after each patch.
fn check_series<'r>(repo: &'r Repository, mut tree: git2::Tree<'r>, patches: &[Patch]) -> Result<Vec<git2::Tree<'r>>, ApplyError> {
    let mut out = vec![];
    for p in patches {
        let diff = Diff::from_buffer(p.diff.as_bytes()).map_err(git(format!("parsing {}", p.path.display())))?;
        let file = RefCell::new(String::new());
        let hunk = RefCell::new(String::new());
        let mut opts = ApplyOptions::new();
        opts.delta_callback(|d| {
            if let Some(d) = d {
                *file.borrow_mut() = d.new_file().path().map(|p| p.display().to_string()).unwrap_or_default();
            }
            true
        });
        opts.hunk_callback(|h| {
            if let Some(h) = h {
                *hunk.borrow_mut() = String::from_utf8_lossy(h.header()).trim().to_string();
            }
            true
        });
        let index = repo.apply_to_tree(&tree, &diff, Some(&mut opts)).map_err(|source| ApplyError::DoesNotApply {
            patch: p.path.display().to_string(),
            file: file.borrow().clone(),
            hunk: hunk.borrow().clone(),
            source,
        })?;
        drop(opts);
        let mut index = index;
        let oid = index.write_tree_to(repo).map_err(git("writing a checked tree"))?;
        tree = repo.find_tree(oid).map_err(git("reading a checked tree"))?;
        out.push(tree.clone());
    }
    Ok(out)
}

/// The tag [`repo_from_release`] puts on the release commit.
pub const RELEASE_TAG: &str = "pypi-release";

/// The commit a series starts from: the release commit tagged [`RELEASE_TAG`] in a checkout
/// made by [`repo_from_release`], HEAD in any other.
pub fn base_commit(repo: &Repository) -> Result<git2::Commit<'_>, ApplyError> {
    match repo.find_reference(&format!("refs/tags/{RELEASE_TAG}")) {
        Ok(tag) => tag.peel_to_commit().map_err(git(format!("reading tag {RELEASE_TAG}"))),
        Err(_) => repo.head().and_then(|h| h.peel_to_commit()).map_err(git("reading HEAD")),
    }
}

/// Creates `branch` at the [`base_commit`], checks every patch, then switches to the branch and
/// applies and commits them one by one. Returns the new commits' ids. On any error in the
/// check, the checkout and its branches are as before.
pub fn apply_series(repo_path: &Path, branch: &str, patches: &[Patch], author: &Signature<'_>) -> Result<Vec<git2::Oid>, ApplyError> {
    let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
    ensure_clean(&repo)?;
    let base = base_commit(&repo)?;

    // Check the whole series in memory first: each patch against the tree the previous
    // ones produce, so a failure anywhere leaves the checkout untouched.
    check_series(&repo, base.tree().map_err(git("reading the base tree"))?, patches)?;

    // All apply: now for real, on the new branch at the base, one commit per patch. The
    // checkout is clean, so replacing the working tree with the base's loses nothing.
    let br = repo.branch(branch, &base, false).map_err(git(format!("creating branch {branch}")))?;
    let refname = br.get().name().unwrap_or_default().to_string();
    let mut co = git2::build::CheckoutBuilder::new();
    co.force();
    repo.checkout_tree(base.as_object(), Some(&mut co)).map_err(git("checking out the base"))?;
    repo.set_head(&refname).map_err(git(format!("switching to {branch}")))?;
    let mut parent = base;
    let mut out = vec![];
    for p in patches {
        let diff = Diff::from_buffer(p.diff.as_bytes()).map_err(git(format!("parsing {}", p.path.display())))?;
        repo.apply(&diff, ApplyLocation::Both, None).map_err(git(format!("applying {}", p.path.display())))?;
        let mut index = repo.index().map_err(git("reading the index"))?;
        let tree_id = index.write_tree().map_err(git("writing the tree"))?;
        let tree = repo.find_tree(tree_id).map_err(git("reading the tree"))?;
        let id = repo
            .commit(Some("HEAD"), author, author, &p.message, &tree, &[&parent])
            .map_err(git(format!("committing {}", p.path.display())))?;
        parent = repo.find_commit(id).map_err(git("reading the new commit"))?;
        out.push(id);
    }
    Ok(out)
}

/// Where HEAD points: its ref name (`refs/heads/main`), or the commit id when detached.
/// [`undo_series`] takes it back there.
pub fn head_name(repo_path: &Path) -> Result<String, ApplyError> {
    let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
    let head = repo.head().map_err(git("reading HEAD"))?;
    Ok(match head.name() {
        Ok(name) if head.is_branch() => name.to_string(),
        _ => head.peel_to_commit().map_err(git("reading HEAD"))?.id().to_string(),
    })
}

/// Whether `branch` already holds the series: `None` when there is no such branch,
/// the commits (oldest first) when its last `patches.len()` commits are the patches
/// applied one by one to the commit under them (same messages, same trees), and
/// [`ApplyError::BranchHoldsOther`] otherwise. Lets `cargo xtask pr` run again.
pub fn series_on_branch(repo_path: &Path, branch: &str, patches: &[Patch]) -> Result<Option<Vec<git2::Oid>>, ApplyError> {
    let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
    let Ok(br) = repo.find_branch(branch, git2::BranchType::Local) else { return Ok(None) };
    let other = |why: String| ApplyError::BranchHoldsOther { repo: repo_path.display().to_string(), branch: branch.to_string(), why };
    let mut chain = vec![br.get().peel_to_commit().map_err(git(format!("reading {branch}")))?];
    for _ in patches {
        let c = chain.last().expect("starts with the tip");
        let parent = c.parent(0).map_err(|_| other(format!("it has fewer than {} commits", patches.len())))?;
        chain.push(parent);
    }
    chain.reverse();
    for (c, p) in chain[1..].iter().zip(patches) {
        let message = String::from_utf8_lossy(c.message_bytes());
        if message.trim() != p.message.trim() {
            return Err(other(format!("commit {} is `{}`, expected `{}`", c.id(), message.lines().next().unwrap_or(""), p.subject())));
        }
    }
    let base_tree = chain[0].tree().map_err(git("reading the base tree"))?;
    let trees = check_series(&repo, base_tree, patches)
        .map_err(|_| other(format!("the series does not apply to the commit under its messages, {}", chain[0].id())))?;
    for ((c, p), t) in chain[1..].iter().zip(patches).zip(&trees) {
        if c.tree_id() != t.id() {
            return Err(other(format!("commit {} ({}) has other changes than {}", c.id(), p.subject(), p.path.display())));
        }
    }
    Ok(Some(chain[1..].iter().map(|c| c.id()).collect()))
}

/// Undoes [`apply_series`]: the working tree and HEAD back at `previous` (from
/// [`head_name`], taken before), then `branch` deleted. Only for a branch this run made:
/// the checkout was clean before, so nothing of the user's is overwritten.
pub fn undo_series(repo_path: &Path, branch: &str, previous: &str) -> Result<(), ApplyError> {
    let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
    let target = match git2::Oid::from_str(previous) {
        Ok(id) if !previous.starts_with("refs/") => repo.find_commit(id),
        _ => repo.find_reference(previous).and_then(|r| r.peel_to_commit()),
    }
    .map_err(git(format!("reading {previous}")))?;
    let mut co = git2::build::CheckoutBuilder::new();
    co.force();
    repo.checkout_tree(target.as_object(), Some(&mut co)).map_err(git(format!("checking out {previous}")))?;
    if previous.starts_with("refs/") {
        repo.set_head(previous)
    } else {
        repo.set_head_detached(target.id())
    }
    .map_err(git(format!("switching back to {previous}")))?;
    repo.find_branch(branch, git2::BranchType::Local)
        .and_then(|mut b| b.delete())
        .map_err(git(format!("deleting branch {branch}")))?;
    Ok(())
}

/// Writes the files of `branch`'s tip into `dest` (emptied first), without touching the
/// checkout's working tree, index or HEAD: the patched source a fix's checks run in, whatever
/// branch the checkout has out.
pub fn export_branch(repo_path: &Path, branch: &str, dest: &Path) -> Result<(), ApplyError> {
    let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
    let tip = repo
        .find_branch(branch, git2::BranchType::Local)
        .and_then(|b| b.get().peel_to_commit())
        .map_err(git(format!("reading branch {branch}")))?;
    let io = |source| ApplyError::Io { path: dest.display().to_string(), source };
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io)?;
    }
    std::fs::create_dir_all(dest).map_err(io)?;
    let mut co = git2::build::CheckoutBuilder::new();
    co.force().target_dir(dest);
    repo.checkout_tree(tip.as_object(), Some(&mut co)).map_err(git(format!("writing {branch}'s files to {}", dest.display())))?;
    Ok(())
}

/// Makes a git repository from an extracted release: one commit, tagged [`RELEASE_TAG`], that
/// every series starts from. Unless `dest` already is one: then only tags its first commit when
/// an older version of this function left it untagged.
pub fn repo_from_release(src: &Path, dest: &Path, version: &str) -> Result<(), ApplyError> {
    if dest.join(".git").exists() {
        let repo = Repository::open(dest).map_err(git(format!("opening {}", dest.display())))?;
        if repo.find_reference(&format!("refs/tags/{RELEASE_TAG}")).is_err() {
            let mut walk = repo.revwalk().map_err(git("walking the history"))?;
            walk.push_head().map_err(git("walking from HEAD"))?;
            walk.simplify_first_parent().map_err(git("walking the history"))?;
            let root = walk.last().ok_or_else(|| git("finding the first commit")(git2::Error::from_str("no commits")))?;
            let root = repo.find_commit(root.map_err(git("walking the history"))?).map_err(git("reading the first commit"))?;
            repo.tag_lightweight(RELEASE_TAG, root.as_object(), false).map_err(git(format!("tagging {RELEASE_TAG}")))?;
        }
        return Ok(());
    }
    copy_tree(src, dest)?;
    let repo = Repository::init(dest).map_err(git(format!("init {}", dest.display())))?;
    let mut index = repo.index().map_err(git("index"))?;
    index.add_all(["*"].iter(), git2::IndexAddOption::DEFAULT, None).map_err(git("adding the release's files"))?;
    index.write().map_err(git("writing the index"))?;
    let tree = repo.find_tree(index.write_tree().map_err(git("tree"))?).map_err(git("tree"))?;
    let sig = Signature::now("qlora-kit", "qlora-kit@localhost").map_err(git("signature"))?;
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, &format!("unsloth {version} (PyPI wheels, import packages)"), &tree, &[])
        .map_err(git("base commit"))?;
    let commit = repo.find_commit(id).map_err(git("reading the base commit"))?;
    repo.tag_lightweight(RELEASE_TAG, commit.as_object(), false).map_err(git(format!("tagging {RELEASE_TAG}")))?;
    Ok(())
}

fn copy_tree(src: &Path, dest: &Path) -> Result<(), ApplyError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| ApplyError::Io { path: p, source }
    };
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    for e in std::fs::read_dir(src).map_err(io(src))?.flatten() {
        let to = dest.join(e.file_name());
        if e.path().is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to).map_err(io(&to))?;
        }
    }
    Ok(())
}
