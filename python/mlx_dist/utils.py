"""Loading models: ``load`` returns mlx-lm-style ``(model, tokenizer)``."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mlx_dist import _core
from mlx_dist.cluster import load_distributed
from mlx_dist.tokenizer_utils import TokenizerWrapper, _token_list

# The context assumed when a model's config gives none, or one past
# SANE_CONTEXT (a GGUF without a context-length key, a config saying 1e30):
# without a bound, one long prompt would take the engine for minutes.
DEFAULT_MAX_CONTEXT = 32768
SANE_CONTEXT = 1 << 20


def context_limit(model) -> int:
    """The most tokens (prompt and completion) a sequence of ``model`` may
    hold: ``load(..., max_context=N)``'s N, else the model's context length
    when it is known and at most ``SANE_CONTEXT``, else
    ``DEFAULT_MAX_CONTEXT``."""
    given = getattr(model, "max_context", None)
    if given:
        return int(given)
    n = model._core.context_length
    return int(n) if n and 1 < n <= SANE_CONTEXT else DEFAULT_MAX_CONTEXT


class Model:
    """A loaded model. Calling it on token ids returns the logits of a full
    forward pass (no cache), shaped ``[1, L, vocab]``, as an ``mx.array``."""

    def __init__(self, core: _core.Model):
        self._core = core
        self.config: dict[str, Any] = core.config
        # load(..., max_context=N): prompts and completions are held to N tokens.
        self.max_context: int | None = None

    @property
    def model_type(self) -> str:
        return self._core.model_type

    @property
    def path(self) -> str:
        return self._core.path

    @property
    def nbytes(self) -> int:
        return self._core.nbytes

    @property
    def weight_conversions(self) -> dict:
        """For a GGUF model, how each GGML type became MLX affine weights: by type,
        ``tensors``, ``bits``, ``group_size``, ``exact`` and the largest error
        (``max_error``, ``max_relative_error``). Empty for safetensors."""
        return self._core.weight_conversions

    def __call__(self, inputs) -> mx.array:
        ids = _token_list(inputs)
        data, shape = self._core.logits(ids)
        return mx.array(np.frombuffer(data, dtype=np.float32).reshape(shape))

    def __repr__(self) -> str:
        return f"Model({self.model_type}, {self._core.num_layers} layers, {self.path!r})"


def load(
    path_or_repo: str | None = None,
    workers=None,
    strategy: str = "balanced",
    **kwargs,
):
    """Loads a model and its tokenizer from a local directory (MLX/Hugging Face
    layout), a ``.gguf`` file, or a Hugging Face repo id found in the local
    cache. With no path, the built-in demo model (SmolLM2-135M-Instruct).

    With ``workers`` ("h1:p1,h2:p2" or a list), the model is split by layers
    over those workers (``strategy``: uniform, memory_proportional,
    compute_proportional, balanced, or custom with ``proportions=[...]``); the
    returned model drives ``generate``/``stream_generate`` like a local one.
    ``tls_ca`` (a PEM file, e.g. from ``mlx-dist cert``) reaches the workers
    over TLS, trusting that certificate, and ``token`` is the cluster token
    (both also for the later calls of this process that are given none).
    ``ring=False`` sends every decode step from here instead of letting the
    last worker hand each token straight to the first. ``step_timeout``,
    ``failure_timeout`` (seconds) and ``h2_window_mb`` tune how the workers
    are watched and reached. ``max_context=N`` holds every sequence to N
    tokens, prompt and completion (a longer prompt is refused, a completion
    stops at N), whatever the model's config says. On one device,
    ``prefix_cache_mb`` bounds the KV cache kept from ended sequences for
    later prompts (workers have their own, ``mlx-dist worker
    --prefix-cache-mb``). Arguments left out take the ``MLX_DIST_*``
    variable of the same name, else the default (README: Settings)."""
    max_context = kwargs.pop("max_context", None)
    if max_context is not None and (
        isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2
    ):
        raise ValueError(f"max_context must be an integer of at least 2, got {max_context!r}")
    model, tokenizer = _load(path_or_repo, workers, strategy, **kwargs)
    model.max_context = max_context
    return model, tokenizer


def _load(path_or_repo, workers, strategy: str, **kwargs):
    dist_keys = {
        "proportions",
        "compression",
        "kv_tokens",
        "connect_timeout",
        "progress",
        "token",
        "recover",
        "recovery_wait",
        "prefill_chunk",
        "tls_ca",
        "ring",
        "step_timeout",
        "failure_timeout",
        "h2_window_mb",
    }
    local_keys = {"prefix_cache_mb"}
    unknown = (
        set(kwargs)
        - {"tokenizer_config", "model_config", "adapter_path", "lazy"}
        - dist_keys
        - local_keys
    )
    if unknown:
        raise TypeError(f"load() got unexpected arguments: {sorted(unknown)}")
    if kwargs.get("adapter_path"):
        raise ValueError("adapters are not supported by mlx-dist")
    if path_or_repo is None:
        from mlx_dist.demo import demo_model_path

        path_or_repo = str(demo_model_path())
    if workers is not None:
        if kwargs.get("prefix_cache_mb") is not None:
            raise TypeError(
                "prefix_cache_mb applies to a model on one device; workers keep their own "
                "(mlx-dist worker --prefix-cache-mb)"
            )
        opts = {k: v for k, v in kwargs.items() if k in dist_keys}
        return load_distributed(str(path_or_repo), workers, strategy, **opts)
    if set(kwargs) & dist_keys:
        raise TypeError(f"{sorted(set(kwargs) & dist_keys)} only apply with workers=")
    prefix_mb = kwargs.get("prefix_cache_mb")
    if prefix_mb is not None and (
        isinstance(prefix_mb, bool) or not isinstance(prefix_mb, int) or prefix_mb < 0
    ):
        raise ValueError(f"prefix_cache_mb must be an integer of 0 or more, got {prefix_mb!r}")
    model, tokenizer = _core.load(str(path_or_repo), not kwargs.get("lazy", False), prefix_mb)
    return Model(model), TokenizerWrapper(tokenizer)
