//! bitsandbytes' 4-bit serialization in safetensors files.
//!
//! For a weight `W` bitsandbytes (and so transformers' `save_pretrained`) writes:
//!
//! | key | dtype | what |
//! |---|---|---|
//! | `W` | any (`quant_storage`) | packed codes, shape `[(n+1)/2, 1]` for u8 |
//! | `W.absmax` | u8 if nested, else f32 | one per block |
//! | `W.quant_map` | f32 `[16]` | the code book |
//! | `W.nested_absmax` | f32 | nested only: one per 256 blocks |
//! | `W.nested_quant_map` | f32 `[256]` | nested only |
//! | `W.quant_state.bitsandbytes__nf4` (or `__fp4`) | u8 | UTF-8 JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and if nested `nested_blocksize`, `nested_dtype`, `nested_offset` |
//!
//! Reading validates everything (sizes against the shape, dtypes, finite values) and
//! names the weight and field at fault. Writing produces the same keys and JSON, so
//! bitsandbytes' `QuantState.from_dict` loads our files; files are written to a temporary
//! name and renamed, so a crash never leaves a half-written checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::codes::QuantType;
use crate::element::{from_le_bytes, to_le_bytes, FloatDtype};
use crate::error::{Nf4Error, Result};
use crate::quantize::Quantized;
use crate::state::{Absmax, PackedStorage, QuantState};

const QS_PREFIX: &str = ".quant_state.bitsandbytes__";

/// A safetensors file, memory-mapped, its header parsed once (reading a weight looks its
/// tensors up in that index: no re-parsing per weight, which matters with thousands).
pub struct Checkpoint {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    meta: safetensors::tensor::Metadata,
}

impl Checkpoint {
    /// Opens and checks the header of a safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|source| Nf4Error::Io { path: path.display().to_string(), source })?;
        // SAFETY: the map is read-only; as with every mmap'd checkpoint loader, a file
        // truncated by another process while mapped would fault. We never write to it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| Nf4Error::Io { path: path.display().to_string(), source })?;
        let bad = |source| Nf4Error::Safetensors { path: path.display().to_string(), source };
        // read_metadata validates everything (offsets against the file size); keep its index.
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(bad)?;
        Ok(Checkpoint { data_start: 8 + header_len, meta, path, mmap })
    }

    /// One tensor, from the index parsed at open.
    fn view(&self, key: &str) -> Option<TensorView<'_>> {
        let info = self.meta.info(key)?;
        let (a, b) = info.data_offsets;
        let data = self.mmap.get(self.data_start + a..self.data_start + b)?;
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }

    /// The file's `__metadata__` (string pairs such as `format: pt`), from the header
    /// parsed at open.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed file (borrowing the map).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|source| Nf4Error::Safetensors { path: self.path.display().to_string(), source })
    }

    /// Names of the 4-bit weights in the file, sorted.
    pub fn quantized_weights(&self) -> Result<Vec<String>> {
        Ok(weights_among(self.meta.tensors().into_keys()))
    }

    /// Reads one 4-bit weight (its packed bytes and validated state).
    pub fn read(&self, weight: &str) -> Result<Quantized> {
        read_with(|k| self.view(k), weight)
    }
}

/// Names of the 4-bit weights among the tensors, sorted.
pub fn quantized_weights(st: &SafeTensors<'_>) -> Vec<String> {
    weights_among(st.names().into_iter().map(String::from))
}

fn weights_among(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = names
        .filter_map(|k| {
            let i = k.find(QS_PREFIX)?;
            QuantType::from_name(&k[i + QS_PREFIX.len()..]).map(|_| k[..i].to_string())
        })
        .collect();
    v.sort();
    v
}

fn get<'a>(lookup: &impl Fn(&str) -> Option<TensorView<'a>>, weight: &str, suffix: &str, why: &str) -> Result<TensorView<'a>> {
    let key = if suffix.is_empty() { weight.to_string() } else { format!("{weight}.{suffix}") };
    lookup(&key).ok_or_else(|| Nf4Error::MissingTensor { tensor: weight.to_string(), key, why: why.to_string() })
}

fn f32s(weight: &str, field: &str, t: &TensorView<'_>) -> Result<Vec<f32>> {
    if t.dtype() != Dtype::F32 {
        return Err(Nf4Error::field(weight, field, format!("dtype is {:?}, expected F32", t.dtype())));
    }
    Ok(from_le_bytes(t.data()))
}

fn json_usize(weight: &str, j: &serde_json::Map<String, Value>, field: &str) -> Result<usize> {
    match j.get(field) {
        None => Err(Nf4Error::field(weight, field, "missing from the quant_state JSON")),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| Nf4Error::field(weight, field, format!("expected a non-negative integer, found {v}"))),
    }
}

