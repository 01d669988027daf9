//! A local branch's last commits as file changes: what `--submit` publishes.
//!
//! Each commit becomes the files it writes (full content, mode, git blob id) and the
//! files it deletes, with its message, author and committer. Renames are not detected,
//! so a rename is a delete plus a write: that is all GitHub's tree API needs.
//! [`LocalSeries::base_blobs`] records, for every path the series touches, the blob the
//! base commit has there (or none): the fork's base must have the same, or the PR would
//! carry more than the patches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{Delta, DiffOptions, Repository};

use crate::submit::SubmitError;

/// A name, an e-mail and a time, as a git signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Name.
    pub name: String,
    /// E-mail.
    pub email: String,
    /// Seconds since the Unix epoch.
    pub time: i64,
    /// Offset from UTC in minutes.
    pub offset_minutes: i32,
}

impl Person {
    fn from_sig(s: &git2::Signature<'_>) -> Person {
        Person {
            name: String::from_utf8_lossy(s.name_bytes()).into_owned(),
            email: String::from_utf8_lossy(s.email_bytes()).into_owned(),
            time: s.when().seconds(),
            offset_minutes: s.when().offset_minutes(),
        }
    }

    /// The time as ISO 8601 with its offset, `2026-10-09T12:00:00+02:00` (`Z` for UTC),
    /// the form GitHub's commit API takes.
    pub fn iso8601(&self) -> String {
        let local = self.time + i64::from(self.offset_minutes) * 60;
        let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let clock = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
        match self.offset_minutes {
            0 => format!("{clock}Z"),
            o => format!("{clock}{}{:02}:{:02}", if o < 0 { '-' } else { '+' }, o.abs() / 60, o.abs() % 60),
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// What a commit does to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file's new content.
    Write {
        /// Git file mode: `0o100644`, `0o100755` or `0o120000` (symlink).
        mode: u32,
        /// The git blob id of `content` (GitHub must answer the same for the upload).
        blob: String,
        /// The bytes.
        content: Vec<u8>,
    },
    /// The file is removed.
    Delete,
}

/// One path a commit changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Path from the repository root, `/`-separated.
    pub path: String,
    /// What happens to it.
    pub change: Change,
}

/// One local commit.
#[derive(Debug, Clone)]
pub struct SeriesCommit {
    /// Its local id.
    pub local: String,
    /// The full message.
    pub message: String,
    /// Author.
    pub author: Person,
    /// Committer.
    pub committer: Person,
    /// The paths it changes, in path order.
    pub changes: Vec<FileChange>,
}

impl SeriesCommit {
    /// The message's first line.
    pub fn subject(&self) -> &str {
        self.message.lines().next().unwrap_or("")
    }
}

/// The last commits of a local branch, oldest first, and the commit they sit on.
#[derive(Debug, Clone)]
pub struct LocalSeries {
    /// The checkout.
    pub repo: PathBuf,
    /// The branch's short name, `fix/1559-vlm-data-collator`.
    pub branch: String,
    /// The commit under the first one.
    pub base: String,
    /// For every path the series touches: the base commit's blob there, if any.
    pub base_blobs: BTreeMap<String, Option<String>>,
    /// The commits, oldest first.
    pub commits: Vec<SeriesCommit>,
}

fn git(what: impl Into<String>) -> impl FnOnce(git2::Error) -> SubmitError {
    let what = what.into();
    move |source| SubmitError::Local { what, source }
}

impl LocalSeries {
    /// Reads the last `count` commits of `branch` (each must have exactly one parent).
    pub fn read(repo_path: &Path, branch: &str, count: usize) -> Result<LocalSeries, SubmitError> {
        let repo = Repository::open(repo_path).map_err(git(format!("opening {}", repo_path.display())))?;
        let tip = repo
            .find_branch(branch, git2::BranchType::Local)
            .and_then(|b| b.get().peel_to_commit())
            .map_err(git(format!("{}: reading branch {branch}", repo_path.display())))?;
        let mut chain = vec![tip];
        for _ in 0..count {
            let c = chain.last().expect("starts with the tip");
            if c.parent_count() != 1 {
                return Err(SubmitError::Local {
                    what: format!("{branch}: commit {} has {} parents, expected one", c.id(), c.parent_count()),
                    source: git2::Error::from_str("the series must be a straight line of commits"),
                });
            }
            let p = c.parent(0).map_err(git(format!("reading the parent of {}", c.id())))?;
            chain.push(p);
        }
        chain.reverse();
        let base = chain[0].clone();
        let base_tree = base.tree().map_err(git("reading the base tree"))?;
        let mut commits = vec![];
        let mut base_blobs = BTreeMap::new();
        for pair in chain.windows(2) {
            let (parent, commit) = (&pair[0], &pair[1]);
            let (old, new) = (
                parent.tree().map_err(git("reading a parent tree"))?,
                commit.tree().map_err(git("reading a commit tree"))?,
            );
            let mut opts = DiffOptions::new();
            opts.include_typechange(true);
            let diff = repo.diff_tree_to_tree(Some(&old), Some(&new), Some(&mut opts)).map_err(git(format!("diffing {}", commit.id())))?;
            let mut changes = vec![];
            for d in diff.deltas() {
                let file = if d.status() == Delta::Deleted { d.old_file() } else { d.new_file() };
                let path = file.path().and_then(|p| p.to_str()).ok_or_else(|| SubmitError::Local {
                    what: format!("commit {}: a path is not UTF-8", commit.id()),
                    source: git2::Error::from_str("GitHub's tree API takes UTF-8 paths"),
                })?;
                let path = path.replace('\\', "/");
                let change = match d.status() {
                    Delta::Deleted => Change::Delete,
                    Delta::Added | Delta::Modified | Delta::Typechange => {
                        let mode = u32::from(file.mode());
                        if mode == 0o160000 {
                            return Err(SubmitError::Local {
                                what: format!("commit {}: {path} is a submodule", commit.id()),
                                source: git2::Error::from_str("submodules are not published"),
                            });
                        }
                        let blob = repo.find_blob(file.id()).map_err(git(format!("reading {path}")))?;
                        Change::Write { mode, blob: file.id().to_string(), content: blob.content().to_vec() }
                    }
                    other => {
                        return Err(SubmitError::Local {
                            what: format!("commit {}: {path} is {other:?}", commit.id()),
                            source: git2::Error::from_str("expected added, modified, deleted or type-changed"),
                        })
                    }
                };
                if !base_blobs.contains_key(&path) {
                    let at_base = base_tree.get_path(Path::new(&path)).ok().map(|e| e.id().to_string());
                    base_blobs.insert(path.clone(), at_base);
                }
                changes.push(FileChange { path, change });
            }
            changes.sort_by(|a, b| a.path.cmp(&b.path));
            commits.push(SeriesCommit {
                local: commit.id().to_string(),
                message: String::from_utf8_lossy(commit.message_bytes()).into_owned(),
                author: Person::from_sig(&commit.author()),
                committer: Person::from_sig(&commit.committer()),
                changes,
            });
        }
        Ok(LocalSeries { repo: repo_path.to_path_buf(), branch: branch.to_string(), base: base.id().to_string(), base_blobs, commits })
    }

    /// The last commit's local id.
    pub fn head(&self) -> &str {
        self.commits.last().map(|c| c.local.as_str()).unwrap_or(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_dates() {
        let p = |time, offset_minutes| Person { name: String::new(), email: String::new(), time, offset_minutes };
        assert_eq!(p(0, 0).iso8601(), "1970-01-01T00:00:00Z");
        assert_eq!(p(1_700_000_000, 60).iso8601(), "2023-11-14T23:13:20+01:00");
        assert_eq!(p(1_709_208_000, -330).iso8601(), "2024-02-29T06:30:00-05:30");
        assert_eq!(p(-1, 0).iso8601(), "1969-12-31T23:59:59Z");
    }
}
