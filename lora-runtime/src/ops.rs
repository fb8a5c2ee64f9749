//! Fused RMSNorm, layer norm, softmax, rotary embedding, causal attention, SwiGLU and the LM
//! head's cross-entropy that models can train through.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim` and `rotary_emb::rope` have no backward: a model using them
//! silently stops the gradient there, so adapters before a norm never learn. These run candle's
//! fused kernels when no gradient is tracked (inference) and, when one is, a fused CPU forward
//! with a hand-written backward (f32), or the composed candle ops elsewhere (other dtypes,
//! CUDA), which are slower but exact.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 8), &Device::Cpu)?)?;
//! let w = Tensor::ones(8, candle_core::DType::F32, &Device::Cpu)?;
//! let y = lora_runtime::ops::rms_norm(x.as_tensor(), &w, 1e-5)?;
//! let p = lora_runtime::ops::softmax_last_dim(&y)?;
//! let grads = p.sqr()?.sum_all()?.backward()?;
//! assert!(grads.get(x.as_tensor()).is_some()); // the gradient reaches x
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, D,
};

use crate::kernels::{gemm_into, MatRef};

mod attention;

pub use attention::causal_attention;

/// Whether the fused CPU op with a backward applies.
fn fused_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && matches!(t.device(), Device::Cpu)
}

