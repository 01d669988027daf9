//! A small GitHub API on 127.0.0.1 for the `--submit` tests: the endpoints `submit` uses,
//! backed by a real (bare) git object store, so ids are real git ids and the published
//! branch can be read back. HTTP/1.1, one request per connection (`Connection: close`),
//! one connection at a time. Every request is recorded; faults can be injected per
//! endpoint, with `{auth}` in a fault's body replaced by the Authorization header received
//! (a server that echoes credentials).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use git2::{Oid, Repository, Signature, Time};
use serde_json::{json, Value};

pub const UPSTREAM: &str = "unslothai/unsloth";

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query, as sent (percent-encoded).
    pub target: String,
    pub authorization: Option<String>,
    pub body: Value,
}

/// An injected answer for requests whose method matches and whose path starts with `path`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: &'static str,
    pub path: String,
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone, Default)]
pub struct MockRepo {
    pub fork_of: Option<String>,
    pub refs: BTreeMap<String, Oid>,
    /// GETs of a ref still answered 409 "Git Repository is empty" (a fork being copied).
    pub not_ready: u32,
}

pub struct State {
    pub token: String,
    pub login: String,
    pub odb: Repository,
    pub repos: BTreeMap<String, MockRepo>,
    pub pulls: Vec<Value>,
    pub requests: Vec<Recorded>,
    pub faults: Vec<Fault>,
    /// How many ref GETs a new fork answers 409 before it is ready.
    pub fork_not_ready: u32,
}

pub struct Mock {
    pub api: String,
    pub state: Arc<Mutex<State>>,
    pub dir: PathBuf,
}

fn sig(secs: i64) -> Signature<'static> {
    Signature::new("Upstream", "up@localhost", &Time::new(secs, 0)).unwrap()
}

impl Mock {
    /// A GitHub where `login`'s token is `token` and `unslothai/unsloth`'s `main` holds
    /// `files` (no fork yet).
    pub fn start(dir: &Path, token: &str, login: &str, files: &[(&str, &[u8])]) -> Mock {
        let odb = Repository::init_bare(dir.join("github.git")).unwrap();
        let main = commit_files(&odb, None, files, "upstream main", 1_690_000_000);
        let mut up = MockRepo::default();
        up.refs.insert("main".into(), main);
        let state = State {
            token: token.into(),
            login: login.into(),
            odb,
            repos: BTreeMap::from([(UPSTREAM.to_string(), up)]),
            pulls: vec![],
            requests: vec![],
            faults: vec![],
            fork_not_ready: 2,
        };
        let state = Arc::new(Mutex::new(state));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = serve(stream, &shared);
            }
        });
        Mock { api, state, dir: dir.to_path_buf() }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// `login/unsloth`, a ready fork of the upstream at its current `main`.
    pub fn fork_exists(&self) {
        self.with(|s| {
            let refs = s.repos[UPSTREAM].refs.clone();
            let name = format!("{}/unsloth", s.login);
            s.repos.insert(name, MockRepo { fork_of: Some(UPSTREAM.into()), refs, not_ready: 0 });
        });
    }

    /// A commit on `repo`'s `branch` (created from `from` when absent) writing `files`.
    pub fn commit_on(&self, repo: &str, branch: &str, from: &str, files: &[(&str, &[u8])], message: &str) -> Oid {
        self.with(|s| {
            let r = s.repos.get(repo).unwrap();
            let parent = *r.refs.get(branch).or_else(|| r.refs.get(from)).unwrap();
            let id = commit_files(&s.odb, Some(parent), files, message, 1_695_000_000);
            s.repos.get_mut(repo).unwrap().refs.insert(branch.into(), id);
            id
        })
    }

    pub fn fault(&self, method: &'static str, path: &str, status: u16, body: &str) {
        self.with(|s| s.faults.push(Fault { method, path: path.into(), status, body: body.into() }));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.with(|s| s.requests.clone())
    }

    pub fn clear_requests(&self) {
        self.with(|s| s.requests.clear());
    }

    /// A file of `repo` at `branch`.
    pub fn file(&self, repo: &str, branch: &str, path: &str) -> Option<Vec<u8>> {
        self.with(|s| {
            let id = *s.repos.get(repo)?.refs.get(branch)?;
            let tree = s.odb.find_commit(id).ok()?.tree().ok()?;
            let entry = tree.get_path(Path::new(path)).ok()?;
            Some(s.odb.find_blob(entry.id()).ok()?.content().to_vec())
        })
    }

    pub fn commit(&self, id: &str) -> (String, Vec<String>, String, String) {
        self.with(|s| {
            let c = s.odb.find_commit(Oid::from_str(id).unwrap()).unwrap();
            let parents = c.parent_ids().map(|p| p.to_string()).collect();
            let author = format!("{} <{}> {} {}", c.author().name().unwrap(), c.author().email().unwrap(), c.author().when().seconds(), c.author().when().offset_minutes());
            let committer = format!("{} <{}> {} {}", c.committer().name().unwrap(), c.committer().email().unwrap(), c.committer().when().seconds(), c.committer().when().offset_minutes());
            (c.message().unwrap().to_string(), parents, author, committer)
        })
    }
}

