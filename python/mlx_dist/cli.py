"""The ``mlx-dist`` command line."""

from __future__ import annotations

import argparse
import sys


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed for repeatable sampling")


# What _add_cluster adds, by their ServerSettings names.
_CLUSTER_OPTIONS = (
    "workers",
    "cluster_config",
    "strategy",
    "proportions",
    "compression",
    "tls_ca",
    "token",
    "step_timeout",
    "failure_timeout",
    "h2_window_mb",
)


def _add_transport(p: argparse.ArgumentParser, peers: str) -> None:
    """How ``peers`` are watched and reached (the coordinator's workers, a
    worker's next stage and callers)."""
    p.add_argument(
        "--failure-timeout",
        type=float,
        default=None,
        help=f"seconds {peers} may be silent (keepalive pings unanswered) before they count "
        "as failed (default: $MLX_DIST_FAILURE_TIMEOUT, else 4)",
    )
    p.add_argument(
        "--h2-window-mb",
        type=int,
        default=None,
        help="HTTP/2 flow-control window of each gRPC stream, in MiB, at most 512 (default: "
        "$MLX_DIST_H2_WINDOW_MB, else 16; 0: HTTP/2's 64 KiB)",
    )


def _add_engine(p: argparse.ArgumentParser, whose: str) -> None:
    """The options of a worker's engine (``whose``: the worker they set)."""
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=None,
        help=f"KV cache {whose} keeps from ended sequences for later prompts, in MiB, at most "
        "a quarter of its KV budget (default: $MLX_DIST_PREFIX_CACHE_MB, else 1024; 0: off)",
    )
    p.add_argument(
        "--step-spin-us",
        type=int,
        default=None,
        help=f"microseconds {whose} polls for a step's result before it sleeps, at most "
        "1000000 (default: $MLX_DIST_STEP_SPIN_US, else 2000 on a GPU, 0 on the CPU)",
    )
    p.add_argument(
        "--launch-ahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{whose} launches a sequence's next decode step before its input arrives "
        "(default: $MLX_DIST_LAUNCH_AHEAD=1/0, else on a CUDA GPU only)",
    )
    p.add_argument(
        "--warm-up",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{whose} compiles its stage's GPU kernels as it loads (default: "
        "$MLX_DIST_WARM_UP=1/0, else on a CUDA GPU only)",
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers", default=None, help="split the model over these workers: h1:p1,h2:p2"
    )
    p.add_argument(
        "--cluster-config", default=None, help="cluster config file (YAML, TOML or JSON)"
    )
    p.add_argument(
        "--strategy",
        default=None,
        help="uniform, memory_proportional, compute_proportional, balanced (default) or custom",
    )
    p.add_argument("--proportions", default=None, help="with --strategy custom: e.g. 0.5,0.25,0.25")
    p.add_argument(
        "--compression", default=None, help="activations on the wire: none (default) or int8"
    )
    p.add_argument(
        "--tls-ca",
        default=None,
        help="reach the workers over TLS, trusting this CA certificate (PEM; default: $MLX_DIST_TLS_CA)",
    )
    p.add_argument("--token", default=None, help="cluster token (default: $MLX_DIST_TOKEN)")
    p.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        help="seconds (plus 0.1 per token) a step's reply is waited for before the stages are "
        "asked whether they answer (default: $MLX_DIST_STEP_TIMEOUT, else 30)",
    )
    _add_transport(p, "workers")


def _load(args: argparse.Namespace):
    import mlx_dist
    from mlx_dist.cluster import _progress_printer
    from mlx_dist.server.settings import resolve_settings

    # The server's precedence, flags over the cluster config file; the
    # settings left out come from the core's MLX_DIST_* variables.
    given = {k: getattr(args, k) for k in _CLUSTER_OPTIONS}
    s = resolve_settings(dict(given, model=args.model), env={})
    if not s.workers:
        return mlx_dist.load(s.model)
    n = len(str(s.workers).split(",")) if isinstance(s.workers, str) else len(s.workers)
    print(f"loading over {n} workers ...", file=sys.stderr)
    model, tokenizer = mlx_dist.load(
        s.model, **s.cluster_args(), token=s.token, progress=_progress_printer()
    )
    print(model.plan, file=sys.stderr)
    return model, tokenizer


