"""Chaos: workers die (kill -9) or restart mid-generation; the cluster
re-plans over the workers left, replays each sequence's tokens, and the
output equals a run with no failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import mlx_dist
import pytest
from cluster_utils import start_workers
from server_utils import ServerProcess

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a prompt about cats and dogs"]
N = 240


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("qwen3", num_layers=6)


@pytest.fixture(scope="module")
def reference(model_path):
    """Greedy text and tokens of each prompt on one device (no failure)."""
    model, tok = mlx_dist.load(str(model_path))
    out = {}
    for p in PROMPTS:
        rs = list(mlx_dist.stream_generate(model, tok, p, max_tokens=N))
        assert rs[-1].finish_reason == "length"  # long enough to kill mid-way
        out[p] = ("".join(r.text for r in rs), [r.token for r in rs])
    return out


def _stream_and_kill(model, tok, prompt, after, action):
    """Tokens of a greedy run over `model`, with `action()` done after `after` tokens."""
    tokens, text = [], ""
    for i, r in enumerate(mlx_dist.stream_generate(model, tok, prompt, max_tokens=N)):
        if i == after:
            action()
        tokens.append(r.token)
        text += r.text
    return text, tokens


def test_killed_worker_mid_stream_loses_no_token(model_path, reference, tmp_path):
    workers = start_workers(3, tmp_path)
    try:
        model, tok = mlx_dist.load(
            str(model_path), workers=[w.address for w in workers], strategy="uniform"
        )
        text, tokens = _stream_and_kill(model, tok, PROMPTS[0], 40, workers[1].kill)
        assert (text, tokens) == reference[PROMPTS[0]]
        assert model.epoch >= 1
        assert model.excluded == [workers[1].address]
        assert workers[1].address not in model.workers
        assert len(model.recoveries) >= 1
        # The next sequence runs on the new plan.
        again = [r.token for r in mlx_dist.stream_generate(model, tok, PROMPTS[0], max_tokens=20)]
        assert again == reference[PROMPTS[0]][1][:20]
    finally:
        for w in workers:
            w.stop()


def test_restarted_worker_is_used_again(model_path, reference, tmp_path):
    workers = start_workers(3, tmp_path)
    try:
        model, tok = mlx_dist.load(
            str(model_path), workers=[w.address for w in workers], strategy="uniform"
        )
        text, tokens = _stream_and_kill(model, tok, PROMPTS[1], 30, workers[2].restart)
        assert (text, tokens) == reference[PROMPTS[1]]
        assert model.epoch >= 1
        # Same address, fresh process: it holds a stage of the new plan.
        assert sorted(model.workers) == sorted(w.address for w in workers)
        assert model.excluded == []
    finally:
        for w in workers:
            w.stop()


def test_two_sequences_in_flight_both_survive(model_path, reference, tmp_path):
    workers = start_workers(3, tmp_path)
    try:
        model, tok = mlx_dist.load(
            str(model_path), workers=[w.address for w in workers], strategy="uniform"
        )
        got: dict = {}
        progress = threading.Semaphore(0)

        def run(p):
            tokens = []
            for r in mlx_dist.stream_generate(model, tok, p, max_tokens=N):
                tokens.append(r.token)
                if len(tokens) == 25:
                    progress.release()
            got[p] = tokens

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for _ in PROMPTS:
            assert progress.acquire(timeout=60)
        workers[0].kill()  # the first stage, which holds the embedding
        for t in threads:
            t.join(120)
        assert got == {p: reference[p][1] for p in PROMPTS}
    finally:
        for w in workers:
            w.stop()


# A coordinator whose step deadline is 0.3 s (plus 0.1 s a token): it reads
# 20 tokens, says "paused?" and waits for the test to freeze a worker, then
# reads on. The deadline is read once per process, hence a process of its own.
_FROZEN_RUN = """
import json, sys, time, mlx_dist
path, addrs, recover, prompt = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1", sys.argv[4]
model, tok = mlx_dist.load(path, workers=addrs, strategy="uniform", recover=recover)
tokens, error, paused = [], None, None
try:
    for r in mlx_dist.stream_generate(model, tok, prompt, max_tokens=int(sys.argv[5])):
        tokens.append(r.token)
        if len(tokens) == 20:
            print("paused?", flush=True)
            sys.stdin.readline()
            paused = time.monotonic()
except Exception as e:
    error = str(e)
print(json.dumps({"tokens": tokens, "recoveries": len(model.recoveries), "error": error,
                  "after_pause": time.monotonic() - paused if paused else None}), flush=True)
