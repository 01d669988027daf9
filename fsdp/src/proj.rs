//! The seven linear projections of a decoder layer, their HF names and shapes.

use crate::config::Config;

/// One of the seven projections of a decoder layer (the LoRA targets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    /// `self_attn.q_proj`: `[heads * head_dim, hidden]`.
    Q,
    /// `self_attn.k_proj`: `[kv_heads * head_dim, hidden]`.
    K,
    /// `self_attn.v_proj`: `[kv_heads * head_dim, hidden]`.
    V,
    /// `self_attn.o_proj`: `[hidden, heads * head_dim]`.
    O,
    /// `mlp.gate_proj`: `[intermediate, hidden]`.
    Gate,
    /// `mlp.up_proj`: `[intermediate, hidden]`.
    Up,
    /// `mlp.down_proj`: `[hidden, intermediate]`.
    Down,
}

impl Proj {
    /// All seven, in HF's module order (the order of every per-projection array here).
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// Position in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module name (`q_proj`, ..., `down_proj`), as in PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// Parses a module name.
    pub fn from_name(s: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The parent module: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }

    /// The module path inside the model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }

    /// `(out_features, in_features)`.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        let (h, q, kv, i) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size);
        match self {
            Proj::Q => (q, h),
            Proj::K | Proj::V => (kv, h),
            Proj::O => (h, q),
            Proj::Gate | Proj::Up => (i, h),
            Proj::Down => (h, i),
        }
    }

    /// Whether the model has a bias on this projection.
    pub fn has_bias(self, c: &Config) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => c.qkv_bias,
            Proj::O => c.o_bias,
            _ => false,
        }
    }
}

impl std::fmt::Display for Proj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