/// A commit of `files` on `parent` (or a root commit), written into `odb`.
fn commit_files(odb: &Repository, parent: Option<Oid>, files: &[(&str, &[u8])], message: &str, secs: i64) -> Oid {
    let mut index = git2::Index::new().unwrap();
    let parent = parent.map(|p| odb.find_commit(p).unwrap());
    if let Some(p) = &parent {
        index.read_tree(&p.tree().unwrap()).unwrap();
    }
    for (path, content) in files {
        index.add(&entry(path, 0o100644, odb.blob(content).unwrap())).unwrap();
    }
    let tree = odb.find_tree(index.write_tree_to(odb).unwrap()).unwrap();
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    odb.commit(None, &sig(secs), &sig(secs), message, &tree, &parents).unwrap()
}

fn entry(path: &str, mode: u32, id: Oid) -> git2::IndexEntry {
    let t = git2::IndexTime::new(0, 0);
    git2::IndexEntry {
        ctime: t,
        mtime: t,
        dev: 0,
        ino: 0,
        mode,
        uid: 0,
        gid: 0,
        file_size: 0,
        id,
        flags: path.len().min(0xfff) as u16,
        flags_extended: 0,
        path: path.as_bytes().to_vec(),
    }
}

/// A listener that accepts and never answers (for timeouts).
pub fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = vec![];
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    api
}

/// An address where nothing listens.
pub fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    api
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(stream: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = vec![];
    if let Some(n) = headers.get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        reader.read_exact(&mut body)?;
    } else if headers.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let auth = headers.get("authorization").cloned();
    let (status, answer) = {
        let mut s = state.lock().unwrap();
        s.requests.push(Recorded { method: method.clone(), target: target.clone(), authorization: auth.clone(), body: body.clone() });
        let path = target.split('?').next().unwrap_or("");
        let fault = s.faults.iter().find(|f| f.method == method && path.starts_with(&f.path)).cloned();
        match fault {
            Some(f) => (f.status, f.body.replace("{auth}", auth.as_deref().unwrap_or(""))),
            None if auth.as_deref() != Some(&format!("Bearer {}", s.token)) => {
                (401, json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}).to_string())
            }
            None => {
                let (st, v) = route(&mut s, &method, &target, &body);
                (st, v.to_string())
            }
        }
    };
    let reason = match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        422 => "Unprocessable Entity",
        _ => "Other",
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    out.flush()
}

fn not_found() -> (u16, Value) {
    (404, json!({"message": "Not Found"}))
}

fn unprocessable(msg: &str) -> (u16, Value) {
    (422, json!({"message": "Validation Failed", "errors": [{"resource": "Git", "code": "custom", "message": msg}]}))
}

fn route(s: &mut State, method: &str, target: &str, body: &Value) -> (u16, Value) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> =
        query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), percent_decode(v))).collect();
    let seg: Vec<String> = path.trim_start_matches('/').split('/').map(percent_decode).collect();
    let seg: Vec<&str> = seg.iter().map(String::as_str).collect();
    match (method, seg.as_slice()) {
        ("GET", ["user"]) => (200, json!({"login": s.login, "id": 1})),
        ("GET", ["repos", o, r]) => {
            let name = format!("{o}/{r}");
            match s.repos.get(&name) {
                None => not_found(),
                Some(repo) => {
                    let parent = repo.fork_of.as_ref().map(|p| json!({"full_name": p}));
                    (200, json!({"full_name": name, "fork": repo.fork_of.is_some(), "parent": parent, "source": parent, "default_branch": "main"}))
                }
            }
        }
        ("POST", ["repos", o, r, "forks"]) => {
            let up = format!("{o}/{r}");
            let Some(upstream) = s.repos.get(&up) else { return not_found() };
            let refs = upstream.refs.clone();
            let mine = format!("{}/{r}", s.login);
            if !s.repos.contains_key(&mine) {
                let not_ready = s.fork_not_ready;
                s.repos.insert(mine.clone(), MockRepo { fork_of: Some(up.clone()), refs, not_ready });
            }
            (202, json!({"full_name": mine, "fork": true, "parent": {"full_name": up}}))
        }
        (_, ["repos", o, r, rest @ ..]) => {
            let name = format!("{o}/{r}");
            if !s.repos.contains_key(&name) {
                return not_found();
            }
            repo_route(s, &name, method, rest, &query, body)
        }
        _ => not_found(),
    }
}