def _generate(args: argparse.Namespace) -> int:
    import mlx_dist

    model, tokenizer = _load(args)
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if tokenizer.has_chat_template and not args.ignore_chat_template:
        messages = []
        if args.system_prompt:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sampler = mlx_dist.make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    response = None
    for response in mlx_dist.stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler, seed=args.seed
    ):
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print("=" * 10, file=sys.stderr)
        print(
            f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec",
            file=sys.stderr,
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB", file=sys.stderr)
    return 0


# ``mlx-dist serve``'s options that are no ServerSettings field, and those
# named otherwise there; every other option is the field of its name.
_SERVE_ONLY = ("command", "func", "host", "port", "log_level")
_SERVE_RENAMED = {"temp": "temperature"}


def serve_settings(args: argparse.Namespace) -> dict:
    """The ServerSettings fields ``mlx-dist serve``'s options give (None:
    not given), as ``serve()`` and ``resolve_settings`` take them."""
    return {_SERVE_RENAMED.get(k, k): v for k, v in vars(args).items() if k not in _SERVE_ONLY}


def _serve(args: argparse.Namespace) -> int:
    from mlx_dist.cluster import _progress_printer
    from mlx_dist.server import serve

    print(f"loading {args.model or 'the demo model'} ...", file=sys.stderr, flush=True)
    serve(
        host=args.host,
        port=args.port,
        block=True,
        log_level=args.log_level,
        progress=_progress_printer(),
        announce=lambda line: print(line, flush=True),
        **serve_settings(args),
    )
    return 0


def _read_pem(path: str, what: str) -> str:
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        return p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {p} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {p} is not a PEM text file") from None


def worker_args(args: argparse.Namespace) -> dict:
    """``_core.run_worker``'s keyword arguments from ``mlx-dist worker``'s
    options (the TLS files read; None: not given, the core's default)."""
    import os

    cert = args.tls_cert or os.environ.get("MLX_DIST_TLS_CERT") or None
    key = args.tls_key or os.environ.get("MLX_DIST_TLS_KEY") or None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together (or MLX_DIST_TLS_CERT/_KEY)")
    cert_pem = _read_pem(cert, "--tls-cert") if cert else None
    key_pem = _read_pem(key, "--tls-key") if key else None
    ca = args.tls_ca or os.environ.get("MLX_DIST_TLS_CA") or None
    # One certificate for the whole cluster: the next stage serves the same.
    tls_ca = _read_pem(ca, "--tls-ca") if ca else cert_pem
    if args.max_sequences < 1:
        raise ValueError("--max-sequences must be at least 1")
    if args.max_message_mb < 1:
        raise ValueError("--max-message-mb must be at least 1")
    if args.kv_budget_mb is not None and args.kv_budget_mb < 1:
        raise ValueError("--kv-budget-mb must be at least 1")
    for flag in ("prefix_cache_mb", "step_spin_us", "h2_window_mb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be 0 or more")
    if args.failure_timeout is not None and not args.failure_timeout > 0:
        raise ValueError("--failure-timeout must be above 0")
    return {
        "host": args.host,
        "port": args.port,
        "name": args.name,
        "local_files": not args.no_local_files,
        "tls_cert_pem": cert_pem,
        "tls_key_pem": key_pem,
        "max_sequences": args.max_sequences,
        "max_message_bytes": args.max_message_mb << 20,
        "prefix_cache_mb": args.prefix_cache_mb,
        "kv_budget_mb": args.kv_budget_mb,
        "token": args.token,
        "tls_ca": tls_ca,
        "cache_dir": args.cache_dir,
        "step_spin_us": args.step_spin_us,
        "launch_ahead": args.launch_ahead,
        "warm_up": args.warm_up,
        "failure_timeout": args.failure_timeout,
        "h2_window_mb": args.h2_window_mb,
    }


def _worker(args: argparse.Namespace) -> int:
    import os
    import threading

    from mlx_dist import _core

    kw = worker_args(args)
    if args.coordinator:
        from mlx_dist.announce import advertised_address, announce, free_port

        kw["port"] = kw["port"] or free_port(args.host)
        address = args.advertise or advertised_address(args.host, kw["port"])
        token = args.token or os.environ.get("MLX_DIST_TOKEN")
        threading.Thread(
            target=announce,
            args=(args.coordinator, address, args.host, kw["port"], token),
            name="mlx-dist-announce",
            daemon=True,
        ).start()
    _core.run_worker(**kw)
    return 0


def _cert(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from mlx_dist import _core

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--hosts: give the workers' host names or IP addresses, e.g. h1,10.0.0.2")
    out = Path(args.out).expanduser()
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    if not args.force:
        for p in (cert_path, key_path):
            if p.exists():
                raise ValueError(f"{p} exists (--force replaces it)")
    cert, key = _core.make_certificate(hosts)
    out.mkdir(parents=True, exist_ok=True)
    cert_path.write_text(cert)
    # The key is readable by its owner alone.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.chmod(key_path, 0o600)
    print(f"wrote {cert_path} and {key_path} for {', '.join(hosts)}")
    print(
        f"workers: mlx-dist worker --tls-cert {cert_path} --tls-key {key_path}\n"
        f"clients: --tls-ca {cert_path} (copy {cert_path} to them, never {key_path.name})"
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from mlx_dist import _core
    from mlx_dist.demo import demo_model_path

    src = args.model or str(demo_model_path())
    _core.convert(src, args.out)
    print(f"wrote {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mlx_dist.bench.generate import main as bench_main

    return bench_main(args)


def _bench_pipeline(args: argparse.Namespace) -> int:
    from mlx_dist.bench.pipeline import main as bench_main

    return bench_main(args)


def _top(args: argparse.Namespace) -> int:
    import os

    from mlx_dist.dashboard import main as top_main

    args.url = args.url or os.environ.get("MLX_DIST_URL")
    args.api_key = args.api_key or os.environ.get("MLX_DIST_API_KEY")
    return top_main(args)


def _bench_admission(args: argparse.Namespace) -> int:
    from mlx_dist.bench.admission import main

    return main(args)


def _bench_gguf(args: argparse.Namespace) -> int:
    from mlx_dist.bench.gguf_load import main

    return main(args)


def _bench_throughput(args: argparse.Namespace) -> int:
    from mlx_dist.bench.throughput import main as bench_main

    return bench_main(args)


def _bench_ops(args: argparse.Namespace) -> int:
    from mlx_dist.bench.ops import main as bench_main

    return bench_main(args)


def _bench_recovery(args: argparse.Namespace) -> int:
    from mlx_dist.bench.recovery import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``mlx-dist`` parser, each subcommand's function its ``func``."""
    parser = argparse.ArgumentParser(prog="mlx-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument(
        "--model", default=None, help="model path, .gguf file or cached repo id (default: demo)"
    )
    g.add_argument(
        "--prompt", "-p", default="What is the capital of France?", help="prompt ('-': stdin)"
    )
    g.add_argument("--system-prompt", default=None)
    g.add_argument(
        "--ignore-chat-template", action="store_true", help="send the prompt as raw text"
    )
    _add_sampling(g)
    _add_cluster(g)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve the model with an OpenAI-compatible HTTP API")
    s.add_argument(
        "--model", default=None, help="model path, .gguf file or cached repo id (default: demo)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8100, help="port (0: any free port)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $MLX_DIST_API_KEY; none: open)",
    )
    s.add_argument("--model-name", default=None, help="the model's id in the API")
    # Settings left out (None) come from MLX_DIST_* variables, else ServerSettings' defaults.
    s.add_argument("--max-concurrency", type=int, help="sequences generating at once (default 8)")
    s.add_argument(
        "--max-queue", type=int, help="requests waiting beyond those, then 429 (default 64)"
    )
    s.add_argument(
        "--max-tokens", type=int, help="completion length when a request gives none (default 512)"
    )
    s.add_argument("--temp", type=float, help="temperature when a request gives none (default 0)")
    s.add_argument("--top-p", type=float, help="top_p when a request gives none (default 1)")
    s.add_argument(
        "--reasoning-format",
        choices=("auto", "deepseek", "none"),
        help="reasoning_format when a request gives none: auto (reasoning apart where the "
        "template has <think> or is gpt-oss's), deepseek (always apart), none (left in the "
        "text) (default auto)",
    )
    s.add_argument(
        "--kv-tokens",
        type=int,
        help="tokens of KV cache the layer plan leaves room for on each stage (default: the "
        "cluster config's, else 4096)",
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        help="prompt tokens run in one step, between other streams' decode steps (default 256)",
    )
    s.add_argument(
        "--recovery-wait",
        type=float,
        help="seconds to wait for room for the model after a worker fails, then 503 (default 30)",
    )
    s.add_argument("--log-level", default="info", help="uvicorn's log level")
    s.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="on one device, batch concurrent sequences' decode steps (in a worker inside "
        "this process); --no-batch steps them in turn",
    )
    s.add_argument(
        "--max-context",
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="tokens a sequence may hold, prompt and completion; longer prompts get 400 "
        "(default: the model's context length when its config gives one, else 32768)",
    )
    s.add_argument(
        "--allow-join",
        action="store_true",
        default=None,
        help="let workers join through /cluster/join without a cluster token (off by default)",
    )
    s.add_argument(
        "--join-interval",
        type=float,
        default=None,
        help="seconds at least between two re-plans that joining workers start (default 10)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=None,
        help="seconds a connection has to send a request's headers, and between parts of "
        "its body (default 10)",
    )
    s.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=None,
        help="seconds an idle kept-alive connection stays open (default 5)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections at most; past them requests get 503 (default 1024)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="larger request bodies get 413 (default 8 MiB)",
    )
    s.add_argument(
        "--health-interval",
        type=float,
        default=None,
        help="seconds between the health monitor's checks of the workers (default 2)",
    )
    _add_cluster(s)
    _add_engine(s, "the worker inside this process (one device)")
    s.set_defaults(func=_serve)

    w = sub.add_parser("worker", help="serve one pipeline stage over gRPC")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    w.add_argument("--port", type=int, default=7470, help="port (0: any free port)")
    w.add_argument("--name", default=None, help="name shown in plans, logs and errors")
    w.add_argument(
        "--token",
        default=None,
        help="cluster token every call must carry (default: $MLX_DIST_TOKEN; none: open)",
    )
    w.add_argument(
        "--no-local-files",
        action="store_true",
        help="never read model files from this machine's disk: use copies the coordinator sends",
    )
    w.add_argument(
        "--coordinator",
        default=None,
        help="announce this worker to the server at this URL (http://host:8100) once listening",
    )
    w.add_argument(
        "--advertise",
        default=None,
        help="the host:port the coordinator should use (default: this host's name and port)",
    )
    w.add_argument(
        "--tls-cert",
        default=None,
        help="serve TLS with this certificate (PEM; default: $MLX_DIST_TLS_CERT); see 'mlx-dist cert'",
    )
    w.add_argument(
        "--tls-key",
        default=None,
        help="the certificate's private key (PEM; default: $MLX_DIST_TLS_KEY)",
    )
    w.add_argument(
        "--tls-ca",
        default=None,
        help="reach the next stage over TLS, trusting this CA certificate "
        "(PEM; default: $MLX_DIST_TLS_CA, else --tls-cert)",
    )
    w.add_argument(
        "--max-sequences",
        type=int,
        default=256,
        help="sequences held at once; one more is refused (RESOURCE_EXHAUSTED)",
    )
    w.add_argument(
        "--max-message-mb",
        type=int,
        default=160,
        help="largest gRPC message taken, in MiB (activations of one prompt chunk)",
    )
    w.add_argument(
        "--kv-budget-mb",
        type=int,
        default=None,
        help="KV cache of all sequences held here, in MiB (default: 80%% of the device "
        "memory free once the stage is loaded)",
    )
    w.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="keep models the coordinator sends in DIR/models (default: $MLX_DIST_CACHE, "
        "else ~/.cache/mlx-dist)",
    )
    _add_engine(w, "the worker")
    _add_transport(w, "the previous and next stages")
    w.set_defaults(func=_worker)

    ct = sub.add_parser(
        "cert", help="make a self-signed TLS certificate and key for workers (cert.pem, key.pem)"
    )
    ct.add_argument("--out", required=True, help="folder to write cert.pem and key.pem into")
    ct.add_argument(
        "--hosts",
        required=True,
        help="the names and IP addresses clients reach workers by: h1,h2,10.0.0.5",
    )
    ct.add_argument("--force", action="store_true", help="replace existing files")
    ct.set_defaults(func=_cert)

    c = sub.add_parser(
        "convert", help="write a model (e.g. a GGUF file) in the MLX directory layout"
    )
    c.add_argument("--model", default=None, help="model to convert (default: the demo model)")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=_convert)

    b = sub.add_parser("bench", help="prompt and decode speed of mlx-dist and mlx-lm, side by side")
    b.add_argument("--model", default=None, help="model to measure (default: the demo model)")
    b.add_argument(
        "--random-shape",
        default=None,
        help="instead of --model, a random-weight model of this shape (e.g. qwen3-1.7b, tiny)",
    )
    b.add_argument(
        "--bits", type=int, default=None, help="quantize the random model to this many bits"
    )
    b.add_argument("--dtype", default="bfloat16", help="float type of the random model's weights")
    b.add_argument("--prompt-tokens", type=int, default=512)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.set_defaults(func=_bench)

    bp = sub.add_parser(
        "bench-pipeline", help="decode speed over 1, 2 and 3 workers on loopback, side by side"
    )
    bp.add_argument("--model", default=None)
    bp.add_argument("--random-shape", default=None)
    bp.add_argument("--bits", type=int, default=None)
    bp.add_argument("--dtype", default="bfloat16")
    bp.add_argument("--stages", default="2,3", help="worker counts to measure")
    bp.add_argument("--prompt-tokens", type=int, default=64)
    bp.add_argument("--gen-tokens", type=int, default=128)
    bp.add_argument("--repeats", type=int, default=3)
    bp.add_argument(
        "--launch-ahead",
        action="store_true",
        help="measure workers that launch decode steps ahead and workers that do not, side "
        "by side (worker --launch-ahead and --no-launch-ahead); without it the workers do "
        "what their device's default is (ahead on a CUDA GPU)",
    )
    bp.add_argument("--worker-logs", help="keep each worker's log in this directory")
    bp.set_defaults(func=_bench_pipeline)

    bo = sub.add_parser(
        "bench-ops", help="what each op of a batched decode step costs here, for R rows"
    )
    bo.add_argument(
        "--random-shape", default="qwen3-1.7b", help="the model shape to take sizes from"
    )
    bo.add_argument("--bits", type=int, default=8)
    bo.add_argument("--rows", default="1,4,8,16", help="batch sizes to measure")
    bo.add_argument("--length", type=int, default=300, help="cached positions attended to")
    bo.add_argument("--layers", type=int, default=28, help="ops chained per evaluation")
    bo.add_argument("--repeats", type=int, default=10)
    bo.set_defaults(func=_bench_ops)

    t = sub.add_parser("top", help="a live dashboard of a server's cluster")
    t.add_argument(
        "url", nargs="?", default=None, help="the server (default: $MLX_DIST_URL or :8100)"
    )
    t.add_argument("--api-key", default=None, help="default: $MLX_DIST_API_KEY")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    t.add_argument("--iterations", type=int, default=None, help="frames to draw (default: forever)")
    t.set_defaults(func=_top)

    bt = sub.add_parser(
        "bench-throughput", help="aggregate tokens/s of concurrent streams over 1, 2, 4 stages"
    )
    bt.add_argument("--model", default=None)
    bt.add_argument("--random-shape", default=None)
    bt.add_argument("--bits", type=int, default=None)
    bt.add_argument("--dtype", default="bfloat16")
    bt.add_argument("--stages", default="1,2,4")
    bt.add_argument("--streams", default="1,4,8,16")
    bt.add_argument("--gpus", type=int, default=0, help="one worker per GPU over this many GPUs")
    bt.add_argument("--prompt-tokens", type=int, default=32)
    bt.add_argument("--gen-tokens", type=int, default=64)
    bt.add_argument("--ttft-tokens", type=int, default=4096)
    bt.add_argument("--prefill-chunk", type=int, default=1024, help="pipelined prompt chunk")
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument(
        "--servers",
        action="store_true",
        help="also run the same load through mlx-dist serve and mlx_lm.server (HTTP)",
    )
    bt.add_argument(
        "--chain",
        action="store_true",
        help="also measure decode steps sent by the coordinator (ring=False), side by side",
    )
    bt.add_argument(
        "--strategy",
        default="compute_proportional",
        help="how the workers share the layers (balanced may leave some out)",
    )
    bt.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mlx-lm's batched generation on one device",
    )
    bt.set_defaults(func=_bench_throughput)

    bg = sub.add_parser(
        "bench-gguf",
        help="what each worker reads and holds loading a GGUF model (Q4_K_M mix) over workers",
    )
    from mlx_dist.bench.gguf_load import add_arguments as gguf_arguments

    gguf_arguments(bg)
    bg.set_defaults(func=_bench_gguf)
    ba = sub.add_parser(
        "bench-admission",
        help="gaps in a decoding stream while a long prompt is admitted, per prefill chunk",
    )
    ba.add_argument("--model", default=None)
    ba.add_argument("--random-shape", default=None)
    ba.add_argument("--bits", type=int, default=None)
    ba.add_argument("--dtype", default="bfloat16")
    ba.add_argument("--prompt-tokens", type=int, default=4096)
    ba.add_argument("--decode-tokens", type=int, default=4000, help="the decoding stream's length")
    ba.add_argument(
        "--chunks",
        default="4096,512,256",
        help="prefill chunk sizes (one as long as the prompt: "
        "the whole prompt at once, as before chunks were interleaved)",
    )
    ba.set_defaults(func=_bench_admission)

    br = sub.add_parser(
        "bench-recovery", help="kill a worker mid-generation: recovery time and tokens lost"
    )
    br.add_argument("--model", default=None, help="model (default: the demo model)")
    br.add_argument("--workers", type=int, default=3)
    br.add_argument("--kill", type=int, default=1, help="index of the worker to kill")
    br.add_argument("--kill-after", type=int, default=40, help="tokens before the kill")
    br.add_argument("--tokens", type=int, default=160)
    br.add_argument("--prompt", default="Tell me a short story about a lighthouse keeper.")
    br.set_defaults(func=_bench_recovery)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (
        ValueError,
        FileNotFoundError,
        RuntimeError,
        ConnectionError,
        MemoryError,
        OSError,
    ) as e:
        print(f"mlx-dist: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
