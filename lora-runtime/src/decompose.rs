//! PiSSA and OLoRA: initialisations that take the adapter out of the weight instead of starting
//! from `B = 0`, as PEFT defines them (`init_lora_weights = "pissa"`, `"pissa_niter_K"`,
//! `"olora"`). Both split a weight `W [out, in]` into `W_res + s B A`, so the layer's output is
//! unchanged at the start while `A` and `B` hold `W`'s principal directions:
//!
//! - **PiSSA** (Meng et al. 2024): `W = U S V^T`; `A = sqrt(S_r / s) V_r^T`,
//!   `B = U_r sqrt(S_r / s)`; `pissa_niter_K` takes `U_r, S_r, V_r` from a randomised SVD with `K`
//!   subspace iterations (torch's `svd_lowrank`: a Gaussian sketch of `r` columns, seeded here).
//! - **OLoRA** (Büyükakyüz 2024): `W = Q R`; `A = R[:r]`, `B = Q[:, :r]`.
//!
//! Singular vectors and QR factors are defined up to signs, so two implementations agree on
//! `B A` and on `W_res`, not on `A` and `B` themselves. Computed in f64.
//!
//! ```
//! use lora_runtime::decompose::{decompose, Decomposition};
//!
//! let (out, inp) = (6, 5);
//! let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
//! let d = decompose(&w, out, inp, 2, 2.0, Decomposition::Pissa { niter: None }, 0)?;
//! // W_res + s B A is W again.
//! for i in 0..out {
//!     for j in 0..inp {
//!         let ba: f32 = (0..2).map(|k| d.b[i * 2 + k] * d.a[k * inp + j]).sum();
//!         assert!((d.residual[i * inp + j] + 2.0 * ba - w[i * inp + j]).abs() < 1e-4);
//!     }
//! }
//! # Ok::<(), lora_runtime::LayerError>(())
//! ```

use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{LayerError, LayerResult};

/// Which decomposition initialises the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decomposition {
    /// PiSSA: the top `r` singular triplets; `niter: Some(K)` is PEFT's `pissa_niter_K`
    /// (randomised SVD with `K` subspace iterations), `None` the exact SVD.
    Pissa {
        /// Subspace iterations of the randomised SVD (`None`: exact).
        niter: Option<usize>,
    },
    /// OLoRA: the first `r` columns of `Q` and rows of `R` in `W = Q R`.
    Olora,
}

/// The factors and the residual weight of a decomposition, row-major f32.
#[derive(Debug, Clone)]
pub struct Decomposed {
    /// `A [r, in]`.
    pub a: Vec<f32>,
    /// `B [out, r]`.
    pub b: Vec<f32>,
    /// `W_res = W - s B A`, `[out, in]`.
    pub residual: Vec<f32>,
}

/// Splits `w [out, in]` (row-major) into `W_res + scaling * B A` of rank `r` as `how` says;
/// `seed` drives the randomised SVD's sketch.
///
/// # Errors
/// [`LayerError::InvalidConfig`] for a rank above `min(out, in)`, a non-positive scaling or a
/// weight of the wrong length; [`LayerError::NonFinite`] for a weight with NaN or infinity;
/// [`LayerError::Refused`] when the SVD does not converge.
pub fn decompose(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scaling: f64,
    how: Decomposition,
    seed: u64,
) -> LayerResult<Decomposed> {
    let invalid = |reason: String| LayerError::InvalidConfig {
        field: "init_lora_weights".into(),
        reason,
    };
    if w.len() != out * inp {
        return Err(invalid(format!(
            "a weight of {} values is not [{out}, {inp}]",
            w.len()
        )));
    }
    if r == 0 || r > out.min(inp) {
        return Err(invalid(format!(
            "rank {r} does not fit a [{out}, {inp}] weight (at most {})",
            out.min(inp)
        )));
    }
    if !(scaling.is_finite() && scaling > 0.0) {
        return Err(invalid(format!("the scaling {scaling} is not positive")));
    }
    if w.iter().any(|v| !v.is_finite()) {
        return Err(LayerError::NonFinite);
    }
    let m = DMatrix::from_row_iterator(out, inp, w.iter().map(|&v| f64::from(v)));
    let (a, b) = match how {
        Decomposition::Olora => olora(&m, r),
        Decomposition::Pissa { niter } => {
            let (u, s, vt) = match niter {
                None => top_svd(&m, r)?,
                Some(k) => randomized_svd(&m, r, k, seed)?,
            };
            // A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s).
            let root: Vec<f64> = s.iter().map(|v| (v / scaling).max(0.0).sqrt()).collect();
            let mut a = vt;
            let mut b = u;
            for (k, &q) in root.iter().enumerate() {
                a.row_mut(k).scale_mut(q);
                b.column_mut(k).scale_mut(q);
            }
            (a, b)
        }
    };
    let residual = &m - (&b * &a) * scaling;
    let rows = |x: &DMatrix<f64>| -> Vec<f32> {
        x.transpose().iter().map(|&v| v as f32).collect() // column-major of x^T = row-major of x
    };
    Ok(Decomposed {
        a: rows(&a),
        b: rows(&b),
        residual: rows(&residual),
    })
}

