//! `cargo xtask pr <slug> --submit`: publish a local patch branch to your fork and open a
//! draft pull request, through GitHub's REST API with octocrab.
//!
//! No git transport: pushing over HTTPS with git2 needs OpenSSL, a C dependency every
//! machine would have to install. The branch is published through GitHub's Git Data API
//! instead, over octocrab's rustls client; these are the requests, in order:
//!
//! 1. `GET /user`: whose token it is (`login`).
//! 2. `GET /repos/{login}/{repo}`: the fork, reused when it is a fork of the upstream;
//!    otherwise `POST /repos/{upstream}/forks` (GitHub answers with the existing fork if
//!    there is one under another name), then bounded polling of step 3 while GitHub copies
//!    the repository ([`Config::fork_polls`] times, [`Config::fork_poll`] apart).
//! 3. `GET /repos/{fork}/git/ref/heads/{base}` and `GET .../git/commits/{sha}`: the fork's
//!    base branch (`--base`, default `main`) and its tree.
//! 4. `GET /repos/{fork}/contents/{path}?ref={base}` for every path the series touches:
//!    the fork's blob there must be the one our base has (or both absent). Our base commit
//!    is a local one (made from the PyPI wheels, see [`crate::apply::repo_from_release`])
//!    that GitHub does not have, so the published branch starts on the fork's base
//!    instead; this check is what makes the PR's diff exactly our patches. If it fails:
//!    [`SubmitError::BaseDiffers`], and nothing was written to the fork.
//! 5. For each local commit, oldest first: `POST .../git/blobs` for each written file
//!    (base64; the id GitHub answers must equal the local blob id), `POST .../git/trees`
//!    on the parent's tree (`base_tree`, deletions as `sha: null`), `POST .../git/commits`
//!    with the same message, author and committer (dates included, so a re-run makes the
//!    same commit ids).
//! 6. `GET .../git/ref/heads/{branch}`: absent, `POST .../git/refs`; at our head (or at a
//!    commit with our head's tree), left as it is; elsewhere, `PATCH` with `force: false`,
//!    which GitHub refuses unless it is a fast-forward: [`SubmitError::BranchDiverged`],
//!    never a force-push.
//! 7. `GET /repos/{upstream}/pulls?head={login}:{branch}&state=open`: an open PR is reused;
//!    otherwise `POST /repos/{upstream}/pulls` with `draft: true`.
//!
//! So a re-run reuses the fork, the branch and the PR. Each request has a connect, read
//! and overall timeout ([`Config`]); a failure names its step and the API base. The token
//! lives in a [`Token`]: it prints as `***`, and every text from the network is scrubbed of
//! it before it reaches an error or a log line. [`dry_run`] lists the same requests without
//! a token or a network. The API base is [`API_ENV`] (default [`API_DEFAULT`]), which is
//! how the tests point it at a mock GitHub on 127.0.0.1.

use std::time::Duration;

use octocrab::Octocrab;
use serde_json::{json, Value};

use crate::series::{Change, LocalSeries};
use crate::Package;
use crate::token::Token;

/// GitHub's API.
pub const API_DEFAULT: &str = "https://api.github.com";
/// The environment variable that overrides [`API_DEFAULT`] (the tests' mock server, a
/// GitHub Enterprise host).
pub const API_ENV: &str = "QLORA_KIT_GITHUB_API";

