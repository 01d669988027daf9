//! `--submit` against a mock GitHub API on 127.0.0.1 (tests/mock_github): fork, blobs,
//! trees, commits, ref, draft PR; re-runs; bad input; network failures; the token kept
//! out of every output. No network beyond loopback.

mod mock_github;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use git2::{Signature, Time};
use issue_fixes::apply::{apply_series, read_series, repo_from_release};
use issue_fixes::series::{Change, LocalSeries};
use issue_fixes::Package;
use issue_fixes::submit::{dry_run, submit, upstream_for, BranchOutcome, Config, PrText, SubmitError, Submitted, Upstream, API_DEFAULT};
use issue_fixes::token::Token;
use mock_github::{closed_port, silent_server, Mock, UPSTREAM};

const TOKEN: &str = "ghp_TEST0secret0token0do0not0print0Zq9";
const BRANCH: &str = "fix/4286-attention-refactor";
const FORK: &str = "octo/unsloth";

const ATTN: &str = "def pick(cc):\n    if cc[0] >= 12:\n        return \"sdpa\"\n    return \"xformers\"\n";
const OLD: &str = "def legacy():\n    pass\n";
const PATCH_1: &str = "Probe instead of disabling by capability\n\nRun one forward at sm_120 and keep xformers if it works.\n---\ndiff --git a/unsloth/attn.py b/unsloth/attn.py\n--- a/unsloth/attn.py\n+++ b/unsloth/attn.py\n@@ -1,4 +1,4 @@\n def pick(cc):\n-    if cc[0] >= 12:\n+    if cc[0] >= 12 and not probe():\n         return \"sdpa\"\n     return \"xformers\"\n";
const PATCH_2: &str = "Add the probe\n---\ndiff --git a/unsloth/probe.py b/unsloth/probe.py\nnew file mode 100644\n--- /dev/null\n+++ b/unsloth/probe.py\n@@ -0,0 +1,2 @@\n+def probe():\n+    return True\n";
const PATCH_3: &str = "Drop the legacy picker\n---\ndiff --git a/unsloth/legacy.py b/unsloth/legacy.py\ndeleted file mode 100644\n--- a/unsloth/legacy.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-def legacy():\n-    pass\n";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("issue-fixes-submit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Fixture {
    root: PathBuf,
    series: LocalSeries,
    mock: Mock,
    cfg: Config,
    pr: PrText,
    token: Token,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The upstream's files on GitHub: the release's import package plus what a wheel leaves
/// out (README, tests).
fn upstream_files() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("README.md", b"# unsloth\n"),
        ("tests/test_attn.py", b"def test_pick():\n    pass\n"),
        ("unsloth/_version.py", b"__version__ = \"2026.10.9\"\n"),
        ("unsloth/attn.py", ATTN.as_bytes()),
        ("unsloth/legacy.py", OLD.as_bytes()),
    ]
}

/// A local upstream made from a "release", the three-patch series applied on BRANCH with
/// a fixed author (so every id is reproducible), and a mock GitHub without a fork.
fn fixture(name: &str) -> Fixture {
    let root = tmp(name);
    let rel = root.join("rel");
    std::fs::create_dir_all(rel.join("unsloth")).unwrap();
    for (path, content) in upstream_files().into_iter().filter(|(p, _)| p.starts_with("unsloth/")) {
        std::fs::write(rel.join(path), content).unwrap();
    }
    let up = root.join("up");
    repo_from_release(&rel, &up, "2026.10.9").unwrap();
    let dir = root.join("patches");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, p) in [PATCH_1, PATCH_2, PATCH_3].iter().enumerate() {
        std::fs::write(dir.join(format!("{:04}-p.patch", i + 1)), p).unwrap();
    }
    let patches = read_series(&dir).unwrap();
    let author = Signature::new("Dev", "dev@localhost", &Time::new(1_700_000_000, 60)).unwrap();
    apply_series(&up, BRANCH, &patches, &author).unwrap();
    let series = LocalSeries::read(&up, BRANCH, patches.len()).unwrap();
    let mock = Mock::start(&root, TOKEN, "octo", &upstream_files());
    let mut cfg = Config::new(upstream_for(&series, Package::Unsloth).unwrap());
    cfg.api = mock.api.clone();
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.io_timeout = Duration::from_secs(5);
    cfg.request_timeout = Duration::from_secs(10);
    cfg.fork_polls = 5;
    cfg.fork_poll = Duration::from_millis(10);
    let (title, body) = issue_fixes::draft::pr_text(issue_fixes::find("attention-refactor").unwrap(), &patches, &no_checks(), "Measured on an H100: ...");
    Fixture { root, series, mock, cfg, pr: PrText { title, body }, token: Token::new(TOKEN).unwrap() }
}

