//! # memlinear
//!
//! `loss(X @ W^T + b, targets)` and its gradients, computed in chunks of tokens so the
//! whole `tokens x vocab` logits tensor never exists, with results that do not depend on
//! the chunk size.
//!
//! * **Any loss.** A loss is a plug-in written as its forward, per row of logits, with the
//!   differentiable operations of [`expr`]. Its gradient is derived from the expression
//!   ([`expr::Loss::new`]); the CPU interprets it ([`eval`]) and the GPU runs a CUDA kernel
//!   generated from it ([`codegen`]). Nothing in the chunked op knows any loss by name.
//! * **Built-ins** ([`losses`]): cross-entropy with ignore_index, label smoothing, z-loss,
//!   logit softcap and scale, class weights; KL / reverse-KL / JSD distillation against a
//!   teacher head chunked the same way; a clipped per-token policy loss (PPO/GRPO).
//! * **Exact accumulation.** Logits are upcast to f32 inside the loss; every gradient
//!   element is accumulated in f32 and rounded once. Chunks are combined as sums divided by
//!   one normalizer (the global count of non-ignored tokens, for gradient accumulation),
//!   never as a mean of chunk means.
//! * **Frozen heads** (the QLoRA case) skip every dW FLOP and byte.
//!
//! CPU: [`cpu::run`] (and [`cpu::reference`], unchunked f64, for tests).
//! GPU: [`gpu::run`] on cudarc buffers, or `libmemlinear.so`'s C ABI ([`capi`]) for
//! PyTorch through ctypes.
//!
//! ```
//! use memlinear::{cpu, losses, Problem, Head, Options, Reduction, Chunk};
//! let (t, h, v) = (5, 4, 11);
//! let x: Vec<f32> = (0..t * h).map(|i| (i as f32 * 0.37).sin()).collect();
//! let w: Vec<f32> = (0..v * h).map(|i| (i as f32 * 0.11).cos()).collect();
//! let targets = vec![1i64, 3, -100, 10, 0];
//! let p = Problem::new(t, v, Head::new(&x, &w, h)).targets(&targets, -100);
//! let ce = losses::cross_entropy(&Default::default());
//! let out = cpu::run(&p, &ce, &Options { chunk: Chunk::Tokens(2), ..Default::default() }).unwrap();
//! assert!(out.loss.is_finite());
//! assert_eq!(out.dx.unwrap().len(), t * h);
//! ```

#![warn(missing_docs)]

pub mod capi;
pub mod codegen;
pub mod cpu;
pub mod elem;
pub mod eval;
pub mod expr;
pub mod gpu;
pub mod losses;

pub use elem::{Dtype, Elem};
pub use expr::Loss;

/// One linear head: `x [tokens, hidden]`, `w [vocab, hidden]`, optional `bias [vocab]`,
/// row-major and contiguous.
#[derive(Clone, Copy, Debug)]
pub struct Head<'a, T> {
    /// Hidden states, `[tokens, hidden]`.
    pub x: &'a [T],
    /// Weights, `[vocab, hidden]`.
    pub w: &'a [T],
    /// Optional bias, `[vocab]`.
    pub bias: Option<&'a [T]>,
    /// The hidden size.
    pub hidden: usize,
}

impl<'a, T> Head<'a, T> {
    /// A head without bias.
    pub fn new(x: &'a [T], w: &'a [T], hidden: usize) -> Self {
        Head { x, w, bias: None, hidden }
    }
    /// With a bias.
    pub fn bias(mut self, b: &'a [T]) -> Self {
        self.bias = Some(b);
        self
    }
}

