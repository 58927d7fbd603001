"""``mlx-dist bench-throughput``: aggregate decode tokens/s of 1, 4, 8 and 16
concurrent streams over 1, 2 and 4 pipeline stages, each as a ratio to one
device running one stream, and the time to first token of a long prompt
pipelined vs on one device, all in one run.

With ``--gpus N``, worker i runs on GPU ``i % N`` (``CUDA_VISIBLE_DEVICES``),
one worker per GPU; otherwise the workers share this host's device."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlx_dist.bench import processes
from mlx_dist.bench.models import model_path


def _together(run, items) -> tuple[float, int]:
    """Runs `run(item)` for every item at once, each returning its stream's
    (first token time, last token time, tokens). Aggregate decode tokens/s
    (tokens after each stream's first, from the first first token to the
    last token) and the fewest tokens a stream got."""
    results = [None] * len(items)

    def one(i):
        results[i] = run(items[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None or r[0] is None for r in results):
        return 0.0, 0
    span = max(r[1] for r in results) - min(r[0] for r in results)
    decoded = sum(r[2] - 1 for r in results)
    return decoded / span if span > 0 else 0.0, min(r[2] for r in results)


def _streams(model, tok, prompts, gen) -> tuple[float, int]:
    """Aggregate decode tokens/s of one stream per prompt, run together
    (see `_together`), and the fewest tokens a stream got."""
    import mlx_dist

    def run(p):
        first = last = None
        n = 0
        for _ in mlx_dist.stream_generate(model, tok, p, max_tokens=gen):
            last = time.perf_counter()
            first = first or last
            n += 1
        return first, last, n

    return _together(run, prompts)


def _mlx_lm_batched(path: str, prompts, gen) -> float | None:
    """mlx-lm's continuous batching (``BatchGenerator``, what ``mlx_lm.server``
    batches with) on this device, measured as `_streams` measures: aggregate
    decode tokens/s of one stream per prompt. None without mlx-lm, or for a
    model it cannot read (GGUF)."""
    if not (Path(path) / "config.json").is_file():
        return None
    try:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.utils import load_model
    except ImportError:
        return None
    model, _ = load_model(Path(path))
    rates = []
    for _ in range(2):  # the first run compiles this batch size's kernels
        gen_ = BatchGenerator(model, max_tokens=gen, completion_batch_size=max(32, len(prompts)))
        gen_.insert(prompts, [gen] * len(prompts))
        firsts, lasts, counts = {}, {}, {}
        while responses := gen_.next_generated():
            now = time.perf_counter()
            for r in responses:
                firsts.setdefault(r.uid, now)
                lasts[r.uid] = now
                counts[r.uid] = counts.get(r.uid, 0) + 1
        gen_.close()
        span = max(lasts.values()) - min(firsts.values())
        rates.append(sum(c - 1 for c in counts.values()) / span if span > 0 else 0.0)
    return rates[-1]


def _start_server(cmd: list[str], port: int, what: str, log) -> processes.Process:
    """Starts an OpenAI-compatible server, its errors going to the binary
    file `log`, and waits until ``/health`` answers 200 (the model loaded).
    One that exits or never answers raises an error ending with the last
    lines it wrote."""
    proc = processes.Process(cmd, name=what, log=log, wait_listening=False)
    if proc.wait_healthy(f"127.0.0.1:{port}", timeout=600):
        return proc
    proc.stop()
    said = proc.tail(10) or "(it wrote nothing)"
    raise RuntimeError(f"{what} did not start: {' '.join(cmd)}\n{said}")


def _http_streams(port: int, texts, gen) -> float:
    """`_streams` through an OpenAI-compatible server: one streamed
    completion per prompt, all at once, greedy; aggregate tokens/s after each
    stream's first, from the first first chunk to the last chunk."""
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/v1/models")
    try:
        name = json.loads(conn.getresponse().read())["data"][0]["id"]
    except (ValueError, KeyError, IndexError):
        # mlx_lm.server lists the Hugging Face cache; it serves its own model
        # under this name.
        name = "default_model"

    def run(text):
        body = {
            "model": name,
            "prompt": text,
            "max_tokens": gen,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = c.getresponse()
        first = last = None
        n = 0
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if any(ch.get("text") for ch in chunk.get("choices") or []):
                last = time.perf_counter()
                first = first or last
        return first, last, n

    return _together(run, texts)[0]


def _servers(args, path, addrs, text, stream_counts, base) -> None:
    """The same streamed load through ``mlx-dist serve`` (one device, and
    over the workers) and through ``mlx_lm.server`` on one device.
    `text(seed)` makes a prompt; every run gets fresh ones (both servers
    keep the prefixes of earlier prompts)."""
    most = max(stream_counts)
    # One device (batched in the server's own worker, then each sequence
    # stepped in turn), then over one worker process and over all of them.
    setups = [
        ("mlx-dist serve, 1 device", []),
        ("mlx-dist serve --no-batch", ["--no-batch"]),
    ]
    for k in sorted({1, len(addrs)}):
        setups.append(
            (
                f"mlx-dist serve, {k} worker{'s' * (k > 1)}",
                ["--workers", ",".join(addrs[:k]), "--strategy", args.strategy],
            )
        )
    setups.append(("mlx_lm.server, 1 device", None))
    for what, extra in setups:
        port = processes.free_port()
        if extra is None:
            cmd = [sys.executable, "-m", "mlx_lm.server", "--model", path, "--port", str(port)]
            cmd += ["--decode-concurrency", str(max(most, 32)), "--log-level", "WARNING"]
        else:
            cmd = [sys.executable, "-m", "mlx_dist.cli", "serve", "--model", path]
            cmd += ["--port", str(port), "--max-concurrency", str(most), "--log-level", "warning"]
            cmd += extra
        with tempfile.TemporaryFile() as log:
            proc = _start_server(cmd, port, what, log)
            try:
                figures = []
                for n in stream_counts:
                    _http_streams(port, [text(10_000 + i) for i in range(n)], args.gen_tokens)
                    tps = _http_streams(
                        port, [text(20_000 + 100 * n + i) for i in range(n)], args.gen_tokens
                    )
                    figures.append(f"{n}: {tps:.1f} ({tps / base:.2f}x)")
                print(f"{what:<28} " + "  ".join(figures), flush=True)
            finally:
                proc.stop(30)


def _stage_batches(addrs) -> str:
    """Per stage since the last call, from the workers' counters: mean
    decode batch size, the time it was busy and its mean time per run
    (a batch or a step alone), as `batch busy% ms`."""

    from mlx_dist import _core

    parts = []
    for a in addrs:
        i = _core.worker_info(a)
        e = i["engine"]
        prev = _stage_batches.seen.get(a, (0, 0, 0, 0, 0))
        now = (e["steps"], e["batches"], e["batched_steps"], e["busy_micros"], i["uptime_micros"])
        steps, batches, batched, busy, up = (n - p for n, p in zip(now, prev, strict=True))
        _stage_batches.seen[a] = now
        # Steps run alone are batches of one.
        runs = batches + steps - batched
        if runs and up:
            parts.append(f"{steps / runs:.1f} {100 * busy / up:.0f}% {busy / runs / 1000:.2f}ms")
        else:
            parts.append("-")
    return " / ".join(parts)


_stage_batches.seen = {}


def _ttft(model, tok, prompts) -> float:
    """Median time to the first token; distinct prompts, so that no run
    starts from the prefix cache another left."""
    import mlx_dist

    times = []
    for ids in prompts:
        t0 = time.perf_counter()
        for _ in mlx_dist.stream_generate(model, tok, ids, max_tokens=1):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _print_ttft(args, local, tok, models: dict, stage_counts: list[int], prompt) -> None:
    """Time to the first token of an ``args.ttft_tokens``-token prompt, one
    device against each stage count."""
    warm = [prompt(900, args.ttft_tokens)]
    longs = [prompt(1000 + r, args.ttft_tokens) for r in range(args.repeats)]
    _ttft(local, tok, warm)
    one = _ttft(local, tok, longs)
    print(f"time to first token, {args.ttft_tokens}-token prompt: 1 device {one:.3f} s")
    for k in stage_counts:
        if k == 1:
            continue
        model, dtok = models[k]
        _ttft(model, dtok, [prompt(901 + k, args.ttft_tokens)])
        t = _ttft(
            model,
            dtok,
            [prompt(2000 + 10 * k + r, args.ttft_tokens) for r in range(args.repeats)],
        )
        print(f"  {k} stages (pipelined chunks): {t:.3f} s ({t / one:.2f}x)")


def main(args) -> int:
    import mlx.core as mx

    import mlx_dist

    stage_counts = [int(s) for s in args.stages.split(",")]
    stream_counts = [int(s) for s in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(args, Path(tmp))
        procs = []
        try:
            for i in range(max(stage_counts)):
                env = dict(os.environ, MLX_DIST_LOG="warn", MLX_DIST_CACHE=tmp)
                if args.gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(i % args.gpus)
                procs.append(processes.worker(f"w{i}", env=env))
            addrs = [p.address for p in procs]
            local, tok = mlx_dist.load(path)
            vocab = local.config["vocab_size"]

            def prompt(seed: int, n: int) -> list[int]:
                return [(i * 7919 + seed * 104729) % (vocab - 1) + 1 for i in range(n)]

            prompts = [prompt(s, args.prompt_tokens) for s in range(max(stream_counts))]
            # Each shape's first run pays for compiling its kernels (seconds on
            # CUDA): every measured run follows an unmeasured one like it.
            _streams(local, tok, prompts[:1], 8)
            base, _ = _streams(local, tok, prompts[:1], args.gen_tokens)
            print(f"device: {mx.default_device()}  gpus: {args.gpus or 'shared'}  model: {path}")
            print(
                f"decode {args.gen_tokens} tokens per stream after a {args.prompt_tokens}-token "
                f"prompt; one device, one stream: {base:.1f} tok/s"
            )
            print(
                f"{'stages':>7} {'streams':>8} {'tok/s':>9} {'x 1-stream':>11} {'per stage':>10}"
                f"  per stage: batch, busy, ms per run"
            )
            models = {}
            runs = [(k, ring) for k in stage_counts for ring in (True, False)[: 1 + args.chain]]
            for k, ring in runs:
                model, dtok = mlx_dist.load(
                    path,
                    workers=addrs[:k],
                    strategy=args.strategy,
                    prefill_chunk=args.prefill_chunk,
                    ring=ring,
                )
                layers = [
                    s["layers"]["end"] - s["layers"]["start"] for s in model.plan_dict["stages"]
                ]
                how = "decode round the ring" if ring else "decode steps sent by the coordinator"
                print(f"{k} stages ({args.strategy}): layers {'+'.join(map(str, layers))}, {how}")
                if ring:
                    models[k] = (model, dtok)
                for n in stream_counts:
                    _streams(model, dtok, prompts[:n], args.gen_tokens)
                    _stage_batches(addrs[:k])
                    tps, _ = _streams(model, dtok, prompts[:n], args.gen_tokens)
                    print(
                        f"{k:>7} {n:>8} {tps:9.1f} {tps / base:11.2f} {tps / base / k:10.2f}"
                        f"  {_stage_batches(addrs[:k])}",
                        flush=True,
                    )
            if args.reference:
                for n in stream_counts:
                    tps = _mlx_lm_batched(path, prompts[:n], args.gen_tokens)
                    if tps is None:
                        print(
                            "no mlx-lm reference: mlx-lm is not installed or cannot read this model"
                        )
                        break
                    print(
                        f"mlx-lm BatchGenerator, 1 device, {n:>2} streams: {tps:9.1f} tok/s "
                        f"({tps / base:.2f}x)",
                        flush=True,
                    )
            if args.servers:
                print("through HTTP, streams: aggregate decode tok/s (x one device, one stream)")
                _servers(
                    args,
                    path,
                    addrs[: max(stage_counts)],
                    lambda seed: tok.decode(prompt(seed, args.prompt_tokens)),
                    stream_counts,
                    base,
                )
            if args.ttft_tokens > 0:
                _print_ttft(args, local, tok, models, stage_counts, prompt)
            else:
                print("time to first token: not measured (--ttft-tokens 0)")
        finally:
            processes.stop_all(procs)
    return 0
