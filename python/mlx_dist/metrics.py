"""The server's Prometheus metrics (``GET /metrics``), one registry per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mlx_dist.rates import Rates

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """Counters of requests, tokens and errors; latency histograms; gauges
    of the queue, read when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_dist_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "mlx_dist_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "mlx_dist_generation_tokens", "Tokens generated", registry=r
        )
        self.errors = Counter(
            "mlx_dist_errors", "Requests that ended in an error", ["type"], registry=r
        )
        self.ttft = Histogram(
            "mlx_dist_time_to_first_token_seconds",
            "From a request's arrival at the engine to its first token",
            buckets=_LATENCY,
            registry=r,
        )
        self.token_latency = Histogram(
            "mlx_dist_time_per_output_token_seconds",
            "Time between two tokens of one sequence",
            buckets=_TOKEN,
            registry=r,
        )
        self.stage_time = Histogram(
            "mlx_dist_stage_step_seconds",
            "Compute time of one step on each pipeline stage",
            ["stage"],
            buckets=_TOKEN,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mlx_dist_queue_depth", "Requests waiting for the engine", registry=r
        )
        self.active = Gauge("mlx_dist_active_sequences", "Sequences generating now", registry=r)
        self.in_flight = Gauge(
            "mlx_dist_in_flight_steps",
            "Steps in flight through the pipeline (one per running sequence)",
            registry=r,
        )
        self.stage_busy = Gauge(
            "mlx_dist_stage_busy_fraction",
            "Share of time each stage spent computing, since the previous scrape",
            ["stage"],
            registry=r,
        )
        self.stage_batch = Gauge(
            "mlx_dist_stage_batch_size",
            "Mean size of each stage's batched decode steps, since the worker started",
            ["stage"],
            registry=r,
        )
        self.stage_tokens = Gauge(
            "mlx_dist_stage_tokens_per_second",
            "Token positions each stage ran per second, since the previous scrape",
            ["stage"],
            registry=r,
        )
        self.stage_up = Gauge(
            "mlx_dist_stage_up",
            "1 when the stage answers and holds its layers",
            ["stage"],
            registry=r,
        )
        self.stage_memory = Gauge(
            "mlx_dist_stage_memory_bytes", "MLX memory in use on each stage", ["stage"], registry=r
        )
        self.stage_memory_total = Gauge(
            "mlx_dist_stage_memory_total_bytes",
            "Memory of each stage's device",
            ["stage"],
            registry=r,
        )
        self._rates = Rates()

    def watch_engine(self, queued: Callable[[], float], active: Callable[[], float]) -> None:
        self.queue_depth.set_function(queued)
        self.active.set_function(active)
        self.in_flight.set_function(active)

    def stages(self, status: dict, now: float) -> None:
        """Per-stage figures from a `/cluster/status`-shaped snapshot."""
        rates = self._rates.update(status, now)
        for d in status.get("devices", []):
            stage, info = str(d.get("stage")), d.get("info") or {}
            r = rates.get(str(d.get("address", d.get("name"))))
            if r is not None:
                self.stage_busy.labels(stage).set(r["busy"])
                self.stage_tokens.labels(stage).set(r["tokens_per_s"])
            figures = info.get("engine") or {}
            if figures.get("batches"):
                self.stage_batch.labels(stage).set(figures["batched_steps"] / figures["batches"])
            self.stage_up.labels(stage).set(1 if d.get("reachable", True) else 0)
            if info:
                memory, device = info.get("memory") or {}, info.get("device") or {}
                self.stage_memory.labels(stage).set(memory.get("active", 0))
                self.stage_memory_total.labels(stage).set(device.get("memory_total", 0))

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def usage(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def next_token(self, seconds: float) -> None:
        self.token_latency.observe(seconds)
        self.generation_tokens.inc()

    def stage_times(self, micros: list[int]) -> None:
        for i, us in enumerate(micros):
            self.stage_time.labels(str(i)).observe(us / 1e6)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
