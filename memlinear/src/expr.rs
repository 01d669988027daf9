//! Loss expressions: a small differentiable language for "one row of logits -> one loss".
//!
//! A loss is written once, as its forward, with [`LossBuilder`]. Values are either a
//! *row* (one number per vocabulary entry: the logits, the teacher's logits, a class
//! weight vector, anything computed from them element by element) or a *scalar* (one
//! number per token: a reduction of a row, a per-token parameter such as an advantage, a
//! constant). Rows and scalars mix freely; a scalar used with a row is broadcast.
//!
//! [`Loss::new`] type-checks the expression, derives d(loss)/d(logits) by reverse-mode
//! differentiation *of the expression graph* (the gradient is itself an expression of the
//! same language), simplifies and deduplicates both, and schedules them into passes over
//! the row: every reduction whose input needs the result of another reduction needs one
//! more pass. The CPU interpreter ([`crate::eval`]) and the CUDA code generator
//! ([`crate::codegen`]) both run that schedule, so a new loss needs no hand-written
//! derivative anywhere.
//!
//! ```
//! use memlinear::expr::Loss;
//! // Cross-entropy, written as its forward only.
//! let ce = Loss::new("my_ce", |b| {
//!     let z = b.logits();
//!     z.logsumexp() - z.at_target()
//! }).unwrap();
//! assert_eq!(ce.passes(), 1); // one pass for the logsumexp, then the gradient pass
//! ```

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

/// Index of a node in a [`Graph`].
pub type NodeId = u32;

/// Row (per vocabulary entry) or scalar (per token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// One value per vocabulary entry.
    Row,
    /// One value per token.
    Scalar,
}

/// The operations of the language.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Row: the student's logits, the output of the chunked linear layer (differentiated).
    Logits,
    /// Row: the teacher's logits (distillation), computed by the teacher head in the same
    /// chunks. Not differentiated.
    Teacher,
    /// Row: 1 at the token's target class, 0 elsewhere.
    IsTarget,
    /// Row: a caller-given vector over the vocabulary (e.g. class weights), by index.
    ClassParam(u16),
    /// Scalar: a caller-given per-token value (e.g. an advantage), by index.
    TokenParam(u16),
    /// Scalar: the upstream gradient of this token's loss (the seed of differentiation).
    Seed,
    /// Scalar: the vocabulary size.
    VocabSize,
    /// Scalar constant (bits of an f64, so the op can be hashed).
    Const(u64),
    /// Elementwise.
    Neg,
    /// Elementwise natural exponential.
    Exp,
    /// Elementwise natural logarithm.
    Log,
    /// Elementwise hyperbolic tangent.
    Tanh,
    /// Elementwise square root.
    Sqrt,
    /// Elementwise.
    Add,
    /// Elementwise.
    Sub,
    /// Elementwise.
    Mul,
    /// Elementwise.
    Div,
    /// Elementwise maximum (the gradient goes to the larger argument; ties to the first).
    Max,
    /// Elementwise minimum (the gradient goes to the smaller argument; ties to the first).
    Min,
    /// Elementwise `a > b` as 1 or 0 (not differentiated).
    Gt,
    /// `cond != 0 ? a : b`, elementwise.
    Select,
    /// Identity in the forward, zero gradient.
    StopGrad,
    /// Row -> scalar: sum over the vocabulary.
    Sum,
    /// Row -> scalar: maximum over the vocabulary (not differentiated: use `logsumexp`
    /// for a smooth maximum).
    ReduceMax,
    /// Row -> scalar: log(sum(exp(x))), computed stably.
    LogSumExp,
    /// Row -> scalar: the row's value at the token's target class.
    AtTarget,
}

impl Op {
    /// How many operands the op takes.
    pub fn arity(self) -> usize {
        use Op::*;
        match self {
            Logits | Teacher | IsTarget | ClassParam(_) | TokenParam(_) | Seed | VocabSize | Const(_) => 0,
            Neg | Exp | Log | Tanh | Sqrt | StopGrad | Sum | ReduceMax | LogSumExp | AtTarget => 1,
            Add | Sub | Mul | Div | Max | Min | Gt => 2,
            Select => 3,
        }
    }

    /// Whether the op reduces a row to a scalar with a pass over the row.
    pub fn is_reduction(self) -> bool {
        matches!(self, Op::Sum | Op::ReduceMax | Op::LogSumExp)
    }
}