fn json_str<'j>(weight: &str, j: &'j serde_json::Map<String, Value>, field: &str) -> Result<&'j str> {
    match j.get(field) {
        None => Err(Nf4Error::field(weight, field, "missing from the quant_state JSON")),
        Some(v) => v.as_str().ok_or_else(|| Nf4Error::field(weight, field, format!("expected a string, found {v}"))),
    }
}

/// Reads the 4-bit weight `weight` from parsed tensors.
pub fn read_quantized(st: &SafeTensors<'_>, weight: &str) -> Result<Quantized> {
    read_with(|k| st.tensor(k).ok(), weight)
}

fn read_with<'a>(lookup: impl Fn(&str) -> Option<TensorView<'a>>, weight: &str) -> Result<Quantized> {
    let st = &lookup;
    // The packed quant_state: exactly one of __nf4 / __fp4.
    let mut found = None;
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        if let Some(t) = st(&format!("{weight}{QS_PREFIX}{}", qt.name())) {
            if found.is_some() {
                return Err(Nf4Error::field(weight, "quant_state", "both bitsandbytes__nf4 and bitsandbytes__fp4 are present"));
            }
            found = Some((qt, t));
        }
    }
    let (key_qt, qs) = found.ok_or_else(|| Nf4Error::MissingTensor {
        tensor: weight.to_string(),
        key: format!("{weight}{QS_PREFIX}nf4"),
        why: "it holds the quant state JSON (no fp4 variant either)".into(),
    })?;
    if qs.dtype() != Dtype::U8 {
        return Err(Nf4Error::field(weight, "quant_state", format!("dtype is {:?}, expected U8 (UTF-8 JSON)", qs.dtype())));
    }
    let text = std::str::from_utf8(qs.data())
        .map_err(|e| Nf4Error::field(weight, "quant_state", format!("not UTF-8: {e}")))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| Nf4Error::field(weight, "quant_state", format!("not valid JSON: {e}")))?;
    let j = json.as_object().ok_or_else(|| Nf4Error::field(weight, "quant_state", "JSON is not an object"))?;

    let qt_name = json_str(weight, j, "quant_type")?;
    let quant_type = QuantType::from_name(qt_name)
        .ok_or_else(|| Nf4Error::field(weight, "quant_type", format!("`{qt_name}` is not nf4 or fp4")))?;
    if quant_type != key_qt {
        return Err(Nf4Error::field(
            weight,
            "quant_type",
            format!("JSON says {qt_name} but the key says bitsandbytes__{}", key_qt.name()),
        ));
    }
    let blocksize = json_usize(weight, j, "blocksize")?;
    let dtype_name = json_str(weight, j, "dtype")?;
    let dtype = FloatDtype::from_bnb_name(dtype_name).ok_or_else(|| {
        Nf4Error::field(weight, "dtype", format!("`{dtype_name}` is not float32, float16 or bfloat16"))
    })?;
    let shape = match j.get("shape") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|d| d.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Nf4Error::field(weight, "shape", format!("expected non-negative integers, found {a:?}")))?,
        Some(v) => return Err(Nf4Error::field(weight, "shape", format!("expected a list of dims, found {v}"))),
        None => return Err(Nf4Error::field(weight, "shape", "missing from the quant_state JSON")),
    };
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(numel) = numel else {
        return Err(Nf4Error::field(weight, "shape", format!("{shape:?} overflows the element count")));
    };

    let packed = get(st, weight, "", "it holds the packed 4-bit codes")?;
    let quant_map = get(st, weight, "quant_map", "it holds the 16 code values")?;
    let code_v = f32s(weight, "quant_map", &quant_map)?;
    let code: [f32; 16] = code_v
        .as_slice()
        .try_into()
        .map_err(|_| Nf4Error::field(weight, "quant_map", format!("holds {} values, expected 16", code_v.len())))?;
    let absmax_t = get(st, weight, "absmax", "it holds the per-block scales")?;

    let nested = j.contains_key("nested_offset") || st(&format!("{weight}.nested_absmax")).is_some();
    let absmax = if nested {
        if absmax_t.dtype() != Dtype::U8 {
            return Err(Nf4Error::field(
                weight,
                "absmax",
                format!("dtype is {:?}, expected U8 (the state is double-quantized)", absmax_t.dtype()),
            ));
        }
        let blocksize2 = json_usize(weight, j, "nested_blocksize")?;
        let nd = json_str(weight, j, "nested_dtype")?;
        if nd != "float32" {
            return Err(Nf4Error::field(weight, "nested_dtype", format!("`{nd}` is not supported (expected float32)")));
        }
        let offset = match j.get("nested_offset") {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Nf4Error::field(weight, "nested_offset", format!("expected a number, found {v}")))?
                as f32,
            None => return Err(Nf4Error::field(weight, "nested_offset", "missing from the quant_state JSON")),
        };
        let absmax2 = f32s(weight, "nested_absmax", &get(st, weight, "nested_absmax", "the state is double-quantized")?)?;
        let c2 = f32s(weight, "nested_quant_map", &get(st, weight, "nested_quant_map", "the state is double-quantized")?)?;
        let code2: Box<[f32; 256]> = c2
            .into_boxed_slice()
            .try_into()
            .map_err(|b: Box<[f32]>| Nf4Error::field(weight, "nested_quant_map", format!("holds {} values, expected 256", b.len())))?;
        Absmax::Nested { q: absmax_t.data().to_vec(), absmax2, code2, offset, blocksize2 }
    } else {
        Absmax::Plain(f32s(weight, "absmax", &absmax_t)?)
    };

    let state = QuantState {
        quant_type,
        blocksize,
        dtype,
        shape,
        code,
        absmax,
        storage: PackedStorage { dtype: packed.dtype(), shape: packed.shape().to_vec() },
    };
    state.validate(weight)?;
    let need = numel.div_ceil(2);
    if packed.data().len() < need {
        return Err(Nf4Error::field(
            weight,
            "weight",
            format!(
                "packed tensor holds {} bytes ({:?} {:?}) but shape {:?} needs {}",
                packed.data().len(),
                packed.dtype(),
                packed.shape(),
                state.shape,
                need
            ),
        ));
    }
    Ok(Quantized { packed: packed.data().to_vec(), state })
}