/// Everything a loss reads, for `tokens` tokens over a vocabulary of `vocab`.
#[derive(Clone, Debug)]
pub struct Problem<'a, T> {
    /// Number of tokens.
    pub tokens: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The trained (or frozen) head.
    pub student: Head<'a, T>,
    /// The teacher head, for distillation losses.
    pub teacher: Option<Head<'a, T>>,
    /// Target classes, `[tokens]`; `ignore_index` marks tokens that count for nothing.
    pub targets: Option<&'a [i64]>,
    /// The target value of ignored tokens.
    pub ignore_index: i64,
    /// Per-token parameters by name, each `[tokens]`.
    pub token_params: Vec<(&'a str, &'a [f32])>,
    /// Per-class parameters by name, each `[vocab]`.
    pub class_params: Vec<(&'a str, &'a [f32])>,
}

impl<'a, T> Problem<'a, T> {
    /// A problem with no targets, teacher or parameters yet.
    pub fn new(tokens: usize, vocab: usize, student: Head<'a, T>) -> Self {
        Problem { tokens, vocab, student, teacher: None, targets: None, ignore_index: -100, token_params: vec![], class_params: vec![] }
    }
    /// Sets the targets and the ignore index.
    pub fn targets(mut self, t: &'a [i64], ignore_index: i64) -> Self {
        self.targets = Some(t);
        self.ignore_index = ignore_index;
        self
    }
    /// Sets the teacher head.
    pub fn teacher(mut self, h: Head<'a, T>) -> Self {
        self.teacher = Some(h);
        self
    }
    /// Adds a per-token parameter.
    pub fn token_param(mut self, name: &'a str, v: &'a [f32]) -> Self {
        self.token_params.push((name, v));
        self
    }
    /// Adds a per-class parameter.
    pub fn class_param(mut self, name: &'a str, v: &'a [f32]) -> Self {
        self.class_params.push((name, v));
        self
    }
}

/// How per-token losses are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reduction {
    /// Sum of the per-token losses divided by `normalizer`; `None`: the number of
    /// non-ignored tokens in this call. For gradient accumulation over micro-batches pass
    /// the global count of all of them.
    Mean(Option<f64>),
    /// Sum of the per-token losses.
    Sum,
    /// Per-token losses; gradients take per-token upstream gradients
    /// ([`Options::grad_tokens`]), folded into the logits' gradient before the dW sum.
    None,
}

/// How many tokens each chunk holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Chunk {
    /// Exactly this many (the last chunk may be shorter).
    Tokens(usize),
    /// The most that keep temporary memory within this many bytes.
    Budget(u64),
}

/// What to compute.
#[derive(Clone, Debug)]
pub struct Options<'a> {
    /// How per-token losses combine.
    pub reduction: Reduction,
    /// Chunking.
    pub chunk: Chunk,
    /// Compute d/dx.
    pub want_dx: bool,
    /// Compute d/dw (and d/dbias): false for a frozen head (no dW work at all).
    pub want_dw: bool,
    /// Per-token upstream gradients, `[tokens]`, for `Reduction::None`.
    pub grad_tokens: Option<&'a [f32]>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options { reduction: Reduction::Mean(None), chunk: Chunk::Budget(256 << 20), want_dx: true, want_dw: true, grad_tokens: None }
    }
}

/// Results.
#[derive(Clone, Debug)]
pub struct Output<T> {
    /// The reduced loss (for `Reduction::None`, the plain sum, for information).
    pub loss: f64,
    /// Per-token losses (0 for ignored tokens).
    pub per_token: Vec<f32>,
    /// d/dx, `[tokens, hidden]`, rounded once from f32.
    pub dx: Option<Vec<T>>,
    /// d/dw, `[vocab, hidden]`, accumulated in f32 over all chunks and rounded once.
    pub dw: Option<Vec<T>>,
    /// d/dbias, `[vocab]`, when the head has a bias.
    pub db: Option<Vec<T>>,
    /// Tokens per chunk that were used.
    pub chunk_tokens: usize,
    /// Temporary bytes the call held at most (excluding inputs and outputs).
    pub temp_bytes: u64,
}