fn repo_route(s: &mut State, name: &str, method: &str, rest: &[&str], query: &BTreeMap<String, String>, body: &Value) -> (u16, Value) {
    let odb = &s.odb;
    let repo = s.repos.get_mut(name).unwrap();
    match (method, rest) {
        ("GET", ["git", "ref", "heads", branch @ ..]) => {
            if repo.not_ready > 0 {
                repo.not_ready -= 1;
                return (409, json!({"message": "Git Repository is empty."}));
            }
            let branch = branch.join("/");
            match repo.refs.get(&branch) {
                Some(id) => (200, json!({"ref": format!("refs/heads/{branch}"), "object": {"sha": id.to_string(), "type": "commit"}})),
                None => not_found(),
            }
        }
        ("GET", ["git", "commits", sha]) => match Oid::from_str(sha).and_then(|id| odb.find_commit(id)) {
            Ok(c) => (200, json!({"sha": sha, "tree": {"sha": c.tree_id().to_string()}, "message": c.message().unwrap_or("")})),
            Err(_) => not_found(),
        },
        ("GET", ["contents", path @ ..]) => {
            let at = query.get("ref").and_then(|r| Oid::from_str(r).ok()).or_else(|| repo.refs.get("main").copied());
            let Some(tree) = at.and_then(|id| odb.find_commit(id).ok()).and_then(|c| c.tree().ok()) else { return not_found() };
            match tree.get_path(Path::new(&path.join("/"))) {
                Ok(e) if e.kind() == Some(git2::ObjectType::Blob) => (200, json!({"type": "file", "path": path.join("/"), "sha": e.id().to_string()})),
                Ok(_) => (200, json!([])),
                Err(_) => not_found(),
            }
        }
        ("POST", ["git", "blobs"]) => {
            if body["encoding"] != "base64" {
                return unprocessable("encoding must be base64 here");
            }
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(body["content"].as_str().unwrap_or("")) else {
                return unprocessable("content is not base64");
            };
            let id = odb.blob(&bytes).unwrap();
            (201, json!({"sha": id.to_string(), "url": ""}))
        }
        ("POST", ["git", "trees"]) => {
            let mut index = git2::Index::new().unwrap();
            if let Some(base) = body["base_tree"].as_str() {
                let Ok(tree) = Oid::from_str(base).and_then(|id| odb.find_tree(id)) else { return unprocessable("base_tree not found") };
                index.read_tree(&tree).unwrap();
            }
            for e in body["tree"].as_array().cloned().unwrap_or_default() {
                let path = e["path"].as_str().unwrap_or("");
                match e["sha"].as_str() {
                    None => {
                        if index.remove_path(Path::new(path)).is_err() || index.get_path(Path::new(path), 0).is_some() {
                            return unprocessable("cannot delete a missing file");
                        }
                    }
                    Some(sha) => {
                        let Ok(id) = Oid::from_str(sha) else { return unprocessable("bad sha") };
                        if odb.find_blob(id).is_err() {
                            return unprocessable("tree.sha is not a blob");
                        }
                        let mode = u32::from_str_radix(e["mode"].as_str().unwrap_or(""), 8).unwrap_or(0);
                        index.add(&entry(path, mode, id)).unwrap();
                    }
                }
            }
            (201, json!({"sha": index.write_tree_to(odb).unwrap().to_string()}))
        }
        ("POST", ["git", "commits"]) => {
            let Ok(tree) = Oid::from_str(body["tree"].as_str().unwrap_or("")).and_then(|id| odb.find_tree(id)) else {
                return unprocessable("tree not found");
            };
            let mut parents = vec![];
            for p in body["parents"].as_array().cloned().unwrap_or_default() {
                match Oid::from_str(p.as_str().unwrap_or("")).and_then(|id| odb.find_commit(id)) {
                    Ok(c) => parents.push(c),
                    Err(_) => return unprocessable("parent not found"),
                }
            }
            let person = |v: &Value| {
                let (secs, off) = parse_date(v["date"].as_str().unwrap_or("")).expect("an ISO 8601 date");
                Signature::new(v["name"].as_str().unwrap(), v["email"].as_str().unwrap(), &Time::new(secs, off)).unwrap()
            };
            let parents: Vec<&git2::Commit<'_>> = parents.iter().collect();
            let id = odb.commit(None, &person(&body["author"]), &person(&body["committer"]), body["message"].as_str().unwrap(), &tree, &parents).unwrap();
            (201, json!({"sha": id.to_string()}))
        }
        ("POST", ["git", "refs"]) => {
            let r = body["ref"].as_str().unwrap_or("");
            let Some(branch) = r.strip_prefix("refs/heads/") else { return unprocessable("ref must start with refs/heads/") };
            let Ok(id) = Oid::from_str(body["sha"].as_str().unwrap_or("")) else { return unprocessable("bad sha") };
            if repo.refs.contains_key(branch) {
                return unprocessable("Reference already exists");
            }
            repo.refs.insert(branch.to_string(), id);
            (201, json!({"ref": r, "object": {"sha": id.to_string()}}))
        }
        ("PATCH", ["git", "refs", "heads", branch @ ..]) => {
            let branch = branch.join("/");
            let Some(old) = repo.refs.get(&branch).copied() else { return unprocessable("Reference does not exist") };
            let Ok(new) = Oid::from_str(body["sha"].as_str().unwrap_or("")) else { return unprocessable("bad sha") };
            let force = body["force"].as_bool().unwrap_or(false);
            if !force && old != new && !odb.graph_descendant_of(new, old).unwrap_or(false) {
                return (422, json!({"message": "Update is not a fast forward"}));
            }
            repo.refs.insert(branch.clone(), new);
            (200, json!({"ref": format!("refs/heads/{branch}"), "object": {"sha": new.to_string()}}))
        }
        ("GET", ["pulls"]) => {
            let head = query.get("head").cloned().unwrap_or_default();
            let state = query.get("state").cloned().unwrap_or_else(|| "open".into());
            let found: Vec<Value> = s.pulls.iter().filter(|p| p["head"]["label"] == head.as_str() && p["state"] == state.as_str()).cloned().collect();
            (200, Value::Array(found))
        }
        ("POST", ["pulls"]) => {
            let head = body["head"].as_str().unwrap_or("").to_string();
            let base = body["base"].as_str().unwrap_or("").to_string();
            let Some((owner, branch)) = head.split_once(':') else { return unprocessable("head must be owner:branch") };
            let head_repo = format!("{owner}/{}", name.split('/').nth(1).unwrap());
            let has_head = s.repos.get(&head_repo).is_some_and(|r| r.refs.contains_key(branch));
            if !has_head || !s.repos[name].refs.contains_key(&base) {
                return (422, json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "field": "head", "code": "invalid"}]}));
            }
            let number = 7000 + s.pulls.len() as u64;
            let pr = json!({
                "number": number,
                "html_url": format!("https://github.com/{name}/pull/{number}"),
                "state": "open",
                "draft": body["draft"],
                "title": body["title"],
                "body": body["body"],
                "head": {"label": head, "ref": branch},
                "base": {"ref": base},
                "maintainer_can_modify": body["maintainer_can_modify"],
            });
            s.pulls.push(pr.clone());
            (201, pr)
        }
        _ => not_found(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS` then `Z` or `+HH:MM` / `-HH:MM`: (Unix seconds, offset minutes).
fn parse_date(d: &str) -> Option<(i64, i32)> {
    let num = |a: usize, b: usize| d.get(a..b)?.parse::<i64>().ok();
    let (y, m, day, hh, mm, ss) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let off = match d.get(19..)? {
        "Z" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o.get(1..3)?.parse::<i32>().ok()? * 60 + o.get(4..6)?.parse::<i32>().ok()?)
        }
    };
    // days_from_civil (H. Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 + ss - i64::from(off) * 60, off))
}
