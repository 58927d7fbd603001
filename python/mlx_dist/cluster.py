"""Running a model over a cluster of workers: the cluster config, and the
model object that ``generate``/``stream_generate`` drive like a local one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mlx_dist import _core
from mlx_dist.tokenizer_utils import TokenizerWrapper

STRATEGIES = ("uniform", "memory_proportional", "compute_proportional", "balanced", "custom")
_CAPABILITY_KEYS = {
    "name": str,
    "chip": str,
    "gpu_cores": int,
    "memory_total": int,
    "memory_available": int,
    "matmul_gflops": float,
    "bandwidth_gbs": float,
}


class DistributedModel:
    """A model whose layers live on workers; ``plan`` shows where and why."""

    def __init__(self, core: _core.Cluster, config: dict[str, Any]):
        self._core = core
        self.config = config

    @property
    def plan(self) -> str:
        """Which device holds which layers, and why."""
        return self._core.plan_text

    @property
    def plan_dict(self) -> dict:
        return self._core.plan

    @property
    def workers(self) -> list[str]:
        return self._core.addresses

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def last_stage_micros(self) -> list[int]:
        """Compute time of each stage in the last step (microseconds)."""
        return self._core.last_stage_micros

    @property
    def epoch(self) -> int:
        """Re-plans after failures so far (0: as first loaded)."""
        return self._core.epoch

    @property
    def excluded(self) -> list[str]:
        """Workers left out of the plan because they stopped answering."""
        return self._core.excluded

    @property
    def recoveries(self) -> list[dict]:
        """The latest re-plans: when, why, who was left out, how long."""
        return self._core.recoveries

    def __call__(self, inputs):
        raise NotImplementedError("a distributed model generates tokens; it does not return logits")

    def __repr__(self) -> str:
        return f"DistributedModel({self.model_type}, workers={self.workers})"


def _gib(v) -> int:
    return int(float(v) * (1 << 30))


def parse_workers(workers) -> list[dict]:
    """Workers as given: "h1:p1,h2:p2", a list of "host:port", or a list of
    mappings with ``address`` and optional declared capabilities
    (``memory_gb``, ``bandwidth_gbs``, ``matmul_gflops``, ``name``, ...)."""
    if isinstance(workers, str):
        workers = [w for w in workers.split(",") if w.strip()]
    out = []
    for w in workers:
        if isinstance(w, str):
            w = {"address": w}
        if not isinstance(w, dict) or not isinstance(w.get("address"), str):
            raise TypeError(f"a worker must be 'host:port' or a mapping with an address, got {w!r}")
        address = w["address"].strip()
        host, sep, port = address.rpartition(":")
        # `_core.start_local_worker` names the worker inside this process so.
        in_process = host == "in-process" and port.isdigit()
        if not in_process and (
            not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
        ):
            raise ValueError(f"bad worker address {address!r}: expected host:port")
        declared: dict[str, Any] = {}
        for key, value in w.items():
            if key == "address":
                continue
            if key == "declared":
                # Already parsed (by load_config).
                declared.update(value or {})
            elif key == "memory_gb":
                declared["memory_available"] = declared["memory_total"] = _gib(value)
            elif key in _CAPABILITY_KEYS:
                declared[key] = _CAPABILITY_KEYS[key](value)
            else:
                raise ValueError(f"unknown worker setting {key!r} for {address}")
        out.append({"address": address, "declared": declared or None})
    if not out:
        raise ValueError("no workers given")
    return out


def load_config(path: str | Path) -> dict:
    """Reads a cluster config (YAML, TOML or JSON): ``workers`` (or
    ``devices``), and optionally ``model``, ``strategy``, ``proportions``,
    ``compression``, ``kv_tokens``."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    elif suffix == ".toml":
        import tomllib

        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        raise ValueError(f"{path}: unknown config format (use .yaml, .toml or .json)")
    if not isinstance(cfg, dict):
        raise TypeError(f"{path}: the config must be a mapping")
    workers = cfg.get("workers", cfg.get("devices"))
    if workers is None:
        raise ValueError(f"{path}: no workers (or devices) listed")
    allowed = {
        "workers",
        "devices",
        "model",
        "strategy",
        "proportions",
        "compression",
        "kv_tokens",
        "tls_ca",
    }
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    cfg["workers"] = parse_workers(workers)
    cfg.pop("devices", None)
    if cfg.get("tls_ca") is not None:
        if not isinstance(cfg["tls_ca"], str):
            raise TypeError(f"{path}: tls_ca must be the path of a PEM file")
        # A relative path is relative to the config file.
        cfg["tls_ca"] = str(path.parent / Path(cfg["tls_ca"]).expanduser())
    return cfg