/// The contiguous f32 values of a storage, or an error naming `what`.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::msg(format!(
            "{what}: input is not contiguous"
        )));
    };
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "lora-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(xs, xl, "rms_norm")?,
            f32_slice(ws, wl, "rms_norm")?,
        );
        let d = w.len();
        if d == 0 || xl.shape().dims().last() != Some(&d) {
            return Err(candle_core::Error::msg(format!(
                "rms_norm: input {:?} does not end in the weight's {d}",
                xl.shape()
            )));
        }
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (mean + self.eps).sqrt();
            for ((o, v), g) in dst.iter_mut().zip(row).zip(w) {
                *o = v * r * g;
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)? as f64;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let gw = grad.broadcast_mul(w)?;
        let grad_x = if x.track_op() {
            // d/dx (x r w) = r (g w) - x r^3 / d * sum(g w x)
            let dot = (&gw * x)?.sum_keepdim(D::Minus1)?;
            let coef = (r.powf(3.0)? * dot)?.affine(1.0 / d, 0.0)?;
            Some((gw.broadcast_mul(&r)? - x.broadcast_mul(&coef)?)?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            let normed = x.broadcast_mul(&r)?;
            let per_row = (grad * normed)?;
            let rows = per_row.elem_count() / w.elem_count().max(1);
            Some(per_row.reshape((rows, w.elem_count()))?.sum(0)?)
        } else {
            None
        };
        Ok((grad_x, grad_w))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`, with a backward.
///
/// # Errors
/// Shape errors.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !(x.track_op() || weight.track_op()) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32);
    }
    if fused_cpu(x) && fused_cpu(weight) {
        return x
            .contiguous()?
            .apply_op2(weight, RmsNorm { eps: eps as f32 });
    }
    // Composed, in f32: slower, exact gradients on every device and dtype.
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    x32.broadcast_mul(&r)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension.
struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "lora-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "layer_norm")?;
        let (w, b) = (
            f32_slice(ws, wl, "layer_norm")?,
            f32_slice(bs, bl, "layer_norm")?,
        );
        let d = w.len();
        if d == 0 || b.len() != d || xl.shape().dims().last() != Some(&d) {
            return Err(candle_core::Error::msg(format!(
                "layer_norm: input {:?}, weight {d} and bias {} do not fit",
                xl.shape(),
                b.len()
            )));
        }
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + self.eps).sqrt();
            for (((o, v), g), c) in dst.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * r * g + c;
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)? as f64;
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let normed = centered.broadcast_mul(&r)?;
        let rows = |t: Tensor| -> candle_core::Result<Tensor> {
            let n = t.elem_count() / w.elem_count().max(1);
            t.reshape((n, w.elem_count()))?.sum(0)
        };
        let grad_x = if x.track_op() {
            // r / d * (d gw - sum(gw) - x^ sum(gw x^)), gw = g w
            let gw = grad.broadcast_mul(w)?;
            let sum_gw = gw.sum_keepdim(D::Minus1)?;
            let sum_gwx = (&gw * &normed)?.sum_keepdim(D::Minus1)?;
            let inner =
                ((gw.affine(d, 0.0)?.broadcast_sub(&sum_gw))? - normed.broadcast_mul(&sum_gwx)?)?;
            Some(inner.broadcast_mul(&r.affine(1.0 / d, 0.0)?)?)
        } else {
            None
        };
        let grad_w = if w.track_op() {
            Some(rows((grad * &normed)?)?)
        } else {
            None
        };
        let grad_b = if b.track_op() {
            Some(rows(grad.clone())?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// Layer norm over the last dimension, `(x - mean) / sqrt(var + eps) * weight + bias`, with a
/// backward (candle-nn's fused `LayerNorm` has none).
///
/// # Errors
/// Shape errors.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    if !tracked {
        return candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32);
    }
    if fused_cpu(x) && fused_cpu(weight) && fused_cpu(bias) {
        return x
            .contiguous()?
            .apply_op3(weight, bias, LayerNorm { eps: eps as f32 });
    }
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let r = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centered
        .broadcast_mul(&r)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// `row` replaced by its softmax; returns its log-sum-exp.
fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
    max + sum.ln()
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "lora-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "softmax")?;
        let d = xl.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            dst.copy_from_slice(row);
            softmax_in_place(dst);
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d softmax: y * (g - sum(g y))
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * grad.broadcast_sub(&dot)?)?))
    }
}

/// Softmax over the last dimension, with a backward.
///
/// # Errors
/// Shape errors.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    if fused_cpu(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Rotary position embedding, transformers' `rotate_half` form, for `x [b, heads, t, d]` and
/// `cos`, `sin` `[t, d / 2]`: `x1 cos - x2 sin` and `x2 cos + x1 sin` on the two halves of `x`.
/// candle's fused kernel without a gradient; composed candle ops, which have one, with.
///
/// # Errors
/// Shape errors.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    if fused_cpu(x) && fused_cpu(cos) && fused_cpu(sin) {
        return x.contiguous()?.apply_op1(Rope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        });
    }
    let d = x.dim(D::Minus1)?;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, d / 2)?,
        x.narrow(D::Minus1, d / 2, d / 2)?,
    );
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], D::Minus1)
}

/// The values of `cos`, `sin` (`[t, d / 2]`) for vectors of `d` at `t` positions, checked.
fn rope_tables(
    cos: &Tensor,
    sin: &Tensor,
    t: usize,
    d: usize,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let (c, s) = (
        cos.flatten_all()?.to_vec1::<f32>()?,
        sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let half = d / 2;
    if !d.is_multiple_of(2) || c.len() != t * half || s.len() != t * half {
        candle_core::bail!(
            "rope: cos/sin must be [{t}, {half}] for vectors of {d} at {t} positions"
        );
    }
    Ok((c, s))
}

/// One vector `src [d]` rotated into `dst`: `x1 c - x2 s` and `x2 c + x1 s` on its halves.
fn rotate(src: &[f32], dst: &mut [f32], c: &[f32], s: &[f32]) {
    let half = c.len();
    let (x1, x2) = src.split_at(half);
    let (o1, o2) = dst.split_at_mut(half);
    for i in 0..half {
        o1[i] = x1[i] * c[i] - x2[i] * s[i];
        o2[i] = x2[i] * c[i] + x1[i] * s[i];
    }
}

/// The rotation of [`rope`] as one CPU pass; its backward is the inverse rotation (the same
/// with `-sin`), as one pass too.
struct Rope {
    /// `[t, d / 2]`.
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "lora-rope"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "rope")?;
        let dims = xl.shape().dims();
        let (Some(&d), true) = (dims.last(), dims.len() >= 2) else {
            return Err(candle_core::Error::msg("rope: expected [.., t, d]"));
        };
        let t = dims[dims.len() - 2];
        let half = d / 2;
        let (cos, sin) = rope_tables(&self.cos, &self.sin, t, d)?;
        let mut out = vec![0f32; x.len()];
        for (row, (src, dst)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let p = (row % t) * half;
            rotate(src, dst, &cos[p..p + half], &sin[p..p + half]);
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The rotation's transpose is the rotation by the opposite angle.
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `x [b, t, heads * d]` as heads `[b, heads, t, d]` (contiguous), rotated by [`rope`] when
/// `rope` is `Some((cos, sin))` (`[t, d / 2]` each): what attention does to the output of each
/// of its projections. On the CPU in f32 one pass each way (its backward is [`merge_heads`]'s
/// layout with the inverse rotation), instead of a reshape, a transpose, a copy and a rotation,
/// each of which would also be a node that the backward pass accumulates a gradient into.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((1, 3, 8))?; // t = 3, 2 heads of 4
/// let heads = lora_runtime::ops::split_heads(&x, 2, None)?;
/// let plain = x.reshape((1, 3, 2, 4))?.transpose(1, 2)?.contiguous()?;
/// assert_eq!(heads.flatten_all()?.to_vec1::<f32>()?, plain.flatten_all()?.to_vec1::<f32>()?);
/// let back = lora_runtime::ops::merge_heads(&heads, 2)?;
/// assert_eq!(back.to_vec3::<f32>()?, x.to_vec3::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape errors.
pub fn split_heads(
    x: &Tensor,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!("split_heads: {width} features are not {heads} heads");
    }
    let d = width / heads;
    let cpu = fused_cpu(x) && rope.is_none_or(|(c, s)| fused_cpu(c) && fused_cpu(s));
    if !cpu {
        let y = x.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?;
        return match rope {
            Some((cos, sin)) => self::rope(&y, cos, sin),
            None => Ok(y),
        };
    }
    let rot = rope
        .map(|(c, s)| Ok::<_, candle_core::Error>((c.contiguous()?, s.contiguous()?)))
        .transpose()?;
    x.contiguous()?.apply_op1(Heads {
        heads,
        rot,
        split: true,
    })
}

/// Heads `[b, heads, t, d]` (any contiguous shape `[b, .., d]` with `heads * t` rows per batch
/// element, such as attention's grouped `[b, kv, n * t, d]`) back as `[b, t, heads * d]`: the
/// inverse layout of [`split_heads`] without rotation, one pass each way on the CPU in f32.
///
/// # Errors
/// Shape errors.
pub fn merge_heads(y: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = y.dims();
    let (Some(&b), Some(&d), true) = (dims.first(), dims.last(), dims.len() >= 3) else {
        candle_core::bail!("merge_heads: expected [b, .., d], got {dims:?}");
    };
    let rows = y.elem_count() / (b * d).max(1);
    if heads == 0 || !rows.is_multiple_of(heads) {
        candle_core::bail!("merge_heads: {rows} rows per batch element are not {heads} heads");
    }
    let t = rows / heads;
    if !fused_cpu(y) {
        return y
            .reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, heads * d));
    }
    y.contiguous()?.reshape((b, heads, t, d))?.apply_op1(Heads {
        heads,
        rot: None,
        split: false,
    })
}

/// The layout change of [`split_heads`] (`split`: `[b, t, heads * d]` to `[b, heads, t, d]`)
/// or of [`merge_heads`] (the reverse), each vector `[d]` rotated by `rot` (`cos`, `sin`
/// `[t, d / 2]`) on the way. Each direction's backward is the other with the inverse rotation.
struct Heads {
    heads: usize,
    rot: Option<(Tensor, Tensor)>,
    split: bool,
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "lora-heads"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "heads")?;
        let n = self.heads;
        let (b, t, d, out_shape) = if self.split {
            let (b, t, width) = xl.shape().dims3()?;
            let d = width / n.max(1);
            (b, t, d, Shape::from((b, n, t, d)))
        } else {
            let (b, h, t, d) = xl.shape().dims4()?;
            if h != n {
                candle_core::bail!("heads: expected {n} heads, got {h}");
            }
            (b, t, d, Shape::from((b, t, n * d)))
        };
        if n * d * t * b != x.len() {
            candle_core::bail!("heads: {} values for [{b}, {t}, {n} x {d}]", x.len());
        }
        let half = d / 2;
        let rot = match &self.rot {
            Some((c, s)) => Some(rope_tables(c, s, t, d)?),
            None => None,
        };
        let mut out = vec![0f32; x.len()];
        for bi in 0..b {
            for hi in 0..n {
                for ti in 0..t {
                    // Offsets of the vector in `[b, t, n, d]` and in `[b, n, t, d]`.
                    let seq = ((bi * t + ti) * n + hi) * d;
                    let head = ((bi * n + hi) * t + ti) * d;
                    let (src, dst) = if self.split { (seq, head) } else { (head, seq) };
                    let (src, dst) = (&x[src..src + d], &mut out[dst..dst + d]);
                    match &rot {
                        None => dst.copy_from_slice(src),
                        Some((cos, sin)) => {
                            let p = ti * half;
                            rotate(src, dst, &cos[p..p + half], &sin[p..p + half]);
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // The rotation's transpose is the rotation by the opposite angle.
        let rot = match &self.rot {
            Some((c, s)) => Some((c.clone(), s.neg()?)),
            None => None,
        };
        let inverse = Heads {
            heads: self.heads,
            rot,
            split: !self.split,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `silu(gate) * up`, the SwiGLU product, as one CPU pass.
struct SwiGlu;

/// Its backward, both operands in one pass: `[2, ..]` holding the gate's gradient
/// `g * up * silu'(gate)`, then the up projection's `g * silu(gate)`.
struct SwiGluGrad;

fn silu_f32(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-x).exp());
    (x * s, s)
}

