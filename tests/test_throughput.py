"""Keeping every stage busy: decode steps of several sequences run batched
on each stage, prompt chunks flow through the stages back to back, and
every sequence still gets exactly its one-at-a-time greedy output."""

from __future__ import annotations

import threading
import time

import mlx_dist
import pytest
from cluster_utils import start_workers, together
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
    """The engine's figures of worker `w`."""
    return _core.worker_info(w.address)["engine"]


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


def _together(model, tok, runs) -> list:
    """Runs every `(prompt, kwargs)` at once; each one's responses."""
    return together(
        [
            lambda p=p, kw=kw: list(mlx_dist.stream_generate(model, tok, p, max_tokens=24, **kw))
            for p, kw in runs
        ]
    )


def test_batched_rows_keep_their_own_sampler_logprobs_and_codec(model_path, local, workers):
    """In one batch: greedy rows (their argmax taken for all at once), one
    with log-probabilities, one sampling with a seed, one with a repetition
    penalty; then rows sent int8-compressed. Each equals its run alone."""
    runs = [
        ("greedy one", {}),
        ("greedy two, a little longer", {"logprobs": True}),
        ("sampled", {"sampler": mlx_dist.make_sampler(temp=0.9, top_k=20), "seed": 7}),
        (
            "penalised",
            {"logits_processors": mlx_dist.make_logits_processors(repetition_penalty=1.5)},
        ),
        ("greedy three", {}),
    ]
    alone = [
        list(mlx_dist.stream_generate(local[0], local[1], p, max_tokens=24, **kw)) for p, kw in runs
    ]
    addrs = [w.address for w in workers]
    for compression in ("none", "int8"):
        model, tok = mlx_dist.load(
            str(model_path), workers=addrs, strategy="uniform", compression=compression
        )
        if compression == "int8":
            # Compressed activations change the output a little: the
            # reference is each run alone through the same cluster.
            alone = [
                list(mlx_dist.stream_generate(model, tok, p, max_tokens=24, **kw)) for p, kw in runs
            ]
        before = [_info(w)["batches"] for w in workers]
        got = _together(model, tok, runs)
        for i, (g, w) in enumerate(zip(got, alone, strict=True)):
            assert [r.token for r in g] == [r.token for r in w], f"{compression}: run {i} differs"
        diff = max(
            float((a.logprobs - b.logprobs).abs().max())
            for a, b in zip(got[1], alone[1], strict=True)
        )
        assert diff < 1e-4, f"{compression}: log-probabilities differ by {diff}"
        assert all(_info(w)["batches"] > b for w, b in zip(workers, before, strict=True)), (
            f"{compression}: the steps did not run batched"
        )


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


def test_prefix_cache_hit_equals_a_miss_and_reports_cached_tokens(model_path, local, workers):
    from mlx_dist import _core

    model, tok = mlx_dist.load(
        str(model_path), workers=[w.address for w in workers], strategy="uniform"
    )
    system = "you are a helpful assistant who answers briefly. " * 4
    first = tok.encode(system + "first question")
    second = tok.encode(system + "a second, different question")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > 8

    def run(ids):
        g = _core.Generation(model._core, tok._core, ids, max_tokens=16, logprobs=False)
        tokens = [rec[1] for rec in g]
        return tokens, g.cached_tokens

    miss = run(first)
    assert miss[1] == 0
    assert miss[0] == greedy(local[0], local[1], first, 16)
    hit = run(second)
    # The second prompt reuses what the first left on every stage.
    assert hit[1] == shared
    assert hit[0] == greedy(local[0], local[1], second, 16)
    # The same prompt again: all but its last two tokens come from the cache
    # (the step before the last is answered while the sequence starts, so a
    # stage that evicted the prefix says so then).
    again = run(second)
    assert again[1] == len(second) - 2
    assert again[0] == hit[0]
    assert all(_info(w)["prefix_entries"] >= 1 for w in workers)
    # Penalties look back over the prompt: those sequences compute it all.
    g = _core.Generation(
        model._core, tok._core, second, max_tokens=4, repetition_penalty=1.2, logprobs=False
    )
    list(g)
    assert g.cached_tokens == 0


def test_a_model_on_one_device_starts_prompts_from_kept_prefixes(model_path, monkeypatch):
    model, tok = mlx_dist.load(str(model_path))
    monkeypatch.setenv("MLX_DIST_PREFIX_CACHE_MB", "0")
    plain, _ = mlx_dist.load(str(model_path))
    system = "you are a helpful assistant who answers briefly. " * 4
    first = tok.encode(system + "first question")
    second = tok.encode(system + "a second, different question")
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared > 8

    def run(m, ids, **kw):
        g = _core.Generation(m._core, tok._core, ids, max_tokens=16, logprobs=False, **kw)
        tokens = [rec[1] for rec in g]
        return tokens, g.cached_tokens

    miss = run(model, first)
    assert miss == (run(plain, first)[0], 0)
    assert model._core.prefix_cache_bytes > 0
    hit = run(model, second)
    assert hit == (run(plain, second)[0], shared)
    # The same prompt again: all but its last token come from the cache,
    # and a stream cut short leaves what it computed.
    again = run(model, second)
    assert again == (hit[0], len(second) - 1)
    g = _core.Generation(model._core, tok._core, first + [5, 6, 7], max_tokens=16, logprobs=False)
    next(iter(g))
    del g
    assert run(model, first + [5, 6, 7, 8])[1] >= len(first) + 3
    # Penalties look back over the prompt: those sequences compute it all.
    assert run(model, second, repetition_penalty=1.2)[1] == 0
    # Turned off, nothing is kept.
    assert run(plain, second)[1] == 0
    assert plain._core.prefix_cache_bytes == 0
