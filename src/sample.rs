//! Sampling, done in MLX on the device: logits processors (logit bias,
//! repetition/presence/frequency penalties) then top-p, min-p, top-k and a
//! temperature-scaled categorical draw, in mlx-lm's order. Temperature 0 is
//! greedy argmax.
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::mlx::{ops, random, Array, Dtype};

/// What `make_sampler` takes.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temp: f32,
    pub top_p: f32,
    pub min_p: f32,
    pub min_tokens_to_keep: i32,
    pub top_k: i32,
    /// A seed makes sampling repeatable; `None` draws from MLX's global RNG.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temp: 0.0,
            top_p: 0.0,
            min_p: 0.0,
            min_tokens_to_keep: 1,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.temp.is_nan() || self.temp < 0.0 || !self.temp.is_finite() {
            return bad(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temp
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return bad(format!("top_p must be in [0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.top_k < 0 {
            return bad(format!("top_k must be >= 0, got {}", self.top_k));
        }
        if self.min_tokens_to_keep < 1 {
            return bad(format!(
                "min_tokens_to_keep must be >= 1, got {}",
                self.min_tokens_to_keep
            ));
        }
        Ok(())
    }
}

/// Penalties and biases applied to the logits before sampling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessorConfig {
    pub logit_bias: Vec<(u32, f32)>,
    pub repetition_penalty: Option<f32>,
    pub repetition_context_size: usize,
    pub presence_penalty: Option<f32>,
    pub presence_context_size: usize,
    pub frequency_penalty: Option<f32>,
    pub frequency_context_size: usize,
}

impl ProcessorConfig {
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if let Some(p) = self.repetition_penalty {
            if p.is_nan() || p < 0.0 || !p.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "repetition_penalty must be >= 0, got {p}"
                )));
            }
        }
        if let Some(&(t, _)) = self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "logit_bias names token {t}, outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.logit_bias.is_empty()
            && self.repetition_penalty.is_none_or(|p| p == 0.0)
            && self.presence_penalty.is_none_or(|p| p == 0.0)
            && self.frequency_penalty.is_none_or(|p| p == 0.0)
    }
}

/// How a sequence samples: the sampler and the logits processors before it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    pub sampler: SamplerConfig,
    pub processors: ProcessorConfig,
}

impl Sampling {
    /// The sampler, its settings checked against a vocabulary of `vocab`.
    pub fn sampler(&self, vocab: usize) -> Result<Sampler> {
        self.processors.validate(vocab)?;
        Sampler::new(self.sampler.clone(), self.processors.clone())
    }
}

fn last(tokens: &[u32], n: usize) -> &[u32] {
    &tokens[tokens.len().saturating_sub(n)..]
}

fn index_array(tokens: &[u32]) -> Result<Array> {
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    Array::from_slice(&ids, &[1, ids.len() as i32])
}

/// Applies `f` to the logits at `tokens` (`[1, vocab]` logits).
fn update_at(
    logits: &Array,
    tokens: &[u32],
    f: impl FnOnce(&Array) -> Result<Array>,
) -> Result<Array> {
    let idx = index_array(tokens)?;
    let sel = logits.take_along_axis(&idx, -1)?;
    logits.put_along_axis(&idx, &f(&sel)?, -1)
}

/// Draws tokens from logits.
#[derive(Clone)]
pub struct Sampler {
    config: SamplerConfig,
    processors: ProcessorConfig,
    key: Option<Array>,
}

impl Sampler {
    pub fn new(config: SamplerConfig, processors: ProcessorConfig) -> Result<Sampler> {
        config.validate()?;
        let key = config.seed.map(random::key).transpose()?;
        Ok(Sampler {
            config,
            processors,
            key,
        })
    }

    /// Temperature 0: the argmax of the log-probabilities.
    pub fn is_greedy(&self) -> bool {
        self.config.temp == 0.0
    }

    pub fn needs_history(&self) -> bool {
        !self.processors.is_empty()
    }

