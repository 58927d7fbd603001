"""What to serve and how: :class:`ServerSettings`, and the one place that
decides where each setting comes from (:func:`resolve_settings`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

DEFAULT_PORT = 8100

# The settings a cluster config file may give (its other key, ``workers``,
# is one too). ``mlx_dist.cluster.load_config`` checks the file.
_CONFIG_KEYS = ("model", "workers", "strategy", "proportions", "compression", "kv_tokens", "tls_ca")


@dataclasses.dataclass
class ServerSettings:
    """What to serve and how. Each field is an argument of ``serve()``, an
    option of ``mlx-dist serve`` (with dashes) and an ``MLX_DIST_<NAME>``
    environment variable; :func:`resolve_settings` merges them. A field
    left None takes the cluster config's value, else ``load``'s default."""

    model: str | None = None
    workers: Any = None
    cluster_config: str | None = None
    strategy: str | None = None
    proportions: list[float] | None = None
    compression: str | None = None
    kv_tokens: int | None = None
    model_name: str | None = None
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    # reasoning_format when a request gives none: "auto" puts a <think>
    # block (or gpt-oss's analysis) in reasoning_content where the template
    # has one, "deepseek" always, "none" leaves it in the text.
    reasoning_format: str = "auto"
    max_body_bytes: int = 8 << 20
    recovery_wait: float = 30.0
    health_interval: float = 2.0
    token: str | None = None
    tls_ca: str | None = None
    # On one device, run the model in a worker inside this process, whose
    # stage batches the decode steps of concurrent sequences (False: step
    # them in turn, each with its own cache).
    batch: bool = True
    # Prompt tokens run in one step: a long prompt runs in such chunks, each
    # between the decode steps of the other streams, so that they wait one
    # chunk at most (a few decode steps' time) rather than the whole prompt.
    prefill_chunk: int = 256
    # Tokens a sequence may hold, prompt and completion (None: the model's
    # context length when its config gives a sane one, else 32768).
    max_context: int | None = None
    # /cluster/join without a cluster token set: refused unless allowed.
    allow_join: bool = False
    # Seconds at least between two re-plans that joins start.
    join_interval: float = 10.0
    # Seconds a connection has to send a request's headers (from its
    # opening, or from the end of its previous answer), and between parts
    # of its body.
    header_timeout: float = 10.0
    # Seconds an idle kept-alive connection stays open.
    keep_alive_timeout: float = 5.0
    # Open connections at most; past them requests get 503.
    max_connections: int = 1024
    # How the workers are reached and watched (None: the core's default,
    # which is also what ``MLX_DIST_<NAME>`` gives when read there): seconds
    # a step's reply is waited for before the stages are asked whether they
    # answer (plus 0.1 per token; 30), seconds a silent worker has before
    # it counts as failed (4), and the HTTP/2 window in MiB (16; 0: 64 KiB).
    step_timeout: float | None = None
    failure_timeout: float | None = None
    h2_window_mb: int | None = None
    # The worker inside this process (one device; None: its default, as
    # for ``mlx-dist worker``): MiB of KV cache kept for later prompts
    # (1024; also the bound of the model's own cache with batch=False),
    # microseconds it polls for a step's result (2000 on a GPU, else 0),
    # and whether it launches decode steps ahead and compiles its GPU
    # kernels as it loads (both: on a CUDA GPU).
    prefix_cache_mb: int | None = None
    step_spin_us: int | None = None
    launch_ahead: bool | None = None
    warm_up: bool | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """The settings ``MLX_DIST_*`` variables give, defaults for the rest
        (no cluster config read: :func:`resolve_settings` does that)."""
        return cls(**_from_env(os.environ if env is None else env))

    def cluster_args(self) -> dict[str, Any]:
        """``mlx_dist.load``'s keyword arguments for splitting the model
        over ``workers``, with its defaults where a setting is None (and,
        for the core's own settings, left out where they are None)."""
        args = {
            "workers": self.workers,
            "strategy": self.strategy or ("custom" if self.proportions else "balanced"),
            "proportions": self.proportions,
            "compression": self.compression or "none",
            "kv_tokens": int(self.kv_tokens or 4096),
            "tls_ca": self.tls_ca,
        }
        for name in _CORE_CLUSTER_SETTINGS:
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        return args

    def worker_args(self) -> dict[str, Any]:
        """``_core.start_local_worker``'s keyword arguments for the worker
        inside this process, those that are None left out."""
        names = ("token", *_CORE_WORKER_SETTINGS)
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def check(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.reasoning_format not in ("auto", "deepseek", "none"):
            raise ValueError("reasoning_format must be auto, deepseek or none")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be at least 2")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        if self.join_interval < 0:
            raise ValueError("join_interval must be 0 or more")
        if self.header_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise ValueError("header_timeout and keep_alive_timeout must be above 0")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("step_timeout", "failure_timeout"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0")
        for name in ("h2_window_mb", "prefix_cache_mb", "step_spin_us"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}
# Settings the core takes as ``load`` arguments (the coordinator's) and as
# ``start_local_worker`` arguments (the worker's inside this process).
_CORE_CLUSTER_SETTINGS = ("step_timeout", "failure_timeout", "h2_window_mb")
_CORE_WORKER_SETTINGS = ("prefix_cache_mb", "step_spin_us", "launch_ahead", "warm_up")


def resolve_settings(
    given: Mapping[str, Any] | ServerSettings | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> ServerSettings:
    """The settings to serve with. Each comes from the first of:

    1. ``given``: ``serve()``'s arguments, ``mlx-dist serve``'s options
       (None: not given; a :class:`ServerSettings` gives all its fields
       that are not None),
    2. the environment's ``MLX_DIST_<NAME>`` (``env``, by default
       ``os.environ``; ``{}`` leaves it out),
    3. the cluster config file (``cluster_config`` from 1 or 2, read by
       ``mlx_dist.cluster.load_config``): ``model``, ``workers``,
       ``strategy``, ``proportions``, ``compression``, ``kv_tokens``,
       ``tls_ca``,
    4. the defaults of :class:`ServerSettings` (and, for a field left None,
       ``load``'s: :meth:`ServerSettings.cluster_args`).

    ``proportions`` may be given as ``"0.5,0.5"`` anywhere."""
    if isinstance(given, ServerSettings):
        given = dataclasses.asdict(given)
    explicit = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(explicit) - set(_FIELDS)
    if unknown:
        raise TypeError(f"unknown server settings: {sorted(unknown)}")
    environ = _from_env(os.environ if env is None else env)
    path = explicit.get("cluster_config") or environ.get("cluster_config")
    config = _from_config(path) if path else {}
    merged = {**config, **environ, **explicit}
    if isinstance(merged.get("proportions"), str):
        merged["proportions"] = _proportions(merged["proportions"], "proportions")
    return ServerSettings(**merged)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in _FIELDS.items():
        var = f"MLX_DIST_{name.upper()}"
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        try:
            if name == "proportions":
                value: Any = _proportions(raw, var)
            elif f.type in ("int", "int | None"):
                value = int(raw)
            elif f.type in ("float", "float | None"):
                value = float(raw)
            elif f.type in ("bool", "bool | None"):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("1", "true", "yes")
            else:
                value = raw
        except ValueError:
            raise ValueError(f"{var}={raw!r} is not a valid value") from None
        out[name] = value
    return out


def _from_config(path: str) -> dict[str, Any]:
    from mlx_dist.cluster import load_config

    cfg = load_config(path)
    return {k: cfg[k] for k in _CONFIG_KEYS if cfg.get(k) is not None}


def _proportions(raw: str, where: str) -> list[float]:
    try:
        return [float(p) for p in raw.split(",")]
    except ValueError:
        raise ValueError(f"{where}={raw!r}: expected numbers such as 0.5,0.25,0.25") from None
