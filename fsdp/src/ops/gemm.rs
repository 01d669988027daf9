//! `C = alpha * op(A) op(B) + beta * C` on row-major, contiguous f32 matrices, through
//! matrixmultiply's threaded kernel: the one GEMM every op here uses (the GPU side will
//! use cuBLAS with the same transposes).

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// `c[m, n] = alpha * op(a) @ op(b) + beta * c`, all row-major and contiguous.
///
/// `op(a)` is `[m, k]`: `a` is stored `[m, k]` for [`Trans::N`], `[k, m]` for [`Trans::T`].
/// `op(b)` is `[k, n]`: `b` is stored `[k, n]` for [`Trans::N`], `[n, k]` for [`Trans::T`].
/// With `beta == 0`, `c`'s old contents are ignored (NaN included).
///
/// # Panics
/// If a slice is shorter than its shape (a bug in the caller, never user input).
#[allow(clippy::too_many_arguments)]
pub fn gemm(ta: Trans, tb: Trans, m: usize, n: usize, k: usize, alpha: f32, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand shorter than its shape");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        scale(&mut c[..m * n], beta);
        return;
    }
    let (rsa, csa) = match ta {
        Trans::N => (k as isize, 1),
        Trans::T => (1, m as isize),
    };
    let (rsb, csb) = match tb {
        Trans::N => (n as isize, 1),
        Trans::T => (1, k as isize),
    };
    if beta == 0.0 {
        // matrixmultiply documents that beta = 0 does not read c, but be explicit: NaN in a
        // poisoned output buffer must not leak.
        c[..m * n].fill(0.0);
    }
    // SAFETY: the strides above address exactly the m*k, k*n and m*n elements whose
    // presence the assert checked; c does not alias a or b (distinct borrows).
    unsafe {
        matrixmultiply::sgemm(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1);
    }
}

fn scale(c: &mut [f32], beta: f32) {
    if beta == 0.0 {
        c.fill(0.0);
    } else {
        c.iter_mut().for_each(|x| *x *= beta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn all_transposes_match_a_triple_loop() {
        let mut r = Rng::new(3);
        let (m, n, k) = (5, 7, 3);
        let a = r.normals(m * k, 1.0);
        let b = r.normals(k * n, 1.0);
        let c0 = r.normals(m * n, 1.0);
        let at = |i: usize, p: usize, t: Trans| if t == Trans::N { a[i * k + p] } else { a[p * m + i] };
        let bt = |p: usize, j: usize, t: Trans| if t == Trans::N { b[p * n + j] } else { b[j * k + p] };
        for ta in [Trans::N, Trans::T] {
            for tb in [Trans::N, Trans::T] {
                let mut c = c0.clone();
                gemm(ta, tb, m, n, k, 0.5, &a, &b, 2.0, &mut c);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = 2.0 * c0[i * n + j] as f64 + 0.5 * (0..k).map(|p| at(i, p, ta) as f64 * bt(p, j, tb) as f64).sum::<f64>();
                        assert!((c[i * n + j] as f64 - want).abs() < 1e-5, "{ta:?}{tb:?} [{i},{j}]");
                    }
                }
            }
        }
        let mut c = vec![f32::NAN; m * n];
        gemm(Trans::N, Trans::N, m, n, 0, 1.0, &[], &[], 0.0, &mut c);
        assert!(c.iter().all(|&x| x == 0.0));
    }
}