    /// The logits processors, given every token so far (prompt included).
    pub fn process(&self, logits: Array, history: &[u32]) -> Result<Array> {
        let p = &self.processors;
        let mut logits = logits;
        if !p.logit_bias.is_empty() {
            let ids: Vec<u32> = p.logit_bias.iter().map(|(t, _)| *t).collect();
            let bias: Vec<f32> = p.logit_bias.iter().map(|(_, b)| *b).collect();
            let bias = Array::from_slice(&bias, &[1, bias.len() as i32])?.astype(logits.dtype())?;
            logits = update_at(&logits, &ids, |sel| sel.add(&bias))?;
        }
        if history.is_empty() {
            return Ok(logits);
        }
        if let Some(pen) = p.repetition_penalty.filter(|&x| x != 0.0) {
            let toks = last(history, p.repetition_context_size);
            logits = update_at(&logits, toks, |sel| {
                let zero = Array::scalar(0.0, sel.dtype())?;
                let pen = Array::scalar(pen as f64, sel.dtype())?;
                ops::where_(&sel.less(&zero)?, &sel.mul(&pen)?, &sel.div(&pen)?)
            })?;
        }
        if let Some(pen) = p.presence_penalty.filter(|&x| x != 0.0) {
            let mut toks = last(history, p.presence_context_size).to_vec();
            toks.sort_unstable();
            toks.dedup();
            logits = update_at(&logits, &toks, |sel| {
                sel.sub(&Array::scalar(pen as f64, sel.dtype())?)
            })?;
        }
        if let Some(pen) = p.frequency_penalty.filter(|&x| x != 0.0) {
            let mut counts: HashMap<u32, f32> = HashMap::new();
            for &t in last(history, p.frequency_context_size) {
                *counts.entry(t).or_default() += pen;
            }
            let (toks, sub): (Vec<u32>, Vec<f32>) = counts.into_iter().unzip();
            let sub = Array::from_slice(&sub, &[1, sub.len() as i32])?.astype(logits.dtype())?;
            logits = update_at(&logits, &toks, |sel| sel.sub(&sub))?;
        }
        Ok(logits)
    }

    /// One token id per row of `[B, vocab]` log-probabilities.
    pub fn sample(&mut self, logprobs: &Array) -> Result<Array> {
        let c = &self.config;
        if c.temp == 0.0 {
            return logprobs.argmax(-1, false);
        }
        let mut lp = logprobs.clone();
        let neg_inf = Array::scalar(f64::NEG_INFINITY, lp.dtype())?;
        if c.top_p > 0.0 && c.top_p < 1.0 {
            lp = top_p(&lp, c.top_p, &neg_inf)?;
        }
        if c.min_p != 0.0 {
            lp = min_p(&lp, c.min_p, c.min_tokens_to_keep, &neg_inf)?;
        }
        let vocab = lp.dim(-1);
        if c.top_k > 0 {
            if c.top_k >= vocab {
                return Err(Error::InvalidArgument(format!(
                    "top_k must be below the vocabulary size {vocab}, got {}",
                    c.top_k
                )));
            }
            let drop = lp
                .neg()?
                .argpartition(c.top_k - 1, -1)?
                .slice_axis(-1, c.top_k, vocab)?;
            lp = lp.put_along_axis(&drop, &neg_inf, -1)?;
        }
        let scaled = lp.mul(&Array::scalar(1.0 / c.temp as f64, lp.dtype())?)?;
        let key = match self.key.take() {
            Some(k) => {
                let (next, sub) = random::split(&k)?;
                self.key = Some(next);
                Some(sub)
            }
            None => None,
        };
        random::categorical(&scaled, -1, key.as_ref())
    }
}

fn top_p(lp: &Array, p: f32, neg_inf: &Array) -> Result<Array> {
    let sorted = lp.sort(-1)?;
    let probs = sorted.astype(Dtype::Float32)?.exp()?;
    let above = probs.cumsum(-1, true, false)?;
    let total = above
        .slice_axis(-1, 0, 1)?
        .add(&probs.slice_axis(-1, 0, 1)?)?;
    let dropped = above
        .greater_equal(&total.mul_scalar(p as f64)?)?
        .sum(-1, true)?;
    let threshold = sorted.take_along_axis(&dropped.astype(Dtype::Int32)?, -1)?;
    ops::where_(&lp.less(&threshold)?, neg_inf, lp)
}

