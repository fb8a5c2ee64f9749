//! Binding a read adapter to a model: base fingerprints, factors against each layer, and the
//! `load_adapter` verb, which changes the model only after every check passed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Var;

use super::{AdapterFile, LoadOptions};
use crate::adapter::Adapter;
use crate::error::{Error, Factor, LayerError, Result};
use crate::fingerprint::BaseFingerprint;
use crate::layer::{install_default, LoraLayer};
use crate::layout::FactorNames;
use crate::model::{layers, parallel_map, prepare_then_commit, LoraModel};

impl AdapterFile {
    /// Checks the recorded [`BaseFingerprint`]s against the model's LoRA layers
    /// (`(module path, layer)`), each of which must be unmerged. Modules without a fingerprint
    /// (every module of a PEFT adapter) and modules the model lacks pass: the latter are
    /// refused by [`into_adapters`](Self::into_adapters).
    ///
    /// # Errors
    /// [`Error::BaseMismatch`] naming the first module whose base weight differs.
    pub fn verify_base(&self, layers: &[(&str, &dyn LoraLayer)]) -> Result<()> {
        let checked: Vec<(&str, &dyn LoraLayer)> = layers
            .iter()
            .filter(|(p, _)| self.base_fingerprints.contains_key(*p))
            .copied()
            .collect();
        // Hashing is memory-bound and per layer: in parallel (each layer keeps its fingerprint).
        let found = parallel_map(&checked, |(p, layer)| {
            layer.base_fingerprint().map_err(|e| e.at(p))
        });
        for ((module, _), found) in checked.iter().zip(found) {
            self.check_base(module, &found?)?;
        }
        Ok(())
    }

