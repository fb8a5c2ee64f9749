//! Causal scaled dot-product attention with grouped-query heads, as one op with its own
//! backward when training on the CPU in f32.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, f32_slice, fused_cpu, merge_heads, softmax_in_place, softmax_last_dim};
use crate::kernels::{gemm_serial_into, MatRef};

/// Query rows a block: block `[r0, r1)` looks at keys `[0, r1)` only, so the products skip
/// most of the masked half of the scores (5/8 of the full products at 128 positions).
const ROWS: usize = 32;

/// Causal attention `softmax(q k^T / sqrt(d) + causal mask) v` of queries `q [b, h, t, d]`
/// over keys and values `k`, `v` `[b, kv, t, d]` of the same positions (no cache), query head
/// `g * h / kv + j` using key/value head `g` (grouped-query attention, as transformers'
/// `repeat_kv` pairs them); returns the heads merged, `[b, t, h * d]`, the input of the output
/// projection.
///
/// On the CPU in f32 one op: the scores a block of query rows at a time, only up to the
/// diagonal, never the whole `[b, h, t, t]` at once, and, when an input tracks a gradient, a
/// hand-written backward that recomputes them from the saved log-sum-exp of each row instead of
/// keeping the probabilities (as FlashAttention does). Otherwise (other dtypes, CUDA) candle's
/// ops: the scaled scores, the mask, [`softmax_last_dim`], the product with `v` and
/// [`merge_heads`].
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let q = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 4, 6, 8), &dev)?)?; // 4 query heads
/// let kv = Tensor::randn(0f32, 1., (1, 2, 6, 8), &dev)?; // 2 key/value heads
/// let y = lora_runtime::ops::causal_attention(q.as_tensor(), &kv, &kv)?;
/// assert_eq!(y.dims(), &[1, 6, 32]);
/// // The first position sees only itself: its output is its value vector.
/// let first = y.narrow(1, 0, 1)?.narrow(2, 0, 8)?.flatten_all()?;
/// let v0 = kv.narrow(1, 0, 1)?.narrow(2, 0, 1)?.flatten_all()?;
/// assert!((first - v0)?.abs()?.max(0)?.to_scalar::<f32>()? < 1e-6);
/// let grads = y.sqr()?.sum_all()?.backward()?;
/// assert!(grads.get(q.as_tensor()).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape errors: `k` and `v` of different shapes, another batch, length or head size than `q`,
/// or a number of query heads that is not a multiple of the key/value heads.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, kt, kd) = k.dims4()?;
    if k.dims() != v.dims() || (kb, kt, kd) != (b, t, d) || kv == 0 || !h.is_multiple_of(kv) {
        candle_core::bail!(
            "causal attention: queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let dims = Dims { b, h, kv, t, d };
    if b * h * t * d == 0 {
        // Nothing to attend to or over (candle's softmax refuses an empty row).
        return Tensor::zeros((b, t, h * d), q.dtype(), q.device());
    }
    if [q, k, v].iter().all(|x| fused_cpu(x)) {
        let op = CausalAttention {
            dims,
            lse: Mutex::new(None),
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    composed(q, k, v, dims)
}

/// The shapes of one call: batch, query heads, key/value heads, positions, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }

    /// The key/value head of query head `hi` of batch element `bi`, as an index of `[b, kv]`.
    fn kv_of(&self, bi: usize, hi: usize) -> usize {
        bi * self.kv + hi / (self.h / self.kv)
    }

    /// Head `hi` of batch element `bi` in the merged `[b, t, h * d]` layout, `[t, d]`.
    fn merged<'a>(&self, values: &'a [f32], bi: usize, hi: usize) -> MatRef<'a> {
        let width = self.h * self.d;
        MatRef {
            values,
            rows: self.t,
            cols: self.d,
            rs: width,
            cs: 1,
            off: bi * self.t * width + hi * self.d,
        }
    }
}

