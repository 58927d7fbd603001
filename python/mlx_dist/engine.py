"""The engine: the one place where a server runs the model.

HTTP handlers never call the model. They put a :class:`Job` on a bounded
queue; one engine thread admits jobs, steps every active generation in
turn (so all streams progress together and, over a cluster, one sequence's
step runs on a stage while another's runs on the next) and hands each step
back through the job's ``sink``. A cancelled job is dropped at its next
turn, which releases its KV cache on every stage."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlx_dist import _core


class QueueFull(Exception):
    """The queue is at its bound: the caller should retry later."""


class EngineStopped(Exception):
    """The engine has shut down."""


class CapacityExceeded(_core.CapacityError):
    """A sequence's KV cache does not fit even with no other sequence
    running: waiting cannot help. The message has the worker's numbers."""


@dataclass
class Step:
    """One generated token. ``text`` is the new text (possibly empty while
    a stop string or a multi-byte character is pending)."""

    text: str
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # Prompt positions taken from the prefix cache instead of computed.
    cached_tokens: int = 0


@dataclass
class Failed:
    error: BaseException


Event = Step | Done | Failed


@dataclass
class Job:
    """A request for the engine. ``options`` are keyword arguments of
    ``_core.Generation`` (max_tokens, sampling, stop ...); ``sink`` receives
    the events on the engine thread and must not block."""

    prompt: list[int]
    options: dict[str, Any]
    sink: Callable[[Event], None]
    logprobs: bool = False
    top_logprobs: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Running:
    job: Job
    gen: Any
    last: float
    tokens: int = 0
    cached: int = 0
    # Its prompt still runs, a chunk per turn.
    prefilling: bool = False