    /// Compares the fingerprint recorded for `module` (if any) with `found`, the base's.
    ///
    /// # Errors
    /// [`Error::BaseMismatch`] when they differ.
    pub fn check_base(&self, module: &str, found: &BaseFingerprint) -> Result<()> {
        match self.base_fingerprints.get(module) {
            Some(saved) if !saved.matches(found) => Err(Error::BaseMismatch {
                file: self.path.clone(),
                module: module.to_string(),
                saved: saved.to_string(),
                found: found.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks every factor against the model's LoRA layers (`(module path, layer)`) and builds
    /// the adapters, in each layer's dtype and on its device. Changes nothing.
    ///
    /// # Errors
    /// [`Error::UnknownModule`] for a module that is not a LoRA layer, [`Error::BadTensor`] for
    /// a shape that does not fit its layer.
    pub fn into_adapters(
        self,
        layers: &[(&str, &dyn LoraLayer)],
    ) -> Result<HashMap<String, Adapter>> {
        let by_path: HashMap<&str, &dyn LoraLayer> = layers.iter().copied().collect();
        let mut out = HashMap::new();
        for (module, f) in self.factors {
            let Some(layer) = by_path.get(module.as_str()) else {
                return Err(Error::UnknownModule {
                    file: self.path.clone(),
                    key: f.a_key,
                    known: layers.iter().take(3).map(|(p, _)| p.to_string()).collect(),
                    module,
                });
            };
            let names = layer.factor_layout(f.rank()).names();
            // AdaLoRA's bare `lora_A` / `lora_B` go to layers that take `lora_A.weight` and
            // implement AdaLoRA (linear layers).
            let fits = names == f.names()
                || (f.names() == FactorNames::AdaLora
                    && names == FactorNames::Lora
                    && layer.supports_adalora());
            if !fits {
                let expected = match (names, f.names()) {
                    (FactorNames::Lora, FactorNames::AdaLora) => {
                        "AdaLoRA is supported on linear layers only".into()
                    }
                    (FactorNames::Embedding, _) => "an embedding layer takes `lora_embedding_A` / `lora_embedding_B`".to_string(),
                    (FactorNames::Lora | FactorNames::AdaLora, _) => "only embedding layers take `lora_embedding_A` / `lora_embedding_B`; this layer takes `lora_A` / `lora_B`".to_string(),
                };
                return Err(Error::bad_tensor(
                    &self.path,
                    f.a_key.clone(),
                    format!("does not fit layer `{module}`: {expected}"),
                ));
            }
            if let Err(reason) = layer.check_factors(f.a.dims(), f.b.dims()) {
                let key = match reason {
                    LayerError::FactorShape {
                        factor: Factor::B, ..
                    } => &f.b_key,
                    _ => &f.a_key,
                };
                return Err(Error::bad_tensor(
                    &self.path,
                    key.clone(),
                    format!(
                        "does not fit layer `{module}` (in = {}, out = {}): {reason}",
                        layer.in_features(),
                        layer.out_features()
                    ),
                ));
            }
            let (dtype, device) = (layer.adapter_dtype(), layer.device());
            let a = Var::from_tensor(&f.a.to_dtype(dtype)?.to_device(device)?)?;
            let b = Var::from_tensor(&f.b.to_dtype(dtype)?.to_device(device)?)?;
            let adapter = Adapter::new(
                a,
                b,
                self.config.alpha_for(&module),
                self.config.use_rslora,
                self.config.dropout as f32,
            )
            .map_err(|e| e.at(&module))?
            .with_init(self.config.init_scheme().unwrap_or_default());
            let adapter = match (f.e, self.config.adalora.as_ref()) {
                (Some((key, e)), Some(adalora)) => {
                    let e = Var::from_tensor(&e.to_dtype(dtype)?.to_device(device)?)?;
                    adapter
                        .with_adalora(e, adalora.init_r, adalora.schedule)
                        .map_err(|err| {
                            Error::bad_tensor(&self.path, key, format!("does not fit: {err}"))
                        })?
                }
                _ => adapter,
            };
            let adapter = match f.magnitude {
                None => adapter,
                Some((key, m)) => {
                    if !layer.supports_dora() {
                        return Err(Error::bad_tensor(
                            &self.path,
                            key,
                            format!(
                                "does not fit layer `{module}`: {}",
                                LayerError::dora_unsupported()
                            ),
                        ));
                    }
                    let m = Var::from_tensor(&m.to_dtype(dtype)?.to_device(device)?)?;
                    adapter.with_magnitude(m).map_err(|e| {
                        Error::bad_tensor(&self.path, key, format!("does not fit: {e}"))
                    })?
                }
            };
            out.insert(module, adapter);
        }
        Ok(out)
    }
}

/// Loads the adapter at `dir` into `model` (see
/// [`load_adapter`](crate::LoraModelExt::load_adapter)): the file is read and checked against
/// every layer before any layer changes.
pub(crate) fn load_adapter<M: LoraModel + ?Sized>(
    model: &mut M,
    dir: &Path,
    options: &LoadOptions,
) -> Result<()> {
    let file = AdapterFile::read(dir)?;
    let mut adapters = {
        let layers = layers(model);
        if let Some((p, _, _)) = layers.iter().find(|(_, l, _)| l.is_merged()) {
            return Err(Error::Merged { path: p.clone() });
        }
        let targets: Vec<(&str, &dyn LoraLayer)> =
            layers.iter().map(|(p, l, _)| (p.as_str(), *l)).collect();
        if options.verify_base {
            file.verify_base(&targets)?;
        }
        file.into_adapters(&targets)?
    };
    // Every layer takes part: those the file does not mention lose an adapter of that name.
    prepare_then_commit(
        model,
        |path, _, _| Ok(Some(adapters.remove(path))),
        |layer, adapter| match &options.name {
            None => install_default(layer, adapter),
            Some(name) => {
                layer.set_routing(None);
                let set = layer.adapter_set_mut();
                match adapter {
                    Some(ad) => set.insert(name, ad),
                    None => {
                        set.remove(name);
                    }
                }
            }
        },
    )?;
    Ok(())
}
