//! Decode steps of several sequences run as one batch: gathering them,
//! their input, and sampling each row.
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{micros_since, Engine, Job, Step, StepOut};
use crate::codec::{self, Encoded};
use crate::error::{Error, Result};
use crate::mlx::{self, Array};
use crate::proto::Compression;

/// A batched decode row's input, checked (`Engine::row_input`).
enum Row {
    /// The first stage's token ids.
    Ids(Vec<i32>),
    /// Uncompressed activations, to be joined.
    Raw,
    /// Activations decoded on their own (compressed ones).
    Decoded(Array),
}

/// The most decode steps run as one batch.
const MAX_BATCH: usize = 32;

/// The longest a decode batch waits for sequences due back, and how late
/// one may be.
const MAX_GATHER: Duration = Duration::from_millis(2);
const GATHER_SLACK: Duration = Duration::from_micros(200);

impl Engine {
    /// Notes that a step of `seq` arrived at `at`: how long it took to come
    /// back since its last step here ended.
    pub(super) fn arrived(&mut self, seq: &str, at: Instant) {
        if let Some(s) = self.seqs.get_mut(seq) {
            if let Some(done) = s.done {
                let back = at.saturating_duration_since(done);
                s.back_after = Some(s.back_after.map_or(back, |b| (b + back) / 2));
            }
        }
    }

    /// Notes the end of a decode step of `seqs` that started at `started`.
    pub(super) fn finished(&mut self, seqs: &[String], started: Instant) {
        let now = Instant::now();
        self.last_decode = now - started;
        for id in seqs {
            if let Some(s) = self.seqs.get_mut(id) {
                s.done = Some(now);
            }
        }
    }

    /// Adds to `batch` the decode steps queued now, then waits a little for
    /// those of sequences due back soon: without this, sequences whose steps
    /// come back while a batch runs form a batch of their own, and the
    /// stage runs two half batches, each costing nearly a full one. A
    /// release met meanwhile (a stream that ended, or was refused) waits in
    /// `later` until the batch has run, so that it does not split the
    /// batch. Returns another job taken that is not a decode step, to run
    /// next.
    pub(super) fn gather(
        &mut self,
        jobs: &std_mpsc::Receiver<Job>,
        batch: &mut Vec<(Step, oneshot::Sender<Result<StepOut>>)>,
    ) -> Option<Job> {
        let now = Instant::now();
        let horizon = (self.last_decode / 4).min(MAX_GATHER);
        let mut until: Option<Instant> = None;
        let mut due: Vec<&str> = Vec::new();
        for (id, s) in &self.seqs {
            if let (Some(done), Some(back)) = (s.done, s.back_after) {
                let at = done + back;
                if at <= now + horizon && at + horizon >= now {
                    due.push(id);
                    until = until.max(Some(at + GATHER_SLACK));
                }
            }
        }
        let mut due: std::collections::HashSet<String> =
            due.into_iter().map(String::from).collect();
        for (r, _) in batch.iter() {
            due.remove(&r.sequence);
        }
        let until = until.map_or(now, |u| u.min(now + horizon));
        while batch.len() < MAX_BATCH {
            let left = until.saturating_duration_since(Instant::now());
            let job = if due.is_empty() || left.is_zero() {
                jobs.try_recv().ok()
            } else {
                jobs.recv_timeout(left).ok()
            };
            match job {
                Some(Job::Step(r, tx, at))
                    if self.is_decode(&r)
                        && batch.iter().all(|(b, _)| b.sequence != r.sequence) =>
                {
                    self.arrived(&r.sequence, at);
                    due.remove(&r.sequence);
                    batch.push((r, tx));
                }
                Some(release @ Job::Release(..)) => self.later.push_back(release),
                Some(other) => return Some(other),
                None => break,
            }
        }
        None
    }

    /// Whether `req` is a decode step (one position) of a sequence this
    /// stage already holds: those can run batched with others.
    pub(super) fn is_decode(&self, req: &Step) -> bool {
        req.positions() == 1 && self.stage.is_some() && self.seqs.contains_key(&req.sequence)
    }

