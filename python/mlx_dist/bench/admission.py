"""``mlx-dist bench-admission``: what a long prompt admitted in the middle
of a decoding stream costs that stream. One stream decodes; a second
request with a long prompt arrives; the gaps between the first stream's
tokens while the prompt runs are printed (median and longest), with the
prompt run in chunks of each size given (a chunk as long as the prompt is
how admission worked before prompts were interleaved with decode).

It runs the model as ``mlx-dist serve`` does on one device: in the worker
inside this process, through the server's engine."""

from __future__ import annotations

import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _run(model, tok, prompt: list[int], chunk: int, decode: int) -> tuple[list[float], float]:
    """(the decoding stream's gaps while `prompt` ran, seconds until the
    prompt's first token)."""
    from mlx_dist.engine import Done, Engine, Failed, Job, Step

    try:
        engine = Engine(model, tok, prefill_chunk=chunk)
    except TypeError:
        # An mlx-dist from before chunks were interleaved: it admits a
        # prompt by running all of it (in the load's chunks, back to back).
        engine = Engine(model, tok)
    try:
        times: list[float] = []
        first: list[float] = []
        got_first = threading.Event()

        def stream(event) -> None:
            if isinstance(event, Step):
                times.append(time.perf_counter())

        def admitted(event) -> None:
            if isinstance(event, Step) and not first:
                first.append(time.perf_counter())
                got_first.set()
            elif isinstance(event, (Done, Failed)):
                got_first.set()

        engine.submit(Job([11, 12, 13], {"max_tokens": decode}, stream))
        while len(times) < 20:
            time.sleep(0.001)
        started = time.perf_counter()
        engine.submit(Job(prompt, {"max_tokens": 2}, admitted))
        if not got_first.wait(600) or not first:
            raise RuntimeError("the long prompt got no token")
        gaps = [b - a for a, b in itertools.pairwise(times) if b > started and a < first[0]]
        return gaps, first[0] - started
    finally:
        engine.stop(60)


def main(args) -> int:
    import mlx.core as mx

    import mlx_dist
    from mlx_dist import _core
    from mlx_dist.bench.models import model_path

    chunks = [int(c) for c in args.chunks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(args, Path(tmp))
        address = _core.start_local_worker()
        try:
            # Chunks as long as the longest asked for: the engine's setting
            # alone cuts the prompt (as `serve` loads it).
            model, tok = mlx_dist.load(
                path,
                workers=[address],
                strategy="uniform",
                recover=False,
                kv_tokens=2 * args.prompt_tokens,
                prefill_chunk=max(chunks),
            )
            vocab = model.config["vocab_size"]

            def prompt(seed: int) -> list[int]:
                return [
                    (i * 7919 + seed * 104729) % (vocab - 1) + 1 for i in range(args.prompt_tokens)
                ]

            print(f"device: {mx.default_device()}  model: {path}")
            print(
                f"one stream decodes while a {args.prompt_tokens}-token prompt is admitted; "
                "gaps between its tokens while the prompt runs"
            )
            print(f"{'chunk':>6} {'median ms':>10} {'max ms':>8} {'tokens':>7} {'prompt s':>9}")
            for i, chunk in enumerate(chunks):
                # The first run of each chunk size compiles its kernels.
                _run(model, tok, prompt(1000 + i), chunk, args.decode_tokens)
                gaps, took = _run(model, tok, prompt(2000 + i), chunk, args.decode_tokens)
                print(
                    f"{chunk:>6} {1e3 * statistics.median(gaps):10.1f} {1e3 * max(gaps):8.1f}"
                    f" {len(gaps):7d} {took:9.2f}",
                    flush=True,
                )
        finally:
            _core.stop_local_worker(address)
    return 0