impl Fixture {
    fn submit(&self) -> (Result<Submitted, SubmitError>, Vec<String>) {
        let mut lines = vec![];
        let r = submit(&self.series, &self.cfg, &self.pr, &self.token, &mut |l| lines.push(l.to_string()));
        (r, lines)
    }

    /// "METHOD target" per request made, after asserting each carried the token.
    fn requests(&self) -> Vec<String> {
        self.mock
            .requests()
            .iter()
            .map(|r| {
                assert_eq!(r.authorization.as_deref(), Some(format!("Bearer {TOKEN}").as_str()), "{} {}", r.method, r.target);
                format!("{} {}", r.method, r.target)
            })
            .collect()
    }
}

fn no_token(text: &str) {
    assert!(!text.contains(TOKEN), "the token leaked: {text}");
    assert!(!text.contains(&TOKEN[..5]), "part of the token leaked: {text}");
}

#[test]
fn the_series_reads_as_file_changes() {
    let f = fixture("series");
    let s = &f.series;
    assert_eq!(s.commits.len(), 3);
    assert_eq!(s.commits[0].subject(), "Probe instead of disabling by capability");
    assert_eq!(s.commits[0].author.iso8601(), "2023-11-14T23:13:20+01:00");
    let paths: Vec<(&str, bool)> =
        s.commits.iter().flat_map(|c| c.changes.iter().map(|x| (x.path.as_str(), x.change == Change::Delete))).collect();
    assert_eq!(paths, [("unsloth/attn.py", false), ("unsloth/probe.py", false), ("unsloth/legacy.py", true)]);
    assert!(s.base_blobs["unsloth/attn.py"].is_some() && s.base_blobs["unsloth/probe.py"].is_none());
    assert_eq!(f.cfg.upstream, Upstream { owner: "unslothai".into(), name: "unsloth".into() });
}

#[test]
fn happy_path_forks_publishes_and_opens_a_draft_pr() {
    let f = fixture("happy");
    let (r, log) = f.submit();
    let s = r.unwrap();
    assert_eq!((s.login.as_str(), s.fork.as_str(), s.fork_reused), ("octo", FORK, false));
    assert_eq!((s.branch.as_str(), s.branch_outcome), (BRANCH, BranchOutcome::Created));
    assert_eq!((s.pr_number, s.pr_reused), (7000, false));
    assert_eq!(s.pr_url, "https://github.com/unslothai/unsloth/pull/7000");

    // The fork's branch: the fork's main plus exactly the patches.
    let file = |p: &str| f.mock.file(FORK, BRANCH, p).map(|b| String::from_utf8(b).unwrap());
    assert_eq!(file("unsloth/attn.py").unwrap(), ATTN.replace("cc[0] >= 12:", "cc[0] >= 12 and not probe():"));
    assert_eq!(file("unsloth/probe.py").unwrap(), "def probe():\n    return True\n");
    assert_eq!(file("unsloth/legacy.py"), None, "deleted");
    assert_eq!(file("README.md").unwrap(), "# unsloth\n", "built on the fork's main, not on the wheel's files");

    // Same messages, authors and committers as the local commits; the first on the fork's main.
    let (msg, parents, author, committer) = f.mock.commit(&s.head);
    assert_eq!(msg, "Drop the legacy picker");
    assert_eq!(author, "Dev <dev@localhost> 1700000000 60");
    assert_eq!(committer, author);
    let first = f.mock.commit(&f.mock.commit(&parents[0]).1[0]);
    assert_eq!(first.0, f.series.commits[0].message);
    let main = f.mock.with(|st| st.repos[FORK].refs["main"].to_string());
    assert_eq!(first.1, [main]);

    // The draft PR.
    let pr = f.mock.with(|st| st.pulls[0].clone());
    assert_eq!(pr["draft"], true);
    assert_eq!(pr["head"]["label"], format!("octo:{BRANCH}"));
    assert_eq!(pr["base"]["ref"], "main");
    assert_eq!(pr["title"], f.pr.title.as_str());
    assert_eq!(pr["body"], f.pr.body.as_str());

    // Every request carried `Bearer <token>`; the sequence, with the fork's two "not
    // ready yet" polls.
    insta::assert_snapshot!("happy_path_requests", f.requests().join("\n"));
    for l in &log {
        no_token(l);
    }
    insta::assert_snapshot!("happy_path_log", log.join("\n").replace(&f.mock.api, "http://<mock>"));
}

