//! Writing an adapter directory: the tensors with base fingerprints in the metadata, the
//! `adapter_config.json` that describes them, both replaced atomically (see [`crate::fs`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use safetensors::{Dtype, View};

use super::keys::peft_key;
use super::{ADAPTER_FILE, CONFIG_FILE, FINGERPRINT_PREFIX};
use crate::adapter::{Adapter, DEFAULT_ADAPTER};
use crate::config::{LoraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::fs::{RealFs, SaveFs, Staging};
use crate::layer::LoraLayer;
use crate::model::{adapter_names, layers, parallel_map, LoraModel};

/// A tensor's bytes for a safetensors file.
pub(crate) struct RawTensor<'a> {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Cow<'a, [u8]>,
}

impl View for RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The little-endian bytes of a float tensor (copied to the CPU).
///
/// # Errors
/// [`Error::BadTensor`] naming `file` and `key` for a dtype safetensors cannot hold here.
pub(crate) fn tensor_bytes(t: &Tensor, file: &Path, key: &str) -> Result<(Dtype, Vec<u8>)> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            flat.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(Error::bad_tensor(
                file,
                key,
                format!("cannot store dtype {other:?}: only F32, F16, BF16 and F64"),
            ));
        }
    })
}

/// The bytes of a safetensors file holding `tensors` (in this order) and `metadata`; `file`
/// names the file in errors.
pub(crate) fn serialize_tensors(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
    file: &Path,
) -> Result<Vec<u8>> {
    let raw = tensors
        .iter()
        .map(|(key, t)| {
            let (dtype, bytes) = tensor_bytes(t, file, key)?;
            Ok((
                key.clone(),
                RawTensor {
                    dtype,
                    shape: t.dims().to_vec(),
                    data: Cow::Owned(bytes),
                },
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(raw, Some(metadata)).map_err(|source| Error::SafeTensors {
        path: file.to_path_buf(),
        source,
    })
}

/// `{"format": "pt"}`.
pub(crate) fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// One adapter of one layer, to be written: `(module path, layer, adapter)`.
pub(crate) type SavedLayer<'a> = (&'a str, &'a dyn LoraLayer, &'a Adapter);

/// What [`save_adapter_with`](crate::LoraModelExt::save_adapter_with) adds to the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaveOptions {
    /// `task_type`, e.g. `CAUSAL_LM` (PEFT picks the model class from it).
    pub task_type: Option<String>,
    /// `base_model_name_or_path`: the base model's hub id or path.
    pub base_model_name_or_path: Option<String>,
}

/// Writes the adapters of `model` in PEFT's format (see
/// [`save_adapter`](crate::LoraModelExt::save_adapter)): the default adapter at `dir`, every
/// other in `dir/<name>/`, as PEFT lays them out.
pub(crate) fn save_adapter<M: LoraModel + ?Sized>(
    model: &M,
    dir: &Path,
    options: &SaveOptions,
) -> Result<()> {
    let layers = layers(model);
    let names = adapter_names(model);
    if names.is_empty() {
        return Err(Error::NoAdapter {
            what: "save".into(),
        });
    }
    for name in &names {
        let adapters: Vec<SavedLayer<'_>> = layers
            .iter()
            .filter_map(|(p, l, _)| l.adapter_named(name).map(|a| (p.as_str(), *l, a)))
            .collect();
        let target = if name == DEFAULT_ADAPTER {
            dir.to_path_buf()
        } else {
            dir.join(name)
        };
        let all: Vec<&str> = layers.iter().map(|(p, _, _)| p.as_str()).collect();
        save_layers(&target, &adapters, &all, options, &RealFs)?;
    }
    Ok(())
}

/// The `adapter_config.json` that [`save_adapter`] writes for the active adapter.
pub(crate) fn adapter_config<M: LoraModel + ?Sized>(model: &M) -> Result<LoraConfig> {
    let layers = layers(model);
    let adapters: Vec<SavedLayer<'_>> = layers
        .iter()
        .filter_map(|(p, l, _)| l.adapter().map(|a| (p.as_str(), *l, a)))
        .collect();
    let all: Vec<&str> = layers.iter().map(|(p, _, _)| p.as_str()).collect();
    config_for(&adapters, &all)
}

/// Writes one adapter of `layers` to `dir` through `fs`, with the fingerprint of each layer's
/// unmerged base weight in the metadata; both files are replaced together or not at all.
/// `all` holds the paths of every LoRA layer of the model, adapted or not, so the config's
/// `target_modules` can be made to select exactly the adapted ones.
pub(crate) fn save_layers(
    dir: &Path,
    layers: &[SavedLayer<'_>],
    all: &[&str],
    options: &SaveOptions,
    fs: &dyn SaveFs,
) -> Result<()> {
    let tensor_path = dir.join(ADAPTER_FILE);
    let config_path = dir.join(CONFIG_FILE);
    let mut tensors = Vec::with_capacity(2 * layers.len());
    let mut metadata = pt_metadata();
    // Hashing the bases is memory-bound and per layer: in parallel (and once per layer, which
    // keeps the fingerprint).
    let fingerprints = parallel_map(layers, |(path, layer, _)| {
        layer.base_fingerprint().map_err(|e| e.at(path))
    });
    for (&(path, layer, ad), fingerprint) in layers.iter().zip(fingerprints) {
        let names = layer.factor_names(ad);
        for (factor, var) in ad.vars() {
            let key = peft_key(path, names, factor);
            let (dtype, bytes) = tensor_bytes(var.as_tensor(), &tensor_path, &key)?;
            tensors.push((
                key,
                RawTensor {
                    dtype,
                    shape: var.dims().to_vec(),
                    data: Cow::Owned(bytes),
                },
            ));
        }
        metadata.insert(
            format!("{FINGERPRINT_PREFIX}{path}"),
            fingerprint?.to_string(),
        );
    }
    let mut config = config_for(layers, all)?;
    config.task_type.clone_from(&options.task_type);
    config
        .base_model_name_or_path
        .clone_from(&options.base_model_name_or_path);
    let config = config.to_json()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let bytes =
        safetensors::serialize(tensors, Some(metadata)).map_err(|source| Error::SafeTensors {
            path: tensor_path.clone(),
            source,
        })?;
    let mut staging = Staging::new(fs);
    staging.write(&tensor_path, &bytes)?;
    staging.write(&config_path, config.as_bytes())?;
    staging.commit()
}

/// The most frequent value (ties: the first in sorted order).
fn mode<T: Copy + PartialEq>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    counts.iter().rev().max_by_key(|(_, n)| *n).map(|(v, _)| *v)
}

/// The PEFT config describing one adapter of `layers`: the most common rank and alpha as `r`
/// and `lora_alpha`, the others as `rank_pattern` / `alpha_pattern` by full module path.
fn config_for(layers: &[SavedLayer<'_>], all: &[&str]) -> Result<LoraConfig> {
    if layers.is_empty() {
        return Err(Error::NoAdapter {
            what: "save".into(),
        });
    }
    let adapters: Vec<(&str, &Adapter, bool)> = layers
        .iter()
        .map(|&(p, l, a)| (p, a, l.fan_in_fan_out()))
        .collect();
    if adapters.iter().any(|(_, a, _)| a.is_adalora()) {
        return adalora_config_for(&adapters, all);
    }
    let use_dora = adapters.iter().any(|(_, a, _)| a.is_dora());
    if let Some((path, _, _)) = adapters.iter().find(|(_, a, _)| a.is_dora() != use_dora) {
        return Err(Error::InvalidConfig {
            file: None,
            field: "use_dora".into(),
            reason: format!(
                "layer `{path}` has a plain LoRA adapter while others use DoRA: PEFT's config has one `use_dora` for the whole adapter"
            ),
        });
    }
    let rank = mode(adapters.iter().map(|(_, a, _)| a.rank())).unwrap_or(8);
    let use_rslora = mode(adapters.iter().map(|(_, a, _)| a.use_rslora())).unwrap_or(false);
    // PEFT has one `use_rslora` for the whole adapter: a layer with the other scaling is saved
    // with the alpha that gives its scaling under the global rule.
    let effective_alpha = |a: &Adapter| -> f64 {
        let r = (a.rank() as f64).sqrt();
        match (a.use_rslora(), use_rslora) {
            // alpha'/r = alpha/sqrt(r)
            (true, false) => a.alpha() * r,
            // alpha'/sqrt(r) = alpha/r
            (false, true) => a.alpha() / r,
            _ => a.alpha(),
        }
    };
    let alpha = mode(adapters.iter().map(|(_, a, _)| effective_alpha(a))).unwrap_or(8.0);
    let mut config = LoraConfig::new(rank, alpha, target_names(&adapters, all));
    config.use_rslora = use_rslora;
    config.use_dora = use_dora;
    config.dropout = adapters
        .iter()
        .map(|(_, a, _)| f64::from(a.dropout()))
        .fold(0.0, f64::max);
    config.fan_in_fan_out = adapters.iter().any(|(_, _, f)| *f);
    // PEFT has one `init_lora_weights`: the most common (a PiSSA / OLoRA adapter says so, which
    // is how PEFT knows it belongs to a residual base).
    config.init = mode(adapters.iter().map(|(_, a, _)| a.init()))
        .unwrap_or_default()
        .into();
    for (path, ad, _) in adapters {
        if ad.rank() != rank {
            config.rank_pattern.insert((*path).to_string(), ad.rank());
        }
        let a = effective_alpha(ad);
        if a != alpha {
            config.alpha_pattern.insert((*path).to_string(), a);
        }
    }
    debug_assert!(matches!(config.targets, TargetModules::List(_)));
    Ok(config)
}

/// The target names of `adapters`: their last path components, or full paths when those
/// would select other LoRA layers of the model (`all`) as well (PEFT matches a name against a
/// path's last components: the short names say exactly what was adapted only if they select no
/// other LoRA layer).
fn target_names(adapters: &[(&str, &Adapter, bool)], all: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = adapters
        .iter()
        .map(|(p, _, _)| p.rsplit('.').next().unwrap_or(p).to_string())
        .collect();
    names.sort();
    names.dedup();
    let adapted: std::collections::HashSet<&str> = adapters.iter().map(|(p, _, _)| *p).collect();
    let by_names = LoraConfig::new(1, 1.0, names.clone());
    if all
        .iter()
        .any(|p| !adapted.contains(p) && by_names.targets_module(p))
    {
        names = adapters.iter().map(|(p, _, _)| (*p).to_string()).collect();
        names.sort();
    }
    names
}

/// The PEFT config of an AdaLoRA adapter: `peft_type: ADALORA`, `init_r` the common `ranknum`,
/// one `lora_alpha`, the schedule of the adapters, and a `rank_pattern` that gives each layer
/// holding fewer than `init_r` singular values that many `true`s, at the positions the rank
/// allocator kept when it pruned the adapter (PEFT then builds the layer at that rank with
/// `ranknum = init_r`, as this adapter has it).
fn adalora_config_for(adapters: &[(&str, &Adapter, bool)], all: &[&str]) -> Result<LoraConfig> {
    let invalid = |field: &str, reason: String| Error::InvalidConfig {
        file: None,
        field: field.into(),
        reason,
    };
    if let Some((path, _, _)) = adapters.iter().find(|(_, a, _)| !a.is_adalora()) {
        return Err(invalid(
            "peft_type",
            format!("layer `{path}` has a LoRA adapter while others use AdaLoRA: PEFT's config has one `peft_type` for the whole adapter"),
        ));
    }
    let (_, first, _) = adapters[0];
    let (init_r, alpha) = (first.ranknum().unwrap_or(first.rank()), first.alpha());
    let schedule = first.adalora_schedule().copied().unwrap_or_default();
    if schedule.total_step.is_none() {
        // PEFT's `AdaLoraConfig` refuses a config without it: the file would not load there.
        return Err(invalid(
            "total_step",
            "an AdaLoRA adapter is saved with its schedule's `total_step` (PEFT refuses a config \
             without it): set it in the `AdaLoraSchedule`"
                .into(),
        ));
    }
    for (path, ad, _) in adapters {
        if ad.ranknum() != Some(init_r) {
            return Err(invalid(
                "init_r",
                format!("layer `{path}` has ranknum {:?} but others {init_r}: PEFT's AdaLoRA config has one `init_r`", ad.ranknum()),
            ));
        }
        if ad.rank() > init_r {
            return Err(invalid(
                "init_r",
                format!(
                    "layer `{path}` has rank {} above its ranknum {init_r}",
                    ad.rank()
                ),
            ));
        }
        if ad.alpha() != alpha {
            return Err(invalid(
                "lora_alpha",
                format!("layer `{path}` has alpha {} but others {alpha}: PEFT's AdaLoRA config has one `lora_alpha`", ad.alpha()),
            ));
        }
    }
    let mut config = LoraConfig::adalora(init_r, alpha, target_names(adapters, all), schedule);
    config.dropout = adapters
        .iter()
        .map(|(_, a, _)| f64::from(a.dropout()))
        .fold(0.0, f64::max);
    config.fan_in_fan_out = adapters.iter().any(|(_, _, f)| *f);
    let pattern: std::collections::BTreeMap<String, Vec<bool>> = adapters
        .iter()
        .filter(|(_, ad, _)| ad.rank() < init_r || ad.adalora_kept().is_some())
        .map(|(path, ad, _)| {
            // The positions the rank allocator kept, else the first `rank` (PEFT only counts).
            let mask = ad.adalora_kept().map_or_else(
                || (0..init_r).map(|i| i < ad.rank()).collect(),
                <[bool]>::to_vec,
            );
            (format!("{path}.lora_E"), mask)
        })
        .collect();
    if let Some(adalora) = config.adalora.as_mut() {
        adalora.rank_pattern = (!pattern.is_empty()).then_some(pattern);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::AdapterFile;
    use crate::{BaseFingerprint, LayerConfig, LoraLinear};
    use candle_core::Device;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn layers(seed: u64) -> Vec<(String, LoraLinear)> {
        (0..2)
            .map(|i| {
                let w = Tensor::randn(0f32, 1.0, (6, 5), &Device::Cpu).unwrap();
                let mut l = LoraLinear::new(w, None);
                let ad = l
                    .fresh_adapter(&LayerConfig::new(2, 4.0), seed + i)
                    .unwrap();
                l.insert_adapter(DEFAULT_ADAPTER, ad).unwrap();
                let b = Tensor::randn(0f32, 1.0, (6, 2), &Device::Cpu).unwrap();
                l.adapter().unwrap().b().set(&b).unwrap();
                (format!("layers.{i}.q"), l)
            })
            .collect()
    }

    fn pairs(layers: &[(String, LoraLinear)]) -> Vec<(&str, &dyn LoraLayer)> {
        layers
            .iter()
            .map(|(p, l)| (p.as_str(), l as &dyn LoraLayer))
            .collect()
    }

    fn refs(layers: &[(String, LoraLinear)]) -> Vec<SavedLayer<'_>> {
        layers
            .iter()
            .map(|(p, l)| (p.as_str(), l as &dyn LoraLayer, l.adapter().unwrap()))
            .collect()
    }

    fn save(dir: &Path, layers: &[SavedLayer<'_>]) -> Result<()> {
        let all: Vec<&str> = layers.iter().map(|(p, _, _)| *p).collect();
        save_layers(dir, layers, &all, &SaveOptions::default(), &RealFs)
    }

    /// A file system whose writers fail once `budget` bytes were written in all, and whose
    /// rename fails for the target file named `fail_rename`.
    struct Faulty {
        budget: usize,
        written: Arc<AtomicUsize>,
        fail_rename: Option<&'static str>,
    }

    struct FailAfter {
        inner: std::fs::File,
        budget: usize,
        written: Arc<AtomicUsize>,
    }

    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let done = self.written.load(Ordering::SeqCst);
            let left = self.budget.saturating_sub(done);
            if left == 0 {
                return Err(std::io::Error::other("injected failure: disk full"));
            }
            let n = self.inner.write(&buf[..buf.len().min(left)])?;
            self.written.fetch_add(n, Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    impl SaveFs for Faulty {
        fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>> {
            Ok(Box::new(FailAfter {
                inner: std::fs::File::create(path)?,
                budget: self.budget,
                written: self.written.clone(),
            }))
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            if self
                .fail_rename
                .is_some_and(|name| to.file_name().is_some_and(|n| n == name))
            {
                return Err(std::io::Error::other("injected failure: rename"));
            }
            std::fs::rename(from, to)
        }
    }

    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_save_that_fails_part_way_leaves_the_previous_adapter_and_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let old = layers(1);
        save(dir.path(), &refs(&old)).unwrap();
        let before = snapshot(dir.path());
        assert_eq!(before.len(), 2);
        let new = layers(7);
        let total = before.values().map(Vec::len).sum::<usize>();
        let tensor_len = before[ADAPTER_FILE].len();
        // Fail while writing the tensors, exactly at their end, while writing the config.
        let budgets = [
            0,
            1,
            8,
            100,
            tensor_len / 2,
            tensor_len - 1,
            tensor_len,
            tensor_len + 1,
            total - 1,
        ];
        for budget in budgets {
            let fs = Faulty {
                budget,
                written: Arc::default(),
                fail_rename: None,
            };
            let err = save_layers(dir.path(), &refs(&new), &[], &SaveOptions::default(), &fs)
                .unwrap_err();
            assert!(
                err.to_string().contains("injected failure: disk full"),
                "{budget}: {err}"
            );
            assert!(matches!(err, Error::Io { .. }), "{budget}: {err:?}");
            assert_eq!(snapshot(dir.path()), before, "budget {budget}");
        }
        // Fail the first rename, then the second (after the tensors were already replaced).
        for name in [ADAPTER_FILE, CONFIG_FILE] {
            let fs = Faulty {
                budget: usize::MAX,
                written: Arc::default(),
                fail_rename: Some(name),
            };
            let err = save_layers(dir.path(), &refs(&new), &[], &SaveOptions::default(), &fs)
                .unwrap_err();
            assert!(
                err.to_string().contains("injected failure: rename"),
                "{name}: {err}"
            );
            assert_eq!(snapshot(dir.path()), before, "failed rename of {name}");
        }
        // Without a fault the same file system writes the new adapter.
        let fs = Faulty {
            budget: usize::MAX,
            written: Arc::default(),
            fail_rename: None,
        };
        save_layers(dir.path(), &refs(&new), &[], &SaveOptions::default(), &fs).unwrap();
        let after = snapshot(dir.path());
        assert_eq!(after.len(), 2);
        assert_ne!(after[ADAPTER_FILE], before[ADAPTER_FILE]);
    }

    #[test]
    fn a_failed_first_save_leaves_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Faulty {
            budget: 10,
            written: Arc::default(),
            fail_rename: None,
        };
        save_layers(
            dir.path(),
            &refs(&layers(1)),
            &[],
            &SaveOptions::default(),
            &fs,
        )
        .unwrap_err();
        assert!(snapshot(dir.path()).is_empty());
        let fs = Faulty {
            budget: usize::MAX,
            written: Arc::default(),
            fail_rename: Some(CONFIG_FILE),
        };
        save_layers(
            dir.path(),
            &refs(&layers(1)),
            &[],
            &SaveOptions::default(),
            &fs,
        )
        .unwrap_err();
        assert!(
            snapshot(dir.path()).is_empty(),
            "{:?}",
            snapshot(dir.path()).keys()
        );
    }

    #[test]
    fn fingerprints_are_recorded_round_trip_and_detect_another_base() {
        let dir = tempfile::tempdir().unwrap();
        let model = layers(1);
        save(dir.path(), &refs(&model)).unwrap();
        let file = AdapterFile::read(dir.path()).unwrap();
        assert_eq!(file.base_fingerprints.len(), 2);
        let fp = &file.base_fingerprints["layers.0.q"];
        assert_eq!(
            fp,
            &BaseFingerprint::of(model[0].1.weight().unwrap()).unwrap()
        );
        assert_eq!(
            fp.to_string().split(' ').take(2).collect::<Vec<_>>(),
            ["6x5", "f32"]
        );
        file.verify_base(&pairs(&model)).unwrap();
        let other = layers(1);
        let err = file.verify_base(&pairs(&other)).unwrap_err();
        assert!(
            matches!(&err, Error::BaseMismatch { module, .. } if module == "layers.0.q"),
            "{err}"
        );
        // A different dtype compares the shape only.
        let half: Vec<(String, LoraLinear)> = other
            .iter()
            .map(|(p, l)| {
                (
                    p.clone(),
                    LoraLinear::new(l.weight().unwrap().to_dtype(DType::BF16).unwrap(), None),
                )
            })
            .collect();
        file.verify_base(&pairs(&half)).unwrap();
    }
}
