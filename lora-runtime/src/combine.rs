//! Combining adapters into a new one: [`Combination`] for
//! [`add_weighted_adapter`](crate::LoraModelExt::add_weighted_adapter).
//!
//! Every method works on each adapter's *scaled* delta `s_i B_i A_i` (so rsLoRA and plain
//! adapters mix correctly), and the result has scaling 1 (`alpha = r`, no rsLoRA):
//!
//! - [`Combination::Cat`]: `A = [A_1; A_2; ..]`, `B = [w_1 s_1 B_1, w_2 s_2 B_2, ..]`. Rank is the
//!   sum of the ranks; `B A = sum_i w_i s_i B_i A_i` exactly.
//! - [`Combination::Svd`]: the weighted sum of the full deltas truncated to `rank` by an SVD
//!   (computed from QR factors of the stacked factors, never forming the `[out, in]` matrix in
//!   the decomposition): exact when `rank` is at least the sum of the ranks, otherwise the best
//!   rank-`rank` approximation.
//! - [`Combination::Linear`]: for adapters of equal rank, `A = sum_i sqrt(|w_i| s_i) A_i`,
//!   `B = sum_i sign(w_i) sqrt(|w_i| s_i) B_i` (PEFT's "linear"). **Approximate**: `B A` then
//!   contains cross terms `B_i A_j`; exact only for a single adapter.

use candle_core::{DType, Device, Tensor, Var};
use nalgebra::DMatrix;

use crate::adapter::Adapter;
use crate::error::{Error, LayerError, LayerResult, Result};
use crate::model::{adapter_names, prepare_then_commit, LoraModel};
use crate::registry::check_known;

/// How [`add_weighted_adapter`](crate::LoraModelExt::add_weighted_adapter) combines adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    /// Weighted sum of the factors; equal ranks only; approximate (see the module docs).
    Linear,
    /// Concatenated ranks: exact, rank = sum of ranks.
    Cat,
    /// Truncated SVD of the weighted sum of deltas to the given rank: exact when it suffices.
    Svd {
        /// The rank of the result.
        rank: usize,
    },
}

fn to_matrix(t: &Tensor) -> LayerResult<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(DMatrix::from_fn(rows, cols, |i, j| {
        f64::from(v[i * cols + j])
    }))
}