#[test]
fn a_rerun_reuses_the_fork_the_branch_and_the_pr() {
    let f = fixture("rerun");
    let first = f.submit().0.unwrap();
    f.mock.clear_requests();
    let (r, log) = f.submit();
    let again = r.unwrap();
    assert!(again.fork_reused && again.pr_reused);
    assert_eq!(again.branch_outcome, BranchOutcome::AlreadyThere);
    assert_eq!((again.head.as_str(), again.pr_number), (first.head.as_str(), first.pr_number), "same commit ids: dates are kept");
    let reqs = f.requests();
    for r in &reqs {
        assert!(!r.contains("/forks") && !r.starts_with("POST /repos/octo/unsloth/git/refs") && !r.starts_with("PATCH"), "{r}");
        assert!(!r.starts_with("POST /repos/unslothai/unsloth/pulls"), "{r}");
    }
    assert!(log.iter().any(|l| l.contains("already open, reused")), "{log:?}");
    assert_eq!(f.mock.with(|st| st.pulls.len()), 1);
}

#[test]
fn an_existing_fork_and_an_open_pr_are_reused() {
    let f = fixture("existing");
    f.mock.fork_exists();
    f.mock.with(|st| {
        st.pulls.push(serde_json::json!({
            "number": 42, "html_url": "https://github.com/unslothai/unsloth/pull/42", "state": "open", "draft": true,
            "head": {"label": format!("octo:{BRANCH}"), "ref": BRANCH}, "base": {"ref": "main"},
        }))
    });
    let s = f.submit().0.unwrap();
    assert!(s.fork_reused && s.pr_reused);
    assert_eq!((s.branch_outcome, s.pr_number), (BranchOutcome::Created, 42));
    let reqs = f.requests();
    assert!(!reqs.iter().any(|r| r.contains("/forks")), "{reqs:?}");
    assert_eq!(reqs.iter().filter(|r| r.contains("/git/ref/heads/main")).count(), 1, "a ready fork is not polled");
}

#[test]
fn a_branch_at_an_ancestor_is_fast_forwarded() {
    let f = fixture("ff");
    f.mock.fork_exists();
    f.mock.with(|st| {
        let main = st.repos[FORK].refs["main"];
        st.repos.get_mut(FORK).unwrap().refs.insert(BRANCH.into(), main);
    });
    let s = f.submit().0.unwrap();
    assert_eq!(s.branch_outcome, BranchOutcome::Updated);
    assert!(f.requests().iter().any(|r| r == &format!("PATCH /repos/octo/unsloth/git/refs/heads/{BRANCH}")));
    assert_eq!(f.mock.with(|st| st.repos[FORK].refs[BRANCH].to_string()), s.head);
}

#[test]
fn a_branch_with_other_commits_is_not_force_pushed() {
    let f = fixture("diverged");
    f.mock.fork_exists();
    let theirs = f.mock.commit_on(FORK, BRANCH, "main", &[("unsloth/other.py", b"x = 1\n")], "someone else's work");
    let e = f.submit().0.unwrap_err();
    assert!(matches!(&e, SubmitError::BranchDiverged { theirs: t, .. } if *t == theirs.to_string()), "{e}");
    assert!(e.to_string().contains("not force-pushing"), "{e}");
    assert_eq!(f.mock.with(|st| st.repos[FORK].refs[BRANCH]), theirs, "the branch is left as it was");
    let patch = f.mock.requests().into_iter().find(|r| r.method == "PATCH").unwrap();
    assert_eq!(patch.body["force"], false);
    assert_eq!(f.mock.with(|st| st.pulls.len()), 0);
}