/// Why a submission failed. Every text in it was scrubbed of the token.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No token.
    #[error("--submit needs a GitHub token in GITHUB_TOKEN (classic: `public_repo`; fine-grained: Contents and Pull requests read/write, on your fork of the upstream); nothing was sent")]
    MissingToken,
    /// A token with characters an HTTP header cannot carry.
    #[error("GITHUB_TOKEN has whitespace or control characters inside, so it is not a token; nothing was sent")]
    BadToken,
    /// The HTTP client could not be set up (a bad API base, no CA certificates).
    #[error("setting up the HTTP client for {api}: {detail}; nothing was sent")]
    Client {
        /// The API base.
        api: String,
        /// Why.
        detail: String,
    },
    /// The API could not be reached, or did not answer in time.
    #[error("{step}: no answer from the GitHub API at {api}: {detail}")]
    Network {
        /// What we were doing.
        step: String,
        /// The API base.
        api: String,
        /// The transport's reason.
        detail: String,
    },
    /// GitHub answered with an error status.
    #[error("{step}: GitHub ({api}) answered {status}: {message}")]
    Api {
        /// What we were doing.
        step: String,
        /// The API base.
        api: String,
        /// HTTP status.
        status: u16,
        /// GitHub's message and its `errors` list.
        message: String,
    },
    /// GitHub answered something we cannot read.
    #[error("{step}: unexpected answer from {api}: {detail}")]
    Protocol {
        /// What we were doing.
        step: String,
        /// The API base.
        api: String,
        /// What was wrong.
        detail: String,
    },
    /// A new fork's base branch did not appear in time.
    #[error("waiting for the fork {fork}: its branch `{base}` did not appear after {polls} tries, {every:?} apart; run again in a minute (the fork is reused)")]
    ForkNotReady {
        /// The fork.
        fork: String,
        /// The base branch.
        base: String,
        /// How many tries.
        polls: u32,
        /// How far apart.
        every: Duration,
    },
    /// The fork has no such base branch.
    #[error("the fork {fork} has no branch `{base}` (pass --base BRANCH); nothing was pushed")]
    NoBase {
        /// The fork.
        fork: String,
        /// The base branch.
        base: String,
    },
    /// The fork's base is not the release the series was made on.
    #[error("{at} is not the base the series was made on: `{path}` is {theirs} there and {ours} in the checkout's base; sync the fork with {upstream} at the pinned release or pass --base a branch at it; nothing was pushed")]
    BaseDiffers {
        /// `fork@base (commit)`.
        at: String,
        /// The first path that differs.
        path: String,
        /// Our base's blob there.
        ours: String,
        /// The fork's.
        theirs: String,
        /// The upstream repository.
        upstream: String,
    },
    /// GitHub stored an upload under another id than git computes.
    #[error("uploading blobs: GitHub stored `{path}` as blob {theirs}, the checkout has {ours}")]
    BlobMismatch {
        /// The file.
        path: String,
        /// The local blob id.
        ours: String,
        /// GitHub's.
        theirs: String,
    },
    /// The fork's branch holds other commits.
    #[error("{fork}: branch {branch} already exists at {theirs}, which is not this series nor an ancestor of it; not force-pushing: delete that branch on the fork to publish the series again")]
    BranchDiverged {
        /// The fork.
        fork: String,
        /// The branch.
        branch: String,
        /// Where it points.
        theirs: String,
    },
    /// The series mixes files of two upstream repositories.
    #[error("the series changes `{a}` ({repo_a}) and `{b}` ({repo_b}): one pull request goes to one repository, split the series")]
    MixedUpstreams {
        /// A path of the first repository.
        a: String,
        /// The first repository.
        repo_a: String,
        /// A path of the second.
        b: String,
        /// The second repository.
        repo_b: String,
    },
    /// The series is empty.
    #[error("{branch}: no commits to publish")]
    Empty {
        /// The branch.
        branch: String,
    },
    /// Reading the local branch failed.
    #[error("{what}: {source}")]
    Local {
        /// What we were doing.
        what: String,
        /// libgit2's error.
        #[source]
        source: git2::Error,
    },
}

/// The repository a pull request goes to, `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `unslothai`.
    pub owner: String,
    /// `unsloth` or `unsloth-zoo`.
    pub name: String,
}