fn min_p(lp: &Array, p: f32, keep: i32, neg_inf: &Array) -> Result<Array> {
    let top = lp.max(-1, true)?;
    let cut = top.add(&Array::scalar((p as f64).ln(), lp.dtype())?)?;
    let mut remove = lp.less(&cut)?;
    if keep > 1 {
        let vocab = lp.dim(-1);
        let idx = lp
            .argpartition(-keep, -1)?
            .slice_axis(-1, vocab - keep, vocab)?;
        remove = remove.put_along_axis(&idx, &Array::scalar(0.0, Dtype::Bool)?, -1)?;
    }
    ops::where_(&remove, neg_inf, lp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logprobs(v: &[f32]) -> Array {
        let lp = Array::from_slice(v, &[1, v.len() as i32]).unwrap();
        lp.sub(&lp.logsumexp(-1, true).unwrap()).unwrap()
    }

    fn draw(s: &mut Sampler, lp: &Array, n: usize) -> Vec<i32> {
        (0..n)
            .map(|_| s.sample(lp).unwrap().item::<i32>().unwrap())
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerConfig::default(), ProcessorConfig::default()).unwrap();
        assert_eq!(
            s.sample(&logprobs(&[0.1, 3.0, 0.2]))
                .unwrap()
                .item::<i32>()
                .unwrap(),
            1
        );
    }

    #[test]
    fn top_k_never_leaves_the_k_best_and_seeds_repeat() {
        let lp = logprobs(&[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]);
        let cfg = SamplerConfig {
            temp: 1.0,
            top_k: 3,
            seed: Some(7),
            ..Default::default()
        };
        let mut a = Sampler::new(cfg.clone(), ProcessorConfig::default()).unwrap();
        let drawn = draw(&mut a, &lp, 300);
        assert!(drawn.iter().all(|&t| t < 3), "{drawn:?}");
        assert!((0..3).all(|t| drawn.contains(&t)));
        let mut b = Sampler::new(cfg, ProcessorConfig::default()).unwrap();
        assert_eq!(draw(&mut b, &lp, 300), drawn);
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // probabilities 0.5, 0.3, 0.15, 0.05
        let lp = logprobs(&[0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()]);
        let mut s = Sampler::new(
            SamplerConfig {
                temp: 1.0,
                top_p: 0.7,
                seed: Some(1),
                ..Default::default()
            },
            ProcessorConfig::default(),
        )
        .unwrap();
        assert!(draw(&mut s, &lp, 200).iter().all(|&t| t < 2));
        let mut s = Sampler::new(
            SamplerConfig {
                temp: 1.0,
                min_p: 0.5,
                seed: Some(1),
                ..Default::default()
            },
            ProcessorConfig::default(),
        )
        .unwrap();
        assert!(draw(&mut s, &lp, 200).iter().all(|&t| t < 2));
    }

    #[test]
    fn penalties_follow_mlx_lm() {
        let cfg = ProcessorConfig {
            repetition_penalty: Some(2.0),
            repetition_context_size: 20,
            presence_penalty: Some(0.5),
            presence_context_size: 20,
            logit_bias: vec![(3, 10.0)],
            ..Default::default()
        };
        let s = Sampler::new(SamplerConfig::default(), cfg).unwrap();
        let logits = Array::from_slice(&[2.0f32, -2.0, 1.0, 0.0], &[1, 4]).unwrap();
        let out = s
            .process(logits, &[0, 1, 1])
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(out, vec![2.0 / 2.0 - 0.5, -2.0 * 2.0 - 0.5, 1.0, 10.0]);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(Sampler::new(
            SamplerConfig {
                temp: -1.0,
                ..Default::default()
            },
            ProcessorConfig::default()
        )
        .is_err());
        assert!(Sampler::new(
            SamplerConfig {
                top_p: 1.5,
                ..Default::default()
            },
            ProcessorConfig::default()
        )
        .is_err());
        let mut s = Sampler::new(
            SamplerConfig {
                temp: 1.0,
                top_k: 10,
                ..Default::default()
            },
            ProcessorConfig::default(),
        )
        .unwrap();
        assert!(s.sample(&logprobs(&[1.0, 2.0])).is_err());
    }
}
