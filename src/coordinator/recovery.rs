//! Surviving a dead worker: a `ClusterHandle` owns the live `Cluster` and
//! everything needed to plan it again; `RecoveringTokens` runs a sequence
//! on it and, when a stage fails, waits for a new plan over the workers
//! still answering and replays the prompt plus the tokens already produced,
//! so the caller sees one unbroken stream.
//!
//! Every re-plan bumps the cluster's epoch. Loading a shard on a worker
//! drops the sequences it held, so a sequence that started in an older
//! epoch fails at its next step and is simply restarted on the new chain.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::link::Link;
use super::{Cluster, ClusterOptions, Progress, RemoteTokens, SequenceSpec, WorkerSpec};
use crate::error::{Error, Result};
use crate::generate::TokenSource;
use crate::mlx::Array;
use crate::sharding::Strategy;
use crate::util::{lock, runtime};

/// How recovery behaves.
#[derive(Clone, Debug)]
pub struct RecoveryOptions {
    /// Re-plan when a stage fails (otherwise the request fails at once).
    pub enabled: bool,
    /// How long to keep trying to find room for the model when the workers
    /// left cannot hold it, waiting for one to come back.
    pub wait: Duration,
    /// How long a worker may take to answer the probe of a re-plan.
    pub probe_timeout: Duration,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            enabled: true,
            wait: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(2),
        }
    }
}

/// What happened at one re-plan, for status pages.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoveryEvent {
    /// Seconds since the Unix epoch.
    pub at: f64,
    pub epoch: u64,
    /// Why it re-planned.
    pub reason: String,
    /// Workers left out because they did not answer.
    pub excluded: Vec<String>,
    /// Seconds the re-plan took (probing and loading).
    pub seconds: f64,
}

/// A cluster that re-plans itself over the workers still alive.
pub struct ClusterHandle {
    source: String,
    opts: ClusterOptions,
    pub recovery: RecoveryOptions,
    /// Every worker configured or announced, in order.
    workers: Mutex<Vec<WorkerSpec>>,
    current: Mutex<Arc<Cluster>>,
    epoch: AtomicU64,
    /// One re-plan at a time; others wait for it and use its result.
    replanning: tokio::sync::Mutex<()>,
    /// Workers left out of the current plan because they did not answer.
    excluded: Mutex<Vec<String>>,
    events: Mutex<Vec<RecoveryEvent>>,
}

impl ClusterHandle {
    /// Plans `source` over `workers` and loads it (see `Cluster::load`).
    pub async fn load(
        source: &str,
        workers: &[WorkerSpec],
        opts: &ClusterOptions,
        recovery: RecoveryOptions,
        progress: Progress<'_>,
    ) -> Result<ClusterHandle> {
        let cluster = Cluster::load(source, workers, opts, progress).await?;
        Ok(ClusterHandle {
            source: source.to_string(),
            opts: opts.clone(),
            recovery,
            workers: Mutex::new(workers.to_vec()),
            current: Mutex::new(Arc::new(cluster)),
            epoch: AtomicU64::new(0),
            replanning: tokio::sync::Mutex::new(()),
            excluded: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        })
    }

    /// The cluster as planned now.
    pub fn current(&self) -> Arc<Cluster> {
        lock(&self.current).clone()
    }

    /// Re-plans so far.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Every worker configured or announced.
    pub fn workers(&self) -> Vec<WorkerSpec> {
        lock(&self.workers).clone()
    }

    /// Workers left out of the current plan because they did not answer.
    pub fn excluded(&self) -> Vec<String> {
        lock(&self.excluded).clone()
    }

    pub fn events(&self) -> Vec<RecoveryEvent> {
        lock(&self.events).clone()
    }

    /// Adds a worker (one that announced itself); true if it was new.
    pub fn add_worker(&self, address: &str) -> bool {
        let mut w = lock(&self.workers);
        if w.iter().any(|s| s.address == address) {
            return false;
        }
        w.push(WorkerSpec {
            address: address.to_string(),
            declared: None,
        });
        true
    }

    /// Whether a worker left out of the plan answers again.
    pub async fn excluded_back(&self) -> bool {
        let excluded = self.excluded();
        if excluded.is_empty() {
            return false;
        }
        let probes = excluded.iter().map(|a| self.probe(a));
        futures::future::join_all(probes)
            .await
            .into_iter()
            .any(|ok| ok)
    }

