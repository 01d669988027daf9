//! The model configuration, parsed from a Hugging Face `config.json` (`llama`, `mistral`,
//! `qwen2`).
//!
//! Fields are read one by one from the JSON value (no serde derive) so that each error
//! names the field and says whether it is missing, of the wrong type, or unsupported.
//! Optional fields take the defaults of transformers' config classes for that model type;
//! `null` counts as absent for optional fields. Both rope layouts are read: transformers
//! 4's top-level `rope_theta` + `rope_scaling`, and transformers 5's `rope_parameters`
//! (`{"rope_type": ..., "rope_theta": ..., ...}`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The architectures this runtime implements (they differ only in defaults and biases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// `llama`: biases on q/k/v/o only when `attention_bias` is true.
    Llama,
    /// `mistral`: no biases; a sliding window (default 4096).
    Mistral,
    /// `qwen2`: q/k/v always have a bias, o does not.
    Qwen2,
}

impl ModelType {
    /// The `model_type` string.
    pub fn name(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
        }
    }
}

/// Llama 3's RoPE frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
    /// divided by this.
    pub factor: f64,
    /// See `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are
    /// kept; between the two bounds the frequency is interpolated.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// A parsed, validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The architecture.
    pub model_type: ModelType,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's gate/up projections.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head (even, for RoPE).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3 frequency scaling, or `None` for plain RoPE.
    pub rope_scaling: Option<Llama3Scaling>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// The o projection has a bias.
    pub o_bias: bool,
    /// Sliding-window attention size, when the model uses one. This runtime implements full
    /// causal attention, which equals sliding-window attention for sequences no longer than
    /// the window: longer sequences are refused (see [`crate::model::Llama::forward`]).
    pub sliding_window: Option<usize>,
    /// `max_position_embeddings`, when given (informational).
    pub max_position_embeddings: Option<usize>,
}

impl Config {
    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        Config::from_json_str(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Config> {
        let value: Value = serde_json::from_str(text).map_err(|source| Error::Json { path: file.to_string(), source })?;
        let Value::Object(obj) = &value else {
            return Err(Error::config(file, "<root>", format!("expected a JSON object, found {}", kind(&value))));
        };
        parse(&Fields { file, obj, prefix: "" })
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn parse(f: &Fields<'_>) -> Result<Config> {
    let model_type = match f.req_str("model_type")? {
        "llama" => ModelType::Llama,
        "mistral" => ModelType::Mistral,
        "qwen2" => ModelType::Qwen2,
        other => return Err(f.err("model_type", format!("unsupported value \"{other}\" (expected \"llama\", \"mistral\" or \"qwen2\")"))),
    };
    let hidden_size = f.req_positive("hidden_size")?;
    let intermediate_size = f.req_positive("intermediate_size")?;
    let num_hidden_layers = f.req_positive("num_hidden_layers")?;
    let num_attention_heads = f.req_positive("num_attention_heads")?;
    let vocab_size = f.req_positive("vocab_size")?;
    let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(f.err(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads ({num_attention_heads})"),
        ));
    }
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(f.err(
                "head_dim",
                format!("missing, and hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"),
            ))
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(f.err("head_dim", format!("{head_dim} must be positive and even (RoPE rotates pairs)")));
    }
    let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
        return Err(f.err("rms_norm_eps", format!("{rms_norm_eps} must be positive")));
    }
    let (rope_theta, rope_scaling) = rope(f)?;

