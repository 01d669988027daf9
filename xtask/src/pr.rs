//! `cargo xtask pr`: the Unsloth bounties (registry in the issue-fixes crate).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use issue_fixes::apply::undo_series;
use issue_fixes::series::LocalSeries;
use issue_fixes::submit::{dry_run, submit, upstream_for, Config, PrText};
use issue_fixes::token::{Token, TOKEN_VAR};
use issue_fixes::{registry, Status, PINNED};

use crate::{root, run};

pub fn pr(args: &[String]) -> Result<()> {
    pr_with(args, std::env::var_os(TOKEN_VAR), &root().join("issue-fixes/patches"), &root().join("target/pr"))
}

/// What `pr SLUG` was asked to do.
#[derive(Debug, Default)]
struct SlugOptions {
    upstream: Option<PathBuf>,
    submit: bool,
    dry_run: bool,
    base: Option<String>,
    api: Option<String>,
}

impl SlugOptions {
    fn parse(args: &[String]) -> Result<SlugOptions> {
        let mut o = SlugOptions::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str, what: &str| it.next().cloned().with_context(|| format!("{flag} needs {what}"));
            match a.as_str() {
                "--upstream" => o.upstream = Some(PathBuf::from(value("--upstream", "a path")?)),
                "--base" => o.base = Some(value("--base", "a branch name")?),
                "--api" => o.api = Some(value("--api", "a URL")?),
                "--submit" => o.submit = true,
                "--dry-run" => o.dry_run = true,
                other => bail!("unexpected `{other}`: pr SLUG [--upstream PATH] [--submit [--dry-run] [--base BRANCH] [--api URL]]"),
            }
        }
        if !o.submit && (o.dry_run || o.base.is_some() || o.api.is_some()) {
            bail!("--dry-run, --base and --api go with --submit");
        }
        Ok(o)
    }
}

/// `pr` with the token variable's value and the folders passed in (tests use their own).
fn pr_with(args: &[String], token_var: Option<OsString>, patches: &Path, out: &Path) -> Result<()> {
    match args.first().map(String::as_str) {
        None | Some("--list") => list(),
        Some("--verify-upstream") => verify_upstream(),
        Some(slug) => {
            let Some(b) = issue_fixes::find(slug) else {
                let known: Vec<&str> = registry().iter().map(|b| b.slug).collect();
                bail!("unknown bounty `{slug}`; the known ones are: {}", known.join(", "));
            };
            let opts = SlugOptions::parse(&args[1..])?;
            // The token first: without one, nothing is read, written or sent.
            let token = match opts.submit && !opts.dry_run {
                true => Some(Token::from_var(token_var).map_err(|e| anyhow!("{e}; the checkout was not touched"))?),
                false => None,
            };
            let applied = apply_and_draft(b, &patches.join(b.slug), opts.upstream.clone(), &out.join(b.slug))?;
            if !opts.submit {
                return Ok(());
            }
            let outcome = publish(&applied, &opts, token.as_ref());
            match outcome {
                Err(e) if applied.created => {
                    // Leave the checkout as it was before this run.
                    undo_series(&applied.repo, &applied.branch, &applied.before).with_context(|| {
                        format!("{e:#}\nand undoing the local branch {} failed", applied.branch)
                    })?;
                    bail!(
                        "{e:#}\n{}: branch {} removed, the checkout is back on {} as before; the draft stays in {}",
                        applied.repo.display(),
                        applied.branch,
                        applied.before,
                        out.join(b.slug).display()
                    )
                }
                other => other,
            }
        }
    }
}

/// A series applied (or found already applied) on a branch, and its PR text.
struct Applied {
    repo: PathBuf,
    branch: String,
    commits: usize,
    /// Whether this run made the branch (so a failure later removes it).
    created: bool,
    /// Where HEAD was before.
    before: String,
    /// The repository the pull request goes to.
    target: issue_fixes::Package,
    text: PrText,
}