/// The gradients of `silu(g) * u` with respect to `g` and `u`, for its gradient `dp`.
fn swiglu_grads(g: f32, u: f32, dp: f32) -> (f32, f32) {
    let (y, s) = silu_f32(g);
    // d silu / dx = s + x s (1 - s) = s + y (1 - s)
    (dp * u * (s + y * (1.0 - s)), dp * y)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "lora-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        zip_map(s1, l1, s2, l2, ["swiglu gate", "swiglu up"], |g, u| {
            silu_f32(g).0 * u
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SwiGluGrad)?;
        let part = |i: usize, t: &Tensor| t.track_op().then(|| both.get(i)).transpose();
        Ok((part(0, gate)?, part(1, up)?))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "lora-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u, dy) = (
            f32_slice(s1, l1, "swiglu gate")?,
            f32_slice(s2, l2, "swiglu up")?,
            f32_slice(s3, l3, "swiglu gradient")?,
        );
        let n = g.len();
        if u.len() != n || dy.len() != n {
            candle_core::bail!(
                "swiglu gradient: operands of {n}, {} and {} values",
                u.len(),
                dy.len()
            );
        }
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        par_rows_with(d_gate, 1, d_up, |first, d_gate, d_up| {
            for (k, (dg, du)) in d_gate.iter_mut().zip(d_up).enumerate() {
                let i = first + k;
                (*dg, *du) = swiglu_grads(g[i], u[i], dy[i]);
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `silu(gate) * up` (the SwiGLU MLP's product), with a backward: on the CPU in f32 one pass
/// each way (candle's `silu` then `mul` make five passes and four
/// temporaries for the same); elsewhere that composition.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let g = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
/// let u = Tensor::new(&[2f32, 3.0], &Device::Cpu)?;
/// let y = lora_runtime::ops::swiglu(&g, &u)?.to_vec1::<f32>()?;
/// let silu = |x: f32| x / (1.0 + (-x).exp());
/// assert!((y[0] - silu(0.5) * 2.0).abs() < 1e-6 && (y[1] - silu(-1.0) * 3.0).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape errors.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if fused_cpu(gate) && fused_cpu(up) && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    candle_nn::ops::silu(gate)? * up
}

/// `sqrt(2 / pi)`, of the tanh form of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU's tanh form and its derivative at `x`.
fn gelu_f32(x: f32) -> (f32, f32) {
    let inner = SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
    // tanh through one `exp` (glibc's `tanhf` costs several times as much); exact at the
    // saturated ends, absolute error ~1e-7 near 0, where GELU adds it to 1.
    let t = 1.0 - 2.0 / (1.0 + (2.0 * inner).exp());
    let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    (
        0.5 * x * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner,
    )
}

/// `gelu(x)` (tanh form) as one CPU pass.
struct Gelu;

/// Its backward: `g * gelu'(x)`, one pass.
struct GeluGrad;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "lora-gelu"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "gelu")?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, 1, |first, dst| {
            for (k, o) in dst.iter_mut().enumerate() {
                *o = gelu_f32(x[first + k]).0;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "lora-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        zip_map(s1, l1, s2, l2, ["gelu input", "gelu gradient"], |x, g| {
            g * gelu_f32(x).1
        })
    }
}

/// GELU in its tanh form, `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` (candle's
/// `Tensor::gelu`, GPT-2's `gelu_new`), with a backward: on the CPU in f32 one pass each way
/// (candle's backward of `gelu` composes about a dozen element-wise ops, `powf` among them);
/// elsewhere candle's.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::new(&[-1f32, 0.5, 2.0], &Device::Cpu)?;
/// let y = lora_runtime::ops::gelu(x.as_tensor())?;
/// let plain = x.as_tensor().gelu()?;
/// let diff = (y.clone() - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-6);
/// assert!(y.sum_all()?.backward()?.get(x.as_tensor()).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// A candle error.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if fused_cpu(x) && x.track_op() {
        return x.contiguous()?.apply_op1(Gelu);
    }
    x.gelu()
}

/// `f(a_i, b_i)` over two f32 inputs of one shape (named `what` in errors), one pass split
/// over the threads.
fn zip_map(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    what: [&str; 2],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (a, b) = (f32_slice(s1, l1, what[0])?, f32_slice(s2, l2, what[1])?);
    if l1.shape() != l2.shape() {
        candle_core::bail!(
            "{} {:?} and {} {:?} differ in shape",
            what[0],
            l1.dims(),
            what[1],
            l2.dims()
        );
    }
    Ok((CpuStorage::F32(map2(a, b, f)), l1.shape().clone()))
}