/// The JSON bitsandbytes stores under `quant_state.bitsandbytes__<type>`, same keys, same order.
pub fn quant_state_json(state: &QuantState) -> String {
    let shape: Vec<String> = state.shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        state.quant_type.name(),
        state.blocksize,
        state.dtype.bnb_name(),
        shape.join(", ")
    );
    if let Absmax::Nested { offset, blocksize2, .. } = &state.absmax {
        // Python writes the offset as repr(float(f32)): shortest f64 that round-trips.
        s += &format!(
            ", \"nested_blocksize\": {blocksize2}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            serde_json::Number::from_f64(*offset as f64).map(|n| n.to_string()).unwrap_or_else(|| "NaN".into())
        );
    }
    s.push('}');
    s
}

/// A tensor to write: name, dtype, shape, bytes.
pub type OwnedTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// The tensors bitsandbytes would write for `weight`. Validates the state first, so a
/// file we write always reads back (no `NaN` offset in the JSON, no short absmax).
pub fn to_tensors(weight: &str, q: &Quantized) -> Result<Vec<OwnedTensor>> {
    q.state.validate_with_packed(weight, q.packed.len())?;
    let st = &q.state;
    let mut out = vec![
        (weight.to_string(), st.storage.dtype, st.storage.shape.clone(), q.packed.clone()),
        (format!("{weight}.quant_map"), Dtype::F32, vec![16], to_le_bytes(&st.code)),
    ];
    match &st.absmax {
        Absmax::Plain(a) => out.push((format!("{weight}.absmax"), Dtype::F32, vec![a.len()], to_le_bytes(a))),
        Absmax::Nested { q: codes, absmax2, code2, .. } => {
            out.push((format!("{weight}.absmax"), Dtype::U8, vec![codes.len()], codes.clone()));
            out.push((format!("{weight}.nested_absmax"), Dtype::F32, vec![absmax2.len()], to_le_bytes(absmax2)));
            out.push((format!("{weight}.nested_quant_map"), Dtype::F32, vec![256], to_le_bytes(&code2[..])));
        }
    }
    let json = quant_state_json(st).into_bytes();
    out.push((format!("{weight}{QS_PREFIX}{}", st.quant_type.name()), Dtype::U8, vec![json.len()], json));
    Ok(out)
}

/// Writes tensors to `path` atomically (a temporary file in the same folder, then a rename).
pub fn save(path: impl AsRef<Path>, tensors: &[OwnedTensor], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let path = path.as_ref();
    let io = |source| Nf4Error::Io { path: path.display().to_string(), source };
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|source| Nf4Error::Safetensors { path: format!("{} (tensor `{name}`)", path.display()), source })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|source| Nf4Error::Safetensors { path: path.display().to_string(), source })?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
