//! Numeric kernels below every layer: [`all_finite`], and CPU fast paths for f32 layers used by
//! [`LoraLinear`](crate::LoraLinear) and [`merge_file`](crate::merge_file) when they apply
//! (anything else takes the general candle path):
//!
//! - [`fused_forward`]: the unmerged forward `x W^T + (s x A^T) B^T + b` as one candle op writing
//!   one output buffer: the LoRA product goes into the fresh buffer and the base product
//!   accumulates onto it inside gemm, so no `[n, out]` temporary and no extra add pass exist.
//!   With a backward pass, so training uses it too.
//! - [`add_low_rank`]: `W + L R` for a thin `L [rows, r]`, `R [r, cols]`, a block of rows at a
//!   time while the block is in cache, with the finite check folded in: the merge reads `W` once
//!   and writes the result once, as little memory traffic as any merge can have.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// True when every element is finite. One reduction; a second exact pass only when the sum is
/// not finite (a sum of finite values can overflow).
///
/// # Errors
/// A candle error.
pub(crate) fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    let t32 = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let sum = t32.sum_all()?.to_scalar::<f32>()?;
    if sum.is_finite() {
        return Ok(true);
    }
    // x - x is 0 for finite x and NaN for NaN or inf, and a sum of zeros cannot overflow.
    #[allow(clippy::eq_op)] // deliberate: x - x tells finite from non-finite
    let zeros = (&t32 - &t32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(zeros == 0.0)
}

fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `(row stride, column stride, start offset)` of a 2-d layout.
fn strides2(l: &Layout) -> candle_core::Result<(isize, isize, usize)> {
    match l.stride() {
        [rs, cs] => Ok((*rs as isize, *cs as isize, l.start_offset())),
        s => Err(candle_core::Error::msg(format!(
            "lora fused forward: expected a matrix, got strides {s:?}"
        ))),
    }
}

/// `dst = x W^T` for a contiguous `x [n, inp]`, `W [out, inp]` given by its storage and layout,
/// and `dst [n, out]`: for 2 to [`skinny::MAX_ROWS`](crate::skinny::MAX_ROWS) rows (a server's
/// decoding step) the few-rows kernel, gemm otherwise.
fn base_matmul(
    dst: &mut [f32],
    x: &[f32],
    n: usize,
    inp: usize,
    w: &[f32],
    wl: &Layout,
) -> candle_core::Result<()> {
    let out = dst.len() / n.max(1);
    let (w_rs, w_cs, w_off) = strides2(wl)?;
    if (2..=crate::skinny::MAX_ROWS).contains(&n) && inp > 0 && out > 0 && w_cs == 1 {
        let rs = usize::try_from(w_rs).unwrap_or(0);
        let rows = (rs >= inp)
            .then(|| w.get(w_off..w_off + (out - 1) * rs + inp))
            .flatten();
        if let (Some(rows), Some(x)) = (rows, x.get(..n * inp)) {
            crate::skinny::matmul_t(x, n, inp, rows, rs, out, dst);
            return Ok(());
        }
    }
    let w = MatRef {
        values: w,
        rows: out,
        cols: inp,
        rs: usize::try_from(w_rs).unwrap_or(0),
        cs: usize::try_from(w_cs).unwrap_or(0),
        off: w_off,
    };
    matmul_t_into(dst, out, 0, x, n, w)
}