def ca_pem(ca) -> str:
    """The PEM text of the CA certificate ``ca``: the path of a PEM file
    (e.g. the ``cert.pem`` of ``mlx-dist cert``) or PEM text."""
    text = str(ca)
    if "-----BEGIN" in text:
        return text
    p = Path(text).expanduser()
    try:
        return p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"TLS CA certificate {p} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"TLS CA certificate {p} is not a PEM text file") from None


def set_tls_ca(ca) -> None:
    """Makes the later connections of this process to workers that are
    given no CA of their own use TLS, trusting the CA certificate ``ca``
    (see :func:`ca_pem`). ``None``: plain connections."""
    _core.set_tls_ca(None if ca is None else ca_pem(ca))


def strategy_name(strategy: str, proportions=None) -> str:
    if proportions is not None:
        if strategy not in ("custom", None):
            raise ValueError("proportions go with strategy 'custom'")
        return "custom:" + ",".join(str(float(p)) for p in proportions)
    if strategy.split(":")[0] not in STRATEGIES and strategy not in ("memory", "compute"):
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


def _progress_printer(stream=sys.stderr):
    """Reports shard loading as one bar line per stage every tenth of the way."""
    last: dict[int, int] = {}

    def report(stage: int, done: int, total: int, message: str) -> None:
        if message == "loaded" or (total and done >= total):
            print(
                f"  stage {stage} [{'#' * 20}] {message} {done / 1e6:.1f} MB",
                file=stream,
                flush=True,
            )
        elif total:
            pct = int(100 * done / total)
            if last.get(stage) != pct // 10:
                last[stage] = pct // 10
                bar = "#" * (pct // 5) + "-" * (20 - pct // 5)
                print(f"  stage {stage} [{bar}] {pct:3d}% {message}", file=stream, flush=True)
        else:
            print(f"  stage {stage}: {message}", file=stream, flush=True)

    return report


def load_distributed(
    path_or_repo: str,
    workers,
    strategy: str = "balanced",
    proportions=None,
    compression: str = "none",
    kv_tokens: int = 4096,
    connect_timeout: float = 10.0,
    progress=None,
    token: str | None = None,
    recover: bool = True,
    recovery_wait: float = 30.0,
    prefill_chunk: int = 1024,
    tls_ca=None,
    ring: bool = True,
    step_timeout: float | None = None,
    failure_timeout: float | None = None,
    h2_window_mb: int | None = None,
):
    """``mlx_dist.load`` over ``workers``. The token and CA certificate
    given also become this process's defaults (:func:`set_tls_ca`), for the
    later calls given none: ``_core.worker_info``, the server's probes of
    joining workers."""
    pem = None if tls_ca is None else ca_pem(tls_ca)
    if token is not None:
        _core.set_cluster_token(token)
    if pem is not None:
        _core.set_tls_ca(pem)

    specs = parse_workers(workers)
    declared = [s["declared"] for s in specs]
    core, tokenizer = _core.load_cluster(
        str(path_or_repo),
        [s["address"] for s in specs],
        strategy_name(strategy, proportions),
        compression or "none",
        int(kv_tokens),
        float(connect_timeout),
        json.dumps(declared) if any(declared) else None,
        progress,
        bool(recover),
        float(recovery_wait),
        int(prefill_chunk),
        bool(ring),
        token=token,
        tls_ca=pem,
        step_timeout=None if step_timeout is None else float(step_timeout),
        failure_timeout=None if failure_timeout is None else float(failure_timeout),
        h2_window_mb=None if h2_window_mb is None else int(h2_window_mb),
    )
    return DistributedModel(core, core.config), TokenizerWrapper(tokenizer)
