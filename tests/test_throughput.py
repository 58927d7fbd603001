"""Keeping every stage busy: decode steps of several sequences run batched
on each stage, prompt chunks flow through the stages back to back, and
every sequence still gets exactly its one-at-a-time greedy output."""

from __future__ import annotations

import json
import threading
import time

import mlx_dist
import pytest
from cluster_utils import start_workers
from mlx_dist import _core


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("qwen3", num_layers=6)


@pytest.fixture(scope="module")
def local(model_path):
    return mlx_dist.load(str(model_path))


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    procs = start_workers(3, tmp_path_factory.mktemp("workers"))
    yield procs
    for p in procs:
        p.stop()


def greedy(model, tok, prompt, n, **kwargs) -> list[int]:
    return [r.token for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=n, **kwargs)]


def _info(w) -> dict:
    return json.loads(_core.worker_info(w.address))


def test_mixed_workload_equals_one_at_a_time(model_path, local, workers):
    model, tok = mlx_dist.load(
        str(model_path), workers=[w.address for w in workers], strategy="uniform", prefill_chunk=16
    )
    # Different prompt lengths (one over several chunks), lengths and start times.
    jobs = [
        ("short", 40, 0.0),
        ("a somewhat longer prompt about pipelines and batching " * 3, 60, 0.0),
        ("x " * 120, 30, 0.05),
        ("joins late", 50, 0.2),
        ("another one", 20, 0.1),
        ("gets cancelled after a few tokens", 200, 0.0),
    ]
    want = [greedy(local[0], local[1], p, n) for p, n, _ in jobs]
    before = [_info(w)["batches"] for w in workers]
    got: list = [None] * len(jobs)

    def run(i: int) -> None:
        prompt, n, delay = jobs[i]
        time.sleep(delay)
        tokens = []
        for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=n):
            tokens.append(r.token)
            if i == len(jobs) - 1 and len(tokens) == 8:
                break  # the client goes away
        got[i] = tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        expected = w[:8] if i == len(jobs) - 1 else w
        assert g == expected, f"sequence {i} differs"
    # Decode steps really ran batched on every stage, and nothing is left behind.
    after = [_info(w) for w in workers]
    assert all(a["batches"] > b for a, b in zip(after, before, strict=True))
    deadline = time.monotonic() + 10
    while any(_info(w)["sequences"] for w in workers):
        assert time.monotonic() < deadline, "caches not released"
        time.sleep(0.1)


def test_chunked_prefill_equals_unchunked(model_path, local, workers):
    prompt = " ".join(f"word{i}" for i in range(60))
    ids = local[1].encode(prompt)
    assert len(ids) > 50
    want = list(mlx_dist.stream_generate(local[0], local[1], ids, max_tokens=12, logprobs=True))
    for chunk in (7, 16, 4096):
        model, tok = mlx_dist.load(
            str(model_path),
            workers=[w.address for w in workers],
            strategy="uniform",
            prefill_chunk=chunk,
        )
        got = list(mlx_dist.stream_generate(model, tok, ids, max_tokens=12, logprobs=True))
        assert [r.token for r in got] == [r.token for r in want], f"chunk {chunk}"
        diff = float((got[0].logprobs - want[0].logprobs).abs().max())
        assert diff < 1e-4, f"chunk {chunk}: first logprobs differ by {diff}"
