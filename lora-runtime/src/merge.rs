//! Merging a model's active adapters into its weights and back: all-or-nothing, exact unmerge.
//!
//! Each function here is the body of a verb of [`LoraModelExt`](crate::LoraModelExt); the
//! per-layer work is [`LoraLayer::prepare_merge`](crate::LoraLayer::prepare_merge) and friends.

use crate::error::{Error, Result};
use crate::model::{layers, prepare_then_commit, LoraModel, ModulePath};

/// Folds every layer's active adapter into its weight, or changes nothing.
pub(crate) fn merge<M: LoraModel + ?Sized>(model: &mut M) -> Result<()> {
    let merged = prepare_then_commit(
        model,
        |_, layer, _| {
            if layer.is_merged() {
                return Err(crate::LayerError::Merged);
            }
            match layer.adapter() {
                Some(_) => layer.prepare_merge().map(Some),
                None => Ok(None),
            }
        },
        |layer, weight| layer.commit_merge(weight),
    )?;
    if merged == 0 {
        return Err(Error::NoAdapter {
            what: "merge".into(),
        });
    }
    Ok(())
}

/// Whether any layer is merged.
pub(crate) fn is_merged<M: LoraModel + ?Sized>(model: &M) -> bool {
    layers(model).iter().any(|(_, l, _)| l.is_merged())
}

/// Restores every merged weight bit for bit.
pub(crate) fn unmerge<M: LoraModel + ?Sized>(model: &mut M) -> Result<()> {
    if !is_merged(model) {
        return Err(Error::NotMerged);
    }
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |p, l, _| {
        if l.is_merged() {
            l.revert_merge().map_err(|e| e.at(p.as_str()))?;
        }
        Ok(())
    })
}

/// Merges (unless merged already), then drops adapters and original weights.
pub(crate) fn merge_and_unload<M: LoraModel + ?Sized>(model: &mut M) -> Result<()> {
    if !is_merged(model) {
        merge(model)?;
    }
    model.visit_lora_layers_mut(&mut ModulePath::new(), &mut |_, l, _| {
        l.unload();
        Ok(())
    })
}