/// `f(a_i, b_i)` over two slices of one length, one pass split over the threads.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len().min(b.len())];
    par_rows(&mut out, 1, |first, dst| {
        for (k, o) in dst.iter_mut().enumerate() {
            *o = f(a[first + k], b[first + k]);
        }
    });
    out
}

/// A SwiGLU MLP `down(silu(x Wg^T) * (x Wu^T))` over frozen weights, as one op: the forward
/// keeps the two projections `G`, `U` for the backward and drops the product (the input of
/// `down`, which a frozen `down` does not need for the input's gradient).
struct SwiGluMlp {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    /// `(G, U)` of the forward.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

/// A `[rows, cols]` f32 weight on the CPU as a row-major matrix.
fn weight_mat<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<MatRef<'a>> {
    let (rows, cols) = layout.shape().dims2()?;
    Ok(MatRef::row_major(
        cpu_f32(storage, layout, what)?,
        rows,
        cols,
    ))
}

/// The contiguous f32 values of a tensor's storage on the CPU, or an error naming `what`.
fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{what}: not on the CPU");
    };
    f32_slice(cpu, layout, what)
}

impl SwiGluMlp {
    /// Runs `f(gate, up, down)` over the weights as row-major matrices.
    fn with_weights<R>(
        &self,
        f: impl FnOnce(MatRef<'_>, MatRef<'_>, MatRef<'_>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let ((gs, gl), (us, ul), (ds, dl)) = (
            self.gate.storage_and_layout(),
            self.up.storage_and_layout(),
            self.down.storage_and_layout(),
        );
        f(
            weight_mat(&gs, gl, "mlp gate weight")?,
            weight_mat(&us, ul, "mlp up weight")?,
            weight_mat(&ds, dl, "mlp down weight")?,
        )
    }

    /// The gradient of the input for the output gradient `dy [n, h]`.
    fn input_grad(&self, dy: &[f32], n: usize) -> candle_core::Result<Vec<f32>> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::msg("swiglu mlp: poisoned state"))?;
        let Some((g, u)) = saved.as_ref() else {
            candle_core::bail!("swiglu mlp: backward before the forward");
        };
        self.with_weights(|wg, wu, wd| {
            let (inter, hidden) = (wg.rows, wg.cols);
            // d product = dy Wd, then through SwiGLU into dG and dU.
            let mut dg = vec![0f32; n * inter];
            gemm_into(&mut dg, inter, MatRef::row_major(dy, n, hidden), wd, false)?;
            let mut du = vec![0f32; n * inter];
            par_rows_with(&mut dg, 1, &mut du, |first, dg, du| {
                for (k, (dgk, duk)) in dg.iter_mut().zip(du).enumerate() {
                    let i = first + k;
                    (*dgk, *duk) = swiglu_grads(g[i], u[i], *dgk);
                }
            });
            // dx = dG Wg + dU Wu, the second accumulated onto the first.
            let mut dx = vec![0f32; n * hidden];
            gemm_into(&mut dx, hidden, MatRef::row_major(&dg, n, inter), wg, false)?;
            gemm_into(&mut dx, hidden, MatRef::row_major(&du, n, inter), wu, true)?;
            Ok(dx)
        })
    }
}

impl CustomOp1 for SwiGluMlp {
    fn name(&self) -> &'static str {
        "lora-swiglu-mlp"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, "mlp input")?;
        let (n, hidden) = xl.shape().dims2()?;
        self.with_weights(|wg, wu, wd| {
            let inter = wg.rows;
            if wg.cols != hidden
                || wu.rows != inter
                || wu.cols != hidden
                || wd.rows != hidden
                || wd.cols != inter
            {
                candle_core::bail!(
                    "swiglu mlp: input [{n}, {hidden}], gate [{}, {}], up [{}, {}], down [{}, {}]",
                    wg.rows,
                    wg.cols,
                    wu.rows,
                    wu.cols,
                    wd.rows,
                    wd.cols
                );
            }
            let xm = MatRef::row_major(x, n, hidden);
            let mut g = vec![0f32; n * inter];
            gemm_into(&mut g, inter, xm, wg.t(), false)?;
            let mut u = vec![0f32; n * inter];
            gemm_into(&mut u, inter, xm, wu.t(), false)?;
            let p = map2(&g, &u, |g, u| silu_f32(g).0 * u);
            let mut y = vec![0f32; n * hidden];
            gemm_into(
                &mut y,
                hidden,
                MatRef::row_major(&p, n, inter),
                wd.t(),
                false,
            )?;
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::msg("swiglu mlp: poisoned state"))? = Some((g, u));
            Ok((CpuStorage::F32(y), Shape::from((n, hidden))))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let dy = cpu_f32(&storage, layout, "mlp output gradient")?;
        let dx = self.input_grad(dy, x.dim(0)?)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// The SwiGLU MLP `(silu(x Wg^T) * (x Wu^T)) Wd^T` of frozen weights `gate [i, h]`, `up [i, h]`,
/// `down [h, i]` for `x [.., h]`, with a backward to `x` only: on the CPU in f32, when `x`
/// tracks a gradient and the weights do not, one op (three gemms and one pass forward, three
/// gemms and one pass backward; the `[n, i]` product is not kept for the backward, and the
/// projections' outputs are not graph nodes that candle's backward zero-fills and adds into).
/// Otherwise the same composition of [`swiglu`] and matmuls.
///
/// # Errors
/// Shape errors.
pub fn swiglu_mlp(
    x: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> candle_core::Result<Tensor> {
    let frozen = !(gate.track_op() || up.track_op() || down.track_op());
    let cpu = [x, gate, up, down].iter().all(|t| fused_cpu(t));
    if !(frozen && cpu && x.track_op()) {
        let p = swiglu(
            &x.broadcast_matmul(&gate.t()?)?,
            &x.broadcast_matmul(&up.t()?)?,
        )?;
        return p.broadcast_matmul(&down.t()?);
    }
    let dims = x.dims().to_vec();
    let hidden = *dims.last().unwrap_or(&0);
    let flat = x.contiguous()?.reshape(((), hidden))?;
    let op = SwiGluMlp {
        gate: gate.contiguous()?,
        up: up.contiguous()?,
        down: down.contiguous()?,
        saved: Mutex::new(None),
    };
    let y = flat.apply_op1_arc(Arc::new(Box::new(op) as Box<dyn CustomOp1 + Send + Sync>))?;
    y.reshape(dims)
}

/// Runs `f(first_row, rows)` over `n` rows split into one contiguous chunk a thread.
fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let mut none = vec![(); out.len() / row_len.max(1)];
    par_rows_with(out, row_len, &mut none, |first, rows, _| f(first, rows));
}

/// [`par_rows`] with a second output of one element per row, split alike.
fn par_rows_with<T: Send, U: Send>(
    out: &mut [T],
    row_len: usize,
    per_row: &mut [U],
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    let row_len = row_len.max(1);
    let rows = (out.len() / row_len).min(per_row.len());
    // Spawning threads costs tens of microseconds: small outputs (a decoding step's) run here.
    if out.len() < 1 << 16 {
        f(0, out, per_row);
        return;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let chunks = out.chunks_mut(per * row_len).zip(per_row.chunks_mut(per));
        for (i, (chunk, side)) in chunks.enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk, side));
        }
    });
}