impl Upstream {
    /// `owner/name`.
    pub fn full(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// The upstream repository a series goes to: `target`, the bounty's
/// ([`crate::Bounty::repo`]). A path under the other repository's package folder
/// (`unsloth_zoo/` in a series for `unslothai/unsloth`, `unsloth/` in one for
/// `unslothai/unsloth-zoo`) is [`SubmitError::MixedUpstreams`]; any other path (`tests/`,
/// `examples/`, both repositories have them) belongs to the target.
pub fn upstream_for(series: &LocalSeries, target: Package) -> Result<Upstream, SubmitError> {
    let owner = |p: &str| match p.split('/').next() {
        Some("unsloth") => Package::Unsloth,
        Some("unsloth_zoo") => Package::UnslothZoo,
        _ => target,
    };
    let Some(first) = series.base_blobs.keys().next() else { return Err(SubmitError::Empty { branch: series.branch.clone() }) };
    if let Some(other) = series.base_blobs.keys().find(|p| owner(p) != target) {
        let mine = series.base_blobs.keys().find(|p| owner(p) == target).unwrap_or(first);
        return Err(SubmitError::MixedUpstreams {
            a: mine.clone(),
            repo_a: format!("unslothai/{}", target.github_repo()),
            b: other.clone(),
            repo_b: format!("unslothai/{}", owner(other).github_repo()),
        });
    }
    Ok(Upstream { owner: "unslothai".into(), name: target.github_repo().into() })
}

/// Where and how to submit.
#[derive(Debug, Clone)]
pub struct Config {
    /// The API base, `https://api.github.com`.
    pub api: String,
    /// The repository the PR goes to.
    pub upstream: Upstream,
    /// The branch the PR is based on, on the upstream and on the fork (`main`).
    pub base: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout for each read or write on the connection.
    pub io_timeout: Duration,
    /// Timeout for a whole request, answer included.
    pub request_timeout: Duration,
    /// How many times to look for a new fork's base branch.
    pub fork_polls: u32,
    /// How long to wait between those looks.
    pub fork_poll: Duration,
}

impl Config {
    /// Defaults: the API from [`API_ENV`] or [`API_DEFAULT`], base `main`, 10 s to connect,
    /// 30 s per read or write, 60 s per request, a new fork waited for up to 30 x 2 s.
    pub fn new(upstream: Upstream) -> Config {
        let api = std::env::var(API_ENV).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| API_DEFAULT.to_string());
        Config {
            api: api.trim().trim_end_matches('/').to_string(),
            upstream,
            base: "main".into(),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            fork_polls: 30,
            fork_poll: Duration::from_secs(2),
        }
    }
}

/// The pull request's text (from [`crate::draft::pr_text`]).
#[derive(Debug, Clone)]
pub struct PrText {
    /// Title.
    pub title: String,
    /// Body (Markdown).
    pub body: String,
}

/// What happened to the fork's branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchOutcome {
    /// It did not exist; created.
    Created,
    /// It pointed at an ancestor; fast-forwarded.
    Updated,
    /// It already held the series (same head, or same tree); left as it was.
    AlreadyThere,
}

/// What a submission did.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The token's user.
    pub login: String,
    /// The fork, `login/unsloth`.
    pub fork: String,
    /// Whether the fork existed already.
    pub fork_reused: bool,
    /// The branch on the fork.
    pub branch: String,
    /// The branch's head on the fork.
    pub head: String,
    /// What happened to the branch.
    pub branch_outcome: BranchOutcome,
    /// The pull request's number.
    pub pr_number: u64,
    /// Its web address.
    pub pr_url: String,
    /// Whether it was open already.
    pub pr_reused: bool,
}

/// Submits `series`: fork, publish, draft PR (the module docs list the requests). `log`
/// gets one line per thing done (no token in any). Blocks; runs its own tokio runtime.
pub fn submit(series: &LocalSeries, cfg: &Config, pr: &PrText, token: &Token, log: &mut dyn FnMut(&str)) -> Result<Submitted, SubmitError> {
    if series.commits.is_empty() {
        return Err(SubmitError::Empty { branch: series.branch.clone() });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SubmitError::Client { api: cfg.api.clone(), detail: format!("starting tokio: {e}") })?;
    rt.block_on(async {
        let gh = Api::new(cfg, token)?;
        let mut log = |s: String| log(&token.scrub(&s));
        run(&gh, series, cfg, pr, &mut log).await
    })
}

