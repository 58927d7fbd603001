//! The crate's one error type. Foreign errors convert here, at one point.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An exception thrown inside MLX, caught at the C++ boundary.
    #[error("MLX error: {0}")]
    Mlx(String),
    /// A file or model that does not exist where it was looked for.
    #[error("{0}")]
    NotFound(String),
    /// A model whose files are present but unreadable or inconsistent.
    #[error("invalid model at {path}: {msg}")]
    InvalidModel { path: PathBuf, msg: String },
    /// A `model_type` with no implementation.
    #[error("unsupported model_type {model_type:?}; supported: {supported}")]
    UnsupportedArchitecture {
        model_type: String,
        supported: String,
    },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    /// A caller passed a value outside what the API accepts.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not enough memory for a request, for good: a model over the memory
    /// of the workers, a message over a worker's limit. Waiting cannot help.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A stage has no room for one more sequence right now: its KV budget
    /// is taken by running sequences, or it holds its most sequences. One
    /// of them ending makes room: the caller may wait and try again.
    #[error("{0}")]
    KvBudgetFull(String),
    /// A worker is not in the state a request assumes: it holds no shard
    /// (it restarted) or not the sequence (a re-plan dropped it). Planning
    /// the cluster again resolves it.
    #[error("{0}")]
    NotReady(String),
    /// A sequence whose KV cache needs more than a stage's whole budget:
    /// unlike `KvBudgetFull` (full for now), waiting cannot help.
    #[error("{detail}")]
    KvBudgetExceeded {
        need: u64,
        budget: u64,
        detail: String,
    },
    /// A stage no longer keeps the prefix a sequence asked to start from
    /// (evicted, or never kept): a cache miss, mended by computing the
    /// prompt again, never an error a caller should see.
    #[error("{0}")]
    PrefixMissing(String),
    /// A step got no reply past its deadline while every stage answered and
    /// none was busy: the step was lost on the way. Starting the sequence
    /// again on the same stages mends it; no re-plan is needed.
    #[error("{0}")]
    Stalled(String),
    /// One stage of the chain failed, could not be reached, lost its stream
    /// or gave no reply: `stage` is its name (its address where the name is
    /// not known), `address` where it listens (empty for the worker inside
    /// this process, whose `in-process:N` name is a detail). A re-plan over the
    /// workers still answering mends it.
    #[error("worker {}: {cause}", who(stage, address))]
    StageFailed {
        stage: String,
        address: String,
        cause: String,
    },
    /// The connection to the worker at `address` failed over TLS: its
    /// certificate was refused, or one side speaks TLS and the other not.
    /// Connecting again will not help; the configuration must change.
    #[error("worker {address}: {detail}")]
    Tls { address: String, detail: String },
    /// A failure of the cluster as a whole, not of one stage (no worker
    /// answers, a re-plan found no room); the message says what.
    #[error("{0}")]
    Worker(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How messages name a stage: `name (address)`, or one of them when the
/// other is empty or the same.
pub fn who(stage: &str, address: &str) -> String {
    if address.is_empty() || stage == address {
        stage.to_string()
    } else if stage.is_empty() {
        address.to_string()
    } else {
        format!("{stage} ({address})")
    }
}

impl Error {
    /// The failure of the stage named `stage` at `address`.
    pub fn stage_failed(
        stage: impl Into<String>,
        address: impl Into<String>,
        cause: impl Into<String>,
    ) -> Self {
        Error::StageFailed {
            stage: stage.into(),
            address: address.into(),
            cause: cause.into(),
        }
    }

    pub fn invalid_model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::InvalidModel {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Tokenizer(e.to_string())
    }
}

impl From<minijinja::Error> for Error {
    fn from(e: minijinja::Error) -> Self {
        // Include the causes: minijinja keeps the useful detail there.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        Error::Template(msg)
    }
}
