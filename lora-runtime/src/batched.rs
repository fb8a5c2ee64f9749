//! Mixed-adapter batches for a whole model: row `i` of every layer's input runs the adapter
//! `rows[i]`. The stacking and the batched matmuls are in [`routing`](crate::routing).

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::model::{adapter_names, prepare_then_commit, LoraModel};
use crate::registry::refuse_if_merged;

/// Routes the rows of the next forwards of every layer (`None`: back to the active adapter).
pub(crate) fn set_batch_adapters<M: LoraModel + ?Sized>(
    model: &mut M,
    rows: Option<&[Option<&str>]>,
) -> Result<()> {
    let Some(rows) = rows else {
        prepare_then_commit(model, |_, _, _| Ok(Some(())), |l, ()| l.set_routing(None))?;
        return Ok(());
    };
    let known = adapter_names(model);
    let known_set: HashSet<&str> = known.iter().map(String::as_str).collect();
    if let Some(bad) = rows.iter().flatten().find(|n| !known_set.contains(*n)) {
        return Err(Error::UnknownAdapter {
            name: (*bad).to_string(),
            known,
        });
    }
    refuse_if_merged(model)?;
    prepare_then_commit(
        model,
        |_, layer, _| {
            // A layer without one of the adapters runs the base for those rows.
            let names: HashSet<&str> = layer.adapter_names().into_iter().collect();
            let local: Vec<Option<&str>> = rows
                .iter()
                .map(|r| r.filter(|n| names.contains(n)))
                .collect();
            layer.prepare_routing(&local).map(Some)
        },
        |layer, routing| layer.set_routing(Some(routing)),
    )?;
    Ok(())
}
