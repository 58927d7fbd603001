"""The server's engine scheduling, with a stand-in for the model whose KV
memory budget is a number of tokens: the queue bound under a burst, and a
request whose KV cache never fits."""

from __future__ import annotations

import threading
import time
from collections import namedtuple
from types import SimpleNamespace

import pytest
from mlx_dist import _core
from mlx_dist import engine as engine_mod
from mlx_dist.engine import CapacityExceeded, Done, Engine, Failed, Job, QueueFull, Step

# What `_core.Generation` yields: named fields, also a tuple.
Record = namedtuple(
    "Record",
    "text token logprobs prompt_tokens prompt_tps generation_tokens generation_tps "
    "peak_memory finish_reason",
)


class FakeGeneration:
    """A sequence holding prompt + max_tokens tokens of a shared budget,
    as a worker reserves them; a step takes `step_s`."""

    budget = 100
    held = 0
    step_s = 0.002
    lock = threading.Lock()

    def __init__(self, model, tokenizer, prompt, *, logprobs, max_tokens, **_):
        need = len(prompt) + max_tokens
        with FakeGeneration.lock:
            if FakeGeneration.held + need > FakeGeneration.budget:
                raise engine_mod._core.KvBudgetFull(
                    f"worker w: sequence needs {need} tokens of KV cache "
                    f"({FakeGeneration.held + need} held in all with it), "
                    f"but the budget is {FakeGeneration.budget}"
                )
            FakeGeneration.held += need
        self.need = need
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.n = 0
        self.cached_tokens = 0

    def __iter__(self):
        return self

    def prefill_step(self) -> bool:
        return True

    def __next__(self):
        time.sleep(self.step_s)
        self.n += 1
        finish = "length" if self.n == self.max_tokens else None
        return Record("x", 7, None, len(self.prompt), 0.0, self.n, 0.0, 0.0, finish)

    def __del__(self):
        with FakeGeneration.lock:
            FakeGeneration.held -= getattr(self, "need", 0)  # 0: refused


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(engine_mod._core, "Generation", FakeGeneration)
    FakeGeneration.held = 0
    model = SimpleNamespace(_core=object())
    tokenizer = SimpleNamespace(_core=object())
    made = []

    def make(**kwargs) -> Engine:
        e = Engine(model, tokenizer, **kwargs)
        made.append(e)
        return e

    yield make
    for e in made:
        e.stop(10)


