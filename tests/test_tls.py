"""Workers serving TLS (certificates from `mlx-dist cert`), and the limits a
worker puts on what it takes."""

from __future__ import annotations

import stat
import subprocess
import sys
import time

import mlx_dist
import pytest
from cluster_utils import start_workers
from mlx_dist import _core

PROMPT = "the quick brown fox jumps over the lazy dog"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def greedy(model, tok, ids, n=16):
    return [r.token for r in mlx_dist.stream_generate(model, tok, ids, max_tokens=n)]


@pytest.fixture(autouse=True)
def plain_afterwards():
    """The CA setting is process-wide: every test leaves it off."""
    _core.set_tls_ca(None)
    yield
    _core.set_tls_ca(None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two certificates for 127.0.0.1 and localhost: the workers' and another."""
    root = tmp_path_factory.mktemp("certs")
    for name in ("ours", "other"):
        r = cli("cert", "--out", str(root / name), "--hosts", "127.0.0.1,localhost")
        assert r.returncode == 0, r.stderr
        assert "cert.pem" in r.stdout
    return root / "ours", root / "other"


@pytest.fixture(scope="module")
def tls_workers(certs, tmp_path_factory):
    ours, _ = certs
    cert, key = str(ours / "cert.pem"), str(ours / "key.pem")
    procs = start_workers(
        2,
        tmp_path_factory.mktemp("tls-workers"),
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-ca",
        cert,
    )
    yield procs
    for p in procs:
        p.stop()


def test_cert_writes_a_certificate_and_a_private_key(certs, tmp_path):
    ours, _ = certs
    cert = (ours / "cert.pem").read_text()
    assert cert.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" in (ours / "key.pem").read_text()
    assert stat.S_IMODE((ours / "key.pem").stat().st_mode) == 0o600
    # Existing files stay unless --force.
    r = cli("cert", "--out", str(ours), "--hosts", "localhost")
    assert r.returncode == 1 and "--force" in r.stderr
    assert (ours / "cert.pem").read_text() == cert
    for hosts in (",", " ", "not a host!"):
        r = cli("cert", "--out", str(tmp_path / "x"), "--hosts", hosts)
        assert r.returncode == 1, hosts
        assert "mlx-dist: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ValueError, match="at least one"):
        _core.make_certificate([])
    pem, key = _core.make_certificate(["10.1.2.3", "node-1.local"])
    assert pem != cert and "PRIVATE KEY" in key
    with pytest.raises(ValueError, match="certificate"):
        _core.set_tls_ca("not a certificate")


def test_split_over_tls_equals_local(tiny_model, tls_workers, certs):
    ours, _ = certs
    path = tiny_model("qwen3", num_layers=4)
    local, tok = mlx_dist.load(str(path))
    ids = tok.encode(PROMPT)
    want = greedy(local, tok, ids)
    addrs = [w.address for w in tls_workers]
    model, dtok = mlx_dist.load(
        str(path), workers=addrs, strategy="uniform", tls_ca=str(ours / "cert.pem")
    )
    assert len(model.plan_dict["stages"]) == 2
    assert greedy(model, dtok, ids) == want
    # Other calls take the same setting; the certificate names localhost too.
    assert _core.worker_info(addrs[0])["device"]["name"]
    port = addrs[1].rsplit(":", 1)[1]
    assert _core.worker_info(f"localhost:{port}")["device"]["name"]


@pytest.mark.parametrize("ca", ["none", "other"])
def test_clients_without_the_workers_ca_are_refused_quickly(tiny_model, tls_workers, certs, ca):
    _, other = certs
    path = tiny_model("qwen3", num_layers=4)
    addrs = [w.address for w in tls_workers]
    tls_ca = None if ca == "none" else str(other / "cert.pem")
    t0 = time.monotonic()
    with pytest.raises(_core.TlsError) as e:
        mlx_dist.load(str(path), workers=addrs, tls_ca=tls_ca, connect_timeout=3.0)
    assert time.monotonic() - t0 < 10
    # Its own class, naming the worker; still a ConnectionError.
    assert e.value.address in addrs and isinstance(e.value, ConnectionError)
    msg = str(e.value)
    assert any(a in msg for a in addrs), msg
    assert ("TLS" if ca == "none" else "certificate") in msg, msg
    t0 = time.monotonic()
    with pytest.raises(_core.TlsError, match=addrs[0]):
        _core.worker_info(addrs[0])
    assert time.monotonic() - t0 < 5


def test_a_worker_refuses_a_key_of_another_certificate(certs, tmp_path):
    ours, other = certs
    with pytest.raises(RuntimeError, match="does not belong"):
        start_workers(
            1,
            tmp_path,
            "--tls-cert",
            str(ours / "cert.pem"),
            "--tls-key",
            str(other / "key.pem"),
        )
    r = cli("worker", "--port", "0", "--tls-cert", str(ours / "cert.pem"))
    assert r.returncode == 1 and "--tls-key" in r.stderr


def test_a_sequence_beyond_max_sequences_is_refused(tiny_model, tmp_path):
    path = tiny_model("qwen3", num_layers=4)
    procs = start_workers(2, tmp_path, "--max-sequences", "1", "--max-message-mb", "8")
    try:
        model, tok = mlx_dist.load(str(path), workers=[p.address for p in procs])
        ids = tok.encode(PROMPT)
        first = mlx_dist.stream_generate(model, tok, ids, max_tokens=8)
        next(first)
        # Full for now, not out of memory: its own class, which the server's
        # engine waits on.
        with pytest.raises(_core.KvBudgetFull, match="max-sequences"):
            next(mlx_dist.stream_generate(model, tok, ids, max_tokens=8))
        first.close()
        # Once the first sequence ends there is room again.
        assert len(greedy(model, tok, ids, 4)) == 4
    finally:
        for p in procs:
            p.stop()