/// One node: an op and its operands (earlier nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Operands; only the first `op.arity()` are meaningful.
    pub args: [NodeId; 3],
    /// The node's shape.
    pub shape: Shape,
}

/// A hash-consed expression DAG: equal nodes are stored once, operands always precede
/// their users (ids are a topological order).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    nodes: Vec<Node>,
    index: HashMap<Node, NodeId>,
}

impl Graph {
    /// All nodes, in topological order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> Node {
        self.nodes[id as usize]
    }

    /// The value of a constant node.
    pub fn constant(&self, id: NodeId) -> Option<f64> {
        match self.node(id).op {
            Op::Const(bits) => Some(f64::from_bits(bits)),
            _ => None,
        }
    }

    fn intern(&mut self, node: Node) -> NodeId {
        if let Some(&id) = self.index.get(&node) {
            return id;
        }
        let id = self.nodes.len() as NodeId;
        self.nodes.push(node);
        self.index.insert(node, id);
        id
    }

    fn leaf(&mut self, op: Op, shape: Shape) -> NodeId {
        self.intern(Node { op, args: [0; 3], shape })
    }

    /// A scalar constant.
    pub fn konst(&mut self, v: f64) -> NodeId {
        // One NaN, one zero: -0.0 and 0.0 behave the same in everything we emit.
        let v = if v == 0.0 { 0.0 } else { v };
        self.leaf(Op::Const(v.to_bits()), Shape::Scalar)
    }

    /// Applies `op` to `args`, with shape inference, constant folding and the algebraic
    /// identities that keep derived gradients small (x*1, x*0, x+0, -(-x), ...).
    pub fn apply(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        use Op::*;
        assert_eq!(args.len(), op.arity(), "{op:?} takes {} operands", op.arity());
        let shape_of = |g: &Graph, i: usize| g.node(args[i]).shape;
        let shape = match op {
            Sum | ReduceMax | LogSumExp | AtTarget => Shape::Scalar,
            _ => {
                if (0..args.len()).any(|i| shape_of(self, i) == Shape::Row) {
                    Shape::Row
                } else {
                    Shape::Scalar
                }
            }
        };
        let c: Vec<Option<f64>> = args.iter().map(|&a| self.constant(a)).collect();
        // Constant folding (scalars only: a reduction of a broadcast constant is not folded).
        if shape == Shape::Scalar && !op.is_reduction() && op != AtTarget && c.iter().all(Option::is_some) && !args.is_empty() {
            let v: Vec<f64> = c.iter().map(|x| x.expect("checked")).collect();
            return self.konst(crate::eval::apply_scalar(op, &v));
        }
        let is = |x: Option<f64>, k: f64| x == Some(k);
        match op {
            Add if is(c[0], 0.0) => return args[1],
            Add | Sub if is(c[1], 0.0) => return args[0],
            Sub if is(c[0], 0.0) => return self.apply(Neg, &[args[1]]),
            Sub if args[0] == args[1] => return self.konst(0.0),
            Mul if is(c[0], 1.0) => return args[1],
            Mul | Div if is(c[1], 1.0) => return args[0],
            Mul if is(c[0], 0.0) || is(c[1], 0.0) => return self.konst(0.0),
            Div if is(c[0], 0.0) => return self.konst(0.0),
            Mul if is(c[0], -1.0) => return self.apply(Neg, &[args[1]]),
            Mul if is(c[1], -1.0) => return self.apply(Neg, &[args[0]]),
            Neg if self.node(args[0]).op == Neg => return self.node(args[0]).args[0],
            Select if c[0].is_some() => return if c[0] != Some(0.0) { args[1] } else { args[2] },
            Select if args[1] == args[2] => return args[1],
            StopGrad if self.is_constant_tree(args[0]) => return args[0],
            _ => {}
        }
        let mut a = [0; 3];
        a[..args.len()].copy_from_slice(args);
        // Commutative ops: one canonical operand order, so CSE finds both spellings.
        if matches!(op, Add | Mul) && a[0] > a[1] {
            a.swap(0, 1);
        }
        self.intern(Node { op, args: a, shape })
    }

    fn is_constant_tree(&self, id: NodeId) -> bool {
        matches!(self.node(id).op, Op::Const(_) | Op::VocabSize | Op::TokenParam(_) | Op::ClassParam(_) | Op::Teacher | Op::IsTarget)
    }

    /// Whether `id`'s value depends on the logits.
    pub fn depends_on_logits(&self, id: NodeId) -> bool {
        let mut dep = vec![false; id as usize + 1];
        for (i, n) in self.nodes[..=id as usize].iter().enumerate() {
            dep[i] = match n.op {
                Op::Logits => true,
                Op::StopGrad | Op::Gt => false,
                _ => n.args[..n.op.arity()].iter().any(|&a| dep[a as usize]),
            };
        }
        dep[id as usize]
    }
}