class Recorder:
    """Jobs' events in the order they came, across jobs."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def job(self, name: str, prompt_len: int, max_tokens: int) -> Job:
        self.done[name] = threading.Event()

        def sink(event) -> None:
            with self.lock:
                self.log.append((name, event))
            if isinstance(event, (Done, Failed)):
                self.done[name].set()

        return Job([1] * prompt_len, {"max_tokens": max_tokens}, sink)

    def first(self, name: str) -> int:
        return next(i for i, (n, _) in enumerate(self.log) if n == name)

    def end(self, name: str):
        assert self.done[name].wait(30), f"{name} never ended"
        return next(e for n, e in self.log if n == name and isinstance(e, (Done, Failed)))


def test_a_request_that_never_fits_fails_without_being_passed(fake):
    """Two sequences run; a third needs more than the whole budget. It
    waits at the head of the queue (nothing behind it starts first), then
    fails with the worker's numbers once it does not fit alone either, and
    a later one as long fails at once."""
    engine = fake(max_active=8, max_queue=64)
    rec = Recorder()
    engine.submit(rec.job("a", 10, 20))
    engine.submit(rec.job("b", 10, 40))
    while FakeGeneration.held < 80:
        time.sleep(0.001)
    engine.submit(rec.job("big", 10, 200))
    for i in range(4):
        engine.submit(rec.job(f"small{i}", 5, 10))
    err = rec.end("big")
    assert isinstance(err, Failed) and isinstance(err.error, CapacityExceeded)
    assert "needs 210 tokens" in str(err.error) and "budget is 100" in str(err.error)
    for i in range(4):
        assert isinstance(rec.end(f"small{i}"), Done)
        assert rec.first(f"small{i}") > rec.first("big"), rec.log
    # Known now: as long a request fails at once, while others run.
    engine.submit(rec.job("long", 1, 90))
    engine.submit(rec.job("big2", 0, 210))
    err = rec.end("big2")
    assert isinstance(err, Failed) and isinstance(err.error, CapacityExceeded)
    assert not rec.done["long"].is_set()
    assert isinstance(rec.end("long"), Done)


def test_a_request_that_fits_once_others_end_waits_for_them(fake):
    engine = fake(max_active=8, max_queue=64)
    rec = Recorder()
    engine.submit(rec.job("a", 10, 50))
    while FakeGeneration.held < 60:
        time.sleep(0.001)
    engine.submit(rec.job("wide", 10, 60))
    engine.submit(rec.job("after", 1, 1))
    assert isinstance(rec.end("wide"), Done)
    assert isinstance(rec.end("after"), Done)
    assert rec.first("wide") > max(i for i, (n, e) in enumerate(rec.log) if n == "a")
    assert rec.first("after") > rec.first("wide")


def test_only_a_full_kv_budget_waits_for_room(fake, monkeypatch):
    """A job refused as KvBudgetFull waits for running ones; any other
    memory error (a real out-of-memory, what never fits) fails it at once,
    as its own class, while the others run on."""
    engine = fake(max_active=8, max_queue=64)
    rec = Recorder()
    engine.submit(rec.job("a", 10, 50))
    while FakeGeneration.held < 60:
        time.sleep(0.001)
    for name, error in [
        ("oom", MemoryError("out of memory")),
        ("never", _core.CapacityError("the activations are over the message limit")),
    ]:

        def refuse(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(engine_mod._core, "Generation", refuse)
        engine.submit(rec.job(name, 1, 1))
        # Waiting for room would have ended it as CapacityExceeded instead.
        failed = rec.end(name)
        assert isinstance(failed, Failed) and failed.error is error, failed
    monkeypatch.setattr(engine_mod._core, "Generation", FakeGeneration)
    assert isinstance(rec.end("a"), Done)


def test_a_burst_is_counted_whole_against_the_queue_bound(fake):
    """max_active 1 + max_queue 2: of 10 submitted at once, 3 are taken,
    however the engine thread interleaves with the submitters."""
    FakeGeneration.budget = 10**9
    try:
        engine = fake(max_active=1, max_queue=2)
        rec = Recorder()
        start = threading.Barrier(10)
        taken, refused = [], []

        def submit(i: int) -> None:
            job = rec.job(f"j{i}", 1, 50)
            start.wait()
            try:
                engine.submit(job)
                taken.append(i)
            except QueueFull:
                refused.append(i)

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(taken) == 3 and len(refused) == 7
        for i in taken:
            assert isinstance(rec.end(f"j{i}"), Done)
        assert [n for n, e in rec.log if isinstance(e, Step)].count(f"j{taken[0]}") == 50
    finally:
        FakeGeneration.budget = 100


def test_failures_map_to_statuses_with_their_numbers():
    from mlx_dist.server.errors import engine_error as _engine_error

    never = _engine_error(CapacityExceeded("needs 210 tokens, but the budget is 100"))
    assert never.status == 413 and "budget is 100" in never.message
    assert never.headers is None  # retrying cannot help
    later = _engine_error(MemoryError("it holds 256 sequences"))
    assert later.status == 503 and later.headers == {"Retry-After": "5"}
    # The in-process worker's loopback port is a detail.
    hidden = _engine_error(
        ConnectionError("worker local (127.0.0.1:38795): stage 0 failed"), "127.0.0.1:38795"
    )
    assert hidden.message == "worker local: stage 0 failed"
