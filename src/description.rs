//! A model without its weights: its config, what each part weighs, and its
//! tokenizer's files. A worker that can read a model sends this, so that a
//! coordinator holding no copy of the weights plans and tokenizes from it.
use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::models::ModelArgs;
use crate::sharding::Footprint;
use crate::tokenizer::Tokenizer;
use crate::weights::{resolve, Weights};

#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    pub config: Value,
    pub footprint: Footprint,
    /// tokenizer.json and tokenizer_config.json, by name.
    pub tokenizer_files: BTreeMap<String, Vec<u8>>,
}

/// The most bytes of tokenizer files taken (a large vocabulary's
/// tokenizer.json is some tens of MB).
pub const MAX_TOKENIZER_BYTES: usize = 256 << 20;

impl ModelDescription {
    /// Describes the model at `path_or_repo` as this process finds it,
    /// reading its header and tokenizer, no tensor data.
    pub fn of(path_or_repo: &str) -> Result<ModelDescription> {
        let weights = Weights::open(&resolve(path_or_repo)?)?;
        let (args, tied) = args_of(&weights)?;
        let footprint = Footprint::from_weights(&weights, &args, tied);
        let dir = tempfile::tempdir()?;
        Tokenizer::for_model(&weights)?.save(dir.path())?;
        let mut tokenizer_files = BTreeMap::new();
        for e in std::fs::read_dir(dir.path())? {
            let e = e?;
            tokenizer_files.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path())?,
            );
        }
        Ok(ModelDescription {
            config: weights.config.clone(),
            footprint,
            tokenizer_files,
        })
    }

    /// The model's arguments and whether its head is its embedding.
    pub fn args(&self) -> Result<(ModelArgs, bool)> {
        args_and_tying(&self.config, |m| {
            Error::InvalidArgument(format!("a worker's model description: {m}"))
        })
    }

    /// The tokenizer its files make.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let dir = tempfile::tempdir()?;
        for (name, bytes) in &self.tokenizer_files {
            // Names come from another process: plain file names only.
            if name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(Error::InvalidArgument(format!(
                    "tokenizer file name {name:?}"
                )));
            }
            std::fs::write(dir.path().join(name), bytes)?;
        }
        Tokenizer::from_dir(dir.path(), self.config.get("eos_token_id"))
    }
}

/// The arguments and tying of an opened model.
pub fn args_of(weights: &Weights) -> Result<(ModelArgs, bool)> {
    args_and_tying(&weights.config, |m| weights.invalid(m))
}

/// `config`'s arguments and whether its head is its embedding; `bad`
/// makes the error for a config that does not parse.
fn args_and_tying(config: &Value, bad: impl FnOnce(String) -> Error) -> Result<(ModelArgs, bool)> {
    let args: ModelArgs =
        serde_json::from_value(config.clone()).map_err(|e| bad(format!("config.json: {e}")))?;
    let tied = crate::models::is_tied(config, &args)?;
    Ok((args, tied))
}