/// The label ids of a storage, as `usize`.
fn labels_of(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<usize>> {
    let all = match s {
        CpuStorage::U32(v) => v.iter().map(|&x| x as usize).collect::<Vec<_>>(),
        CpuStorage::I64(v) => v.iter().map(|&x| x.max(0) as usize).collect(),
        CpuStorage::U8(v) => v.iter().map(|&x| x as usize).collect(),
        _ => {
            return Err(candle_core::Error::msg(
                "cross-entropy: labels must be integers",
            ))
        }
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(all[a..b].to_vec()),
        None => Err(candle_core::Error::msg(
            "cross-entropy: labels must be contiguous",
        )),
    }
}

/// `logsumexp(row) - row[label]` of each row: the fused forward of [`cross_entropy_sum`].
struct CrossEntropy;

/// `(softmax(row) - onehot(label)) * g`: its backward.
struct CrossEntropyGrad;

/// The logits `[rows, vocab]` and the checked labels of a cross-entropy op's first two inputs.
fn ce_inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], usize, usize, Vec<usize>)> {
    let x = f32_slice(s1, l1, "cross-entropy logits")?;
    let (rows, vocab) = l1.shape().dims2()?;
    let labels = labels_of(s2, l2)?;
    check_labels(&labels, rows, vocab)?;
    Ok((x, rows, vocab, labels))
}