/// candle's ops: the query heads sharing a key/value head stacked along the positions,
/// `[b, kv, n * t, d]`, so keys and values are not repeated; the scale on `q` (`t x d` values
/// rather than `t x t` scores).
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, dims: Dims) -> candle_core::Result<Tensor> {
    let Dims { b, h, kv, t, d } = dims;
    let n = h / kv;
    let q = (q * f64::from(dims.scale()))?.reshape((b, kv, n * t, d))?;
    let scores = q.matmul(&k.t()?)?; // [b, kv, n * t, t]
    let mask: Vec<f32> = (0..n * t)
        .flat_map(|row| (0..t).map(move |j| if j > row % t { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (n * t, t), q.device())?.to_dtype(q.dtype())?;
    let scores = scores.broadcast_add(&mask)?;
    let probs = softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
    merge_heads(&probs.matmul(v)?, h)
}

/// Head `i` of a contiguous `[.., t, d]`.
fn head(x: &[f32], i: usize, t: usize, d: usize) -> MatRef<'_> {
    MatRef::row_major(&x[i * t * d..(i + 1) * t * d], t, d)
}

/// The fused op; the forward keeps each query row's log-sum-exp of its scores for the backward.
struct CausalAttention {
    dims: Dims,
    /// `[b, h, t]`.
    lse: Mutex<Option<Vec<f32>>>,
}

/// The probabilities of query rows `r0..r0 + rows` over keys `0..cols` (`cols = r0 + rows`),
/// `[rows, cols]` in `s`, from their scores there: zero above the diagonal, each row normalised
/// by its softmax; each row's log-sum-exp written to `lse`.
fn softmax_rows(s: &mut [f32], r0: usize, cols: usize, lse: &mut [f32]) {
    for (ii, (row, lse)) in s.chunks_mut(cols).zip(lse).enumerate() {
        let (seen, masked) = row.split_at_mut(r0 + ii + 1);
        masked.fill(0.0);
        *lse = softmax_in_place(seen);
    }
}

/// [`softmax_rows`] again from the saved log-sum-exps: `exp(s - lse)`, zero above the diagonal.
fn saved_softmax_rows(s: &mut [f32], r0: usize, cols: usize, lse: &[f32]) {
    for (ii, (row, &lse)) in s.chunks_mut(cols).zip(lse).enumerate() {
        let (seen, masked) = row.split_at_mut(r0 + ii + 1);
        masked.fill(0.0);
        seen.iter_mut().for_each(|x| *x = (*x - lse).exp());
    }
}

impl CausalAttention {
    /// One query head's output `o [t, d]` and log-sum-exps `lse [t]`.
    fn head_forward(
        &self,
        (q, k, v): (MatRef<'_>, MatRef<'_>, MatRef<'_>),
        o: &mut [f32],
        lse: &mut [f32],
    ) -> candle_core::Result<()> {
        let Dims { t, d, .. } = self.dims;
        let mut s = vec![0f32; ROWS.min(t) * t];
        for r0 in (0..t).step_by(ROWS) {
            let rows = ROWS.min(t - r0);
            let cols = r0 + rows;
            let s = &mut s[..rows * cols];
            let qb = q.rows(r0, rows);
            gemm_serial_into(s, cols, qb, k.rows(0, cols).t(), false, self.dims.scale())?;
            softmax_rows(s, r0, cols, &mut lse[r0..cols]);
            let p = MatRef::row_major(s, rows, cols);
            gemm_serial_into(&mut o[r0 * d..cols * d], d, p, v.rows(0, cols), false, 1.0)?;
        }
        Ok(())
    }

    /// One query head's gradients: its queries' into `dq [t, d]`, its share of its key/value
    /// head's into `dk`, `dv` `[t, d]`, for the output `o` and its gradient `go` (`[t, d]` views
    /// of the merged layout).
    #[allow(clippy::too_many_arguments)]
    fn head_backward<'a>(
        &self,
        (q, k, v): (MatRef<'_>, MatRef<'_>, MatRef<'_>),
        (o, go): (MatRef<'a>, MatRef<'a>),
        lse: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) -> candle_core::Result<()> {
        let Dims { t, d, .. } = self.dims;
        let scale = self.dims.scale();
        // D_i = dO_i . O_i = sum_j P_ij dP_ij, the softmax backward's row term.
        let row = |m: MatRef<'a>, i: usize| -> &'a [f32] { &m.values[m.off + i * m.rs..][..d] };
        let dot: Vec<f32> = (0..t)
            .map(|i| row(o, i).iter().zip(row(go, i)).map(|(a, b)| a * b).sum())
            .collect();
        let mut p = vec![0f32; ROWS.min(t) * t];
        let mut ds = vec![0f32; ROWS.min(t) * t];
        for r0 in (0..t).step_by(ROWS) {
            let rows = ROWS.min(t - r0);
            let cols = r0 + rows;
            let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
            let (qb, gob) = (q.rows(r0, rows), go.rows(r0, rows));
            // The probabilities again, from the saved log-sum-exps.
            gemm_serial_into(p, cols, qb, k.rows(0, cols).t(), false, scale)?;
            saved_softmax_rows(p, r0, cols, &lse[r0..cols]);
            // dP = dO V^T, then dS = P (dP - D) (zero above the diagonal, where P is).
            gemm_serial_into(ds, cols, gob, v.rows(0, cols).t(), false, 1.0)?;
            for (ii, (ds, p)) in ds.chunks_mut(cols).zip(p.chunks(cols)).enumerate() {
                let di = dot[r0 + ii];
                for (x, &pj) in ds.iter_mut().zip(p) {
                    *x = pj * (*x - di);
                }
            }
            let (pm, dsm) = (
                MatRef::row_major(p, rows, cols),
                MatRef::row_major(ds, rows, cols),
            );
            // dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO.
            let kb = k.rows(0, cols);
            gemm_serial_into(&mut dq[r0 * d..cols * d], d, dsm, kb, false, scale)?;
            gemm_serial_into(&mut dk[..cols * d], d, dsm.t(), qb, true, scale)?;
            gemm_serial_into(&mut dv[..cols * d], d, pm.t(), gob, true, 1.0)?;
        }
        Ok(())
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "lora-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, h, kv, t, d } = self.dims;
        let q = f32_slice(qs, ql, "attention queries")?;
        let k = f32_slice(ks, kl, "attention keys")?;
        let v = f32_slice(vs, vl, "attention values")?;
        if q.len() != b * h * t * d || k.len() != b * kv * t * d || v.len() != k.len() {
            candle_core::bail!(
                "causal attention: inputs of {}, {}, {} values for [{b}, {h} / {kv}, {t}, {d}]",
                q.len(),
                k.len(),
                v.len()
            );
        }
        let head = |x, i| head(x, i, t, d);
        // Each query head into its own `[t, d]`, then merged.
        let mut heads = vec![0f32; b * h * t * d];
        let mut lse = vec![0f32; b * h * t];
        heads
            .par_chunks_mut(t * d)
            .zip(lse.par_chunks_mut(t))
            .enumerate()
            .try_for_each(|(i, (o, lse))| {
                let g = self.dims.kv_of(i / h, i % h);
                self.head_forward((head(q, i), head(k, g), head(v, g)), o, lse)
            })?;
        let mut out = vec![0f32; heads.len()];
        for (i, o) in heads.chunks(t * d).enumerate() {
            let (bi, hi) = (i / h, i % h);
            for (ti, row) in o.chunks(d).enumerate() {
                let at = (bi * t + ti) * h * d + hi * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("causal attention: poisoned state"))? = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, h, kv, t, d } = self.dims;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::msg("causal attention: poisoned state"))?;
        let Some(lse) = lse.as_ref() else {
            candle_core::bail!("causal attention: backward before the forward");
        };
        let grad = grad.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let qv = cpu_f32(&qs, ql, "attention queries")?;
        let kvv = cpu_f32(&ks, kl, "attention keys")?;
        let vv = cpu_f32(&vs, vl, "attention values")?;
        let ov = cpu_f32(&os, ol, "attention output")?;
        let gv = cpu_f32(&gs, gl, "attention output gradient")?;
        let size = b * h * t * d;
        if [qv.len(), ov.len(), gv.len()] != [size; 3]
            || [kvv.len(), vv.len()] != [b * kv * t * d; 2]
        {
            candle_core::bail!(
                "causal attention: backward inputs of other shapes than the forward's"
            );
        }
        let head = |x, i| head(x, i, t, d);
        let (mut dq, mut dk_h, mut dv_h) = (vec![0f32; size], vec![0f32; size], vec![0f32; size]);
        dq.par_chunks_mut(t * d)
            .zip(dk_h.par_chunks_mut(t * d))
            .zip(dv_h.par_chunks_mut(t * d))
            .enumerate()
            .try_for_each(|(i, ((dq, dk), dv))| {
                let (bi, hi) = (i / h, i % h);
                let g = self.dims.kv_of(bi, hi);
                self.head_backward(
                    (head(qv, i), head(kvv, g), head(vv, g)),
                    (self.dims.merged(ov, bi, hi), self.dims.merged(gv, bi, hi)),
                    &lse[i * t..(i + 1) * t],
                    dq,
                    dk,
                    dv,
                )
            })?;
        // Each key/value head's gradient: the sum over the query heads sharing it.
        let n = h / kv;
        let reduce = |per_head: Vec<f32>| -> Vec<f32> {
            if n == 1 {
                return per_head;
            }
            let mut out = vec![0f32; b * kv * t * d];
            out.par_chunks_mut(t * d).enumerate().for_each(|(g, dst)| {
                for hd in per_head.chunks(t * d).skip(g * n).take(n) {
                    dst.iter_mut().zip(hd).for_each(|(x, y)| *x += y);
                }
            });
            out
        };
        let (dk, dv) = (reduce(dk_h), reduce(dv_h));
        let wrap = |x: &Tensor, g: Vec<f32>| -> candle_core::Result<Option<Tensor>> {
            Ok(match x.track_op() {
                true => Some(Tensor::from_vec(g, x.shape(), x.device())?),
                false => None,
            })
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::*;
    use crate::testing::max_diff;

    #[test]
    fn fused_attention_matches_the_composed_one_with_gradients() {
        let dev = Device::Cpu;
        // 70 positions: two full blocks of 32 rows and a partial one; 6 query heads over 2
        // key/value heads, and then plain multi-head attention.
        for (h, kv) in [(6, 2), (3, 3)] {
            let (b, t, d) = (2, 70, 16);
            let var = |heads| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev).unwrap())
                    .unwrap()
            };
            let (q, k, v) = (var(h), var(kv), var(kv));
            let dims = Dims { b, h, kv, t, d };
            let fused = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
            let plain = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), dims).unwrap();
            assert_eq!(fused.dims(), &[b, t, h * d]);
            // Softmax weights sum to one; outputs are averages of values of size ~1.
            assert!(
                max_diff(&fused, &plain) < 1e-5,
                "{}",
                max_diff(&fused, &plain)
            );
            let w = Tensor::randn(0f32, 1.0, (b, t, h * d), &dev).unwrap();
            let loss = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gp) = (loss(&fused), loss(&plain));
            for (what, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, r) = (
                    gf.get(x.as_tensor()).unwrap(),
                    gp.get(x.as_tensor()).unwrap(),
                );
                // Sums of up to 70 * 3 products of size ~1 in another order.
                assert!(max_diff(a, r) < 1e-4, "{what}: {}", max_diff(a, r));
            }
        }
        // No positions: an empty output, not a failure.
        let empty = Tensor::zeros((1, 2, 0, 4), candle_core::DType::F32, &dev).unwrap();
        let y = causal_attention(
            &empty,
            &empty.narrow(1, 0, 1).unwrap(),
            &empty.narrow(1, 0, 1).unwrap(),
        );
        assert_eq!(y.unwrap().dims(), &[1, 0, 8]);
        // Frozen keys and values: only the queries' gradient.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev).unwrap()).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (1, 1, 5, 4), &dev).unwrap();
        let y = causal_attention(q.as_tensor(), &kv, &kv).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some() && g.get(&kv).is_none());
        let err = causal_attention(q.as_tensor(), &kv, &kv.narrow(2, 0, 4).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("values [1, 1, 4, 4]"), "{err}");
    }
}
