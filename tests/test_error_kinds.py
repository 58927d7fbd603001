"""Error classification: a TLS mismatch, a dead stage and a full KV budget
each reach Python as their own exception class (the stage it was named in
attributes) and HTTP as their own status, by class, with no message text
parsed anywhere on the way."""

from __future__ import annotations

import mlx_dist
import pytest
from cluster_utils import start_workers
from fastapi.testclient import TestClient
from mlx_dist import _core
from mlx_dist.engine import Failed
from mlx_dist.server import ServerSettings, create_app
from test_server_http import FakeState

PROMPT = "the old lighthouse stood at the end of the harbour"
BUDGET_MB = 2


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("qwen3", num_layers=4)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two plain workers, each with a KV budget of 2 MiB."""
    procs = start_workers(
        2, tmp_path_factory.mktemp("error-kinds"), "--kv-budget-mb", str(BUDGET_MB), prefix="e"
    )
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(autouse=True)
def plain_afterwards():
    """The CA setting is process-wide: every test leaves it off."""
    yield
    _core.set_tls_ca(None)


def http_answer(error: BaseException) -> tuple[int, str, str | None]:
    """(status, code, Retry-After) of a completion whose generation fails
    with `error`, through the server's routes and handlers."""
    state = FakeState(ServerSettings())
    state.engine.script = lambda job: [Failed(error)]
    client = TestClient(create_app(state.settings, state), raise_server_exceptions=False)
    r = client.post("/v1/completions", json={"prompt": "x"})
    return r.status_code, r.json()["error"]["code"], r.headers.get("retry-after")


def test_a_tls_mismatch_is_a_tls_error_and_a_502(model_path, workers, tmp_path):
    """A client that speaks TLS to plain workers."""
    cert, _ = _core.make_certificate(["127.0.0.1"])
    ca = tmp_path / "ca.pem"
    ca.write_text(cert)
    addrs = [w.address for w in workers]
    with pytest.raises(_core.TlsError) as e:
        mlx_dist.load(str(model_path), workers=addrs, tls_ca=str(ca), connect_timeout=3.0)
    assert e.value.address in addrs, e.value.address
    # Still what callers catching ConnectionError expect.
    assert isinstance(e.value, (_core.WorkerError, ConnectionError))
    with pytest.raises(_core.TlsError) as info:
        _core.worker_info(addrs[0])
    assert info.value.address == addrs[0]
    assert http_answer(e.value) == (502, "worker_tls_mismatch", None)


def test_a_dead_stage_is_a_worker_error_naming_it_and_a_503(model_path, workers):
    """The last stage killed mid-generation, recovery off: the error names
    it (found by the stage before it, which relays that it failed)."""
    addrs = [w.address for w in workers]
    model, tok = mlx_dist.load(str(model_path), workers=addrs, strategy="uniform", recover=False)
    stream = mlx_dist.stream_generate(model, tok, PROMPT, max_tokens=200)
    next(stream)
    dead = workers[1]
    dead.kill()
    try:
        with pytest.raises(_core.WorkerError) as e:
            for _ in stream:
                pass
        assert not isinstance(e.value, (_core.TlsError, _core.NotReadyError)), e.value
        assert (e.value.stage, e.value.address) == (dead.name, dead.address), e.value
        assert http_answer(e.value) == (503, "worker_unavailable", "5")
    finally:
        dead.restart()


def test_a_full_kv_budget_is_kv_budget_full_and_a_429(model_path, workers):
    """One worker, 2 MiB of KV cache. A sequence over the whole budget is
    KvBudgetExceeded (413, never fits); two that each fit alone but not
    together: the second is KvBudgetFull (429, for now), until the first
    ends."""
    model, tok = mlx_dist.load(str(model_path), workers=[workers[0].address])
    ids = tok.encode(PROMPT)
    with pytest.raises(_core.KvBudgetExceeded) as over:
        next(mlx_dist.stream_generate(model, tok, ids, max_tokens=30_000))
    assert isinstance(over.value, _core.CapacityError)
    assert over.value.budget_bytes == BUDGET_MB << 20
    assert http_answer(over.value) == (413, "insufficient_capacity", None)

    # The bytes of one token's KV cache, from the figures of the refusal.
    per_token = over.value.need_bytes // (len(ids) + 30_000)
    # The longest sequence that fits alone (caches grow 256 positions at a
    # time); two of them do not fit together.
    length = 256 * (over.value.budget_bytes // (256 * per_token))
    assert 2 * length * per_token > over.value.budget_bytes
    first = mlx_dist.stream_generate(model, tok, ids, max_tokens=length - len(ids))
    next(first)
    with pytest.raises(_core.KvBudgetFull) as full:
        next(mlx_dist.stream_generate(model, tok, ids, max_tokens=length - len(ids)))
    assert isinstance(full.value, MemoryError)
    assert not isinstance(full.value, _core.CapacityError)
    assert http_answer(full.value) == (429, "kv_cache_full", "1")
    # Room again once the first ends.
    first.close()
    assert len(list(mlx_dist.stream_generate(model, tok, ids, max_tokens=4))) == 4
