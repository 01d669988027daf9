//! The CPU implementation (chunked, multi-threaded, f32 GEMMs) and the unchunked f64
//! reference the tests compare everything against.
//!
//! Precision mirrors the GPU: for 16-bit inputs the logits are rounded to the input type
//! after the GEMM (as a bf16 GEMM writes them), upcast inside the loss, and the logits'
//! gradient is rounded to the input type before the dX / dW GEMMs; dW and dbias are
//! accumulated in f32 over all chunks and rounded once.

use rayon::prelude::*;

use crate::eval::{Interp, RowInputs};
use crate::{normalizer, validate, Chunk, Elem, Error, Head, Loss, Options, Output, Problem, Reduction};

/// Tokens per chunk for `chunk` (budget: f32 logits for the student, and the teacher
/// when the loss reads it, plus a per-thread row workspace).
pub fn chunk_tokens<T: Elem>(p: &Problem<'_, T>, loss: &Loss, chunk: Chunk) -> usize {
    match chunk {
        Chunk::Tokens(n) => n.clamp(1, p.tokens),
        Chunk::Budget(b) => {
            let per_token = 4 * p.vocab as u64 * (1 + u64::from(loss.uses_teacher()));
            ((b / per_token.max(1)) as usize).clamp(1, p.tokens)
        }
    }
}

/// `c[m, n] = a[m, k] @ b^T` (b is `[n, k]`), or with `beta = 1`, `c += ...`: the one
/// GEMM shape family we need, on matrixmultiply's threaded f32 kernel.
#[allow(clippy::too_many_arguments)]
fn gemm(m: usize, k: usize, n: usize, a: &[f32], rsa: isize, csa: isize, b: &[f32], rsb: isize, csb: isize, beta: f32, c: &mut [f32], rsc: isize) {
    // SAFETY: the callers pass strides that stay inside a, b and c for the given m, k, n
    // (checked by debug asserts on the extents).
    debug_assert!(c.len() >= (m - 1) * rsc as usize + n);
    unsafe {
        matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), rsc, 1);
    }
}

fn upcast<T: Elem>(xs: &[T]) -> Vec<f32> {
    xs.par_iter().map(|x| x.to_f32()).collect()
}

/// Logits of one chunk `[rows, vocab]` in f32, rounded to T's precision.
fn logits<T: Elem>(h: &Head<'_, T>, w32: &[f32], b32: Option<&[f32]>, t0: usize, rows: usize, vocab: usize, out: &mut [f32]) {
    let hd = h.hidden;
    let x32 = upcast(&h.x[t0 * hd..(t0 + rows) * hd]);
    gemm(rows, hd, vocab, &x32, hd as isize, 1, w32, 1, hd as isize, 0.0, out, vocab as isize);
    out.par_chunks_mut(vocab).for_each(|row| {
        for (j, z) in row.iter_mut().enumerate() {
            // The GEMM writes logits in T; the loss adds the bias in f32 (as on the GPU).
            *z = T::round(*z) + b32.map_or(0.0, |b| b[j]);
        }
    });
}