/// Why an expression is not a loss.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExprError {
    /// The loss expression is a row, not one number per token.
    #[error("loss `{0}` is a row (one value per vocabulary entry): reduce it to one number per token (sum, logsumexp, at_target)")]
    NotScalar(String),
    /// The loss does not depend on the logits.
    #[error("loss `{0}` does not depend on the logits: there is nothing to differentiate")]
    NoLogits(String),
    /// Two parameters share a name.
    #[error("loss `{loss}` declares parameter `{name}` twice")]
    DuplicateParam {
        /// The loss.
        loss: String,
        /// The parameter.
        name: String,
    },
}

/// Builds one loss expression. Get one from [`Loss::new`].
pub struct LossBuilder {
    g: RefCell<Graph>,
    token_params: RefCell<Vec<String>>,
    class_params: RefCell<Vec<String>>,
    dup: RefCell<Option<String>>,
}

/// A value in a loss expression (row or scalar); combine with `+ - * /` and the methods.
#[derive(Clone, Copy)]
pub struct Expr<'b> {
    b: &'b LossBuilder,
    id: NodeId,
}

impl fmt::Debug for Expr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr#{}", self.id)
    }
}

impl LossBuilder {
    fn new() -> Self {
        LossBuilder {
            g: RefCell::new(Graph::default()),
            token_params: RefCell::new(vec![]),
            class_params: RefCell::new(vec![]),
            dup: RefCell::new(None),
        }
    }
    fn wrap(&self, id: NodeId) -> Expr<'_> {
        Expr { b: self, id }
    }
    fn leaf(&self, op: Op, shape: Shape) -> Expr<'_> {
        let id = self.g.borrow_mut().leaf(op, shape);
        self.wrap(id)
    }
    /// The student's logits (row): what the chunked linear layer computes.
    pub fn logits(&self) -> Expr<'_> {
        self.leaf(Op::Logits, Shape::Row)
    }
    /// The teacher's logits (row), for distillation. Not differentiated.
    pub fn teacher(&self) -> Expr<'_> {
        self.leaf(Op::Teacher, Shape::Row)
    }
    /// 1 at the token's target class, 0 elsewhere (row).
    pub fn is_target(&self) -> Expr<'_> {
        self.leaf(Op::IsTarget, Shape::Row)
    }
    /// The vocabulary size (scalar).
    pub fn vocab_size(&self) -> Expr<'_> {
        self.leaf(Op::VocabSize, Shape::Scalar)
    }
    /// A constant.
    pub fn constant(&self, v: f64) -> Expr<'_> {
        let id = self.g.borrow_mut().konst(v);
        self.wrap(id)
    }
    fn param(&self, list: &RefCell<Vec<String>>, name: &str, make: fn(u16) -> Op, shape: Shape) -> Expr<'_> {
        let mut l = list.borrow_mut();
        let idx = match l.iter().position(|n| n == name) {
            Some(i) => {
                *self.dup.borrow_mut() = Some(name.to_string());
                i
            }
            None => {
                l.push(name.to_string());
                l.len() - 1
            }
        };
        drop(l);
        self.leaf(make(idx as u16), shape)
    }
    /// A per-token input (scalar) the caller passes by `name`, e.g. an advantage.
    /// Declare each name once and reuse the `Expr`.
    pub fn token_param(&self, name: &str) -> Expr<'_> {
        self.param(&self.token_params, name, Op::TokenParam, Shape::Scalar)
    }
    /// A per-class input (row of vocabulary length) the caller passes by `name`, e.g.
    /// class weights. Declare each name once and reuse the `Expr`.
    pub fn class_param(&self, name: &str) -> Expr<'_> {
        self.param(&self.class_params, name, Op::ClassParam, Shape::Row)
    }
    /// `cond != 0 ? a : b` (elementwise); the gradient flows to the branch taken.
    pub fn select<'b>(&'b self, cond: Expr<'b>, a: Expr<'b>, b: Expr<'b>) -> Expr<'b> {
        let id = self.g.borrow_mut().apply(Op::Select, &[cond.id, a.id, b.id]);
        self.wrap(id)
    }
}

