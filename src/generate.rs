//! Generation in mlx-lm's three layers: `TokenGenerator` (one token per
//! step, with mlx-lm's chunked prefill and its one-step-ahead async
//! evaluation), `Generation` (text, stop conditions and timings: the records
//! `stream_generate` yields), and the Python `generate` on top.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::mlx::{self, async_eval, Array, Dtype};
use crate::models::Model;
use crate::prefix::PrefixCache;
use crate::sample::Sampler;
use crate::tokenizer::{StreamingDetokenizer, Tokenizer};

/// mlx-lm's default prefill chunk.
pub const DEFAULT_PREFILL_STEP: usize = 2048;

/// Refuses an empty prompt and token ids outside the vocabulary.
pub fn check_prompt(prompt: &[u32], vocab_size: i32) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    let vocab = vocab_size as u32;
    if let Some(&t) = prompt.iter().find(|&&t| t >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "prompt token {t} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Where tokens come from: a model in this process (`TokenGenerator`) or a
/// pipeline of workers.
pub trait TokenSource: Send + Sync {
    /// The next token and, where known, its `[vocab]` log-probabilities.
    /// With `schedule_next`, the step after it may start at once.
    fn next_token(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)>;
    /// Bytes of KV cache this sequence holds here.
    fn cache_nbytes(&self) -> usize {
        0
    }
    /// Prompt positions that were not computed, taken from a kept prefix.
    fn cached_tokens(&self) -> usize {
        0
    }
    /// Runs the next part of a prompt that was not all run when the source
    /// was made; true once all of it has (the first token is then on its
    /// way). Callers step other sequences in between.
    fn prefill_step(&mut self) -> Result<bool> {
        Ok(true)
    }
}

/// Produces token ids (and their log-probabilities) one at a time.
pub struct TokenGenerator {
    model: Arc<Model>,
    cache: Vec<KvCache>,
    sampler: Sampler,
    /// Prompt and generated tokens, kept only when a logits processor needs them.
    history: Vec<u32>,
    /// The step computed ahead: (token, logprobs).
    next: Option<(Array, Array)>,
    /// Where the cache goes when the sequence ends, for later prompts with
    /// the same start, and the tokens whose positions it holds.
    prefixes: Option<Arc<Mutex<PrefixCache>>>,
    fed: Vec<u32>,
    failed: bool,
    /// Prompt positions taken from a kept prefix.
    cached: usize,
    /// The prompt's chunks not yet run, then its last token.
    chunks: std::collections::VecDeque<Vec<u32>>,
    last: Option<Vec<u32>>,
}

impl TokenGenerator {
    /// Prefills `prompt` and schedules the first token. With `prefixes`,
    /// the prompt starts from the longest kept prefix there, and the cache
    /// is kept there when the sequence ends (not for samplers that look
    /// back over the tokens: they need the whole prompt run). With
    /// `deferred`, nothing runs yet: `prefill_step` runs a chunk at a time.
    pub fn new(
        model: Arc<Model>,
        prompt: &[u32],
        sampler: Sampler,
        prefill_step: usize,
        prefixes: Option<Arc<Mutex<PrefixCache>>>,
        deferred: bool,
    ) -> Result<TokenGenerator> {
        check_prompt(prompt, model.args.vocab_size)?;
        let step = prefill_step.max(1);
        let prefixes = prefixes.filter(|_| !sampler.needs_history());
        let kept = prefixes
            .as_ref()
            .and_then(|p| crate::util::lock(p).take(prompt));
        let (cache, cached) = match kept {
            Some((c, n)) => (c, n),
            None => (model.make_cache(), 0),
        };
        // Everything but the last token goes through in chunks, cache only.
        let (head, last) = prompt.split_at(prompt.len() - 1);
        let mut g = TokenGenerator {
            cache,
            model,
            sampler,
            history: Vec::new(),
            next: None,
            prefixes,
            fed: prompt.to_vec(),
            failed: false,
            cached,
            chunks: head[cached..].chunks(step).map(<[u32]>::to_vec).collect(),
            last: Some(last.to_vec()),
        };
        if g.sampler.needs_history() {
            g.history.extend_from_slice(head);
        }
        if !deferred {
            while !g.prefill_chunk()? {}
        }
        Ok(g)
    }

    /// Runs the next chunk of the prompt, or its last token (scheduling the
    /// first generated one); true once the prompt is done.
    fn prefill_chunk(&mut self) -> Result<bool> {
        if let Some(chunk) = self.chunks.pop_front() {
            let ids = Array::from_slice(&to_i32(&chunk), &[1, chunk.len() as i32])?;
            let h = self.model.embed(&ids)?;
            self.model.forward_layers(h, Some(&mut self.cache))?;
            let state: Vec<&Array> = self.cache.iter().flat_map(|c| c.state()).collect();
            mlx::eval(&state)?;
            mlx::clear_cache();
            return Ok(false);
        }
        let Some(last) = self.last.take() else {
            return Ok(true);
        };
        let first = self.step(&last)?;
        async_eval(&[&first.0, &first.1])?;
        self.next = Some(first);
        Ok(true)
    }

    fn step(&mut self, input: &[u32]) -> Result<(Array, Array)> {
        let ids = Array::from_slice(&to_i32(input), &[1, input.len() as i32])?;
        self.step_ids(&ids, input)
    }

    /// One forward step on `[1, L]` ids; `input` is their host copy, needed
    /// only by logits processors.
    fn step_ids(&mut self, ids: &Array, input: &[u32]) -> Result<(Array, Array)> {
        let logits = self.model.forward(ids, Some(&mut self.cache))?;
        let l = logits.dim(1);
        let mut logits = logits.slice_axis(1, l - 1, l)?.squeeze(1)?;
        if self.sampler.needs_history() {
            self.history.extend_from_slice(input);
            logits = self.sampler.process(logits, &self.history)?;
        }
        let logprobs = logits.sub(&logits.logsumexp(crate::mlx::ops::ALL_AXES, true)?)?;
        let token = self.sampler.sample(&logprobs)?;
        Ok((token, logprobs.squeeze(0)?))
    }
}

impl TokenSource for TokenGenerator {
    /// The step after the returned token is already scheduled when this
    /// returns, so the device never idles while the caller handles the token.
    fn next_token(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        let r = self
            .finish_prefill()
            .and_then(|()| self.advance(schedule_next));
        self.failed |= r.is_err();
        r
    }

    fn prefill_step(&mut self) -> Result<bool> {
        let r = self.prefill_chunk();
        self.failed |= r.is_err();
        r
    }

    fn cache_nbytes(&self) -> usize {
        self.cache.iter().map(|c| c.nbytes()).sum()
    }

    fn cached_tokens(&self) -> usize {
        self.cached
    }
}

impl TokenGenerator {
    fn finish_prefill(&mut self) -> Result<()> {
        while !self.prefill_chunk()? {}
        Ok(())
    }

    fn advance(&mut self, schedule_next: bool) -> Result<(u32, Option<Array>)> {
        let (y, logprobs) = self
            .next
            .take()
            .ok_or_else(|| Error::InvalidArgument("generation has ended".into()))?;
        if schedule_next && !self.sampler.needs_history() {
            // Build and schedule step n+1 on the still-lazy token of step n
            // before waiting for it, so graph building overlaps compute.
            let n = self.step_ids(&y.reshape(&[1, 1])?, &[])?;
            async_eval(&[&n.0, &n.1])?;
            self.next = Some(n);
            let id = y.item::<u32>()?;
            self.fed.push(id);
            return Ok((id, Some(logprobs)));
        }
        let id = y.item::<u32>()?;
        if schedule_next {
            let n = self.step(&[id])?;
            async_eval(&[&n.0, &n.1])?;
            self.next = Some(n);
            self.fed.push(id);
        }
        Ok((id, Some(logprobs)))
    }
}

impl Drop for TokenGenerator {
    /// A sequence that ended well leaves its cache for later prompts.
    fn drop(&mut self) {
        let Some(prefixes) = self.prefixes.take() else {
            return;
        };
        let held = self.cache.first().map_or(0, |c| c.offset()) as usize;
        if !self.failed && held == self.fed.len() {
            let cache = std::mem::take(&mut self.cache);
            crate::util::lock(&prefixes).keep(std::mem::take(&mut self.fed), cache);
        }
    }
}

fn to_i32(ids: &[u32]) -> Vec<i32> {
    ids.iter().map(|&t| t as i32).collect()
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One record of `stream_generate` (mlx-lm's `GenerationResponse`).
#[derive(Clone, Debug)]
pub struct Response {
    pub text: String,
    pub token: u32,
    /// Absent when the tokens come from workers that were not asked for them.
    pub logprobs: Option<Array>,
    pub prompt_tokens: usize,
    pub prompt_tps: f64,
    pub generation_tokens: usize,
    pub generation_tps: f64,
    /// Peak MLX memory in GB.
    pub peak_memory: f64,
    pub finish_reason: Option<FinishReason>,
}

/// Options of one generation.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub prefill_step: usize,
    /// Text that ends generation; it is not part of the output.
    pub stop: Vec<String>,
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::InvalidArgument(
                "stop strings must not be empty".into(),
            ));
        }
        Ok(())
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            prefill_step: DEFAULT_PREFILL_STEP,
            stop: Vec::new(),
        }
    }
}