    async fn probe(&self, address: &str) -> bool {
        let t = self.recovery.probe_timeout;
        let ask = async {
            let mut link = Link::open(address, t, &self.opts.transport).await.ok()?;
            link.device_info().await.ok()
        };
        matches!(tokio::time::timeout(t, ask).await, Ok(Some(_)))
    }

    /// Plans the model again over the workers that answer, unless the
    /// cluster already moved past `seen_epoch` (another caller re-planned
    /// while this one waited). Keeps trying for `recovery.wait` when the
    /// workers left cannot hold the model.
    pub async fn replan(&self, seen_epoch: u64, reason: &str) -> Result<Arc<Cluster>> {
        let _one = self.replanning.lock().await;
        if self.epoch() != seen_epoch {
            return Ok(self.current());
        }
        let started = Instant::now();
        let deadline = started + self.recovery.wait;
        tracing::warn!("re-planning the cluster: {reason}");
        loop {
            let specs = self.workers();
            let alive =
                futures::future::join_all(specs.iter().map(|s| self.probe(&s.address))).await;
            let (up, down): (Vec<_>, Vec<_>) = specs.iter().zip(alive).partition(|(_, ok)| *ok);
            let up: Vec<WorkerSpec> = up.into_iter().map(|(s, _)| s.clone()).collect();
            let down: Vec<String> = down.into_iter().map(|(s, _)| s.address.clone()).collect();
            let why = if up.is_empty() {
                Error::Worker(format!("no worker answers (tried {})", specs.len()))
            } else {
                let mut opts = self.opts.clone();
                opts.connect_timeout = self.recovery.probe_timeout;
                opts.strategy = surviving_strategy(&opts.strategy, &specs, &up);
                let quiet = |_: usize, _: u64, _: u64, _: &str| {};
                match Cluster::load(&self.source, &up, &opts, &quiet).await {
                    Ok(mut c) => {
                        let old = self.current();
                        c.last_stage_micros = old.last_stage_micros.clone();
                        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                        *lock(&self.current) = Arc::new(c);
                        *lock(&self.excluded) = down.clone();
                        let event = RecoveryEvent {
                            at: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0.0, |d| d.as_secs_f64()),
                            epoch,
                            reason: reason.to_string(),
                            excluded: down,
                            seconds: started.elapsed().as_secs_f64(),
                        };
                        tracing::warn!(
                            "re-planned in {:.2} s over {} workers (epoch {epoch})",
                            event.seconds,
                            up.len()
                        );
                        let mut events = lock(&self.events);
                        events.push(event);
                        let n = events.len();
                        events.drain(..n.saturating_sub(32));
                        return Ok(self.current());
                    }
                    Err(e @ (Error::NotFound(_) | Error::InvalidModel { .. })) => return Err(e),
                    Err(e) => e,
                }
            };
            if Instant::now() >= deadline {
                return Err(Error::Worker(format!(
                    "the cluster could not recover within {:.0} s ({reason}); last attempt: {why}",
                    self.recovery.wait.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Starts a sequence, re-planning first when the chain is broken. With
    /// `deferred`, only its prompt's first chunk runs here (the stages
    /// admit the sequence then); `TokenSource::prefill_step` runs the rest.
    pub fn start(self: &Arc<Self>, run: SequenceSpec, deferred: bool) -> Result<RecoveringTokens> {
        let mut attempts = 0;
        loop {
            let cluster = self.current();
            let epoch = self.epoch();
            let r = runtime().block_on(async {
                if !deferred {
                    return cluster.start(&run).await;
                }
                cluster.check(&run)?;
                let mut inner = cluster.open(&run, cluster.prefix_for(&run)).await?;
                inner.prefill(1).await?;
                Ok(inner)
            });
            match r {
                Ok(inner) => {
                    return Ok(RecoveringTokens {
                        handle: self.clone(),
                        epoch,
                        cached: inner.cached,
                        inner,
                        produced: Vec::new(),
                        run,
                        recoveries: 0,
                    })
                }
                Err(e) if attempts < 3 && self.mend(&e, epoch).is_some() => {
                    attempts += 1;
                    runtime().block_on(self.replan(epoch, &e.to_string()))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How a sequence of `epoch` that failed with `e` goes on, if it does.
    fn mend(&self, e: &Error, epoch: u64) -> Option<Mend> {
        mend(e, self.recovery.enabled, self.epoch() != epoch)
    }
}

/// How a failed sequence is mended.
#[derive(Debug, PartialEq, Eq)]
enum Mend {
    /// Every stage still answers (a lost step): replay on the same chain.
    SameChain,
    /// A stage failed, or the plan changed under the sequence: re-plan
    /// (or take the plan made since) and replay on it.
    Replan,
}

/// Which failures recovery mends, by kind: a failed, unready or stalled
/// stage, or any error of a sequence whose plan was replaced meanwhile (its
/// stages dropped it). Anything else (a bad request, a full KV budget, a
/// TLS mismatch) is the caller's.
fn mend(e: &Error, enabled: bool, replanned: bool) -> Option<Mend> {
    if !enabled {
        return None;
    }
    match e {
        Error::Stalled(_) if !replanned => Some(Mend::SameChain),
        Error::StageFailed { .. } | Error::NotReady(_) | Error::Worker(_) | Error::Stalled(_) => {
            Some(Mend::Replan)
        }
        _ if replanned => Some(Mend::Replan),
        _ => None,
    }
}

/// What a sequence restarts as after `produced` tokens: its prompt followed
/// by them, for the tokens it still owes (at least one, so a sequence that
/// failed on its last step still yields it).
fn replay(run: &SequenceSpec, produced: &[u32]) -> SequenceSpec {
    let mut prompt = run.prompt.clone();
    prompt.extend_from_slice(produced);
    SequenceSpec {
        prompt,
        max_tokens: run.max_tokens.saturating_sub(produced.len()).max(1),
        ..run.clone()
    }
}

/// With fewer workers, custom proportions keep those of the survivors.
fn surviving_strategy(s: &Strategy, all: &[WorkerSpec], up: &[WorkerSpec]) -> Strategy {
    match s {
        Strategy::Custom(p) if p.len() == all.len() && up.len() < all.len() => Strategy::Custom(
            all.iter()
                .zip(p)
                .filter(|(w, _)| up.iter().any(|u| u.address == w.address))
                .map(|(_, &x)| x)
                .collect(),
        ),
        Strategy::Custom(p) if p.len() != up.len() => Strategy::Uniform,
        other => other.clone(),
    }
}

/// A sequence on a `ClusterHandle` that outlives failed stages: errors of
/// a failed stage turn into a re-plan and a replay, not into an error.
pub struct RecoveringTokens {
    handle: Arc<ClusterHandle>,
    /// The epoch of the chain `inner` runs on.
    epoch: u64,
    inner: RemoteTokens,
    produced: Vec<u32>,
    run: SequenceSpec,
    /// Times this sequence was restarted on a new plan.
    pub recoveries: u32,
    /// Prompt positions its first start took from a kept prefix.
    cached: usize,
}

impl RecoveringTokens {
    fn resume(&mut self, why: Error) -> Result<()> {
        let handle = self.handle.clone();
        let mut last = why;
        for _ in 0..3 {
            let Some(how) = handle.mend(&last, self.epoch) else {
                return Err(last);
            };
            tracing::warn!(
                sequence = %self.inner.sequence_id(),
                "stopped after {} tokens: {last}; resuming",
                self.produced.len()
            );
            let cluster = match how {
                Mend::SameChain => handle.current(),
                Mend::Replan => runtime().block_on(handle.replan(self.epoch, &last.to_string()))?,
            };
            let epoch = handle.epoch();
            let again = replay(&self.run, &self.produced);
            match runtime().block_on(cluster.start(&again)) {
                Ok(inner) => {
                    self.inner = inner;
                    self.epoch = epoch;
                    self.recoveries += 1;
                    return Ok(());
                }
                Err(e) => {
                    // The new chain failed too: the next re-plan must not skip.
                    self.epoch = epoch;
                    last = e;
                }
            }
        }
        Err(last)
    }
}

impl TokenSource for RecoveringTokens {
    fn cached_tokens(&self) -> usize {
        self.cached
    }

    fn prefill_step(&mut self) -> Result<bool> {
        match runtime().block_on(self.inner.prefill(1)) {
            Ok(done) => Ok(done),
            // The replay runs the whole prompt again at once.
            Err(e) => self.resume(e).map(|()| true),
        }
    }

    fn next_token(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        loop {
            match self.inner.next_token(schedule_next) {
                Ok((t, lp)) => {
                    self.produced.push(t);
                    return Ok((t, lp));
                }
                Err(e) => self.resume(e)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(prompt: &[u32], max_tokens: usize) -> SequenceSpec {
        SequenceSpec {
            prompt: prompt.to_vec(),
            sampling: Default::default(),
            max_tokens,
            prefill_step: 16,
            logprobs: false,
        }
    }

    #[test]
    fn a_replay_runs_the_prompt_and_the_tokens_produced_for_what_is_left() {
        let run = spec(&[1, 2, 3], 10);
        let again = replay(&run, &[7, 8]);
        assert_eq!(again.prompt, vec![1, 2, 3, 7, 8]);
        assert_eq!(again.max_tokens, 8);
        assert_eq!(again.prefill_step, 16);
        // Nothing produced yet: the same sequence again.
        assert_eq!(replay(&run, &[]).prompt, run.prompt);
        assert_eq!(replay(&run, &[]).max_tokens, 10);
    }

    #[test]
    fn a_replay_after_the_last_token_still_asks_for_one() {
        let run = spec(&[1], 2);
        assert_eq!(replay(&run, &[5, 6]).max_tokens, 1);
        assert_eq!(replay(&run, &[5, 6, 7]).max_tokens, 1);
    }

    #[test]
    fn a_lost_step_replays_on_the_same_chain_and_a_failed_stage_replans() {
        let stalled = Error::Stalled("no reply".into());
        let dead = Error::Worker("worker a failed".into());
        assert_eq!(mend(&stalled, true, false), Some(Mend::SameChain));
        assert_eq!(mend(&dead, true, false), Some(Mend::Replan));
        // The plan changed meanwhile: its chain is gone, whatever the error.
        assert_eq!(mend(&stalled, true, true), Some(Mend::Replan));
        let dropped = Error::InvalidArgument("unknown sequence".into());
        assert_eq!(mend(&dropped, true, true), Some(Mend::Replan));
    }

    #[test]
    fn every_kind_of_failed_stage_replans_by_kind() {
        let failed = Error::stage_failed("w1", "10.0.0.2:7000", "its stream ended");
        let unready = Error::NotReady("worker w1: holds no model".into());
        for e in [&failed, &unready] {
            assert_eq!(mend(e, true, false), Some(Mend::Replan), "{e}");
            assert_eq!(mend(e, true, true), Some(Mend::Replan), "{e}");
            assert_eq!(mend(e, false, false), None, "{e}");
        }
        // What no re-plan mends: the configuration, or the request itself.
        let tls = Error::Tls {
            address: "10.0.0.2:7000".into(),
            detail: "TLS refused".into(),
        };
        let full = Error::KvBudgetFull("no room now".into());
        let oom = Error::ResourceExhausted("the model does not fit".into());
        for e in [&tls, &full, &oom] {
            assert_eq!(mend(e, true, false), None, "{e}");
        }
    }

    #[test]
    fn the_callers_errors_and_disabled_recovery_are_not_mended() {
        let bad = Error::InvalidArgument("bad".into());
        assert_eq!(mend(&bad, true, false), None);
        let full = Error::KvBudgetExceeded {
            need: 2,
            budget: 1,
            detail: String::new(),
        };
        assert_eq!(mend(&full, true, false), None);
        assert_eq!(mend(&Error::Worker("dead".into()), false, false), None);
        assert_eq!(mend(&Error::Stalled("lost".into()), false, true), None);
    }

    #[test]
    fn survivors_keep_their_custom_proportions() {
        let w = |a: &str| WorkerSpec {
            address: a.into(),
            declared: None,
        };
        let all = [w("a"), w("b"), w("c")];
        let up = [w("a"), w("c")];
        let s = surviving_strategy(&Strategy::Custom(vec![1.0, 2.0, 3.0]), &all, &up);
        assert!(matches!(s, Strategy::Custom(p) if p == vec![1.0, 3.0]));
        // Proportions that fit neither the old workers nor the survivors.
        let s = surviving_strategy(&Strategy::Custom(vec![1.0, 2.0, 3.0, 4.0]), &all, &up);
        assert!(matches!(s, Strategy::Uniform));
        assert!(matches!(
            surviving_strategy(&Strategy::Balanced, &all, &up),
            Strategy::Balanced
        ));
    }
}