/// Applies the bounty's patch series on a branch of the upstream checkout (or finds it
/// there from an earlier run) and drafts the PR into `out`.
fn apply_and_draft(b: &issue_fixes::Bounty, dir: &Path, upstream: Option<PathBuf>, out: &Path) -> Result<Applied> {
    use issue_fixes::apply::{apply_series, head_name, read_series, repo_from_release, series_on_branch, upstream_version};
    if !dir.is_dir() {
        bail!(
            "`{}` ({:?} in unsloth {PINNED}): no patch series in {} yet. What is open: {}",
            b.slug,
            b.status,
            dir.display(),
            if b.open.is_empty() { "nothing (solved upstream)" } else { b.open }
        );
    }
    let patches = read_series(dir)?;
    let verification = std::fs::read_to_string(dir.join("VERIFICATION.md"))
        .with_context(|| format!("{}: every series needs VERIFICATION.md (how the fix was checked, with numbers)", dir.display()))?;
    let repo = match upstream {
        Some(p) => {
            let found = upstream_version(&p).unwrap_or_else(|| "unknown (no unsloth/_version.py)".into());
            if found != PINNED {
                return Err(issue_fixes::apply::ApplyError::WrongVersion {
                    repo: p.display().to_string(),
                    found,
                    expected: PINNED.into(),
                }
                .into());
            }
            p
        }
        None => {
            let repo = root().join(format!("target/pr-upstream/unsloth-{PINNED}"));
            repo_from_release(&pinned_release()?, &repo, PINNED)?;
            repo
        }
    };
    let number = b.issues.first().or(b.prs.first()).copied().unwrap_or(0);
    let branch = format!("fix/{number}-{}", b.slug);
    let before = head_name(&repo)?;
    let (commits, created) = match series_on_branch(&repo, &branch, &patches)? {
        Some(ids) => {
            println!("{}: branch {branch} already holds the series ({} commit(s)), reused", repo.display(), ids.len());
            (ids.len(), false)
        }
        None => {
            let name = std::env::var("GIT_AUTHOR_NAME").unwrap_or_else(|_| "qlora-kit".into());
            let email = std::env::var("GIT_AUTHOR_EMAIL").unwrap_or_else(|_| "qlora-kit@localhost".into());
            let sig = git2::Signature::now(&name, &email)?;
            (apply_series(&repo, &branch, &patches, &sig)?.len(), true)
        }
    };
    let (title, body) = issue_fixes::draft::pr_text(b, &patches, &verification);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("PR.md"), format!("# {title}\n\n{body}"))?;
    for p in &patches {
        std::fs::copy(&p.path, out.join(p.path.file_name().context("patch name")?))?;
    }
    println!("{}: branch {branch} with {commits} commit(s); PR draft in {}", repo.display(), out.display());
    Ok(Applied { repo, branch, commits, created, before, target: b.repo, text: PrText { title, body } })
}

/// `--submit`: publishes the branch to the fork and opens the draft PR, or with
/// `--dry-run` prints the requests that would be made.
fn publish(a: &Applied, opts: &SlugOptions, token: Option<&Token>) -> Result<()> {
    let series = LocalSeries::read(&a.repo, &a.branch, a.commits)?;
    let mut cfg = Config::new(upstream_for(&series, a.target)?);
    if let Some(base) = &opts.base {
        cfg.base = base.clone();
    }
    if let Some(api) = &opts.api {
        cfg.api = api.trim_end_matches('/').to_string();
    }
    if opts.dry_run {
        for line in dry_run(&series, &cfg, &a.text) {
            println!("{line}");
        }
        return Ok(());
    }
    let token = token.context("--submit without --dry-run needs the token")?;
    let done = submit(&series, &cfg, &a.text, token, &mut |line| println!("{line}"))?;
    println!("draft PR #{}: {}", done.pr_number, done.pr_url);
    Ok(())
}

fn list() -> Result<()> {
    println!("Unsloth bounties, status in unsloth / unsloth_zoo {PINNED} (evidence: cargo xtask pr --verify-upstream)\n");
    for b in registry() {
        let refs: Vec<String> =
            b.issues.iter().map(|i| format!("#{i}")).chain(b.prs.iter().map(|p| format!("PR #{p}"))).collect();
        let status = match b.status {
            Status::Solved => "solved upstream",
            Status::PartlyOpen => "partly open",
            Status::Open => "open",
        };
        println!("{:<24} {:<16} {}  [{}]", b.slug, status, b.title, refs.join(", "));
        if !b.open.is_empty() {
            println!("{:<24} {:<16} open: {}", "", "", b.open);
        }
    }
    Ok(())
}

/// The pinned wheels' import packages, downloaded from PyPI and extracted once, under
/// target/upstream/<version>.
fn pinned_release() -> Result<PathBuf> {
    let wheels = root().join("target/wheels");
    let dest = root().join(format!("target/upstream/{PINNED}"));
    std::fs::create_dir_all(&wheels)?;
    for pkg in ["unsloth", "unsloth_zoo"] {
        let have = std::fs::read_dir(&wheels)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&format!("{pkg}-{PINNED}-")));
        if !have {
            run(Command::new("python3")
                .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
                .arg(&wheels)
                .arg(format!("{pkg}=={PINNED}")))
            .with_context(|| format!("downloading {pkg}=={PINNED} from PyPI"))?;
        }
    }
    if !dest.exists() {
        // Only the import packages: the unsloth wheel is mostly a web UI.
        run(Command::new("python3").arg("-c").arg(
            "import sys, zipfile, glob\n\
             for w in glob.glob(sys.argv[1] + '/unsloth*-' + sys.argv[3] + '-*.whl'):\n\
             \x20   z = zipfile.ZipFile(w)\n\
             \x20   [z.extract(n, sys.argv[2]) for n in z.namelist() if n.startswith(('unsloth/', 'unsloth_zoo/'))]\n",
        ).arg(&wheels).arg(&dest).arg(PINNED))?;
    }
    Ok(dest)
}

