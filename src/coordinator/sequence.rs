//! A sequence running through the pipeline (`RemoteTokens`, a
//! `TokenSource`): its prompt chunks, decode steps, ring credits, and the
//! wait on a late reply.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::generate::{check_prompt, TokenSource};
use crate::mlx::Array;
use crate::prefix::PrefixIndex;
use crate::proto::{ForwardReply, ForwardRequest, SamplingParams};
use crate::sample::Sampling;
use crate::util::{lock, runtime};

use super::cluster::{stage_error, worker_error, Cluster, StageHandle};
use super::late::{step_deadline, Late, LATE_DEADLINES};
use super::ledger::{Ledger, Next};
use super::link::Steps;

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
        self.check(spec)?;
        let prefix = self.prefix_for(spec);
        let mut r = self.open(spec, prefix).await?;
        while !r.prefill(PREFILL_IN_FLIGHT - 1).await? {}
        Ok(r)
    }

    /// Opens a sequence without running its prompt: `RemoteTokens::prefill`
    /// runs it a chunk at a time, so that the caller can step other
    /// sequences between chunks.
    pub async fn open(
        &self,
        spec: &SequenceSpec,
        prefix: Option<(String, usize)>,
    ) -> Result<RemoteTokens> {
        let chain = Chain {
            stages: self.stages.clone(),
            prefixes: self.prefixes.clone(),
            micros: self.last_stage_micros.clone(),
            prefill_chunk: self.prefill_chunk,
            ring: self.ring,
            step_timeout: self.step_timeout,
            transport: self.transport.clone(),
        };
        RemoteTokens::open(chain, spec.clone(), prefix).await
    }

    /// The longest kept prefix `spec` may start from.
    pub fn prefix_for(&self, spec: &SequenceSpec) -> Option<(String, usize)> {
        let procs = &spec.sampling.processors;
        // Penalties look back over the prompt, which a stage starting from a
        // kept prefix has not seen: such sequences compute it all.
        let penalties = procs.repetition_penalty.is_some()
            || procs.presence_penalty.is_some()
            || procs.frequency_penalty.is_some();
        // The last two prompt tokens run at least: the first chunk is
        // answered before the prompt's last step goes out, so a stage that
        // lacks the prefix says so then.
        if penalties {
            None
        } else {
            lock(&self.prefixes).lookup(&spec.prompt, 2)
        }
    }

    /// Checks a sequence's prompt and sampling against the model.
    pub fn check(&self, spec: &SequenceSpec) -> Result<()> {
        check_prompt(&spec.prompt, self.args.vocab_size)?;
        spec.sampling.sampler.validate()?;
        spec.sampling
            .processors
            .validate(self.args.vocab_size as usize)
    }
}

/// What a sequence's stream needs of the cluster: the stages and what
/// they keep.
#[derive(Clone)]
struct Chain {
    stages: Vec<StageHandle>,
    prefixes: Arc<std::sync::Mutex<PrefixIndex>>,
    micros: Arc<std::sync::Mutex<Vec<u32>>>,
    prefill_chunk: usize,
    ring: bool,
    step_timeout: Duration,
    transport: Arc<crate::transport::TransportConfig>,
}

/// The part of a prompt not yet sent.
struct Prefill {
    /// Chunks (cache only), then the last token, whose step samples.
    chunks: std::collections::VecDeque<Vec<u32>>,
    last: Vec<u32>,
    /// Sent with the first step.
    sampling: Option<SamplingParams>,
    max_length: u32,
    /// Tokens the ring makes after the first.
    ahead: u32,
    /// The kept prefix it starts from, if any (dropped on a miss).
    prefix: Option<String>,
}

/// What a sequence needs to start, or to start again from its history.
#[derive(Clone, Debug)]
pub struct SequenceSpec {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
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
    steps: Steps,
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
    /// The prompt still to send, while it runs a chunk at a time.
    prefill: Option<Prefill>,
    /// What it was opened on and with, to open it again without a prefix
    /// a stage turned out not to keep.
    chain: Chain,
    spec: SequenceSpec,
    /// `Cluster::step_timeout`, and how the stages are reached.
    step_timeout: Duration,
    pub(super) transport: Arc<crate::transport::TransportConfig>,
}

impl RemoteTokens {
    /// The id the workers know this sequence by.
    pub fn sequence_id(&self) -> &str {
        &self.seq
    }