    /// Checks a row of a batched step's input against this stage, and
    /// gives what `batch_input` makes the batch's input from: the first
    /// stage's token ids; a later stage's uncompressed activations (joined
    /// as bytes: their byte counts were checked as they came in, so none
    /// can shift its neighbours' rows); other activations decoded here.
    fn row_input(&self, req: &Step) -> Result<Row> {
        if self.stage.as_ref().unwrap().info.embed {
            return self.token_ids(req).map(Row::Ids);
        }
        let t = self.hidden(req)?;
        if t.scales().is_none() {
            return Ok(Row::Raw);
        }
        t.decode().map(Row::Decoded)
    }

    /// The `[B, 1, hidden]` input of a batch of admitted decode steps (`rows`:
    /// each one's `row_input`), made in one piece where it can be: the first
    /// stage embeds all B ids at once, a later stage joins raw rows' bytes
    /// of one dtype before MLX sees them. Row by row, B embeddings and a
    /// B-way concatenation cost a few kernels per row, which a step bound by
    /// launching kernels (as on CUDA) feels.
    fn batch_input(&self, reqs: &[&Step], rows: Vec<Row>) -> Result<Array> {
        let b = reqs.len() as i32;
        // Set on a later stage's rows: `row_input` checked it there.
        fn tensor(req: &Step) -> &Encoded {
            req.hidden.as_ref().unwrap()
        }
        if self.stage.as_ref().unwrap().info.embed {
            let mut ids = Vec::with_capacity(reqs.len());
            for row in rows {
                if let Row::Ids(row) = row {
                    ids.extend(row);
                }
            }
            let model = &self.stage.as_ref().unwrap().model;
            return model.embed(&Array::from_slice(&ids, &[b, 1])?);
        }
        if rows.iter().all(|r| matches!(r, Row::Raw)) {
            let parts: Vec<&Encoded> = reqs.iter().map(|r| tensor(r)).collect();
            if let Some(joined) = Encoded::join(&parts) {
                return joined.decode();
            }
        }
        let arrays = rows
            .into_iter()
            .zip(reqs)
            .map(|(row, req)| match row {
                Row::Decoded(a) => Ok(a),
                _ => tensor(req).decode(),
            })
            .collect::<Result<Vec<_>>>()?;
        mlx::ops::concatenate(&arrays.iter().collect::<Vec<_>>(), 0)
    }

