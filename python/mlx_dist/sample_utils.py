"""Samplers and logits processors, configured as in mlx-lm and run in Rust."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sampler:
    """Sampling settings made by :func:`make_sampler`; temp 0 is greedy."""

    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0

    def options(self) -> dict:
        return asdict(self)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens=None,
) -> Sampler:
    """A sampler for ``generate``/``stream_generate`` (mlx-lm's arguments)."""
    if xtc_probability:
        raise ValueError("XTC sampling is not supported by mlx-dist")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    return Sampler(float(temp), float(top_p), float(min_p), int(min_tokens_to_keep), top_k)


@dataclass(frozen=True)
class LogitsProcessor:
    """One penalty or bias made by :func:`make_logits_processors`."""

    options: dict


def make_logits_processors(
    logit_bias: dict[int, float] | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = 20,
    presence_penalty: float | None = None,
    presence_context_size: int | None = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int | None = 20,
) -> list[LogitsProcessor]:
    """Logits processors with mlx-lm's arguments, applied in its order."""
    procs = []
    if logit_bias:
        procs.append(
            LogitsProcessor({"logit_bias": [(int(k), float(v)) for k, v in logit_bias.items()]})
        )
    for name, value, size in (
        ("repetition", repetition_penalty, repetition_context_size),
        ("presence", presence_penalty, presence_context_size),
        ("frequency", frequency_penalty, frequency_context_size),
    ):
        if value is not None and value != 0:
            if name == "repetition" and value < 0:
                raise ValueError(f"penalty must be a non-negative float, got {value}")
            procs.append(
                LogitsProcessor(
                    {f"{name}_penalty": float(value), f"{name}_context_size": int(size or 20)}
                )
            )
    return procs