/// Everything that can go wrong, naming the argument at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer has the wrong length for the shapes given.
    #[error("`{arg}` has {got} elements, expected {expected} ({why})")]
    Shape {
        /// The argument.
        arg: String,
        /// Its length.
        got: usize,
        /// The expected length.
        expected: usize,
        /// The shape that implies it.
        why: String,
    },
    /// A target outside [0, vocab) that is not ignore_index.
    #[error("`targets[{index}]` = {value} is outside the vocabulary [0, {vocab}) and is not ignore_index ({ignore_index})")]
    Target {
        /// Token index.
        index: usize,
        /// The target value.
        value: i64,
        /// Vocabulary size.
        vocab: usize,
        /// The ignore index.
        ignore_index: i64,
    },
    /// A NaN or infinity in an input.
    #[error("`{arg}` has a non-finite value ({value}) at {at}")]
    NonFinite {
        /// The argument.
        arg: String,
        /// Where, e.g. `[17, 3]`.
        at: String,
        /// The value.
        value: String,
    },
    /// Finite inputs gave a non-finite loss or gradient (e.g. logits overflowing).
    #[error("token {token}: the loss or its gradient is not finite ({what}) although the inputs are: the logits overflow the loss's arithmetic")]
    NonFiniteResult {
        /// The first such token.
        token: usize,
        /// Loss or gradient.
        what: String,
    },
    /// An option that does not fit the problem or the loss.
    #[error("invalid options: {0}")]
    Options(String),
    /// A loss parameter missing, unknown or of the wrong length.
    #[error("loss `{loss}`: parameter `{name}`: {problem}")]
    Param {
        /// The loss.
        loss: String,
        /// The parameter.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The loss expression is malformed.
    #[error(transparent)]
    Loss(#[from] expr::ExprError),
    /// A CUDA driver / NVRTC / cuBLAS problem.
    #[error(transparent)]
    Gpu(#[from] cudakit::GpuError),
}

/// Validates shapes, targets, parameters and finiteness of every input; returns the
/// number of non-ignored tokens.
pub fn validate<T: Elem>(p: &Problem<'_, T>, loss: &Loss, o: &Options<'_>) -> Result<usize, Error> {
    let (t, v) = (p.tokens, p.vocab);
    if t == 0 || v == 0 {
        return Err(Error::Options(format!("tokens ({t}) and vocab ({v}) must be positive")));
    }
    let shape = |arg: &str, got: usize, expected: usize, why: String| -> Result<(), Error> {
        if got != expected {
            return Err(Error::Shape { arg: arg.into(), got, expected, why });
        }
        Ok(())
    };
    let finite = |arg: &str, xs: &[T], cols: usize| -> Result<(), Error> {
        if let Some(i) = xs.iter().position(|x| !x.to_f32().is_finite()) {
            let at = if cols > 1 { format!("[{}, {}]", i / cols, i % cols) } else { format!("[{i}]") };
            return Err(Error::NonFinite { arg: arg.into(), at, value: format!("{}", xs[i].to_f32()) });
        }
        Ok(())
    };
    let heads: Vec<(&str, &Head<'_, T>)> =
        std::iter::once(("student", &p.student)).chain(p.teacher.as_ref().map(|h| ("teacher", h))).collect();
    for (who, h) in &heads {
        if h.hidden == 0 {
            return Err(Error::Options(format!("{who} hidden size must be positive")));
        }
        shape(&format!("{who}.x"), h.x.len(), t * h.hidden, format!("[tokens={t}, hidden={}]", h.hidden))?;
        shape(&format!("{who}.w"), h.w.len(), v * h.hidden, format!("[vocab={v}, hidden={}]", h.hidden))?;
        if let Some(b) = h.bias {
            shape(&format!("{who}.bias"), b.len(), v, format!("[vocab={v}]"))?;
            finite(&format!("{who}.bias"), b, 1)?;
        }
        finite(&format!("{who}.x"), h.x, h.hidden)?;
        finite(&format!("{who}.w"), h.w, h.hidden)?;
    }
    if loss.uses_teacher() && p.teacher.is_none() {
        return Err(Error::Options(format!("loss `{}` reads the teacher's logits but no teacher head was given", loss.name())));
    }
    if loss.uses_target() && p.targets.is_none() {
        return Err(Error::Options(format!("loss `{}` reads the targets but none were given", loss.name())));
    }
    let mut counted = t;
    if let Some(tg) = p.targets {
        shape("targets", tg.len(), t, format!("[tokens={t}]"))?;
        counted = 0;
        for (i, &x) in tg.iter().enumerate() {
            if x == p.ignore_index {
                continue;
            }
            if x < 0 || x as u64 >= v as u64 {
                return Err(Error::Target { index: i, value: x, vocab: v, ignore_index: p.ignore_index });
            }
            counted += 1;
        }
    }
    bind_params(loss, "token", loss.token_params(), &p.token_params, t)?;
    bind_params(loss, "class", loss.class_params(), &p.class_params, v)?;
    if o.reduction == Reduction::None && (o.want_dx || o.want_dw) {
        match o.grad_tokens {
            None => return Err(Error::Options("reduction None with gradients needs grad_tokens (the per-token upstream gradients)".into())),
            Some(g) => {
                shape("grad_tokens", g.len(), t, format!("[tokens={t}]"))?;
                if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                    return Err(Error::NonFinite { arg: "grad_tokens".into(), at: format!("[{i}]"), value: format!("{}", g[i]) });
                }
            }
        }
    }
    if let Reduction::Mean(Some(n)) = o.reduction {
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::Options(format!("the mean's normalizer must be positive and finite, got {n}")));
        }
    }
    if let Chunk::Tokens(0) = o.chunk {
        return Err(Error::Options("chunk of 0 tokens".into()));
    }
    Ok(counted)
}