fn check_labels(labels: &[usize], rows: usize, vocab: usize) -> candle_core::Result<()> {
    if labels.len() != rows {
        return Err(candle_core::Error::msg(format!(
            "cross-entropy: {} labels for {rows} rows",
            labels.len()
        )));
    }
    if let Some(bad) = labels.iter().find(|&&l| l >= vocab) {
        return Err(candle_core::Error::msg(format!(
            "cross-entropy: label {bad} is outside the {vocab} classes"
        )));
    }
    Ok(())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "lora-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, rows, vocab, labels) = ce_inputs(s1, l1, s2, l2)?;
        let mut out = vec![0f32; rows];
        par_rows(&mut out, 1, |first, dst| {
            for (k, o) in dst.iter_mut().enumerate() {
                let r = first + k;
                let row = &x[r * vocab..(r + 1) * vocab];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                *o = max + sum.ln() - row[labels[r]];
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(labels, &grad.contiguous()?, &CrossEntropyGrad)?;
        Ok((Some(g), None))
    }
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "lora-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, rows, vocab, labels) = ce_inputs(s1, l1, s2, l2)?;
        let g = f32_slice(s3, l3, "cross-entropy gradient")?;
        let mut out = vec![0f32; rows * vocab];
        par_rows(&mut out, vocab, |first, dst| {
            for (k, d) in dst.chunks_exact_mut(vocab).enumerate() {
                let r = first + k;
                let row = &x[r * vocab..(r + 1) * vocab];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, v) in d.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let scale = g[r] / sum;
                for o in d.iter_mut() {
                    *o *= scale;
                }
                d[labels[r]] -= g[r];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The summed cross-entropy `sum_i (logsumexp(logits_i) - logits_i[labels_i])` of `logits
/// [n, classes]` against integer `labels [n]`, a scalar, with a backward to the logits.
///
/// On the CPU in f32 one fused pass each way (the backward writes `softmax - onehot` directly),
/// instead of candle's `log_softmax` composition, which makes several vocabulary-sized
/// temporaries; elsewhere that composition.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let logits = Var::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu)?;
/// let labels = Tensor::new(&[2u32, 0], &Device::Cpu)?;
/// let loss = lora_runtime::ops::cross_entropy_sum(logits.as_tensor(), &labels)?;
/// let expect = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln() - 3. + 3f32.ln();
/// assert!((loss.to_scalar::<f32>()? - expect).abs() < 1e-5);
/// let grad = loss.backward()?.get(logits.as_tensor()).unwrap().to_vec2::<f32>()?;
/// assert!((grad[1][0] - (1. / 3. - 1.)).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape errors; a label outside the classes.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    if fused_cpu(logits) {
        return logits
            .contiguous()?
            .apply_op2(&labels.contiguous()?, CrossEntropy)?
            .sum_all();
    }
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let labels = labels.to_dtype(DType::U32)?.unsqueeze(1)?;
    logp.gather(&labels, 1)?.sum_all()?.neg()
}

/// Logits a chunk of [`LinearCrossEntropy`] holds at once (64 MiB of f32). Each chunk repacks
/// the whole weight inside gemm: at SmolLM2's shapes (1024 x 576 by 49152 x 576, forward and
/// backward) 16 MiB chunks took 0.98 s, 64 MiB 0.76 s, one chunk of all rows 0.73 s.
const LOGIT_CHUNK_ELEMS: usize = 1 << 24;

/// `sum_i cross_entropy(hidden_i W^T, label_i)` without the `[n, vocab]` logits: the forward
/// makes them a chunk of rows at a time and, while a chunk is at hand, turns it into
/// `softmax - onehot` and multiplies it out into the gradients of the inputs that want one
/// (which the backward then only scales).
struct LinearCrossEntropy {
    /// Logits held at once ([`LOGIT_CHUNK_ELEMS`] but in tests).
    chunk_elems: usize,
    grad_hidden: bool,
    grad_weight: bool,
    /// `(d/d hidden, d/d weight)` of the loss, made by the forward.
    saved: Mutex<Option<(Option<Tensor>, Option<Tensor>)>>,
}

/// One row of logits: returns `logsumexp(row) - row[label]` and, with `grad`, overwrites the
/// row with `softmax(row) - onehot(label)`.
fn cross_entropy_row(row: &mut [f32], label: usize, grad: bool) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let target = row[label];
    if !grad {
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        return max + sum.ln() - target;
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1. / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    row[label] -= 1.;
    max + sum.ln() - target
}

impl CustomOp3 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "lora-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = f32_slice(s1, l1, "linear cross-entropy hidden states")?;
        let w = f32_slice(s2, l2, "linear cross-entropy weight")?;
        let (n, d) = l1.shape().dims2()?;
        let (vocab, wd) = l2.shape().dims2()?;
        if wd != d {
            candle_core::bail!(
                "linear cross-entropy: hidden states [{n}, {d}], weight [{vocab}, {wd}]"
            );
        }
        let labels = labels_of(s3, l3)?;
        check_labels(&labels, n, vocab)?;
        let grad = self.grad_hidden || self.grad_weight;
        let w_mat = MatRef::row_major(w, vocab, d);
        let chunk = (self.chunk_elems / vocab.max(1)).clamp(1, n.max(1));
        let mut logits = vec![0f32; chunk * vocab];
        let mut losses = vec![0f32; chunk];
        let mut grad_h = vec![0f32; if self.grad_hidden { n * d } else { 0 }];
        let mut grad_w = vec![0f32; if self.grad_weight { vocab * d } else { 0 }];
        let mut total = 0f64;
        for first in (0..n).step_by(chunk) {
            let m = chunk.min(n - first);
            let hc = MatRef::row_major(&h[first * d..(first + m) * d], m, d);
            let lc = &mut logits[..m * vocab];
            gemm_into(lc, vocab, hc, w_mat.t(), false)?;
            let labels = &labels[first..first + m];
            par_rows_with(lc, vocab, &mut losses[..m], |r0, rows, out| {
                for (k, (row, loss)) in rows.chunks_exact_mut(vocab).zip(out).enumerate() {
                    *loss = cross_entropy_row(row, labels[r0 + k], grad);
                }
            });
            total += losses[..m].iter().map(|&l| f64::from(l)).sum::<f64>();
            let g = MatRef::row_major(lc, m, vocab);
            if self.grad_hidden {
                gemm_into(&mut grad_h[first * d..(first + m) * d], d, g, w_mat, false)?;
            }
            if self.grad_weight {
                gemm_into(&mut grad_w, d, g.t(), hc, true)?;
            }
        }
        let cpu = Device::Cpu;
        let gh = self
            .grad_hidden
            .then(|| Tensor::from_vec(grad_h, (n, d), &cpu))
            .transpose()?;
        let gw = self
            .grad_weight
            .then(|| Tensor::from_vec(grad_w, (vocab, d), &cpu))
            .transpose()?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::msg("linear cross-entropy: poisoned state"))? =
            Some((gh, gw));
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        _hidden: &Tensor,
        _weight: &Tensor,
        _labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::msg("linear cross-entropy: poisoned state"))?
            .clone();
        let Some((gh, gw)) = saved else {
            candle_core::bail!("linear cross-entropy: backward before the forward");
        };
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scale = |t: Option<Tensor>| -> candle_core::Result<Option<Tensor>> {
            match t {
                Some(t) if g != 1.0 => Ok(Some((t * g)?)),
                t => Ok(t),
            }
        };
        Ok((scale(gh)?, scale(gw)?, None))
    }
}

/// `sum_i cross_entropy(hidden_i W^T, labels_i)` for `hidden [n, d]`, `weight [vocab, d]` and
/// integer `labels [n]`: an LM head and its summed loss in one op, a scalar with a backward to
/// `hidden` and `weight`.
///
/// On the CPU in f32 the `[n, vocab]` logits are never held whole: the forward works a chunk of
/// rows at a time (64 MiB of logits), and while a chunk is at hand it also computes the
/// gradients of the inputs that track one (which the backward only scales). The logits and
/// their gradient (two `[n, vocab]` tensors, 400 MB for 1024 tokens of a 49152-token
/// vocabulary) are never allocated. Elsewhere, the product and [`cross_entropy_sum`] in f32.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let dev = Device::Cpu;
/// let h = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4), &dev)?)?;
/// let w = Tensor::randn(0f32, 1., (5, 4), &dev)?;
/// let labels = Tensor::new(&[4u32, 0, 2], &dev)?;
/// let fused = lora_runtime::ops::linear_cross_entropy_sum(h.as_tensor(), &w, &labels)?;
/// let logits = h.as_tensor().matmul(&w.t()?)?;
/// let plain = lora_runtime::ops::cross_entropy_sum(&logits, &labels)?;
/// let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
/// assert!((a - b).abs() < 1e-5 * b.abs().max(1.));
/// assert!(fused.backward()?.get(h.as_tensor()).is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// # Errors
/// Shape errors; a label outside the vocabulary.
pub fn linear_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
) -> candle_core::Result<Tensor> {
    chunked_linear_cross_entropy_sum(hidden, weight, labels, LOGIT_CHUNK_ELEMS)
}