/// A stream of `Response`s for one prompt, with mlx-lm's stopping rules
/// (EOS ends without emitting its text; the `max_tokens`-th token ends with
/// `length`) plus stop strings, which are held back until they can no
/// longer start a stop string and never emitted.
pub struct Generation {
    tokens: Box<dyn TokenSource>,
    detok: StreamingDetokenizer,
    eos: Vec<u32>,
    opts: GenerateOptions,
    prompt_tokens: usize,
    started: Instant,
    prompt_tps: f64,
    decode_started: Option<Instant>,
    n: usize,
    /// Text produced but not yet emitted (it may begin a stop string).
    pending: String,
    done: bool,
    /// The whole prompt has run (see `prefill_step`).
    prefilled: bool,
}

impl Generation {
    pub fn new(
        model: Arc<Model>,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        sampler: Sampler,
        opts: GenerateOptions,
        prefixes: Option<Arc<Mutex<PrefixCache>>>,
        deferred: bool,
    ) -> Result<Generation> {
        opts.validate()?;
        mlx::reset_peak_memory();
        let started = Instant::now();
        let step = opts.prefill_step;
        let tokens = TokenGenerator::new(model, prompt, sampler, step, prefixes, deferred)?;
        Generation::from_source(Box::new(tokens), tokenizer, prompt.len(), opts, started)
    }

