//! Model files pushed to a worker that has no copy of its own.
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::proto::FileChunk;
use crate::transport::Client;

use crate::weights::ModelSource;

/// A stable id for pushed copies of a model: its file names, sizes and the
/// first MiB of each file.
pub(super) fn model_id(files: &[(PathBuf, String)]) -> Result<String> {
    let mut h = Sha256::new();
    for (path, rel) in files {
        let meta = std::fs::metadata(path)?;
        h.update(rel.as_bytes());
        h.update(meta.len().to_le_bytes());
        let mut head = vec![0u8; 1 << 20];
        let n = std::fs::File::open(path)?.read(&mut head)?;
        h.update(&head[..n]);
    }
    Ok(hex::encode(&h.finalize()[..12]))
}

/// The files a worker needs to load `source` (weights and config; the
/// tokenizer stays with the coordinator).
pub(super) fn model_files(source: &ModelSource) -> Result<Vec<(PathBuf, String)>> {
    match source {
        ModelSource::Gguf(f) => {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model.gguf")
                .to_string();
            Ok(vec![(f.clone(), name)])
        }
        ModelSource::Directory(dir) => {
            let mut out = Vec::new();
            for e in std::fs::read_dir(dir)? {
                let p = e?.path();
                let name = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                if name == "config.json"
                    || name.ends_with(".safetensors")
                    || name == "model.safetensors.index.json"
                {
                    out.push((p, name));
                }
            }
            out.sort_by(|a, b| a.1.cmp(&b.1));
            Ok(out)
        }
    }
}

pub(super) async fn push_files(
    client: &mut Client,
    id: &str,
    files: &[(PathBuf, String)],
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let total: u64 = files
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let (tx, rx) = mpsc::channel::<FileChunk>(4);
    let call = client.push_file(ReceiverStream::new(rx));
    let id = id.to_string();
    let files = files.to_vec();
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let producer = tokio::task::spawn_blocking(move || -> Result<()> {
        const CHUNK: usize = 4 << 20;
        for (path, rel) in files {
            let mut f = std::fs::File::open(&path)?;
            let size = f.metadata()?.len();
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f.read(&mut buf)?;
                buf.truncate(n);
                let last = offset + n as u64 >= size;
                let chunk = FileChunk {
                    model_id: id.clone(),
                    path: rel.clone(),
                    offset,
                    data: buf.into(),
                    total_size: size,
                    last,
                };
                if tx.blocking_send(chunk).is_err() {
                    return Ok(());
                }
                offset += n as u64;
                sent2.fetch_add(n as u64, Ordering::Relaxed);
                if last {
                    break;
                }
            }
        }
        Ok(())
    });
    let reporter = {
        let sent = sent.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                progress(sent.load(Ordering::Relaxed), total);
            }
        }
    };
    let result = tokio::select! {
        r = call => r,
        _ = reporter => unreachable!(),
    };
    producer.await.map_err(|e| Error::Worker(e.to_string()))??;
    result.map_err(|s| Error::Worker(format!("pushing the model failed: {}", s.message())))?;
    Ok(())
}
