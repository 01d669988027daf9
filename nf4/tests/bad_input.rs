//! Every bad input must come back as a typed `Nf4Error` whose message names the tensor and
//! the field (or the file) at fault, never as a panic and never as a silently wrong tensor.
//!
//! Bad checkpoints are made the way a buggy exporter or a damaged download would make them:
//! take the tensors `checkpoint::to_tensors` writes for a good weight, change one thing
//! (keeping the file valid safetensors, so that it is *our* validation that has to catch
//! it), save, and read it back. Truncated and corrupted files are made from the bytes of a
//! good file.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nf4::checkpoint::{save, to_tensors, OwnedTensor};
use nf4::testing::Rng;
use nf4::{Absmax, Checkpoint, Nf4Error, QuantType, QuantizeOptions, Quantized};
use safetensors::Dtype;
use serde_json::{json, Value};

/// A realistic weight name: messages must carry it so a user can find the bad tensor.
const W: &str = "model.layers.0.mlp.down_proj.weight";
/// 300 elements in blocks of 64: 5 blocks, the last one partial.
const SHAPE: [usize; 2] = [3, 100];
const BLOCKS: usize = 5;

/// A scratch folder unique to this process and test, removed when the test ends (even when
/// it fails), so parallel tests and parallel runs never see each other's files.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(test: &str) -> TmpDir {
        let dir = std::env::temp_dir().join(format!("nf4-bad_input-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TmpDir(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.safetensors"))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn quantized(nested: bool, quant_type: QuantType) -> Quantized {
    // Fixed seed: these tests are about the error paths, not the data.
    let data: Vec<f32> = Rng::new(7).normal_vec(SHAPE.iter().product(), 0.05);
    let opts = QuantizeOptions { quant_type, blocksize: 64, nested, ..QuantizeOptions::default() };
    nf4::quantize(W, &data, &SHAPE, &opts).expect("quantizing the good sample")
}

fn good(nested: bool) -> Vec<OwnedTensor> {
    to_tensors(W, &quantized(nested, QuantType::Nf4)).expect("a valid state serializes")
}

fn key(suffix: &str) -> String {
    format!("{W}.{suffix}")
}

fn qs_key(qt: &str) -> String {
    format!("{W}.quant_state.bitsandbytes__{qt}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    nf4::element::to_le_bytes(v)
}

/// The tensors with `name` replaced (it must exist: a typo here would make the test vacuous).
fn replace(ts: &[OwnedTensor], name: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Vec<OwnedTensor> {
    assert!(ts.iter().any(|t| t.0 == name), "test bug: no tensor `{name}` to replace");
    ts.iter().map(|t| if t.0 == name { (name.to_string(), dtype, shape.clone(), bytes.clone()) } else { t.clone() }).collect()
}

fn remove(ts: &[OwnedTensor], name: &str) -> Vec<OwnedTensor> {
    assert!(ts.iter().any(|t| t.0 == name), "test bug: no tensor `{name}` to remove");
    ts.iter().filter(|t| t.0 != name).cloned().collect()
}

fn tensor<'a>(ts: &'a [OwnedTensor], name: &str) -> &'a OwnedTensor {
    ts.iter().find(|t| t.0 == name).unwrap_or_else(|| panic!("test bug: no tensor `{name}`"))
}

/// Replaces the quant-state tensor's bytes (whatever they are) under the nf4 key.
fn with_qs_bytes(ts: &[OwnedTensor], bytes: &[u8]) -> Vec<OwnedTensor> {
    replace(ts, &qs_key("nf4"), Dtype::U8, vec![bytes.len()], bytes.to_vec())
}

