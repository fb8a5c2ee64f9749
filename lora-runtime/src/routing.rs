//! [`Routing`]: the stacked factors of a mixed-adapter batch, in which every row of a batch runs
//! its own adapter (or none) in one pass.
//!
//! Serving systems (Punica, S-LoRA) batch requests for different adapters together; PEFT loops
//! over sub-batches per adapter. Here the `A` and `B` of a layer's adapters are stacked once
//! (ranks padded with zeros to the largest, scaling folded into `B`, and a zero slot for rows
//! without adapter), each row gathers its slot, and two batched matmuls compute the LoRA term
//! of the whole batch: the BGMV idea, with candle's batched matmul as the kernel. The model-level
//! verb is in [`batched`](crate::batched).

use candle_core::{DType, Device, Tensor};

use crate::adapter::{Adapter, AdapterSet};
use crate::error::{LayerError, LayerResult};

/// The stacked factors of one layer's adapters and the rows' slots.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Slot per batch row, `u32 [b]`; slot 0 is "no adapter".
    rows: Tensor,
    /// `[slots, r_max, in]`.
    a: Tensor,
    /// `(s * B)^T`, `[slots, r_max, out]`, contiguous: the second batched matmul then reads
    /// its right operand row-major (about 3x faster than through a transposed view at t = 1).
    b: Tensor,
}

/// The shape and storage of the layer a [`Routing`] is for.
#[derive(Debug, Clone, Copy)]
pub struct RoutingTarget<'a> {
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// The dtype of the LoRA branch.
    pub dtype: DType,
    /// The layer's device.
    pub device: &'a Device,
}

impl Routing {
    /// Stacks the adapters of `set` that `rows` name, for a layer of `target`'s shape: row `i`
    /// uses the adapter `rows[i]`, `None` the base alone.
    ///
    /// # Errors
    /// [`LayerError::UnknownAdapter`] for a name `set` lacks; a candle error.
    pub fn new(
        set: &AdapterSet,
        rows: &[Option<&str>],
        target: RoutingTarget<'_>,
    ) -> LayerResult<Self> {
        let mut used: Vec<&Adapter> = Vec::new();
        let mut used_names: Vec<&str> = Vec::new();
        let mut slots = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(name) = row else {
                slots.push(0u32);
                continue;
            };
            let Some(ad) = set.get(name) else {
                return Err(LayerError::UnknownAdapter {
                    name: (*name).to_string(),
                    known: set.names().into_iter().map(str::to_string).collect(),
                });
            };
            let slot = match used_names.iter().position(|u| u == name) {
                Some(i) => i,
                None => {
                    used_names.push(name);
                    used.push(ad);
                    used.len() - 1
                }
            };
            slots.push(slot as u32 + 1);
        }
        let RoutingTarget {
            inp,
            out,
            dtype,
            device,
        } = target;
        let r_max = used.iter().map(|a| a.rank()).max().unwrap_or(1);
        let mut a_slots = vec![Tensor::zeros((1, r_max, inp), dtype, device)?];
        let mut b_slots = vec![Tensor::zeros((1, out, r_max), dtype, device)?];
        for ad in used {
            let pad = r_max - ad.rank();
            let a = ad.a().as_tensor().detach().to_dtype(dtype)?;
            let b = ad
                .b()
                .as_tensor()
                .detach()
                .to_dtype(dtype)?
                .affine(ad.scaling(), 0.0)?;
            let (a, b) = if pad > 0 {
                (
                    Tensor::cat(&[a, Tensor::zeros((pad, inp), dtype, device)?], 0)?,
                    Tensor::cat(&[b, Tensor::zeros((out, pad), dtype, device)?], 1)?,
                )
            } else {
                (a, b)
            };
            a_slots.push(a.unsqueeze(0)?);
            b_slots.push(b.unsqueeze(0)?);
        }
        let n = slots.len();
        Ok(Self {
            rows: Tensor::from_vec(slots, n, device)?,
            a: Tensor::cat(&a_slots, 0)?,
            b: Tensor::cat(&b_slots, 0)?.transpose(1, 2)?.contiguous()?,
        })
    }

    /// The LoRA term for `x [b, .., in]` (row `i` with its slot's adapter), shape `[b, .., out]`.
    ///
    /// # Errors
    /// When `x` has another number of rows than the routing, or another width than the layer.
    pub fn term(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let (Some(&b), Some(&inp)) = (dims.first(), dims.last()) else {
            candle_core::bail!("mixed-adapter batch: the input is a scalar");
        };
        if b != self.rows.dim(0)? {
            candle_core::bail!(
                "mixed-adapter batch: the input has {b} rows but {} row adapters were set",
                self.rows.dim(0)?
            );
        }
        let t = x.elem_count() / (b * inp).max(1);
        let x3 = x.reshape((b, t, inp))?.to_dtype(self.a.dtype())?;
        let a = self.a.index_select(&self.rows, 0)?; // [b, r, in]
        let bt = self.b.index_select(&self.rows, 0)?; // [b, r, out]
        let h = x3.matmul(&a.transpose(1, 2)?)?; // [b, t, r]
        let d = h.matmul(&bt)?; // [b, t, out]
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = d.dim(2)?;
        }
        d.reshape(out_dims)?.to_dtype(x.dtype())
    }
}