impl<'b> Expr<'b> {
    fn un(self, op: Op) -> Expr<'b> {
        let id = self.b.g.borrow_mut().apply(op, &[self.id]);
        self.b.wrap(id)
    }
    fn bin(self, op: Op, o: Expr<'b>) -> Expr<'b> {
        let id = self.b.g.borrow_mut().apply(op, &[self.id, o.id]);
        self.b.wrap(id)
    }
    fn k(self, v: f64) -> Expr<'b> {
        self.b.constant(v)
    }
    /// The node's id in the builder's graph.
    pub fn id(self) -> NodeId {
        self.id
    }
    /// exp(x).
    pub fn exp(self) -> Expr<'b> {
        self.un(Op::Exp)
    }
    /// ln(x).
    pub fn ln(self) -> Expr<'b> {
        self.un(Op::Log)
    }
    /// tanh(x).
    pub fn tanh(self) -> Expr<'b> {
        self.un(Op::Tanh)
    }
    /// sqrt(x).
    pub fn sqrt(self) -> Expr<'b> {
        self.un(Op::Sqrt)
    }
    /// x * x.
    pub fn square(self) -> Expr<'b> {
        self * self
    }
    /// Elementwise maximum.
    pub fn max(self, o: impl IntoExpr<'b>) -> Expr<'b> {
        let o = o.into_expr(self.b);
        self.bin(Op::Max, o)
    }
    /// Elementwise minimum.
    pub fn min(self, o: impl IntoExpr<'b>) -> Expr<'b> {
        let o = o.into_expr(self.b);
        self.bin(Op::Min, o)
    }
    /// Clamp into [lo, hi].
    pub fn clamp(self, lo: impl IntoExpr<'b>, hi: impl IntoExpr<'b>) -> Expr<'b> {
        self.max(lo).min(hi)
    }
    /// 1 where self > o, else 0 (not differentiated).
    pub fn gt(self, o: impl IntoExpr<'b>) -> Expr<'b> {
        let o = o.into_expr(self.b);
        self.bin(Op::Gt, o)
    }
    /// The same value with no gradient.
    pub fn stop_grad(self) -> Expr<'b> {
        self.un(Op::StopGrad)
    }
    /// Sum over the vocabulary (row -> scalar).
    pub fn sum(self) -> Expr<'b> {
        self.un(Op::Sum)
    }
    /// Mean over the vocabulary (row -> scalar).
    pub fn mean(self) -> Expr<'b> {
        self.sum() / self.b.vocab_size()
    }
    /// Maximum over the vocabulary (row -> scalar), not differentiated.
    pub fn reduce_max(self) -> Expr<'b> {
        self.un(Op::ReduceMax)
    }
    /// log(sum(exp(x))) over the vocabulary, computed stably (row -> scalar).
    pub fn logsumexp(self) -> Expr<'b> {
        self.un(Op::LogSumExp)
    }
    /// log_softmax over the vocabulary (row).
    pub fn log_softmax(self) -> Expr<'b> {
        self - self.logsumexp()
    }
    /// The value at the token's target class (row -> scalar).
    pub fn at_target(self) -> Expr<'b> {
        self.un(Op::AtTarget)
    }
    /// softcap * tanh(x / softcap) (Gemma 2's logit soft-capping).
    pub fn softcap(self, cap: f64) -> Expr<'b> {
        (self / cap).tanh() * cap
    }
}