    /// Decode steps of several sequences as one batch: the layers run once
    /// on `[B, 1, hidden]` (attention on the sequences' rows of the slot
    /// caches), the head once on all rows; then each sequence samples its
    /// row, all evaluated together.
    pub(super) fn step_batch(&mut self, batch: Vec<(Step, oneshot::Sender<Result<StepOut>>)>) {
        let started = Instant::now();
        let mut admitted = Vec::with_capacity(batch.len());
        for (req, reply) in batch {
            // A bad row fails its own sequence alone, before the batch runs.
            match self.admit(&req).and_then(|()| self.row_input(&req)) {
                Ok(row) => admitted.push((req, reply, row)),
                Err(e) => {
                    self.end(&req.sequence);
                    let _ = reply.send(Err(e));
                }
            }
        }
        if admitted.is_empty() {
            return;
        }
        // In slot order: when the batch is every slot, or a run of them, the
        // layers attend on the cache buffer as it lies, with no gather.
        admitted.sort_by_key(|(req, _, _)| self.seqs[&req.sequence].slot);
        let (mut ready, mut rows) = (Vec::new(), Vec::new());
        for (req, reply, row) in admitted {
            ready.push((req, reply));
            rows.push(row);
        }
        let model = self.stage.as_ref().unwrap().model.clone();
        let head = self.stage.as_ref().unwrap().info.head;
        let slots: Vec<usize> = ready
            .iter()
            .map(|(req, _)| self.seqs[&req.sequence].slot)
            .collect();
        let compression = self.stage.as_ref().unwrap().compression;
        enum Out {
            Logits(Array),
            Hidden(codec::Outgoing),
        }
        let result = (|| -> Result<Out> {
            let reqs: Vec<&Step> = ready.iter().map(|(req, _)| req).collect();
            let h = self.batch_input(&reqs, rows)?;
            let h = model.forward_layers_rows(h, &mut self.caches, &slots, 2)?;
            if head {
                Ok(Out::Logits(model.logits(&h)?.squeeze(1)?))
            } else {
                // Every row's activations (quantized, if so) at once.
                let out = codec::Outgoing::new(&h, compression)?;
                mlx::eval_polling(&out.arrays(), self.spin)?;
                Ok(Out::Hidden(out))
            }
        })();
        let outs = result.and_then(|r| match r {
            Out::Logits(logits) => self.sample_rows(&ready, &logits),
            Out::Hidden(h) => ready
                .iter()
                .enumerate()
                .map(|(b, (req, _))| self.send_on(req, h.row(b as i32)?))
                .collect(),
        });
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                // The caches are in an unknown state: every sequence fails.
                for (req, reply) in ready {
                    self.end(&req.sequence);
                    let _ = reply.send(Err(Error::Mlx(format!("batched step failed: {e}"))));
                }
                return;
            }
        };
        let micros = micros_since(started);
        for ((_, reply), mut out) in ready.into_iter().zip(outs) {
            out.micros = micros;
            let _ = reply.send(Ok(out));
        }
    }

    /// The last stage's outputs of a batched decode step from its logits
    /// (`[B, vocab]`): each sequence samples its row with its own sampler,
    /// except that greedy rows without logits processors take their argmax
    /// all at once (one kernel, not one per row); all rows are evaluated
    /// together.
    fn sample_rows(
        &mut self,
        ready: &[(Step, oneshot::Sender<Result<StepOut>>)],
        logits: &Array,
    ) -> Result<Vec<StepOut>> {
        let next = self.stage.as_ref().unwrap().next.clone();
        let first = self.stage.as_ref().unwrap().first.clone();
        let shared = logits.sub(&logits.logsumexp(-1, true)?)?;
        let plain: Vec<bool> = ready
            .iter()
            .map(|(req, _)| {
                let sampler = self.seqs[&req.sequence].sampler.as_ref().unwrap();
                sampler.is_greedy() && !sampler.needs_history()
            })
            .collect();
        let argmax = plain
            .iter()
            .any(|&p| p)
            .then(|| shared.argmax(-1, false))
            .transpose()?;
        let mut picks = Vec::with_capacity(ready.len());
        for ((req, _), &in_shared_argmax) in ready.iter().zip(&plain) {
            let b = picks.len() as i32;
            let seq = self.seqs.get_mut(&req.sequence).unwrap();
            let sampler = seq.sampler.as_mut().unwrap();
            let logprobs = if sampler.needs_history() {
                seq.history.extend_from_slice(&req.tokens);
                let l = sampler.process(logits.slice_axis(0, b, b + 1)?, &seq.history)?;
                l.sub(&l.logsumexp(mlx::ops::ALL_AXES, true)?)?
            } else {
                shared.slice_axis(0, b, b + 1)?
            };
            let token = (!in_shared_argmax)
                .then(|| sampler.sample(&logprobs))
                .transpose()?;
            picks.push((token, logprobs));
        }
        let pending: Vec<&Array> = argmax
            .iter()
            .chain(
                picks
                    .iter()
                    .zip(ready)
                    .flat_map(|((t, l), (req, _))| t.iter().chain(req.logprobs.then_some(l))),
            )
            .collect();
        mlx::eval_polling(&pending, self.spin)?;
        let greedy = argmax.map(|a| a.to_vec::<u32>()).transpose()?;
        picks
            .into_iter()
            .zip(ready)
            .enumerate()
            .map(|(b, ((token, logprobs), (req, _)))| {
                let token = match token {
                    Some(t) => t.item::<u32>()?,
                    None => greedy.as_ref().unwrap()[b],
                };
                Ok(StepOut {
                    hidden: None,
                    token: Some(token),
                    logprobs: if req.logprobs {
                        Some(codec::encode(&logprobs.squeeze(0)?, Compression::None)?)
                    } else {
                        None
                    },
                    micros: 0,
                    next: next.clone(),
                    first: first.clone(),
                })
            })
            .collect()
    }
}
