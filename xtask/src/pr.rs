//! `cargo xtask pr`: the Unsloth bounties (registry in the issue-fixes crate).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use issue_fixes::apply::undo_series;
use issue_fixes::series::LocalSeries;
use issue_fixes::submit::{dry_run, submit, upstream_for, Config, PrText};
use issue_fixes::token::{Token, TOKEN_VAR};
use issue_fixes::verify::{self, Machine, Manifest, Report};
use issue_fixes::{registry, Status, PINNED};

use crate::{root, run, target_dir};

/// `cargo xtask pr --help`.
const HELP: &str = "\
cargo xtask pr: the Unsloth bounties, their patch series, and PRs drafted from them

Usage:
  cargo xtask pr [--list]
  cargo xtask pr --verify-upstream
  cargo xtask pr SLUG [--upstream PATH] [--no-verify] [--gpu-results DIR] [--python PATH]
                      [--submit [--dry-run] [--base BRANCH] [--api URL]]
  cargo xtask pr --help | -h | help

--list (the default)
    Every bounty (SLUG, status in unsloth / unsloth_zoo 2026.10.9, what is still open).

--verify-upstream
    Downloads unsloth and unsloth_zoo at the pinned version from PyPI, checks every status
    claim against their files, writes issue-fixes/upstream-<version>.json; fails if a claim
    is not backed.

SLUG (a bounty with a series in issue-fixes/patches/SLUG/), in this order:
  1. Upstream: --upstream PATH (a clean checkout of unsloth at the pinned version), else a
     git repository made from the pinned PyPI wheels under target/pr-upstream/.
  2. Apply: the series' *.patch files with git2, one commit each, on branch
     fix/<issue>-SLUG from the release commit. Refuses a dirty checkout; a patch that does
     not apply is named with its file and hunk, and nothing is changed. A branch that
     already holds the series is reused.
  3. Verify: the checks in issue-fixes/patches/SLUG/verify.json. The branch's files are
     written to target/pr/SLUG/tree/ and the CPU checks run there, each passed, failed or
     skipped with the reason (a missing tool, or a Python module the interpreter lacks);
     nothing counts as passed unless it ran. GPU checks run here when nvidia-smi lists a GPU;
     otherwise the device commands are printed (bundle build here, then the `run` call on
     the GPU machine) and the check is read from the newest recorded run under
     issue-fixes/verify/ (or --gpu-results DIR), whose file, date and card the draft cites.
     Logs in target/pr/SLUG/verify/, records in target/pr/SLUG/verification.json.
     A failed check stops here: no draft, the branch this run made is removed, and the
     error names the check with the end of its output.
  4. Draft: target/pr/SLUG/PR.md (title; motivation, linked issues, what changed, how it
     was verified written from the records and VERIFICATION.md, checklist) and the patches.
  5. --submit: see below.