/// [`linear_cross_entropy_sum`] holding `chunk_elems` logits at once.
fn chunked_linear_cross_entropy_sum(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk_elems: usize,
) -> candle_core::Result<Tensor> {
    if fused_cpu(hidden) && fused_cpu(weight) {
        let op = LinearCrossEntropy {
            chunk_elems,
            grad_hidden: hidden.track_op(),
            grad_weight: weight.track_op(),
            saved: Mutex::new(None),
        };
        return hidden.contiguous()?.apply_op3_arc(
            &weight.contiguous()?,
            &labels.contiguous()?,
            Arc::new(Box::new(op) as Box<dyn CustomOp3 + Send + Sync>),
        );
    }
    let logits = hidden.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
    cross_entropy_sum(&logits, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;
    use candle_core::Var;

    /// The gradients of `sum(y * k)`: a loss that weights every output differently.
    fn weighted_grads(y: &Tensor, k: &Tensor) -> candle_core::backprop::GradStore {
        (y * k).unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn fused_ops_match_the_composed_ones_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 16), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 16, &dev).unwrap()).unwrap();
        let eps = 1e-5;
        // Composed references.
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let norm_ref = x.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap();
        let soft_ref = candle_nn::ops::softmax(&norm_ref, D::Minus1).unwrap();
        let norm = rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
        let soft = softmax_last_dim(&norm).unwrap();
        assert!(max_diff(&norm, &norm_ref) < 1e-5);
        assert!(max_diff(&soft, &soft_ref) < 1e-6);
        // A loss that weights every output differently.
        let k = Tensor::randn(0f32, 1.0, (3, 4, 16), &dev).unwrap();
        let g = weighted_grads(&soft, &k);
        let g_ref = weighted_grads(&soft_ref, &k);
        for t in [x.as_tensor(), w.as_tensor()] {
            let (a, b) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
            assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
        }
        // Layer norm: fused with a backward against the composition.
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 16, &dev).unwrap()).unwrap();
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let centered = x.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let ln_ref = centered
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let ln = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), eps).unwrap();
        assert!(max_diff(&ln, &ln_ref) < 1e-5);
        let g = weighted_grads(&ln, &k);
        let g_ref = weighted_grads(&ln_ref, &k);
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            let (a, r) = (g.get(t).unwrap(), g_ref.get(t).unwrap());
            assert!(max_diff(a, r) < 1e-4, "{}", max_diff(a, r));
        }
        // Rotary embedding: the composed form (with a graph) equals candle's fused kernel.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev).unwrap()).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let fused = candle_nn::rotary_emb::rope(q.as_tensor(), &cos, &sin).unwrap();
        let composed = rope(q.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let gq = composed
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // A rotation keeps norms: d|R q|^2 / dq = 2 q.
        let want = q.as_tensor().affine(2.0, 0.0).unwrap();
        assert!(max_diff(gq.get(q.as_tensor()).unwrap(), &want) < 1e-5);
        // And against the composition's gradient under a weighting that is not rotation-invariant.
        let (x1, x2) = (
            q.as_tensor().narrow(D::Minus1, 0, 4).unwrap(),
            q.as_tensor().narrow(D::Minus1, 4, 4).unwrap(),
        );
        let first = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
        let second = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
        let reference = Tensor::cat(&[first, second], D::Minus1).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev).unwrap();
        let g1 = weighted_grads(&composed, &weights);
        let g2 = weighted_grads(&reference, &weights);
        let (a, b) = (
            g1.get(q.as_tensor()).unwrap(),
            g2.get(q.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-6, "{}", max_diff(a, b));
        // SwiGLU: fused against candle's silu * up, values and both gradients.
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (5, 7), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap()).unwrap();
        let k = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let composed = (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-6);
        let g1 = weighted_grads(&fused, &k);
        let g2 = weighted_grads(&composed, &k);
        for t in [g.as_tensor(), u.as_tensor()] {
            let (a, b) = (g1.get(t).unwrap(), g2.get(t).unwrap());
            assert!(max_diff(a, b) < 1e-5, "{}", max_diff(a, b));
        }
        // Without a graph, candle's fused kernels: the same values.
        let plain = rms_norm(&x.as_tensor().detach(), &w.as_tensor().detach(), eps).unwrap();
        assert!(max_diff(&plain, &norm) < 1e-5);
    }

    #[test]
    fn fused_cross_entropy_matches_log_softmax_with_gradients() {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f32, 3.0, (7, 300), &dev).unwrap()).unwrap();
        let labels = Tensor::new(&[0u32, 299, 5, 17, 5, 100, 250], &dev).unwrap();
        let fused = cross_entropy_sum(logits.as_tensor(), &labels).unwrap();
        let logp = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1).unwrap();
        let composed = logp
            .gather(&labels.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-4);
        // Scaled, so the incoming gradient is not 1.
        let g = (fused * 0.5).unwrap().backward().unwrap();
        let g_ref = (composed * 0.5).unwrap().backward().unwrap();
        let (a, b) = (
            g.get(logits.as_tensor()).unwrap(),
            g_ref.get(logits.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-6, "{}", max_diff(a, b));
        let bad = Tensor::new(&[0u32, 300, 0, 0, 0, 0, 0], &dev).unwrap();
        let err = cross_entropy_sum(logits.as_tensor(), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 300 is outside the 300 classes"),
            "{err}"
        );
    }

    #[test]
    fn linear_cross_entropy_matches_the_head_then_the_loss_across_chunks() {
        let dev = Device::Cpu;
        // 120 rows of a 40000-word vocabulary in chunks of 50 rows: 50, 50, then 20.
        let (n, d, vocab) = (120, 16, 40_000);
        let fused_sum = |h: &Tensor, w: &Tensor, labels: &Tensor| {
            chunked_linear_cross_entropy_sum(h, w, labels, 50 * vocab)
        };
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, d), &dev).unwrap()).unwrap();
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 331 + 7) % vocab as u32)
            .collect();
        let labels = Tensor::new(ids.as_slice(), &dev).unwrap();
        let fused = fused_sum(h.as_tensor(), w.as_tensor(), &labels).unwrap();
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let composed = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&labels.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let g = (fused * 0.5).unwrap().backward().unwrap();
        let g_ref = (composed * 0.5).unwrap().backward().unwrap();
        // Sums in another order than the composed backward: d/d hidden adds 40000 products
        // `p_j w_j` (|w| ~ 0.5; f32's worst case k * eps * 0.5 = 1.2e-3), d/d weight 120
        // products `(p - onehot) h` (|h| up to ~4: worst case 120 * eps * 4 = 2.9e-5).
        for (what, v, tol) in [
            ("hidden", h.as_tensor(), 1e-4),
            ("weight", w.as_tensor(), 3e-5),
        ] {
            let (x, y) = (g.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(max_diff(x, y) < tol, "{what}: {}", max_diff(x, y));
        }
        // Detached inputs (evaluation): the same loss, no gradient anywhere.
        let eval = fused_sum(&h.as_tensor().detach(), &w.as_tensor().detach(), &labels).unwrap();
        assert_eq!(eval.to_scalar::<f32>().unwrap(), a);
        assert!(eval.backward().unwrap().get(h.as_tensor()).is_none());
        // Only the weight tracked (a frozen body): its gradient alone.
        let g = fused_sum(&h.as_tensor().detach(), w.as_tensor(), &labels)
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(h.as_tensor()).is_none());
        let gw = g.get(w.as_tensor()).unwrap();
        assert!(max_diff(&(gw * 0.5).unwrap(), g_ref.get(w.as_tensor()).unwrap()) < 3e-5);
        let bad = Tensor::new(&[vocab as u32; 120], &dev).unwrap();
        let err = linear_cross_entropy_sum(h.as_tensor(), w.as_tensor(), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 40000 is outside the 40000 classes"),
            "{err}"
        );
        let err = linear_cross_entropy_sum(
            h.as_tensor(),
            &w.as_tensor().narrow(1, 0, 8).unwrap(),
            &labels,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("weight [40000, 8]"), "{err}");
    }

    #[test]
    fn split_and_merge_heads_match_the_composed_layout_with_gradients() {
        let dev = Device::Cpu;
        let (b, t, n, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, n * d), &dev).unwrap()).unwrap();
        let angles = Tensor::randn(0f32, 1.0, (t, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let k = Tensor::randn(0f32, 1.0, (b, t, n * d), &dev).unwrap();
        let kh = Tensor::randn(0f32, 1.0, (b, n, t, d), &dev).unwrap();
        for rot in [None, Some((&cos, &sin))] {
            let fused = split_heads(x.as_tensor(), n, rot).unwrap();
            let plain = x
                .as_tensor()
                .reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let plain = match rot {
                Some((c, s)) => {
                    let (x1, x2) = (
                        plain.narrow(3, 0, d / 2).unwrap(),
                        plain.narrow(3, d / 2, d / 2).unwrap(),
                    );
                    let first =
                        (x1.broadcast_mul(c).unwrap() - x2.broadcast_mul(s).unwrap()).unwrap();
                    let second =
                        (x2.broadcast_mul(c).unwrap() + x1.broadcast_mul(s).unwrap()).unwrap();
                    Tensor::cat(&[first, second], 3).unwrap()
                }
                None => plain.contiguous().unwrap(),
            };
            assert!(max_diff(&fused, &plain) < 1e-6);
            let (a, r) = (weighted_grads(&fused, &kh), weighted_grads(&plain, &kh));
            let (ga, gr) = (a.get(x.as_tensor()).unwrap(), r.get(x.as_tensor()).unwrap());
            assert!(max_diff(ga, gr) < 1e-5, "{}", max_diff(ga, gr));
        }
        // merge_heads: the inverse layout, here from attention's grouped `[b, kv, g * t, d]`.
        let heads =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, 1, n * t, d), &dev).unwrap()).unwrap();
        let fused = merge_heads(heads.as_tensor(), n).unwrap();
        let plain = heads
            .as_tensor()
            .reshape((b, n, t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, n * d))
            .unwrap();
        assert_eq!(max_diff(&fused, &plain), 0.0);
        let (a, r) = (weighted_grads(&fused, &k), weighted_grads(&plain, &k));
        let (ga, gr) = (
            a.get(heads.as_tensor()).unwrap(),
            r.get(heads.as_tensor()).unwrap(),
        );
        assert_eq!(max_diff(ga, gr), 0.0);
        let err = split_heads(x.as_tensor(), 5, None).unwrap_err().to_string();
        assert!(err.contains("24 features are not 5 heads"), "{err}");
    }

    #[test]
    fn fused_gelu_matches_candles_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (6, 300), &dev).unwrap())).unwrap();
        let k = Tensor::randn(0f32, 1.0, (6, 300), &dev).unwrap();
        let (fused, plain) = (gelu(x.as_tensor()).unwrap(), x.as_tensor().gelu().unwrap());
        assert!(max_diff(&fused, &plain) < 1e-6);
        let (a, r) = (weighted_grads(&fused, &k), weighted_grads(&plain, &k));
        let (ga, gr) = (a.get(x.as_tensor()).unwrap(), r.get(x.as_tensor()).unwrap());
        // candle's backward uses 6-digit constants (0.797885, 0.0356774, ...): |k| ~ 3 times
        // their relative error 1e-6.
        assert!(max_diff(ga, gr) < 1e-5, "{}", max_diff(ga, gr));
    }

    #[test]
    fn swiglu_mlp_matches_the_composition_with_the_input_gradient() {
        let dev = Device::Cpu;
        let (n, h, i) = (2 * 37, 24, 40);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, n / 2, h), &dev).unwrap()).unwrap();
        let w = |r, c| (Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap() * 0.2).unwrap();
        let (gate, up, down) = (w(i, h), w(i, h), w(h, i));
        let k = Tensor::randn(0f32, 1.0, (2, n / 2, h), &dev).unwrap();
        let fused = swiglu_mlp(x.as_tensor(), &gate, &up, &down).unwrap();
        let xs = x.as_tensor();
        let p = swiglu(
            &xs.broadcast_matmul(&gate.t().unwrap()).unwrap(),
            &xs.broadcast_matmul(&up.t().unwrap()).unwrap(),
        )
        .unwrap();
        let plain = p.broadcast_matmul(&down.t().unwrap()).unwrap();
        assert_eq!(fused.dims(), plain.dims());
        assert!(max_diff(&fused, &plain) < 1e-5);
        let (a, r) = (weighted_grads(&fused, &k), weighted_grads(&plain, &k));
        let (ga, gr) = (a.get(xs).unwrap(), r.get(xs).unwrap());
        assert!(max_diff(ga, gr) < 1e-5, "{}", max_diff(ga, gr));
        let err = swiglu_mlp(x.as_tensor(), &gate, &up, &w(h, i + 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("down [24, 41]"), "{err}");
    }
}
