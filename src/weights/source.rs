//! Where a model's files are: a directory (config.json and safetensors), a
//! GGUF file, or a Hugging Face repo id found in the local hub cache, with
//! no network access.
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A directory with config.json and safetensors.
    Directory(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Directory(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// The Hugging Face hub cache folder, as `huggingface_hub` computes it.
pub fn hf_cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
        && !s.starts_with('.')
        && !s.contains('\\')
}

/// Resolves a path or a Hugging Face repo id to model files, without any
/// network access.
pub fn resolve(path_or_repo: &str) -> Result<ModelSource> {
    let p = Path::new(path_or_repo);
    if p.is_file() {
        if p.extension().is_some_and(|e| e == "gguf") {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        return Err(Error::InvalidArgument(format!(
            "{path_or_repo} is a file but not a .gguf model; give a model directory, a .gguf file or a repo id"
        )));
    }
    if p.is_dir() {
        return dir_source(p);
    }
    if looks_like_repo_id(path_or_repo) {
        return resolve_hf_cache(path_or_repo, &hf_cache_dir());
    }
    Err(Error::NotFound(format!(
        "no model at {path_or_repo}: not a directory, not a .gguf file, and not a Hugging Face repo id (org/name)"
    )))
}

fn dir_source(dir: &Path) -> Result<ModelSource> {
    if dir.join("config.json").is_file() {
        return Ok(ModelSource::Directory(dir.to_path_buf()));
    }
    let ggufs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(one.clone())),
        [] => Err(Error::NotFound(format!(
            "{} has no config.json (and no .gguf file): not a model directory",
            dir.display()
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "{} holds several .gguf files; name one of them",
            dir.display()
        ))),
    }
}

/// Finds `org/name` in a hub cache: `models--org--name/snapshots/<rev>`,
/// the revision named by `refs/main` when present.
pub fn resolve_hf_cache(repo: &str, cache: &Path) -> Result<ModelSource> {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let missing = || {
        Error::NotFound(format!(
            "model {repo:?} is not in the Hugging Face cache at {} (looked for {}); \
             download it there first, e.g. `huggingface-cli download {repo}`, or pass a local path",
            cache.display(),
            folder.display()
        ))
    };
    let snapshot = hf_snapshot(&folder).ok_or_else(missing)?;
    dir_source(&snapshot).map_err(|_| missing())
}

/// A local folder for `path_or_repo` whatever it holds: the path itself, or
/// a repo id's snapshot in the hub cache (which may hold only some files,
/// e.g. a tokenizer's).
pub fn local_folder(path_or_repo: &str) -> Option<PathBuf> {
    let p = Path::new(path_or_repo);
    if p.is_dir() {
        return Some(p.to_path_buf());
    }
    if !looks_like_repo_id(path_or_repo) {
        return None;
    }
    let folder = hf_cache_dir().join(format!("models--{}", path_or_repo.replace('/', "--")));
    hf_snapshot(&folder)
}

/// The snapshot of a repo's cache `folder` that `refs/main` names, else
/// the newest.
fn hf_snapshot(folder: &Path) -> Option<PathBuf> {
    let snapshots = folder.join("snapshots");
    let rev = fs::read_to_string(folder.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_string());
    match rev {
        Some(r) if snapshots.join(&r).is_dir() => Some(snapshots.join(r)),
        _ => {
            let mut all: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&snapshots)
                .ok()?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| {
                    (
                        e.metadata()
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH),
                        e.path(),
                    )
                })
                .collect();
            all.sort();
            all.pop().map(|(_, p)| p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_resolve_from_the_cache_or_fail_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_hf_cache("org/model", tmp.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/model") && err.contains(&tmp.path().display().to_string()),
            "{err}"
        );

        let snap = tmp.path().join("models--org--model/snapshots/abc123");
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join("config.json"), "{}").unwrap();
        fs::create_dir_all(tmp.path().join("models--org--model/refs")).unwrap();
        fs::write(tmp.path().join("models--org--model/refs/main"), "abc123\n").unwrap();
        assert_eq!(
            resolve_hf_cache("org/model", tmp.path()).unwrap(),
            ModelSource::Directory(snap)
        );
    }
}
