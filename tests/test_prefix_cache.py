"""The prefix cache under pressure: a prefix a stage evicted is a miss (the
prompt is computed again, the answer unchanged), never an error or a
re-plan; identical prompts share one entry; and memory stays within
MLX_DIST_PREFIX_CACHE_MB."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import mlx_dist
import pytest
from cluster_utils import WorkerProcess
from mlx_dist import _core
from server_utils import ServerProcess

TEXT = (
    "the old lighthouse stood at the end of the harbour and every night its keeper climbed "
    "the narrow stairs to light the lamp ships passing in the dark would see the beam sweep "
    "across the water a good recipe for bread needs only flour water salt and yeast"
)
WORDS = TEXT.split()
# Each prompt's own first word.
FIRSTS = ["Paris", "bread", "ships", "winter", "garden", "radio"]
FIRSTS += ["letter", "storm", "whale", "island", "bees", "apple"]

# 8 layers of 2 KV heads of 16, float32: 2 KiB a position, so a prompt of
# about 150 tokens keeps about 300 KiB and 1 MiB holds three.
BUDGET_MB = 1


def prompt(i: int, words: int = 60) -> str:
    """Prompt `i`: its own first word, so that no two share a kept prefix."""
    body = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(words))
    return f"{FIRSTS[i % len(FIRSTS)]} {i}: {body}"


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama", num_layers=8)


@pytest.fixture(scope="module")
def fresh(model_path):
    """Greedy tokens of a prompt on one device with no prefix cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_DIST_PREFIX_CACHE_MB", "0")
        model, tok = mlx_dist.load(str(model_path))

    def run(text: str, n: int = 4) -> list[int]:
        ids = tok.encode(text)
        return [r.token for r in mlx_dist.stream_generate(model, tok, ids, max_tokens=n)]

    return run


def worker(name: str, log_dir: Path, prefix_mb: int | None) -> WorkerProcess:
    with pytest.MonkeyPatch.context() as mp:
        if prefix_mb is not None:
            mp.setenv("MLX_DIST_PREFIX_CACHE_MB", str(prefix_mb))
        return WorkerProcess(name, log_dir)


def info(address: str) -> dict:
    """The engine's figures of the worker at `address`, and its MLX memory."""
    i = _core.worker_info(address)
    return {**i["engine"], "mlx_active_memory": i["memory"]["active"]}


def generate(model, tok, text: str, n: int = 4) -> tuple[list[int], int]:
    g = _core.Generation(model._core, tok._core, tok.encode(text), max_tokens=n, logprobs=False)
    return [rec[1] for rec in g], g.cached_tokens


def test_evicted_prefixes_are_computed_again_over_a_worker(model_path, fresh, tmp_path):
    w = worker("evict", tmp_path, BUDGET_MB)
    try:
        model, tok = mlx_dist.load(str(model_path), workers=[w.address])
        prompts = [prompt(i) for i in range(12)]
        assert all(130 < len(tok.encode(p)) < 170 for p in prompts)
        want = [fresh(p) for p in prompts]
        assert [generate(model, tok, p) for p in prompts] == [(t, 0) for t in want]
        held = info(w.address)
        assert held["prefix_budget_bytes"] == BUDGET_MB << 20
        assert 2 <= held["prefix_entries"] < len(prompts)
        # Every prompt again: most were evicted by the worker, though the
        # coordinator still names them. Each is answered as a fresh run.
        again = [generate(model, tok, p) for p in prompts]
        assert [t for t, _ in again] == want
        assert sum(c == 0 for _, c in again) >= len(prompts) // 2
        # Misses are not failures: nothing re-planned.
        assert model._core.epoch == 0
        # A prefix still kept is used: all but the last two tokens.
        last = prompts[-1]
        assert generate(model, tok, last) == (want[-1], len(tok.encode(last)) - 2)
        held = info(w.address)
        assert held["prefix_bytes"] <= held["prefix_budget_bytes"]
    finally:
        w.stop()


def test_a_later_stage_without_the_prefix_is_a_miss(model_path, fresh, tmp_path):
    """Stage 1 keeps the prefix, stage 2 keeps nothing: stage 2's refusal
    travels up through stage 1, and the coordinator runs the prompt again."""
    first = worker("keeps", tmp_path, None)
    second = worker("forgets", tmp_path, 0)
    try:
        model, tok = mlx_dist.load(
            str(model_path), workers=[first.address, second.address], strategy="uniform"
        )
        text = prompt(3)
        want = fresh(text)
        for _ in range(4):
            assert generate(model, tok, text) == (want, 0)
        assert model._core.epoch == 0
        assert info(second.address)["prefix_entries"] == 0
        # Stage 1 drops what the coordinator forgot (the prefix stage 2
        # lacked, the failed attempts): what it holds stays small.
        assert info(first.address)["prefix_entries"] <= 2
    finally:
        first.stop()
        second.stop()


