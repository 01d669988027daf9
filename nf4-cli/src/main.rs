//! `nf4`: inspect, quantize, dequantize and verify bitsandbytes 4-bit safetensors files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use half::{bf16, f16};
use indicatif::{ProgressBar, ProgressStyle};
use nf4::checkpoint::{save, to_tensors, OwnedTensor};
use nf4::element::{from_le_bytes, to_le_bytes};
use nf4::{Checkpoint, FloatDtype, QuantType, QuantizeOptions};
use safetensors::Dtype;

/// Inspect, quantize, dequantize and verify bitsandbytes 4-bit safetensors checkpoints.
///
/// Files use bitsandbytes' serialization (what transformers' save_pretrained writes for
/// load_in_4bit models): for a weight W, the packed codes under W and W.absmax,
/// W.quant_map, W.nested_absmax, W.nested_quant_map, W.quant_state.bitsandbytes__nf4.
///
/// Examples:
///   nf4 inspect model.safetensors
///   nf4 quantize model-bf16.safetensors model-nf4.safetensors            # nf4, blocksize 64, double quant
///   nf4 quantize in.safetensors out.safetensors --type fp4 --no-double-quant --storage bf16
///   nf4 dequantize model-nf4.safetensors model-bf16.safetensors --dtype bf16
///   nf4 verify model-nf4.safetensors
#[derive(Parser)]
#[command(name = "nf4", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum QType {
    Nf4,
    Fp4,
}

