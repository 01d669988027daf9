//! Running a fix's verification: the checks a series declares in its `verify.json`.
//!
//! Every series folder (`issue-fixes/patches/<slug>/`) holds a [`MANIFEST`] that says how the
//! fix is checked, in two kinds:
//!
//! - **CPU checks** run on this machine, in the patched source tree (the fix branch's files,
//!   exported), each a `bash` command with what it needs: executables on `PATH` (`tools`) and
//!   Python modules the interpreter must find (`python`). A check whose needs are not met is
//!   *skipped* with the reason named ("`python3` (Python 3.11.7) has no torch, pytest"); it
//!   is never reported as passed.
//! - **GPU checks** run through the device bundle: `bundle` builds what the GPU machine
//!   carries (here), `run` runs there and writes its results into `$OUT`. Where this machine
//!   has a GPU the two run here; otherwise the exact device command is printed and the
//!   check is read from a recorded run: the newest folder under `recorded` (committed, one
//!   folder per device run, named `<card>-<YYYY-MM-DD>`) or a folder the user passes
//!   (`--gpu-results DIR`, the files a device call brought back). Its `facts` are values
//!   read from the run's files (a JSON pointer, or the last line holding a text) with what
//!   each must be; the check passes when every fact holds, and the draft cites the file,
//!   the date and the card.
//!
//! [`run_checks`] returns a [`Report`]: one [`Record`] per check (passed / failed / skipped,
//! why, the numbers), which the PR draft's "How it was verified" is written from
//! ([`Report::markdown`]) and which `cargo xtask pr` saves as JSON beside the draft.
//!
//! ```
//! let m = issue_fixes::verify::Manifest::parse(
//!     r#"{"cpu": [{"name": "unit tests", "run": "echo 3 passed", "summary": "passed"}]}"#,
//!     std::path::Path::new("verify.json"),
//! ).unwrap();
//! assert_eq!(m.cpu[0].name, "unit tests");
//! let e = issue_fixes::verify::Manifest::parse(r#"{"cpu": [{"name": "x"}]}"#, "bad.json".as_ref()).unwrap_err();
//! assert_eq!(e.to_string(), "bad.json: `cpu[0].run`: missing (a bash command)");
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;

/// The file name of a series' verification manifest.
pub const MANIFEST: &str = "verify.json";

/// How long a CPU check may run unless its manifest says otherwise.
pub const DEFAULT_TIMEOUT_S: u64 = 900;

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The manifest.
        file: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{file}: not valid JSON: {source}")]
    Json {
        /// The manifest.
        file: String,
        /// serde_json's error (with line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A field is missing, of the wrong type, unknown or out of range.
    #[error("{file}: `{field}`: {problem}")]
    Field {
        /// The manifest.
        file: String,
        /// The field's path, e.g. `gpu[0].facts[2].expect.at_least`.
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
}

/// A check run on this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuCheck {
    /// What it checks, as the draft names it.
    pub name: String,
    /// A bash command, run in the patched tree with `PYTHON`, `TREE`, `REPO` and `OUT` set
    /// and `PYTHONPATH` starting with the tree.
    pub run: String,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
    /// Executables it needs on `PATH`.
    pub tools: Vec<String>,
    /// Python modules (import names) the interpreter must find; non-empty means it needs
    /// the interpreter itself too.
    pub python: Vec<String>,
    /// The output's last line holding one of these texts is the check's numbers
    /// (`["passed", "failed"]` picks pytest's "55 passed, 2 skipped in 23.9s").
    pub summary: Vec<String>,
    /// Seconds before it is stopped and counted as failed.
    pub timeout_s: u64,
}

/// Where in a result file a value is.
#[derive(Debug, Clone, PartialEq)]
pub enum At {
    /// A JSON pointer into the file (`/tests/unsloth-test-patched/rc`).
    Pointer(String),
    /// The last line holding this text (trimmed of spaces and pytest's `=`).
    LineWith(String),
    /// Line number, from 1.
    Line(usize),
}

/// A value in a result file.
#[derive(Debug, Clone, PartialEq)]
pub struct Locator {
    /// The file, relative to the run's folder.
    pub file: String,
    /// Where in it.
    pub at: At,
}

/// What a fact's value must be; every condition given must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expect {
    /// Equal to this (both trimmed).
    pub equals: Option<String>,
    /// Holds every one of these texts.
    pub contains: Vec<String>,
    /// Holds none of these texts.
    pub not_contains: Vec<String>,
    /// A number at least this.
    pub at_least: Option<f64>,
    /// A number at most this.
    pub at_most: Option<f64>,
}

/// One value a GPU run must show.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    /// What it is, as the draft names it.
    pub label: String,
    /// Where it is.
    pub at: Locator,
    /// What it must be.
    pub expect: Expect,
}

