//! A sequence running through the pipeline (`RemoteTokens`, a
//! `TokenSource`): its prompt chunks, decode steps, ring credits, and the
//! wait on a late reply.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::codec;
use crate::error::{Error, Result};
use crate::generate::{check_prompt, TokenSource};
use crate::mlx::Array;
use crate::prefix::PrefixIndex;
use crate::proto::{ForwardReply, ForwardRequest, ReleaseRequest, SamplingParams};
use crate::sample::{ProcessorConfig, SamplerConfig};
use crate::util::{lock, runtime};

use super::cluster::{worker_error, Cluster, StageHandle};
use super::late::{step_deadline, Late, LATE_DEADLINES};
use super::ledger::{Ledger, Next};

/// Prompt chunks of one sequence in flight through the pipeline at once.
const PREFILL_IN_FLIGHT: usize = 4;

/// Ring steps a sequence may run ahead of the tokens read here: enough that
/// a reader keeping up never stalls the ring, few enough that one stopping
/// early wastes little.
const RING_CREDIT: u32 = 2;

impl Cluster {
    /// Starts a sequence: opens its stream to the first stage and prefills
    /// the prompt through the chain.
    pub async fn start(&self, spec: &SequenceSpec) -> Result<RemoteTokens> {
        let (prompt, sampler, procs) = (&spec.prompt, &spec.sampler, &spec.processors);
        check_prompt(prompt, self.args.vocab_size)?;
        let vocab = self.args.vocab_size as u32;
        sampler.validate()?;
        procs.validate(vocab as usize)?;
        // Penalties look back over the prompt, which a stage starting from a
        // kept prefix has not seen: such sequences compute it all.
        let penalties = procs.repetition_penalty.is_some()
            || procs.presence_penalty.is_some()
            || procs.frequency_penalty.is_some();
        // The last two prompt tokens run at least: the step before the last
        // is answered before this returns, so a stage that lacks the prefix
        // says so here (the last step's answer is the first token, read
        // later), and `cached_tokens` is known when it returns.
        let prefix = if penalties {
            None
        } else {
            lock(&self.prefixes).lookup(prompt, 2)
        };
        let run = |prefix| self.start_from(spec, prefix);
        match (run(prefix.clone()).await, prefix) {
            (Err(Error::PrefixMissing(why)), Some((id, _))) => {
                // A stage evicted it: a miss, computed again from scratch.
                tracing::debug!("{why}: the prompt runs without it");
                lock(&self.prefixes).remove(&id);
                run(None).await
            }
            (r, _) => r,
        }
    }