#[test]
fn a_fork_whose_base_differs_from_the_release_is_refused_before_any_write() {
    let f = fixture("base-differs");
    f.mock.fork_exists();
    f.mock.commit_on(FORK, "main", "main", &[("unsloth/attn.py", b"def pick(cc):\n    return \"sdpa\"\n")], "newer upstream");
    let e = f.submit().0.unwrap_err();
    let SubmitError::BaseDiffers { path, .. } = &e else { panic!("{e}") };
    assert_eq!(path, "unsloth/attn.py");
    assert!(e.to_string().contains("nothing was pushed"), "{e}");
    let reqs = f.requests();
    assert!(reqs.iter().all(|r| r.starts_with("GET ")), "only reads: {reqs:?}");
}

#[test]
fn a_fork_without_the_base_branch_names_it() {
    let mut f = fixture("no-base");
    f.mock.fork_exists();
    f.cfg.base = "release".into();
    let e = f.submit().0.unwrap_err();
    assert!(matches!(e, SubmitError::NoBase { .. }), "{e}");
    assert!(e.to_string().contains("no branch `release`"), "{e}");
}

#[test]
fn waiting_for_a_new_fork_is_bounded() {
    let f = fixture("fork-slow");
    f.mock.with(|st| st.fork_not_ready = 1000);
    let e = f.submit().0.unwrap_err();
    assert!(matches!(e, SubmitError::ForkNotReady { polls: 5, .. }), "{e}");
    assert_eq!(f.requests().iter().filter(|r| r.ends_with("/git/ref/heads/main")).count(), 5);
}

#[test]
fn a_422_from_the_pr_endpoint_is_a_clear_error() {
    let f = fixture("pr-422");
    let msg = format!("No commits between unslothai:main and octo:{BRANCH}");
    let body = serde_json::json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom", "message": msg}]});
    f.mock.fault("POST", "/repos/unslothai/unsloth/pulls", 422, &body.to_string());
    let e = f.submit().0.unwrap_err();
    let SubmitError::Api { step, status, message, .. } = &e else { panic!("{e}") };
    assert_eq!((step.as_str(), *status), ("opening the pull request", 422));
    assert_eq!(message, &format!("Validation Failed ({msg})"));
    assert!(e.to_string().starts_with(&format!("opening the pull request: GitHub ({}) answered 422", f.mock.api)), "{e}");
}

#[test]
fn a_blob_stored_under_another_id_is_an_error() {
    let f = fixture("blob-id");
    f.mock.fault("POST", "/repos/octo/unsloth/git/blobs", 201, &serde_json::json!({"sha": "0".repeat(40)}).to_string());
    let e = f.submit().0.unwrap_err();
    assert!(matches!(&e, SubmitError::BlobMismatch { path, .. } if path == "unsloth/attn.py"), "{e}");
}