/// The requests [`submit`] would make, one per line, without a token or a network: what is
/// only known from GitHub's answers is written `<login>`, `<fork>`, `<base>`, ....
pub fn dry_run(series: &LocalSeries, cfg: &Config, pr: &PrText) -> Vec<String> {
    let up = cfg.upstream.full();
    let short = |s: &str| s.chars().take(7).collect::<String>();
    let line = |method: &str, route: String, why: String| format!("{method:<5} {route}\n      {why}");
    let mut out = vec![format!(
        "dry run: nothing is sent. API {}, token from GITHUB_TOKEN (sent as `Authorization: Bearer ***`)",
        cfg.api
    )];
    out.push(line("GET", "/user".into(), "the token's user: <login>".into()));
    out.push(line("GET", format!("/repos/<login>/{}", cfg.upstream.name), format!("your fork, if it is a fork of {up}")));
    out.push(line("POST", format!("/repos/{up}/forks"), "only without one; then poll the base branch below".into()));
    out.push(line("GET", format!("/repos/<fork>/git/ref/heads/{}", cfg.base), "the fork's base: <base>".into()));
    out.push(line("GET", "/repos/<fork>/git/commits/<base>".into(), "its tree: <tree0>".into()));
    for (path, ours) in &series.base_blobs {
        let want = ours.as_deref().map(|b| format!("blob {}", short(b))).unwrap_or_else(|| "absent".into());
        out.push(line("GET", format!("/repos/<fork>/contents/{path}?ref=<base>"), format!("must be {want}, as in the checkout's base")));
    }
    let mut uploaded = std::collections::HashSet::new();
    for (i, c) in series.commits.iter().enumerate() {
        let mut changed = vec![];
        for f in &c.changes {
            match &f.change {
                Change::Write { blob, content, .. } => {
                    if uploaded.insert(blob.clone()) {
                        out.push(line("POST", "/repos/<fork>/git/blobs".into(), format!("{} ({} bytes): blob {}", f.path, content.len(), short(blob))));
                    }
                    let kind = if series.base_blobs.get(&f.path).is_some_and(Option::is_some) { "write" } else { "add" };
                    changed.push(format!("{kind} {}", f.path));
                }
                Change::Delete => changed.push(format!("delete {}", f.path)),
            }
        }
        out.push(line("POST", "/repos/<fork>/git/trees".into(), format!("on <tree{i}>: {} -> <tree{}>", changed.join(", "), i + 1)));
        let parent = if i == 0 { "<base>".to_string() } else { format!("<commit{i}>") };
        out.push(line(
            "POST",
            "/repos/<fork>/git/commits".into(),
            format!("{:?} on {parent}, author {} <{}> {} -> <commit{}>", c.subject(), c.author.name, c.author.email, c.author.iso8601(), i + 1),
        ));
    }
    let n = series.commits.len();
    let b = &series.branch;
    out.push(line("GET", format!("/repos/<fork>/git/ref/heads/{b}"), "the branch, if it exists".into()));
    out.push(line(
        "POST",
        "/repos/<fork>/git/refs".into(),
        format!("refs/heads/{b} -> <commit{n}> (when absent; when it exists elsewhere: PATCH /repos/<fork>/git/refs/heads/{b}, force=false)"),
    ));
    out.push(line("GET", format!("/repos/{up}/pulls?head=<login>:{b}&state=open"), "an open PR to reuse".into()));
    out.push(line(
        "POST",
        format!("/repos/{up}/pulls"),
        format!("draft=true, head=<login>:{b}, base={}, title={:?}, body: {} lines", cfg.base, pr.title, pr.body.lines().count()),
    ));
    out
}

/// The HTTP side: octocrab with timeouts, raw requests, every text scrubbed.
struct Api<'a> {
    octo: Octocrab,
    cfg: &'a Config,
    token: &'a Token,
}

/// A response: status, JSON body (`Null` when empty or not JSON) and the text.
struct Reply {
    status: u16,
    body: Value,
    text: String,
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
    Patch,
}

