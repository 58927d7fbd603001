"""Who may add a worker: /cluster/join needs the cluster token or an
explicit opt-in, refuses an address where no worker answers, and starts
at most one re-plan per join interval. Run in this process against a
stand-in for the cluster (the real join: test_recovery.py)."""

from __future__ import annotations

import time

import pytest
from cluster_utils import WorkerProcess
from fastapi.testclient import TestClient
from mlx_dist.server import ServerSettings, ServerState, create_app
from server_utils import free_port


class FakeCluster:
    def __init__(self):
        self.all_workers: list[str] = []

    def add_worker(self, address: str) -> bool:
        self.all_workers.append(address)
        return True


class JoinState(ServerState):
    """A server over workers, without any: a stand-in cluster, re-plans counted."""

    over_workers = True
    distributed = False

    def __init__(self, settings: ServerSettings):
        super().__init__(settings)
        self.engine = object()  # ready
        self.model = type("M", (), {"_core": FakeCluster(), "excluded": []})()
        self.replans: list[str] = []

    def replan_soon(self, reason: str) -> None:
        self.replans.append(reason)


@pytest.fixture
def joining(monkeypatch):
    monkeypatch.delenv("MLX_DIST_TOKEN", raising=False)

    def make(**settings) -> tuple[TestClient, JoinState]:
        state = JoinState(ServerSettings(**settings))
        return TestClient(create_app(state.settings, state)), state

    return make


def test_joining_is_off_without_a_token_or_the_opt_in(joining):
    client, state = joining()
    r = client.post("/cluster/join", json={"address": "127.0.0.1:7470"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "join_not_allowed"
    assert "--allow-join" in r.json()["error"]["message"]
    assert state.model._core.all_workers == [] and state.replans == []


def test_an_address_where_no_worker_answers_is_not_added(joining):
    client, state = joining(allow_join=True)
    closed = free_port()
    for address in (f"127.0.0.1:{closed}", "no port", "127.0.0.1:99999"):
        r = client.post("/cluster/join", json={"address": address})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "address"
    r = client.post("/cluster/join", json={"address": f"127.0.0.1:{closed}"})
    assert f"no worker answers at 127.0.0.1:{closed}" in r.json()["error"]["message"]
    assert state.model._core.all_workers == [] and state.replans == []


def test_with_a_cluster_token_joining_needs_it(joining):
    client, _ = joining(token="club")
    r = client.post("/cluster/join", json={"address": "127.0.0.1:1"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    r = client.post(
        "/cluster/join", json={"address": "127.0.0.1:1"}, headers={"X-MLX-Dist-Token": "club"}
    )
    # Past the token: the probe finds no worker there.
    assert r.status_code == 400 and "no worker answers" in r.json()["error"]["message"]


def test_joins_start_at_most_one_replan_per_interval(joining, tmp_path):
    worker = WorkerProcess("joiner", tmp_path)
    try:
        client, state = joining(allow_join=True, join_interval=1.0)
        r = client.post("/cluster/join", json={"address": worker.address})
        assert r.status_code == 200, r.text
        assert r.json()["added"] is True and r.json()["replan_in_seconds"] == 0
        assert state.model._core.all_workers == [worker.address]
        assert len(state.replans) == 1
        # Two more within the interval: one re-plan, at its end, takes both.
        for _ in range(2):
            r = client.post("/cluster/join", json={"address": worker.address})
            assert r.status_code == 200, r.text
            assert 0 < r.json()["replan_in_seconds"] <= 1.0
        assert len(state.replans) == 1
        deadline = time.monotonic() + 10
        while len(state.replans) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert len(state.replans) == 2
    finally:
        worker.stop()