/// Edits the quant-state JSON as an object.
fn with_json(ts: &[OwnedTensor], edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<OwnedTensor> {
    let (_, _, _, bytes) = tensor(ts, &qs_key("nf4"));
    let mut v: Value = serde_json::from_slice(bytes).expect("the JSON to_tensors wrote parses");
    edit(v.as_object_mut().expect("the quant state is a JSON object"));
    with_qs_bytes(ts, v.to_string().as_bytes())
}

/// Saves `ts` (which must still be valid safetensors), opens it, and returns the error that
/// reading the weight must give.
fn read_err(dir: &TmpDir, case: &str, ts: &[OwnedTensor]) -> Nf4Error {
    let path = dir.file(case);
    save(&path, ts, None).unwrap_or_else(|e| panic!("{case}: saving the corrupted tensors: {e}"));
    let ck = Checkpoint::open(&path).unwrap_or_else(|e| panic!("{case}: the file itself should be valid safetensors: {e}"));
    match ck.read(W) {
        Ok(q) => panic!("{case}: read accepted a bad checkpoint: state {:?}", q.state),
        Err(e) => e,
    }
}

/// The error is `Field` for `field` of our weight, and its message says so (plus `also`).
#[track_caller]
fn assert_field(case: &str, e: &Nf4Error, field: &str, also: &[&str]) {
    let msg = e.to_string();
    match e {
        Nf4Error::Field { tensor, field: f, .. } => {
            assert_eq!(tensor, W, "{case}: wrong tensor in {msg}");
            assert_eq!(f, field, "{case}: wrong field in {msg}");
        }
        other => panic!("{case}: expected a Field error for `{field}`, got {other:?}: {msg}"),
    }
    assert!(msg.contains(W), "{case}: message does not name the tensor: {msg}");
    assert!(msg.contains(&format!("`{field}`")), "{case}: message does not name the field `{field}`: {msg}");
    for s in also {
        assert!(msg.contains(s), "{case}: message lacks `{s}`: {msg}");
    }
}

#[track_caller]
fn assert_missing(case: &str, e: &Nf4Error, missing_key: &str) {
    let msg = e.to_string();
    match e {
        Nf4Error::MissingTensor { tensor, key, .. } => {
            assert_eq!(tensor, W, "{case}: {msg}");
            assert_eq!(key, missing_key, "{case}: {msg}");
        }
        other => panic!("{case}: expected MissingTensor `{missing_key}`, got {other:?}: {msg}"),
    }
    assert!(msg.contains(W) && msg.contains(missing_key), "{case}: message must name the weight and key: {msg}");
}

/// The error is about the file (`Safetensors` or `Io`) and names its path.
#[track_caller]
fn assert_file_error(case: &str, e: &Nf4Error, path: &Path) {
    let msg = e.to_string();
    assert!(
        matches!(e, Nf4Error::Safetensors { .. } | Nf4Error::Io { .. }),
        "{case}: expected a file-level error, got {e:?}: {msg}"
    );
    assert!(msg.contains(&path.display().to_string()), "{case}: message does not name the file {}: {msg}", path.display());
}

fn open_err(case: &str, path: &Path) -> Nf4Error {
    match Checkpoint::open(path) {
        Ok(ck) => panic!("{case}: Checkpoint::open accepted a broken file (weights {:?})", ck.quantized_weights()),
        Err(e) => e,
    }
}

fn saved_bytes(dir: &TmpDir, name: &str, ts: &[OwnedTensor]) -> Vec<u8> {
    let path = dir.file(name);
    save(&path, ts, None).unwrap_or_else(|e| panic!("saving {name}: {e}"));
    // Sanity: the good file reads, so every failure below is due to the corruption.
    Checkpoint::open(&path).and_then(|ck| ck.read(W)).unwrap_or_else(|e| panic!("the good file {name} must read: {e}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading back {}: {e}", path.display()))
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize
}

// ---------------------------------------------------------------------------------------
// The file itself.

#[test]
fn truncated_files_are_rejected_naming_the_path() {
    let dir = TmpDir::new("truncated");
    for nested in [false, true] {
        let bytes = saved_bytes(&dir, &format!("good_nested{nested}"), &good(nested));
        let h = header_len(&bytes);
        let data = bytes.len() - 8 - h;
        // Inside the length prefix, inside the header (start, middle, end), at its end, and
        // inside the data (the packed weight, the last tensor's last byte).
        let cuts = [0, 1, 4, 7, 8, 9, 8 + h / 2, 8 + h - 1, 8 + h, 8 + h + 1, 8 + h + data / 2, bytes.len() - 1];
        for cut in cuts {
            let case = format!("nested={nested} cut at {cut} of {}", bytes.len());
            let path = dir.file(&format!("cut_{nested}_{cut}"));
            std::fs::write(&path, &bytes[..cut]).expect("writing the truncated file");
            assert_file_error(&case, &open_err(&case, &path), &path);
        }
    }
}

#[test]
fn every_truncation_of_a_small_file_is_rejected() {
    // Exhaustive over a plain (small) file: no cut point may slip through or panic.
    let dir = TmpDir::new("every_truncation");
    let bytes = saved_bytes(&dir, "good", &good(false));
    let path = dir.file("cut");
    for cut in 0..bytes.len() {
        std::fs::write(&path, &bytes[..cut]).expect("writing the truncated file");
        let case = format!("cut at {cut} of {}", bytes.len());
        assert_file_error(&case, &open_err(&case, &path), &path);
    }
}

#[test]
fn trailing_garbage_is_rejected() {
    // safetensors requires the data to end exactly where the header says.
    let dir = TmpDir::new("trailing");
    let mut bytes = saved_bytes(&dir, "good", &good(true));
    bytes.extend_from_slice(b"garbage");
    let path = dir.file("long");
    std::fs::write(&path, &bytes).expect("writing");
    assert_file_error("trailing bytes", &open_err("trailing bytes", &path), &path);
}

#[test]
fn corrupt_headers_are_rejected_naming_the_path() {
    let dir = TmpDir::new("corrupt_header");
    let bytes = saved_bytes(&dir, "good", &good(true));
    let h = header_len(&bytes);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();

    let mut b = bytes.clone();
    b[8..8 + h].fill(b'#');
    cases.push(("header overwritten with #", b));

    let mut b = bytes.clone();
    // A raw control byte is invalid JSON both inside and outside a string.
    b[8 + h / 3..8 + h / 3 + 3].copy_from_slice(b"\x00\x01\x00");
    cases.push(("control bytes inside the header", b));

    let mut b = bytes.clone();
    b[8] = 0xff;
    b[9] = 0xfe;
    cases.push(("header not UTF-8", b));

    let mut b = bytes.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("header length u64::MAX", b));

    let mut b = bytes.clone();
    b[..8].copy_from_slice(&((bytes.len() as u64) + 100).to_le_bytes());
    cases.push(("header length past the end of the file", b));

    let mut b = bytes.clone();
    b[..8].copy_from_slice(&((h as u64) - 1).to_le_bytes());
    cases.push(("header length one short", b));

    // Well-formed JSON that is not a valid safetensors header.
    let raw = |header: &str, data: &[u8]| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    };
    cases.push(("header is a JSON list", raw("[1, 2, 3]", &[])));
    cases.push((
        "overlapping data offsets",
        raw(r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#, &[0; 6]),
    ));
    cases.push((
        "offsets disagree with dtype x shape",
        raw(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,4]}}"#, &[0; 4]),
    ));
    cases.push(("unknown dtype", raw(r#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}}"#, &[0; 4])));

    for (i, (case, b)) in cases.iter().enumerate() {
        let path = dir.file(&format!("corrupt_{i}"));
        std::fs::write(&path, b).expect("writing");
        assert_file_error(case, &open_err(case, &path), &path);
    }
}

#[test]
fn unreadable_paths_are_io_errors_naming_the_path() {
    let dir = TmpDir::new("unreadable");
    let missing = dir.file("does_not_exist");
    let e = open_err("missing file", &missing);
    assert!(matches!(e, Nf4Error::Io { .. }), "missing file: {e:?}");
    assert_file_error("missing file", &e, &missing);

    let empty = dir.file("empty");
    std::fs::write(&empty, b"").expect("writing");
    assert_file_error("empty file", &open_err("empty file", &empty), &empty);

    // A directory opens as a file on Unix but cannot be mapped.
    assert_file_error("a directory", &open_err("a directory", &dir.0), &dir.0);
}

// ---------------------------------------------------------------------------------------
// The quant-state tensor and its JSON.

#[test]
fn quant_state_that_is_not_a_json_object_is_rejected() {
    let dir = TmpDir::new("qs_not_object");
    let ts = good(true);
    let cases: [(&str, &[u8], &str); 9] = [
        ("truncated JSON", br#"{"quant_type": "nf4", "blocksize": 64, "#, "not valid JSON"),
        ("garbage", b"\x01\x02 definitely not json", "not valid JSON"),
        ("empty", b"", "not valid JSON"),
        ("NaN literal", br#"{"quant_type": "nf4", "blocksize": NaN}"#, "not valid JSON"),
        ("not UTF-8", b"{\"quant_type\": \"nf\xff4\"}", "not UTF-8"),
        ("a list", b"[\"nf4\", 64, \"float32\", [3, 100]]", "not an object"),
        ("a string", b"\"nf4\"", "not an object"),
        ("null", b"null", "not an object"),
        ("a number", b"64", "not an object"),
    ];
    for (case, bytes, what) in cases {
        let e = read_err(&dir, case, &with_qs_bytes(&ts, bytes));
        assert_field(case, &e, "quant_state", &[what]);
    }
}

#[test]
fn quant_state_tensor_with_wrong_dtype_or_ambiguous_key_is_rejected() {
    let dir = TmpDir::new("qs_tensor");
    let ts = good(false);
    let (_, _, _, json) = tensor(&ts, &qs_key("nf4")).clone();

    let e = read_err(&dir, "I8 quant_state", &replace(&ts, &qs_key("nf4"), Dtype::I8, vec![json.len()], json.clone()));
    assert_field("I8 quant_state", &e, "quant_state", &["I8", "U8"]);

    // Both keys: we cannot know which one is meant.
    let mut both = ts.clone();
    let fp4_json = String::from_utf8(json.clone()).expect("utf8").replace("\"nf4\"", "\"fp4\"").into_bytes();
    both.push((qs_key("fp4"), Dtype::U8, vec![fp4_json.len()], fp4_json));
    let e = read_err(&dir, "nf4 and fp4 keys", &both);
    assert_field("nf4 and fp4 keys", &e, "quant_state", &["bitsandbytes__nf4", "bitsandbytes__fp4"]);
}

#[test]
fn each_missing_json_field_is_named() {
    let dir = TmpDir::new("missing_field");
    for nested in [false, true] {
        let ts = good(nested);
        let mut fields = vec!["quant_type", "blocksize", "dtype", "shape"];
        if nested {
            fields.extend(["nested_blocksize", "nested_dtype", "nested_offset"]);
        }
        for field in fields {
            let case = format!("nested={nested}, no {field}");
            let e = read_err(&dir, &case, &with_json(&ts, |j| assert!(j.remove(field).is_some(), "test bug: no {field}")));
            assert_field(&case, &e, field, &["missing"]);
        }
    }
}

#[test]
fn json_fields_of_the_wrong_type_are_named() {
    let dir = TmpDir::new("wrong_type");
    let cases: Vec<(bool, &str, Value, &str)> = vec![
        (false, "quant_type", json!(4), "expected a string"),
        (false, "quant_type", json!(null), "expected a string"),
        (false, "blocksize", json!("64"), "non-negative integer"),
        (false, "blocksize", json!(64.0), "non-negative integer"),
        (false, "blocksize", json!(-64), "non-negative integer"),
        (false, "blocksize", json!(true), "non-negative integer"),
        (false, "dtype", json!(16), "expected a string"),
        (false, "shape", json!(300), "list of dims"),
        (false, "shape", json!("[3, 100]"), "list of dims"),
        (false, "shape", json!({"0": 3, "1": 100}), "list of dims"),
        (false, "shape", json!(null), "list of dims"),
        (false, "shape", json!([3, -100]), "non-negative integers"),
        (false, "shape", json!([-3, -100]), "non-negative integers"),
        (false, "shape", json!([3.5, 100]), "non-negative integers"),
        (false, "shape", json!([[3], [100]]), "non-negative integers"),
        (false, "shape", json!([u64::MAX, 2]), "overflows"),
        (true, "nested_blocksize", json!("256"), "non-negative integer"),
        (true, "nested_blocksize", json!(-256), "non-negative integer"),
        (true, "nested_dtype", json!(32), "expected a string"),
        (true, "nested_offset", json!("0.05"), "expected a number"),
        (true, "nested_offset", json!(null), "expected a number"),
        (true, "nested_offset", json!([0.05]), "expected a number"),
    ];
    for (i, (nested, field, value, what)) in cases.into_iter().enumerate() {
        let case = format!("{field} = {value}");
        let ts = with_json(&good(nested), |j| {
            assert!(j.insert(field.to_string(), value).is_some(), "test bug: no {field}");
        });
        let e = read_err(&dir, &format!("wrong_type_{i}"), &ts);
        assert_field(&case, &e, field, &[what]);
    }
}

#[test]
fn quant_type_must_agree_with_the_key_and_be_known() {
    let dir = TmpDir::new("quant_type");
    // JSON fp4 under the nf4 key.
    let e = read_err(&dir, "fp4 under nf4", &with_json(&good(true), |j| {
        j.insert("quant_type".into(), json!("fp4"));
    }));
    assert_field("fp4 under nf4", &e, "quant_type", &["fp4", "bitsandbytes__nf4"]);

    // JSON nf4 under the fp4 key (a real fp4 weight whose JSON was edited).
    let fp4 = to_tensors(W, &quantized(false, QuantType::Fp4)).expect("a valid state serializes");
    let (_, _, _, bytes) = tensor(&fp4, &qs_key("fp4")).clone();
    let edited = String::from_utf8(bytes).expect("utf8").replace("\"fp4\"", "\"nf4\"").into_bytes();
    let ts = replace(&fp4, &qs_key("fp4"), Dtype::U8, vec![edited.len()], edited);
    let e = read_err(&dir, "nf4 under fp4", &ts);
    assert_field("nf4 under fp4", &e, "quant_type", &["nf4", "bitsandbytes__fp4"]);

    for (i, name) in ["int4", "NF4", "", "nf4 "].into_iter().enumerate() {
        let case = format!("quant_type `{name}`");
        let e = read_err(&dir, &format!("qt_{i}"), &with_json(&good(false), |j| {
            j.insert("quant_type".into(), json!(name));
        }));
        assert_field(&case, &e, "quant_type", &["not nf4 or fp4"]);
    }
}

#[test]
fn unsupported_blocksize_is_rejected() {
    let dir = TmpDir::new("blocksize");
    for nested in [false, true] {
        // 16 is below bitsandbytes' range, 8192 above it, 48 and 96 not powers of two, 0 would
        // divide by zero, 63 is odd (blocks would split bytes).
        for bs in [48u64, 8192, 16, 0, 96, 63, 1 << 40] {
            let case = format!("nested={nested} blocksize {bs}");
            let e = read_err(&dir, &format!("bs_{nested}_{bs}"), &with_json(&good(nested), |j| {
                j.insert("blocksize".into(), json!(bs));
            }));
            assert_field(&case, &e, "blocksize", &[&bs.to_string(), "not supported"]);
        }
    }
}

#[test]
fn unsupported_dtype_is_rejected() {
    let dir = TmpDir::new("dtype");
    for name in ["float64", "int8", "", "torch.float16", "Float16", "bf16", "float8_e4m3fn"] {
        let case = format!("dtype `{name}`");
        let e = read_err(&dir, &format!("dtype_{}", name.replace('.', "_")), &with_json(&good(false), |j| {
            j.insert("dtype".into(), json!(name));
        }));
        assert_field(&case, &e, "dtype", &[&format!("`{name}`")]);
    }
    // The nested absmax scales are always float32 in bitsandbytes.
    let e = read_err(&dir, "nested_dtype", &with_json(&good(true), |j| {
        j.insert("nested_dtype".into(), json!("float16"));
    }));
    assert_field("nested_dtype float16", &e, "nested_dtype", &["float16"]);
}

#[test]
fn nested_blocksize_zero_is_rejected() {
    // It divides the block count; zero must be an error, not a division panic.
    let dir = TmpDir::new("nested_blocksize");
    let e = read_err(&dir, "zero", &with_json(&good(true), |j| {
        j.insert("nested_blocksize".into(), json!(0));
    }));
    assert_field("nested_blocksize 0", &e, "nested_blocksize", &[]);
}

// ---------------------------------------------------------------------------------------
// The tensors next to the quant state.

#[test]
fn absmax_count_must_match_the_shape() {
    let dir = TmpDir::new("absmax_count");
    let plain = good(false);
    let (_, _, _, am) = tensor(&plain, &key("absmax")).clone();
    // One block short and one too many (plain f32 absmax).
    let e = read_err(&dir, "plain short", &replace(&plain, &key("absmax"), Dtype::F32, vec![BLOCKS - 1], am[..4 * (BLOCKS - 1)].to_vec()));
    assert_field("plain absmax short", &e, "absmax", &["holds 4 values", "needs 5"]);
    let mut long = am.clone();
    long.extend_from_slice(&1.0f32.to_le_bytes());
    let e = read_err(&dir, "plain long", &replace(&plain, &key("absmax"), Dtype::F32, vec![BLOCKS + 1], long));
    assert_field("plain absmax long", &e, "absmax", &["holds 6 values", "needs 5"]);

    // The nested u8 codes.
    let nested = good(true);
    let e = read_err(&dir, "nested long", &replace(&nested, &key("absmax"), Dtype::U8, vec![BLOCKS + 1], vec![128; BLOCKS + 1]));
    assert_field("nested absmax long", &e, "absmax", &["holds 6 values", "needs 5"]);
    let e = read_err(&dir, "nested empty", &replace(&nested, &key("absmax"), Dtype::U8, vec![0], vec![]));
    assert_field("nested absmax empty", &e, "absmax", &["holds 0 values", "needs 5"]);

    // Or the shape in the JSON is what is wrong: twice the elements needs twice the blocks.
    let e = read_err(&dir, "json shape", &with_json(&plain, |j| {
        j.insert("shape".into(), json!([3, 200]));
    }));
    assert_field("shape [3, 200]", &e, "absmax", &["[3, 200]", "needs 10"]);
}

#[test]
fn absmax_with_the_wrong_dtype_is_rejected() {
    let dir = TmpDir::new("absmax_dtype");
    // Plain state: f32 expected; an f16 absmax (as a careless export would write) is refused
    // rather than reinterpreted.
    let plain = good(false);
    let e = read_err(&dir, "plain f16", &replace(&plain, &key("absmax"), Dtype::F16, vec![BLOCKS], vec![0x3c; 2 * BLOCKS]));
    assert_field("plain absmax F16", &e, "absmax", &["F16", "F32"]);
    let e = read_err(&dir, "plain f64", &replace(&plain, &key("absmax"), Dtype::F64, vec![BLOCKS], vec![0; 8 * BLOCKS]));
    assert_field("plain absmax F64", &e, "absmax", &["F64", "F32"]);
    // A u8 absmax without any nested marker (no nested_offset, no nested_absmax).
    let e = read_err(&dir, "plain u8", &replace(&plain, &key("absmax"), Dtype::U8, vec![BLOCKS], vec![1; BLOCKS]));
    assert_field("plain absmax U8", &e, "absmax", &["U8", "F32"]);

    // Nested state: the absmax holds u8 codes; f32 values there mean a confused writer.
    let nested = good(true);
    let e = read_err(&dir, "nested f32", &replace(&nested, &key("absmax"), Dtype::F32, vec![BLOCKS], f32_bytes(&[0.1; BLOCKS])));
    assert_field("nested absmax F32", &e, "absmax", &["F32", "U8"]);

    // The other f32 tensors, too.
    let e = read_err(&dir, "nested_absmax f16", &replace(&nested, &key("nested_absmax"), Dtype::F16, vec![1], vec![0, 0x3c]));
    assert_field("nested_absmax F16", &e, "nested_absmax", &["F16", "F32"]);
    let e = read_err(&dir, "quant_map f16", &replace(&plain, &key("quant_map"), Dtype::F16, vec![16], vec![0; 32]));
    assert_field("quant_map F16", &e, "quant_map", &["F16", "F32"]);
    let e = read_err(&dir, "nested_quant_map bf16", &replace(&nested, &key("nested_quant_map"), Dtype::BF16, vec![256], vec![0; 512]));
    assert_field("nested_quant_map BF16", &e, "nested_quant_map", &["BF16", "F32"]);
}

#[test]
fn nested_absmax_count_must_match_the_blocks() {
    // 5 blocks in groups of 256: exactly one nested scale.
    let dir = TmpDir::new("nested_absmax_count");
    let ts = good(true);
    let e = read_err(&dir, "two", &replace(&ts, &key("nested_absmax"), Dtype::F32, vec![2], f32_bytes(&[0.1, 0.1])));
    assert_field("nested_absmax 2", &e, "nested_absmax", &["holds 2 values", "need 1"]);
    let e = read_err(&dir, "none", &replace(&ts, &key("nested_absmax"), Dtype::F32, vec![0], vec![]));
    assert_field("nested_absmax 0", &e, "nested_absmax", &["holds 0 values", "need 1"]);
    // A nested_blocksize that groups the blocks differently changes the count needed.
    let e = read_err(&dir, "nested_blocksize 2", &with_json(&ts, |j| {
        j.insert("nested_blocksize".into(), json!(2));
    }));
    assert_field("nested_blocksize 2", &e, "nested_absmax", &["holds 1 values", "need 3"]);
}

#[test]
fn code_books_of_the_wrong_length_are_rejected() {
    let dir = TmpDir::new("code_len");
    let plain = good(false);
    let q = quantized(false, QuantType::Nf4);
    let e = read_err(&dir, "quant_map 15", &replace(&plain, &key("quant_map"), Dtype::F32, vec![15], f32_bytes(&q.state.code[..15])));
    assert_field("quant_map 15", &e, "quant_map", &["15", "expected 16"]);
    let mut long = q.state.code.to_vec();
    long.push(2.0);
    let e = read_err(&dir, "quant_map 17", &replace(&plain, &key("quant_map"), Dtype::F32, vec![17], f32_bytes(&long)));
    assert_field("quant_map 17", &e, "quant_map", &["17", "expected 16"]);
    // The count is what matters, whatever the layout.
    let e = read_err(&dir, "quant_map 3x5", &replace(&plain, &key("quant_map"), Dtype::F32, vec![3, 5], f32_bytes(&q.state.code[..15])));
    assert_field("quant_map 3x5", &e, "quant_map", &["15"]);

    let nested = good(true);
    let map = nf4::codes::dynamic_map();
    let e = read_err(&dir, "nested_quant_map 255", &replace(&nested, &key("nested_quant_map"), Dtype::F32, vec![255], f32_bytes(&map[..255])));
    assert_field("nested_quant_map 255", &e, "nested_quant_map", &["255", "expected 256"]);
}

#[test]
fn packed_weight_too_short_for_the_shape_is_rejected() {
    let dir = TmpDir::new("packed_short");
    for nested in [false, true] {
        let ts = good(nested);
        let (_, _, _, packed) = tensor(&ts, W).clone();
        let need = 150; // 300 elements, two per byte
        assert_eq!(packed.len(), need);
        for (case, dtype, shape, bytes) in [
            ("one byte short", Dtype::U8, vec![need - 1, 1], packed[..need - 1].to_vec()),
            ("empty", Dtype::U8, vec![0, 1], vec![]),
            ("half, legacy [1, n] layout", Dtype::U8, vec![1, need / 2], packed[..need / 2].to_vec()),
            ("bf16 storage one element short", Dtype::BF16, vec![need / 2 - 1, 1], packed[..need - 2].to_vec()),
        ] {
            let case = format!("nested={nested}: {case}");
            let e = read_err(&dir, &format!("short_{nested}_{}", bytes.len()), &replace(&ts, W, dtype, shape, bytes));
            assert_field(&case, &e, "weight", &["packed", "needs 150"]);
        }
    }
}

#[test]
fn missing_tensors_are_named_by_key() {
    let dir = TmpDir::new("missing_tensor");
    let cases = [
        (false, W.to_string()),
        (false, key("absmax")),
        (false, key("quant_map")),
        (false, qs_key("nf4")),
        (true, W.to_string()),
        (true, key("absmax")),
        (true, key("quant_map")),
        (true, key("nested_absmax")),
        (true, key("nested_quant_map")),
        (true, qs_key("nf4")),
    ];
    for (i, (nested, missing)) in cases.iter().enumerate() {
        let case = format!("nested={nested}, without {missing}");
        let e = read_err(&dir, &format!("missing_{i}"), &remove(&good(*nested), missing));
        assert_missing(&case, &e, missing);
    }
    // Asking for a weight that is not in the file at all.
    let path = dir.file("good");
    save(&path, &good(true), None).expect("saving");
    let ck = Checkpoint::open(&path).expect("opening the good file");
    let e = ck.read("model.layers.1.mlp.down_proj.weight").expect_err("no such weight");
    assert!(matches!(e, Nf4Error::MissingTensor { .. }), "{e:?}");
    assert!(e.to_string().contains("model.layers.1.mlp.down_proj.weight"), "{e}");
}

#[test]
fn non_finite_scales_and_codes_are_rejected() {
    let dir = TmpDir::new("non_finite");
    let plain = good(false);
    let q = quantized(false, QuantType::Nf4);
    let Absmax::Plain(am) = &q.state.absmax else { panic!("plain sample is nested") };
    for (i, bad) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].into_iter().enumerate() {
        let mut v = am.clone();
        v[2] = bad;
        let e = read_err(&dir, &format!("absmax_{i}"), &replace(&plain, &key("absmax"), Dtype::F32, vec![BLOCKS], f32_bytes(&v)));
        assert_field(&format!("absmax {bad}"), &e, "absmax", &["block 2", &bad.to_string()]);

        let mut code = q.state.code.to_vec();
        code[5] = bad;
        let e = read_err(&dir, &format!("quant_map_{i}"), &replace(&plain, &key("quant_map"), Dtype::F32, vec![16], f32_bytes(&code)));
        assert_field(&format!("quant_map {bad}"), &e, "quant_map", &["value 5"]);
    }

    let nested = good(true);
    let e = read_err(&dir, "nested_absmax inf", &replace(&nested, &key("nested_absmax"), Dtype::F32, vec![1], f32_bytes(&[f32::INFINITY])));
    assert_field("nested_absmax inf", &e, "nested_absmax", &["inf"]);
    let mut map = nf4::codes::dynamic_map();
    map[200] = f32::NAN;
    let e = read_err(&dir, "nested_quant_map NaN", &replace(&nested, &key("nested_quant_map"), Dtype::F32, vec![256], f32_bytes(&map)));
    assert_field("nested_quant_map NaN", &e, "nested_quant_map", &["value 200"]);
    // JSON has no NaN or infinity, but a number past f32's range becomes one when narrowed.
    for big in [1e39, -1e39] {
        let e = read_err(&dir, &format!("offset {big}"), &with_json(&nested, |j| {
            j.insert("nested_offset".into(), json!(big));
        }));
        assert_field(&format!("nested_offset {big}"), &e, "nested_offset", &["inf"]);
    }
}

#[test]
fn random_corruption_never_panics_and_accepted_files_dequantize() {
    // Flip random bytes of a good file: whatever open/read make of it must be a Result,
    // and a state that read() accepts must dequantize (validation is the only gate).
    let dir = TmpDir::new("fuzz");
    let bytes = saved_bytes(&dir, "good", &good(true));
    let path = dir.file("flipped");
    let mut rng = Rng::fresh("bad_input::random_corruption");
    let (mut opened, mut read_ok) = (0, 0);
    for iter in 0..400 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(b.len());
            b[i] ^= 1 << rng.below(8);
        }
        std::fs::write(&path, &b).expect("writing");
        let ck = match Checkpoint::open(&path) {
            Ok(ck) => ck,
            Err(e) => {
                assert_file_error(&format!("iteration {iter}"), &e, &path);
                continue;
            }
        };
        opened += 1;
        let q = match ck.read(W) {
            Ok(q) => q,
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(W) || msg.contains(&path.display().to_string()), "iteration {iter}: {msg}");
                continue;
            }
        };
        read_ok += 1;
        let out: Vec<f32> = nf4::dequantize(W, &q.packed, &q.state)
            .unwrap_or_else(|e| panic!("iteration {iter}: read() accepted a state that dequantize rejects: {e}"));
        assert_eq!(out.len(), q.state.numel());
    }
    eprintln!("random corruption: {opened} of 400 opened, {read_ok} read");
}