class Engine:
    """Runs jobs for ``model`` (a local ``Model`` or a ``DistributedModel``).

    At most ``max_active`` sequences generate at once; at most ``max_queue``
    more wait, beyond which :meth:`submit` raises :class:`QueueFull`.

    A job whose KV cache does not fit beside the running sequences (a
    worker answers ``_core.KvBudgetFull``, and only that) waits at the head of the queue, and
    nothing is admitted past it, until sequences end; when it does not fit
    with none running either, it fails with :class:`CapacityExceeded`, and
    so does at once any later job at least as long.

    A prompt runs a chunk of at most ``prefill_chunk`` tokens per turn, so
    that the running sequences wait one chunk per turn at most, not the
    whole prompt; a job's first chunk runs when it is admitted (that is
    where a stage takes it in or finds no room for it)."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_active: int = 8,
        max_queue: int = 64,
        metrics=None,
        prefill_chunk: int = 256,
    ):
        if max_active < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(
                "max_active and prefill_chunk must be at least 1, and max_queue at least 0"
            )
        self.prefill_chunk = prefill_chunk
        self._model = model._core
        self._tokenizer = tokenizer._core
        self._stages = isinstance(model._core, _core.Cluster)
        self.max_active = max_active
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: collections.deque[Job] = collections.deque()
        # Jobs taken off the queue whose generation is being made: with
        # pending and active, what the queue bound counts (under _cond).
        self._starting = 0
        self._active: list[_Running] = []
        # The shortest length (prompt + max_tokens) that did not fit with no
        # other sequence running, and the worker's answer then; per plan.
        self._too_long: tuple[int, int, str] | None = None
        # Lowered when a worker runs out of KV memory, until a sequence ends
        # or the job waiting for room (_waiting) is cancelled.
        self._limit = max_active
        self._waiting: Job | None = None
        self._cond = threading.Condition()
        self._stopped = False
        # Figures for monitoring: seconds spent running the model, token
        # positions run (prompt and generated), steps, and since when.
        self.busy_seconds = 0.0
        self.tokens_processed = 0
        self.steps = 0
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="mlx-dist-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopped:
                raise EngineStopped("the engine has stopped")
            # Counted together under the lock, so that a burst cannot pass
            # between a job leaving the queue and its sequence starting.
            held = len(self._pending) + self._starting + len(self._active)
            if held >= self.max_active + self.max_queue:
                raise QueueFull(
                    f"{held} requests are running or waiting (the limit is "
                    f"{self.max_active} running + {self.max_queue} waiting)"
                )
            self._pending.append(job)
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops taking jobs, ends the ones queued or running with an error,
        and waits for the engine thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopped:
                    break
                if self._waiting is not None and self._waiting.cancelled.is_set():
                    self._waiting = None
                    self._limit = self.max_active
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                admit = []
                while self._pending and len(self._active) + len(admit) < self._limit:
                    admit.append(self._pending.popleft())
                self._starting = len(admit)
            began = time.perf_counter()
            for i, job in enumerate(admit):
                if not self._start(job):
                    # It waits for room at the head of the queue: nothing
                    # taken after it may start before it.
                    with self._cond:
                        self._pending.extendleft(reversed(admit[i:]))
                        self._starting = 0
                    break
                with self._cond:
                    self._starting -= 1
            for run in list(self._active):
                self._step(run)
            self.busy_seconds += time.perf_counter() - began
        stopped = EngineStopped("the server is shutting down")
        for run in self._active:
            run.job.sink(Failed(stopped))
        self._active.clear()
        with self._cond:
            while self._pending:
                self._pending.popleft().sink(Failed(stopped))

    def _start(self, job: Job) -> bool:
        """Starts ``job``'s sequence, or fails it; False when it must wait
        for running sequences to end (the caller puts it back in front)."""
        if self._waiting is job:
            self._waiting = None
        if job.cancelled.is_set():
            return True
        length = len(job.prompt) + int(job.options.get("max_tokens", 256))
        epoch = self._model.epoch if self._stages else 0
        known = self._too_long
        if known is not None and known[0] == epoch and length >= known[1]:
            self._fail(job, CapacityExceeded(known[2]))
            return True
        options = dict(job.options)
        options["prefill_step_size"] = min(
            int(options.get("prefill_step_size") or self.prefill_chunk), self.prefill_chunk
        )
        try:
            gen = _core.Generation(
                self._model,
                self._tokenizer,
                job.prompt,
                logprobs=job.logprobs,
                defer_prefill=True,
                **options,
            )
            # The first chunk: the stages take the sequence in, or say why not.
            done = gen.prefill_step()
        except _core.KvBudgetExceeded as e:
            # More than a stage's whole budget: waiting cannot help.
            self._fail(job, CapacityExceeded(str(e)))
            return True
        except _core.KvBudgetFull as e:
            if self._active:
                # A worker's KV budget is full: wait for a running sequence to end.
                self._limit = len(self._active)
                self._waiting = job
                return False
            # Nothing else holds memory: it can never fit (until a re-plan).
            if known is None or known[0] != epoch or length < known[1]:
                self._too_long = (epoch, length, str(e))
            self._fail(job, CapacityExceeded(str(e)))
            return True
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            self._fail(job, e)
            return True
        run = _Running(job, gen, last=time.perf_counter(), prefilling=not done)
        if done:
            self._prefilled(run)
        with self._cond:
            self._active.append(run)
        return True

    def _prefilled(self, run: _Running) -> None:
        run.prefilling = False
        run.cached = run.gen.cached_tokens
        self.tokens_processed += len(run.job.prompt) - run.cached

    def _step(self, run: _Running) -> None:
        job = run.job
        if job.cancelled.is_set():
            self._end(run)
            return
        if run.prefilling:
            try:
                if run.gen.prefill_step():
                    self._prefilled(run)
            except Exception as e:  # noqa: BLE001 - every failure goes back to its request
                self._end(run)
                self._fail(job, e)
            return
        try:
            rec = next(run.gen)
        except StopIteration:
            rec = None
        except Exception as e:  # noqa: BLE001 - every failure goes back to its request
            self._end(run)
            self._fail(job, e)
            return
        if rec is None:
            self._end(run)
            job.sink(Done("stop", len(job.prompt), run.tokens, run.cached))
            return
        token, logprobs, generated, finish = (
            rec.token,
            rec.logprobs,
            rec.generation_tokens,
            rec.finish_reason,
        )
        text, prompt_tokens = rec.text, rec.prompt_tokens
        now = time.perf_counter()
        if self.metrics is not None:
            if run.tokens == 0:
                self.metrics.first_token(now - job.submitted)
            else:
                self.metrics.next_token(now - run.last)
            if self._stages:
                self.metrics.stage_times(self._model.last_stage_micros)
        run.last = now
        run.tokens = generated
        self.tokens_processed += 1
        self.steps += 1
        step = Step(text, token)
        if job.logprobs and logprobs is not None:
            step.logprob, step.top_logprobs = _pick_logprobs(logprobs, token, job.top_logprobs)
        job.sink(step)
        if finish is not None:
            self._end(run)
            job.sink(Done(finish, prompt_tokens, generated, run.cached))

    def _end(self, run: _Running) -> None:
        self._active.remove(run)
        # Dropping the generation frees its caches (on every stage of a cluster).
        run.gen = None
        self._limit = self.max_active

    def _fail(self, job: Job, error: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.error(type(error).__name__)
        job.sink(Failed(error))


def _pick_logprobs(logprobs, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    data, shape, dtype = logprobs.raw()
    if dtype == "bfloat16":
        raw = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
        row = raw.view(np.float32)
    else:
        row = np.frombuffer(data, dtype=np.dtype(dtype)).astype(np.float32)
    row = row.reshape(-1, shape[-1])[-1]
    chosen = float(row[token])
    if top <= 0:
        return chosen, []
    top = min(top, row.size)
    idx = np.argpartition(-row, top - 1)[:top]
    idx = idx[np.argsort(-row[idx], kind="stable")]
    return chosen, [(int(i), float(row[i])) for i in idx]
