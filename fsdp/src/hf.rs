//! Hugging Face model folders: `config.json` plus `model.safetensors` or
//! `model.safetensors.index.json` and its shards; bf16, f16 or f32 tensors, or
//! bitsandbytes 4-bit weights (read as they are, not re-quantized).
//!
//! Shards are memory-mapped (through `nf4::Checkpoint`) and each tensor is converted as it
//! is needed, so peak memory is the model being built, not the files. Every error names the
//! file and the tensor: missing, wrong shape, unsupported dtype.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::weights::{BaseFormat, TensorData, WeightSpec};

/// The file of a single-file model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where each tensor of a model folder lives.
enum Layout {
    Single(PathBuf),
    /// tensor name -> shard path, and the index's path for errors.
    Sharded { index: PathBuf, map: HashMap<String, PathBuf> },
}

/// Loads a model folder, quantizing the projections per `base`.
pub fn load(dir: impl AsRef<Path>, base: &BaseFormat) -> Result<Llama> {
    let dir = dir.as_ref();
    let config = Config::from_file(dir.join("config.json"))?;
    let layout = layout(dir)?;
    let mut open: HashMap<PathBuf, Shard> = HashMap::new();
    Llama::from_source(config, base, |spec| {
        let file = match &layout {
            Layout::Single(p) => p.clone(),
            Layout::Sharded { index, map } => {
                map.get(&spec.name).cloned().ok_or_else(|| Error::tensor(&index.display().to_string(), &spec.name, "missing from weight_map"))?
            }
        };
        if !open.contains_key(&file) {
            let shard = Shard::open(&file)?;
            open.insert(file.clone(), shard);
        }
        open[&file].read(spec)
    })
}

fn layout(dir: &Path) -> Result<Layout> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let file = index.display().to_string();
        let text = std::fs::read_to_string(&index).map_err(Error::io(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { path: file.clone(), source })?;
        let Some(wm) = v.get("weight_map") else { return Err(Error::config(&file, "weight_map", "missing")) };
        let wm = wm.as_object().ok_or_else(|| Error::config(&file, "weight_map", "wrong type: expected an object"))?;
        let mut map = HashMap::with_capacity(wm.len());
        for (name, shard) in wm {
            let shard = shard.as_str().ok_or_else(|| Error::config(&file, &format!("weight_map.{name}"), "wrong type: expected a file name"))?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(Error::config(&file, &format!("weight_map.{name}"), format!("\"{shard}\" is not a file name in the folder")));
            }
            map.insert(name.clone(), dir.join(shard));
        }
        return Ok(Layout::Sharded { index, map });
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(Layout::Single(single));
    }
    Err(Error::Io {
        path: dir.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("neither {SINGLE_FILE} nor {INDEX_FILE} is in the folder")),
    })
}

/// One memory-mapped safetensors file.
struct Shard {
    ck: nf4::Checkpoint,
    /// Weights stored as bitsandbytes 4-bit.
    quantized: HashSet<String>,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let ck = nf4::Checkpoint::open(path)?;
        let quantized = ck.quantized_weights()?.into_iter().collect();
        Ok(Shard { ck, quantized })
    }

    fn read(&self, spec: &WeightSpec) -> Result<TensorData> {
        let file = self.ck.path().display().to_string();
        if self.quantized.contains(&spec.name) {
            let q = self.ck.read(&spec.name)?;
            if q.state.output_shape() != spec.shape {
                return Err(Error::tensor(&file, &spec.name, format!("4-bit shape {:?}, but config.json implies {:?}", q.state.output_shape(), spec.shape)));
            }
            return Ok(TensorData::Quantized(Box::new(q)));
        }
        let st = self.ck.tensors()?;
        let view = st.tensor(&spec.name).map_err(|_| Error::tensor(&file, &spec.name, "missing"))?;
        if view.shape() != spec.shape.as_slice() {
            return Err(Error::tensor(&file, &spec.name, format!("shape {:?}, but config.json implies {:?}", view.shape(), spec.shape)));
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => TensorData::F32(nf4::element::from_le_bytes::<f32>(bytes)),
            Dtype::BF16 => TensorData::Bf16(nf4::element::from_le_bytes::<bf16>(bytes)),
            Dtype::F16 => TensorData::F16(nf4::element::from_le_bytes::<f16>(bytes)),
            other => return Err(Error::tensor(&file, &spec.name, format!("dtype {other:?} is not supported (expected BF16, F16 or F32)"))),
        })
    }
}

/// Writes named f32 tensors as a safetensors file of `dtype` (F32, BF16 or F16; rounded to
/// nearest even), atomically. Used for adapters, and for test and benchmark model folders.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])], dtype: Dtype, metadata: Option<HashMap<String, String>>) -> Result<()> {
    let file = path.display().to_string();
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::tensor(&file, name, format!("{} values for shape {shape:?}", data.len())));
        }
        let bytes = match dtype {
            Dtype::F32 => nf4::element::to_le_bytes(data),
            Dtype::BF16 => nf4::element::to_le_bytes(&data.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
            Dtype::F16 => nf4::element::to_le_bytes(&data.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
            other => return Err(Error::tensor(&file, name, format!("cannot write dtype {other:?}"))),
        };
        owned.push((name.as_str(), shape.clone(), bytes));
    }
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes)
                .map(|v| (*name, v))
                .map_err(|source| Error::Safetensors { path: format!("{file} (tensor `{name}`)"), source })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|source| Error::Safetensors { path: file.clone(), source })?;
    crate::atomic::write(path, &bytes)
}

/// Writes a model folder: `config.json` (the given text), and the tensors in `shards`
/// safetensors files (`model.safetensors` when 1, else `model-0000i-of-0000n.safetensors`
/// plus `model.safetensors.index.json`), in `dtype`. For tests, benchmarks and GPU fixtures.
pub fn write_folder(dir: &Path, config_json: &str, tensors: &[(String, Vec<usize>, &[f32])], dtype: Dtype, shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    crate::atomic::write(&dir.join("config.json"), config_json.as_bytes())?;
    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards <= 1 {
        return write_safetensors(&dir.join(SINGLE_FILE), tensors, dtype, meta);
    }
    let per = tensors.len().div_ceil(shards).max(1);
    let files = tensors.len().div_ceil(per); // fewer than asked when there are few tensors
    let mut weight_map = BTreeMap::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{files:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&name), chunk, dtype, meta.clone())?;
        for (t, _, _) in chunk {
            weight_map.insert(t.clone(), name.clone());
        }
    }
    let total: usize = tensors.iter().map(|(_, _, d)| d.len() * dtype.bitsize() / 8).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    crate::atomic::write(&dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).expect("JSON of strings").as_bytes())
}