/// Orders the caller's named parameters as the loss declares them, checking names and
/// lengths (`len_of`): the one binding rule of the CPU and GPU paths.
pub fn bind_named<V: Copy>(
    loss: &Loss,
    kind: &str,
    declared: &[String],
    given: &[(&str, V)],
    len: usize,
    len_of: impl Fn(&V) -> usize,
) -> Result<Vec<V>, Error> {
    let err = |name: &str, problem: String| Error::Param { loss: loss.name().into(), name: name.into(), problem };
    for (n, _) in given {
        if !declared.iter().any(|d| d == n) {
            return Err(err(n, format!("the loss declares no {kind} parameter of this name (it has {declared:?})")));
        }
    }
    declared
        .iter()
        .map(|d| {
            let (_, v) = given.iter().find(|(n, _)| n == d).ok_or_else(|| err(d, format!("missing ({kind} parameter, {len} values)")))?;
            if len_of(v) != len {
                return Err(err(d, format!("has {} values, expected {len}", len_of(v))));
            }
            Ok(*v)
        })
        .collect()
}

/// [`bind_named`] for host values, which must also be finite.
pub fn bind_params<'a>(loss: &Loss, kind: &str, declared: &[String], given: &[(&str, &'a [f32])], len: usize) -> Result<Vec<&'a [f32]>, Error> {
    let vals = bind_named(loss, kind, declared, given, len, |v| v.len())?;
    for (d, v) in declared.iter().zip(&vals) {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::Param { loss: loss.name().into(), name: d.clone(), problem: format!("non-finite value {} at [{i}]", v[i]) });
        }
    }
    Ok(vals)
}

/// The normalizer a reduction divides by, given the number of non-ignored tokens.
pub fn normalizer(r: Reduction, counted: usize) -> f64 {
    match r {
        Reduction::Mean(Some(n)) => n,
        Reduction::Mean(None) => counted.max(1) as f64,
        Reduction::Sum | Reduction::None => 1.0,
    }
}
