//! Decode steps launched ahead of their input (on a CUDA GPU, or with
//! `WorkerConfig::launch_ahead`).
//!
//! A stage cannot start step t+1 of a sequence before step t has gone round
//! the rest of the pipeline, but it knows what that step will be: one more
//! position of the same sequence. So, holding one sequence and waiting, the
//! engine builds and launches that step on an input delivered later (a
//! `mlx::Mailbox`). The device waits for the input; MLX's CPU work of
//! encoding the step's kernels (most of a decode step on a GPU) is done
//! while the other stages compute, instead of after the input arrives.
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use super::{draw, micros_since, Engine, Job, Pending, Step, StepOut};
use crate::cache::Caches;
use crate::codec;
use crate::error::Result;
use crate::mlx;
use crate::sample::Sampler;
use crate::util::lock;

/// A decode step launched before its input arrived, whose input goes to
/// its mailboxes in the `Post`. Any other job undoes it
/// (`Engine::undo_prepared`).
pub(super) struct Prepared {
    seq: String,
    /// The position it computes: the sequence's cache length before it.
    offset: u32,
    out: Pending,
    /// The last stage's sampler before the step drew from it, put back if
    /// the step is undone (a seeded sampler's draws stay repeatable).
    sampler: Option<Sampler>,
}

/// The next step of a sequence as guessed from its last one.
pub(super) struct Guess {
    seq: String,
    input: Input,
}

/// What a step launched ahead takes as its input.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Input {
    /// One token id (the first stage).
    Token,
    /// `[1, 1, hidden]` activations of this dtype, uncompressed.
    Hidden(mlx::Dtype),
    /// The same, int8-compressed: the int8 values and their scale.
    Int8(mlx::Dtype),
}

/// Where the input of the step launched ahead is delivered: by the gRPC
/// side, as the step's request arrives and before it queues for the engine
/// (zeros when another job comes first). Not by the engine thread: MLX may
/// hold that inside the launch until the input is there, when it has too
/// much work queued.
#[derive(Default)]
pub(super) struct Post(std::sync::Mutex<Option<Posted>>);

pub(super) struct Posted {
    seq: String,
    offset: u32,
    /// What the mailboxes take: a token id below `vocab`, or activations
    /// `[1, 1, hidden]`.
    input: Input,
    vocab: u32,
    hidden: i32,
    /// On the last stage, only a step that samples fits.
    head: bool,
    /// The input's mailbox, and that of its scales (int8). Taken when
    /// delivered (`delivered` set) or dropped (they read zeros).
    mailbox: Option<mlx::Mailbox>,
    scales: Option<mlx::Mailbox>,
    delivered: bool,
}

impl Posted {
    /// Whether `req` is the step this mailbox waits for, with an input it
    /// takes as it is.
    fn fits(&self, req: &Step) -> bool {
        let Some(m) = &self.mailbox else {
            return false;
        };
        if req.sequence != self.seq || req.offset != self.offset || (self.head && !req.sample) {
            return false;
        }
        let activations = |dtype: mlx::Dtype, scales: Option<usize>| {
            req.hidden.as_ref().is_some_and(|t| {
                t.dtype() == dtype
                    && t.shape() == [1, 1, self.hidden]
                    && t.data().len() == m.nbytes()
                    && t.scales().map(|s| s.len()) == scales
            })
        };
        match self.input {
            Input::Token => req.tokens.len() == 1 && req.tokens[0] < self.vocab,
            Input::Hidden(dtype) => activations(dtype, None),
            Input::Int8(dtype) => activations(dtype, Some(4)),
        }
    }

    /// Delivers `req`'s input (which `fits`).
    fn deliver(&mut self, req: &Step) {
        let m = self.mailbox.take().unwrap();
        match (self.input, &req.hidden) {
            (Input::Token, _) => m.deliver(&(req.tokens[0] as i32).to_le_bytes()),
            (_, Some(t)) => {
                m.deliver(t.data());
                if let (Some(s), Some(bytes)) = (self.scales.take(), t.scales()) {
                    s.deliver(bytes);
                }
            }
            (_, None) => unreachable!("`fits` checked the activations"),
        }
        self.delivered = true;
    }
}

