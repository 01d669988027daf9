//! CPU interpreter of a [`Loss`]: evaluates the per-token loss and its derived gradient
//! for one row of logits, in f64 (the reference precision; inputs are f32 or rounded
//! 16-bit values).

use crate::expr::{Loss, NodeId, Op, Shape};

/// Applies a scalar op (used for constant folding and by the interpreter).
pub fn apply_scalar(op: Op, a: &[f64]) -> f64 {
    use Op::*;
    match op {
        Neg => -a[0],
        Exp => a[0].exp(),
        Log => a[0].ln(),
        Tanh => a[0].tanh(),
        Sqrt => a[0].sqrt(),
        Add => a[0] + a[1],
        Sub => a[0] - a[1],
        Mul => a[0] * a[1],
        Div => a[0] / a[1],
        Max => {
            if a[1] > a[0] {
                a[1]
            } else {
                a[0]
            }
        }
        Min => {
            if a[1] < a[0] {
                a[1]
            } else {
                a[0]
            }
        }
        Gt => f64::from(u8::from(a[0] > a[1])),
        Select => {
            if a[0] != 0.0 {
                a[1]
            } else {
                a[2]
            }
        }
        StopGrad => a[0],
        other => unreachable!("{other:?} is not an elementwise op"),
    }
}

/// One token's inputs.
pub struct RowInputs<'a> {
    /// The student's logits (vocab entries).
    pub logits: &'a [f64],
    /// The teacher's logits, when the loss uses them.
    pub teacher: Option<&'a [f64]>,
    /// The target class (None: the loss must not use it).
    pub target: Option<usize>,
    /// Per-token parameters, in the loss's order.
    pub token_params: &'a [f64],
    /// Per-class parameters, in the loss's order.
    pub class_params: &'a [&'a [f32]],
    /// The upstream gradient of this token's loss.
    pub seed: f64,
}

enum Val {
    Row(Vec<f64>),
    Scalar(f64),
    Unset,
}

/// Reusable interpreter state for one thread.
pub struct Interp<'l> {
    loss: &'l Loss,
    live: Vec<bool>,
    live_fwd: Vec<bool>,
    vals: Vec<Val>,
}

impl<'l> Interp<'l> {
    /// An interpreter for `loss`.
    pub fn new(loss: &'l Loss) -> Self {
        let live = loss.live(&[loss.loss_node(), loss.grad_node()]);
        let live_fwd = loss.live(&[loss.loss_node()]);
        let vals = (0..live.len()).map(|_| Val::Unset).collect();
        Interp { loss, live, live_fwd, vals }
    }

    /// Evaluates the loss, and when `grad` is given writes d(loss)/d(logits) * seed into it.
    pub fn run(&mut self, inp: &RowInputs<'_>, grad: Option<&mut [f64]>) -> f64 {
        let g = self.loss.graph();
        let v = inp.logits.len();
        let want_grad = grad.is_some();
        for (i, node) in g.nodes().iter().enumerate() {
            let live = if want_grad { self.live[i] } else { self.live_fwd[i] };
            if !live {
                continue;
            }
            // Reuse this node's row buffer from the previous row (no allocation per row).
            let mut buf = match std::mem::replace(&mut self.vals[i], Val::Unset) {
                Val::Row(b) => b,
                _ => Vec::new(),
            };
            if node.shape == Shape::Row {
                buf.resize(v, 0.0);
            }
            let arity = node.op.arity();
            let args: [NodeId; 3] = node.args;
            let val = match node.op {
                Op::Logits => {
                    buf.copy_from_slice(inp.logits);
                    Val::Row(buf)
                }
                Op::Teacher => {
                    buf.copy_from_slice(inp.teacher.expect("teacher logits bound by the driver"));
                    Val::Row(buf)
                }
                Op::IsTarget => {
                    let t = inp.target.expect("target bound by the driver");
                    buf.fill(0.0);
                    buf[t] = 1.0;
                    Val::Row(buf)
                }
                Op::ClassParam(k) => {
                    for (o, &x) in buf.iter_mut().zip(inp.class_params[k as usize]) {
                        *o = f64::from(x);
                    }
                    Val::Row(buf)
                }
                Op::TokenParam(k) => Val::Scalar(inp.token_params[k as usize]),
                Op::Seed => Val::Scalar(inp.seed),
                Op::VocabSize => Val::Scalar(v as f64),
                Op::Const(b) => Val::Scalar(f64::from_bits(b)),
                Op::Sum => Val::Scalar(self.row(args[0]).iter().sum()),
                Op::ReduceMax => Val::Scalar(self.row(args[0]).iter().copied().fold(f64::NEG_INFINITY, f64::max)),
                Op::LogSumExp => {
                    let r = self.row(args[0]);
                    let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    if m == f64::NEG_INFINITY || !m.is_finite() {
                        Val::Scalar(m)
                    } else {
                        Val::Scalar(m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln())
                    }
                }
                Op::AtTarget => {
                    let t = inp.target.expect("target bound by the driver");
                    Val::Scalar(match &self.vals[args[0] as usize] {
                        Val::Row(r) => r[t],
                        Val::Scalar(s) => *s,
                        Val::Unset => unreachable!("operand evaluated first"),
                    })
                }
                op => {
                    if node.shape == Shape::Scalar {
                        let a: Vec<f64> = args[..arity].iter().map(|&x| self.scalar(x)).collect();
                        Val::Scalar(apply_scalar(op, &a))
                    } else {
                        let mut out = buf;
                        let mut a = [0.0; 3];
                        for (j, o) in out.iter_mut().enumerate() {
                            for (k, &x) in args[..arity].iter().enumerate() {
                                a[k] = match &self.vals[x as usize] {
                                    Val::Row(r) => r[j],
                                    Val::Scalar(s) => *s,
                                    Val::Unset => unreachable!("operand evaluated first"),
                                };
                            }
                            *o = apply_scalar(op, &a[..arity]);
                        }
                        Val::Row(out)
                    }
                }
            };
            self.vals[i] = val;
        }
        if let Some(grad) = grad {
            match &self.vals[self.loss.grad_node() as usize] {
                Val::Row(r) => grad.copy_from_slice(r),
                Val::Scalar(s) => grad.fill(*s),
                Val::Unset => unreachable!("gradient is live"),
            }
        }
        self.scalar(self.loss.loss_node())
    }

    fn row(&self, id: NodeId) -> &[f64] {
        match &self.vals[id as usize] {
            Val::Row(r) => r,
            _ => unreachable!("node {id} is a row"),
        }
    }
    fn scalar(&self, id: NodeId) -> f64 {
        match &self.vals[id as usize] {
            Val::Scalar(s) => *s,
            _ => unreachable!("node {id} is a scalar"),
        }
    }
}
