"""Generation with mlx-lm's API: ``stream_generate`` yields
``GenerationResponse`` records, ``generate`` returns the text."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_dist import _core
from mlx_dist.sample_utils import LogitsProcessor, Sampler
from mlx_dist.utils import Model, TokenizerWrapper, _token_list

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class GenerationResponse:
    """One step of generation (mlx-lm's fields).

    ``text`` is the new text of this step; ``logprobs`` the log-probabilities
    over the vocabulary, converted to an ``mx.array`` on first access."""

    text: str
    token: int
    _logprobs: Any
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    from_draft: bool = False

    @property
    def logprobs(self) -> mx.array | None:
        if self._logprobs is not None and not isinstance(self._logprobs, mx.array):
            data, shape, dtype = self._logprobs.raw()
            if dtype == "bfloat16":
                raw = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
                arr = mx.array(raw.view(np.float32).reshape(shape)).astype(mx.bfloat16)
            else:
                arr = mx.array(np.frombuffer(data, dtype=_NP_DTYPES[dtype]).reshape(shape))
            self._logprobs = arr
        return self._logprobs


_GENERATION_OPTIONS = {
    "seed",
    "stop",
    "prefill_step_size",
    "max_kv_size",
    "prompt_progress_callback",
    "logprobs",
}


def _options(kwargs: dict) -> dict:
    opts: dict[str, Any] = {}
    sampler = kwargs.pop("sampler", None)
    if sampler is not None:
        if not isinstance(sampler, Sampler):
            raise TypeError("sampler must come from mlx_dist.make_sampler")
        opts.update(sampler.options())
    for proc in kwargs.pop("logits_processors", None) or []:
        if not isinstance(proc, LogitsProcessor):
            raise TypeError("logits_processors must come from mlx_dist.make_logits_processors")
        opts.update(proc.options)
    # mlx-lm's generate also takes the sampling settings directly.
    for name in ("temp", "top_p", "min_p", "min_tokens_to_keep", "top_k"):
        if name in kwargs:
            opts[name] = kwargs.pop(name)
    for name in ("repetition_penalty", "repetition_context_size"):
        if name in kwargs:
            opts[name] = kwargs.pop(name)
    unknown = set(kwargs) - _GENERATION_OPTIONS
    if unknown:
        raise TypeError(f"unexpected generation arguments: {sorted(unknown)}")
    if kwargs.get("max_kv_size") is not None:
        raise ValueError("max_kv_size (a rotating KV cache) is not supported by mlx-dist")
    if kwargs.get("seed") is not None:
        opts["seed"] = int(kwargs["seed"])
    stop = kwargs.get("stop")
    if stop is not None:
        opts["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if kwargs.get("prefill_step_size") is not None:
        opts["prefill_step_size"] = int(kwargs["prefill_step_size"])
    if "logprobs" in kwargs:
        opts["logprobs"] = bool(kwargs["logprobs"])
    return opts


def _encode_prompt(tokenizer: TokenizerWrapper, prompt) -> list[int]:
    if isinstance(prompt, str):
        bos = tokenizer.bos_token
        add_special = bos is None or not prompt.startswith(bos)
        return tokenizer.encode(prompt, add_special_tokens=add_special)
    return _token_list(prompt)


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int] | mx.array,
    max_tokens: int = 256,
    draft_model=None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Yields one :class:`GenerationResponse` per generated token.

    Arguments follow mlx-lm: ``sampler``, ``logits_processors``,
    ``prefill_step_size``, plus ``seed`` and ``stop`` (strings that end
    generation and are not emitted). A model loaded with ``max_context=N``
    refuses a prompt of N tokens or more and stops a completion at N."""
    if draft_model is not None:
        raise ValueError("speculative decoding (draft_model) is not supported by mlx-dist")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    progress = kwargs.get("prompt_progress_callback")
    opts = _options(dict(kwargs))
    ids = _encode_prompt(tokenizer, prompt)
    limit = getattr(model, "max_context", None)
    if limit:
        if len(ids) >= limit:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; max_context is {limit} (prompt and completion)"
            )
        max_tokens = min(max_tokens, limit - len(ids))
    if progress:
        progress(0, len(ids))
    if not isinstance(model, Model):
        # Over the network the full vocabulary per token is costly: only on request.
        opts.setdefault("logprobs", False)
    gen = _core.Generation(model._core, tokenizer._core, ids, max_tokens=max_tokens, **opts)
    if progress:
        progress(len(ids), len(ids))
    for rec in gen:
        yield GenerationResponse(*rec)


def generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: str | list[int] | mx.array,
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generates a complete response; with ``verbose`` prints it as it comes
    and the speeds at the end, as mlx-lm does."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None or not text:
            print("No text generated for this prompt")
        if response is not None:
            print(
                f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec"
            )
            print(
                f"Generation: {response.generation_tokens} tokens, "
                f"{response.generation_tps:.3f} tokens-per-sec"
            )
            print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text