impl Post {
    /// Sees each job on its way to the engine (`send` queues it under
    /// this lock, so that the engine finds either the job queued or its
    /// mailbox taken): a step it fits gets its input delivered now, any
    /// other job but a question leaves the mailbox to read zeros.
    pub(super) fn sort(&self, job: &Job) -> std::sync::MutexGuard<'_, Option<Posted>> {
        let mut post = lock(&self.0);
        if let Some(p) = post.as_mut() {
            match job {
                Job::Info(_) => {}
                Job::Step(req, ..) if p.fits(req) => {
                    p.deliver(req);
                    tracing::debug!(offset = p.offset, "delivered a step's input");
                }
                _ => {
                    tracing::debug!(
                        had = p.mailbox.is_some(),
                        "another job: a step ahead reads zeros"
                    );
                    p.mailbox = None;
                    p.scales = None;
                }
            }
        }
        post
    }

    /// Takes what is posted; its mailbox, if still there, reads zeros.
    fn take(&self) -> Option<Posted> {
        lock(&self.0).take()
    }
}

/// How long a prepared step waits for its input before it is undone: the
/// device holds a waiting kernel meanwhile.
const PREPARED_WAIT: Duration = Duration::from_millis(100);

impl Engine {
    /// Whether the prepared step got its input from `req`.
    pub(super) fn delivered_for(&self, req: &Step) -> bool {
        self.prepared.is_some()
            && lock(&self.post.0)
                .as_ref()
                .is_some_and(|p| p.delivered && p.seq == req.sequence && p.offset == req.offset)
    }