    async fn start_from(
        &self,
        spec: &SequenceSpec,
        prefix: Option<(String, usize)>,
    ) -> Result<RemoteTokens> {
        let SequenceSpec {
            prompt,
            sampler,
            processors: procs,
            max_tokens,
            prefill_step,
            logprobs,
        } = spec;
        let (max_tokens, prefill_step, logprobs) = (*max_tokens, *prefill_step, *logprobs);
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // Unique across coordinators too: ids also name kept prefixes.
        let seq = format!(
            "{:x}-{}",
            process_nonce(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let first = self.stages[0].clone();
        let mut client = first.client.clone();
        let (tx, rx) = mpsc::channel(4);
        let replies = client
            .forward(ReceiverStream::new(rx))
            .await
            .map_err(|s| worker_error(&first, s))?
            .into_inner();
        let sampling = SamplingParams {
            temp: sampler.temp,
            top_p: sampler.top_p,
            min_p: sampler.min_p,
            min_tokens_to_keep: sampler.min_tokens_to_keep,
            top_k: sampler.top_k,
            seed: sampler.seed,
            repetition_penalty: procs.repetition_penalty,
            repetition_context_size: procs.repetition_context_size as u32,
            presence_penalty: procs.presence_penalty,
            presence_context_size: procs.presence_context_size as u32,
            frequency_penalty: procs.frequency_penalty,
            frequency_context_size: procs.frequency_context_size as u32,
            logit_bias: procs.logit_bias.iter().copied().collect(),
        };
        let cached = prefix.as_ref().map_or(0, |p| p.1);
        let mut r = RemoteTokens {
            keep: Some(seq.clone()),
            prefixes: self.prefixes.clone(),
            forgets: Vec::new(),
            first_step: Some((prefix.map(|p| p.0).unwrap_or_default(), seq.clone())),
            seq,
            first,
            stages: self.stages.clone(),
            tx,
            replies,
            logprobs,
            ledger: Ledger::new(&prompt[..cached]),
            micros: self.last_stage_micros.clone(),
            step_timeout: self.step_timeout,
            transport: self.transport.clone(),
            failed: false,
            cached,
        };
        let max_length = (prompt.len() + max_tokens) as u32;
        let (head, last) = prompt[cached..].split_at(prompt.len() - cached - 1);
        let mut sampling = Some(sampling);
        // The chunks go out back to back: stage 1 prefills chunk k+1 while
        // stage 2 prefills chunk k. A few at a time, so that neither side's
        // buffers fill while the other waits.
        let step = prefill_step.clamp(1, self.prefill_chunk.max(1));
        for chunk in head.chunks(step) {
            r.send(chunk, false, sampling.take(), max_length, 0).await?;
            if r.ledger.in_flight() >= PREFILL_IN_FLIGHT {
                r.receive().await?;
            }
        }
        // The tokens after the first go round the ring by themselves.
        let ahead = if self.ring {
            max_tokens.saturating_sub(1).min(u32::MAX as usize) as u32
        } else {
            0
        };
        r.send(last, true, sampling.take(), max_length, ahead)
            .await?;
        r.ledger.started(ahead);
        while r.ledger.in_flight() > 1 {
            r.receive().await?;
        }
        Ok(r)
    }
}

/// What a sequence needs to start, or to start again from its history.
#[derive(Clone, Debug)]
pub struct SequenceSpec {
    pub prompt: Vec<u32>,
    pub sampler: SamplerConfig,
    pub processors: ProcessorConfig,
    pub max_tokens: usize,
    pub prefill_step: usize,
    pub logprobs: bool,
}

/// A sequence running through the pipeline.
pub struct RemoteTokens {
    seq: String,
    first: StageHandle,
    /// Every stage, asked whether it still answers when a reply is late.
    pub(super) stages: Vec<StageHandle>,
    tx: mpsc::Sender<ForwardRequest>,
    replies: Streaming<ForwardReply>,
    logprobs: bool,
    /// Steps sent, replies read, ring tokens, and what the stages hold.
    ledger: Ledger,
    failed: bool,
    /// Prompt positions taken from a kept prefix.
    pub cached: usize,
    /// (prefix to start from, id to keep this sequence as), on the first step.
    first_step: Option<(String, String)>,
    /// The id the stages keep this sequence's cache as, to note at the end
    /// in `prefixes`.
    keep: Option<String>,
    prefixes: Arc<std::sync::Mutex<PrefixIndex>>,
    /// Kept prefixes the first step told the stages to forget: queued again
    /// if the sequence fails (they may not have reached every stage).
    forgets: Vec<String>,
    micros: Arc<std::sync::Mutex<Vec<u32>>>,
    /// `Cluster::step_timeout`, and how the stages are reached.
    step_timeout: Duration,
    pub(super) transport: Arc<crate::transport::TransportConfig>,
}

impl RemoteTokens {
    /// The id the workers know this sequence by.
    pub fn sequence_id(&self) -> &str {
        &self.seq
    }

    async fn send(
        &mut self,
        tokens: &[u32],
        sample: bool,
        sampling: Option<SamplingParams>,
        max_length: u32,
        decode_ahead: u32,
    ) -> Result<()> {
        let first = self.first_step.take();
        let forget_prefixes = if first.is_some() {
            self.forgets = lock(&self.prefixes).take_forgotten();
            self.forgets.clone()
        } else {
            Vec::new()
        };
        let (prefix_id, keep_as) = first.unwrap_or_default();
        let offset = self.ledger.sent(tokens);
        let req = ForwardRequest {
            sequence_id: self.seq.clone(),
            offset,
            tokens: tokens.to_vec(),
            hidden: None,
            sample,
            sampling,
            logprobs: self.logprobs && sample,
            max_length,
            prefix_id,
            keep_as,
            decode_ahead,
            stage_micros: Vec::new(),
            ring_credit: if decode_ahead > 0 { RING_CREDIT } else { 0 },
            forget_prefixes,
        };
        if self.tx.send(req).await.is_err() {
            // The stream broke: the reply read tells why.
            return Err(self.receive().await.err().unwrap_or_else(|| {
                Error::Worker(format!("worker {} closed the stream", self.first))
            }));
        }
        Ok(())
    }

    async fn receive(&mut self) -> Result<ForwardReply> {
        let r = self.receive_one().await;
        self.failed |= r.is_err();
        r
    }

    async fn receive_one(&mut self) -> Result<ForwardReply> {
        let deadline = step_deadline(self.step_timeout, self.ledger.in_flight_tokens());
        let mut late = 0;
        let reply = loop {
            // Reading a stream's next message is cancel-safe: a timeout
            // loses nothing, and the wait can go on.
            if let Ok(r) = tokio::time::timeout(deadline, self.replies.message()).await {
                break r;
            }
            late += 1;
            let waited = (deadline * late).as_secs_f64();
            let first = format!("worker {}", self.first);
            match self.late_stages().await {
                Late::Silent(s, e) => {
                    return Err(Error::Worker(format!(
                        "the pipeline from {first} gave no reply within {waited:.0} s, and worker {s} does not answer: {e}"
                    )))
                }
                Late::Idle => {
                    // Nothing computes anywhere and yet no reply came: the
                    // step is lost, and waiting longer would wait forever.
                    return Err(Error::Stalled(format!(
                        "sequence {}: the pipeline from {first} gave no reply within {waited:.0} s while every stage answered and none was busy",
                        self.seq
                    )));
                }
                Late::Busy(s, busy) if late < LATE_DEADLINES => tracing::warn!(
                    sequence = %self.seq,
                    "no reply from the pipeline for {waited:.0} s: worker {s} has run one job for {:.0} s (compiling GPU kernels for a new shape, or a long prompt chunk); waiting",
                    busy.as_secs_f64()
                ),
                Late::Busy(s, busy) => {
                    return Err(Error::Worker(format!(
                        "the pipeline from {first} gave no reply within {waited:.0} s; worker {s} has run one job for {:.0} s",
                        busy.as_secs_f64()
                    )))
                }
            }
        };
        match reply {
            Ok(Some(r)) => {
                self.ledger.replied();
                if let Ok(mut m) = self.micros.lock() {
                    *m = r.stage_micros.clone();
                }
                Ok(r)
            }
            Ok(None) => Err(Error::Worker(format!(
                "worker {} ended the stream",
                self.first
            ))),
            Err(s) if s.code() == tonic::Code::Unavailable && !s.message().contains("stage") => {
                Err(Error::Worker(format!(
                    "worker {} failed: {}",
                    self.first,
                    s.message()
                )))
            }
            Err(s) => Err(worker_error(&self.first, s)),
        }
    }

    async fn next_async(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        if !self.ledger.pending() {
            return Err(Error::InvalidArgument("generation has ended".into()));
        }
        let reply = self.receive().await?;
        let token = reply.token.ok_or_else(|| {
            Error::Worker(format!(
                "the last stage returned no token for sequence {}",
                self.seq
            ))
        })?;
        let logprobs = reply.logprobs.as_ref().map(codec::decode).transpose()?;
        match self.ledger.token_read(token, schedule_next) {
            Next::Credit => {
                let credit = ForwardRequest {
                    sequence_id: self.seq.clone(),
                    ring_credit: 1,
                    ..Default::default()
                };
                // A broken stream shows in the next reply.
                let _ = self.tx.send(credit).await;
            }
            // The next step is on its way while the caller handles this token.
            Next::Step(t) => self.send(&[t], true, None, 0, 0).await?,
            Next::Nothing => {}
        }
        Ok((token, logprobs))
    }
}

impl TokenSource for RemoteTokens {
    fn next_token(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        runtime().block_on(self.next_async(schedule_next))
    }

    fn cached_tokens(&self) -> usize {
        self.cached
    }
}

impl Drop for RemoteTokens {
    /// The stages keep the cache of a sequence that ended well (closing the
    /// stream releases it there): note what it holds for later prompts.
    fn drop(&mut self) {
        if !self.failed && self.ledger.ring_running() {
            // Steps still go round the ring: end the stream, then release
            // the sequence at the first stage, behind its step in flight
            // there, so that a sequence started next finds it gone.
            drop(std::mem::replace(&mut self.tx, mpsc::channel(1).0));
            let mut client = self.first.client.clone();
            let req = ReleaseRequest {
                sequence_id: self.seq.clone(),
            };
            let release = async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.release(req)).await;
            };
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime().spawn(release);
            } else {
                runtime().block_on(release);
            }
        }
        if let Some(id) = self.keep.take() {
            let mut index = lock(&self.prefixes);
            if self.failed {
                // A stage before the one that failed may keep it, and the
                // forgets its first step carried may not have gone past it.
                index.requeue(std::mem::take(&mut self.forgets));
                index.remove(&id);
            } else {
                index.insert(id, self.ledger.confirmed());
            }
        }
    }
}

/// A random number fixed for this process, so that sequence ids of
/// different coordinators never collide on a shared worker.
fn process_nonce() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    })
}