Options for SLUG:
  --upstream PATH      use this upstream checkout (clean, unsloth/_version.py = 2026.10.9)
  --no-verify          run no check and let nothing stop the draft; the draft says so
  --gpu-results DIR    read the GPU checks from this device run's files (the $OUT files a
                       `run` call brought back) instead of the recorded runs
  --python PATH        the interpreter CPU checks use (default $QLORA_KIT_PYTHON, else python3)
  --submit             with the token in GITHUB_TOKEN: fork unslothai/unsloth (or unsloth-zoo)
                       if you have no fork, publish the branch through GitHub's Git Data API
                       on top of the fork's --base branch (never a force-push) and open a
                       draft PR with the drafted text; a re-run reuses fork, branch and PR.
                       On failure the local branch this run made is removed. The token is
                       never printed.
  --dry-run            with --submit: print the requests instead (no token, no network)
  --base BRANCH        with --submit: the fork's branch to build on (default main)
  --api URL            with --submit: the API base (default $QLORA_KIT_GITHUB_API, else
                       https://api.github.com)

Example:
  cargo xtask pr attention-refactor --python ~/venv/bin/python   # apply, verify, draft
  cat target/pr/attention-refactor/PR.md target/pr/attention-refactor/verification.json
  cargo xtask pr attention-refactor --submit --dry-run      # the GitHub requests, none sent
  GITHUB_TOKEN=... cargo xtask pr attention-refactor --submit   # the draft PR, from your fork
";

pub fn pr(args: &[String]) -> Result<()> {
    let python = std::env::var("QLORA_KIT_PYTHON").ok().filter(|p| !p.trim().is_empty());
    let places = Places {
        patches: root().join("issue-fixes/patches"),
        out: target_dir().join("pr"),
        repo: root(),
        machine: Machine::detect(python),
    };
    pr_with(args, std::env::var_os(TOKEN_VAR), &places)
}

/// Where `pr SLUG` reads and writes, and the machine it runs on (tests bring their own).
struct Places {
    /// `issue-fixes/patches`.
    patches: PathBuf,
    /// `target/pr`: one folder per draft.
    out: PathBuf,
    /// The repository root: recorded GPU runs and bundles are relative to it.
    repo: PathBuf,
    /// This machine: the Python interpreter (a `--python` replaces it) and the GPU.
    machine: Machine,
}

/// What `pr SLUG` was asked to do.
#[derive(Debug, Default)]
struct SlugOptions {
    upstream: Option<PathBuf>,
    submit: bool,
    dry_run: bool,
    base: Option<String>,
    api: Option<String>,
    no_verify: bool,
    gpu_results: Option<PathBuf>,
    python: Option<String>,
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
                "--gpu-results" => o.gpu_results = Some(PathBuf::from(value("--gpu-results", "the folder of a device run's files")?)),
                "--python" => o.python = Some(value("--python", "a Python interpreter")?),
                "--no-verify" => o.no_verify = true,
                "--submit" => o.submit = true,
                "--dry-run" => o.dry_run = true,
                other => bail!(
                    "unexpected `{other}`: pr SLUG [--upstream PATH] [--no-verify] [--gpu-results DIR] [--python PATH] \
                     [--submit [--dry-run] [--base BRANCH] [--api URL]] (cargo xtask pr --help)"
                ),
            }
        }
        if !o.submit && (o.dry_run || o.base.is_some() || o.api.is_some()) {
            bail!("--dry-run, --base and --api go with --submit");
        }
        if let Some(d) = &o.gpu_results {
            if !d.is_dir() {
                bail!("--gpu-results {}: no such folder", d.display());
            }
        }
        Ok(o)
    }
}

