//! One step of one sequence through a stage, as the engine takes it (made
//! from the wire's `ForwardRequest` in `wire`, which checks it).
use crate::codec::Encoded;
use crate::sample::Sampling;

/// One step of one sequence: the positions it runs, and on a sequence's
/// first step how the sequence starts.
#[derive(Clone, Debug, Default)]
pub struct Step {
    /// The sequence; its cache on each stage is keyed by this id.
    pub sequence: String,
    /// Position of the step's first token (the cache length before it).
    pub offset: u32,
    /// Token ids of the step's positions: the first stage's input, and the
    /// history of the last stage's sampler when it needs one.
    pub tokens: Vec<u32>,
    /// Activations `[1, L, hidden]` from the previous stage (not to the
    /// first), of a float dtype.
    pub hidden: Option<Encoded>,
    /// Sample a token at its end (not for a prompt's chunks).
    pub sample: bool,
    /// Return the log-probabilities the token was drawn from.
    pub logprobs: bool,
    /// First step: how the sequence samples (greedy when absent).
    pub sampling: Option<Sampling>,
    /// First step: positions the sequence may grow to, for the KV budget.
    pub max_length: u32,
    /// First step: start from this kept prefix's first `offset` positions.
    pub prefix: Option<String>,
    /// First step: keep the cache under this id when the sequence ends.
    pub keep_as: Option<String>,
    /// Kept prefixes to drop (passed on down the chain).
    pub forget_prefixes: Vec<String>,
    /// Tokens the pipeline makes by itself after this one (ring steps).
    pub decode_ahead: u32,
    /// In ring steps: each earlier stage's compute time, first stage first.
    pub stage_micros: Vec<u32>,
    /// Ring steps the first stage may run ahead of the coordinator.
    pub ring_credit: u32,
}

impl Step {
    /// The positions the step runs: its activations' rows, or its tokens.
    pub fn positions(&self) -> u32 {
        match &self.hidden {
            Some(h) => h.shape()[1] as u32,
            None => self.tokens.len() as u32,
        }
    }
}
