//! The engine thread: its job loop, one sequence's step, and what a step
//! sends on.
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::ahead::Prepared;
use super::{draw, micros_since, status, Engine, EngineStats, Job, Pending, Step, StepOut};
use crate::cache::Caches;
use crate::codec::{self, Encoded};
use crate::error::{Error, Result};
use crate::mlx::{self, Array};
use crate::proto::Compression;
use crate::util::lock;

impl Engine {
    pub(super) fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        // Every line this thread logs names the worker.
        let span = tracing::info_span!("worker", name = %self.name);
        let _in = span.enter();
        // A job taken while gathering a batch, to run next.
        let mut held: Option<Job> = None;
        loop {
            let job = match held.take().or_else(|| self.later.pop_front()) {
                Some(j) => j,
                None => {
                    *lock(&self.last_info) = self.info();
                    self.job_since.store(0, Ordering::Relaxed);
                    match self.prepare(&jobs).or_else(|| self.next_job(&jobs)) {
                        Some(j) => j,
                        None => break,
                    }
                }
            };
            let started = Instant::now();
            let since = started.saturating_duration_since(self.origin).as_micros() as u64;
            self.job_since.store(since + 1, Ordering::Relaxed);
            // A prepared step serves the step whose input the post delivered
            // to it; any other job but a question undoes it first.
            let job = match job {
                Job::Step(req, reply, at) if self.delivered_for(&req) => {
                    let p = self.prepared.take();
                    self.run_step(req, reply, at, started, p);
                    continue;
                }
                Job::Info(reply) => Job::Info(reply),
                other => {
                    self.undo_prepared();
                    other
                }
            };
            let job = match job {
                // Decode steps of other sequences waiting now join this one
                // (continuous batching: the batch is whatever is queued),
                // and those due back soon are waited for a little.
                Job::Step(req, reply, at) if self.is_decode(&req) => {
                    let mut batch = vec![(req, reply)];
                    held = self.gather(&jobs, &mut batch);
                    if batch.len() == 1 {
                        let (req, reply) = batch.pop().unwrap();
                        Job::Step(req, reply, at)
                    } else {
                        // The others' arrivals were noted as they joined.
                        self.arrived(&batch[0].0.sequence, at);
                        self.batches += 1;
                        self.batched_steps += batch.len() as u64;
                        self.tokens += batch.len() as u64;
                        self.steps += batch.len() as u64;
                        let ids: Vec<String> =
                            batch.iter().map(|(r, _)| r.sequence.clone()).collect();
                        self.step_batch(batch);
                        self.finished(&ids, started);
                        self.busy += started.elapsed();
                        continue;
                    }
                }
                other => other,
            };
            match job {
                Job::Load(req, cfg, progress) => {
                    let r = self.load(req, &cfg, &progress);
                    if let Err(e) = r {
                        let _ = progress.blocking_send(Err(status(e)));
                    }
                    self.busy += started.elapsed();
                }
                Job::Step(req, reply, at) => self.run_step(req, reply, at, started, None),
                Job::Release(seq, reply) => {
                    let kept = self.keep(&seq);
                    let freed = self.end(&seq).map_or(0, |s| s.reserved);
                    if let (Some((id, caches)), Some(room)) = (kept, self.prefix_room()) {
                        self.prefixes.insert(id, caches, room);
                    }
                    if freed > 0 {
                        tracing::info!(sequence = %seq, "released, {:.1} MB freed", freed as f64 / 1e6);
                    }
                    let _ = reply.send(freed);
                }
                #[cfg(test)]
                Job::Hold(until) => {
                    let _ = until.recv();
                }
                Job::Info(reply) => {
                    let _ = reply.send(self.info());
                }
            }
        }
        self.undo_prepared();
    }

    /// Runs one sequence's step (with the step prepared for it, if any) and
    /// replies.
    fn run_step(
        &mut self,
        req: Step,
        reply: oneshot::Sender<Result<StepOut>>,
        at: Instant,
        started: Instant,
        prepared: Option<Prepared>,
    ) {
        self.arrived(&req.sequence, at);
        let seq = req.sequence.clone();
        let positions = req.positions() as u64;
        let guess = self.guess_next(&req);
        let r = match prepared {
            Some(p) => self.step_prepared(req, p),
            None => self.step(req),
        };
        if r.is_err() {
            // A failed step leaves the cache in an unknown state.
            self.end(&seq);
        } else {
            self.tokens += positions;
            self.steps += 1;
            if positions == 1 {
                self.finished(std::slice::from_ref(&seq), started);
                self.next_guess = guess;
            }
        }
        self.busy += started.elapsed();
        let _ = reply.send(r);
    }

    /// The engine's figures, as `DeviceInfo` reports them.
    fn info(&self) -> EngineStats {
        EngineStats {
            shard: self.stage.as_ref().map(|s| s.info.clone()),
            cache_bytes: self.caches.iter().map(|c| c.nbytes() as u64).sum(),
            sequences: self.seqs.len() as u32,
            busy_micros: self.busy.as_micros() as u64,
            tokens_processed: self.tokens,
            steps: self.steps,
            batches: self.batches,
            batched_steps: self.batched_steps,
            prefix_entries: self.prefixes.len() as u32,
            prefix_bytes: self.prefixes.bytes(),
            prefix_budget_bytes: self.prefix_budget(),
            steps_launched_ahead: self.launched_ahead,
            steps_launched_ahead_undone: self.launched_ahead_undone,
        }
    }

    /// Validates a step and makes its input, `[1, L, hidden]`: embedded
    /// tokens on the first stage, decoded activations on the others. The
    /// sequence is created on its first step.
    fn input(&mut self, req: &Step) -> Result<Array> {
        self.admit(req)?;
        self.activations(req)
    }

    /// An admitted step's `[1, L, hidden]` input: the first stage embeds its
    /// token ids, the others decode the previous stage's activations.
    fn activations(&self, req: &Step) -> Result<Array> {
        let stage = self.stage.as_ref().unwrap();
        if stage.info.embed {
            let ids = self.token_ids(req)?;
            stage
                .model
                .embed(&Array::from_slice(&ids, &[1, ids.len() as i32])?)
        } else {
            self.hidden(req)?.decode()
        }
    }

    /// The first stage's token ids, each checked against the vocabulary.
    pub(super) fn token_ids(&self, req: &Step) -> Result<Vec<i32>> {
        let vocab = self.stage.as_ref().unwrap().model.args.vocab_size as u32;
        if req.tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "the first stage needs token ids".into(),
            ));
        }
        // The position, not the id: errors are logged, token ids are not.
        if let Some(i) = req.tokens.iter().position(|&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "the token at position {i} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(req.tokens.iter().map(|&t| t as i32).collect())
    }

    /// The activations a later stage gets, their width checked against
    /// this model (the rest of their shape, their dtype and their bytes
    /// were checked as the step came in, `wire`).
    pub(super) fn hidden<'a>(&self, req: &'a Step) -> Result<&'a Encoded> {
        let t = req.hidden.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this stage needs activations from the previous one".into())
        })?;
        let hidden = self.stage.as_ref().unwrap().model.args.hidden_size;
        if t.shape().get(2) != Some(&hidden) {
            return Err(Error::InvalidArgument(format!(
                "activations of shape {:?} do not fit this model: [1, L, {hidden}] expected",
                t.shape()
            )));
        }
        Ok(t)
    }

    /// One step of one sequence.
    pub(super) fn step(&mut self, req: Step) -> Result<StepOut> {
        let started = Instant::now();
        let h = self.input(&req)?;
        let model = self.stage.as_ref().unwrap().model.clone();
        let slot = self.seqs[&req.sequence].slot;
        // Decode steps are latency-bound: overlap graph building with compute.
        let every = if req.tokens.len() <= 1 { 2 } else { 0 };
        let h = model.forward_layers_eager(h, Caches::Slot(&mut self.caches, slot), every)?;
        let mut out = self.output(&req, &h, None)?;
        // The buffers of a prompt's chunks are reused by the next chunk;
        // give them back once the prompt is done (freeing them after every
        // chunk costs an allocation per chunk, slow on CUDA).
        if req.sample && req.tokens.len() > 1 {
            mlx::clear_cache();
        }
        out.micros = micros_since(started);
        Ok(out)
    }

    /// What one sequence's step sends on: the last stage samples from its
    /// logits (`[1, L, vocab]`, computed here unless given), the others
    /// encode the activations `h` for the next stage.
    fn output(&mut self, req: &Step, h: &Array, logits: Option<Array>) -> Result<StepOut> {
        let stage = self.stage.as_ref().unwrap();
        if !stage.info.head {
            let h = codec::Outgoing::new(h, stage.compression)?;
            return self.send_on(req, h);
        }
        let seq = self.seqs.get_mut(&req.sequence).unwrap();
        if seq.sampler.as_ref().is_some_and(|s| s.needs_history()) {
            seq.history.extend_from_slice(&req.tokens);
        }
        if !req.sample {
            let state: Vec<&Array> = self.caches.iter().flat_map(|c| c.state()).collect();
            mlx::eval(&state)?;
            return self.finish(req, Pending::Nothing);
        }
        let l = h.dim(1);
        let logits = match logits {
            Some(x) => x.slice_axis(1, l - 1, l)?,
            None => stage.model.logits(&h.slice_axis(1, l - 1, l)?)?,
        };
        let sampler = seq.sampler.as_mut().unwrap();
        let (token, logprobs) = draw(sampler, logits.squeeze(1)?, &seq.history)?;
        self.finish(req, Pending::Token { token, logprobs })
    }

    /// What a stage without the head sends on: activations `h` for the
    /// next stage.
    pub(super) fn send_on(&self, req: &Step, h: codec::Outgoing) -> Result<StepOut> {
        if self.stage.as_ref().unwrap().next.is_none() {
            return Err(Error::InvalidArgument(
                "this stage has no next stage to send activations to".into(),
            ));
        }
        self.finish(req, Pending::Hidden(h))
    }

    /// Waits for a step's results and makes what the step sends on.
    pub(super) fn finish(&self, req: &Step, pending: Pending) -> Result<StepOut> {
        let stage = self.stage.as_ref().unwrap();
        let mut out = StepOut {
            hidden: None,
            token: None,
            logprobs: None,
            micros: 0,
            next: stage.next.clone(),
            first: stage.first.clone(),
        };
        match pending {
            Pending::Hidden(h) => {
                mlx::eval_polling(&h.arrays(), self.spin)?;
                out.hidden = Some(h.encode()?);
            }
            Pending::Token { token, logprobs } => {
                mlx::eval_polling(&[&token, &logprobs], self.spin)?;
                out.token = Some(token.item::<u32>()?);
                if req.logprobs {
                    out.logprobs = Some(codec::encode(&logprobs.squeeze(0)?, Compression::None)?);
                }
            }
            Pending::Nothing => {}
        }
        Ok(out)
    }
}
