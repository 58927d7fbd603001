//! The model cache: where pushed files of a model live, and receiving them.
use std::path::{Component, Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::service::WorkerService;
use super::status;
use crate::error::{Error, Result};
use crate::proto::{FileChunk, PushFileReply};

/// The cache folder of pushed files of `model_id`, which must be a plain
/// name (it becomes a path).
fn model_cache_dir(cache_dir: &Path, model_id: &str) -> Result<PathBuf> {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if model_id.is_empty() || model_id.len() > 128 || !model_id.chars().all(plain) {
        return Err(Error::InvalidArgument(format!(
            "invalid model id {model_id:?}"
        )));
    }
    Ok(cache_dir.join(model_id))
}

/// Where pushed files of `model_id` live, if they were pushed.
pub(super) fn pushed_model_dir(cache_dir: &Path, model_id: &str) -> Result<PathBuf> {
    let dir = model_cache_dir(cache_dir, model_id)?;
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "model {model_id} is not in this worker's cache"
        )));
    }
    Ok(dir)
}

/// A file path inside a model directory: relative, no `..`.
fn safe_relative(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if path.is_empty()
        || path.len() > 512
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Error::InvalidArgument(format!(
            "invalid file path {path:?}"
        )));
    }
    Ok(p.to_path_buf())
}

impl WorkerService {
    /// Writes the files of a PushFile stream into the model cache.
    pub(super) async fn receive_files(
        &self,
        request: Request<Streaming<FileChunk>>,
    ) -> std::result::Result<Response<PushFileReply>, Status> {
        let mut chunks = request.into_inner();
        let mut written = 0u64;
        let mut open: Option<(PathBuf, PathBuf, tokio::fs::File, u64, u64)> = None;
        while let Some(chunk) = chunks.message().await? {
            let rel = safe_relative(&chunk.path).map_err(status)?;
            let dir = model_cache_dir(&self.cfg.cache_dir, &chunk.model_id).map_err(status)?;
            let target = dir.join(&rel);
            if open.as_ref().is_none_or(|(t, ..)| *t != target) {
                if chunk.offset != 0 {
                    return Err(Status::invalid_argument(format!(
                        "{}: the first chunk must start at offset 0",
                        chunk.path
                    )));
                }
                let partial = target.with_extension("partial");
                if let Some(parent) = partial.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let f = tokio::fs::File::create(&partial).await?;
                open = Some((target.clone(), partial, f, 0, chunk.total_size));
            }
            let (_, partial, f, pos, total) = open.as_mut().unwrap();
            if chunk.offset != *pos {
                return Err(Status::invalid_argument(format!(
                    "{}: chunk at {} but {} bytes were written",
                    chunk.path, chunk.offset, pos
                )));
            }
            if *pos + chunk.data.len() as u64 > *total {
                return Err(Status::invalid_argument(format!(
                    "{}: more data than its size {total}",
                    chunk.path
                )));
            }
            f.write_all(&chunk.data).await?;
            *pos += chunk.data.len() as u64;
            written += chunk.data.len() as u64;
            if chunk.last {
                if *pos != *total {
                    return Err(Status::invalid_argument(format!(
                        "{}: {} of {total} bytes arrived",
                        chunk.path, pos
                    )));
                }
                f.flush().await?;
                tokio::fs::rename(&partial, &target).await?;
                open = None;
            }
        }
        if let Some((_, partial, ..)) = open {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(Status::invalid_argument(
                "the stream ended before the file's last chunk",
            ));
        }
        Ok(Response::new(PushFileReply {
            bytes_written: written,
        }))
    }
}