// ---------------------------------------------------------------------------------------
// quantize / dequantize on bad arguments.

#[test]
fn quantize_refuses_non_finite_values_naming_the_index() {
    let n = 300;
    let base: Vec<f32> = Rng::new(3).normal_vec(n, 1.0);
    let opts = QuantizeOptions::default();
    for (index, bad) in [(0, f32::NAN), (150, f32::INFINITY), (n - 1, f32::NEG_INFINITY), (64, -f32::NAN)] {
        let mut x = base.clone();
        x[index] = bad;
        let e = nf4::quantize(W, &x, &SHAPE, &opts).expect_err("quantize accepted a non-finite value");
        check_non_finite(&e, index, bad);
    }
    // The first of several is the one reported, whatever thread finds which.
    let mut x = base.clone();
    for i in [200, 17, 299, 18] {
        x[i] = f32::NAN;
    }
    check_non_finite(&nf4::quantize(W, &x, &SHAPE, &opts).expect_err("accepted NaN"), 17, f32::NAN);

    // Half-precision inputs too (their infinities are easy to hit by overflow).
    let mut h: Vec<f16> = base.iter().map(|&v| f16::from_f32(v)).collect();
    h[99] = f16::INFINITY;
    check_non_finite(&nf4::quantize(W, &h, &SHAPE, &opts).expect_err("accepted f16 inf"), 99, f32::INFINITY);
    let mut b: Vec<bf16> = base.iter().map(|&v| bf16::from_f32(v)).collect();
    b[250] = bf16::NAN;
    check_non_finite(&nf4::quantize(W, &b, &SHAPE, &opts).expect_err("accepted bf16 NaN"), 250, f32::NAN);
}

