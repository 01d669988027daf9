//! `cargo xtask pr`: the Unsloth bounties (registry in the issue-fixes crate).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use issue_fixes::{registry, Status, PINNED};

use crate::{root, run};

pub fn pr(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None | Some("--list") => list(),
        Some("--verify-upstream") => verify_upstream(),
        Some(slug) => {
            let Some(b) = issue_fixes::find(slug) else {
                let known: Vec<&str> = registry().iter().map(|b| b.slug).collect();
                bail!("unknown bounty `{slug}`; the known ones are: {}", known.join(", "));
            };
            let upstream = args.iter().position(|a| a == "--upstream").map(|i| args.get(i + 1).map(PathBuf::from));
            if args.iter().any(|a| a == "--submit") {
                bail!("--submit is not built yet (octocrab draft PRs, tested against a mock GitHub API): the draft stays local");
            }
            apply_and_draft(b, upstream.map(|u| u.context("--upstream needs a path")).transpose()?)
        }
    }
}

/// Applies the bounty's patch series on a branch of the upstream checkout and drafts the PR.
fn apply_and_draft(b: &issue_fixes::Bounty, upstream: Option<PathBuf>) -> Result<()> {
    use issue_fixes::apply::{apply_series, read_series, repo_from_release, upstream_version};
    let dir = root().join("issue-fixes/patches").join(b.slug);
    if !dir.is_dir() {
        bail!(
            "`{}` ({:?} in unsloth {PINNED}): no patch series in {} yet. What is open: {}",
            b.slug,
            b.status,
            dir.display(),
            if b.open.is_empty() { "nothing (solved upstream)" } else { b.open }
        );
    }
    let patches = read_series(&dir)?;
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
    let name = std::env::var("GIT_AUTHOR_NAME").unwrap_or_else(|_| "qlora-kit".into());
    let email = std::env::var("GIT_AUTHOR_EMAIL").unwrap_or_else(|_| "qlora-kit@localhost".into());
    let sig = git2::Signature::now(&name, &email)?;
    let commits = apply_series(&repo, &branch, &patches, &sig)?;
    let (title, body) = issue_fixes::draft::pr_text(b, &patches, &verification);
    let out = root().join("target/pr").join(b.slug);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("PR.md"), format!("# {title}\n\n{body}"))?;
    for p in &patches {
        std::fs::copy(&p.path, out.join(p.path.file_name().context("patch name")?))?;
    }
    println!("{}: branch {branch} with {} commit(s); PR draft in {}", repo.display(), commits.len(), out.display());
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