def test_identical_prompts_share_one_entry(model_path, tmp_path):
    w = worker("dedup", tmp_path, None)
    try:
        model, tok = mlx_dist.load(str(model_path), workers=[w.address])
        text = prompt(5)
        runs = [generate(model, tok, text, n=1) for _ in range(6)]
        assert [c for _, c in runs] == [0] + [len(tok.encode(text)) - 2] * 5
        # The worker got the coordinator's forgets with each next start.
        assert info(w.address)["prefix_entries"] <= 2
        assert model._core.prefix_index_entries == 1
    finally:
        w.stop()


def complete(client: httpx.Client, text: str, n: int = 4) -> tuple[int, str, int]:
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": n, "temperature": 0})
    if r.status_code != 200:
        return r.status_code, r.text, -1
    body = r.json()
    cached = body["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return 200, body["choices"][0]["text"], cached


def test_a_served_model_answers_evicted_prefixes(model_path, tmp_path):
    server = ServerProcess(
        tmp_path, "--model", str(model_path), env={"MLX_DIST_PREFIX_CACHE_MB": str(BUDGET_MB)}
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            prompts = [prompt(i) for i in range(12)]
            first = [complete(c, p) for p in prompts]
            assert all(code == 200 and cached == 0 for code, _, cached in first), first
            again = [complete(c, p) for p in prompts]
            assert [(code, text) for code, text, _ in again] == [(200, t) for _, t, _ in first]
            assert sum(cached == 0 for *_, cached in again) >= len(prompts) // 2
            assert complete(c, prompts[-1])[2] > 0
            assert c.get("/health").status_code == 200
            # /cluster/status shows what is kept, within the bound.
            kept = c.get("/cluster/status").json()["prefix_cache"]
            (stage,) = kept["stages"]
            assert stage["budget_bytes"] == BUDGET_MB << 20, kept
            assert 0 < stage["bytes"] <= stage["budget_bytes"], kept
            assert 0 < stage["entries"] < len(prompts), kept
            assert kept["index_entries"] >= stage["entries"], kept
    finally:
        server.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


SOAK = 500
SOAK_MB = 2


@pytest.mark.parametrize("where", ["one device", "over a worker"])
def test_memory_plateaus_within_the_bound_over_a_soak(where, model_path, tmp_path):
    """500 one-token requests, a third of them the same greeting and the
    rest all different: the resident memory of the server (and of the
    worker) levels off within the prefix bound plus a margin."""
    env = {"MLX_DIST_PREFIX_CACHE_MB": str(SOAK_MB)}
    workers = [worker("soak", tmp_path, SOAK_MB)] if where == "over a worker" else []
    args = ["--workers", workers[0].address] if workers else []
    server = ServerProcess(tmp_path, "--model", str(model_path), *args, env=env)
    procs = {"server": server.proc.pid} | {w.name: w.proc.pid for w in workers}
    curve: dict[str, list[float]] = {name: [] for name in procs}
    # What MLX holds in the worker: weights and kept prefixes, which may not
    # pin more than they count (a view of a sequence's row would).
    active = [info(workers[0].address)["mlx_active_memory"]] if workers else []
    started = time.monotonic()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for i in range(SOAK):
                text = "Good evening, friend! How are you today?" if i % 3 == 0 else prompt(i, 30)
                code, body, _ = complete(c, text, n=1)
                assert code == 200, body
                if (i + 1) % 50 == 0:
                    for name, pid in procs.items():
                        curve[name].append(round(rss_mb(pid), 1))
                    if workers:
                        active.append(info(workers[0].address)["mlx_active_memory"])
        print(f"\nRSS (MB) every 50 requests, {where}, {time.monotonic() - started:.0f} s:")
        for name, points in curve.items():
            print(f"  {name}: {points}")
        for name, points in curve.items():
            # After the first 100 requests have filled the cache, growth
            # stays within the bound plus a margin, and levels off.
            grown = max(points) - points[1]
            assert grown < SOAK_MB + 48, f"{name} grew {grown:.0f} MB: {points}"
            late = max(points[5:]) - points[5]
            assert late < 24, f"{name} still grows: {points}"
        if workers:
            held = info(workers[0].address)
            assert 0 < held["prefix_bytes"] <= held["prefix_budget_bytes"] == SOAK_MB << 20
            assert max(active) - min(active) <= held["prefix_budget_bytes"] + (256 << 10), active
    finally:
        server.stop()
        for w in workers:
            w.stop()
