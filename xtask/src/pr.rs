//! `cargo xtask pr`: the Unsloth bounties (registry in the issue-fixes crate).

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
            bail!(
                "`{slug}` ({:?} in unsloth {PINNED}): no patch series yet. This step of the work built the registry and \
                 the upstream verification (`cargo xtask pr --verify-upstream`); applying patches with git2 and drafting \
                 the PR come next. What is open: {}",
                b.status,
                if b.open.is_empty() { "nothing (solved upstream)" } else { b.open }
            )
        }
    }
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

fn verify_upstream() -> Result<()> {
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
    let results = issue_fixes::verify(&dest);
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