fn from_matrix(m: &DMatrix<f64>, device: &Device) -> LayerResult<Tensor> {
    let (rows, cols) = m.shape();
    let v: Vec<f32> = (0..rows)
        .flat_map(|i| (0..cols).map(move |j| m[(i, j)] as f32))
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// Combines `parts` (`(adapter, weight)`) of one layer into the factors `(A, B)` of an adapter
/// with scaling 1, in f32 on the adapters' device.
fn combine(parts: &[(&Adapter, f64)], how: Combination) -> LayerResult<(Tensor, Tensor)> {
    let Some((first, _)) = parts.first() else {
        return Err(LayerError::Refused("no adapters to combine".into()));
    };
    if parts.iter().any(|(ad, _)| ad.is_dora()) {
        // A DoRA adapter's update is not `s B A` alone (its magnitude rescales the whole
        // weight): no weighted sum of deltas represents it.
        return Err(LayerError::Refused(
            "DoRA adapters cannot be combined: their updates are not low-rank deltas".into(),
        ));
    }
    if parts.iter().any(|(ad, _)| ad.is_adalora()) {
        // PEFT refuses `add_weighted_adapter` for AdaLoRA too.
        return Err(LayerError::Refused(
            "AdaLoRA adapters cannot be combined (as in PEFT): merge them one at a time".into(),
        ));
    }
    let device = first.a().device().clone();
    let f32_of = |t: &Tensor| -> LayerResult<Tensor> { Ok(t.to_dtype(DType::F32)?) };
    match how {
        Combination::Cat => {
            let mut a = Vec::with_capacity(parts.len());
            let mut b = Vec::with_capacity(parts.len());
            for (ad, w) in parts {
                a.push(f32_of(ad.a().as_tensor())?);
                b.push(f32_of(ad.b().as_tensor())?.affine(w * ad.scaling(), 0.0)?);
            }
            Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?))
        }
        Combination::Linear => {
            let r = first.rank();
            if let Some((other, _)) = parts.iter().find(|(ad, _)| ad.rank() != r) {
                return Err(LayerError::Refused(format!(
                    "`Combination::Linear` needs adapters of equal rank, got {r} and {}: use `Cat` or `Svd`",
                    other.rank()
                )));
            }
            let mut a = Tensor::zeros(first.a().dims(), DType::F32, &device)?;
            let mut b = Tensor::zeros(first.b().dims(), DType::F32, &device)?;
            for (ad, w) in parts {
                let k = (w.abs() * ad.scaling()).sqrt();
                a = (a + f32_of(ad.a().as_tensor())?.affine(k, 0.0)?)?;
                b = (b + f32_of(ad.b().as_tensor())?.affine(k * w.signum(), 0.0)?)?;
            }
            Ok((a, b))
        }
        Combination::Svd { rank } => {
            if rank == 0 {
                return Err(LayerError::Refused(
                    "`Combination::Svd` needs a rank of at least 1".into(),
                ));
            }
            let (a_cat, b_cat) = combine(parts, Combination::Cat)?;
            // Convolution factors as matrices, `[r, in * k...]` and `[out, r]`: their product is
            // the delta either way (the caller reshapes the result to the layer's layout).
            let (a, b) = (
                to_matrix(&a_cat.flatten_from(1)?)?,
                to_matrix(&b_cat.flatten_from(1)?)?,
            );
            // delta = B A with B = Qb Rb and A^T = Qa Ra: delta = Qb (Rb Ra^T) Qa^T, so the SVD of
            // the small middle matrix gives the SVD of delta.
            let qr_b = b.clone().qr();
            let qr_a = a.transpose().qr();
            let (qb, rb) = (qr_b.q(), qr_b.r());
            let (qa, ra) = (qr_a.q(), qr_a.r());
            let middle = &rb * ra.transpose();
            let svd = middle.svd(true, true);
            let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
                return Err(LayerError::Refused("SVD did not converge".into()));
            };
            let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
            order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
            let (out, inp) = (b.nrows(), a.ncols());
            let mut new_b = DMatrix::<f64>::zeros(out, rank);
            let mut new_a = DMatrix::<f64>::zeros(rank, inp);
            let left = &qb * &u; // [out, k]
            let right = v_t * qa.transpose(); // [k, in]
            for (slot, &i) in order.iter().take(rank).enumerate() {
                let root = svd.singular_values[i].sqrt();
                new_b.set_column(slot, &(left.column(i) * root));
                new_a.set_row(slot, &(right.row(i) * root));
            }
            Ok((from_matrix(&new_a, &device)?, from_matrix(&new_b, &device)?))
        }
    }
}

/// Adds the adapter `new_name` to every layer that has some of `parts`: their weighted
/// combination (see [`Combination`]). All or nothing.
pub(crate) fn add_weighted_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    parts: &[(&str, f64)],
    how: Combination,
    new_name: &str,
) -> Result<()> {
    if parts.is_empty() {
        return Err(Error::InvalidConfig {
            file: None,
            field: "adapters".into(),
            reason: "no adapters to combine".into(),
        });
    }
    for (name, w) in parts {
        check_known(model, name)?;
        if !w.is_finite() {
            return Err(Error::InvalidConfig {
                file: None,
                field: "weight".into(),
                reason: format!("the weight of `{name}` must be finite, got {w}"),
            });
        }
    }
    if adapter_names(model).iter().any(|k| k == new_name) {
        return Err(Error::InvalidConfig {
            file: None,
            field: "new_name".into(),
            reason: format!("an adapter called `{new_name}` exists already"),
        });
    }
    prepare_then_commit(
        model,
        |_, layer, _| {
            let present: Vec<(&Adapter, f64)> = parts
                .iter()
                .filter_map(|(n, w)| layer.adapter_named(n).map(|a| (a, *w)))
                .collect();
            if present.is_empty() {
                return Ok(None);
            }
            let (a, b) = combine(&present, how)?;
            let dtype = layer.adapter_dtype();
            let rank = a.dim(0)?;
            // `Svd` gives matrices; a convolution's factors are kernels (`FactorLayout`).
            let layout = layer.factor_layout(rank);
            let (a, b) = (a.reshape(layout.a())?, b.reshape(layout.b())?);
            let dropout = present
                .iter()
                .map(|(ad, _)| ad.dropout())
                .fold(0.0, f32::max);
            let a = Var::from_tensor(&a.to_dtype(dtype)?)?;
            let b = Var::from_tensor(&b.to_dtype(dtype)?)?;
            // alpha = r and no rsLoRA: scaling 1, the weights and scalings are in B already.
            Adapter::new(a, b, rank as f64, false, dropout).map(Some)
        },
        |layer, adapter| {
            layer.set_routing(None);
            layer.adapter_set_mut().insert(new_name, adapter);
        },
    )?;
    Ok(())
}