/// A check run on the GPU machine through the device bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCheck {
    /// What it checks.
    pub name: String,
    /// Builds what the device call carries, run here from the repository root (optional).
    pub bundle: Option<String>,
    /// The command on the GPU machine, from the repository root; writes into `$OUT`.
    pub run: String,
    /// The paths the device call carries.
    pub carry: Vec<String>,
    /// The device call's time limit.
    pub timeout_s: u64,
    /// Folder (from the repository root) of recorded runs, one sub-folder per run.
    pub recorded: String,
    /// Where a run names its card (first line of the value).
    pub card: Locator,
    /// What the run must show.
    pub facts: Vec<Fact>,
}

impl GpuCheck {
    /// The device call, as the `run` tool takes it.
    pub fn device_call(&self) -> String {
        let carry: Vec<String> = self.carry.iter().map(|c| format!("{c:?}")).collect();
        format!(
            "run(command={:?}, carry=[{}], kind=\"nvidia-h100-x1\", timeout_s={})",
            self.run,
            carry.join(", "),
            self.timeout_s
        )
    }
}

/// A series' verification manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The file it was read from.
    pub path: PathBuf,
    /// Checks run here.
    pub cpu: Vec<CpuCheck>,
    /// Checks run on the GPU machine.
    pub gpu: Vec<GpuCheck>,
}

/// Reads typed fields out of a JSON object, naming the field in every error.
struct Fields<'a> {
    file: &'a str,
    path: String,
    map: &'a serde_json::Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(file: &'a str, path: String, v: &'a Value, known: &[&str]) -> Result<Fields<'a>, ManifestError> {
        let map = v.as_object().ok_or_else(|| err(file, &path, format!("expected an object, found {}", kind(v))))?;
        for k in map.keys() {
            if !known.contains(&k.as_str()) {
                return Err(err(file, &join(&path, k), format!("unknown field (known: {})", known.join(", "))));
            }
        }
        Ok(Fields { file, path, map })
    }

    fn field(&self, k: &str) -> String {
        join(&self.path, k)
    }

    fn err(&self, k: &str, problem: impl Into<String>) -> ManifestError {
        err(self.file, &self.field(k), problem.into())
    }

    fn opt_str(&self, k: &str) -> Result<Option<String>, ManifestError> {
        match self.map.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(self.err(k, "empty")),
            Some(v) => Err(self.err(k, format!("expected a string, found {}", kind(v)))),
        }
    }

    fn str(&self, k: &str, what: &str) -> Result<String, ManifestError> {
        self.opt_str(k)?.ok_or_else(|| self.err(k, format!("missing ({what})")))
    }

    fn strs(&self, k: &str) -> Result<Vec<String>, ManifestError> {
        match self.map.get(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                    other => Err(err(self.file, &format!("{}[{i}]", self.field(k)), format!("expected a non-empty string, found {}", kind(other)))),
                })
                .collect(),
            Some(v) => Err(self.err(k, format!("expected a list of strings, found {}", kind(v)))),
        }
    }

    fn list(&self, k: &str) -> Result<&'a [Value], ManifestError> {
        match self.map.get(k) {
            None => Ok(&[]),
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.err(k, format!("expected a list, found {}", kind(v)))),
        }
    }

    fn opt_f64(&self, k: &str) -> Result<Option<f64>, ManifestError> {
        match self.map.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(k, format!("expected a number, found {}", kind(v)))),
        }
    }

    fn timeout(&self, k: &str, default: u64) -> Result<u64, ManifestError> {
        match self.map.get(k) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n),
                _ => Err(self.err(k, format!("expected a whole number of seconds > 0, found {v}"))),
            },
        }
    }
}

fn err(file: &str, field: &str, problem: String) -> ManifestError {
    ManifestError::Field { file: file.to_string(), field: field.to_string(), problem }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn locator(file: &str, path: String, v: &Value) -> Result<Locator, ManifestError> {
    let f = Fields::new(file, path, v, &["file", "pointer", "line_with", "line"])?;
    let name = f.str("file", "the result file, relative to the run's folder")?;
    let pointer = f.opt_str("pointer")?;
    let line_with = f.opt_str("line_with")?;
    let line = match f.map.get("line") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => Some(n as usize),
            _ => return Err(f.err("line", format!("expected a line number from 1, found {v}"))),
        },
    };
    let at = match (pointer, line_with, line) {
        (Some(p), None, None) if p.starts_with('/') => At::Pointer(p),
        (Some(_), None, None) => return Err(f.err("pointer", "a JSON pointer starts with `/`")),
        (None, Some(t), None) => At::LineWith(t),
        (None, None, Some(n)) => At::Line(n),
        _ => return Err(err(file, &f.path, "give exactly one of `pointer`, `line_with`, `line`".into())),
    };
    Ok(Locator { file: name, at })
}