    /// Opens the sequence's stream to the first stage; nothing runs yet.
    async fn open(
        chain: Chain,
        spec: SequenceSpec,
        prefix: Option<(String, usize)>,
    ) -> Result<RemoteTokens> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // Unique across coordinators too: ids also name kept prefixes.
        let seq = format!(
            "{:x}-{}",
            process_nonce(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let first = chain.stages[0].clone();
        let steps = first
            .link
            .forward()
            .await
            .map_err(|s| worker_error(&first, s))?;
        let sampling = SamplingParams::from(&spec.sampling);
        let prompt = &spec.prompt;
        let cached = prefix.as_ref().map_or(0, |p| p.1);
        let (head, last) = prompt[cached..].split_at(prompt.len() - cached - 1);
        // The chunks go out back to back: stage 1 prefills chunk k+1 while
        // stage 2 prefills chunk k.
        let step = spec.prefill_step.clamp(1, chain.prefill_chunk.max(1));
        let max_tokens = spec.max_tokens;
        let prefill = Prefill {
            chunks: head.chunks(step).map(<[u32]>::to_vec).collect(),
            last: last.to_vec(),
            sampling: Some(sampling),
            max_length: (prompt.len() + max_tokens) as u32,
            // The tokens after the first go round the ring by themselves.
            ahead: if chain.ring {
                max_tokens.saturating_sub(1).min(u32::MAX as usize) as u32
            } else {
                0
            },
            prefix: prefix.as_ref().map(|p| p.0.clone()),
        };
        Ok(RemoteTokens {
            keep: Some(seq.clone()),
            prefixes: chain.prefixes.clone(),
            forgets: Vec::new(),
            first_step: Some((prefix.map(|p| p.0).unwrap_or_default(), seq.clone())),
            seq,
            first,
            stages: chain.stages.clone(),
            steps,
            logprobs: spec.logprobs,
            ledger: Ledger::new(&prompt[..cached]),
            micros: chain.micros.clone(),
            failed: false,
            cached,
            prefill: Some(prefill),
            step_timeout: chain.step_timeout,
            transport: chain.transport.clone(),
            chain,
            spec,
        })
    }

    /// Sends the next part of the prompt; true once its last step (which
    /// samples the first token) is out. At most `in_flight` steps stay
    /// unanswered when it returns, except that the first chunk is always
    /// answered first: that is where a stage refuses the sequence (no room
    /// for its cache) or lacks the prefix it starts from.
    pub async fn prefill(&mut self, in_flight: usize) -> Result<bool> {
        match self.prefill_one(in_flight).await {
            Err(Error::PrefixMissing(why)) => {
                // A stage evicted it: a miss, computed again from scratch.
                tracing::debug!("{why}: the prompt runs without it");
                let id = self.prefill.as_ref().and_then(|p| p.prefix.clone());
                if let Some(id) = id {
                    lock(&self.prefixes).remove(&id);
                }
                self.failed = true;
                let again = RemoteTokens::open(self.chain.clone(), self.spec.clone(), None).await?;
                // The failed one's drop queues its forgets again.
                drop(std::mem::replace(self, again));
                Ok(false)
            }
            r => r,
        }
    }

    async fn prefill_one(&mut self, in_flight: usize) -> Result<bool> {
        let Some(p) = self.prefill.as_mut() else {
            return Ok(true);
        };
        let first = p.sampling.is_some();
        let max_length = p.max_length;
        if let Some(chunk) = p.chunks.pop_front() {
            let sampling = p.sampling.take();
            let only = p.chunks.is_empty();
            self.send(&chunk, false, sampling, max_length, 0).await?;
            // A prompt of one chunk goes on with its last step at once: the
            // chunk is answered while that step is out (a short prompt pays
            // no round trip more than it did before prompts were chunked).
            if first && only {
                return self.send_last().await;
            }
            let bound = if first { 0 } else { in_flight.max(1) };
            while self.ledger.in_flight() > bound {
                self.receive().await?;
            }
            return Ok(false);
        }
        self.send_last().await
    }

    /// Sends the prompt's last step, which samples the first token (and
    /// starts the ring); true.
    async fn send_last(&mut self) -> Result<bool> {
        let p = self.prefill.take().unwrap();
        self.send(&p.last, true, p.sampling, p.max_length, p.ahead)
            .await?;
        self.ledger.started(p.ahead);
        while self.ledger.in_flight() > 1 {
            self.receive().await?;
        }
        Ok(true)
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
        if !self.steps.send(req).await {
            // The stream broke: the reply read tells why.
            return Err(self.receive().await.err().unwrap_or_else(|| {
                let (name, address) = self.first.named();
                Error::stage_failed(name, address, "it closed the stream")
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
            if let Ok(r) = tokio::time::timeout(deadline, self.steps.message()).await {
                break r;
            }
            late += 1;
            let waited = (deadline * late).as_secs_f64();
            let first = format!("worker {}", self.first);
            match self.late_stages().await {
                Late::Silent(s, e) => {
                    let (name, address) = s.named();
                    return Err(Error::stage_failed(name, address, format!(
                        "it does not answer ({e}), and the pipeline from {first} gave no reply within {waited:.0} s"
                    )));
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
                    let (name, address) = s.named();
                    return Err(Error::stage_failed(name, address, format!(
                        "it has run one job for {:.0} s, and the pipeline from {first} gave no reply within {waited:.0} s",
                        busy.as_secs_f64()
                    )));
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
            Ok(None) => {
                let (name, address) = self.first.named();
                Err(Error::stage_failed(name, address, "it ended the stream"))
            }
            // A refusal names the stage it comes from, or is the first's.
            Err(s) => Err(stage_error(&self.first, &self.stages, s)),
        }
    }

    async fn next_async(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        if !self.ledger.pending() {
            return Err(Error::InvalidArgument("generation has ended".into()));
        }
        let reply = self.receive().await?;
        let token = reply.token.ok_or_else(|| {
            let (name, address) = self.stages.last().unwrap_or(&self.first).named();
            let why = format!("it returned no token for sequence {}", self.seq);
            Error::stage_failed(name, address, why)
        })?;
        let logprobs = reply
            .logprobs
            .as_ref()
            .map(crate::wire::decode)
            .transpose()?;
        match self.ledger.token_read(token, schedule_next) {
            Next::Credit => {
                // A broken stream shows in the next reply.
                let _ = self.steps.send_credit(&self.seq, 1).await;
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
        runtime().block_on(async {
            while !self.prefill(PREFILL_IN_FLIGHT - 1).await? {}
            self.next_async(schedule_next).await
        })
    }

    fn prefill_step(&mut self) -> Result<bool> {
        runtime().block_on(self.prefill(1))
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
            self.steps.close();
            let (link, seq) = (self.first.link.clone(), self.seq.clone());
            let release = async move { link.release(seq, Duration::from_secs(2)).await };
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime().spawn(release);
            } else {
                runtime().block_on(release);
            }
        } else {
            self.steps.close();
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