    let hidden_act = f.opt_str("hidden_act")?.unwrap_or("silu");
    if hidden_act != "silu" {
        return Err(f.err("hidden_act", format!("unsupported value \"{hidden_act}\" (only \"silu\" is implemented)")));
    }
    if f.opt_bool("mlp_bias")?.unwrap_or(false) {
        return Err(f.err("mlp_bias", "unsupported value true (MLP biases are not implemented)"));
    }
    let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    // As transformers' modeling files do: llama reads attention_bias (all four projections);
    // qwen2 always has q/k/v biases and never an o bias; mistral has none.
    let (qkv_bias, o_bias) = match model_type {
        ModelType::Llama => {
            let b = f.opt_bool("attention_bias")?.unwrap_or(false);
            (b, b)
        }
        ModelType::Mistral => (false, false),
        ModelType::Qwen2 => (true, false),
    };
    let sliding_window = match model_type {
        ModelType::Llama => None,
        ModelType::Mistral => f.opt_positive_or_null("sliding_window", Some(4096))?,
        ModelType::Qwen2 => {
            if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                f.opt_positive_or_null("sliding_window", Some(4096))?
            } else {
                None
            }
        }
    };
    let max_position_embeddings = f.opt_usize("max_position_embeddings")?;
    Ok(Config {
        model_type,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        tie_word_embeddings,
        qkv_bias,
        o_bias,
        sliding_window,
        max_position_embeddings,
    })
}

/// `rope_theta` and the scaling, from `rope_parameters` (transformers 5) when it is an
/// object, else from `rope_theta` + `rope_scaling` (transformers 4).
fn rope(f: &Fields<'_>) -> Result<(f64, Option<Llama3Scaling>)> {
    let (theta, scaling) = match f.obj.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let sub = Fields { file: f.file, obj: p, prefix: "rope_parameters." };
            let theta = match sub.opt_f64("rope_theta")? {
                Some(t) => Some(t),
                None => f.opt_f64("rope_theta")?,
            };
            (theta, scaling_from(&sub)?)
        }
        Some(Value::Null) | None => {
            let scaling = match f.obj.get("rope_scaling") {
                None | Some(Value::Null) => None,
                Some(Value::Object(s)) => scaling_from(&Fields { file: f.file, obj: s, prefix: "rope_scaling." })?,
                Some(other) => return Err(f.err("rope_scaling", format!("wrong type: expected an object or null, found {}", kind(other)))),
            };
            (f.opt_f64("rope_theta")?, scaling)
        }
        Some(other) => return Err(f.err("rope_parameters", format!("wrong type: expected an object or null, found {}", kind(other)))),
    };
    let theta = theta.unwrap_or(10000.0);
    if !(theta > 0.0 && theta.is_finite()) {
        return Err(f.err("rope_theta", format!("{theta} must be positive")));
    }
    Ok((theta, scaling))
}

/// The scaling described by a `rope_scaling` / `rope_parameters` object.
fn scaling_from(s: &Fields<'_>) -> Result<Option<Llama3Scaling>> {
    // transformers accepts the legacy key `type` for `rope_type`.
    let rope_type = match s.opt_str("rope_type")? {
        Some(t) => t,
        None => s.opt_str("type")?.ok_or_else(|| s.err("rope_type", "missing"))?,
    };
    match rope_type {
        "default" => Ok(None),
        "llama3" => {
            let factor = s.req_f64("factor")?;
            let low_freq_factor = s.req_f64("low_freq_factor")?;
            let high_freq_factor = s.req_f64("high_freq_factor")?;
            let original_max_position_embeddings = s.req_positive("original_max_position_embeddings")?;
            if !(factor > 0.0 && factor.is_finite()) {
                return Err(s.err("factor", format!("{factor} must be positive")));
            }
            if !(low_freq_factor > 0.0 && high_freq_factor > low_freq_factor && high_freq_factor.is_finite()) {
                return Err(s.err(
                    "high_freq_factor",
                    format!("need 0 < low_freq_factor < high_freq_factor, got {low_freq_factor} and {high_freq_factor}"),
                ));
            }
            Ok(Some(Llama3Scaling { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }))
        }
        other => Err(s.err("rope_type", format!("unsupported value \"{other}\" (only \"llama3\" and \"default\" are implemented)"))),
    }
}