impl Manifest {
    /// Reads and checks `dir/verify.json`.
    pub fn read(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io { file: path.display().to_string(), source })?;
        Manifest::parse(&text, &path)
    }

    /// Parses a manifest's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let file = file.as_str();
        let v: Value = serde_json::from_str(text).map_err(|source| ManifestError::Json { file: file.to_string(), source })?;
        let top = Fields::new(file, String::new(), &v, &["cpu", "gpu", "comment"])?;
        let mut cpu = vec![];
        for (i, c) in top.list("cpu")?.iter().enumerate() {
            let f = Fields::new(file, format!("cpu[{i}]"), c, &["name", "run", "env", "needs", "summary", "timeout_s"])?;
            let mut env = BTreeMap::new();
            if let Some(e) = f.map.get("env") {
                let obj = e.as_object().ok_or_else(|| f.err("env", format!("expected an object of strings, found {}", kind(e))))?;
                for (k, v) in obj {
                    let v = v.as_str().ok_or_else(|| err(file, &format!("cpu[{i}].env.{k}"), format!("expected a string, found {}", kind(v))))?;
                    env.insert(k.clone(), v.to_string());
                }
            }
            let (tools, python) = match f.map.get("needs") {
                None => (vec![], vec![]),
                Some(n) => {
                    let n = Fields::new(file, f.field("needs"), n, &["tools", "python"])?;
                    (n.strs("tools")?, n.strs("python")?)
                }
            };
            cpu.push(CpuCheck {
                name: f.str("name", "what the check checks")?,
                run: f.str("run", "a bash command")?,
                env,
                tools,
                python,
                summary: match f.map.get("summary") {
                    Some(Value::String(one)) if !one.trim().is_empty() => vec![one.clone()],
                    _ => f.strs("summary")?,
                },
                timeout_s: f.timeout("timeout_s", DEFAULT_TIMEOUT_S)?,
            });
        }
        let mut gpu = vec![];
        for (i, g) in top.list("gpu")?.iter().enumerate() {
            let f = Fields::new(file, format!("gpu[{i}]"), g, &["name", "bundle", "run", "carry", "timeout_s", "recorded", "card", "facts"])?;
            let card = f.map.get("card").ok_or_else(|| f.err("card", "missing (where a run names its GPU)"))?;
            let mut facts = vec![];
            for (j, x) in f.list("facts")?.iter().enumerate() {
                let fx = Fields::new(file, format!("gpu[{i}].facts[{j}]"), x, &["label", "file", "pointer", "line_with", "line", "expect"])?;
                let mut at_only = x.clone();
                if let Some(o) = at_only.as_object_mut() {
                    o.remove("label");
                    o.remove("expect");
                }
                let expect = match fx.map.get("expect") {
                    None => return Err(fx.err("expect", "missing (what the value must be)")),
                    Some(e) => {
                        let ef = Fields::new(file, fx.field("expect"), e, &["equals", "contains", "not_contains", "at_least", "at_most"])?;
                        let one_or_many = |k: &str| -> Result<Vec<String>, ManifestError> {
                            match ef.map.get(k) {
                                Some(Value::String(s)) => Ok(vec![s.clone()]),
                                _ => ef.strs(k),
                            }
                        };
                        let x = Expect {
                            equals: ef.opt_str("equals")?,
                            contains: one_or_many("contains")?,
                            not_contains: one_or_many("not_contains")?,
                            at_least: ef.opt_f64("at_least")?,
                            at_most: ef.opt_f64("at_most")?,
                        };
                        if x == Expect::default() {
                            return Err(fx.err("expect", "no condition (equals, contains, not_contains, at_least, at_most)"));
                        }
                        x
                    }
                };
                facts.push(Fact { label: fx.str("label", "what the value is")?, at: locator(file, format!("gpu[{i}].facts[{j}]"), &at_only)?, expect });
            }
            if facts.is_empty() {
                return Err(f.err("facts", "missing or empty (what a run must show)"));
            }
            gpu.push(GpuCheck {
                name: f.str("name", "what the check checks")?,
                bundle: f.opt_str("bundle")?,
                run: f.str("run", "the command on the GPU machine")?,
                carry: f.strs("carry")?,
                timeout_s: f.timeout("timeout_s", 300)?,
                recorded: f.str("recorded", "the folder of recorded runs, from the repository root")?,
                card: locator(file, format!("gpu[{i}].card"), card)?,
                facts,
            });
        }
        if cpu.is_empty() && gpu.is_empty() {
            return Err(err(file, "cpu", "no checks: a series needs at least one CPU or GPU check".into()));
        }
        Ok(Manifest { path: path.to_path_buf(), cpu, gpu })
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It ran (or its recorded run was read) and showed what it must.
    Passed,
    /// It ran and did not (or its recorded run does not show it).
    Failed,
    /// It did not run; [`Record::reason`] says why.
    Skipped,
}

/// Where a check's result comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Run now, on this machine's CPU.
    Here,
    /// A GPU check run now, on this machine's GPU.
    GpuHere,
    /// A GPU check read from a recorded device run.
    GpuRecorded,
}

/// The device run a GPU check's result was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunInfo {
    /// Its folder (from the repository root when inside it).
    pub dir: String,
    /// `YYYY-MM-DD`: from the folder's name, else the card file's modification date.
    pub date: String,
    /// The card, as the run names it.
    pub card: String,
}

