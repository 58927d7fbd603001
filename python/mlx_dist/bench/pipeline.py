"""``mlx-dist bench-pipeline``: decode speed of one device and of 2- and
3-worker pipelines on loopback, measured in one run: tokens/s, the ratio to
single device, time per hop and bytes sent per token per hop."""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path

from mlx_dist.bench import processes
from mlx_dist.bench.models import model_path


def _decode(model, tok, ids, gen, repeats):
    """Median decode tokens/s, tokens made, the median per-step compute time
    of each stage (distributed models), in ms, and the tokens of the last
    run."""
    import mlx_dist

    runs, stage_ms = [], []
    for _ in range(repeats):
        tokens = []
        for last in mlx_dist.stream_generate(model, tok, ids, max_tokens=gen):
            tokens.append(last.token)
            micros = getattr(model, "last_stage_micros", None)
            if micros and last.generation_tokens > 4:
                stage_ms.append([m / 1000 for m in micros])
        runs.append((last.generation_tps, last.generation_tokens))
    per_stage = (
        [statistics.median(s[i] for s in stage_ms) for i in range(len(stage_ms[0]))]
        if stage_ms
        else []
    )
    return statistics.median(r[0] for r in runs), min(r[1] for r in runs), per_stage, tokens


def _agreement(want, got) -> str:
    """How far greedy tokens `got` equal `want`: "yes", or where they part."""
    if want == got:
        return "yes"
    same = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
    return f"first {same}/{len(want)}"


def _sent(addrs):
    from mlx_dist import _core

    traffic = [_core.worker_info(a)["traffic"] for a in addrs]
    return sum(t["forward_bytes_sent"] for t in traffic), sum(
        t["forward_messages_sent"] for t in traffic
    )


def _decode_bytes_per_hop(model, tok, ids, addrs, gen):
    """Bytes of one decode step's message on one hop: a full run's traffic
    less a prefill-only run's, over the decode messages. A run first puts
    the prompt in the workers' prefix caches, so that both prefill alike."""
    import mlx_dist

    for _ in mlx_dist.stream_generate(model, tok, ids, max_tokens=1):
        pass
    b0, m0 = _sent(addrs)
    for _ in mlx_dist.stream_generate(model, tok, ids, max_tokens=1):
        pass
    b1, m1 = _sent(addrs)
    for _ in mlx_dist.stream_generate(model, tok, ids, max_tokens=gen):
        pass
    b2, m2 = _sent(addrs)
    prefill_b, prefill_m = b1 - b0, m1 - m0
    decode_m = (m2 - m1) - prefill_m
    return ((b2 - b1) - prefill_b) / decode_m if decode_m > 0 else 0.0


def main(args) -> int:
    import mlx.core as mx

    import mlx_dist

    # Workers of one host share its accelerator; each gets the same device.
    # With --launch-ahead, one set of workers launches steps ahead and one
    # does not; else one set does what the device's default is.
    sets: list[tuple[str, list[str]]] = [("", [])]
    if args.launch_ahead:
        sets = [("", ["--no-launch-ahead"]), (", ahead", ["--launch-ahead"])]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(args, Path(tmp))
        stages = [int(s) for s in args.stages.split(",")]
        logs = Path(args.worker_logs) if args.worker_logs else None
        procs, by_set = [], []
        try:
            for j, (label, flags) in enumerate(sets):
                names = [f"bench{j}.{i}" for i in range(max(stages))]
                started = [
                    processes.worker(n, *flags, log=logs / f"{n}.log" if logs else None)
                    for n in names
                ]
                procs += started
                by_set.append((label, [p.address for p in started]))
            local, tok = mlx_dist.load(path)
            hidden = local.config.get("hidden_size") or local.config.get("n_embd")
            vocab = local.config["vocab_size"]
            ids = [(i * 7919) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]
            _decode(local, tok, ids[:8], 4, 1)
            base, n, _, base_tokens = _decode(local, tok, ids, args.gen_tokens, args.repeats)
            print(f"device: {mx.default_device()}  model: {path}")
            print(
                f"prompt {args.prompt_tokens} tokens, decode {n} tokens, median of {args.repeats}"
            )
            print(
                f"{'setup':>25} {'tok/s':>9} {'ratio':>7} {'ms/token':>9} {'stage compute ms':>24} "
                f"{'net ms/hop':>10} {'bytes/hop/token':>16} {'= 1 device':>12}"
            )
            print(
                f"{'1 device':>25} {base:9.1f} {1.0:7.3f} {1000 / base:9.2f} {'-':>24} {'-':>10} {'-':>16} {'-':>12}"
            )
            for k, (label, set_addrs), ring in itertools.product(stages, by_set, (False, True)):
                # Decode steps sent by the coordinator and back up the chain
                # (2k network traversals a token), then round the ring (k).
                model, dtok = mlx_dist.load(
                    path, workers=set_addrs[:k], strategy="uniform", ring=ring
                )
                _decode(model, dtok, ids[:8], 4, 1)
                tps, n, per_stage, tokens = _decode(model, dtok, ids, args.gen_tokens, args.repeats)
                per_hop = _decode_bytes_per_hop(model, dtok, ids, set_addrs[:k], args.gen_tokens)
                step_ms = 1000 / tps
                # A one-stage ring hands the token over in-process.
                hops = (k if k > 1 else 0) if ring else 2 * k
                beyond = max(step_ms - sum(per_stage), 0.0)
                hop_txt = f"{beyond / hops:10.3f}" if hops else f"{'-':>10}"
                stages_txt = "+".join(f"{x:.2f}" for x in per_stage)
                setup = f"{k} workers, {'ring' if ring else 'chain'}{label}"
                print(
                    f"{setup:>25} {tps:9.1f} {tps / base:7.3f} {step_ms:9.2f} {stages_txt:>24} "
                    f"{hop_txt} {per_hop:16.0f} {_agreement(base_tokens, tokens):>12}"
                )
            if hidden:
                print(f"(hidden size {hidden}: hidden x 2 + 64 = {hidden * 2 + 64} bytes)")
            # The int8 codec: speed, bytes and how often greedy tokens agree
            # with exact ones (one device's).
            k = max(stages)
            for label, set_addrs in by_set:
                q, qtok = mlx_dist.load(
                    path, workers=set_addrs[:k], strategy="uniform", compression="int8"
                )
                qbytes = _decode_bytes_per_hop(q, qtok, ids, set_addrs[:k], args.gen_tokens)
                qtps, _, _, got = _decode(q, qtok, ids, args.gen_tokens, args.repeats)
                agree = sum(x == y for x, y in zip(base_tokens, got)) / max(len(base_tokens), 1)
                print(
                    f"int8 codec over {k} workers{label}: {qtps:.1f} tok/s ({qtps / base:.3f}x), "
                    f"{qbytes:.0f} bytes/hop/token; greedy tokens equal to exact: "
                    f"{_agreement(base_tokens, got)}, {100 * agree:.0f}% position-wise"
                )
        finally:
            processes.stop_all(procs)
    return 0