    /// A generation over any token source, prefilled since `started`.
    pub fn from_source(
        tokens: Box<dyn TokenSource>,
        tokenizer: &Tokenizer,
        prompt_tokens: usize,
        opts: GenerateOptions,
        started: Instant,
    ) -> Result<Generation> {
        opts.validate()?;
        Ok(Generation {
            tokens,
            detok: StreamingDetokenizer::new(tokenizer),
            eos: tokenizer.eos_token_ids().to_vec(),
            opts,
            prompt_tokens,
            started,
            prompt_tps: 0.0,
            decode_started: None,
            n: 0,
            pending: String::new(),
            done: false,
            prefilled: false,
        })
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Runs the next part of a prompt whose prefill was deferred; true once
    /// the whole prompt has run (and at once when it was not deferred).
    pub fn prefill_step(&mut self) -> Result<bool> {
        if self.prefilled {
            return Ok(true);
        }
        self.prefilled = self.tokens.prefill_step()?;
        Ok(self.prefilled)
    }

    /// Whether the prompt is still being run (`prefill_step`).
    pub fn prefilling(&self) -> bool {
        !self.prefilled
    }

    /// Splits `pending` into what can be emitted now and what must wait; a
    /// found stop string ends generation.
    fn release(&mut self, finishing: bool) -> (String, bool) {
        if let Some((at, _)) = self
            .opts
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s)))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let keep = if finishing { 0 } else { self.held_back() };
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Bytes at the end of `pending` that could begin a stop string.
    fn held_back(&self) -> usize {
        let p = &self.pending;
        let mut keep = 0;
        for s in &self.opts.stop {
            for (i, _) in p.char_indices() {
                let tail = &p[i..];
                if tail.len() < s.len() && s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        keep
    }

    fn response(
        &self,
        text: String,
        token: u32,
        logprobs: Option<Array>,
        finish: Option<FinishReason>,
    ) -> Response {
        let elapsed = self
            .decode_started
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        Response {
            text,
            token,
            logprobs,
            prompt_tokens: self.prompt_tokens,
            prompt_tps: self.prompt_tps,
            generation_tokens: self.n,
            generation_tps: if elapsed > 0.0 {
                self.n as f64 / elapsed
            } else {
                0.0
            },
            peak_memory: mlx::peak_memory() as f64 / 1e9,
            finish_reason: finish,
        }
    }

    /// The next record, or `None` once the last one was returned.
    pub fn next_response(&mut self) -> Result<Option<Response>> {
        if self.done {
            return Ok(None);
        }
        let last_allowed = self.n + 1 >= self.opts.max_tokens;
        self.prefilled = true;
        let (token, logprobs) = self.tokens.next_token(!last_allowed)?;
        if self.n == 0 {
            let t = self.started.elapsed().as_secs_f64();
            self.prompt_tps = if t > 0.0 {
                self.prompt_tokens as f64 / t
            } else {
                0.0
            };
            self.decode_started = Some(Instant::now());
        }
        self.n += 1;
        if self.eos.contains(&token) {
            self.detok.finalize();
            self.pending.push_str(&self.detok.last_segment());
            let (text, _) = self.release(true);
            self.done = true;
            return Ok(Some(self.response(
                text,
                token,
                logprobs,
                Some(FinishReason::Stop),
            )));
        }
        self.detok.add_token(token);
        if last_allowed {
            self.detok.finalize();
        }
        self.pending.push_str(&self.detok.last_segment());
        let (text, stopped) = self.release(last_allowed);
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if last_allowed {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.done = finish.is_some();
        Ok(Some(self.response(text, token, logprobs, finish)))
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        self.detok.tokens()
    }

    pub fn cache_nbytes(&self) -> usize {
        self.tokens.cache_nbytes()
    }

    /// Prompt positions taken from a kept prefix instead of computed.
    pub fn cached_tokens(&self) -> usize {
        self.tokens.cached_tokens()
    }
}

/// Logits for a whole prompt without a cache: `[1, L, vocab]` float32.
pub fn prompt_logits(model: &Model, prompt: &[u32]) -> Result<Array> {
    let ids = Array::from_slice(&to_i32(prompt), &[1, prompt.len() as i32])?;
    model.forward(&ids, None)?.astype(Dtype::Float32)
}