    /// The next job. While a prepared step waits for its input, it is
    /// undone if no job comes within `PREPARED_WAIT`.
    pub(super) fn next_job(&mut self, jobs: &std_mpsc::Receiver<Job>) -> Option<Job> {
        if self.prepared.is_some() {
            match jobs.recv_timeout(PREPARED_WAIT) {
                Ok(j) => return Some(j),
                Err(std_mpsc::RecvTimeoutError::Timeout) => self.undo_prepared(),
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        jobs.recv().ok()
    }

    /// The step that follows decode step `req` of its sequence, to launch
    /// ahead: the same kind of input, one position on.
    pub(super) fn guess_next(&self, req: &Step) -> Option<Guess> {
        let stage = self.stage.as_ref()?;
        if !self.launch_ahead || (stage.info.head && !req.sample) {
            return None;
        }
        let input = if stage.info.embed {
            (req.tokens.len() == 1).then_some(Input::Token)?
        } else {
            let t = req.hidden.as_ref()?;
            if t.shape() != [1, 1, self.stage.as_ref()?.model.args.hidden_size] {
                return None;
            }
            match t.scales() {
                None => Input::Hidden(t.dtype()),
                Some(_) => Input::Int8(t.dtype()),
            }
        };
        Some(Guess {
            seq: req.sequence.clone(),
            input,
        })
    }

    /// Launches the step guessed last (see `Prepared`) when this stage
    /// holds that sequence alone: with others, their steps keep it busy and
    /// a guess would mostly be undone. Returns a job found queued instead.
    pub(super) fn prepare(&mut self, jobs: &std_mpsc::Receiver<Job>) -> Option<Job> {
        let guess = self.next_guess.take()?;
        if self.prepared.is_some() || self.seqs.len() != 1 || !self.seqs.contains_key(&guess.seq) {
            return None;
        }
        match self.launch(guess, jobs) {
            Ok(Ok(p)) => {
                self.prepared = p;
                None
            }
            Ok(Err(job)) => Some(job),
            Err(e) => {
                tracing::warn!("could not launch a step ahead: {e}");
                None
            }
        }
    }

    /// Builds and launches `guess`'s step on a mailbox input; Ok(None) when
    /// its sampler needs the tokens so far (which the step's request
    /// brings), a job instead when one was queued already.
    #[allow(clippy::type_complexity)]
    fn launch(
        &mut self,
        guess: Guess,
        jobs: &std_mpsc::Receiver<Job>,
    ) -> Result<std::result::Result<Option<Prepared>, Job>> {
        let stage = self.stage.as_ref().unwrap();
        let (model, head, compression) = (stage.model.clone(), stage.info.head, stage.compression);
        let seq = &self.seqs[&guess.seq];
        let sampler = seq.sampler.clone();
        if head && sampler.as_ref().is_none_or(|s| s.needs_history()) {
            return Ok(Ok(None));
        }
        let slot = seq.slot;
        let offset = self.caches.first().map_or(0, |c| c.length(slot)) as u32;
        if self.mailboxes.is_none() {
            self.mailboxes = Some(mlx::MailboxStream::new()?);
        }
        let hidden = model.args.hidden_size;
        let stream = self.mailboxes.as_ref().unwrap();
        let (mailbox, scales, x) = match guess.input {
            Input::Token => {
                let (m, ids) = mlx::Mailbox::new(stream, &[1, 1], mlx::Dtype::Int32)?;
                (m, None, ids)
            }
            Input::Hidden(dtype) => {
                let (m, h) = mlx::Mailbox::new(stream, &[1, 1, hidden], dtype)?;
                (m, None, h)
            }
            Input::Int8(dtype) => {
                let (m, q) = mlx::Mailbox::new(stream, &[1, 1, hidden], mlx::Dtype::Int8)?;
                let (s, scale) = mlx::Mailbox::new(stream, &[1, 1, 1], mlx::Dtype::Float32)?;
                (m, Some(s), codec::dequantize(&q, &scale, dtype)?)
            }
        };
        *lock(&self.post.0) = Some(Posted {
            seq: guess.seq.clone(),
            offset,
            input: guess.input,
            vocab: model.args.vocab_size as u32,
            hidden,
            head,
            mailbox: Some(mailbox),
            scales,
            delivered: false,
        });
        tracing::debug!(sequence = %guess.seq, offset, "launching a step ahead");
        // A job queued before the post went up never saw it.
        if let Ok(job) = jobs.try_recv() {
            self.post.take();
            return Ok(Err(job));
        }
        let (caches, seqs) = (&mut self.caches, &mut self.seqs);
        let built = (|| -> Result<Pending> {
            let h = match guess.input {
                Input::Token => model.embed(&x)?,
                _ => x,
            };
            let h = model.forward_layers_eager(h, Caches::Slot(caches, slot), 2)?;
            if !head {
                // Int8 activations are quantized in the launched step too.
                let h = codec::Outgoing::new(&h, compression)?;
                mlx::async_eval(&h.arrays())?;
                return Ok(Pending::Hidden(h));
            }
            let sampler = seqs.get_mut(&guess.seq).unwrap().sampler.as_mut().unwrap();
            let (token, logprobs) = draw(sampler, model.logits(&h)?.squeeze(1)?, &[])?;
            mlx::async_eval(&[&token, &logprobs])?;
            Ok(Pending::Token { token, logprobs })
        })();
        tracing::debug!(ok = built.is_ok(), "launched ahead");
        let sampler = sampler.filter(|_| head);
        match built {
            Ok(out) => Ok(Ok(Some(Prepared {
                seq: guess.seq,
                offset,
                out,
                sampler,
            }))),
            Err(e) => {
                self.post.take();
                self.forget(&guess.seq, offset, sampler);
                Err(e)
            }
        }
    }

    /// Runs step `req` on the step prepared for it, whose input the post
    /// delivered: waits for the results.
    pub(super) fn step_prepared(&mut self, req: Step, p: Prepared) -> Result<StepOut> {
        let started = Instant::now();
        self.post.take();
        self.launched_ahead += 1;
        let mut out = self.finish(&req, p.out)?;
        out.micros = micros_since(started);
        Ok(out)
    }

    /// Undoes the prepared step, if any: its input reads zeros (unless
    /// delivered), its results are dropped, the cache forgets the position
    /// it wrote and its sequence gets its sampler back as it was.
    pub(super) fn undo_prepared(&mut self) {
        let Some(p) = self.prepared.take() else {
            return;
        };
        self.post.take();
        tracing::debug!(offset = p.offset, "undid a step launched ahead");
        self.forget(&p.seq, p.offset, p.sampler);
        self.launched_ahead_undone += 1;
    }

    /// Takes a step of `seq` back: its cache holds `offset` positions again
    /// and its sampler is `sampler` (when given).
    fn forget(&mut self, seq: &str, offset: u32, sampler: Option<Sampler>) {
        if let Some(s) = self.seqs.get_mut(seq) {
            for c in &mut self.caches {
                c.truncate(s.slot, offset as i32);
            }
            if sampler.is_some() {
                s.sampler = sampler;
            }
        }
    }
}