/// One fact read from a GPU run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FactResult {
    /// The fact's label.
    pub label: String,
    /// `file` and where in it.
    pub source: String,
    /// The value read, if any.
    pub value: Option<String>,
    /// Whether it is what it must be.
    pub ok: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// The check's name.
    pub name: String,
    /// Where the result comes from.
    pub source: Source,
    /// Passed, failed or skipped.
    pub outcome: Outcome,
    /// Why it failed or was skipped.
    pub reason: Option<String>,
    /// Its numbers: the summary line of its output.
    pub summary: Option<String>,
    /// The command (CPU checks) or the device call (GPU checks).
    pub command: String,
    /// Wall time, when it ran.
    pub seconds: Option<f64>,
    /// Its full output, when it ran.
    pub log: Option<String>,
    /// The output's last lines, when it ran.
    pub tail: Option<String>,
    /// The device run read (GPU checks).
    pub run: Option<RunInfo>,
    /// The facts read from it (GPU checks).
    pub facts: Vec<FactResult>,
}

/// Every check's outcome for one series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The manifest.
    pub manifest: String,
    /// The machine the checks ran on (interpreter, GPU or none).
    pub machine: String,
    /// `--no-verify`: nothing was run and nothing gates the draft.
    pub no_verify: bool,
    /// One per check, CPU checks first, in manifest order.
    pub records: Vec<Record>,
    /// For each GPU check not run here: how to run it on the GPU machine.
    pub device_commands: Vec<String>,
}

impl Report {
    /// The checks that failed.
    pub fn failed(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| r.outcome == Outcome::Failed).collect()
    }

    /// Whether the draft may be marked ready: no check failed, and verification ran.
    pub fn ready(&self) -> bool {
        !self.no_verify && self.failed().is_empty()
    }

    /// The draft's "How it was verified" records: what ran here now, what was read from a
    /// recorded GPU run (with its card), what was skipped and why. Holds no times or
    /// absolute paths, so a draft reads the same wherever it is made.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        if self.no_verify {
            s += "**Not verified by this draft's run**: `cargo xtask pr` was given `--no-verify`, so no check ran and none gates this draft. Recorded GPU results below are what they were.\n\n";
        }
        if self.records.is_empty() {
            return s + "No check was run or read for this draft.\n";
        }
        let count = |o: Outcome| self.records.iter().filter(|r| r.outcome == o).count();
        s += &format!(
            "Checks declared in the series' `verify.json`, run by `cargo xtask pr`: {} passed, {} failed, {} skipped.\n\n",
            count(Outcome::Passed),
            count(Outcome::Failed),
            count(Outcome::Skipped)
        );
        s += "| check | where | result |\n|---|---|---|\n";
        for r in &self.records {
            let place = match (&r.source, &r.run) {
                (Source::Here, _) => "this machine, CPU, now".to_string(),
                (Source::GpuHere, Some(run)) => format!("this machine's GPU ({}), now", run.card),
                (Source::GpuHere, None) => "this machine's GPU, now".to_string(),
                (Source::GpuRecorded, Some(run)) => format!("recorded GPU run `{}`, {}, {}", run.dir, run.date, run.card),
                (Source::GpuRecorded, None) => "GPU machine (no recorded run)".to_string(),
            };
            let result = match r.outcome {
                Outcome::Passed => format!("**passed**{}", r.summary.as_deref().map(|x| format!(": {x}")).unwrap_or_default()),
                Outcome::Failed => format!("**failed**: {}", r.reason.as_deref().unwrap_or("see its log")),
                Outcome::Skipped => format!("skipped: {}", r.reason.as_deref().unwrap_or("not run")),
            };
            s += &format!("| {} | {} | {} |\n", cell(&r.name), cell(&place), cell(&result));
        }
        for r in self.records.iter().filter(|r| !r.facts.is_empty()) {
            let run = r.run.as_ref().map(|x| format!(" (`{}`, {}, {})", x.dir, x.date, x.card)).unwrap_or_default();
            s += &format!("\n{}{run}:\n\n", r.name);
            for f in &r.facts {
                let value = f.value.as_deref().map(|v| format!("`{}`", one_line(v))).unwrap_or_else(|| "(not found)".into());
                let mark = if f.ok { "holds".to_string() } else { format!("**does not hold**: {}", f.problem.as_deref().unwrap_or("")) };
                s += &format!("- {}: {value} ({}), {mark}\n", f.label, f.source);
            }
        }
        s
    }
}

fn cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What this machine offers the checks.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The Python interpreter checks use (`$PYTHON`): a name on `PATH` or a path.
    pub python: String,
    /// The GPU, when one is present (`nvidia-smi -L`'s first line).
    pub gpu: Option<String>,
}

