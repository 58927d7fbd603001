//! The stage a worker holds, and loading it.
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use super::files::pushed_model_dir;
use super::warmup;
use super::{Engine, WorkerConfig};
use crate::cache::SlotCache;
use crate::device;
use crate::error::Result;
use crate::mlx::{self, Array};
use crate::models::{Model, Shard};
use crate::proto::{Compression, LoadProgress, LoadShardRequest, ShardInfo};
use crate::sharding::Footprint;
use crate::weights::{resolve, Weights};

/// The stage this worker holds.
pub(super) struct Stage {
    pub(super) model: Arc<Model>,
    pub(super) info: ShardInfo,
    pub(super) next: Option<String>,
    /// The first stage, where the last one sends ring steps' tokens.
    pub(super) first: Option<String>,
    pub(super) compression: Compression,
    pub(super) cache_budget: u64,
    pub(super) kv_bytes_per_token: u64,
}

impl Stage {
    /// Whether this stage already holds what `req` asks to load.
    fn holds(&self, req: &LoadShardRequest) -> bool {
        let src = req.source.clone().unwrap_or_default();
        let id = if src.model_id.is_empty() {
            &src.path
        } else {
            &src.model_id
        };
        !id.is_empty()
            && *id == self.info.model_id
            && req.layer_start == self.info.layer_start
            && req.layer_end == self.info.layer_end
            && req.embed == self.info.embed
            && req.head == self.info.head
            && (req.cache_budget == 0 || req.cache_budget == self.cache_budget)
    }
}

impl Engine {
    pub(super) fn load(
        &mut self,
        req: LoadShardRequest,
        cfg: &WorkerConfig,
        progress: &mpsc::Sender<std::result::Result<LoadProgress, Status>>,
    ) -> Result<()> {
        warmup::keep_compiled_kernels();
        // A new stage replaces the old one and every sequence on it; kept
        // prefixes go too (the coordinator's index starts afresh).
        self.seqs.clear();
        self.drop_caches();
        self.prefixes.clear();
        let src = req.source.clone().unwrap_or_default();
        if let Some(stage) = self.stage.as_mut().filter(|s| s.holds(&req)) {
            // The same layers again (a re-plan that kept them here): only
            // the neighbours change, no weights are read.
            stage.next = Some(req.next.clone()).filter(|n| !n.is_empty());
            stage.first = Some(req.first.clone()).filter(|n| !n.is_empty());
            stage.compression = Compression::try_from(req.compression).unwrap_or(Compression::None);
            let info = stage.info.clone();
            tracing::info!("kept layers {}..{}", info.layer_start, info.layer_end);
            let _ = progress.blocking_send(Ok(LoadProgress {
                bytes_loaded: info.weight_bytes,
                bytes_total: info.weight_bytes,
                done: true,
                shard: Some(info),
            }));
            return Ok(());
        }
        self.stage = None;
        mlx::clear_cache();
        let source = if !src.path.is_empty() {
            cfg.check_local_paths()?;
            resolve(&src.path)?
        } else {
            let dir = pushed_model_dir(&cfg.cache_dir, &src.model_id)?;
            resolve(dir.to_str().unwrap_or_default())?
        };
        let weights = Weights::open(&source)?;
        let layers = req.layer_start as usize..req.layer_end as usize;
        let shard = Shard {
            layers: layers.clone(),
            embed: req.embed,
            head: req.head,
        };
        let model = Model::load(&weights, Some(shard))?;
        let total = model.nbytes() as u64;
        let mut loaded = 0u64;
        // Read the weights in pieces so progress can be reported.
        let mut group: Vec<&Array> = Vec::new();
        let mut group_bytes = 0u64;
        for a in model.arrays() {
            group_bytes += a.nbytes() as u64;
            group.push(a);
            if group_bytes >= 64 << 20 {
                mlx::eval(&group)?;
                loaded += group_bytes;
                group.clear();
                group_bytes = 0;
                let _ = progress.blocking_send(Ok(LoadProgress {
                    bytes_loaded: loaded,
                    bytes_total: total,
                    ..Default::default()
                }));
            }
        }
        mlx::eval(&group)?;
        if let Some((read, size)) = weights.gguf_bytes_read() {
            tracing::info!(
                "layers {}..{}: read {} of the GGUF file's {} bytes; {}",
                layers.start,
                layers.end,
                read,
                size,
                crate::weights::conversion_summary(&weights.conversions())
            );
        }
        let fp = Footprint::from_weights(&weights, &model.args, model.tied());
        let kv_bytes_per_token: u64 = fp.kv_bytes_per_token[layers.clone()].iter().sum();
        let cache_budget = if req.cache_budget > 0 {
            req.cache_budget
        } else if let Some(b) = cfg.kv_budget_bytes {
            b
        } else {
            // What is free now, less a margin for activations.
            let free = device::probe(&self.name)
                .map(|c| c.memory_available)
                .unwrap_or(0);
            (free as f64 * 0.8) as u64
        };
        let model_id = if src.model_id.is_empty() {
            src.path.clone()
        } else {
            src.model_id.clone()
        };
        let info = ShardInfo {
            model_id,
            layer_start: req.layer_start,
            layer_end: req.layer_end,
            embed: req.embed,
            head: req.head,
            weight_bytes: total,
        };
        tracing::info!(
            "loaded layers {}..{} ({:.1} MB){}{}",
            req.layer_start,
            req.layer_end,
            total as f64 / 1e6,
            if req.embed { " + embedding" } else { "" },
            if req.head { " + head" } else { "" }
        );
        self.caches = (layers.start..layers.end)
            .map(|_| SlotCache::new())
            .collect();
        self.stage = Some(Stage {
            model: Arc::new(model),
            info: info.clone(),
            next: Some(req.next.clone()).filter(|n| !n.is_empty()),
            first: Some(req.first.clone()).filter(|n| !n.is_empty()),
            compression: Compression::try_from(req.compression).unwrap_or(Compression::None),
            cache_budget,
            kv_bytes_per_token,
        });
        if cfg.warm_up {
            tracing::info!(
                "compiling this stage's GPU kernels (on a machine's first run, minutes)"
            );
            if let Err(e) = self.warm_up() {
                // Requests will compile them instead, or fail on their own.
                tracing::warn!("warming up failed: {e}");
            }
        }
        let _ = progress.blocking_send(Ok(LoadProgress {
            bytes_loaded: total,
            bytes_total: total,
            done: true,
            shard: Some(info),
        }));
        Ok(())
    }
}