impl<'a> Api<'a> {
    fn new(cfg: &'a Config, token: &'a Token) -> Result<Api<'a>, SubmitError> {
        let fail = |detail: String| SubmitError::Client { api: cfg.api.clone(), detail: token.scrub(&detail) };
        let octo = Octocrab::builder()
            .set_connect_timeout(Some(cfg.connect_timeout))
            .set_read_timeout(Some(cfg.io_timeout))
            .set_write_timeout(Some(cfg.io_timeout))
            .base_uri(cfg.api.as_str())
            .map_err(|e| fail(format!("the API base `{}` is not a URI: {}", cfg.api, chain(&e))))?
            .personal_token(token.expose().to_string())
            .build()
            .map_err(|e| fail(chain(&e)))?;
        Ok(Api { octo, cfg, token })
    }

    /// One request. Transport failures and timeouts are [`SubmitError::Network`]; any
    /// HTTP status comes back as a [`Reply`].
    async fn call(&self, step: &str, method: Method, route: &str, body: Option<&Value>) -> Result<Reply, SubmitError> {
        let net = |detail: String| SubmitError::Network { step: step.to_string(), api: self.cfg.api.clone(), detail: self.token.scrub(&detail) };
        let exchange = async {
            let resp = match method {
                Method::Get => self.octo._get(route).await,
                Method::Post => self.octo._post(route, body).await,
                Method::Patch => self.octo._patch(route, body).await,
            }
            .map_err(|e| net(chain(&e)))?;
            let status = resp.status().as_u16();
            let text = self.octo.body_to_string(resp).await.map_err(|e| net(format!("reading the answer: {}", chain(&e))))?;
            Ok::<_, SubmitError>(Reply { status, body: serde_json::from_str(&text).unwrap_or(Value::Null), text })
        };
        match tokio::time::timeout(self.cfg.request_timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(net(format!("no complete answer within {:?}", self.cfg.request_timeout))),
        }
    }

    /// A request that must succeed (2xx); returns the body.
    async fn ok(&self, step: &str, method: Method, route: &str, body: Option<&Value>) -> Result<Value, SubmitError> {
        let r = self.call(step, method, route, body).await?;
        if (200..300).contains(&r.status) {
            Ok(r.body)
        } else {
            Err(self.api_error(step, &r))
        }
    }

    fn api_error(&self, step: &str, r: &Reply) -> SubmitError {
        let mut message = match r.body.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None if r.text.trim().is_empty() => "(empty answer)".to_string(),
            // Not GitHub's JSON (a proxy's page?): its start, on one line.
            // Scrubbed before it is cut, so no part of the token survives the cut.
            None => self.token.scrub(&r.text).split_whitespace().collect::<Vec<_>>().join(" ").chars().take(300).collect(),
        };
        if let Some(errors) = r.body.get("errors").and_then(Value::as_array) {
            let items: Vec<String> = errors
                .iter()
                .map(|e| match e.get("message").and_then(Value::as_str) {
                    Some(m) => m.to_string(),
                    None => e.to_string(),
                })
                .collect();
            if !items.is_empty() {
                message += &format!(" ({})", items.join("; "));
            }
        }
        SubmitError::Api { step: step.to_string(), api: self.cfg.api.clone(), status: r.status, message: self.token.scrub(&message) }
    }

    fn field(&self, step: &str, v: &Value, pointer: &str) -> Result<String, SubmitError> {
        v.pointer(pointer).and_then(Value::as_str).map(String::from).ok_or_else(|| SubmitError::Protocol {
            step: step.to_string(),
            api: self.cfg.api.clone(),
            detail: format!("no `{pointer}` in the answer"),
        })
    }
}

/// An error and its sources, joined with `: `, repeated texts dropped.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![];
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Percent-encodes a repository path for a URL path (keeps `/`).
fn encode_path(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out += &format!("%{b:02X}"),
        }
    }
    out
}

