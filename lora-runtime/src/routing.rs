//! [`Routing`]: the stacked factors of a mixed-adapter batch, in which every row of a batch runs
//! its own adapter (or none) in one pass.
//!
//! Serving systems (Punica, S-LoRA) batch requests for different adapters together; PEFT loops
//! over sub-batches per adapter. Here the `A` and `B` of a layer's adapters are stacked once
//! (ranks padded with zeros to the largest, scaling folded into `B`, and a zero slot for rows
//! without adapter), each row gathers its slot, and two batched matmuls compute the LoRA term
//! of the whole batch: the BGMV idea, with candle's batched matmul as the kernel. The model-level
//! verb is in [`batched`](crate::batched).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::adapter::{Adapter, AdapterSet};
use crate::error::{LayerError, LayerResult};
use crate::kernels::RoutedFactors;

/// The stacked factors of one layer's adapters and the rows' slots.
///
/// Every adapter of the layer has a block of `r_max` columns: `A_all [S r_max, in]` and the
/// scaled `B_all [out, S r_max]`. Row `i`'s LoRA term is `((x_i A_all^T) * mask_i) B_all^T`,
/// where `mask_i` is 1 on the block of the row's adapter and 0 elsewhere: two dense matmuls
/// for the whole batch (the second fused with the base matmul into one output buffer where the
/// layer can, see `LoraLinear`), whatever the mix of adapters. The stacks depend only on the
/// layer's adapters, the mask only on the rows: [`with_rows`](Self::with_rows) reuses the
/// stacks when only the assignment changes (a serving loop, every step).
#[derive(Debug, Clone)]
pub struct Routing {
    /// The adapters of the stacks, in slot order.
    names: Vec<String>,
    /// `[S r_max, in]`.
    a: Tensor,
    /// `[out, S r_max]`, scaling folded in.
    b: Tensor,
    /// `[rows, S r_max]`: 1 on each row's block; only where the tensor path needs it (the CPU
    /// kernel reads `slots`).
    mask: Option<Tensor>,
    r_max: usize,
    /// Each row's block (`None`: the base alone).
    slots: Arc<Vec<Option<usize>>>,
    /// The stacks as f32 values, for the CPU kernel (f32 CPU layers only).
    cpu: Option<RoutedFactors>,
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
    /// Stacks every adapter of `set` for a layer of `target`'s shape and routes `rows`: row `i`
    /// uses the adapter `rows[i]`, `None` the base alone.
    ///
    /// DoRA adapters are refused for the rows (a DoRA adapter rescales its rows' base output,
    /// which the stacks do not); DoRA adapters no row uses may sit in the set.
    ///
    /// # Errors
    /// [`LayerError::UnknownAdapter`] for a name `set` lacks, [`LayerError::Refused`] for a row
    /// of a DoRA adapter; a candle error.
    pub fn new(
        set: &AdapterSet,
        rows: &[Option<&str>],
        target: RoutingTarget<'_>,
    ) -> LayerResult<Self> {
        let RoutingTarget {
            inp,
            out,
            dtype,
            device,
        } = target;
        let names: Vec<String> = set.names().into_iter().map(str::to_string).collect();
        let adapters: Vec<&Adapter> = names.iter().filter_map(|n| set.get(n)).collect();
        let r_max = adapters.iter().map(|a| a.rank()).max().unwrap_or(1);
        let mut a_blocks = Vec::with_capacity(adapters.len());
        let mut b_blocks = Vec::with_capacity(adapters.len());
        for ad in adapters {
            let pad = r_max - ad.rank();
            let a = ad.effective_a()?.detach().to_dtype(dtype)?;
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
            a_blocks.push(a);
            b_blocks.push(b);
        }
        let (a, b) = if a_blocks.is_empty() {
            (
                Tensor::zeros((r_max, inp), dtype, device)?,
                Tensor::zeros((out, r_max), dtype, device)?,
            )
        } else {
            (
                Tensor::cat(&a_blocks, 0)?.contiguous()?,
                Tensor::cat(&b_blocks, 1)?.contiguous()?,
            )
        };
        let cpu = if dtype == DType::F32 && device.is_cpu() {
            Some(RoutedFactors {
                a: Arc::new(a.flatten_all()?.to_vec1::<f32>()?),
                bt: Arc::new(b.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?),
                r: r_max,
            })
        } else {
            None
        };
        let stacks = Self {
            names,
            a,
            b,
            mask: None,
            r_max,
            slots: Arc::new(Vec::new()),
            cpu,
        };
        stacks.with_rows(set, rows)
    }