"""


def _frozen_run(model_path, workers, recover: bool, freeze) -> dict:
    """Runs `_FROZEN_RUN` over `workers`; `freeze()` runs at its pause."""
    env = dict(os.environ, MLX_DIST_STEP_TIMEOUT="0.3", MLX_DIST_LOG="warn")
    args = [str(model_path), ",".join(w.address for w in workers), "1" if recover else "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_RUN, *args, PROMPTS[0], str(N)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "paused?"
        freeze()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return json.loads(out.splitlines()[-1])


def test_a_stage_busy_past_the_step_deadline_is_waited_for(model_path, reference, tmp_path):
    """A worker that stops for longer than a step's deadline but answers a
    health check when asked (a GPU compiling kernels for a new shape, a long
    prompt ahead of the step) is slow, not failed: no re-plan, same tokens."""
    workers = start_workers(3, tmp_path)
    try:

        def freeze():
            workers[1].pause()
            # Past the 0.4 s deadline of a decode step, within the 2 s a
            # stage has to answer the health check sent then.
            threading.Timer(1.2, workers[1].resume).start()

        got = _frozen_run(model_path, workers, True, freeze)
        assert got["error"] is None
        assert got["recoveries"] == 0
        assert got["tokens"] == reference[PROMPTS[0]][1]
        assert got["after_pause"] >= 1.0
    finally:
        for w in workers:
            w.stop()


def test_a_stage_that_answers_nothing_fails_the_step(model_path, tmp_path):
    """A worker frozen for good (alive, answering nothing) fails the step
    within its deadline plus the health check's 2 s, naming the worker."""
    workers = start_workers(3, tmp_path)
    try:
        got = _frozen_run(model_path, workers, False, workers[1].pause)
        assert got["error"] is not None
        assert workers[1].address in got["error"]
        assert got["after_pause"] < 10
    finally:
        for w in workers:
            w.stop()


def _chat_stream(url: str, prompt: str, on_chunk=None) -> tuple[str, str | None, str]:
    """(text, finish_reason, raw body) of a streamed completion."""
    text, finish, raw = "", None, ""
    body = {"prompt": prompt, "max_tokens": N, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for i, line in enumerate(r.iter_lines()):
            raw += line + "\n"
            if on_chunk is not None:
                on_chunk(i)
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for c in data.get("choices", []):
                text += c["text"]
                finish = c["finish_reason"] or finish
    return text, finish, raw


def test_server_stream_survives_a_killed_worker(model_path, reference, tmp_path):
    workers = start_workers(3, tmp_path)
    server = ServerProcess(
        tmp_path,
        "--model",
        str(model_path),
        "--workers",
        ",".join(w.address for w in workers),
        "--strategy",
        "uniform",
    )
    try:

        def kill_at(i):
            if i == 60:
                workers[1].kill()

        text, finish, raw = _chat_stream(server.url, PROMPTS[0], kill_at)
        assert '"error"' not in raw
        assert text == reference[PROMPTS[0]][0]
        assert finish == "length"
        status = httpx.get(f"{server.url}/cluster/status").json()
        assert status["epoch"] >= 1
        assert status["excluded"] == [workers[1].address]
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
        for w in workers:
            w.stop()


def test_no_capacity_is_a_clean_error_and_the_server_recovers(model_path, reference, tmp_path):
    local, _ = mlx_dist.load(str(model_path))
    # Each worker may use 70% of what the model needs: both are needed. (A
    # plan keeps 10% and 256 MiB of each device for activations.)
    gb = (local.nbytes * 0.7 + (256 << 20)) / 0.9 / (1 << 30)
    workers = start_workers(2, tmp_path)
    config = tmp_path / "cluster.json"
    config.write_text(
        json.dumps(
            {
                "kv_tokens": 8,
                "workers": [{"address": w.address, "memory_gb": gb} for w in workers],
            }
        )
    )
    server = ServerProcess(
        tmp_path,
        "--model",
        str(model_path),
        "--cluster-config",
        str(config),
        "--strategy",
        "uniform",
        "--recovery-wait",
        "3",
    )
    try:
        workers[1].kill()
        started = time.monotonic()
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": PROMPTS[0], "max_tokens": 5},
            timeout=60,
        )
        assert r.status_code == 503, r.text
        assert "could not recover" in r.json()["error"]["message"]
        assert time.monotonic() - started < 20
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
        # Capacity returns: the next request is answered.
        workers[1].restart()
        r = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": PROMPTS[0], "max_tokens": 5},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        model, tok = mlx_dist.load(str(model_path))
        want = mlx_dist.generate(model, tok, PROMPTS[0], max_tokens=5)
        assert r.json()["choices"][0]["text"] == want
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    finally:
        server.stop()
        for w in workers:
            w.stop()


def test_a_worker_announces_itself_and_joins_the_plan(model_path, reference, tmp_path):
    from cluster_utils import WorkerProcess

    first = start_workers(1, tmp_path, "--token", "club")
    server = ServerProcess(
        tmp_path,
        "--model",
        str(model_path),
        "--workers",
        first[0].address,
        "--strategy",
        "uniform",
        "--token",
        "club",
    )
    joined = None
    try:
        joined = WorkerProcess("late", tmp_path, "--coordinator", server.url, "--token", "club")
        status = f"{server.url}/cluster/status"
        deadline = time.monotonic() + 30
        while len(httpx.get(status).json()["plan"]["stages"]) < 2:
            assert time.monotonic() < deadline, httpx.get(status).text
            time.sleep(0.2)
        body = httpx.get(status).json()
        assert joined.address in body["workers"]
        assert [d["address"] for d in body["devices"]] == [first[0].address, joined.address]
        # Without the cluster token, joining is refused.
        r = httpx.post(f"{server.url}/cluster/join", json={"address": "10.0.0.1:1"})
        assert r.status_code == 401
        text, _, raw = _chat_stream(server.url, PROMPTS[1])
        assert text == reference[PROMPTS[1]][0], raw[-500:]
    finally:
        server.stop()
        for w in [*first, joined]:
            if w is not None:
                w.stop()