impl Machine {
    /// This machine: `python` (default `python3`) and the GPU `nvidia-smi -L` lists, if any.
    pub fn detect(python: Option<String>) -> Machine {
        let gpu = Command::new("nvidia-smi")
            .arg("-L")
            .stdin(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().find(|l| l.starts_with("GPU ")).map(|l| l.trim().to_string()));
        Machine { python: python.unwrap_or_else(|| "python3".into()), gpu }
    }
}

/// Where the checks of one series run and write.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The qlora-kit repository root (`$REPO`; recorded runs and bundles are relative to it).
    pub repo: &'a Path,
    /// The patched source tree (`$TREE`, the CPU checks' working directory).
    pub tree: &'a Path,
    /// Where logs and GPU outputs go (emptied of earlier logs by the caller if it wants).
    pub out: &'a Path,
    /// This machine.
    pub machine: &'a Machine,
    /// `--gpu-results DIR`: read GPU checks from this run instead of the recorded ones.
    pub gpu_results: Option<&'a Path>,
    /// `--no-verify`: run nothing (recorded GPU runs are still read and cited).
    pub no_verify: bool,
}

/// Runs (or reads) every check of `m`, CPU checks first, calling `log` with a line as each
/// one starts and ends.
pub fn run_checks(m: &Manifest, cx: &Context<'_>, log: &mut dyn FnMut(&str)) -> Report {
    let mut records = vec![];
    let mut device_commands = vec![];
    let python = Python::probe(&cx.machine.python, cx.tree);
    for (i, c) in m.cpu.iter().enumerate() {
        log(&format!("[cpu {}/{}] {}", i + 1, m.cpu.len(), c.name));
        let r = run_cpu(c, i, cx, &python);
        log(&format!("    {}", line_of(&r)));
        records.push(r);
    }
    for (i, g) in m.gpu.iter().enumerate() {
        log(&format!("[gpu {}/{}] {}", i + 1, m.gpu.len(), g.name));
        let here = cx.machine.gpu.is_some() && !cx.no_verify;
        if !here {
            device_commands.push(device_text(g));
        }
        let r = if here { run_gpu_here(g, i, cx) } else { read_recorded(g, cx) };
        log(&format!("    {}", line_of(&r)));
        records.push(r);
    }
    let machine = format!(
        "{}; {}",
        python.describe(),
        cx.machine.gpu.as_deref().map(|g| format!("GPU: {g}")).unwrap_or_else(|| "no GPU (nvidia-smi lists none)".into())
    );
    Report { manifest: rel(cx.repo, &m.path), machine, no_verify: cx.no_verify, records, device_commands }
}

fn line_of(r: &Record) -> String {
    let what = match r.outcome {
        Outcome::Passed => "passed",
        Outcome::Failed => "FAILED",
        Outcome::Skipped => "skipped",
    };
    let detail = match r.outcome {
        Outcome::Passed => r.summary.clone(),
        _ => r.reason.clone(),
    };
    let secs = r.seconds.map(|s| format!(" in {s:.1} s")).unwrap_or_default();
    let from = r.run.as_ref().filter(|_| r.source == Source::GpuRecorded).map(|x| format!(" [recorded run {}, {}, {}]", x.dir, x.date, x.card)).unwrap_or_default();
    format!("{what}{secs}{}{from}", detail.map(|d| format!(": {}", one_line(&d))).unwrap_or_default())
}

fn device_text(g: &GpuCheck) -> String {
    let mut s = format!("{}:\n", g.name);
    if let Some(b) = &g.bundle {
        s += &format!("  here, from the repository root:  {b}\n");
    }
    s += &format!("  on the GPU machine:  {}\n", g.device_call());
    s += &format!("  then pass the folder its files came back to as --gpu-results DIR, or keep them as {}/<card>-<YYYY-MM-DD>/", g.recorded);
    s
}

/// The interpreter, as found: its path and version, or why it cannot be used.
struct Python {
    name: String,
    found: Result<(String, String), String>,
    tree: PathBuf,
}

impl Python {
    fn probe(name: &str, tree: &Path) -> Python {
        let found = match which(name) {
            None => Err(format!("no Python interpreter `{name}` (not on PATH or not a file)")),
            Some(path) => {
                let out = Command::new(&path).args(["-c", "import sys; print(sys.version.split()[0])"]).stdin(Stdio::null()).output();
                match out {
                    Ok(o) if o.status.success() => Ok((path.display().to_string(), String::from_utf8_lossy(&o.stdout).trim().to_string())),
                    Ok(o) => Err(format!("`{}` does not run: {}", path.display(), tail(&String::from_utf8_lossy(&o.stderr), 3))),
                    Err(e) => Err(format!("`{}` does not start: {e}", path.display())),
                }
            }
        };
        Python { name: name.to_string(), found, tree: tree.to_path_buf() }
    }

    fn describe(&self) -> String {
        match &self.found {
            Ok((path, version)) => format!("Python {version} at {path}"),
            Err(why) => why.clone(),
        }
    }

