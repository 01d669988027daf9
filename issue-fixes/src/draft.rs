//! The PR text for a bounty's patch series.

use crate::apply::Patch;
use crate::verify::{Outcome, Report};
use crate::{Bounty, Package, PINNED};

/// Title and body of the draft PR. The body's "How it was verified" is written from
/// `report` (what ran now with its numbers, what was read from a recorded GPU run with its
/// card, what was skipped and why), followed by `details`: the fix's own account of its
/// verification, read from `issue-fixes/patches/<slug>/VERIFICATION.md`.
pub fn pr_text(b: &Bounty, patches: &[Patch], report: &Report, details: &str) -> (String, String) {
    let title = match patches {
        [one] => one.subject().to_string(),
        _ => {
            // "VLM data collator: batching efficiency (#2133)" from the first clause of `open`.
            let clause = b.open.split([':', '.']).next().unwrap_or("").trim();
            let mut c = clause.chars();
            let clause: String = c.next().map(|f| f.to_lowercase().chain(c).collect()).unwrap_or_default();
            if clause.is_empty() { b.title.to_string() } else { format!("{}: {clause}", b.title) }
        }
    };
    let mut body = String::new();
    body += "## Motivation\n\n";
    body += &format!("{}\n\nUpstream today ({PINNED}): {}\n\nStill open: {}\n\n", b.title, b.summary, b.open);
    // The issue numbers are unslothai/unsloth's: qualified in a PR to another repository.
    let prefix = if b.repo == Package::Unsloth { "" } else { "unslothai/unsloth" };
    let links: Vec<String> = b.issues.iter().map(|i| format!("{prefix}#{i}")).collect();
    if !links.is_empty() {
        // These upstream issues often bundle several requests: link, do not auto-close.
        body += &format!("Refs {}.\n\n", links.join(", "));
    }
    body += "## What changed\n\n";
    for p in patches {
        body += &format!("- {}\n", p.subject());
        for l in p.message.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            body += &format!("  {}\n", l.trim());
        }
    }
    body += "\n## How it was verified\n\n";
    body += &report.markdown();
    if !details.trim().is_empty() {
        body += "\n### Details\n\n";
        body += details.trim();
        body += "\n";
    }
    let count = |o: Outcome| report.records.iter().filter(|r| r.outcome == o).count();
    let (passed, skipped) = (count(Outcome::Passed), count(Outcome::Skipped));
    let verified = report.ready() && skipped == 0 && passed > 0;
    body += &format!("\n## Checklist\n\n- [x] Based on {} ", b.repo.pypi());
    body += PINNED;
    body += "\n- [x] ruff-formatted, 100 columns, license headers kept\n- [x] Tests included\n";
    body += &format!(
        "- [{}] Every declared check passed ({passed} passed, {} failed, {skipped} skipped{})\n",
        if verified { "x" } else { " " },
        count(Outcome::Failed),
        if report.no_verify { "; --no-verify" } else { "" }
    );
    body += "- [ ] Reviewed by a maintainer\n";
    (title, body)
}
