//! `Generation`: the token stream behind `stream_generate`. Each step
//! runs with the GIL released.
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use std::time::Instant;

use super::cluster::PyCluster;
use super::model::PyModel;
use super::tokenizer::PyTokenizer;
use crate::coordinator::SequenceSpec;
use crate::generate::{GenerateOptions, Generation, Response};
use crate::mlx::Array;
use crate::sample::{ProcessorConfig, Sampler, SamplerConfig};

#[pyclass(name = "Generation", module = "mlx_dist._core")]
pub struct PyGeneration {
    inner: Generation,
}

/// The log-probabilities of one step, converted only if asked for.
#[pyclass(name = "Logprobs", module = "mlx_dist._core", frozen)]
pub struct PyLogprobs {
    inner: Array,
}

#[pymethods]
impl PyLogprobs {
    /// (raw bytes, shape, dtype name).
    fn raw<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, Vec<i32>, &'static str)> {
        let a = self.inner.clone();
        let bytes = py.detach(move || a.to_bytes())?;
        Ok((
            PyBytes::new(py, &bytes),
            self.inner.shape(),
            self.inner.dtype().name(),
        ))
    }
}

/// One record: (text, token, logprobs, prompt_tokens, prompt_tps,
/// generation_tokens, generation_tps, peak_memory, finish_reason).
type Record = (
    String,
    u32,
    Option<PyLogprobs>,
    usize,
    f64,
    usize,
    f64,
    f64,
    Option<&'static str>,
);

fn record(r: Response) -> Record {
    (
        r.text,
        r.token,
        r.logprobs.map(|inner| PyLogprobs { inner }),
        r.prompt_tokens,
        r.prompt_tps,
        r.generation_tokens,
        r.generation_tps,
        r.peak_memory,
        r.finish_reason.map(|f| f.as_str()),
    )
}

#[pymethods]
impl PyGeneration {
    #[new]
    #[pyo3(signature = (
        model, tokenizer, prompt, *, max_tokens = 256, temp = 0.0, top_p = 0.0, min_p = 0.0,
        min_tokens_to_keep = 1, top_k = 0, seed = None, logit_bias = Vec::new(),
        repetition_penalty = None, repetition_context_size = 20, presence_penalty = None,
        presence_context_size = 20, frequency_penalty = None, frequency_context_size = 20,
        stop = Vec::new(), prefill_step_size = 2048, logprobs = true
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        tokenizer: &PyTokenizer,
        prompt: Vec<u32>,
        max_tokens: usize,
        temp: f32,
        top_p: f32,
        min_p: f32,
        min_tokens_to_keep: i32,
        top_k: i32,
        seed: Option<u64>,
        logit_bias: Vec<(u32, f32)>,
        repetition_penalty: Option<f32>,
        repetition_context_size: usize,
        presence_penalty: Option<f32>,
        presence_context_size: usize,
        frequency_penalty: Option<f32>,
        frequency_context_size: usize,
        stop: Vec<String>,
        prefill_step_size: usize,
        logprobs: bool,
    ) -> PyResult<PyGeneration> {
        let sampler = SamplerConfig {
            temp,
            top_p,
            min_p,
            min_tokens_to_keep,
            top_k,
            seed,
        };
        let processors = ProcessorConfig {
            logit_bias,
            repetition_penalty,
            repetition_context_size,
            presence_penalty,
            presence_context_size,
            frequency_penalty,
            frequency_context_size,
        };
        let opts = GenerateOptions {
            max_tokens,
            prefill_step: prefill_step_size,
            stop,
        };
        let tok = &tokenizer.inner;
        // A model in this process, or a cluster of workers.
        if let Ok(cluster) = model.cast::<PyCluster>() {
            let cluster = cluster.get().inner.clone();
            let inner = py.detach(move || -> crate::Result<Generation> {
                opts.validate()?;
                let started = Instant::now();
                let n = prompt.len();
                let remote = cluster.start(SequenceSpec {
                    prompt,
                    sampler,
                    processors,
                    max_tokens,
                    prefill_step: opts.prefill_step,
                    logprobs,
                })?;
                Generation::from_source(Box::new(remote), tok, n, opts, started)
            })?;
            return Ok(PyGeneration { inner });
        }
        let local = model.cast::<PyModel>()?.get();
        let (m, prefixes) = (local.inner.clone(), local.prefixes.clone());
        processors.validate(m.args.vocab_size as usize)?;
        let inner = py.detach(move || -> crate::Result<Generation> {
            let sampler = Sampler::new(sampler, processors)?;
            Generation::new(m, tok, &prompt, sampler, opts, Some(prefixes))
        })?;
        Ok(PyGeneration { inner })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Option<Record>> {
        let g = &mut slf.inner;
        let r = py.detach(|| g.next_response())?;
        Ok(r.map(record))
    }

    /// Token ids generated so far.
    #[getter]
    fn tokens(&self) -> Vec<u32> {
        self.inner.generated().to_vec()
    }

    /// Bytes of KV cache this sequence holds.
    #[getter]
    fn cache_nbytes(&self) -> usize {
        self.inner.cache_nbytes()
    }

    /// Prompt positions taken from a kept prefix instead of computed.
    #[getter]
    fn cached_tokens(&self) -> usize {
        self.inner.cached_tokens()
    }
}