    /// The modules of `wanted` this interpreter cannot find, with the check's environment.
    fn missing(&self, wanted: &[String], env: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
        let (path, _) = self.found.as_ref().map_err(Clone::clone)?;
        let mut cmd = Command::new(path);
        cmd.args(["-c", "import importlib.util, sys\nprint(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"])
            .args(wanted)
            .current_dir(&self.tree)
            .stdin(Stdio::null());
        check_env(&mut cmd, &self.tree, env);
        match cmd.output() {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect()),
            Ok(o) => Err(format!("`{path}` could not look for modules: {}", tail(&String::from_utf8_lossy(&o.stderr), 3))),
            Err(e) => Err(format!("`{path}` does not start: {e}")),
        }
    }
}

/// A program on `PATH` (or a path to one).
fn which(name: &str) -> Option<PathBuf> {
    let is_exe = |p: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
        }
        #[cfg(not(unix))]
        {
            p.is_file()
        }
    };
    if name.contains('/') {
        // Absolute, as checks run in another folder; not canonical: a venv's python is a
        // symlink whose own path is what makes it the venv's.
        let p = std::path::absolute(name).ok()?;
        return is_exe(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| is_exe(p))
}

/// The environment every CPU check (and the module probe) gets.
fn check_env(cmd: &mut Command, tree: &Path, env: &BTreeMap<String, String>) {
    let mut paths = vec![tree.to_path_buf()];
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&old));
    }
    if let Ok(joined) = std::env::join_paths(paths) {
        cmd.env("PYTHONPATH", joined);
    }
    // The tree is exported from git: keep it free of bytecode between runs.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    // Upstream code runs here: it gets no GitHub token to print.
    cmd.env_remove(crate::token::TOKEN_VAR);
    cmd.envs(env);
}

fn skipped(name: &str, source: Source, command: &str, reason: String) -> Record {
    Record {
        name: name.to_string(),
        source,
        outcome: Outcome::Skipped,
        reason: Some(reason),
        summary: None,
        command: command.to_string(),
        seconds: None,
        log: None,
        tail: None,
        run: None,
        facts: vec![],
    }
}

fn run_cpu(c: &CpuCheck, index: usize, cx: &Context<'_>, python: &Python) -> Record {
    if cx.no_verify {
        return skipped(&c.name, Source::Here, &c.run, "--no-verify".into());
    }
    let missing_tools: Vec<&str> = std::iter::once("bash").chain(c.tools.iter().map(String::as_str)).filter(|t| which(t).is_none()).collect();
    if !missing_tools.is_empty() {
        return skipped(&c.name, Source::Here, &c.run, format!("this machine has no {} (not on PATH)", list(&missing_tools)));
    }
    if !c.python.is_empty() {
        match python.missing(&c.python, &c.env) {
            Err(why) => return skipped(&c.name, Source::Here, &c.run, why),
            Ok(missing) if !missing.is_empty() => {
                let (path, version) = python.found.as_ref().expect("missing() succeeded");
                let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
                return skipped(
                    &c.name,
                    Source::Here,
                    &c.run,
                    format!("`{}` ({path}, Python {version}) has no {} (pass --python with an interpreter that has them)", python.name, list(&missing)),
                );
            }
            Ok(_) => {}
        }
    }
    let out = cx.out.join(format!("cpu-{}", index + 1));
    let log_path = cx.out.join(format!("cpu-{}.log", index + 1));
    let _ = std::fs::create_dir_all(&out);
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &c.run]).current_dir(cx.tree);
    check_env(&mut cmd, cx.tree, &c.env);
    cmd.env("PYTHON", python.found.as_ref().map(|(p, _)| p.clone()).unwrap_or_else(|_| python.name.clone()))
        .env("TREE", cx.tree)
        .env("REPO", cx.repo)
        .env("OUT", &out);
    let ran = run_logged(cmd, &log_path, Duration::from_secs(c.timeout_s));
    finish(&c.name, Source::Here, &c.run, &c.summary, ran, &log_path)
}

/// What running a command gave.
struct Ran {
    /// Exit code, or why there is none.
    status: Result<i32, String>,
    seconds: f64,
    output: String,
}

fn finish(name: &str, source: Source, command: &str, summary: &[String], ran: Ran, log_path: &Path) -> Record {
    let summary = ran.output.lines().rev().find(|l| summary.iter().any(|n| l.contains(n.as_str()))).map(trim_line);
    let (outcome, reason) = match &ran.status {
        Ok(0) => (Outcome::Passed, None),
        Ok(code) => (Outcome::Failed, Some(format!("exit code {code}{}", summary.as_deref().map(|s| format!(" ({s})")).unwrap_or_default()))),
        Err(why) => (Outcome::Failed, Some(why.clone())),
    };
    Record {
        name: name.to_string(),
        source,
        outcome,
        reason,
        summary,
        command: command.to_string(),
        seconds: Some((ran.seconds * 10.0).round() / 10.0),
        log: Some(log_path.display().to_string()),
        tail: Some(tail(&ran.output, 20)),
        run: None,
        facts: vec![],
    }
}