    /// The same stacks with another assignment of rows to adapters (only the row slots, and
    /// the mask off the CPU, are built).
    ///
    /// # Errors
    /// [`LayerError::UnknownAdapter`] for a name the stacks lack, [`LayerError::Refused`] for a
    /// row of a DoRA or AdaLoRA adapter; a candle error.
    pub fn with_rows(&self, set: &AdapterSet, rows: &[Option<&str>]) -> LayerResult<Self> {
        // Each name once (a batch repeats a few adapters over many rows).
        let mut distinct: Vec<&str> = rows.iter().flatten().copied().collect();
        distinct.sort_unstable();
        distinct.dedup();
        // A DoRA adapter rescales the base output of its rows as well: not a term the stacks
        // can add. Refused rather than run as plain LoRA. AdaLoRA adapters are not routed
        // either (only plain LoRA is tested there).
        for name in &distinct {
            let kind = match set.get(name) {
                Some(a) if a.is_dora() => "a DoRA",
                Some(a) if a.is_adalora() => "an AdaLoRA",
                _ => continue,
            };
            return Err(LayerError::Refused(format!(
                "adapter `{name}` is {kind} adapter: mixed-adapter batches support plain LoRA adapters only; run its rows in a batch of their own with the adapter active (or merge it)"
            )));
        }
        let index: HashMap<&str, usize> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let slots =
            rows.iter()
                .map(|row| match row {
                    None => Ok(None),
                    Some(name) => index.get(name).copied().map(Some).ok_or_else(|| {
                        LayerError::UnknownAdapter {
                            name: (*name).to_string(),
                            known: set.names().into_iter().map(str::to_string).collect(),
                        }
                    }),
                })
                .collect::<LayerResult<Vec<_>>>()?;
        let mut next = Self {
            slots: Arc::new(slots),
            mask: None,
            ..self.clone()
        };
        // The CPU kernel reads the slots; the mask is for the tensor path only.
        if next.cpu.is_none() {
            next.mask = Some(next.build_mask()?);
        }
        Ok(next)
    }

    /// `[rows, S r_max]`: 1 on each row's block.
    fn build_mask(&self) -> candle_core::Result<Tensor> {
        let width = self.a.dim(0)?;
        let mut mask = vec![0f32; self.slots.len() * width];
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(slot) = slot {
                let start = i * width + slot * self.r_max;
                mask[start..start + self.r_max].fill(1.0);
            }
        }
        Tensor::from_vec(mask, (self.slots.len(), width), self.a.device())?.to_dtype(self.a.dtype())
    }

    /// The mask, built now when the routing was made for the CPU kernel.
    fn mask(&self) -> candle_core::Result<Tensor> {
        match &self.mask {
            Some(m) => Ok(m.clone()),
            None => self.build_mask(),
        }
    }

    /// Whether the stacks hold exactly the adapters called `names` (sorted), so that
    /// [`with_rows`](Self::with_rows) may reuse them.
    pub fn stacks(&self, names: &[&str]) -> bool {
        self.names.len() == names.len() && self.names.iter().zip(names).all(|(a, b)| a == b)
    }

    /// The CPU kernel's inputs: the stacks as f32 values and each row's block, when the layer
    /// is f32 on the CPU.
    pub(crate) fn cpu_factors(&self) -> Option<(&RoutedFactors, &Arc<Vec<Option<usize>>>)> {
        self.cpu.as_ref().map(|c| (c, &self.slots))
    }

    /// The stacked, scaled `B_all [out, S r_max]`.
    pub fn b_all(&self) -> &Tensor {
        &self.b
    }

    /// The masked hidden product `(x A_all^T) * mask`, `[n, S r_max]`, for `x [n, in]` whose
    /// `n = rows * t` positions come row by row.
    ///
    /// # Errors
    /// When `n` is not a multiple of the routing's rows; shape errors.
    pub fn hidden(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _) = x2.dims2()?;
        let rows = self.slots.len();
        if rows == 0 || n % rows != 0 {
            candle_core::bail!(
                "mixed-adapter batch: the input has {n} positions, not a multiple of the {rows} row adapters set"
            );
        }
        let t = n / rows;
        let width = self.a.dim(0)?;
        let h = x2.to_dtype(self.a.dtype())?.matmul(&self.a.t()?)?;
        h.reshape((rows, t, width))?
            .broadcast_mul(&self.mask()?.unsqueeze(1)?)?
            .reshape((n, width))
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
        if b != self.slots.len() {
            candle_core::bail!(
                "mixed-adapter batch: the input has {b} rows but {} row adapters were set",
                self.slots.len()
            );
        }
        let n = x.elem_count() / inp.max(1);
        let h = self.hidden(&x.reshape((n, inp))?)?;
        let d = h.matmul(&self.b.t()?)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = d.dim(1)?;
        }
        d.reshape(out_dims)?.to_dtype(x.dtype())
    }

    /// The number of rows routed.
    pub fn rows(&self) -> candle_core::Result<usize> {
        Ok(self.slots.len())
    }
}
