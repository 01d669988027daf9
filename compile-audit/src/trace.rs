//! Streaming reader for TORCH_TRACE structured logs (the files `tlparse` reads).
//!
//! A record is one line: a glog-style prefix (`V1125 22:37:52.037000 582 file.py:5101] `)
//! then one JSON object whose single event key names it (`dynamo_start`,
//! `compilation_metrics`, `artifact`, ...) beside `frame_id`, `frame_compile_id`,
//! `attempt`, `rank` and, when a payload follows, `has_payload` (its md5). Payload lines
//! start with a tab; the payload is those lines, tab removed, joined with `\n`. A
//! `{"str": [path, index]}` record interns a file name that stacks refer to by index.
//!
//! The reader keeps at most one record (and the payloads it was asked to keep) in memory,
//! whatever the file size. Nothing in a file is fatal: a line that does not parse, a
//! payload whose md5 differs, a payload cut short by the end of the file, become
//! [`Issue`]s beside the records.

use std::io::BufRead;

use md5::{Digest, Md5};
use serde_json::{Map, Value};

/// One structured-log record.
#[derive(Debug, Clone)]
pub struct Record {
    /// 1-based line number of the record's JSON line.
    pub line: u64,
    /// The event key (`dynamo_start`, `artifact`, ...).
    pub event: String,
    /// The event's own JSON value (what the event key maps to).
    pub body: Value,
    /// `frame_id`, when present.
    pub frame_id: Option<u64>,
    /// `frame_compile_id`, when present.
    pub frame_compile_id: Option<u64>,
    /// `attempt`, when present.
    pub attempt: Option<u64>,
    /// `rank`, when present (distributed runs).
    pub rank: Option<u64>,
    /// The payload, if the record has one and the caller asked to keep it.
    pub payload: Option<String>,
}

impl Record {
    /// `frame_id/frame_compile_id`, as PyTorch prints compile ids, when both are present;
    /// prefixed `rN:` in a distributed run, where every rank numbers its own frames.
    pub fn compile_id(&self) -> Option<String> {
        let id = format!("{}/{}", self.frame_id?, self.frame_compile_id?);
        Some(match self.rank {
            Some(r) => format!("r{r}:{id}"),
            None => id,
        })
    }
    /// The artifact name of an `artifact` record.
    pub fn artifact_name(&self) -> Option<&str> {
        (self.event == "artifact").then(|| self.body.get("name")?.as_str()).flatten()
    }
}

/// Something wrong in the file, reported, never fatal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong.
    pub what: String,
}

/// What [`TraceReader::next_item`] yields.
#[derive(Debug)]
pub enum Item {
    /// A record.
    Record(Record),
    /// A problem found at a line.
    Issue(Issue),
}

/// Streams records out of a trace. `keep_payload` decides, per record, whether its payload
/// text is kept (others are only checksummed), which bounds memory on huge traces.
pub struct TraceReader<R, F> {
    input: R,
    keep_payload: F,
    line_no: u64,
    pending: Option<String>,
    queue: std::collections::VecDeque<Item>,
}

const META_KEYS: [&str; 5] = ["frame_id", "frame_compile_id", "attempt", "has_payload", "rank"];

impl<R: BufRead, F: FnMut(&str, &Value) -> bool> TraceReader<R, F> {
    /// A reader over `input`.
    pub fn new(input: R, keep_payload: F) -> Self {
        TraceReader { input, keep_payload, line_no: 0, pending: None, queue: Default::default() }
    }

    fn read_line(&mut self) -> Option<String> {
        if let Some(l) = self.pending.take() {
            return Some(l);
        }
        // Bytes that are not UTF-8 must not stop the stream: read raw, convert lossily.
        let mut raw = Vec::new();
        match self.input.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => None,
            Ok(_) => {
                self.line_no += 1;
                let mut s = String::from_utf8_lossy(&raw).into_owned();
                if s.ends_with('\n') {
                    s.pop();
                    if s.ends_with('\r') {
                        s.pop();
                    }
                }
                Some(s)
            }
        }
    }

    /// The next record or issue; `None` at the end of the input.
    pub fn next_item(&mut self) -> Option<Item> {
        if let Some(item) = self.queue.pop_front() {
            return Some(item);
        }
        loop {
            let line = self.read_line()?;
            let at = self.line_no;
            if line.starts_with('\t') {
                return Some(Item::Issue(Issue { line: at, what: "payload line without a record that announced it".into() }));
            }
            if line.trim().is_empty() {
                continue;
            }
            let Some(start) = line.find("] {") else {
                return Some(Item::Issue(Issue { line: at, what: "not a structured-log line (no `] {` after the prefix)".into() }));
            };
            let mut obj: Map<String, Value> = match serde_json::from_str(&line[start + 2..]) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Some(Item::Issue(Issue { line: at, what: "record JSON is not an object".into() })),
                Err(e) => return Some(Item::Issue(Issue { line: at, what: format!("record JSON does not parse: {e}") })),
            };
            let num = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_u64);
            let (frame_id, frame_compile_id, attempt, rank) =
                (num(&obj, "frame_id"), num(&obj, "frame_compile_id"), num(&obj, "attempt"), num(&obj, "rank"));
            let md5 = obj.get("has_payload").and_then(Value::as_str).map(str::to_string);
            let event = obj.keys().find(|k| !META_KEYS.contains(&k.as_str())).cloned();
            let Some(event) = event else {
                return Some(Item::Issue(Issue { line: at, what: "record has no event key".into() }));
            };
            let body = obj.remove(&event).unwrap_or(Value::Null);
            let mut rec = Record { line: at, event, body, frame_id, frame_compile_id, attempt, rank, payload: None };
            if let Some(want) = md5 {
                let keep = (self.keep_payload)(&rec.event, &rec.body);
                let (payload, got, lines) = self.read_payload(keep);
                if lines == 0 {
                    self.pending_issue(at, "record announces a payload but none follows (truncated?)");
                } else if got != want {
                    self.pending_issue(at, &format!("payload md5 mismatch: header says {want}, payload hashes to {got}"));
                }
                rec.payload = payload;
            }
            return Some(Item::Record(rec));
        }
    }

    // Issues found while reading a payload are reported right after its record.
    fn pending_issue(&mut self, line: u64, what: &str) {
        self.queue.push_back(Item::Issue(Issue { line, what: what.to_string() }));
    }

    fn read_payload(&mut self, keep: bool) -> (Option<String>, String, usize) {
        let mut h = Md5::new();
        let mut text = keep.then(String::new);
        let mut n = 0;
        while let Some(l) = self.read_line() {
            let Some(content) = l.strip_prefix('\t') else {
                self.pending = Some(l);
                break;
            };
            if n > 0 {
                h.update(b"\n");
                if let Some(t) = text.as_mut() {
                    t.push('\n');
                }
            }
            h.update(content.as_bytes());
            if let Some(t) = text.as_mut() {
                t.push_str(content);
            }
            n += 1;
        }
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        (text, digest, n)
    }
}