/// Runs `cmd` with its output (stdout and stderr) going to `log_path`, stopping it (and
/// every process it started) after `limit`.
fn run_logged(mut cmd: Command, log_path: &Path, limit: Duration) -> Ran {
    let start = Instant::now();
    let file = match std::fs::File::create(log_path) {
        Ok(f) => f,
        Err(e) => return Ran { status: Err(format!("cannot write {}: {e}", log_path.display())), seconds: 0.0, output: String::new() },
    };
    let err_file = match file.try_clone() {
        Ok(f) => f,
        Err(e) => return Ran { status: Err(format!("cannot write {}: {e}", log_path.display())), seconds: 0.0, output: String::new() },
    };
    cmd.stdin(Stdio::null()).stdout(file).stderr(err_file);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a timeout stops pytest's workers too.
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ran { status: Err(format!("could not start: {e}")), seconds: 0.0, output: String::new() },
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s.code().unwrap_or(-1)),
            Ok(None) if start.elapsed() >= limit => {
                #[cfg(unix)]
                let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).stderr(Stdio::null()).status();
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {} s and was stopped", limit.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("waiting for it failed: {e}")),
        }
    };
    let output = String::from_utf8_lossy(&std::fs::read(log_path).unwrap_or_default()).into_owned();
    Ran { status, seconds: start.elapsed().as_secs_f64(), output }
}

fn run_gpu_here(g: &GpuCheck, index: usize, cx: &Context<'_>) -> Record {
    let out = cx.out.join(format!("gpu-{}", index + 1));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::create_dir_all(&out);
    let shell = |command: &str| {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", command]).current_dir(cx.repo).env("OUT", &out).env("REPO", cx.repo).env_remove(crate::token::TOKEN_VAR);
        cmd
    };
    let mut seconds = 0.0;
    if let Some(b) = &g.bundle {
        let log_path = cx.out.join(format!("gpu-{}-bundle.log", index + 1));
        let ran = run_logged(shell(b), &log_path, Duration::from_secs(DEFAULT_TIMEOUT_S));
        seconds += ran.seconds;
        if ran.status != Ok(0) {
            let mut r = finish(&g.name, Source::GpuHere, b, &[], ran, &log_path);
            r.reason = Some(format!("building the bundle failed: {}", r.reason.unwrap_or_default()));
            return r;
        }
    }
    let log_path = cx.out.join(format!("gpu-{}.log", index + 1));
    let ran = run_logged(shell(&g.run), &log_path, Duration::from_secs(g.timeout_s));
    seconds += ran.seconds;
    let mut r = finish(&g.name, Source::GpuHere, &g.run, &[], ran, &log_path);
    r.seconds = Some((seconds * 10.0).round() / 10.0);
    if r.outcome == Outcome::Failed {
        return r;
    }
    let card = read_value(&out, &g.card).ok().map(|c| first_line(&c)).or_else(|| cx.machine.gpu.clone()).unwrap_or_else(|| "unknown card".into());
    r.run = Some(RunInfo { dir: rel(cx.repo, &out), date: date_of(SystemTime::now()), card });
    judge(&mut r, g, &out);
    r
}

/// Evaluates `g`'s facts against the run in `dir` into `r`.
fn judge(r: &mut Record, g: &GpuCheck, dir: &Path) {
    r.facts = g.facts.iter().map(|f| fact(f, dir)).collect();
    let bad: Vec<&FactResult> = r.facts.iter().filter(|f| !f.ok).collect();
    if bad.is_empty() {
        r.outcome = Outcome::Passed;
        r.reason = None;
        r.summary = Some(r.facts.iter().map(|f| format!("{}: {}", f.label, one_line(f.value.as_deref().unwrap_or("")))).collect::<Vec<_>>().join("; "));
    } else {
        r.outcome = Outcome::Failed;
        r.reason = Some(bad.iter().map(|f| format!("{}: {}", f.label, f.problem.as_deref().unwrap_or(""))).collect::<Vec<_>>().join("; "));
    }
}

fn read_recorded(g: &GpuCheck, cx: &Context<'_>) -> Record {
    let mut r = skipped(&g.name, Source::GpuRecorded, &g.device_call(), String::new());
    let dir = match cx.gpu_results {
        Some(d) => d.to_path_buf(),
        None => {
            let root = cx.repo.join(&g.recorded);
            let mut runs: Vec<(String, PathBuf)> = std::fs::read_dir(&root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join(&g.card.file).is_file())
                .map(|p| (dated(&p).unwrap_or_default(), p))
                .collect();
            // Newest date first; the same date: the last name.
            runs.sort();
            match runs.pop() {
                Some((_, p)) => p,
                None => {
                    let why = if cx.machine.gpu.is_none() { "no GPU here (nvidia-smi lists none)" } else { "--no-verify" };
                    r.reason = Some(format!("{why} and no recorded run under {} (one with {}): run it on the GPU machine", g.recorded, g.card.file));
                    return r;
                }
            }
        }
    };
    let card = match read_value(&dir, &g.card) {
        Ok(c) => first_line(&c),
        Err(why) => {
            r.outcome = Outcome::Failed;
            r.reason = Some(format!("{}: the run does not name its card: {why}", rel(cx.repo, &dir)));
            return r;
        }
    };
    let date = dated(&dir).unwrap_or_else(|| {
        std::fs::metadata(dir.join(&g.card.file)).and_then(|m| m.modified()).map(date_of).unwrap_or_else(|_| "undated".into())
    });
    r.run = Some(RunInfo { dir: rel(cx.repo, &dir), date, card });
    judge(&mut r, g, &dir);
    r
}

