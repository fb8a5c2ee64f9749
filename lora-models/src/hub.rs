//! Model arguments that are Hugging Face Hub ids: `HuggingFaceTB/SmolLM2-135M-Instruct` resolves
//! to a snapshot directory of the Hugging Face cache (the one Python's `huggingface_hub` uses),
//! downloading what is missing.
//!
//! An argument that exists on disk is a path; otherwise it is a hub id, `org/name` with an
//! optional `@revision`. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. With `HF_HUB_OFFLINE=1` nothing is downloaded.
//!
//! ```no_run
//! let dir = lora_models::hub::resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")?;
//! # Ok::<(), lora_models::ModelError>(())
//! ```

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{ModelError, Result};

/// Files a model directory needs: the config, the tokenizer, and the weights (one file or an
/// index, whose shards are added once it is read).
const REQUIRED: &[&str] = &["config.json", "tokenizer.json"];
/// Files used when present.
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Where and how hub ids resolve.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The cache directory (`.../huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never download (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// From the environment, as `huggingface_hub` reads it.
    pub fn from_env() -> Self {
        let cache_dir = match std::env::var_os("HF_HUB_CACHE") {
            Some(dir) => PathBuf::from(dir),
            None => Cache::from_env().path().clone(),
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        Self { cache_dir, offline }
    }
}

/// A hub id: `org/name` and an optional revision.
fn parse_id(arg: &str) -> Option<(String, String)> {
    let (id, revision) = match arg.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev.to_string()),
        Some(_) => return None,
        None => (arg, "main".to_string()),
    };
    let (org, name) = id.split_once('/')?;
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (valid(org) && valid(name)).then(|| (id.to_string(), revision))
}

/// [`resolve_model_with`] with [`HubOptions::from_env`].
///
/// # Errors
/// As [`resolve_model_with`].
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    resolve_model_with(arg, &HubOptions::from_env())
}

/// A model argument as a local path: the argument itself when it exists on disk, else the
/// snapshot directory of the hub id in the cache, after downloading missing files (unless
/// offline).
///
/// # Errors
/// [`ModelError::Io`] for a path that does not exist and is no hub id;
/// [`ModelError::Hub`] when the id is not in the cache and cannot be downloaded.
pub fn resolve_model_with(arg: &str, options: &HubOptions) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some((id, revision)) = parse_id(arg) else {
        return Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory (and not a hub id like `org/name`)",
            ),
        ));
    };
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision);
    let cache = Cache::new(options.cache_dir.clone()).repo(repo.clone());
    let hub_error = |reason: String| ModelError::Hub {
        id: arg.to_string(),
        cache: options.cache_dir.clone(),
        reason,
    };
    let local = |name: &str| cache.get(name);
    if let Some(dir) = complete_snapshot(&local) {
        return Ok(dir);
    }
    if options.offline {
        return Err(hub_error(
            "not complete in the cache and HF_HUB_OFFLINE is set: download it where a network is available".into(),
        ));
    }
    let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
        .with_progress(false)
        .build()
        .map_err(|e| hub_error(e.to_string()))?
        .repo(repo);
    let fetch = |name: &str| api.get(name).map_err(|e| hub_error(format!("{name}: {e}")));
    for name in REQUIRED {
        fetch(name)?;
    }
    for name in OPTIONAL {
        // Absent files are fine; only what the repository has is fetched.
        let _ = api.get(name);
    }
    match api.get(INDEX) {
        Ok(index) => {
            for shard in shards(&index)? {
                fetch(&shard)?;
            }
        }
        Err(_) => {
            fetch(SINGLE)?;
        }
    }
    complete_snapshot(&local)
        .ok_or_else(|| hub_error("downloaded, but the snapshot in the cache is incomplete".into()))
}

/// The snapshot directory when the config, the tokenizer and all weights are in it.
fn complete_snapshot(local: &dyn Fn(&str) -> Option<PathBuf>) -> Option<PathBuf> {
    let config = local("config.json")?;
    let has_all = REQUIRED.iter().all(|f| local(f).is_some())
        && match local(INDEX) {
            Some(index) => shards(&index)
                .ok()
                .is_some_and(|s| s.iter().all(|f| local(f).is_some())),
            None => local(SINGLE).is_some(),
        };
    has_all
        .then(|| config.parent().map(Path::to_path_buf))
        .flatten()
}

/// The shard files an index names.
fn shards(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        assert_eq!(
            parse_id("HuggingFaceTB/SmolLM2-135M-Instruct"),
            Some(("HuggingFaceTB/SmolLM2-135M-Instruct".into(), "main".into()))
        );
        assert_eq!(
            parse_id("org/name@v1.0"),
            Some(("org/name".into(), "v1.0".into()))
        );
        for not_an_id in [
            "model.gguf",
            "a/b/c",
            "/abs/path",
            "./rel/x",
            "org/",
            "org/name@",
            "../x",
        ] {
            assert_eq!(parse_id(not_an_id), None, "{not_an_id}");
        }
    }
}
