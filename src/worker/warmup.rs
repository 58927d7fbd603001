//! Compiling a stage's GPU kernels when it loads, not when requests come.
//!
//! MLX's CUDA backend compiles some kernels with NVRTC on first use, once per
//! kind of input, and keeps them on disk. The quantized matmul has one
//! kernel per row tile (fewer than 8 rows take a matrix-vector kernel), and
//! each took about 38 s to compile for a Qwen3-1.7B 8-bit stage on an H200:
//! the first decode batch of 8, then of 17 sequences, stopped every sequence
//! on the stage for that long (16 streams waited 30 s for a reply). So a
//! loaded stage first runs, on sequences of its own that it drops after, a
//! prompt chunk of each row count that picks another kernel and one batched
//! decode step.
use std::path::PathBuf;
use std::time::Instant;

use tokio::sync::oneshot;

use super::{Engine, Step};
use crate::codec;
use crate::error::{Error, Result};
use crate::mlx::{self, Array};
use crate::proto::Compression;

/// Row counts that pick different matmul kernels in MLX 0.32 (a vector
/// kernel below 8 rows, then tiles of 16, 32 and 64 rows).
const ROWS: [u32; 5] = [1, 8, 17, 33, 64];

/// Where MLX keeps the kernels it compiled: `~/.cache/mlx-dist/cuda-kernels`
/// (under `XDG_CACHE_HOME` if set) unless `MLX_PTX_CACHE_DIR` says
/// otherwise, so that they outlive a reboot (MLX's own default is the
/// temporary folder). Not under `MLX_DIST_CACHE`, which tests and benches
/// point at folders of their own. Takes effect only if MLX has compiled
/// nothing yet in this process: the first stage loaded sets it.
pub(super) fn keep_compiled_kernels() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MLX_PTX_CACHE_DIR").is_some() {
            return;
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
        if let Some(base) = base {
            std::env::set_var("MLX_PTX_CACHE_DIR", base.join("mlx-dist/cuda-kernels"));
        }
    });
}

impl Engine {
    /// Runs the warm-up steps (see the module's comment) and forgets them.
    pub(super) fn warm_up(&mut self) -> Result<()> {
        let started = Instant::now();
        let names: Vec<String> = (0..ROWS.len()).map(|i| format!("warm-up-{i}")).collect();
        let r = self.warm_up_steps(&names);
        for n in &names {
            self.end(n);
        }
        mlx::clear_cache();
        tracing::info!(
            "compiled this stage's kernels in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        r
    }

    fn warm_up_steps(&mut self, names: &[String]) -> Result<()> {
        for (name, &rows) in names.iter().zip(&ROWS) {
            let req = self.warm_up_request(name, 0, rows)?;
            self.step(req)?;
        }
        // Two sequences' decode rows in one batch: their cache rows are
        // gathered and written back, kernels of their own.
        let mut batch = Vec::new();
        let mut answers = Vec::new();
        for (name, &rows) in names.iter().zip(&ROWS).take(2) {
            let (tx, rx) = oneshot::channel();
            batch.push((self.warm_up_request(name, rows, 1)?, tx));
            answers.push(rx);
        }
        self.step_batch(batch);
        for mut rx in answers {
            match rx.try_recv() {
                Ok(r) => {
                    r?;
                }
                Err(_) => return Err(Error::Mlx("the warm-up batch gave no answer".into())),
            }
        }
        Ok(())
    }

    /// A step of `rows` positions from `offset` of warm-up sequence `seq`:
    /// token ids on the first stage, zero activations on the others.
    fn warm_up_request(&self, seq: &str, offset: u32, rows: u32) -> Result<Step> {
        let stage = self.stage.as_ref().expect("a stage is loaded");
        let model = &stage.model;
        let mut req = Step {
            sequence: seq.to_string(),
            offset,
            sample: true,
            max_length: offset + rows + 1,
            ..Default::default()
        };
        if stage.info.embed {
            req.tokens = vec![1; rows as usize];
        } else {
            let shape = [1, rows as i32, model.args.hidden_size];
            let h = Array::zeros(&shape, model.activation_dtype())?;
            req.hidden = Some(codec::encode(&h, Compression::None)?);
        }
        Ok(req)
    }
}
