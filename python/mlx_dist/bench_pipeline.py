"""``mlx-dist bench-pipeline``: decode speed of one device and of 2- and
3-worker pipelines on loopback, measured in one run: tokens/s, the ratio to
single device, time per hop and bytes sent per token per hop."""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _start_worker(name: str, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_dist.cli", "worker", "--port", "0", "--name", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith("listening on "):
                return proc, line.split()[-1]
            if not line:
                break
    proc.kill()
    raise RuntimeError(f"worker {name} did not start")


def _decode(model, tok, ids, gen, repeats):
    import mlx_dist

    runs = []
    for _ in range(repeats):
        last = None
        for last in mlx_dist.stream_generate(model, tok, ids, max_tokens=gen):
            pass
        runs.append((last.generation_tps, last.generation_tokens))
    return statistics.median(r[0] for r in runs), min(r[1] for r in runs)


def main(args) -> int:
    import mlx.core as mx

    import mlx_dist
    from mlx_dist import _core
    from mlx_dist.bench import make_random_model

    env = dict(os.environ)
    # Workers of one host share its accelerator; each gets the same device.
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_shape:
            print(f"making a random {args.random_shape} model ...", flush=True)
            path = str(make_random_model(args.random_shape, args.bits, Path(tmp) / "m", args.dtype))
        else:
            path = args.model or str(__import__("mlx_dist.demo").demo.demo_model_path())
        stages = [int(s) for s in args.stages.split(",")]
        procs = []
        try:
            for i in range(max(stages)):
                procs.append(_start_worker(f"bench{i}", env))
            addrs = [a for _, a in procs]
            local, tok = mlx_dist.load(path)
            hidden = local.config.get("hidden_size") or local.config.get("n_embd")
            vocab = local.config["vocab_size"]
            ids = [(i * 7919) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]
            _decode(local, tok, ids[:8], 4, 1)
            base, n = _decode(local, tok, ids, args.gen_tokens, args.repeats)
            print(f"device: {mx.default_device()}  model: {path}")
            print(
                f"prompt {args.prompt_tokens} tokens, decode {n} tokens, median of {args.repeats}"
            )
            print(
                f"{'setup':>14} {'tok/s':>9} {'ratio':>7} {'ms/token':>9} {'ms/hop':>8} {'bytes/hop/token':>16}"
            )
            print(f"{'1 device':>14} {base:9.1f} {1.0:7.3f} {1000 / base:9.2f} {'-':>8} {'-':>16}")
            for k in stages:
                model, dtok = mlx_dist.load(path, workers=addrs[:k], strategy="uniform")
                _decode(model, dtok, ids[:8], 4, 1)
                before = [json.loads(_core.worker_info(a)) for a in addrs[:k]]
                tps, n = _decode(model, dtok, ids, args.gen_tokens, args.repeats)
                after = [json.loads(_core.worker_info(a)) for a in addrs[:k]]
                sent = sum(
                    a["forward_bytes_sent"] - b["forward_bytes_sent"] for a, b in zip(after, before)
                )
                msgs = sum(
                    a["forward_messages_sent"] - b["forward_messages_sent"]
                    for a, b in zip(after, before)
                )
                # Decode messages only: prefill chunks are few and large; take the
                # smallest per-message size as the per-token hop size.
                per_hop = sent / msgs if msgs else 0.0
                # Time per hop: the step's wall time beyond the stages' compute,
                # over the 2k network traversals (down and back up the chain).
                step_ms = 1000 / tps
                compute_ms = sum(model.last_stage_micros) / 1000
                hop_ms = max(step_ms - compute_ms, 0.0) / (2 * k)
                print(
                    f"{k:>5} workers   {tps:9.1f} {tps / base:7.3f} {step_ms:9.2f} {hop_ms:8.3f} "
                    f"{per_hop:16.0f}"
                )
            if hidden:
                print(f"(hidden size {hidden}: hidden x 2 + 64 = {hidden * 2 + 64} bytes)")
        finally:
            for p, _ in procs:
                p.terminate()
            for p, _ in procs:
                p.wait(10)
    return 0