/// Things that can stand where an expression is expected: expressions and numbers.
pub trait IntoExpr<'b> {
    /// Converts into an expression of builder `b`.
    fn into_expr(self, b: &'b LossBuilder) -> Expr<'b>;
}
impl<'b> IntoExpr<'b> for Expr<'b> {
    fn into_expr(self, _: &'b LossBuilder) -> Expr<'b> {
        self
    }
}
impl<'b> IntoExpr<'b> for f64 {
    fn into_expr(self, b: &'b LossBuilder) -> Expr<'b> {
        b.constant(self)
    }
}

macro_rules! binop {
    ($tr:ident, $m:ident, $op:expr) => {
        impl<'b> std::ops::$tr<Expr<'b>> for Expr<'b> {
            type Output = Expr<'b>;
            fn $m(self, o: Expr<'b>) -> Expr<'b> {
                self.bin($op, o)
            }
        }
        impl<'b> std::ops::$tr<f64> for Expr<'b> {
            type Output = Expr<'b>;
            fn $m(self, o: f64) -> Expr<'b> {
                let o = self.k(o);
                self.bin($op, o)
            }
        }
        impl<'b> std::ops::$tr<Expr<'b>> for f64 {
            type Output = Expr<'b>;
            fn $m(self, o: Expr<'b>) -> Expr<'b> {
                let s = o.k(self);
                s.bin($op, o)
            }
        }
    };
}
binop!(Add, add, Op::Add);
binop!(Sub, sub, Op::Sub);
binop!(Mul, mul, Op::Mul);
binop!(Div, div, Op::Div);

impl<'b> std::ops::Neg for Expr<'b> {
    type Output = Expr<'b>;
    fn neg(self) -> Expr<'b> {
        self.un(Op::Neg)
    }
}

/// A compiled loss: forward and derived gradient expressions, and their schedule.
#[derive(Clone, Debug)]
pub struct Loss {
    name: String,
    graph: Graph,
    loss: NodeId,
    grad: NodeId,
    token_params: Vec<String>,
    class_params: Vec<String>,
    /// Reduction level of every node (see [`Loss::level`]).
    levels: Vec<u32>,
}

impl Loss {
    /// Builds a loss from its forward. `f` gets a builder and returns the per-token loss
    /// (a scalar). The gradient with respect to the logits is derived here.
    pub fn new<F>(name: &str, f: F) -> Result<Loss, ExprError>
    where
        F: for<'b> FnOnce(&'b LossBuilder) -> Expr<'b>,
    {
        let b = LossBuilder::new();
        let root = f(&b).id;
        if let Some(dup) = b.dup.borrow().clone() {
            return Err(ExprError::DuplicateParam { loss: name.into(), name: dup });
        }
        let mut graph = b.g.into_inner();
        if graph.node(root).shape != Shape::Scalar {
            return Err(ExprError::NotScalar(name.into()));
        }
        if !graph.depends_on_logits(root) {
            return Err(ExprError::NoLogits(name.into()));
        }
        let grad = derive(&mut graph, root);
        let levels = levels(&graph);
        Ok(Loss {
            name: name.into(),
            graph,
            loss: root,
            grad,
            token_params: b.token_params.into_inner(),
            class_params: b.class_params.into_inner(),
            levels,
        })
    }

    /// The loss's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The expression graph (forward and gradient nodes).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    /// The per-token loss node.
    pub fn loss_node(&self) -> NodeId {
        self.loss
    }
    /// d(loss)/d(logits) times the seed (a row node; a constant 0 if it vanished).
    pub fn grad_node(&self) -> NodeId {
        self.grad
    }
    /// Names of the per-token parameters, in index order.
    pub fn token_params(&self) -> &[String] {
        &self.token_params
    }
    /// Names of the per-class parameters, in index order.
    pub fn class_params(&self) -> &[String] {
        &self.class_params
    }
    /// Whether the loss reads the teacher's logits.
    pub fn uses_teacher(&self) -> bool {
        self.uses(Op::Teacher)
    }
    /// Whether the loss reads the target class (else targets only mark ignored tokens).
    pub fn uses_target(&self) -> bool {
        self.uses(Op::IsTarget) || self.uses(Op::AtTarget)
    }
    fn uses(&self, op: Op) -> bool {
        let live = self.live(&[self.loss, self.grad]);
        self.graph.nodes().iter().enumerate().any(|(i, n)| live[i] && n.op == op)
    }

    /// Reduction level: 0 for values computable without any reduction; a reduction has
    /// 1 + the highest level among the scalars its input needs; others take the highest
    /// level of their operands. A level-k scalar is known after k passes over the row.
    pub fn level(&self, id: NodeId) -> u32 {
        self.levels[id as usize]
    }

    /// Passes over the row before the gradient pass: the highest level of any scalar the
    /// loss or the gradient needs.
    pub fn passes(&self) -> u32 {
        let live = self.live(&[self.loss, self.grad]);
        self.graph
            .nodes()
            .iter()
            .enumerate()
            .filter(|(i, n)| live[*i] && n.op.is_reduction())
            .map(|(i, _)| self.levels[i])
            .max()
            .unwrap_or(0)
    }

    /// Nodes reachable from `roots`.
    pub fn live(&self, roots: &[NodeId]) -> Vec<bool> {
        let mut live = vec![false; self.graph.nodes().len()];
        for &r in roots {
            live[r as usize] = true;
        }
        for i in (0..live.len()).rev() {
            if live[i] {
                let n = self.graph.node(i as NodeId);
                for &a in &n.args[..n.op.arity()] {
                    live[a as usize] = true;
                }
            }
        }
        live
    }

    /// The forward and gradient as text, one node per line (for debugging and docs).
    pub fn dump(&self) -> String {
        let live = self.live(&[self.loss, self.grad]);
        let mut s = String::new();
        for (i, n) in self.graph.nodes().iter().enumerate() {
            if !live[i] {
                continue;
            }
            let args: Vec<String> = n.args[..n.op.arity()].iter().map(|a| format!("%{a}")).collect();
            let op = match n.op {
                Op::Const(b) => format!("{}", f64::from_bits(b)),
                o => format!("{o:?}"),
            };
            let tag = if i as NodeId == self.loss {
                "  <- loss"
            } else if i as NodeId == self.grad {
                "  <- grad"
            } else {
                ""
            };
            s += &format!("%{i} = {op}({}) : {:?} L{}{tag}\n", args.join(", "), n.shape, self.levels[i]);
        }
        s
    }
}