#[test]
fn the_token_never_shows_in_errors_logs_or_debug_output() {
    // GitHub answering with the Authorization header echoed back, as JSON and as a page.
    for (path, body) in [
        ("/user", r#"{"message": "Bad credentials: you sent {auth}"}"#.to_string()),
        ("/repos/unslothai/unsloth/pulls", r#"{"message": "Validation Failed", "errors": [{"message": "head: {auth}"}]}"#.to_string()),
        // Not JSON, cut at 300 characters with the token across the cut.
        ("/repos/octo/unsloth/git/trees", format!("<html><body>{}{{auth}} refused</body></html>", "y".repeat(276))),
    ] {
        let f = fixture(&format!("scrub{}", path.len()));
        let method = if path == "/user" { "GET" } else { "POST" };
        f.mock.fault(method, path, if path == "/user" { 401 } else { 500 }, &body);
        let (r, log) = f.submit();
        let e = r.unwrap_err();
        let (shown, debug) = (e.to_string(), format!("{e:?}"));
        no_token(&shown);
        no_token(&debug);
        assert!(shown.contains("Bearer ***") || path.ends_with("trees"), "{shown}");
        for l in &log {
            no_token(l);
        }
        // The server did get it.
        assert!(f.mock.requests().iter().all(|r| r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"))));
    }
    let t = Token::new(TOKEN).unwrap();
    no_token(&format!("{t} {t:?}"));
}

#[test]
fn a_missing_token_is_refused_before_anything() {
    let e = Token::from_var(None).unwrap_err();
    assert!(matches!(e, SubmitError::MissingToken));
    assert!(e.to_string().contains("GITHUB_TOKEN") && e.to_string().contains("nothing was sent"), "{e}");
    assert!(matches!(Token::from_var(Some("".into())), Err(SubmitError::MissingToken)));
    assert!(matches!(Token::from_var(Some(" \n".into())), Err(SubmitError::MissingToken)));
}

#[test]
fn a_wrong_token_is_github_saying_so() {
    let f = fixture("bad-token");
    let t = Token::new("ghp_not_the_right_one").unwrap();
    let e = submit(&f.series, &f.cfg, &f.pr, &t, &mut |_| {}).unwrap_err();
    assert!(matches!(e, SubmitError::Api { status: 401, .. }), "{e}");
    assert!(e.to_string().contains("Bad credentials") && e.to_string().contains("GET /user"), "{e}");
}

#[test]
fn nothing_listening_is_a_clear_network_error() {
    let mut f = fixture("down");
    f.cfg.api = closed_port();
    let t0 = Instant::now();
    let e = f.submit().0.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let SubmitError::Network { step, api, .. } = &e else { panic!("{e}") };
    assert!(step.contains("GET /user"), "{step}");
    assert_eq!(api, &f.cfg.api);
    let shown = e.to_string();
    assert!(shown.contains("no answer from the GitHub API at http://127.0.0.1:"), "{shown}");
    assert!(shown.to_lowercase().contains("connect"), "says why: {shown}");
    no_token(&shown);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let mut f = fixture("silent");
    f.cfg.api = silent_server();
    f.cfg.io_timeout = Duration::from_millis(300);
    f.cfg.request_timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let e = f.submit().0.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(matches!(&e, SubmitError::Network { step, .. } if step.contains("GET /user")), "{e}");
}

#[test]
fn dry_run_lists_the_requests_without_token_or_network() {
    let mut f = fixture("dry");
    f.cfg.api = API_DEFAULT.into();
    let lines = dry_run(&f.series, &f.cfg, &f.pr);
    let text = lines.join("\n");
    no_token(&text);
    insta::assert_snapshot!("dry_run", text);
    assert!(f.mock.requests().is_empty());
}

#[test]
fn the_upstream_repository_is_the_bounty_s_and_other_package_folders_are_refused() {
    let f = fixture("zoo");
    let mut zoo = f.series.clone();
    // A series for unsloth-zoo: its package folder and its tests/ go there.
    zoo.base_blobs = [("unsloth_zoo/vision_utils.py".to_string(), None), ("tests/test_collator.py".to_string(), None)].into_iter().collect();
    assert_eq!(upstream_for(&zoo, Package::UnslothZoo).unwrap().full(), "unslothai/unsloth-zoo");
    // The same paths cannot go to unsloth.
    let e = upstream_for(&zoo, Package::Unsloth).unwrap_err();
    assert!(matches!(&e, SubmitError::MixedUpstreams { b, .. } if b == "unsloth_zoo/vision_utils.py"), "{e}");
    zoo.base_blobs.insert("unsloth/save.py".into(), None);
    let e = upstream_for(&zoo, Package::UnslothZoo).unwrap_err();
    assert!(e.to_string().contains("`unsloth/save.py` (unslothai/unsloth)"), "{e}");
    // Paths outside both package folders follow the bounty.
    let mut tests_only = f.series.clone();
    tests_only.base_blobs = [("tests/test_x.py".to_string(), None)].into_iter().collect();
    assert_eq!(upstream_for(&tests_only, Package::UnslothZoo).unwrap().full(), "unslothai/unsloth-zoo");
    assert_eq!(upstream_for(&tests_only, Package::Unsloth).unwrap().full(), "unslothai/unsloth");
    assert_eq!(upstream_for(&f.series, Package::Unsloth).unwrap().full(), UPSTREAM);
}

#[test]
fn a_bad_api_base_is_a_clear_error() {
    let mut f = fixture("bad-api");
    f.cfg.api = "not a url".into();
    let e = f.submit().0.unwrap_err();
    assert!(matches!(e, SubmitError::Client { .. }), "{e}");
    assert!(e.to_string().contains("`not a url` is not a URI"), "{e}");
}

/// A report with no check in it (the draft's verification records are tested in verify.rs).
fn no_checks() -> issue_fixes::verify::Report {
    issue_fixes::verify::Report { manifest: "verify.json".into(), machine: "test".into(), no_verify: false, records: vec![], device_commands: vec![] }
}