/// `(B, A)` swapped into `(A, B)`: `A = R[:r]`, `B = Q[:, :r]` of the thin QR of `w`.
fn olora(w: &DMatrix<f64>, r: usize) -> (DMatrix<f64>, DMatrix<f64>) {
    let qr = w.clone().qr();
    let (q, rr) = (qr.q(), qr.r());
    (rr.rows(0, r).into_owned(), q.columns(0, r).into_owned())
}

/// The top `r` singular triplets `(U_r [out, r], S_r, V_r^T [r, in])` of `w`, from the
/// eigen-decomposition of its smaller Gram matrix (`W W^T` or `W^T W`): 10x faster than
/// nalgebra's full SVD on SmolLM2's 576 x 1536 projections (0.16 s vs 1.6 s), and as exact for
/// the leading triplets, all that PiSSA keeps (in f64, an eigenvalue's relative error is about
/// `eps * s_1^2 / s_i^2`). When a kept singular value is zero (a weight of rank below `r`) the
/// other factor cannot be recovered from it: the full SVD is taken instead.
fn top_svd(w: &DMatrix<f64>, r: usize) -> LayerResult<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let wide = w.nrows() <= w.ncols();
    let gram = if wide {
        w * w.transpose()
    } else {
        w.transpose() * w
    };
    let eig = gram.symmetric_eigen();
    let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
    order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
    let pick = &order[..r.min(order.len())];
    let s_r: Vec<f64> = pick
        .iter()
        .map(|&k| eig.eigenvalues[k].max(0.0).sqrt())
        .collect();
    let smallest = s_r.last().copied().unwrap_or(0.0);
    if pick.len() < r || smallest <= s_r[0] * 1e-6 {
        return full_svd(w, r);
    }
    // The eigenvectors are one side's singular vectors; the other side is `W v / s` or `W^T u / s`.
    let side = DMatrix::from_fn(eig.eigenvectors.nrows(), r, |i, k| {
        eig.eigenvectors[(i, pick[k])]
    });
    let mut other = if wide {
        w.transpose() * &side
    } else {
        w * &side
    };
    for (k, s) in s_r.iter().enumerate() {
        other.column_mut(k).unscale_mut(*s);
    }
    Ok(if wide {
        (side, s_r, other.transpose())
    } else {
        (other, s_r, side.transpose())
    })
}

/// [`top_svd`] by nalgebra's full SVD: for weights of rank below `r`.
fn full_svd(w: &DMatrix<f64>, r: usize) -> LayerResult<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let svd = w.clone().svd(true, true);
    let (Some(u), Some(vt)) = (svd.u, svd.v_t) else {
        return Err(LayerError::Refused("the SVD did not converge".into()));
    };
    // nalgebra does not promise an order: sort the singular values, largest first.
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let pick = &order[..r];
    let u_r = DMatrix::from_fn(w.nrows(), r, |i, k| u[(i, pick[k])]);
    let vt_r = DMatrix::from_fn(r, w.ncols(), |k, j| vt[(pick[k], j)]);
    let s_r = pick.iter().map(|&k| svd.singular_values[k]).collect();
    Ok((u_r, s_r, vt_r))
}

/// An orthonormal basis of the columns of `x` (thin QR's `Q`).
fn orthonormal(x: DMatrix<f64>) -> DMatrix<f64> {
    let cols = x.ncols().min(x.nrows());
    x.qr().q().columns(0, cols).into_owned()
}