fn levels(g: &Graph) -> Vec<u32> {
    let mut lv = vec![0u32; g.nodes().len()];
    for (i, n) in g.nodes().iter().enumerate() {
        let m = n.args[..n.op.arity()].iter().map(|&a| lv[a as usize]).max().unwrap_or(0);
        lv[i] = if n.op.is_reduction() { m + 1 } else { m };
    }
    lv
}

/// Reverse-mode differentiation of `root` (scalar) with respect to the `Logits` leaf,
/// seeded with the `Seed` scalar. Returns the gradient node (row, or a constant 0).
fn derive(g: &mut Graph, root: NodeId) -> NodeId {
    use Op::*;
    let n = root as usize + 1;
    let mut adj: Vec<Option<NodeId>> = vec![None; n];
    let seed = g.leaf(Seed, Shape::Scalar);
    adj[root as usize] = Some(seed);
    let mut logits_grad: Option<NodeId> = None;
    // Only nodes on a path to the logits need adjoints.
    let needs: Vec<bool> = {
        let mut d = vec![false; n];
        for i in 0..n {
            let nd = g.node(i as NodeId);
            d[i] = match nd.op {
                Logits => true,
                StopGrad | Gt | ReduceMax => false,
                _ => nd.args[..nd.op.arity()].iter().any(|&a| d[a as usize]),
            };
        }
        d
    };
    fn push(g: &mut Graph, adj: &mut [Option<NodeId>], to: NodeId, c: NodeId) {
        // A scalar receiving a row contribution (it was broadcast): sum it over the row.
        let c = if g.node(to).shape == Shape::Scalar && g.node(c).shape == Shape::Row { g.apply(Sum, &[c]) } else { c };
        adj[to as usize] = Some(match adj[to as usize] {
            None => c,
            Some(prev) => g.apply(Add, &[prev, c]),
        });
    }
    for i in (0..n).rev() {
        let Some(gy) = adj[i] else { continue };
        if !needs[i] {
            continue;
        }
        let id = i as NodeId;
        let node = g.node(id);
        let [a, b, c] = node.args;
        match node.op {
            Logits => logits_grad = Some(gy),
            Neg => {
                let d = g.apply(Neg, &[gy]);
                push(g, &mut adj, a, d);
            }
            Exp => {
                let d = g.apply(Mul, &[gy, id]);
                push(g, &mut adj, a, d);
            }
            Log => {
                let d = g.apply(Div, &[gy, a]);
                push(g, &mut adj, a, d);
            }
            Tanh => {
                let one = g.konst(1.0);
                let y2 = g.apply(Mul, &[id, id]);
                let dy = g.apply(Sub, &[one, y2]);
                let d = g.apply(Mul, &[gy, dy]);
                push(g, &mut adj, a, d);
            }
            Sqrt => {
                let two = g.konst(2.0);
                let den = g.apply(Mul, &[two, id]);
                let d = g.apply(Div, &[gy, den]);
                push(g, &mut adj, a, d);
            }
            Add => {
                push(g, &mut adj, a, gy);
                push(g, &mut adj, b, gy);
            }
            Sub => {
                push(g, &mut adj, a, gy);
                let d = g.apply(Neg, &[gy]);
                push(g, &mut adj, b, d);
            }
            Mul => {
                let da = g.apply(Mul, &[gy, b]);
                push(g, &mut adj, a, da);
                let db = g.apply(Mul, &[gy, a]);
                push(g, &mut adj, b, db);
            }
            Div => {
                let da = g.apply(Div, &[gy, b]);
                push(g, &mut adj, a, da);
                // d(a/b)/db = -(a/b)/b
                let q = g.apply(Div, &[id, b]);
                let t = g.apply(Mul, &[gy, q]);
                let db = g.apply(Neg, &[t]);
                push(g, &mut adj, b, db);
            }
            Max | Min => {
                // a wins ties in both.
                let a_wins = if node.op == Max { g.apply(Gt, &[b, a]) } else { g.apply(Gt, &[a, b]) };
                let zero = g.konst(0.0);
                let da = g.apply(Select, &[a_wins, zero, gy]);
                push(g, &mut adj, a, da);
                let db = g.apply(Select, &[a_wins, gy, zero]);
                push(g, &mut adj, b, db);
            }
            Select => {
                let zero = g.konst(0.0);
                let db = g.apply(Select, &[a, gy, zero]);
                push(g, &mut adj, b, db);
                let dc = g.apply(Select, &[a, zero, gy]);
                push(g, &mut adj, c, dc);
            }
            Sum => push(g, &mut adj, a, gy),
            LogSumExp => {
                let sh = g.apply(Sub, &[a, id]);
                let p = g.apply(Exp, &[sh]);
                let d = g.apply(Mul, &[gy, p]);
                push(g, &mut adj, a, d);
            }
            AtTarget => {
                let t = g.leaf(IsTarget, Shape::Row);
                let d = g.apply(Mul, &[gy, t]);
                push(g, &mut adj, a, d);
            }
            // Not differentiated, or not on a path to the logits.
            Teacher | IsTarget | ClassParam(_) | TokenParam(_) | Seed | VocabSize | Const(_) | Gt | StopGrad
            | ReduceMax => {}
        }
    }
    logits_grad.unwrap_or_else(|| g.konst(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_gradient_is_softmax_minus_onehot_in_one_pass() {
        let l = Loss::new("ce", |b| {
            let z = b.logits();
            z.logsumexp() - z.at_target()
        })
        .unwrap();
        assert_eq!(l.passes(), 1);
        assert!(l.uses_target());
        assert!(!l.uses_teacher());
        let d = l.dump();
        assert!(d.contains("LogSumExp"), "{d}");
        // No reduction in the gradient beyond the forward's logsumexp.
        assert_eq!(d.matches("LogSumExp").count(), 1, "{d}");
    }

    #[test]
    fn errors_name_the_loss() {
        assert_eq!(Loss::new("r", |b| b.logits()).unwrap_err(), ExprError::NotScalar("r".into()));
        assert_eq!(Loss::new("t", |b| b.teacher().sum()).unwrap_err(), ExprError::NoLogits("t".into()));
        let e = Loss::new("d", |b| b.logits().sum() * b.token_param("a") + b.token_param("a")).unwrap_err();
        assert!(matches!(e, ExprError::DuplicateParam { .. }));
    }

    #[test]
    fn identities_and_cse_keep_graphs_small() {
        let mut g = Graph::default();
        let z = g.leaf(Op::Logits, Shape::Row);
        let one = g.konst(1.0);
        assert_eq!(g.apply(Op::Mul, &[z, one]), z);
        let e1 = g.apply(Op::Exp, &[z]);
        let e2 = g.apply(Op::Exp, &[z]);
        assert_eq!(e1, e2);
        let a = g.apply(Op::Add, &[z, e1]);
        let b = g.apply(Op::Add, &[e1, z]);
        assert_eq!(a, b);
        let two = g.konst(2.0);
        let three = g.konst(3.0);
        let five = g.apply(Op::Add, &[two, three]);
        assert_eq!(g.constant(five), Some(5.0));
    }

    #[test]
    fn kl_needs_a_second_pass_for_its_gradient() {
        let l = Loss::new("kl", |b| {
            let s = b.logits().log_softmax();
            let t = b.teacher().log_softmax();
            (t.exp() * (t - s)).sum()
        })
        .unwrap();
        assert!(l.uses_teacher());
        assert_eq!(l.passes(), 2, "{}", l.dump());
    }
}