/// The JSON type of a value, for messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the fields of one JSON object, with errors naming file and field.
pub(crate) struct Fields<'a> {
    pub(crate) file: &'a str,
    pub(crate) obj: &'a Map<String, Value>,
    /// Prepended to field names in errors (`rope_scaling.`).
    pub(crate) prefix: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn err(&self, field: &str, problem: impl Into<String>) -> Error {
        Error::config(self.file, &format!("{}{field}", self.prefix), problem)
    }
    fn wrong(&self, field: &str, expected: &str, v: &Value) -> Error {
        self.err(field, format!("wrong type: expected {expected}, found {}", kind(v)))
    }
    /// The value, `None` when absent or null.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }
    fn required(&self, field: &str) -> Result<&'a Value> {
        match self.obj.get(field) {
            None => Err(self.err(field, "missing")),
            Some(v) => Ok(v),
        }
    }
    fn as_usize(&self, field: &str, v: &Value) -> Result<usize> {
        v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| self.wrong(field, "a non-negative integer", v))
    }
    fn as_f64(&self, field: &str, v: &Value) -> Result<f64> {
        v.as_f64().ok_or_else(|| self.wrong(field, "a number", v))
    }
    pub(crate) fn req_positive(&self, field: &str) -> Result<usize> {
        let n = self.as_usize(field, self.required(field)?)?;
        if n == 0 {
            return Err(self.err(field, "must be positive, got 0"));
        }
        Ok(n)
    }
    pub(crate) fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field).map(|v| self.as_usize(field, v)).transpose()
    }
    /// Absent: `default`; null: `None`; else a positive integer.
    fn opt_positive_or_null(&self, field: &str, default: Option<usize>) -> Result<Option<usize>> {
        match self.obj.get(field) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => match self.as_usize(field, v)? {
                0 => Err(self.err(field, "must be positive, got 0")),
                n => Ok(Some(n)),
            },
        }
    }
    pub(crate) fn req_f64(&self, field: &str) -> Result<f64> {
        self.as_f64(field, self.required(field)?)
    }
    pub(crate) fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field).map(|v| self.as_f64(field, v)).transpose()
    }
    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field).map(|v| v.as_bool().ok_or_else(|| self.wrong(field, "a boolean", v))).transpose()
    }
    pub(crate) fn req_str(&self, field: &str) -> Result<&'a str> {
        let v = self.required(field)?;
        v.as_str().ok_or_else(|| self.wrong(field, "a string", v))
    }
    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        self.get(field).map(|v| v.as_str().ok_or_else(|| self.wrong(field, "a string", v))).transpose()
    }
}

/// A llama configuration of the given sizes, for unit tests.
/// The `config.json` of Llama-3.2-1B (the benchmark shape: hidden 2048, 16 layers, 32/8
/// heads, intermediate 8192, vocabulary 128256, tied embeddings, Llama 3 RoPE scaling).
pub const LLAMA_3_2_1B: &str = r#"{
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": true, "vocab_size": 128256, "attention_bias": false,
    "mlp_bias": false, "hidden_act": "silu", "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16"
}"#;

