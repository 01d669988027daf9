//! Damaged input: no panic, problems reported, the rest still read.

use compile_audit::{feed_trace, Auditor};

fn breaks() -> Vec<u8> {
    std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/breaks.log")).unwrap()
}

fn audit(bytes: &[u8]) -> compile_audit::Report {
    let mut a = Auditor::new();
    feed_trace(&mut a, "mem", bytes);
    a.finish()
}

#[test]
fn a_changed_payload_is_an_md5_issue_and_the_rest_still_counts() {
    let mut b = breaks();
    let text = String::from_utf8(b.clone()).unwrap();
    let at = text.find("Graph Break Reason").expect("a break payload");
    b[at] = b'g';
    let r = audit(&b);
    assert_eq!(r.graph_breaks, 6);
    assert!(r.issues.iter().any(|i| i.what.contains("md5 mismatch")), "{:?}", r.issues);
}

#[test]
fn truncation_garbage_and_unknown_events_are_reported_not_fatal() {
    let b = breaks();
    let cut = &b[..b.len() / 2];
    let r = audit(cut);
    assert!(r.graph_breaks >= 1);
    let mut g = b"not a log line\n\t\tstray payload\nV1125 1.0 1 x.py:1] {\"new_event_kind\": {}, \"frame_id\": 0}\nV1125 1.0 1 x.py:1] {broken json\n".to_vec();
    g.extend_from_slice(&b);
    let r = audit(&g);
    assert_eq!(r.graph_breaks, 6);
    assert_eq!(r.other_events.get("new_event_kind"), Some(&1));
    assert!(r.issue_count >= 3, "{:?}", r.issues);
    // A record that announces a payload at the very end of the file.
    let r = audit(b"V1 1 1 x.py:1] {\"artifact\": {\"name\": \"recompile_reasons\"}, \"has_payload\": \"00\"}\n");
    assert!(r.issues.iter().any(|i| i.what.contains("truncated")), "{:?}", r.issues);
}

#[test]
fn random_mutations_never_panic() {
    let base = breaks();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(7);
    eprintln!("random_mutations_never_panic: seed {seed}");
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for _ in 0..200 {
        let mut b = base.clone();
        for _ in 0..(next() % 20 + 1) {
            let i = (next() as usize) % b.len();
            match next() % 5 {
                0 => b[i] = next() as u8,
                1 => b[i] = b'\n',
                2 => b[i] = b'\t',
                3 => {
                    let end = (i + (next() as usize % 4096)).min(b.len());
                    b.drain(i..end);
                }
                _ => b.truncate(i.max(1)),
            }
            if b.is_empty() {
                break;
            }
        }
        let r = audit(&b);
        assert!(r.issues.len() <= 100, "issues are capped");
    }
}

#[test]
fn a_large_trace_streams_in_bounded_memory() {
    // 200 copies of the trace (~67 MB) through a reader that makes them on the fly: the
    // auditor holds per-frame state only, so this must not need the input's size in memory.
    struct Repeat {
        data: Vec<u8>,
        left: usize,
        pos: usize,
    }
    impl std::io::Read for Repeat {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.pos == self.data.len() {
                if self.left == 0 {
                    return Ok(0);
                }
                self.left -= 1;
                self.pos = 0;
            }
            let n = out.len().min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }
    let data = breaks();
    let copies = 200;
    let reader = std::io::BufReader::new(Repeat { pos: data.len(), data, left: copies });
    let mut a = Auditor::new();
    feed_trace(&mut a, "repeat", reader);
    let r = a.finish();
    assert_eq!(r.graph_breaks, 6 * copies);
    assert_eq!(r.breaks.len(), 2, "deduplicated");
    assert_eq!(r.frames.len(), 3, "per-frame state, not per-record");
}

#[test]
fn ranks_keep_their_own_frames() {
    // The same run seen from two ranks: records carry "rank"; frame ids repeat per rank.
    let text = String::from_utf8(breaks()).unwrap();
    let with_rank = |r: u32| -> String {
        text.lines()
            .map(|l| if l.starts_with('\t') || !l.contains("] {") { l.to_string() } else { l.replacen("] {", &format!("] {{\"rank\": {r}, "), 1) })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut a = Auditor::new();
    feed_trace(&mut a, "rank0", with_rank(0).as_bytes());
    feed_trace(&mut a, "rank1", with_rank(1).as_bytes());
    let r = a.finish();
    assert_eq!(r.issue_count, 0, "adding a key leaves payload checksums valid: {:?}", r.issues);
    assert_eq!(r.frames.len(), 6, "3 frames on each rank");
    assert_eq!((r.graph_breaks, r.recompiles), (12, 14));
    assert_eq!(r.breaks.len(), 2, "the same breaks, deduplicated across ranks");
    assert!(r.breaks[0].compile_ids.iter().any(|c| c.starts_with("r1:")));
    assert_eq!(r.frames[3].label(), "r1:0");
}
