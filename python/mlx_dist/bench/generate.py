"""``mlx-dist bench``: prompt and decode tokens/s of mlx-dist and of mlx-lm
on the same model, measured alternately in one run, and their ratio."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_dist.bench.models import make_random_model


def _run_mlx_dist(model, tok, ids, gen):
    import mlx_dist

    last = None
    for last in mlx_dist.stream_generate(model, tok, ids, max_tokens=gen):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def _run_mlx_lm(model, tok, ids, gen):
    import mlx_lm

    last = None
    for last in mlx_lm.stream_generate(model, tok, mx.array(ids), max_tokens=gen):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def main(args) -> int:
    import mlx_dist

    with tempfile.TemporaryDirectory() as tmp:
        if args.random_shape:
            print(
                f"making a random {args.random_shape} model ({args.dtype}, {args.bits or 'no'} quantization bits) ...",
                flush=True,
            )
            path = str(
                make_random_model(args.random_shape, args.bits, Path(tmp) / "model", args.dtype)
            )
        elif args.model:
            path = args.model
        else:
            from mlx_dist.demo import demo_model_path

            gguf = demo_model_path()
            path = str(Path(tmp) / "demo")
            mlx_dist._core.convert(str(gguf), path)
        print(f"device: {mx.default_device()}, model: {path}", flush=True)
        d_model, d_tok = mlx_dist.load(path)
        try:
            import mlx_lm
        except ImportError:
            mlx_lm = None
            print("mlx-lm is not installed: measuring mlx-dist alone")
        if mlx_lm is not None:
            l_model, l_tok = mlx_lm.load(path)
            # Generation must not stop early on a random model's EOS.
            l_tok._eos_token_ids = set()
        vocab = d_model.config["vocab_size"]
        ids = [(i * 7919) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]
        runs: dict[str, list] = {"mlx-dist": [], "mlx-lm": []}
        # One warm-up each, then alternate so both see the same machine state.
        _run_mlx_dist(d_model, d_tok, ids[:16], 4)
        if mlx_lm is not None:
            _run_mlx_lm(l_model, l_tok, ids[:16], 4)
        for _ in range(args.repeats):
            runs["mlx-dist"].append(_run_mlx_dist(d_model, d_tok, ids, args.gen_tokens))
            if mlx_lm is not None:
                runs["mlx-lm"].append(_run_mlx_lm(l_model, l_tok, ids, args.gen_tokens))
            time.sleep(0.1)
        print(
            f"prompt {args.prompt_tokens} tokens, generate {args.gen_tokens}, {args.repeats} runs (median)"
        )
        med = {}
        for name, rs in runs.items():
            if not rs:
                continue
            p = statistics.median(r[0] for r in rs)
            g = statistics.median(r[1] for r in rs)
            n = min(r[2] for r in rs)
            med[name] = (p, g)
            print(f"{name:9s} prompt {p:10.1f} tok/s   decode {g:8.1f} tok/s   ({n} tokens)")
        if len(med) == 2:
            print(
                f"ratio mlx-dist/mlx-lm: prompt {med['mlx-dist'][0] / med['mlx-lm'][0]:.3f}x, "
                f"decode {med['mlx-dist'][1] / med['mlx-lm'][1]:.3f}x"
            )
    return 0
