//! The coordinator: the side of a pipeline that holds no layers. It reaches
//! the workers, plans the model over them, loads each stage (pushing files a
//! worker lacks), runs sequences through the chain and, when a stage dies,
//! re-plans and replays.
//!
//! - `cluster`: one plan over a chain of workers, and loading it;
//! - `link`: reaching one worker, over gRPC or inside this process;
//! - `files`: model files pushed to a worker without a copy;
//! - `sequence`: a sequence running through the chain (`RemoteTokens`);
//! - `ledger`: a sequence's bookkeeping (steps sent, replies, ring tokens);
//! - `late`: telling a slow stage from a dead one when a reply is late;
//! - `recovery`: re-planning around dead workers and replaying sequences.
mod cluster;
mod files;
mod late;
mod ledger;
mod link;
mod recovery;
mod sequence;

pub use cluster::{Cluster, ClusterOptions, Progress, StageHandle, WorkerSpec};
pub use link::Link;
pub use recovery::{ClusterHandle, RecoveringTokens, RecoveryEvent, RecoveryOptions};
pub use sequence::{RemoteTokens, SequenceSpec};