fn fact(f: &Fact, dir: &Path) -> FactResult {
    let source = match &f.at.at {
        At::Pointer(p) => format!("{} {p}", f.at.file),
        At::LineWith(t) => format!("{}, last line with {t:?}", f.at.file),
        At::Line(n) => format!("{}, line {n}", f.at.file),
    };
    let (value, problem) = match read_value(dir, &f.at) {
        Err(why) => (None, Some(why)),
        Ok(v) => {
            let p = check(&v, &f.expect);
            (Some(v), p)
        }
    };
    FactResult { label: f.label.clone(), source, ok: problem.is_none(), value, problem }
}

/// Why `v` is not what `e` wants, or `None` when it is.
fn check(v: &str, e: &Expect) -> Option<String> {
    let t = v.trim();
    if let Some(want) = &e.equals {
        if t != want.trim() {
            return Some(format!("expected {want:?}"));
        }
    }
    if let Some(c) = e.contains.iter().find(|c| !t.contains(c.as_str())) {
        return Some(format!("expected it to contain {c:?}"));
    }
    if let Some(c) = e.not_contains.iter().find(|c| t.contains(c.as_str())) {
        return Some(format!("expected no {c:?}"));
    }
    if e.at_least.is_some() || e.at_most.is_some() {
        let Ok(x) = t.parse::<f64>() else { return Some("expected a number".into()) };
        if let Some(lo) = e.at_least.filter(|lo| x < *lo) {
            return Some(format!("expected at least {lo}"));
        }
        if let Some(hi) = e.at_most.filter(|hi| x > *hi) {
            return Some(format!("expected at most {hi}"));
        }
    }
    None
}

fn read_value(dir: &Path, l: &Locator) -> Result<String, String> {
    let path = dir.join(&l.file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", l.file))?;
    match &l.at {
        At::Pointer(p) => {
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", l.file))?;
            match v.pointer(p) {
                None => Err(format!("{} has no {p}", l.file)),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Ok(other.to_string()),
            }
        }
        At::LineWith(t) => last_line_with(&text, t).ok_or_else(|| format!("{} has no line with {t:?}", l.file)),
        At::Line(n) => text.lines().nth(n - 1).map(|s| s.trim().to_string()).ok_or_else(|| format!("{} has fewer than {n} lines", l.file)),
    }
}

fn last_line_with(text: &str, needle: &str) -> Option<String> {
    text.lines().rev().find(|l| l.contains(needle)).map(trim_line)
}

/// A line without the spaces and pytest's `=` around it.
fn trim_line(l: &str) -> String {
    l.trim().trim_matches(|c| c == '=' || c == ' ').to_string()
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn list(items: &[&str]) -> String {
    items.join(", ")
}

/// `p` from `root` when inside it.
fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// The `YYYY-MM-DD` a run folder's name ends with.
fn dated(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_str()?;
    let d = name.get(name.len().checked_sub(10)?..)?;
    let b = d.as_bytes();
    let ok = b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() });
    ok.then(|| d.to_string())
}

fn date_of(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (y, m, d) = crate::series::civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_folders_are_dated_by_their_name() {
        assert_eq!(dated(Path::new("x/h100-2026-11-26")).as_deref(), Some("2026-11-26"));
        assert_eq!(dated(Path::new("x/latest")), None);
        assert_eq!(dated(Path::new("x/2026-1-26")), None);
        assert_eq!(date_of(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14");
    }

    #[test]
    fn expectations() {
        let e = Expect { contains: vec!["passed".into()], not_contains: vec!["failed".into()], ..Default::default() };
        assert_eq!(check("57 passed in 87s", &e), None);
        assert!(check("1 failed, 56 passed", &e).unwrap().contains("no \"failed\""));
        let n = Expect { at_least: Some(0.5), at_most: Some(1.0), ..Default::default() };
        assert_eq!(check("0.982", &n), None);
        assert_eq!(check("0.0", &n).unwrap(), "expected at least 0.5");
        assert_eq!(check("n/a", &n).unwrap(), "expected a number");
        assert_eq!(check(" 0 ", &Expect { equals: Some("0".into()), ..Default::default() }), None);
        assert_eq!(last_line_with("a\n===== 9 passed in 1s =====\n", "passed").as_deref(), Some("9 passed in 1s"));
    }
}