#[cfg(test)]
pub(crate) fn tiny(hidden: usize, intermediate: usize, layers: usize, heads: usize, kv_heads: usize, vocab: usize) -> Config {
    let json = format!(
        r#"{{"model_type":"llama","hidden_size":{hidden},"intermediate_size":{intermediate},"num_hidden_layers":{layers},"num_attention_heads":{heads},"num_key_value_heads":{kv_heads},"vocab_size":{vocab}}}"#
    );
    Config::from_json_str(&json, "tiny").expect("a valid tiny configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA32_1B: &str = super::LLAMA_3_2_1B;

    fn parse_str(s: &str) -> Result<Config> {
        Config::from_json_str(s, "config.json")
    }

    /// `LLAMA32_1B` with `key` replaced (`Some`) or removed (`None`).
    fn with(key: &str, value: Option<Value>) -> String {
        let mut v: Value = serde_json::from_str(LLAMA32_1B).unwrap();
        let o = v.as_object_mut().unwrap();
        match value {
            Some(x) => o.insert(key.to_string(), x),
            None => o.remove(key),
        };
        v.to_string()
    }

    fn err_of(s: &str) -> String {
        parse_str(s).expect_err("must fail").to_string()
    }

    #[test]
    fn llama_3_2_1b() {
        let c = parse_str(LLAMA32_1B).unwrap();
        assert_eq!(c.model_type, ModelType::Llama);
        assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (2048, 8192, 16));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.group_size()), (32, 8, 64, 4));
        assert_eq!((c.vocab_size, c.rms_norm_eps, c.rope_theta), (128256, 1e-5, 500000.0));
        assert_eq!(
            c.rope_scaling,
            Some(Llama3Scaling { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 })
        );
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.o_bias);
        assert_eq!((c.sliding_window, c.max_position_embeddings), (None, Some(131072)));
    }

    #[test]
    fn defaults_of_a_minimal_llama() {
        let c = parse_str(r#"{"model_type":"llama","hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":101}"#).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim), (4, 8));
        assert_eq!((c.rms_norm_eps, c.rope_theta, c.rope_scaling), (1e-6, 10000.0, None));
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias);
        // null counts as absent for optional fields
        let c = parse_str(r#"{"model_type":"llama","hidden_size":32,"intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":101,"head_dim":null,"num_key_value_heads":null,"rope_scaling":null}"#).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.rope_scaling), (4, 8, None));
    }

    #[test]
    fn qwen2_and_mistral_biases_and_windows() {
        let base = r#""hidden_size":64,"intermediate_size":96,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":50"#;
        let q = parse_str(&format!(r#"{{"model_type":"qwen2",{base},"use_sliding_window":false,"sliding_window":131072}}"#)).unwrap();
        assert!(q.qkv_bias && !q.o_bias);
        assert_eq!(q.sliding_window, None);
        let q = parse_str(&format!(r#"{{"model_type":"qwen2",{base},"use_sliding_window":true,"sliding_window":512}}"#)).unwrap();
        assert_eq!(q.sliding_window, Some(512));
        let m = parse_str(&format!(r#"{{"model_type":"mistral",{base}}}"#)).unwrap();
        assert!(!m.qkv_bias && !m.o_bias);
        assert_eq!(m.sliding_window, Some(4096));
        let m = parse_str(&format!(r#"{{"model_type":"mistral",{base},"sliding_window":null,"head_dim":null}}"#)).unwrap();
        assert_eq!((m.sliding_window, m.head_dim), (None, 16));
        // llama with attention_bias: all four projections
        let l = parse_str(&format!(r#"{{"model_type":"llama",{base},"attention_bias":true}}"#)).unwrap();
        assert!(l.qkv_bias && l.o_bias);
    }

    #[test]
    fn transformers5_rope_parameters() {
        let v = with(
            "rope_parameters",
            Some(serde_json::json!({"rope_type": "llama3", "rope_theta": 250000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
        );
        let mut v: Value = serde_json::from_str(&v).unwrap();
        v.as_object_mut().unwrap().remove("rope_scaling");
        v.as_object_mut().unwrap().remove("rope_theta");
        let c = parse_str(&v.to_string()).unwrap();
        assert_eq!(c.rope_theta, 250000.0);
        assert_eq!(c.rope_scaling.unwrap().factor, 8.0);
        let c = parse_str(&with("rope_parameters", Some(serde_json::json!({"rope_type": "default", "rope_theta": 1e6})))).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1e6, None));
        let e = err_of(&with("rope_parameters", Some(serde_json::json!({"rope_type": "yarn", "factor": 4.0}))));
        assert!(e.contains("config.json: field `rope_parameters.rope_type`: unsupported value \"yarn\""), "{e}");
    }

    #[test]
    fn legacy_type_key_and_default_type() {
        let c = parse_str(&with("rope_scaling", Some(serde_json::json!({"type": "default"})))).unwrap();
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn missing_fields() {
        for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"] {
            let e = err_of(&with(key, None));
            assert_eq!(e, format!("config.json: field `{key}`: missing"));
        }
        let e = err_of(&with("rope_scaling", Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}))));
        assert_eq!(e, "config.json: field `rope_scaling.original_max_position_embeddings`: missing");
        let e = err_of(&with("rope_scaling", Some(serde_json::json!({"factor": 8.0}))));
        assert_eq!(e, "config.json: field `rope_scaling.rope_type`: missing");
    }

    #[test]
    fn wrong_types() {
        let cases = [
            ("hidden_size", serde_json::json!("2048"), "expected a non-negative integer, found a string"),
            ("num_key_value_heads", serde_json::json!(8.5), "expected a non-negative integer, found a number"),
            ("head_dim", serde_json::json!(-64), "expected a non-negative integer, found a number"),
            ("rms_norm_eps", serde_json::json!("1e-5"), "expected a number, found a string"),
            ("tie_word_embeddings", serde_json::json!(1), "expected a boolean, found a number"),
            ("model_type", serde_json::json!(null), "expected a string, found null"),
            ("vocab_size", serde_json::json!(null), "expected a non-negative integer, found null"),
            ("rope_scaling", serde_json::json!([1, 2]), "expected an object or null, found an array"),
            ("hidden_act", serde_json::json!(["silu"]), "expected a string, found an array"),
        ];
        for (key, v, want) in cases {
            let e = err_of(&with(key, Some(v)));
            assert_eq!(e, format!("config.json: field `{key}`: wrong type: {want}"));
        }
        let e = err_of(&with("rope_scaling", Some(serde_json::json!({"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))));
        assert_eq!(e, "config.json: field `rope_scaling.factor`: wrong type: expected a number, found a string");
        assert!(err_of("[1]").contains("field `<root>`: expected a JSON object"));
        assert!(err_of("{not json").starts_with("config.json: not valid JSON"));
    }

    #[test]
    fn unsupported_values() {
        let cases = [
            ("model_type", serde_json::json!("gemma2"), "unsupported value \"gemma2\""),
            ("hidden_act", serde_json::json!("gelu"), "unsupported value \"gelu\""),
            ("mlp_bias", serde_json::json!(true), "unsupported value true"),
            ("num_key_value_heads", serde_json::json!(5), "5 does not divide num_attention_heads (32)"),
            ("head_dim", serde_json::json!(63), "63 must be positive and even"),
            ("hidden_size", serde_json::json!(0), "must be positive, got 0"),
            ("rms_norm_eps", serde_json::json!(0.0), "0 must be positive"),
            ("rope_theta", serde_json::json!(-1.0), "-1 must be positive"),
        ];
        for (key, v, want) in cases {
            let e = err_of(&with(key, Some(v)));
            assert!(e.starts_with(&format!("config.json: field `{key}`: {want}")), "{key}: {e}");
        }
        for t in ["linear", "dynamic", "yarn", "longrope"] {
            let e = err_of(&with("rope_scaling", Some(serde_json::json!({"rope_type": t, "factor": 2.0}))));
            assert!(e.starts_with(&format!("config.json: field `rope_scaling.rope_type`: unsupported value \"{t}\"")), "{e}");
        }
        let e = err_of(&with("rope_scaling", Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))));
        assert!(e.contains("`rope_scaling.high_freq_factor`: need 0 < low_freq_factor < high_freq_factor"), "{e}");
        // head_dim absent and hidden not divisible by heads
        let mut v: Value = serde_json::from_str(&with("hidden_size", Some(serde_json::json!(2050)))).unwrap();
        v.as_object_mut().unwrap().remove("head_dim");
        assert!(err_of(&v.to_string()).contains("field `head_dim`: missing, and hidden_size (2050)"));
    }

    #[test]
    fn from_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, with("vocab_size", None)).unwrap();
        let e = Config::from_file(&p).unwrap_err().to_string();
        assert_eq!(e, format!("{}: field `vocab_size`: missing", p.display()));
        let e = Config::from_file(dir.path().join("nope.json")).unwrap_err().to_string();
        assert!(e.contains("nope.json"), "{e}");
    }
}
