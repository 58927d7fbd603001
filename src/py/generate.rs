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

/// One step of a generation (the fields of mlx-lm's `GenerationResponse`).
/// It also reads as the tuple of its fields, in this order.
#[pyclass(name = "Record", module = "mlx_dist._core", frozen, get_all)]
pub struct PyRecord {
    text: String,
    token: u32,
    logprobs: Option<Py<PyLogprobs>>,
    prompt_tokens: usize,
    prompt_tps: f64,
    generation_tokens: usize,
    generation_tps: f64,
    peak_memory: f64,
    finish_reason: Option<&'static str>,
}

impl PyRecord {
    fn new(py: Python<'_>, r: Response) -> PyResult<PyRecord> {
        let logprobs = r
            .logprobs
            .map(|inner| Py::new(py, PyLogprobs { inner }))
            .transpose()?;
        Ok(PyRecord {
            text: r.text,
            token: r.token,
            logprobs,
            prompt_tokens: r.prompt_tokens,
            prompt_tps: r.prompt_tps,
            generation_tokens: r.generation_tokens,
            generation_tps: r.generation_tps,
            peak_memory: r.peak_memory,
            finish_reason: r.finish_reason.map(|f| f.as_str()),
        })
    }

    fn fields<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        Ok(vec![
            self.text.clone().into_pyobject(py)?.into_any(),
            self.token.into_pyobject(py)?.into_any(),
            self.logprobs.clone_ref_or_none(py),
            self.prompt_tokens.into_pyobject(py)?.into_any(),
            self.prompt_tps.into_pyobject(py)?.into_any(),
            self.generation_tokens.into_pyobject(py)?.into_any(),
            self.generation_tps.into_pyobject(py)?.into_any(),
            self.peak_memory.into_pyobject(py)?.into_any(),
            self.finish_reason.into_pyobject(py)?.into_any(),
        ])
    }
}

trait CloneRefOrNone {
    fn clone_ref_or_none<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny>;
}

impl CloneRefOrNone for Option<Py<PyLogprobs>> {
    fn clone_ref_or_none<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        match self {
            Some(l) => l.bind(py).clone().into_any(),
            None => py.None().into_bound(py),
        }
    }
}

#[pymethods]
impl PyRecord {
    fn __len__(&self) -> usize {
        9
    }

    fn __getitem__<'py>(&self, py: Python<'py>, i: isize) -> PyResult<Bound<'py, PyAny>> {
        let mut f = self.fields(py)?;
        let n = f.len() as isize;
        let at = if i < 0 { i + n } else { i };
        if !(0..n).contains(&at) {
            return Err(pyo3::exceptions::PyIndexError::new_err(
                "record index out of range",
            ));
        }
        Ok(f.swap_remove(at as usize))
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = pyo3::types::PyTuple::new(py, self.fields(py)?)?;
        Ok(t.as_any().try_iter()?.into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "Record(text={:?}, token={}, generation_tokens={}, finish_reason={:?})",
            self.text, self.token, self.generation_tokens, self.finish_reason
        )
    }
}

#[pymethods]
impl PyGeneration {
    #[new]
    #[pyo3(signature = (
        model, tokenizer, prompt, *, max_tokens = 256, temp = 0.0, top_p = 0.0, min_p = 0.0,
        min_tokens_to_keep = 1, top_k = 0, seed = None, logit_bias = Vec::new(),
        repetition_penalty = None, repetition_context_size = 20, presence_penalty = None,
        presence_context_size = 20, frequency_penalty = None, frequency_context_size = 20,
        stop = Vec::new(), prefill_step_size = 2048, logprobs = true, defer_prefill = false
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
        defer_prefill: bool,
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
                let spec = SequenceSpec {
                    prompt,
                    sampling: crate::sample::Sampling {
                        sampler,
                        processors,
                    },
                    max_tokens,
                    prefill_step: opts.prefill_step,
                    logprobs,
                };
                let remote = cluster.start(spec, defer_prefill)?;
                Generation::from_source(Box::new(remote), tok, n, opts, started)
            })?;
            return Ok(PyGeneration { inner });
        }
        let local = model.cast::<PyModel>()?.get();
        let (m, prefixes) = (local.inner.clone(), local.prefixes.clone());
        processors.validate(m.args.vocab_size as usize)?;
        let inner = py.detach(move || -> crate::Result<Generation> {
            let sampler = Sampler::new(sampler, processors)?;
            Generation::new(
                m,
                tok,
                &prompt,
                sampler,
                opts,
                Some(prefixes),
                defer_prefill,
            )
        })?;
        Ok(PyGeneration { inner })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Option<PyRecord>> {
        let g = &mut slf.inner;
        let r = py.detach(|| g.next_response())?;
        r.map(|r| PyRecord::new(py, r)).transpose()
    }

    /// With `defer_prefill`: runs the next chunk of the prompt; True once
    /// the whole prompt has run (the first token is then on its way).
    fn prefill_step(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<bool> {
        let g = &mut slf.inner;
        Ok(py.detach(|| g.prefill_step())?)
    }

    /// Whether the prompt is still to run (`prefill_step`).
    #[getter]
    fn prefilling(&self) -> bool {
        self.inner.prefilling()
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