/// Runs the loss over `p` in chunks. See the crate docs for the semantics.
pub fn run<T: Elem>(p: &Problem<'_, T>, loss: &Loss, o: &Options<'_>) -> Result<Output<T>, Error> {
    let counted = validate(p, loss, o)?;
    let (tn, v, hd) = (p.tokens, p.vocab, p.student.hidden);
    let norm = normalizer(o.reduction, counted);
    let tc = chunk_tokens(p, loss, o.chunk);
    let want_grad = o.want_dx || o.want_dw;
    let token_params = crate::bind_params(loss, "token", loss.token_params(), &p.token_params, tn)?;
    let class_params = crate::bind_params(loss, "class", loss.class_params(), &p.class_params, v)?;

    let w32 = upcast(p.student.w);
    let b32 = p.student.bias.map(upcast);
    let teacher = p.teacher.as_ref().filter(|_| loss.uses_teacher());
    let tw32 = teacher.map(|t| upcast(t.w));
    let tb32 = teacher.and_then(|t| t.bias.map(upcast));

    let mut per_token = vec![0f32; tn];
    let mut dx: Option<Vec<T>> = o.want_dx.then(|| vec![T::default(); tn * hd]);
    let mut dw_acc: Option<Vec<f32>> = o.want_dw.then(|| vec![0f32; v * hd]);
    let mut db_acc: Option<Vec<f32>> = (o.want_dw && p.student.bias.is_some()).then(|| vec![0f32; v]);
    let mut z = vec![0f32; tc * v];
    let mut zt = teacher.map(|_| vec![0f32; tc * v]);
    let threads = rayon::current_num_threads() as u64;
    let nodes = loss.graph().nodes().len() as u64;
    let temp_bytes = (z.len() as u64 * 4) * (1 + u64::from(zt.is_some()))
        + dw_acc.as_ref().map_or(0, |d| d.len() as u64 * 4)
        + threads * nodes * v as u64 * 8;

    let mut t0 = 0;
    while t0 < tn {
        let rows = tc.min(tn - t0);
        let zc = &mut z[..rows * v];
        logits(&p.student, &w32, b32.as_deref(), t0, rows, v, zc);
        if let (Some(th), Some(ztb)) = (teacher, zt.as_mut()) {
            logits(th, tw32.as_ref().expect("teacher weights"), tb32.as_deref(), t0, rows, v, &mut ztb[..rows * v]);
        }
        let ztc = zt.as_ref().map(|b| &b[..rows * v]);
        // The loss, row by row; the gradient overwrites the logits (rounded to T).
        let results: Vec<Result<f32, Error>> = zc
            .par_chunks_mut(v)
            .enumerate()
            .map_init(
                || (Interp::new(loss), vec![0f64; v], vec![0f64; v], vec![0f64; v]),
                |(interp, zrow, trow, grow), (r, row)| {
                    let t = t0 + r;
                    let target = match p.targets {
                        Some(tg) if tg[t] == p.ignore_index => {
                            row.fill(0.0);
                            return Ok(0.0);
                        }
                        Some(tg) => Some(tg[t] as usize),
                        None => None,
                    };
                    for (a, &b) in zrow.iter_mut().zip(row.iter()) {
                        *a = f64::from(b);
                    }
                    if let Some(tz) = ztc {
                        for (a, &b) in trow.iter_mut().zip(&tz[r * v..(r + 1) * v]) {
                            *a = f64::from(b);
                        }
                    }
                    let tp: Vec<f64> = token_params.iter().map(|p| f64::from(p[t])).collect();
                    let seed = match o.reduction {
                        Reduction::None => o.grad_tokens.map_or(0.0, |g| f64::from(g[t])),
                        _ => 1.0 / norm,
                    };
                    let inp = RowInputs {
                        logits: zrow,
                        teacher: ztc.map(|_| &trow[..]),
                        target,
                        token_params: &tp,
                        class_params: &class_params,
                        seed,
                    };
                    let l = interp.run(&inp, want_grad.then_some(&mut grow[..]));
                    if !l.is_finite() {
                        return Err(Error::NonFiniteResult { token: t, what: format!("loss = {l}") });
                    }
                    if want_grad {
                        for (j, (dst, &g)) in row.iter_mut().zip(grow.iter()).enumerate() {
                            if !g.is_finite() {
                                return Err(Error::NonFiniteResult { token: t, what: format!("d/dlogits[{j}] = {g}") });
                            }
                            *dst = T::round(g as f32);
                        }
                    }
                    Ok(l as f32)
                },
            )
            .collect();
        for (r, res) in results.into_iter().enumerate() {
            per_token[t0 + r] = res?;
        }
        if want_grad {
            let x32 = upcast(&p.student.x[t0 * hd..(t0 + rows) * hd]);
            if let Some(dx) = dx.as_mut() {
                let mut d = vec![0f32; rows * hd];
                gemm(rows, v, hd, zc, v as isize, 1, &w32, hd as isize, 1, 0.0, &mut d, hd as isize);
                for (dst, &s) in dx[t0 * hd..(t0 + rows) * hd].iter_mut().zip(&d) {
                    *dst = T::from_f32(s);
                }
            }
            if let Some(acc) = dw_acc.as_mut() {
                gemm(v, rows, hd, zc, 1, v as isize, &x32, hd as isize, 1, 1.0, acc, hd as isize);
            }
            if let Some(acc) = db_acc.as_mut() {
                for row in zc.chunks(v) {
                    for (a, &g) in acc.iter_mut().zip(row) {
                        *a += g;
                    }
                }
            }
        }
        t0 += rows;
    }
    let sum: f64 = per_token.iter().map(|&x| f64::from(x)).sum();
    let loss_value = if o.reduction == Reduction::None { sum } else { sum / norm };
    Ok(Output {
        loss: loss_value,
        per_token,
        dx,
        dw: dw_acc.map(|a| a.into_iter().map(T::from_f32).collect()),
        db: db_acc.map(|a| a.into_iter().map(T::from_f32).collect()),
        chunk_tokens: tc,
        temp_bytes,
    })
}