/// The fused op over `(x [n, in], h = s x A^T [n, r], B [out, r])`; the frozen weight (as an
/// `[out, in]` view) and bias are fixed parts of the op.
struct FusedLoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp3 for FusedLoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, inp) = xl.shape().dims2()?;
        let (hn, r) = hl.shape().dims2()?;
        let (out, br) = bl.shape().dims2()?;
        if (hn, br) != (n, r) {
            return Err(candle_core::Error::msg(format!(
                "lora fused forward: x [{n}, {inp}], h [{hn}, {r}] and B [{out}, {br}] do not fit"
            )));
        }
        let (x, h, b) = (
            xs.as_slice::<f32>()?,
            hs.as_slice::<f32>()?,
            bs.as_slice::<f32>()?,
        );
        let (x_rs, x_cs, x_off) = strides2(xl)?;
        let (h_rs, h_cs, h_off) = strides2(hl)?;
        let (b_rs, b_cs, b_off) = strides2(bl)?;
        let (w_guard, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(ws) = &*w_guard else {
            return Err(candle_core::Error::msg(
                "lora fused forward: the weight is not on the CPU",
            ));
        };
        let w = ws.as_slice::<f32>()?;
        let (w_rs, w_cs, w_off) = strides2(wl)?;
        if wl.shape().dims2()? != (out, inp) {
            return Err(candle_core::Error::msg(
                "lora fused forward: weight shape mismatch",
            ));
        }
        let mut dst = vec![0f32; n * out];
        if n > 0 && out > 0 {
            let par = parallelism();
            // SAFETY: every pointer and stride comes from the layout of a live storage, and the
            // shapes were checked above to agree (x [n, in], h [n, r], B [out, r], W [out, in],
            // dst [n, out]), so gemm reads and writes only inside those buffers.
            unsafe {
                // dst = h B^T: the thin LoRA product, written into the fresh buffer.
                gemm(
                    n,
                    out,
                    r,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    false,
                    h.as_ptr().add(h_off),
                    h_cs,
                    h_rs,
                    b.as_ptr().add(b_off),
                    b_rs,
                    b_cs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
                // dst += x W^T: the same gemm call as candle's `Linear`, accumulating.
                gemm(
                    n,
                    out,
                    inp,
                    dst.as_mut_ptr(),
                    1,
                    out as isize,
                    true,
                    x.as_ptr().add(x_off),
                    x_cs,
                    x_rs,
                    w.as_ptr().add(w_off),
                    w_rs,
                    w_cs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        drop(w_guard);
        if let Some(bias) = &self.bias {
            // Added last, as `Linear` does, so that with `B = 0` the output is bit-identical.
            let bias = bias.to_vec1::<f32>()?;
            for row in dst.chunks_exact_mut(out.max(1)) {
                for (d, b) in row.iter_mut().zip(&bias) {
                    *d += b;
                }
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_x = if x.track_op() {
            Some(grad.matmul(&self.weight)?)
        } else {
            None
        };
        let grad_h = if h.track_op() {
            Some(grad.matmul(b)?)
        } else {
            None
        };
        let grad_b = if b.track_op() {
            Some(grad.t()?.matmul(h)?)
        } else {
            None
        };
        Ok((grad_x, grad_h, grad_b))
    }
}

/// Whether [`fused_forward`] applies: everything f32 on the CPU, a matrix weight, and neither
/// weight nor bias needing a gradient (full fine-tuning takes the general path).
pub(crate) fn fused_applies(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> bool {
    [x, a, b, weight]
        .into_iter()
        .chain(bias)
        .all(|t| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu))
        && weight.rank() == 2
        && !weight.track_op()
        && !bias.is_some_and(Tensor::track_op)
}

/// `x W^T + h B^T + bias` for `x [n, in]`, `h [n, r]`, `B [out, r]`, `weight [out, in]` (any
/// strides), in one output buffer. Only where [`fused_applies`].
pub(crate) fn fused_forward(
    x: &Tensor,
    h: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = FusedLoraLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
    };
    x.apply_op3(h, b, op)
}

/// `x W^T` for a frozen `W`: candle's matmul forward, but a backward that computes only the
/// input's gradient (candle's `Matmul` backward computes both operands' gradients, the frozen
/// weight's too: ~50% more FLOPs in a LoRA training step).
struct FrozenMatmul {
    /// `[out, in]`, any strides.
    weight: Tensor,
}

impl FrozenMatmul {
    /// `x W^T` on one backend: `weight_storage` picks the weight's storage of that backend out
    /// of candle's `Storage` (the same matmul call on every device).
    fn fwd<S: BackendStorage>(
        &self,
        xs: &S,
        xl: &Layout,
        weight_storage: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let (guard, wl) = self.weight.storage_and_layout();
        let ws = weight_storage(&guard).ok_or_else(|| {
            candle_core::Error::msg("frozen linear: the weight is on another device than the input")
        })?;
        let (n, inp) = xl.shape().dims2()?;
        let (out, w_in) = wl.shape().dims2()?;
        if w_in != inp {
            return Err(candle_core::Error::msg(format!(
                "frozen linear: input [{n}, {inp}] does not fit weight [{out}, {w_in}]"
            )));
        }
        let y = xs.matmul(ws, (1, n, out, inp), xl, &wl.transpose(0, 1)?)?;
        Ok((y, Shape::from((n, out))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(xs, xl, |s| match s {
            Storage::Cpu(w) => Some(w),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.fwd(xs, xl, |s| match s {
            Storage::Cuda(w) => Some(w),
            _ => None,
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(x W^T)/dx = grad W; the weight is frozen: no gradient for it.
        if arg.track_op() {
            Ok(Some(grad.matmul(&self.weight)?))
        } else {
            Ok(None)
        }
    }
}

/// A matrix `[rows, cols]` inside a slice: element `(i, j)` at `off + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
    pub(crate) off: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` at the start of `values`.
    pub(crate) fn row_major(values: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            values,
            rows,
            cols,
            rs: cols,
            cs: 1,
            off: 0,
        }
    }

    /// Rows `start..start + count` (a view).
    pub(crate) fn rows(self, start: usize, count: usize) -> Self {
        Self {
            rows: count,
            off: self.off + start * self.rs,
            ..self
        }
    }

    /// The transpose (a view, nothing moves).
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside the slice (an empty matrix always does).
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.values.len()
    }
}

/// `dst = a b`, or `dst += a b` when `accumulate`, for `a [m, k]`, `b [k, n]` and a row-major
/// `dst [m, n]` of row stride `dst_rs`: gemm on the configured threads, every access checked to
/// stay inside the slices.
///
/// # Errors
/// When the shapes disagree or a slice is too short for its shape.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm_checked(dst, dst_rs, a, b, accumulate, 1.0, parallelism())
}

/// `dst = scale a b`, or `dst += scale a b` when `accumulate`: [`gemm_into`] on the calling
/// thread alone, for the small products of work already split over the threads (one attention
/// head each).
///
/// # Errors
/// When the shapes disagree or a slice is too short for its shape.
pub(crate) fn gemm_serial_into(
    dst: &mut [f32],
    dst_rs: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    scale: f32,
) -> candle_core::Result<()> {
    gemm_checked(dst, dst_rs, a, b, accumulate, scale, Parallelism::None)
}

fn gemm_checked(
    dst: &mut [f32],
    dst_rs: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) -> candle_core::Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        candle_core::bail!("lora matmul: [{m}, {k}] times [{}, {n}]", b.rows);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dst_fits = n <= dst_rs && dst.len() >= (m - 1) * dst_rs + n;
    if !(dst_fits && a.fits() && b.fits()) {
        candle_core::bail!(
            "lora matmul: dst {} (stride {dst_rs}), a [{m}, {k}], b [{k}, {n}] do not fit their slices",
            dst.len()
        );
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the checks above keep every access of gemm inside the three slices.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.values.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.values.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// `dst[r, col..col + w.rows] = (x W^T)[r, ..]` for a contiguous `x [n, w.cols]`, a weight
/// `w [out, in]` and `dst` of row stride `dst_rs` (one block of columns of a product, or all of
/// them).
///
/// # Errors
/// When the slices are too short for the shapes.
pub(crate) fn matmul_t_into(
    dst: &mut [f32],
    dst_rs: usize,
    col: usize,
    x: &[f32],
    n: usize,
    w: MatRef<'_>,
) -> candle_core::Result<()> {
    if col + w.rows > dst_rs {
        candle_core::bail!(
            "lora matmul: columns {col}..{} outside rows of {dst_rs}",
            col + w.rows
        );
    }
    let Some(dst) = dst.get_mut(col..) else {
        candle_core::bail!("lora matmul: column {col} outside a dst of {}", dst.len());
    };
    gemm_into(dst, dst_rs, MatRef::row_major(x, n, w.cols), w.t(), false)
}

/// `x W^T + b` for `x [..., in]` and a frozen `weight [out, in]` (any strides) and `bias [out]`:
/// the same result as candle's `Linear` (the same matmul call for a contiguous input), with a
/// backward that produces no weight gradient. CPU and CUDA.
///
/// # Errors
/// Shape errors.
pub(crate) fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&inp, lead)) = dims.split_last() else {
        return Err(candle_core::Error::msg(
            "frozen linear: the input is a scalar",
        ));
    };
    let n: usize = lead.iter().product();
    let out = weight.dim(0)?;
    let x2 = x.contiguous()?.reshape((n, inp))?;
    let y = x2.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `y * g + bias` per column for `y [n, out]`, `g [out]` and a frozen `bias [out]`: DoRA's
/// rescaling of a fused LoRA output, one pass instead of candle's two broadcast ops. The
/// backward gives `y` (`grad * g`) and `g` (the column sums of `grad * y`) their gradients.
struct ScaleColumns {
    bias: Option<Tensor>,
}

impl CustomOp2 for ScaleColumns {
    fn name(&self) -> &'static str {
        "lora-scale-columns"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, out) = yl.shape().dims2()?;
        let (Some((y0, y1)), Some((g0, g1))) = (yl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            return Err(candle_core::Error::msg(
                "lora scale columns: the inputs must be contiguous",
            ));
        };
        let (y, g) = (
            &ys.as_slice::<f32>()?[y0..y1],
            &gs.as_slice::<f32>()?[g0..g1],
        );
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0f32; out],
        };
        if g.len() != out || bias.len() != out {
            return Err(candle_core::Error::msg(format!(
                "lora scale columns: y [{n}, {out}], g [{}] and bias [{}] do not fit",
                g.len(),
                bias.len()
            )));
        }
        let mut dst = vec![0f32; n * out];
        for (d_row, y_row) in dst
            .chunks_exact_mut(out.max(1))
            .zip(y.chunks_exact(out.max(1)))
        {
            for (((d, y), g), b) in d_row.iter_mut().zip(y_row).zip(g).zip(&bias) {
                *d = y * g + b;
            }
        }
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = if y.track_op() {
            Some(grad.broadcast_mul(g)?)
        } else {
            None
        };
        let grad_g = if g.track_op() {
            Some((grad * y)?.sum(0)?)
        } else {
            None
        };
        Ok((grad_y, grad_g))
    }
}

/// `y * g + bias` per column (see [`ScaleColumns`]) for `y [n, out]`, f32 on the CPU, with a
/// frozen bias; `None` when that does not apply (then use candle's broadcast ops).
///
/// # Errors
/// Shape errors.
pub(crate) fn scale_columns(
    y: &Tensor,
    g: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu);
    if !(cpu_f32(y) && cpu_f32(g) && bias.is_none_or(|b| cpu_f32(b) && !b.track_op())) {
        return Ok(None);
    }
    let op = ScaleColumns {
        bias: bias.cloned(),
    };
    Ok(Some(y.contiguous()?.apply_op2(&g.contiguous()?, op)?))
}

/// DoRA's weight norms without forming `W + L R`: for row-major `w [rows, cols]`, `l [rows,
/// rank]`, `rt [rank, cols]`, the Euclidean norm of each row of `W + L R` (`per_column`: of each
/// column). One row of the sum at a time in a small buffer (the rank-`r` update as `r` axpys over
/// it, vectorised), squares summed in f64; rows split over candle's thread count. Reads `W` once
/// and allocates nothing of its size: what DoRA's forward needs every call.
///
/// # Errors
/// When the slices' lengths do not fit `[rows, cols]`, `[rows, rank]` and `[rank, cols]`.
pub(crate) fn low_rank_norms(
    w: &[f32],
    l: &[f32],
    rt: &[f32],
    rank: usize,
    cols: usize,
    per_column: bool,
) -> candle_core::Result<Vec<f32>> {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    if rows * cols != w.len() || l.len() != rows * rank || rt.len() != rank * cols {
        return Err(candle_core::Error::msg(format!(
            "low_rank_norms: W has {} values, L {}, R^T {}: not [{rows}, {cols}], [{rows}, {rank}], [{rank}, {cols}]",
            w.len(),
            l.len(),
            rt.len()
        )));
    }
    let width = if per_column { cols } else { rows };
    // One worker's rows: the sums of squares of its rows (or its part of every column's).
    let work = |w: &[f32], l: &[f32]| -> Vec<f64> {
        let mut row = vec![0f32; cols];
        let mut sums = vec![
            0f64;
            if per_column {
                cols
            } else {
                w.len() / cols.max(1)
            }
        ];
        for (i, w_row) in w.chunks_exact(cols.max(1)).enumerate() {
            row.copy_from_slice(w_row);
            for (k, r_row) in rt.chunks_exact(cols.max(1)).enumerate() {
                let coef = l.get(i * rank + k).copied().unwrap_or(0.0);
                for (v, r) in row.iter_mut().zip(r_row) {
                    *v += coef * r;
                }
            }
            if per_column {
                for (s, v) in sums.iter_mut().zip(&row) {
                    *s += f64::from(*v) * f64::from(*v);
                }
            } else if let Some(s) = sums.get_mut(i) {
                *s = row.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
            }
        }
        sums
    };
    let threads = candle_core::utils::get_num_threads().max(1);
    let parts: Vec<Vec<f64>> = if threads == 1 || w.len() < PARALLEL_MIN || rows == 0 {
        vec![work(w, l)]
    } else {
        let per = rows.div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = w
                .chunks(per * cols)
                .zip(l.chunks(per * rank.max(1)))
                .map(|(w, l)| s.spawn(move || work(w, l)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| vec![f64::NAN; width]))
                .collect()
        })
    };
    let sums: Vec<f64> = if per_column {
        parts.iter().fold(vec![0f64; width], |mut acc, part| {
            for (a, p) in acc.iter_mut().zip(part) {
                *a += p;
            }
            acc
        })
    } else {
        parts.into_iter().flatten().collect()
    };
    Ok(sums.iter().map(|s| s.sqrt() as f32).collect())
}

/// DoRA's rescaling in place: each output feature of `values` (row-major `[rows, cols]`: a row,
/// or with `fan_in_fan_out` a column of the stored `[in, out]`) is multiplied by
/// `magnitude[j] / ||feature j||`, the norm accumulated in f64. Returns whether every result is
/// finite (a zero norm gives infinities or NaN).
///
/// # Errors
/// When `values` is not `[rows, cols]` or `magnitude` not as long as the output features.
pub(crate) fn dora_rescale(
    values: &mut [f32],
    cols: usize,
    magnitude: &[f32],
    fan_in_fan_out: bool,
) -> candle_core::Result<bool> {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    let features = if fan_in_fan_out { cols } else { rows };
    if rows * cols != values.len() || magnitude.len() != features {
        return Err(candle_core::Error::msg(format!(
            "dora_rescale: {} values in rows of {cols}, {} magnitudes: not [{rows}, {cols}] with {features} output features",
            values.len(),
            magnitude.len()
        )));
    }
    let square = |v: &f32| f64::from(*v) * f64::from(*v);
    let mut sums = vec![0f64; features];
    if fan_in_fan_out {
        for row in values.chunks_exact(cols.max(1)) {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += square(v);
            }
        }
    } else {
        for (s, row) in sums.iter_mut().zip(values.chunks_exact(cols.max(1))) {
            *s = row.iter().map(square).sum();
        }
    }
    let scale: Vec<f32> = sums
        .iter()
        .zip(magnitude)
        .map(|(s, m)| (f64::from(*m) / s.sqrt()) as f32)
        .collect();
    let mut finite = true;
    for (i, row) in values.chunks_exact_mut(cols.max(1)).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let g = if fan_in_fan_out {
                scale.get(j)
            } else {
                scale.get(i)
            };
            *v *= g.copied().unwrap_or(f32::NAN);
            finite &= v.is_finite();
        }
    }
    Ok(finite)
}

/// The number of values below which [`add_low_rank`] stays on one thread.
const PARALLEL_MIN: usize = 1 << 18;

/// Values per block of rows in [`add_low_rank`]: 256 KB, so a block stays in L2 between the copy,
/// the product and the check.
const BLOCK: usize = 1 << 16;

/// `out = w + l rt` for row-major `w`, `out` `[rows, cols]`, `l [rows, rank]`, `rt [rank, cols]`;
/// returns whether every value of `out` is finite. Works a block of rows at a time: copy the
/// rows of `w`, accumulate their `l rt` onto them with gemm (the same kernel as a matmul), check
/// them while they are still in cache; so `w` is read once and `out` written once. Rows are split
/// over candle's thread count.
///
/// # Errors
/// When the slices' lengths do not fit `[rows, cols]`, `[rows, rank]` and `[rank, cols]`.
pub(crate) fn add_low_rank(
    w: &[f32],
    l: &[f32],
    rt: &[f32],
    rank: usize,
    cols: usize,
    out: &mut [f32],
) -> candle_core::Result<bool> {
    if cols == 0 {
        return Ok(true);
    }
    let rows = w.len() / cols;
    if w.len() != rows * cols
        || out.len() != w.len()
        || l.len() != rows * rank
        || rt.len() != rank * cols
    {
        return Err(candle_core::Error::msg(format!(
            "add_low_rank: W has {} values, out {}, L {}, R^T {}: not [{rows}, {cols}], [{rows}, {rank}], [{rank}, {cols}]",
            w.len(),
            out.len(),
            l.len(),
            rt.len()
        )));
    }
    let threads = candle_core::utils::get_num_threads().max(1);
    if threads == 1 || w.len() < PARALLEL_MIN {
        return Ok(add_low_rank_rows(w, l, rt, rank, cols, out));
    }
    let per = rows.div_ceil(threads);
    Ok(std::thread::scope(|s| {
        let handles: Vec<_> = w
            .chunks(per * cols)
            .zip(out.chunks_mut(per * cols))
            .zip(l.chunks(per * rank.max(1)))
            .map(|((w, out), l)| s.spawn(move || add_low_rank_rows(w, l, rt, rank, cols, out)))
            .collect();
        // Join every worker (counting failures, not stopping at the first); a panicking worker
        // counts as a failure rather than a panic here.
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .filter(|ok| !ok)
            .count()
            == 0
    }))
}

fn add_low_rank_rows(
    w: &[f32],
    l: &[f32],
    rt: &[f32],
    rank: usize,
    cols: usize,
    out: &mut [f32],
) -> bool {
    let block_rows = (BLOCK / cols).max(1);
    let mut worst = 0u32;
    let blocks = w
        .chunks(block_rows * cols)
        .zip(out.chunks_mut(block_rows * cols))
        .zip(l.chunks(block_rows * rank.max(1)));
    for ((w_blk, out_blk), l_blk) in blocks {
        let m = w_blk.len() / cols;
        out_blk.copy_from_slice(w_blk);
        if rank > 0
            && l_blk.len() == m * rank
            && rt.len() == rank * cols
            && out_blk.len() == m * cols
        {
            // SAFETY: `out_blk` is `[m, cols]`, `l_blk` `[m, rank]` and `rt` `[rank, cols]`, all
            // row-major and of exactly these lengths (checked just above), so gemm stays inside
            // them.
            unsafe {
                gemm(
                    m,
                    cols,
                    rank,
                    out_blk.as_mut_ptr(),
                    1,
                    cols as isize,
                    true,
                    l_blk.as_ptr(),
                    1,
                    rank as isize,
                    rt.as_ptr(),
                    1,
                    cols as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
        // The largest exponent-and-mantissa pattern: at or above that of infinity means NaN/inf.
        worst = out_blk
            .iter()
            .fold(worst, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    }
    worst < 0x7f80_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dora_norms_and_rescale_match_the_formed_sum_on_several_threads() {
        // Above PARALLEL_MIN, so the rows are split over threads when candle has several.
        let (rows, cols, rank) = (700, 600, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
            .collect();
        let l: Vec<f32> = (0..rows * rank)
            .map(|i| (i % 7) as f32 * 0.1 - 0.3)
            .collect();
        let rt: Vec<f32> = (0..rank * cols).map(|i| (i % 5) as f32 * 0.25).collect();
        let mut sum = vec![0f32; rows * cols];
        assert!(add_low_rank(&w, &l, &rt, rank, cols, &mut sum).unwrap());
        let dev = Device::Cpu;
        let formed = Tensor::from_vec(sum.clone(), (rows, cols), &dev).unwrap();
        for per_column in [false, true] {
            let norms = low_rank_norms(&w, &l, &rt, rank, cols, per_column).unwrap();
            let axis = usize::from(!per_column);
            let expected = formed.sqr().unwrap().sum(axis).unwrap().sqrt().unwrap();
            let expected = expected.to_vec1::<f32>().unwrap();
            assert_eq!(norms.len(), expected.len());
            for (n, e) in norms.iter().zip(&expected) {
                assert!((n - e).abs() <= 1e-5 * e.max(1.0), "{n} vs {e}");
            }
            // Rescaling by m = 2 * norm doubles every value.
            let m: Vec<f32> = norms.iter().map(|n| 2.0 * n).collect();
            let mut scaled = sum.clone();
            assert!(dora_rescale(&mut scaled, cols, &m, per_column).unwrap());
            for (s, v) in scaled.iter().zip(&sum) {
                assert!(
                    (s - 2.0 * v).abs() <= 1e-5 * v.abs().max(1.0),
                    "{s} vs 2 * {v}"
                );
            }
        }
        // A zero norm gives a non-finite result, reported.
        let mut zeros = vec![0f32; 6];
        assert!(!dora_rescale(&mut zeros, 3, &[1.0, 1.0], false).unwrap());
        assert!(low_rank_norms(&w, &l, &rt, rank, cols + 1, false).is_err());
    }

    #[test]
    fn add_low_rank_matches_a_matmul_and_finds_non_finite_values() {
        let (rows, cols, rank) = (700, 600, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let l: Vec<f32> = (0..rows * rank).map(|i| (i % 7) as f32 - 3.0).collect();
        let rt: Vec<f32> = (0..rank * cols).map(|i| (i % 5) as f32 * 0.25).collect();
        let mut out = vec![0f32; rows * cols];
        assert!(add_low_rank(&w, &l, &rt, rank, cols, &mut out).unwrap());
        let dev = Device::Cpu;
        let lt = Tensor::from_vec(l.clone(), (rows, rank), &dev).unwrap();
        let rtt = Tensor::from_vec(rt.clone(), (rank, cols), &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), (rows, cols), &dev).unwrap();
        let expected = (wt + lt.matmul(&rtt).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let worst = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{worst}");
        let mut bad = l.clone();
        bad[rank * (rows - 1)] = f32::NAN;
        assert!(!add_low_rank(&w, &bad, &rt, rank, cols, &mut out).unwrap());
        // Finite inputs whose delta overflows.
        bad[rank * (rows - 1)..].fill(2e38);
        assert!(!add_low_rank(&w, &bad, &rt, rank, cols, &mut out).unwrap());
        // Lengths that do not fit are refused, not read past.
        assert!(add_low_rank(&w, &l[1..], &rt, rank, cols, &mut out).is_err());
        assert!(add_low_rank(&w, &l, &rt, rank, cols, &mut out[1..]).is_err());
    }
}

/// The stacked factors of a mixed-adapter batch as plain f32 values (see `routing`):
/// `a [slots * r, in]` and `bt [slots * r, out]` (`B^T`, scaled), row-major, so that both thin
/// products run along contiguous rows.
#[derive(Debug, Clone)]
pub(crate) struct RoutedFactors {
    pub(crate) a: std::sync::Arc<Vec<f32>>,
    pub(crate) bt: std::sync::Arc<Vec<f32>>,
    pub(crate) r: usize,
}

/// `sum_i a_i b_i` with eight independent accumulators, which the compiler turns into vector
/// FMAs (a single running sum is a serial dependency it may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(u, v)| u * v)
        .sum();
    for (u, v) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x W^T + bias + s B_i (A_i x)` for every position of `x [n, in]`, where the `n` positions
/// come `n / slots.len()` per row and row `k` uses the adapter block `slots[k]` (`None`: the
/// base alone): the base by one matmul into the output (the few-rows kernel for a decoding
/// step's batch), then each row's thin product added in
/// place (`r` dot products and an `out x r` update a position). Inference only: no backward.
struct RoutedLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    factors: RoutedFactors,
    slots: std::sync::Arc<Vec<Option<usize>>>,
}

impl CustomOp1 for RoutedLinear {
    fn name(&self) -> &'static str {
        "lora-routed-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, inp) = xl.shape().dims2()?;
        let Some((x_start, x_end)) = xl.contiguous_offsets() else {
            return Err(candle_core::Error::msg(
                "routed linear: the input is not contiguous",
            ));
        };
        let x = &xs.as_slice::<f32>()?[x_start..x_end];
        let (w_guard, wl) = self.weight.storage_and_layout();
        let Storage::Cpu(ws) = &*w_guard else {
            return Err(candle_core::Error::msg(
                "routed linear: the weight is not on the CPU",
            ));
        };
        let w = ws.as_slice::<f32>()?;
        let (out, w_in) = wl.shape().dims2()?;
        let rows = self.slots.len();
        if w_in != inp || rows == 0 || n % rows != 0 {
            return Err(candle_core::Error::msg(format!(
                "routed linear: input [{n}, {inp}] does not fit weight [{out}, {w_in}] and {rows} rows"
            )));
        }
        let RoutedFactors { a, bt, r } = &self.factors;
        let r = *r;
        let mut dst = vec![0f32; n * out];
        base_matmul(&mut dst, x, n, inp, w, wl)?;
        drop(w_guard);
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        let terms = RoutedTerms {
            a,
            bt,
            r,
            inp,
            out,
            per_row: n / rows,
            slots: &self.slots,
            bias: bias.as_deref(),
        };
        // Positions split between the threads when the thin products are worth it.
        let (inp1, out1) = (inp.max(1), out.max(1));
        let chunk = if n * (inp + out) * r < 1 << 16 {
            n.max(1)
        } else {
            n.div_ceil(rayon::current_num_threads()).max(1)
        };
        dst.par_chunks_mut(chunk * out1)
            .zip(x.par_chunks(chunk * inp1))
            .enumerate()
            .for_each(|(c, (dst, x))| terms.add_dispatch(c * chunk, x, dst));
        Ok((CpuStorage::F32(dst), Shape::from((n, out))))
    }
}

/// What [`RoutedLinear`] adds to the base product: each position's thin product with its
/// adapter's stacked factors, and the bias.
struct RoutedTerms<'a> {
    a: &'a [f32],
    bt: &'a [f32],
    r: usize,
    inp: usize,
    out: usize,
    /// Positions a row of `slots`.
    per_row: usize,
    slots: &'a [Option<usize>],
    bias: Option<&'a [f32]>,
}

impl RoutedTerms<'_> {
    /// [`add`](Self::add) compiled for AVX2 where the CPU has it (twice the vector width of
    /// the x86-64 baseline; the same operations in the same order, so the same results).
    fn add_dispatch(&self, first: usize, x: &[f32], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn avx2(terms: &RoutedTerms<'_>, first: usize, x: &[f32], dst: &mut [f32]) {
                terms.add(first, x, dst);
            }
            // SAFETY: the CPU has AVX2 (checked just above), the only feature `avx2` enables.
            return unsafe { avx2(self, first, x, dst) };
        }
        self.add(first, x, dst);
    }

    /// Adds the terms of positions `first..` to their output rows `dst` for inputs `x`.
    #[inline(always)]
    fn add(&self, first: usize, x: &[f32], dst: &mut [f32]) {
        let (inp, out, r) = (self.inp, self.out, self.r);
        let mut h = vec![0f32; r];
        for (k, (xp, dp)) in x
            .chunks_exact(inp.max(1))
            .zip(dst.chunks_exact_mut(out.max(1)))
            .enumerate()
        {
            if let Some(Some(slot)) = self.slots.get((first + k) / self.per_row.max(1)) {
                let (a_block, b_block) = (
                    &self.a[slot * r * inp..(slot + 1) * r * inp],
                    &self.bt[slot * r * out..(slot + 1) * r * out],
                );
                for (hj, aj) in h.iter_mut().zip(a_block.chunks_exact(inp)) {
                    *hj = dot(aj, xp);
                }
                for (hj, bj) in h.iter().zip(b_block.chunks_exact(out)) {
                    for (d, bv) in dp.iter_mut().zip(bj) {
                        *d += hj * bv;
                    }
                }
            }
            if let Some(bias) = self.bias {
                dp.iter_mut().zip(bias).for_each(|(d, b)| *d += b);
            }
        }
    }
}

/// A mixed-adapter batch's forward on the CPU in f32 (see [`RoutedLinear`]); `x2 [n, in]`.
pub(crate) fn routed_forward(
    x2: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    factors: &RoutedFactors,
    slots: &std::sync::Arc<Vec<Option<usize>>>,
) -> candle_core::Result<Tensor> {
    x2.contiguous()?.apply_op1_no_bwd(&RoutedLinear {
        weight: weight.clone(),
        bias: bias.cloned(),
        factors: factors.clone(),
        slots: slots.clone(),
    })
}
