"""``mlx-dist bench-recovery``: what a dead worker costs. Splits a model
over N workers on loopback, generates greedily, ``kill -9``s one worker
mid-stream and prints the time from the kill to the first token after
recovery, the tokens lost (compared with a run without failure) and the
memory of the surviving workers before and after."""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time

from mlx_dist.bench import processes


def _memory(addresses: list[str]) -> dict[str, int]:
    from mlx_dist import _core

    return {a: _core.worker_info(a)["memory"]["active"] for a in addresses}


def main(args) -> int:
    import mlx_dist

    n, victim = args.workers, args.kill
    if not 0 <= victim < n:
        raise ValueError(f"--kill must name a worker from 0 to {n - 1}")
    env = dict(os.environ, MLX_DIST_LOG="warn")
    with tempfile.TemporaryDirectory() as tmp:
        env["MLX_DIST_CACHE"] = tmp
        procs = [processes.worker(f"w{i}", env=env) for i in range(n)]
        try:
            addrs = [p.address for p in procs]
            model, tok = mlx_dist.load(args.model, workers=addrs, strategy="uniform")
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True
            )
            print(model.plan)
            reference = [
                r.token
                for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=args.tokens)
            ]
            survivors = [a for i, a in enumerate(addrs) if i != victim]
            before = _memory(survivors)
            times, tokens, killed_at = [], [], None
            for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=args.tokens):
                times.append(time.perf_counter())
                tokens.append(r.token)
                if len(tokens) == args.kill_after:
                    procs[victim].kill()
                    killed_at = time.perf_counter()
            after = _memory(survivors)
        finally:
            for p in procs:
                p.kill()
    if killed_at is None:
        raise ValueError("the generation ended before the kill: raise --tokens")
    k = args.kill_after
    gaps = [b - a for a, b in itertools.pairwise(times[1:k])]
    recovery = times[k] - killed_at
    lost = sum(1 for a, b in zip(reference, tokens, strict=False) if a != b)
    lost += abs(len(reference) - len(tokens))
    print(f"workers: {n}, killed: w{victim} after {k} tokens, generated: {len(tokens)}")
    print(f"normal time per token: {statistics.median(gaps) * 1e3:.1f} ms")
    print(f"kill -> first token after recovery: {recovery:.2f} s")
    print(f"tokens lost or different from the run without failure: {lost}")
    print(f"re-plans: {model.epoch}; now: {', '.join(model.workers)}")
    for a in survivors:
        print(f"  {a}: MLX active memory {before[a] / 1e6:.1f} MB -> {after[a] / 1e6:.1f} MB")
    return 0 if lost == 0 else 1