/// The unchunked reference, in f64 throughout (inputs widened from T): the full
/// `tokens x vocab` logits, the loss and its gradient per row, and plain triple-loop
/// GEMMs. For tests; slow and memory-hungry by design.
pub struct Reference {
    /// The reduced loss.
    pub loss: f64,
    /// Per-token losses.
    pub per_token: Vec<f64>,
    /// d/dx.
    pub dx: Vec<f64>,
    /// d/dw.
    pub dw: Vec<f64>,
    /// d/dbias (empty without bias).
    pub db: Vec<f64>,
}

/// Computes [`Reference`] for `p` (`o.chunk`, `want_dx`, `want_dw` are ignored).
pub fn reference<T: Elem>(p: &Problem<'_, T>, loss: &Loss, o: &Options<'_>) -> Result<Reference, Error> {
    let counted = validate(p, loss, o)?;
    let (tn, v, hd) = (p.tokens, p.vocab, p.student.hidden);
    let norm = normalizer(o.reduction, counted);
    let token_params = crate::bind_params(loss, "token", loss.token_params(), &p.token_params, tn)?;
    let class_params = crate::bind_params(loss, "class", loss.class_params(), &p.class_params, v)?;
    let f = |x: &[T]| x.iter().map(|e| f64::from(e.to_f32())).collect::<Vec<f64>>();
    let head_logits = |h: &Head<'_, T>| -> Vec<f64> {
        let (x, w) = (f(h.x), f(h.w));
        let b = h.bias.map(f);
        let hd = h.hidden;
        (0..tn * v)
            .into_par_iter()
            .map(|i| {
                let (t, j) = (i / v, i % v);
                let mut s = b.as_ref().map_or(0.0, |b| b[j]);
                for k in 0..hd {
                    s += x[t * hd + k] * w[j * hd + k];
                }
                s
            })
            .collect()
    };
    let z = head_logits(&p.student);
    let zt = p.teacher.as_ref().filter(|_| loss.uses_teacher()).map(head_logits);
    let mut g = vec![0f64; tn * v];
    let mut per_token = vec![0f64; tn];
    per_token.par_iter_mut().zip(g.par_chunks_mut(v)).enumerate().for_each(|(t, (l, grow))| {
        let target = match p.targets {
            Some(tg) if tg[t] == p.ignore_index => return,
            Some(tg) => Some(tg[t] as usize),
            None => None,
        };
        let tp: Vec<f64> = token_params.iter().map(|p| f64::from(p[t])).collect();
        let seed = match o.reduction {
            Reduction::None => o.grad_tokens.map_or(0.0, |g| f64::from(g[t])),
            _ => 1.0 / norm,
        };
        let inp = RowInputs {
            logits: &z[t * v..(t + 1) * v],
            teacher: zt.as_ref().map(|zt| &zt[t * v..(t + 1) * v]),
            target,
            token_params: &tp,
            class_params: &class_params,
            seed,
        };
        *l = Interp::new(loss).run(&inp, Some(grow));
    });
    let (x, w) = (f(p.student.x), f(p.student.w));
    let dx: Vec<f64> = (0..tn * hd)
        .into_par_iter()
        .map(|i| {
            let (t, k) = (i / hd, i % hd);
            (0..v).map(|j| g[t * v + j] * w[j * hd + k]).sum()
        })
        .collect();
    let dw: Vec<f64> = (0..v * hd)
        .into_par_iter()
        .map(|i| {
            let (j, k) = (i / hd, i % hd);
            (0..tn).map(|t| g[t * v + j] * x[t * hd + k]).sum()
        })
        .collect();
    let db: Vec<f64> = if p.student.bias.is_some() { (0..v).map(|j| (0..tn).map(|t| g[t * v + j]).sum()).collect() } else { vec![] };
    let sum: f64 = per_token.iter().sum();
    Ok(Reference { loss: if o.reduction == Reduction::None { sum } else { sum / norm }, per_token, dx, dw, db })
}
