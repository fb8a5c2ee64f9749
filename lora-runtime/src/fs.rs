//! Atomic replacement of a group of files: what `save_adapter` (two files) and `lora merge`
//! (one file, or every shard and the index) both use.
//!
//! Each file is written to a temporary file next to its target (so the rename stays on one file
//! system), all are synced, then renamed over their targets. A target that existed is kept as a
//! hard link (or a copy) until every rename succeeded; when one fails, the targets already
//! replaced get their previous content back. So the group is replaced as a whole or not at all,
//! and no temporary file is left behind, whatever step fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path next to `path` (same directory, so the rename is atomic).
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `target` through `write`, which is handed a temporary path next to it: when `write`
/// succeeds the file is synced and renamed over `target`; when it fails (or the rename does) the
/// temporary file is removed and `target` is as it was. What `lora merge` of a GGUF file uses, so
/// a failed merge leaves no output behind.
///
/// # Errors
/// What `write` returns; [`Error::Io`] naming the file when syncing or renaming fails.
pub fn write_atomically<E: From<Error>>(
    target: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut staging = Staging::new(&RealFs);
    let tmp = staging.path_for(target);
    write(&tmp)?;
    staging.commit()?;
    Ok(())
}

/// The file-system operations of a replacement, so tests can make them fail part-way (a writer
/// that fails after N bytes, a rename that fails), which permission tricks cannot do for root.
pub(crate) trait SaveFs {
    /// Creates (truncating) the file at `path` for writing.
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>>;
    /// Renames `from` over `to`.
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
}

/// The real file system.
pub(crate) struct RealFs;

impl SaveFs for RealFs {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn Write>> {
        Ok(Box::new(std::fs::File::create(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// Files staged to replace their targets together. Dropping it without [`commit`](Self::commit)
/// removes the temporary files.
pub(crate) struct Staging<'f> {
    /// `(temporary file, target)`.
    staged: Vec<(PathBuf, PathBuf)>,
    fs: &'f dyn SaveFs,
}

impl<'f> Staging<'f> {
    pub(crate) fn new(fs: &'f dyn SaveFs) -> Self {
        Self {
            staged: Vec::new(),
            fs,
        }
    }

    /// A temporary path for `target`, which the caller writes itself (for streamed output);
    /// it is synced and renamed on commit, or removed.
    pub(crate) fn path_for(&mut self, target: &Path) -> PathBuf {
        let tmp = temp_path_for(target);
        self.staged.push((tmp.clone(), target.to_path_buf()));
        tmp
    }

    /// Stages `bytes` as the new content of `target`.
    ///
    /// # Errors
    /// [`Error::Io`] naming the temporary file.
    pub(crate) fn write(&mut self, target: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.path_for(target);
        let mut w = self.fs.create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        w.write_all(bytes)
            .and_then(|()| w.flush())
            .map_err(|e| Error::io(&tmp, e))
    }

    /// Syncs every staged file, then renames each over its target, all or nothing (see the
    /// module docs).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file that failed; the targets are then as they were.
    pub(crate) fn commit(mut self) -> Result<()> {
        for (tmp, _) in &self.staged {
            std::fs::File::open(tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(tmp, e))?;
        }
        // Taken out first: on failure `replace_all` removes what it did not rename itself.
        let staged = std::mem::take(&mut self.staged);
        replace_all(&staged, self.fs)
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Renames each staged file over its target, restoring the previous targets if one rename
/// fails; no temporary file or backup is left either way.
fn replace_all(pairs: &[(PathBuf, PathBuf)], fs: &dyn SaveFs) -> Result<()> {
    let remove_all = |paths: &mut dyn Iterator<Item = &PathBuf>| {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut backups: Vec<Option<PathBuf>> = Vec::with_capacity(pairs.len());
    for (_, target) in pairs {
        if !target.is_file() {
            backups.push(None);
            continue;
        }
        let bak = temp_path_for(target);
        let kept =
            std::fs::hard_link(target, &bak).or_else(|_| std::fs::copy(target, &bak).map(|_| ()));
        if let Err(e) = kept {
            let _ = std::fs::remove_file(&bak);
            remove_all(&mut backups.iter().flatten());
            remove_all(&mut pairs.iter().map(|(s, _)| s));
            return Err(Error::io(target, e));
        }
        backups.push(Some(bak));
    }
    for (i, (staged, target)) in pairs.iter().enumerate() {
        if let Err(e) = fs.rename(staged, target) {
            for ((_, done), bak) in pairs[..i].iter().zip(&backups) {
                let _ = match bak {
                    Some(bak) => std::fs::rename(bak, done),
                    None => std::fs::remove_file(done),
                };
            }
            remove_all(&mut backups.iter().flatten());
            remove_all(&mut pairs[i..].iter().map(|(s, _)| s));
            return Err(Error::io(target, e));
        }
    }
    remove_all(&mut backups.iter().flatten());
    Ok(())
}