fn verify_upstream() -> Result<()> {
    let results = issue_fixes::verify(&pinned_release()?);
    let mut failed = 0;
    for (slug, outcomes) in &results {
        for o in outcomes {
            println!("{:<24} {:<12} {} contains {:?}", slug, o.result, o.file, o.needle);
            failed += (o.result != "found") as usize;
        }
    }
    let json = serde_json::json!({
        "pinned": PINNED,
        "source": "PyPI wheels unsloth and unsloth_zoo, import packages only",
        "bounties": results.iter().map(|(slug, o)| serde_json::json!({"slug": slug, "outcomes": o})).collect::<Vec<_>>(),
    });
    let out = root().join(format!("issue-fixes/upstream-{PINNED}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("\nwrote {}", out.display());
    if failed > 0 {
        bail!("{failed} check(s) not found: the registry's claims and the pinned release disagree");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    /// A clean upstream at the pinned version, a one-patch series for `attention-refactor`.
    fn setup(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-pr-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rel/unsloth")).unwrap();
        std::fs::write(d.join("rel/unsloth/_version.py"), format!("__version__ = \"{PINNED}\"\n")).unwrap();
        std::fs::write(d.join("rel/unsloth/attn.py"), "def pick():\n    return \"sdpa\"\n").unwrap();
        issue_fixes::apply::repo_from_release(&d.join("rel"), &d.join("up"), PINNED).unwrap();
        let p = d.join("patches/attention-refactor");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("VERIFICATION.md"), "Checked by a test.\n").unwrap();
        std::fs::write(
            p.join("0001-pick.patch"),
            "Pick flash\n---\ndiff --git a/unsloth/attn.py b/unsloth/attn.py\n--- a/unsloth/attn.py\n+++ b/unsloth/attn.py\n@@ -1,2 +1,2 @@\n def pick():\n-    return \"sdpa\"\n+    return \"flash\"\n",
        )
        .unwrap();
        d
    }

    fn run(d: &Path, a: &[&str], token: Option<&str>) -> Result<()> {
        let up = d.join("up").display().to_string();
        let mut all = args(&["attention-refactor", "--upstream", &up]);
        all.extend(args(a));
        pr_with(&all, token.map(OsString::from), &d.join("patches"), &d.join("out"))
    }

    fn branches(d: &Path) -> Vec<String> {
        let repo = git2::Repository::open(d.join("up")).unwrap();
        let list = repo.branches(Some(git2::BranchType::Local)).unwrap();
        list.map(|b| b.unwrap().0.name().unwrap().unwrap_or("").to_string()).collect()
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_message() {
        let e = pr_with(&args(&["nope"]), None, Path::new("/nonexistent"), Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(e.contains("unknown bounty `nope`") && e.contains("attention-refactor"), "{e}");
        let e = pr_with(&args(&["windows", "--dry-run"]), None, Path::new("/x"), Path::new("/x")).unwrap_err().to_string();
        assert!(e.contains("go with --submit"), "{e}");
        let e = pr_with(&args(&["windows", "--push"]), None, Path::new("/x"), Path::new("/x")).unwrap_err().to_string();
        assert!(e.contains("unexpected `--push`"), "{e}");
    }

    #[test]
    fn submit_without_a_token_fails_before_touching_anything() {
        let d = setup("no-token");
        for token in [None, Some(""), Some("  \n")] {
            let e = run(&d, &["--submit"], token).unwrap_err().to_string();
            assert!(e.contains("GITHUB_TOKEN") && e.contains("not touched"), "{e}");
        }
        assert_eq!(branches(&d), ["master"]);
        assert!(!d.join("out").exists(), "not even the draft");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_network_failure_leaves_the_checkout_as_it_was() {
        let d = setup("down");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let api = format!("http://127.0.0.1:{port}");
        let e = run(&d, &["--submit", "--api", &api], Some("ghp_xtaskSECRET")).unwrap_err();
        let shown = format!("{e:#}");
        assert!(shown.contains(&format!("no answer from the GitHub API at {api}")), "{shown}");
        assert!(shown.contains("back on refs/heads/master"), "{shown}");
        assert!(!shown.contains("ghp_xtaskSECRET"), "{shown}");
        assert_eq!(branches(&d), ["master"]);
        let repo = git2::Repository::open(d.join("up")).unwrap();
        issue_fixes::apply::ensure_clean(&repo).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("up/unsloth/attn.py")).unwrap(), "def pick():\n    return \"sdpa\"\n");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn dry_run_needs_no_token_and_a_rerun_reuses_the_branch() {
        let d = setup("dry");
        run(&d, &["--submit", "--dry-run"], None).unwrap();
        assert_eq!(branches(&d), ["fix/4286-attention-refactor", "master"]);
        assert!(d.join("out/attention-refactor/PR.md").exists());
        run(&d, &[], None).unwrap();
        run(&d, &["--submit", "--dry-run", "--base", "dev"], None).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }
}
