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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """The settings ``MLX_DIST_*`` variables give, defaults for the rest
        (no cluster config read: :func:`resolve_settings` does that)."""
        return cls(**_from_env(os.environ if env is None else env))

    def cluster_args(self) -> dict[str, Any]:
        """``mlx_dist.load``'s keyword arguments for splitting the model
        over ``workers``, with its defaults where a setting is None."""
        return {
            "workers": self.workers,
            "strategy": self.strategy or ("custom" if self.proportions else "balanced"),
            "proportions": self.proportions,
            "compression": self.compression or "none",
            "kv_tokens": int(self.kv_tokens or 4096),
            "tls_ca": self.tls_ca,
            "prefill_chunk": self.prefill_chunk,
        }

    def check(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
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


_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}


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
            elif f.type == "float":
                value = float(raw)
            elif f.type == "bool":
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