/// torch's `svd_lowrank(w, q = r, niter)` (Halko et al.): a Gaussian sketch of `r` columns,
/// `niter` subspace iterations, then the exact SVD of the small projected matrix.
fn randomized_svd(
    w: &DMatrix<f64>,
    r: usize,
    niter: usize,
    seed: u64,
) -> LayerResult<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let sketch = DMatrix::from_fn(w.ncols(), r, |_, _| StandardNormal.sample(&mut rng));
    let mut q = orthonormal(w * sketch);
    for _ in 0..niter {
        q = orthonormal(w.transpose() * &q);
        q = orthonormal(w * &q);
    }
    let small = q.transpose() * w; // [r, in]
    let (u, s, vt) = top_svd(&small, r.min(small.nrows()))?;
    Ok((q * u, s, vt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(out: usize, inp: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(5);
        (0..out * inp)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect()
    }

    fn matrix(v: &[f32], rows: usize, cols: usize) -> DMatrix<f64> {
        DMatrix::from_row_iterator(rows, cols, v.iter().map(|&x| f64::from(x)))
    }

    /// `W_res + s B A = W`, and `B A` is the best rank-`r` approximation of `W / s` (PiSSA).
    #[test]
    fn pissa_takes_the_principal_part_out_of_the_weight() {
        let (out, inp, r, s) = (12, 9, 3, 2.0);
        let w = weight(out, inp);
        let d = decompose(&w, out, inp, r, s, Decomposition::Pissa { niter: None }, 0).unwrap();
        let (wm, a, b) = (
            matrix(&w, out, inp),
            matrix(&d.a, r, inp),
            matrix(&d.b, out, r),
        );
        let back = matrix(&d.residual, out, inp) + (&b * &a) * s;
        assert!((back - &wm).amax() < 1e-5);
        // The residual's largest singular value is W's (r+1)-th.
        let sv = wm.clone().svd(false, false).singular_values;
        let mut sorted: Vec<f64> = sv.iter().copied().collect();
        sorted.sort_by(|x, y| y.total_cmp(x));
        let res = matrix(&d.residual, out, inp)
            .svd(false, false)
            .singular_values;
        let top = res.iter().copied().fold(0.0, f64::max);
        assert!((top - sorted[r]).abs() < 1e-4, "{top} vs {}", sorted[r]);
        // A A^T = diag(S_r / s): the rows of A are orthogonal.
        let gram = &a * a.transpose();
        for i in 0..r {
            assert!((gram[(i, i)] - sorted[i] / s).abs() < 1e-4);
            for j in 0..r {
                if i != j {
                    assert!(gram[(i, j)].abs() < 1e-4);
                }
            }
        }
    }

    /// The randomised SVD converges to the exact one on a weight with a spectral gap.
    #[test]
    fn pissa_niter_approaches_the_exact_decomposition() {
        let (out, inp, r) = (40, 30, 4);
        // A rank-4 signal plus small noise.
        let mut w = weight(out, inp);
        for v in &mut w {
            *v *= 0.01;
        }
        let (u, v) = (weight(out, r), weight(r, inp));
        for i in 0..out {
            for j in 0..inp {
                w[i * inp + j] += (0..r).map(|k| u[i * r + k] * v[k * inp + j]).sum::<f32>();
            }
        }
        let exact = decompose(
            &w,
            out,
            inp,
            r,
            1.0,
            Decomposition::Pissa { niter: None },
            0,
        )
        .unwrap();
        let approx = decompose(
            &w,
            out,
            inp,
            r,
            1.0,
            Decomposition::Pissa { niter: Some(4) },
            7,
        )
        .unwrap();
        let diff = matrix(&exact.residual, out, inp) - matrix(&approx.residual, out, inp);
        assert!(diff.amax() < 1e-3, "{}", diff.amax());
    }

    /// OLoRA: `B` has orthonormal columns, `A` is upper triangular, and `W_res + s B A = W`.
    #[test]
    fn olora_splits_off_the_leading_qr_factors() {
        let (out, inp, r, s) = (10, 7, 3, 0.5);
        let w = weight(out, inp);
        let d = decompose(&w, out, inp, r, s, Decomposition::Olora, 0).unwrap();
        let (a, b) = (matrix(&d.a, r, inp), matrix(&d.b, out, r));
        let back = matrix(&d.residual, out, inp) + (&b * &a) * s;
        assert!((back - matrix(&w, out, inp)).amax() < 1e-5);
        assert!((b.transpose() * &b - DMatrix::identity(r, r)).amax() < 1e-6);
        for i in 0..r {
            for j in 0..i {
                assert_eq!(a[(i, j)], 0.0);
            }
        }
    }

    /// The Gram-matrix path gives the full SVD's leading part, on a tall and a wide weight, and
    /// a weight of rank below `r` falls back to the full SVD.
    #[test]
    fn the_fast_top_svd_agrees_with_the_full_one() {
        for (out, inp) in [(30, 12), (12, 30)] {
            let w = matrix(&weight(out, inp), out, inp);
            let (u, s, vt) = top_svd(&w, 4).unwrap();
            let (u2, s2, vt2) = full_svd(&w, 4).unwrap();
            for k in 0..4 {
                assert!((s[k] - s2[k]).abs() < 1e-9 * s2[0]);
            }
            let part = |u: &DMatrix<f64>, s: &[f64], vt: &DMatrix<f64>| {
                u * DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(s)) * vt
            };
            assert!((part(&u, &s, &vt) - part(&u2, &s2, &vt2)).amax() < 1e-9);
        }
        // Rank 2, asked for 3.
        let low = matrix(&weight(10, 2), 10, 2) * matrix(&weight(2, 8), 2, 8);
        let (u, s, vt) = top_svd(&low, 3).unwrap();
        let back = &u * DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(&s)) * &vt;
        assert!((back - &low).amax() < 1e-9);
    }

    #[test]
    fn bad_input_is_refused() {
        let w = weight(4, 3);
        let pissa = Decomposition::Pissa { niter: None };
        assert!(decompose(&w, 4, 3, 4, 1.0, pissa, 0).is_err());
        assert!(decompose(&w, 4, 3, 0, 1.0, pissa, 0).is_err());
        assert!(decompose(&w, 3, 3, 1, 1.0, pissa, 0).is_err());
        let mut nan = w.clone();
        nan[2] = f32::NAN;
        assert!(matches!(
            decompose(&nan, 4, 3, 1, 1.0, Decomposition::Olora, 0),
            Err(LayerError::NonFinite)
        ));
    }
}
