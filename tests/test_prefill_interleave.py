"""A long prompt admitted while another stream decodes runs in chunks between
that stream's steps: the stream waits one chunk at a time, never the whole
prompt. On one device (the worker inside the serving process) and over two
worker processes.

Every figure is measured in the same run and compared with another one of
that run (the whole prompt's prefill time), never with a fixed time."""

from __future__ import annotations

import itertools
import threading
import time

import mlx_dist
import pytest
from cluster_utils import start_workers
from mlx_dist import _core
from mlx_dist.engine import Done, Engine, Failed, Job, Step

PROMPT = 1024
CHUNK = 64


@pytest.fixture(scope="module")
def deep_model(tiny_model):
    # Enough layers that a 1024-token prompt takes far longer than one step.
    return tiny_model("llama", num_layers=8)


def prompt(seed: int) -> list[int]:
    # Distinct starts: no prompt finds another's prefix kept.
    return [3 + seed % 40] + [5 + (i * 7 + seed) % 50 for i in range(PROMPT - 1)]


def whole_prefill_seconds(model, tok, ids) -> float:
    """Time to the first token with the prompt run in one chunk."""
    started = time.perf_counter()
    g = _core.Generation(
        model._core, tok._core, ids, max_tokens=1, prefill_step_size=PROMPT, logprobs=False
    )
    next(g)
    return time.perf_counter() - started


def gaps_during_admission(model, tok, ids, chunk: int) -> tuple[float, float]:
    """(longest gap between the tokens of a decoding stream while `ids` is
    admitted, seconds until `ids` got its first token)."""
    engine = Engine(model, tok, prefill_chunk=chunk)
    try:
        times: list[float] = []
        a_done, b_first = threading.Event(), threading.Event()
        b_at: list[float] = []

        def stream_a(event) -> None:
            if isinstance(event, Step):
                times.append(time.perf_counter())
            elif isinstance(event, (Done, Failed)):
                a_done.set()

        def stream_b(event) -> None:
            if isinstance(event, Step) and not b_at:
                b_at.append(time.perf_counter())
                b_first.set()
            elif isinstance(event, Failed):
                b_first.set()

        engine.submit(Job([5, 6, 7], {"max_tokens": 2000}, stream_a))
        deadline = time.monotonic() + 60
        while len(times) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(times) >= 10, "the decoding stream did not start"
        admitted = time.perf_counter()
        engine.submit(Job(ids, {"max_tokens": 4}, stream_b))
        assert b_first.wait(120) and b_at, "the long prompt got no token"
        first = b_at[0]
        during = [b - a for a, b in itertools.pairwise(times) if b > admitted and a < first]
        assert during, "the decoding stream made no token while the prompt ran"
        return max(during), first - admitted
    finally:
        engine.stop(30)


def check_interleaved(model, tok) -> None:
    whole = whole_prefill_seconds(model, tok, prompt(1))
    gap, took = gaps_during_admission(model, tok, prompt(2), CHUNK)
    print(f"whole prompt {whole:.3f} s, longest gap {gap:.3f} s, first token after {took:.3f} s")
    # One chunk (of 16) and a step at a time, not the whole prompt.
    assert gap < whole / 3, (gap, whole)
    assert took < whole * 3, (took, whole)
    # The same engine running the prompt in one chunk stalls the stream for it.
    gap_whole, _ = gaps_during_admission(model, tok, prompt(3), PROMPT)
    assert gap_whole > whole / 2, (gap_whole, whole)


def test_a_long_prompt_does_not_freeze_a_stream_on_one_device(deep_model):
    address = _core.start_local_worker()
    try:
        model, tok = mlx_dist.load(
            str(deep_model), workers=[address], strategy="uniform", recover=False
        )
        check_interleaved(model, tok)
    finally:
        _core.stop_local_worker(address)


def test_a_long_prompt_does_not_freeze_a_stream_over_workers(deep_model, tmp_path):
    workers = start_workers(2, tmp_path)
    try:
        model, tok = mlx_dist.load(
            str(deep_model), workers=[w.address for w in workers], strategy="uniform"
        )
        check_interleaved(model, tok)
    finally:
        for w in workers:
            w.stop()


def test_a_long_prompt_does_not_freeze_a_stream_of_a_local_model(deep_model):
    # The model in this process, without a worker (`serve --no-batch`).
    model, tok = mlx_dist.load(str(deep_model))
    check_interleaved(model, tok)