async fn run(gh: &Api<'_>, series: &LocalSeries, cfg: &Config, pr: &PrText, log: &mut dyn FnMut(String)) -> Result<Submitted, SubmitError> {
    let up = cfg.upstream.full();
    log(format!("GitHub API {}, upstream {up}", cfg.api));

    // 1. Who we are.
    let step = "reading the token's user (GET /user)";
    let user = gh.ok(step, Method::Get, "/user", None).await?;
    let login = gh.field(step, &user, "/login")?;

    // 2. The fork.
    let step = "finding your fork";
    let mine = gh.call(step, Method::Get, &format!("/repos/{login}/{}", cfg.upstream.name), None).await?;
    let is_fork_of_up = mine.status == 200
        && mine.body.get("fork").and_then(Value::as_bool) == Some(true)
        && ["/parent/full_name", "/source/full_name"].iter().any(|p| mine.body.pointer(p).and_then(Value::as_str) == Some(&up));
    let (fork, fork_reused) = if is_fork_of_up {
        (gh.field(step, &mine.body, "/full_name")?, true)
    } else if mine.status == 200 || mine.status == 404 {
        let step = "creating the fork";
        let made = gh.ok(step, Method::Post, &format!("/repos/{up}/forks"), Some(&json!({}))).await?;
        (gh.field(step, &made, "/full_name")?, false)
    } else {
        return Err(gh.api_error(step, &mine));
    };
    log(format!("fork: {fork} ({})", if fork_reused { "existing, reused" } else { "created" }));

    // 3. The fork's base branch (a new fork's git data appears after a while).
    let step = "reading the fork's base branch";
    let base_route = format!("/repos/{fork}/git/ref/heads/{}", encode_path(&cfg.base));
    let mut tries = 0;
    let base_ref = loop {
        tries += 1;
        let r = gh.call(step, Method::Get, &base_route, None).await?;
        match r.status {
            200 => break r.body,
            404 | 409 if !fork_reused => {
                if tries >= cfg.fork_polls {
                    return Err(SubmitError::ForkNotReady { fork, base: cfg.base.clone(), polls: tries, every: cfg.fork_poll });
                }
                tokio::time::sleep(cfg.fork_poll).await;
            }
            404 => return Err(SubmitError::NoBase { fork, base: cfg.base.clone() }),
            _ => return Err(gh.api_error(step, &r)),
        }
    };
    let base_sha = gh.field(step, &base_ref, "/object/sha")?;
    let base_commit = gh.ok(step, Method::Get, &format!("/repos/{fork}/git/commits/{base_sha}"), None).await?;
    let base_tree = gh.field(step, &base_commit, "/tree/sha")?;
    log(format!("base: {fork}@{} = {}", cfg.base, &base_sha[..base_sha.len().min(12)]));

    // 4. The fork's base must hold what our base holds, wherever the series writes.
    let step = "comparing the fork's base with the checkout's";
    for (path, ours) in &series.base_blobs {
        let r = gh.call(step, Method::Get, &format!("/repos/{fork}/contents/{}?ref={base_sha}", encode_path(path)), None).await?;
        let theirs = match r.status {
            200 => match (r.body.get("type").and_then(Value::as_str), r.body.get("sha").and_then(Value::as_str)) {
                (Some("file" | "symlink"), Some(sha)) => Some(sha.to_string()),
                (kind, _) => Some(format!("a {}", kind.unwrap_or("non-file"))),
            },
            404 => None,
            _ => return Err(gh.api_error(step, &r)),
        };
        if &theirs != ours {
            let show = |b: &Option<String>| b.as_deref().map(|s| format!("blob {s}")).unwrap_or_else(|| "absent".into());
            return Err(SubmitError::BaseDiffers {
                at: format!("{fork}@{} ({base_sha})", cfg.base),
                path: path.clone(),
                ours: show(ours),
                theirs: show(&theirs),
                upstream: up,
            });
        }
    }
    log(format!("base check: the {} path(s) the series touches match the checkout's base", series.base_blobs.len()));

    // 5. Blobs, trees, commits, oldest first, each on the previous one.
    let mut uploaded = std::collections::HashSet::new();
    let (mut parent, mut parent_tree) = (base_sha.clone(), base_tree);
    for c in &series.commits {
        let mut entries = vec![];
        for f in &c.changes {
            match &f.change {
                Change::Write { mode, blob, content } => {
                    if uploaded.insert(blob.clone()) {
                        use base64::Engine;
                        let step = "uploading blobs";
                        let body = json!({"content": base64::engine::general_purpose::STANDARD.encode(content), "encoding": "base64"});
                        let r = gh.ok(step, Method::Post, &format!("/repos/{fork}/git/blobs"), Some(&body)).await?;
                        let sha = gh.field(step, &r, "/sha")?;
                        if &sha != blob {
                            return Err(SubmitError::BlobMismatch { path: f.path.clone(), ours: blob.clone(), theirs: sha });
                        }
                    }
                    entries.push(json!({"path": f.path, "mode": format!("{mode:06o}"), "type": "blob", "sha": blob}));
                }
                Change::Delete => entries.push(json!({"path": f.path, "mode": "100644", "type": "blob", "sha": Value::Null})),
            }
        }
        let step = "creating trees";
        let tree = gh.ok(step, Method::Post, &format!("/repos/{fork}/git/trees"), Some(&json!({"base_tree": parent_tree, "tree": entries}))).await?;
        let tree = gh.field(step, &tree, "/sha")?;
        let person = |p: &crate::series::Person| json!({"name": p.name, "email": p.email, "date": p.iso8601()});
        let body = json!({"message": c.message, "tree": tree, "parents": [parent], "author": person(&c.author), "committer": person(&c.committer)});
        let step = "creating commits";
        let made = gh.ok(step, Method::Post, &format!("/repos/{fork}/git/commits"), Some(&body)).await?;
        parent = gh.field(step, &made, "/sha")?;
        parent_tree = tree;
        log(format!("commit {} on the fork: {}", &parent[..parent.len().min(12)], c.subject()));
    }
    let (head, head_tree) = (parent, parent_tree);

    // 6. The branch: create, keep, or fast-forward; never force.
    let branch = series.branch.clone();
    let step = "reading the fork's branch";
    let existing = gh.call(step, Method::Get, &format!("/repos/{fork}/git/ref/heads/{}", encode_path(&branch)), None).await?;
    let (head, branch_outcome) = match existing.status {
        404 => {
            let step = "creating the branch";
            gh.ok(step, Method::Post, &format!("/repos/{fork}/git/refs"), Some(&json!({"ref": format!("refs/heads/{branch}"), "sha": head}))).await?;
            (head, BranchOutcome::Created)
        }
        200 => {
            let theirs = gh.field(step, &existing.body, "/object/sha")?;
            let same_tree = theirs == head || {
                let c = gh.ok(step, Method::Get, &format!("/repos/{fork}/git/commits/{theirs}"), None).await?;
                gh.field(step, &c, "/tree/sha")? == head_tree
            };
            if same_tree {
                (theirs, BranchOutcome::AlreadyThere)
            } else {
                let step = "updating the branch (fast-forward only)";
                let r = gh
                    .call(step, Method::Patch, &format!("/repos/{fork}/git/refs/heads/{}", encode_path(&branch)), Some(&json!({"sha": head, "force": false})))
                    .await?;
                match r.status {
                    200..=299 => (head, BranchOutcome::Updated),
                    409 | 422 => return Err(SubmitError::BranchDiverged { fork, branch, theirs }),
                    _ => return Err(gh.api_error(step, &r)),
                }
            }
        }
        _ => return Err(gh.api_error(step, &existing)),
    };
    log(format!(
        "branch {fork}:{branch} at {} ({})",
        &head[..head.len().min(12)],
        match branch_outcome {
            BranchOutcome::Created => "created",
            BranchOutcome::Updated => "fast-forwarded",
            BranchOutcome::AlreadyThere => "already there, left as it was",
        }
    ));

    // 7. The draft PR, unless one is open for this head.
    let owner = fork.split('/').next().unwrap_or(&login).to_string();
    let head_label = format!("{owner}:{branch}");
    let step = "looking for an open pull request";
    let query = format!("/repos/{up}/pulls?head={}&state=open", encode_path(&head_label).replace('/', "%2F"));
    let open = gh.ok(step, Method::Get, &query, None).await?;
    let found = open.as_array().and_then(|a| a.first()).cloned();
    let (pr_json, pr_reused) = match found {
        Some(p) => (p, true),
        None => {
            let step = "opening the pull request";
            let body = json!({"title": pr.title, "body": pr.body, "head": head_label, "base": cfg.base, "draft": true, "maintainer_can_modify": true});
            (gh.ok(step, Method::Post, &format!("/repos/{up}/pulls"), Some(&body)).await?, false)
        }
    };
    let step = "reading the pull request";
    let pr_number = pr_json.get("number").and_then(Value::as_u64).ok_or_else(|| SubmitError::Protocol {
        step: step.into(),
        api: cfg.api.clone(),
        detail: "no `number` in the answer".into(),
    })?;
    let pr_url = gh.field(step, &pr_json, "/html_url")?;
    log(format!("pull request #{pr_number} ({}): {pr_url}", if pr_reused { "already open, reused" } else { "opened as a draft" }));
    Ok(Submitted { login, fork, fork_reused, branch, head, branch_outcome, pr_number, pr_url, pr_reused })
}
