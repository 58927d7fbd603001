"""``mlx-dist bench-gguf``: what loading a GGUF model over workers costs each
worker: wall time, bytes read from disk (``/proc`` rchar) and peak memory
(VmHWM), with the layers split evenly.

The model is random, in llama's shape, with Q4_K_M's mix of types (Q4_K
matrices; Q6_K down projections and head), written with llama.cpp's ``gguf``
package (``pip install gguf``). ``--compare-with DIR`` runs the same load
with the mlx-dist found in DIR (e.g. an older build unpacked with ``pip
install --target``) side by side; each build runs its own coordinator, as
builds of different wire versions cannot talk to each other."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv heads, vocab)
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000),
    "small": (1024, 2816, 12, 16, 4, 32000),
    "tiny": (256, 512, 6, 8, 4, 1024),
}


def write_model(path: Path, shape: str) -> Path:
    """A random Q4_K_M-style GGUF of `shape`; returns its path."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    hidden, inter, layers, heads, kv, vocab = _SHAPES[shape]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    # A byte-level vocabulary: the 256 byte symbols, then pairs of them.
    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(0x100 + i) for i in range(256 - 94)]
    pairs = [(a, b) for a in chars for b in chars][: vocab - 256]
    tokens = chars + [a + b for a, b in pairs]
    w.add_token_list(tokens)
    w.add_token_merges([f"{a} {b}" for a, b in pairs])
    w.add_token_types([1] * vocab)
    w.add_eos_token_id(0)

    def matrix(name: str, rows: int, cols: int, ty) -> None:
        block, size = gguf.GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        d = np.full(raw.shape[:2], 1e-4, dtype=np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
        at = {T.Q4_K: (0, 2), T.Q6_K: (208,)}[ty]
        for a in at:
            raw[:, :, a : a + 2] = d
        w.add_tensor(
            name, raw.reshape(rows, -1), raw_shape=(rows, cols // block * size), raw_dtype=ty
        )

    head_dim = hidden // heads
    matrix("token_embd.weight", vocab, hidden, T.Q4_K)
    for i in range(layers):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(hidden, np.float32))
        matrix(f"{p}.attn_q.weight", hidden, hidden, T.Q4_K)
        matrix(f"{p}.attn_k.weight", kv * head_dim, hidden, T.Q4_K)
        matrix(f"{p}.attn_v.weight", kv * head_dim, hidden, T.Q6_K)
        matrix(f"{p}.attn_output.weight", hidden, hidden, T.Q4_K)
        matrix(f"{p}.ffn_gate.weight", inter, hidden, T.Q4_K)
        matrix(f"{p}.ffn_up.weight", inter, hidden, T.Q4_K)
        matrix(f"{p}.ffn_down.weight", hidden, inter, T.Q6_K)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    matrix("output.weight", vocab, hidden, T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Runs in a child process with one build on its path: starts the workers,
# loads the model over them and prints what each one read and held.
_CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
from mlx_dist.bench import processes
import mlx_dist

model, n = sys.argv[1], int(sys.argv[2])
def proc(pid, key):
    if key in ("rchar", "read_bytes"):
        with open(f"/proc/{pid}/io") as f:
            return int(dict(l.split(":", 1) for l in f)[key])
    with open(f"/proc/{pid}/status") as f:
        return int(dict(l.split(":", 1) for l in f)[key].split()[0]) * 1024
tmp = Path(tempfile.mkdtemp())
env = dict(os.environ, MLX_DIST_CACHE=str(tmp))
workers = [processes.worker(f"w{i}", env=env, log=tmp / f"w{i}.log") for i in range(n)]
try:
    before = [proc(w.proc.pid, "rchar") for w in workers]
    disk = [proc(w.proc.pid, "read_bytes") for w in workers]
    if os.environ.get("BENCH_COLD"):
        # From storage, not the page cache: what a fresh machine reads.
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
    t = time.perf_counter()
    m, _ = mlx_dist.load(model, workers=[w.address for w in workers], strategy="uniform")
    took = time.perf_counter() - t
    print(json.dumps({
        "load_s": took,
        "stages": [s["layers"] for s in m.plan_dict["stages"]],
        "read": [proc(w.proc.pid, "rchar") - b for w, b in zip(workers, before)],
        "disk": [proc(w.proc.pid, "read_bytes") - b for w, b in zip(workers, disk)],
        "peak": [proc(w.proc.pid, "VmHWM") for w in workers],
        "coordinator_peak": proc(os.getpid(), "VmHWM"),
    }))
finally:
    processes.stop_all(workers)
"""


def _load(model: Path, workers: int, build: str | None, cold: bool) -> dict:
    env = dict(os.environ, BENCH_COLD="1" if cold else "")
    if build:
        env["PYTHONPATH"] = os.pathsep.join([build, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), str(workers)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load with {build or 'this build'} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    model = write_model(tmp / "model.gguf", args.shape)
    size = model.stat().st_size
    print(
        f"{args.shape}: {size / 1e6:.0f} MB GGUF (Q4_K + Q6_K), written in {time.perf_counter() - t:.0f} s"
    )
    builds = [("this build", None)] + (
        [("compared", args.compare_with)] if args.compare_with else []
    )
    for _ in range(args.rounds):
        for name, build in builds:
            r = _load(model, args.workers, build, args.cold)
            print(f"{name}: load {r['load_s']:.1f} s")
            for i, layers in enumerate(r["stages"]):
                read, disk = r["read"][i], r["disk"][i]
                where = (
                    f", {disk / 1e6:.0f} MB ({disk / size:.0%}) from storage" if args.cold else ""
                )
                print(
                    f"  worker {i} layers {layers['start']}..{layers['end']}: read(2) {read / 1e6:.0f} MB"
                    f" ({read / size:.0%} of the file){where}, peak memory {r['peak'][i] / 1e6:.0f} MB"
                )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(_SHAPES), default="small")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--compare-with", metavar="DIR", help="a directory holding another mlx_dist build"
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each load (root) and report the bytes read from "
        "storage, which counts a memory-mapped reader's reads too",
    )
