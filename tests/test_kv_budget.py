"""A sequence that needs more KV cache than a stage's whole budget fails at
once, with its own exception and the figures as numbers, even while other
sequences run; one that only waits for room is not refused."""

from __future__ import annotations

import threading
import time

import httpx
import mlx_dist
import pytest
from cluster_utils import start_workers
from mlx_dist import _core
from server_utils import ServerProcess

BUDGET_MB = 2


@pytest.fixture(scope="module")
def small_budget(tiny_model, tmp_path_factory):
    """A tiny model over one worker whose KV budget is 2 MiB."""
    path = tiny_model("qwen3", num_layers=4)
    logs = tmp_path_factory.mktemp("kv-budget")
    (worker,) = start_workers(1, logs, "--kv-budget-mb", str(BUDGET_MB))
    yield path, worker, logs
    worker.stop()


def test_a_sequence_over_the_whole_budget_gets_its_own_error(small_budget):
    path, worker, _ = small_budget
    model, tok = mlx_dist.load(str(path), workers=[worker.address])
    info = _core.worker_info(worker.address)
    assert info["engine"]["shard"], info
    ids = tok.encode("hello there")
    with pytest.raises(_core.KvBudgetExceeded) as e:
        list(mlx_dist.stream_generate(model, tok, ids, max_tokens=30_000))
    assert isinstance(e.value, _core.CapacityError) and isinstance(e.value, MemoryError)
    assert not isinstance(e.value, _core.KvBudgetFull)
    assert e.value.budget_bytes == BUDGET_MB << 20
    assert e.value.need_bytes > e.value.budget_bytes
    # A sequence that fits runs on the same worker afterwards.
    assert len(list(mlx_dist.stream_generate(model, tok, ids, max_tokens=8))) == 8


def test_the_server_refuses_it_at_once_while_another_streams(small_budget):
    path, worker, logs = small_budget
    server = ServerProcess(logs, "--model", str(path), "--workers", worker.address)
    try:
        url = f"{server.url}/v1/completions"
        done = {}

        def long_stream():
            body = {"prompt": "once upon a time", "max_tokens": 600, "stream": True}
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done["at"] = time.monotonic()

        t = threading.Thread(target=long_stream)
        t.start()
        # Wait until it runs, so that the refusal below is not an idle server's.
        started = time.monotonic()
        while httpx.get(f"{server.url}/cluster/status").json()["engine"]["active_sequences"] < 1:
            assert time.monotonic() - started < 60
            time.sleep(0.05)
        asked = time.monotonic()
        r = httpx.post(url, json={"prompt": "hello", "max_tokens": 2000}, timeout=60)
        answered = time.monotonic()
        t.join(120)
        assert r.status_code == 413, r.text
        assert "budget" in r.json()["error"]["message"]
        assert answered - asked < 5
        # Refused before the running stream ended, not after it.
        assert done["at"] > answered
    finally:
        server.stop()