#[track_caller]
fn check_non_finite(e: &Nf4Error, want_index: usize, want: f32) {
    match e {
        Nf4Error::NonFinite { tensor, index, value } => {
            assert_eq!(tensor, W);
            assert_eq!(*index, want_index, "{e}");
            assert!(value.to_bits() == want.to_bits() || (value.is_nan() && want.is_nan()), "{e}");
        }
        other => panic!("expected NonFinite at {want_index}, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(W) && msg.contains(&format!("element {want_index}")), "{msg}");
}

#[test]
fn quantize_refuses_data_that_does_not_match_the_shape() {
    let x: Vec<f32> = Rng::new(4).normal_vec(300, 1.0);
    let opts = QuantizeOptions::default();
    for shape in [&[3usize, 101][..], &[299], &[301], &[], &[0], &[300, 0]] {
        let e = nf4::quantize(W, &x, shape, &opts).expect_err("quantize accepted a shape that does not match the data");
        assert_field(&format!("shape {shape:?}"), &e, "shape", &["300"]);
    }
}

#[test]
fn quantize_refuses_bad_options() {
    let x: Vec<f32> = Rng::new(5).normal_vec(300, 1.0);
    for bs in [0, 16, 48, 63, 8192] {
        let opts = QuantizeOptions { blocksize: bs, ..QuantizeOptions::default() };
        let e = nf4::quantize(W, &x, &SHAPE, &opts).expect_err("accepted an unsupported blocksize");
        assert_field(&format!("blocksize {bs}"), &e, "blocksize", &["not supported"]);
    }
    // A storage dtype narrower than a byte cannot hold whole packed bytes.
    let opts = QuantizeOptions { storage: Dtype::F4, ..QuantizeOptions::default() };
    let e = nf4::quantize(W, &x, &SHAPE, &opts).expect_err("accepted F4 storage");
    assert_field("F4 storage", &e, "quant_storage", &["F4"]);
}

#[test]
fn dequantize_into_a_buffer_of_the_wrong_length_is_an_error() {
    for nested in [false, true] {
        let q = quantized(nested, QuantType::Nf4);
        let n = q.state.numel();
        for len in [0, 1, n - 1, n + 1, 2 * n] {
            let mut out = vec![0f32; len];
            let e = nf4::dequantize_into(W, &q.packed, &q.state, &mut out).expect_err("wrong output length accepted");
            assert_field(&format!("nested={nested} out len {len}"), &e, "out", &[&len.to_string(), &n.to_string()]);
            assert!(out.iter().all(|&v| v == 0.0), "a failed call must not write the buffer");
        }
        let mut out = vec![bf16::ZERO; n];
        nf4::dequantize_into(W, &q.packed, &q.state, &mut out).expect("the right length works");
    }
}

#[test]
fn dequantize_checks_packed_length_and_hand_built_states() {
    // States built in code (not read from a file) get the same validation.
    for nested in [false, true] {
        let q = quantized(nested, QuantType::Fp4);
        let case = |what: &str| format!("nested={nested}: {what}");
        let short = &q.packed[..q.packed.len() - 1];
        let e = nf4::dequantize::<f32>(W, short, &q.state).expect_err("short packed data accepted");
        assert_field(&case("short packed"), &e, "weight", &["149 bytes", "needs 150"]);
        let e = nf4::dequantize_reference::<f16>(W, short, &q.state).expect_err("short packed data accepted (reference)");
        assert_field(&case("short packed, reference"), &e, "weight", &["needs 150"]);

        let mut s = q.state.clone();
        s.blocksize = 48;
        let e = nf4::dequantize::<f32>(W, &q.packed, &s).expect_err("blocksize 48 accepted");
        assert_field(&case("blocksize 48"), &e, "blocksize", &["48"]);
        let e = nf4::dequantize_reference::<f32>(W, &q.packed, &s).expect_err("blocksize 48 accepted (reference)");
        assert_field(&case("blocksize 48, reference"), &e, "blocksize", &["48"]);

        let mut s = q.state.clone();
        s.shape = vec![3, 200];
        let e = nf4::dequantize::<f32>(W, &q.packed, &s).expect_err("shape/absmax mismatch accepted");
        assert_field(&case("shape [3, 200]"), &e, "absmax", &[]);

        let mut s = q.state.clone();
        match &mut s.absmax {
            Absmax::Plain(v) => v[1] = f32::NAN,
            Absmax::Nested { offset, .. } => *offset = f32::NAN,
        }
        let field = if nested { "nested_offset" } else { "absmax" };
        let e = nf4::dequantize::<bf16>(W, &q.packed, &s).expect_err("NaN scale accepted");
        assert_field(&case("NaN scale"), &e, field, &["NaN"]);

        if let Absmax::Nested { .. } = &q.state.absmax {
            let mut s = q.state.clone();
            if let Absmax::Nested { blocksize2, .. } = &mut s.absmax {
                *blocksize2 = 0;
            }
            let e = nf4::dequantize::<f32>(W, &q.packed, &s).expect_err("nested_blocksize 0 accepted");
            assert_field(&case("nested_blocksize 0"), &e, "nested_blocksize", &[]);
        }
    }
}

#[test]
fn dequantize_rejects_a_hand_built_shape_whose_element_count_overflows() {
    // read() checks this (checked_mul); a state built in code must get the same answer from
    // dequantize, not an arithmetic-overflow panic (debug) or a wrapped count (release).
    let q = quantized(false, QuantType::Nf4);
    let mut s = q.state.clone();
    s.shape = vec![usize::MAX, 2];
    let e = nf4::dequantize::<f32>(W, &q.packed, &s).expect_err("an overflowing shape was accepted");
    assert_field("shape [usize::MAX, 2]", &e, "shape", &[]);
    let e = nf4::dequantize_reference::<f32>(W, &q.packed, &s).expect_err("an overflowing shape was accepted (reference)");
    assert_field("shape [usize::MAX, 2], reference", &e, "shape", &[]);
}

#[test]
fn dequantize_validates_before_allocating_the_output() {
    // A hand-built state claiming 2^61 elements with 5 absmax blocks is inconsistent, and
    // validate() says so; dequantize must ask it before sizing the output buffer from the
    // shape (2^63 bytes of f32 cannot even be requested).
    let q = quantized(false, QuantType::Nf4);
    let mut s = q.state.clone();
    s.shape = vec![1 << 61];
    let e = nf4::dequantize::<f32>(W, &q.packed, &s).expect_err("an inconsistent shape was accepted");
    // Either objection is right: too many elements to hold, or too many for 5 blocks.
    let field = match &e {
        Nf4Error::Field { field, .. } if field == "shape" || field == "absmax" => field.clone(),
        other => panic!("expected a shape or absmax error, got {other:?}: {other}"),
    };
    assert_field("shape [2^61]", &e, &field, &[]);
}
