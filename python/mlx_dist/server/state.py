"""The server's state: the loaded model, its engine and metrics, and every
question the HTTP layer asks of the core (routes never reach into
``model._core``)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_dist import _core
from mlx_dist.engine import Engine
from mlx_dist.metrics import Metrics
from mlx_dist.server.errors import APIError
from mlx_dist.server.settings import ServerSettings, resolve_settings
from mlx_dist.utils import context_limit


class ServerState:
    """The loaded model, its engine and the server's metrics."""

    def __init__(self, settings: ServerSettings):
        settings.check()
        self.settings = settings
        self.metrics = Metrics()
        self.model = None
        self.tokenizer = None
        self.engine: Engine | None = None
        self.name = ""
        self.aliases: set[str] = set()
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self._replanning: threading.Thread | None = None
        # Re-plans that joins asked for: when the last began, and whether
        # one is due (the join rate limit).
        self._join_lock = threading.Lock()
        self._last_join_replan = float("-inf")
        self._join_replan_due: threading.Timer | None = None
        # The in-process worker that runs a one-device model, batched.
        self.local_worker: str | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def distributed(self) -> bool:
        return self.model is not None and isinstance(self.model._core, _core.Cluster)

    @property
    def over_workers(self) -> bool:
        """Split over workers, not in the one inside this process."""
        return self.distributed and self.local_worker is None

    @property
    def cluster_token(self) -> str | None:
        """The token workers carry; ``MLX_DIST_TOKEN`` when the settings,
        built by hand, give none (the core reads it too)."""
        return self.settings.token or os.environ.get("MLX_DIST_TOKEN")

    def load(self, progress: Callable | None = None) -> None:
        """Loads the model (locally or over the workers) and starts the engine."""
        from mlx_dist.utils import load

        s = self.settings
        if s.cluster_config:
            # Built by hand, not by resolve_settings: the file still counts.
            s = self.settings = resolve_settings(s, env={})
        if s.workers:
            self.model, self.tokenizer = load(
                s.model,
                **s.cluster_args(),
                prefill_chunk=s.prefill_chunk,
                progress=progress,
                token=s.token,
                recovery_wait=s.recovery_wait,
                max_context=s.max_context,
            )
        elif s.batch:
            self.local_worker = _core.start_local_worker(**s.worker_args())
            self.model, self.tokenizer = load(
                s.model,
                workers=[self.local_worker],
                strategy="uniform",
                kv_tokens=s.cluster_args()["kv_tokens"],
                prefill_chunk=s.prefill_chunk,
                progress=progress,
                recover=False,
                max_context=s.max_context,
            )
        else:
            self.model, self.tokenizer = load(
                s.model, max_context=s.max_context, prefix_cache_mb=s.prefix_cache_mb
            )
        source = s.model or getattr(self.model, "path", "") or "mlx-dist-demo"
        self.name = s.model_name or _model_name(str(source))
        self.aliases = {self.name, str(source)}
        self.engine = Engine(
            self.model,
            self.tokenizer,
            max_active=s.max_concurrency,
            max_queue=s.max_queue,
            metrics=self.metrics,
            prefill_chunk=s.prefill_chunk,
        )
        self.metrics.watch_engine(lambda: self.engine.queued, lambda: self.engine.active)

    def check_ready(self) -> None:
        if not self.ready:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})

    def check_model(self, model: str | None) -> None:
        """A 404 unless ``model`` (when given) is the one served here."""
        if model is not None and model not in self.aliases:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def replan_soon(self, reason: str) -> None:
        """Re-plans in the background (one at a time)."""
        if self._replanning is not None and self._replanning.is_alive():
            return

        def run() -> None:
            try:
                self.model._core.replan(reason)
            except (ConnectionError, ValueError, RuntimeError, MemoryError) as e:
                print(f"mlx-dist: re-plan failed: {e}", file=sys.stderr, flush=True)

        self._replanning = threading.Thread(target=run, name="mlx-dist-replan", daemon=True)
        self._replanning.start()

    def replan_for_join(self, reason: str) -> float:
        """Re-plans for a worker that joined, at most once every
        ``join_interval`` seconds: later joins are taken by one re-plan at
        the end of the interval. Returns the seconds until it starts."""
        with self._join_lock:
            if self._join_replan_due is not None:
                return max(0.0, self._join_replan_due.due - time.monotonic())
            wait = self._last_join_replan + self.settings.join_interval - time.monotonic()
            if wait <= 0:
                self._last_join_replan = time.monotonic()
                self.replan_soon(reason)
                return 0.0

            def later() -> None:
                with self._join_lock:
                    self._join_replan_due = None
                    self._last_join_replan = time.monotonic()
                self.replan_soon(reason)

            timer = threading.Timer(wait, later)
            timer.daemon = True
            timer.due = time.monotonic() + wait
            self._join_replan_due = timer
            timer.start()
            return wait

    def close(self) -> None:
        if self._join_replan_due is not None:
            self._join_replan_due.cancel()
        if self.engine is not None:
            self.engine.stop()
        if self.local_worker is not None:
            _core.stop_local_worker(self.local_worker)
            self.local_worker = None

    @property
    def context_length(self) -> int | None:
        """The model's context length, as its config gives it."""
        n = self.model._core.context_length
        return int(n) if n else None

    @property
    def context_limit(self) -> int:
        """The most tokens a sequence may hold here, prompt and completion."""
        return context_limit(self.model)

    @property
    def vocab_size(self) -> int:
        return int(self.model._core.vocab_size)

    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def render_chat(
        self, messages: str, add_generation_prompt: bool, tools: str | None, extra: str | None
    ) -> str:
        """The chat template over JSON-encoded messages, tools and template
        variables (a ValueError when the template fails)."""
        return self.tokenizer._core.apply_chat_template(
            messages, add_generation_prompt, tools, extra
        )

    def model_card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx-dist",
            "max_model_len": self.context_limit,
        }

    # The cluster.

    @staticmethod
    def probe_worker(address: str, timeout: float) -> dict:
        """The device info of the worker at ``address`` (raises when none answers)."""
        return _core.worker_info(address, timeout)

    def add_worker(self, address: str) -> bool:
        """Adds a worker the next plan may use; False when it was known."""
        return self.model._core.add_worker(address)

    @property
    def all_workers(self) -> list[str]:
        return self.model._core.all_workers

    @property
    def excluded(self) -> list[str]:
        return self.model.excluded

    def excluded_back(self) -> bool:
        """Whether a worker left out of the plan answers again."""
        return self.model._core.excluded_back()

    async def workers(self, timeout: float) -> list[dict]:
        """Each stage's worker, asked for its device info (concurrently)."""
        core = self.model._core
        stages = self.model.plan_dict.get("stages", [])

        async def ask(i: int, address: str, name: str) -> dict:
            started = time.perf_counter()
            # The in-process worker's port is a detail: it is this device.
            shown = "local" if address == self.local_worker else address
            entry: dict[str, Any] = {"stage": i, "address": shown, "name": name}
            if i < len(stages):
                layers = stages[i]["layers"]
                entry["layers"] = [layers["start"], layers["end"]]
            try:
                info = await asyncio.to_thread(self.probe_worker, address, timeout)
            except (ConnectionError, ValueError, RuntimeError) as e:
                entry.update(reachable=False, error=str(e))
                return entry
            entry.update(reachable=True, latency_ms=round((time.perf_counter() - started) * 1e3, 2))
            entry["info"] = info
            shard = (info.get("engine") or {}).get("shard")
            held = [shard["layer_start"], shard["layer_end"]] if shard else None
            if held != entry.get("layers"):
                # Answering, but not holding its part of the plan (it restarted).
                entry["reachable"] = False
                entry["error"] = f"holds layers {held} instead of {entry.get('layers')}"
            return entry

        pairs = enumerate(zip(core.addresses, core.names, strict=True))
        return list(await asyncio.gather(*(ask(i, a, n) for i, (a, n) in pairs)))

    async def devices(self) -> list[dict]:
        """Each stage's device with its figures. Busy fraction and mean
        batch here are over the worker's lifetime; ``/metrics`` has recent
        ones."""
        engine = self.engine
        if self.distributed:
            micros = self.model.last_stage_micros
            workers = await self.workers(timeout=2.0)
            for w in workers:
                i = w["stage"]
                w["last_step_ms"] = micros[i] / 1e3 if i < len(micros) else None
                info = w.get("info") or {}
                figures = info.get("engine") or {}
                if info.get("uptime_micros"):
                    w["busy_fraction"] = figures.get("busy_micros", 0) / info["uptime_micros"]
                if figures.get("batches"):
                    w["mean_batch"] = figures["batched_steps"] / figures["batches"]
            return workers
        memory = _core.memory()
        active, peak = memory.active, memory.peak
        device = await asyncio.to_thread(_core.device_info, socket.gethostname())
        uptime = int((time.perf_counter() - engine.started) * 1e6)
        busy = int(engine.busy_seconds * 1e6)
        # Shaped as a worker's DeviceInfo, so that one reader reads both.
        info = {
            "device": device,
            "memory": {"active": active, "peak": peak},
            "engine": {
                "busy_micros": busy,
                "tokens_processed": engine.tokens_processed,
                "steps": engine.steps,
                "sequences": engine.active,
            },
            "uptime_micros": uptime,
        }
        return [
            {
                "stage": 0,
                "name": device["name"],
                "address": "local",
                "reachable": True,
                "layers": [0, self.model._core.num_layers],
                "last_step_ms": None,
                "busy_fraction": busy / uptime if uptime else 0.0,
                "info": info,
            }
        ]

    async def cluster_status(self) -> dict:
        """``/cluster/status``: the model, the engine, memory, the plan, devices."""
        engine = self.engine
        memory = _core.memory()
        active, peak, cache = memory.active, memory.peak, memory.cache
        body: dict[str, Any] = {
            "model": self.name,
            "model_type": self.model.model_type,
            "context_length": self.context_length,
            "max_context": self.context_limit,
            "distributed": self.over_workers,
            "engine": {
                "active_sequences": engine.active,
                "queued": engine.queued,
                "max_concurrency": engine.max_active,
                "max_queue": engine.max_queue,
                "busy_seconds": engine.busy_seconds,
                "tokens_processed": engine.tokens_processed,
            },
            "coordinator": {
                "mlx_active_memory": active,
                "mlx_peak_memory": peak,
                "mlx_cache_memory": cache,
            },
        }
        body["engine"]["in_flight_steps"] = engine.active if self.distributed else 0
        if self.distributed:
            core = self.model._core
            body["epoch"] = core.epoch
            body["workers"] = core.all_workers
            body["excluded"] = core.excluded
            body["recoveries"] = self.model.recoveries
            body["plan"] = self.model.plan_dict
            body["plan_text"] = self.model.plan
        body["devices"] = await self.devices()
        body["prefix_cache"] = self.prefix_cache(body["devices"])
        return body

    def prefix_cache(self, devices: list[dict]) -> dict:
        """What the prefix cache holds and may hold: on one device (not
        batched) the model's own; over workers, or the worker inside this
        process, what the coordinator names and what each stage keeps,
        each within its bound (``MLX_DIST_PREFIX_CACHE_MB``, at most a
        quarter of the stage's KV budget)."""
        core = self.model._core
        if not self.distributed:
            return {
                "entries": core.prefix_cache_entries,
                "bytes": core.prefix_cache_bytes,
                "budget_bytes": core.prefix_cache_budget,
            }
        stages = []
        for d in devices:
            figures = (d.get("info") or {}).get("engine") or {}
            stages.append(
                {
                    "stage": d["stage"],
                    "entries": figures.get("prefix_entries"),
                    "bytes": figures.get("prefix_bytes"),
                    "budget_bytes": figures.get("prefix_budget_bytes"),
                }
            )
        return {"index_entries": core.prefix_index_entries, "stages": stages}


def _model_name(source: str) -> str:
    p = Path(source)
    if p.suffix.lower() == ".gguf":
        return p.stem
    return p.name or source