/// `pr` with the token variable's value and the folders passed in (tests use their own).
fn pr_with(args: &[String], token_var: Option<OsString>, places: &Places) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") || args.first().is_some_and(|a| a == "help") {
        print!("{HELP}");
        return Ok(());
    }
    match args.first().map(String::as_str) {
        None | Some("--list") => list(),
        Some("--verify-upstream") => verify_upstream(),
        Some(slug) => {
            let Some(b) = issue_fixes::find(slug) else {
                let known: Vec<&str> = registry().iter().map(|b| b.slug).collect();
                bail!("unknown bounty `{slug}`; the known ones are: {} (cargo xtask pr --help)", known.join(", "));
            };
            let opts = SlugOptions::parse(&args[1..])?;
            // The token first: without one, nothing is read, written or sent.
            let token = match opts.submit && !opts.dry_run {
                true => Some(Token::from_var(token_var).map_err(|e| anyhow!("{e}; the checkout was not touched"))?),
                false => None,
            };
            let out = places.out.join(b.slug);
            let applied = apply_verify_draft(b, &places.patches.join(b.slug), &opts, places, &out)?;
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
                        out.display()
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
/// there from an earlier run), runs its checks and drafts the PR into `out`.
fn apply_verify_draft(b: &issue_fixes::Bounty, dir: &Path, opts: &SlugOptions, places: &Places, out: &Path) -> Result<Applied> {
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
    let details = std::fs::read_to_string(dir.join("VERIFICATION.md"))
        .with_context(|| format!("{}: every series needs VERIFICATION.md (how the fix was checked, with numbers)", dir.display()))?;
    // Before anything is changed: a bad manifest is an error naming the file and field.
    let manifest = Manifest::read(dir).with_context(|| format!("every series declares its checks in {}", verify::MANIFEST))?;
    let repo = match &opts.upstream {
        Some(p) => {
            let found = upstream_version(p).unwrap_or_else(|| "unknown (no unsloth/_version.py)".into());
            if found != PINNED {
                return Err(issue_fixes::apply::ApplyError::WrongVersion {
                    repo: p.display().to_string(),
                    found,
                    expected: PINNED.into(),
                }
                .into());
            }
            p.clone()
        }
        None => {
            let repo = target_dir().join(format!("pr-upstream/unsloth-{PINNED}"));
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
            let n = apply_series(&repo, &branch, &patches, &sig)?.len();
            println!("{}: branch {branch} made, {n} commit(s)", repo.display());
            (n, true)
        }
    };

    // Verify, in the branch's files (whatever the checkout has out).
    let undo = |e: anyhow::Error| -> anyhow::Error {
        if !created {
            return e;
        }
        match undo_series(&repo, &branch, &before) {
            Ok(()) => e.context(format!("{}: branch {branch} removed, the checkout is back on {before} as before", repo.display())),
            Err(u) => e.context(format!("undoing the local branch {branch} failed: {u}")),
        }
    };
    let report = verify_series(&manifest, &repo, &branch, opts, places, out).map_err(undo)?;
    let draft = out.join("PR.md");
    if !report.ready() && !opts.no_verify {
        // No draft from an earlier run may stand for this one.
        let _ = std::fs::remove_file(&draft);
        return Err(undo(anyhow!("{}", failure_text(b.slug, &report, out))));
    }

    let (title, body) = issue_fixes::draft::pr_text(b, &patches, &report, &details);
    std::fs::write(&draft, format!("# {title}\n\n{body}"))?;
    for p in &patches {
        std::fs::copy(&p.path, out.join(p.path.file_name().context("patch name")?))?;
    }
    println!("PR draft in {}{}", out.display(), if opts.no_verify { " (not verified: --no-verify)" } else { "" });
    Ok(Applied { repo, branch, commits, created, before, target: b.repo, text: PrText { title, body } })
}

/// Runs the series' checks in `out/tree` (the branch's files), logs in `out/verify`, records
/// in `out/verification.json`; prints each outcome and, for GPU checks not run here, the
/// device commands.
fn verify_series(m: &Manifest, repo: &Path, branch: &str, opts: &SlugOptions, places: &Places, out: &Path) -> Result<Report> {
    let tree = out.join("tree");
    let logs = out.join("verify");
    issue_fixes::apply::export_branch(repo, branch, &tree)?;
    if logs.exists() {
        std::fs::remove_dir_all(&logs).with_context(|| format!("clearing {}", logs.display()))?;
    }
    std::fs::create_dir_all(&logs)?;
    let mut machine = places.machine.clone();
    if let Some(p) = &opts.python {
        machine.python = p.clone();
    }
    let cx = verify::Context {
        repo: &places.repo,
        tree: &tree,
        out: &logs,
        machine: &machine,
        gpu_results: opts.gpu_results.as_deref(),
        no_verify: opts.no_verify,
    };
    println!("verifying ({}), in {}:", if opts.no_verify { "--no-verify: running nothing" } else { "checks from verify.json" }, tree.display());
    let report = verify::run_checks(m, &cx, &mut |line| println!("  {line}"));
    if !report.device_commands.is_empty() {
        println!("GPU checks not run here ({}); to run them on the GPU machine:", report.machine);
        for c in &report.device_commands {
            println!("  {}", c.replace('\n', "\n  "));
        }
    }
    let skipped = report.records.iter().filter(|r| r.outcome == verify::Outcome::Skipped).count();
    if skipped > 0 && !opts.no_verify {
        println!("{skipped} check(s) skipped (reasons above): the draft lists them as skipped, not as passed");
    }
    let json = out.join("verification.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("records in {}", json.display());
    Ok(report)
}

/// The error for a failed verification: every failed check, why, and its output's end.
fn failure_text(slug: &str, report: &Report, out: &Path) -> String {
    let failed = report.failed();
    let mut s = format!("verification of `{slug}` failed: {} of {} check(s)", failed.len(), report.records.len());
    for r in failed {
        let _ = write!(s, "\n- `{}`: {}", r.name, r.reason.as_deref().unwrap_or("failed"));
        if let Some(run) = &r.run {
            let _ = write!(s, " [run {}, {}, {}]", run.dir, run.date, run.card);
        }
        if let Some(tail) = r.tail.as_deref().filter(|t| !t.trim().is_empty()) {
            let _ = write!(s, "\n  its output ends:\n    {}", tail.replace('\n', "\n    "));
        }
        if let Some(log) = &r.log {
            let _ = write!(s, "\n  full output: {log}");
        }
    }
    let _ = write!(
        s,
        "\nNo draft was written ({} records every check). Fix it, or pass --no-verify to draft anyway (the draft then says so).",
        out.join("verification.json").display()
    );
    s
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
    let wheels = target_dir().join("wheels");
    let dest = target_dir().join(format!("upstream/{PINNED}"));
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

    /// Tests run the same with or without a GPU: this "machine" never has one.
    fn places(d: &Path) -> Places {
        Places {
            patches: d.join("patches"),
            out: d.join("out"),
            repo: d.to_path_buf(),
            machine: Machine { python: "python3".into(), gpu: None },
        }
    }

    const PASSING: &str = r#"{
  "cpu": [
    {"name": "the patch is in the tree", "run": "grep -q flash unsloth/attn.py && echo '1 passed in 0.01s'", "summary": ["passed", "failed"]},
    {"name": "needs a tool nobody has", "run": "touch \"$REPO/ran\"", "needs": {"tools": ["qlora-kit-no-such-tool"]}}
  ],
  "gpu": [
    {
      "name": "attention test on a GPU",
      "run": "bash verify/run_gpu.sh",
      "carry": ["target/dev-x"],
      "recorded": "verify/results",
      "card": {"file": "results.json", "pointer": "/gpu"},
      "facts": [{"label": "patched", "file": "results.json", "pointer": "/tests/patched", "expect": {"contains": "passed", "not_contains": "failed"}}]
    }
  ]
}"#;

    /// A clean upstream at the pinned version, a one-patch series for `attention-refactor`
    /// with `verify` as its manifest, and a recorded GPU run.
    fn setup(name: &str, verify: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-pr-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("rel/unsloth")).unwrap();
        std::fs::write(d.join("rel/unsloth/_version.py"), format!("__version__ = \"{PINNED}\"\n")).unwrap();
        std::fs::write(d.join("rel/unsloth/attn.py"), "def pick():\n    return \"sdpa\"\n").unwrap();
        issue_fixes::apply::repo_from_release(&d.join("rel"), &d.join("up"), PINNED).unwrap();
        let p = d.join("patches/attention-refactor");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("VERIFICATION.md"), "Checked by a test.\n").unwrap();
        std::fs::write(p.join("verify.json"), verify).unwrap();
        std::fs::write(
            p.join("0001-pick.patch"),
            "Pick flash\n---\ndiff --git a/unsloth/attn.py b/unsloth/attn.py\n--- a/unsloth/attn.py\n+++ b/unsloth/attn.py\n@@ -1,2 +1,2 @@\n def pick():\n-    return \"sdpa\"\n+    return \"flash\"\n",
        )
        .unwrap();
        let run = d.join("verify/results/h100-2026-11-26");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("results.json"), r#"{"gpu": "NVIDIA H100 80GB HBM3, 580.159.04\n2.11.0", "tests": {"patched": "57 passed in 87s"}}"#).unwrap();
        d
    }

    fn run(d: &Path, a: &[&str], token: Option<&str>) -> Result<()> {
        let up = d.join("up").display().to_string();
        let mut all = args(&["attention-refactor", "--upstream", &up]);
        all.extend(args(a));
        pr_with(&all, token.map(OsString::from), &places(d))
    }

    fn branches(d: &Path) -> Vec<String> {
        let repo = git2::Repository::open(d.join("up")).unwrap();
        let list = repo.branches(Some(git2::BranchType::Local)).unwrap();
        list.map(|b| b.unwrap().0.name().unwrap().unwrap_or("").to_string()).collect()
    }

    #[test]
    fn help_is_printed_for_every_spelling_and_teaches_every_form() {
        let nowhere = places(Path::new("/nonexistent"));
        for a in [&["--help"][..], &["-h"], &["help"], &["attention-refactor", "--help"], &["attention-refactor", "--submit", "-h"]] {
            pr_with(&args(a), None, &nowhere).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        }
        for needle in [
            "cargo xtask pr [--list]",
            "cargo xtask pr --verify-upstream",
            "SLUG [--upstream PATH] [--no-verify] [--gpu-results DIR] [--python PATH]",
            "[--submit [--dry-run] [--base BRANCH] [--api URL]]",
            "target/pr/SLUG/PR.md",
            "verify.json",
            "GITHUB_TOKEN",
            "Example:",
            "cargo xtask pr attention-refactor",
        ] {
            assert!(HELP.contains(needle), "the help lacks {needle:?}");
        }
        // Every flag the parser takes is in the help.
        for flag in ["--upstream", "--no-verify", "--gpu-results", "--python", "--submit", "--dry-run", "--base", "--api"] {
            assert!(HELP.contains(&format!("  {flag} ")), "{flag} is not explained");
        }
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_message() {
        let nowhere = places(Path::new("/nonexistent"));
        let e = pr_with(&args(&["nope"]), None, &nowhere).unwrap_err().to_string();
        assert!(e.contains("unknown bounty `nope`") && e.contains("attention-refactor"), "{e}");
        let e = pr_with(&args(&["windows", "--dry-run"]), None, &nowhere).unwrap_err().to_string();
        assert!(e.contains("go with --submit"), "{e}");
        let e = pr_with(&args(&["windows", "--push"]), None, &nowhere).unwrap_err().to_string();
        assert!(e.contains("unexpected `--push`") && e.contains("--help"), "{e}");
        let e = pr_with(&args(&["windows", "--gpu-results", "/nonexistent/run"]), None, &nowhere).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/run: no such folder"), "{e}");
    }

    #[test]
    fn a_bad_manifest_is_refused_before_the_checkout_is_touched() {
        let d = setup("bad-manifest", r#"{"cpu": [{"name": "x", "run": 3}]}"#);
        let e = format!("{:#}", run(&d, &[], None).unwrap_err());
        assert!(e.contains("verify.json") && e.contains("`cpu[0].run`") && e.contains("expected a string"), "{e}");
        assert_eq!(branches(&d), ["master"]);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn submit_without_a_token_fails_before_touching_anything() {
        let d = setup("no-token", PASSING);
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
        let d = setup("down", PASSING);
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
        let d = setup("dry", PASSING);
        run(&d, &["--submit", "--dry-run"], None).unwrap();
        assert_eq!(branches(&d), ["fix/4286-attention-refactor", "master"]);
        assert!(d.join("out/attention-refactor/PR.md").exists());
        run(&d, &[], None).unwrap();
        run(&d, &["--submit", "--dry-run", "--base", "dev"], None).unwrap();
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_draft_is_written_from_the_checks_that_ran_here_and_the_recorded_gpu_run() {
        let d = setup("verified", PASSING);
        run(&d, &[], None).unwrap();
        let pr = std::fs::read_to_string(d.join("out/attention-refactor/PR.md")).unwrap();
        // Ran in the patched tree (the grep found the patch's line), with its numbers.
        assert!(pr.contains("| the patch is in the tree | this machine, CPU, now | **passed**: 1 passed in 0.01s |"), "{pr}");
        assert!(pr.contains("| needs a tool nobody has | this machine, CPU, now | skipped: this machine has no qlora-kit-no-such-tool (not on PATH) |"), "{pr}");
        assert!(!d.join("ran").exists(), "a skipped check did not run");
        assert!(pr.contains("recorded GPU run `verify/results/h100-2026-11-26`, 2026-11-26, NVIDIA H100 80GB HBM3, 580.159.04"), "{pr}");
        assert!(pr.contains("- patched: `57 passed in 87s` (results.json /tests/patched), holds"), "{pr}");
        assert!(pr.contains("### Details\n\nChecked by a test."), "{pr}");
        assert!(pr.contains("- [ ] Every declared check passed (2 passed, 0 failed, 1 skipped)"), "{pr}");
        let records: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("out/attention-refactor/verification.json")).unwrap()).unwrap();
        assert_eq!(records["records"][0]["outcome"], "passed");
        assert_eq!(records["records"][1]["outcome"], "skipped");
        assert_eq!(records["records"][2]["source"], "gpu-recorded");
        // The checks ran in an exported tree: the checkout itself stays clean.
        issue_fixes::apply::ensure_clean(&git2::Repository::open(d.join("up")).unwrap()).unwrap();
        // --gpu-results: another run's files are cited instead.
        let other = d.join("device-out");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("results.json"), r#"{"gpu": "NVIDIA H200", "tests": {"patched": "57 passed in 60s"}}"#).unwrap();
        run(&d, &["--gpu-results", other.to_str().unwrap()], None).unwrap();
        let pr = std::fs::read_to_string(d.join("out/attention-refactor/PR.md")).unwrap();
        assert!(pr.contains("recorded GPU run `device-out`,") && pr.contains("NVIDIA H200"), "{pr}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_failing_check_stops_the_pr_unless_no_verify_is_given() {
        let failing = PASSING.replace("grep -q flash unsloth/attn.py && echo '1 passed in 0.01s'", "echo 'E   boom'; echo '1 failed in 0.02s'; exit 3");
        let d = setup("failing", &failing);
        // An earlier draft must not survive a failed run.
        std::fs::create_dir_all(d.join("out/attention-refactor")).unwrap();
        std::fs::write(d.join("out/attention-refactor/PR.md"), "stale").unwrap();
        let e = format!("{:#}", run(&d, &[], None).unwrap_err());
        assert!(e.contains("verification of `attention-refactor` failed: 1 of 3 check(s)"), "{e}");
        assert!(e.contains("`the patch is in the tree`: exit code 3 (1 failed in 0.02s)"), "{e}");
        assert!(e.contains("E   boom"), "the output's tail is shown: {e}");
        assert!(e.contains("--no-verify"), "{e}");
        assert!(e.contains("branch fix/4286-attention-refactor removed"), "{e}");
        assert!(!d.join("out/attention-refactor/PR.md").exists(), "no draft");
        assert_eq!(branches(&d), ["master"], "the branch this run made is gone");
        assert!(d.join("out/attention-refactor/verification.json").exists(), "the records stay");

        run(&d, &["--no-verify"], None).unwrap();
        let pr = std::fs::read_to_string(d.join("out/attention-refactor/PR.md")).unwrap();
        assert!(pr.contains("`--no-verify`, so no check ran"), "{pr}");
        assert!(pr.contains("| the patch is in the tree | this machine, CPU, now | skipped: --no-verify |"), "{pr}");
        assert!(pr.contains("- [ ] Every declared check passed (1 passed, 0 failed, 2 skipped; --no-verify)"), "{pr}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_recorded_gpu_run_that_does_not_show_the_fix_stops_the_pr() {
        let d = setup("gpu-bad", PASSING);
        std::fs::write(
            d.join("verify/results/h100-2026-11-26/results.json"),
            r#"{"gpu": "NVIDIA H100 80GB HBM3", "tests": {"patched": "1 failed, 56 passed in 87s"}}"#,
        )
        .unwrap();
        let e = format!("{:#}", run(&d, &[], None).unwrap_err());
        assert!(e.contains("`attention test on a GPU`: patched: expected no \"failed\""), "{e}");
        assert!(e.contains("[run verify/results/h100-2026-11-26, 2026-11-26, NVIDIA H100 80GB HBM3]"), "{e}");
        assert!(!d.join("out/attention-refactor/PR.md").exists());
        let _ = std::fs::remove_dir_all(d);
    }
}