#[derive(Clone, Copy, ValueEnum)]
enum Storage {
    U8,
    Bf16,
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutDtype {
    /// Each tensor's original dtype (from its quant state).
    Original,
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the 4-bit weights of a file and their quant states.
    Inspect {
        /// A safetensors file.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Quantize the 2-D float `.weight` tensors of a file to 4 bits; copy the rest.
    Quantize {
        /// Input safetensors file (f32/f16/bf16 weights).
        input: PathBuf,
        /// Output file (written to a temporary name, then renamed).
        output: PathBuf,
        /// 4-bit type.
        #[arg(long = "type", value_enum, default_value = "nf4")]
        quant_type: QType,
        /// Elements per absmax block (32..4096, a power of two).
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Keep the absmax in f32 instead of double-quantizing it.
        #[arg(long)]
        no_double_quant: bool,
        /// The dtype the packed bytes are stored as (bitsandbytes' quant_storage).
        #[arg(long, value_enum, default_value = "u8")]
        storage: Storage,
        /// Tensor names containing this are copied, not quantized (repeatable; replaces the
        /// default list: embed_tokens, lm_head, norm).
        #[arg(long)]
        skip: Vec<String>,
    },
    /// Turn every 4-bit weight back into a float tensor; copy the rest.
    Dequantize {
        /// Input file with 4-bit weights.
        input: PathBuf,
        /// Output file.
        output: PathBuf,
        /// Output dtype.
        #[arg(long, value_enum, default_value = "original")]
        dtype: OutDtype,
    },
    /// Read, validate and dequantize every 4-bit weight; exit 1 on the first bad one.
    Verify {
        /// A safetensors file.
        file: PathBuf,
    },
}

fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Keys that belong to a 4-bit weight's quant state (not tensors of their own).
fn state_keys(weights: &[String]) -> impl Fn(&str) -> bool + '_ {
    move |k: &str| {
        weights.iter().any(|w| {
            k.strip_prefix(w.as_str()).is_some_and(|rest| {
                rest.is_empty()
                    || [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"].contains(&rest)
                    || rest.starts_with(".quant_state.")
            })
        })
    }
}

fn inspect(file: &Path, json: bool) -> Result<()> {
    let ck = Checkpoint::open(file)?;
    let weights = ck.quantized_weights()?;
    let mut rows = vec![];
    for w in &weights {
        let q = ck.read(w)?;
        let s = &q.state;
        rows.push(serde_json::json!({
            "weight": w, "quant_type": s.quant_type.name(), "blocksize": s.blocksize, "dtype": s.dtype.bnb_name(),
            "shape": s.shape, "nested": s.absmax.is_nested(), "storage": format!("{:?} {:?}", s.storage.dtype, s.storage.shape),
            "transposed_legacy": s.is_transposed(), "packed_bytes": s.packed_len(),
        }));
    }
    let total = ck.tensors()?.len();
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"file": file.display().to_string(), "tensors": total, "quantized": rows}))?);
        return Ok(());
    }
    println!("{}: {} tensors, {} 4-bit weights", file.display(), total, weights.len());
    for r in rows {
        println!(
            "  {:<60} {} bs{:<5} {:<9} {:<16} {}{}",
            r["weight"].as_str().unwrap_or(""),
            r["quant_type"].as_str().unwrap_or(""),
            r["blocksize"],
            r["dtype"].as_str().unwrap_or(""),
            r["shape"].to_string(),
            if r["nested"] == true { "double-quant" } else { "plain" },
            if r["transposed_legacy"] == true { " (legacy transposed)" } else { "" }
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn quantize(input: &Path, output: &Path, opts: QuantizeOptions, skip: &[String]) -> Result<()> {
    let ck = Checkpoint::open(input)?;
    let st = ck.tensors()?;
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let already = ck.quantized_weights()?;
    if !already.is_empty() {
        bail!("{}: already holds {} 4-bit weights (e.g. `{}`); dequantize it first", input.display(), already.len(), already[0]);
    }
    let pb = progress(names.len(), "quantizing");
    let mut out: Vec<OwnedTensor> = vec![];
    let mut n_q = 0;
    for name in &names {
        pb.set_message(name.clone());
        let t = st.tensor(name)?;
        let dtype = FloatDtype::from_safetensors(t.dtype());
        let eligible = name.ends_with(".weight") && t.shape().len() == 2 && !skip.iter().any(|s| name.contains(s.as_str()));
        match dtype {
            Some(d) if eligible => {
                let q = match d {
                    FloatDtype::F32 => nf4::quantize(name, &from_le_bytes::<f32>(t.data()), t.shape(), &opts),
                    FloatDtype::F16 => nf4::quantize(name, &from_le_bytes::<f16>(t.data()), t.shape(), &opts),
                    FloatDtype::Bf16 => nf4::quantize(name, &from_le_bytes::<bf16>(t.data()), t.shape(), &opts),
                }
                .with_context(|| format!("{}: quantizing `{name}`", input.display()))?;
                out.extend(to_tensors(name, &q)?);
                n_q += 1;
            }
            _ => out.push((name.clone(), t.dtype(), t.shape().to_vec(), t.data().to_vec())),
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    save(output, &out, ck.metadata().cloned())?;
    println!("{}: {} of {} tensors quantized to {} (blocksize {}{}) -> {}", input.display(), n_q, names.len(), opts.quant_type.name(), opts.blocksize, if opts.nested { ", double-quant" } else { "" }, output.display());
    Ok(())
}

fn dequantize(input: &Path, output: &Path, dtype: OutDtype) -> Result<()> {
    let ck = Checkpoint::open(input)?;
    let st = ck.tensors()?;
    let weights = ck.quantized_weights()?;
    let is_state = state_keys(&weights);
    let mut out: Vec<OwnedTensor> = vec![];
    let pb = progress(weights.len(), "dequantizing");
    for w in &weights {
        pb.set_message(w.clone());
        let q = ck.read(w)?;
        let d = match dtype {
            OutDtype::Original => q.state.dtype,
            OutDtype::F32 => FloatDtype::F32,
            OutDtype::F16 => FloatDtype::F16,
            OutDtype::Bf16 => FloatDtype::Bf16,
        };
        let bytes = match d {
            FloatDtype::F32 => to_le_bytes(&nf4::dequantize::<f32>(w, &q.packed, &q.state)?),
            FloatDtype::F16 => to_le_bytes(&nf4::dequantize::<f16>(w, &q.packed, &q.state)?),
            FloatDtype::Bf16 => to_le_bytes(&nf4::dequantize::<bf16>(w, &q.packed, &q.state)?),
        };
        out.push((w.clone(), d.safetensors(), q.state.output_shape(), bytes));
        pb.inc(1);
    }
    pb.finish_and_clear();
    for name in st.names() {
        if !is_state(name) {
            let t = st.tensor(name)?;
            out.push((name.to_string(), t.dtype(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    save(output, &out, ck.metadata().cloned())?;
    println!("{}: {} 4-bit weights dequantized, {} tensors in all -> {}", input.display(), weights.len(), out.len(), output.display());
    Ok(())
}

fn verify(file: &Path) -> Result<()> {
    let ck = Checkpoint::open(file)?;
    let weights = ck.quantized_weights()?;
    if weights.is_empty() {
        println!("{}: no 4-bit weights", file.display());
        return Ok(());
    }
    let pb = progress(weights.len(), "verifying");
    for w in &weights {
        pb.set_message(w.clone());
        let q = ck.read(w)?;
        let v: Vec<f32> = nf4::dequantize(w, &q.packed, &q.state)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: `{w}` dequantizes to {} at element {i}", file.display(), v[i]);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    println!("{}: {} 4-bit weights read, validated and dequantized", file.display(), weights.len());
    Ok(())
}

fn main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Inspect { file, json } => inspect(&file, json)?,
        Cmd::Quantize { input, output, quant_type, blocksize, no_double_quant, storage, skip } => {
            let opts = QuantizeOptions {
                quant_type: match quant_type {
                    QType::Nf4 => QuantType::Nf4,
                    QType::Fp4 => QuantType::Fp4,
                },
                blocksize,
                nested: !no_double_quant,
                storage: match storage {
                    Storage::U8 => Dtype::U8,
                    Storage::Bf16 => Dtype::BF16,
                    Storage::F16 => Dtype::F16,
                    Storage::F32 => Dtype::F32,
                },
            };
            let skip = if skip.is_empty() { vec!["embed_tokens".into(), "lm_head".into(), "norm".into()] } else { skip };
            quantize(&input, &output, opts, &skip)?
        }
        Cmd::Dequantize { input, output, dtype } => dequantize(&input, &output, dtype)?,
        Cmd::Verify { file } => verify(&file)?,
    }
    Ok(ExitCode::SUCCESS)
}
