"""`mlx-dist top`: rates from counter snapshots, rendering, and the live
screen captured in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import httpx
import pyte
from cluster_utils import start_workers
from mlx_dist.dashboard import Rates, human, render
from server_utils import ServerProcess


def _status(busy, uptime, tokens, steps, reachable=True):
    info = {
        "device": {"name": "w0", "memory_total": 24_000_000_000},
        "memory": {"active": 65_100_000},
        "engine": {
            "busy_micros": busy,
            "tokens_processed": tokens,
            "steps": steps,
            "sequences": 2,
            "batches": 4,
            "batched_steps": 10,
        },
        "uptime_micros": uptime,
    }
    dev = {"stage": 0, "name": "w0", "address": "h:1", "layers": [0, 2], "reachable": reachable}
    if reachable:
        dev["info"] = info
    else:
        dev["error"] = "connection refused"
    return {"model": "m", "model_type": "qwen3", "engine": {}, "devices": [dev]}


def test_rates_come_from_two_snapshots():
    r = Rates()
    assert r.update(_status(0, 1_000_000, 0, 0), now=10.0) == {}
    got = r.update(_status(250_000, 2_000_000, 50, 25), now=11.0)["h:1"]
    assert got["busy"] == 0.25
    assert got["tokens_per_s"] == 50
    assert got["ms_per_step"] == 10.0
    # A restarted worker (its uptime went back) gives no rate.
    assert r.update(_status(0, 500_000, 0, 0), now=12.0) == {}


def test_render_shows_figures_and_down_devices():
    r = Rates()
    r.update(_status(0, 1_000_000, 0, 0), now=0.0)
    rates = r.update(_status(500_000, 2_000_000, 100, 10), now=1.0)
    screen = render(_status(500_000, 2_000_000, 100, 10), rates, "http://x", 120)
    assert "0..2" in screen and "50%" in screen and "100.0" in screen
    assert "65.1 MB / 24.0 GB" in screen and "2.5" in screen and " ok" in screen
    down = render(_status(0, 0, 0, 0, reachable=False), {}, "http://x", 120)
    assert "DOWN" in down and "connection refused" in down
    busy = _status(0, 0, 0, 0)
    busy["devices"][0]["info"]["busy_for_micros"] = 41_500_000
    assert "busy 42s" in render(busy, {}, "http://x", 120)
    assert "no answer: refused" in render(None, {}, "http://x", 120, "refused")
    assert human(1_500) == "1.5 KB"
    assert all(len(line) <= 40 for line in render(_status(0, 1, 0, 0), {}, "u", 40).splitlines())


def _screen(url: str, iterations: int, size: bool = True) -> tuple[list[str], int]:
    """Runs `mlx-dist top` in a 120x30 pseudo-terminal; its last screen.
    Without `size`, the terminal reports no size (0 columns)."""
    master, slave = pty.openpty()
    if size:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    cmd = [sys.executable, "-m", "mlx_dist.cli", "top", url, "--interval", "0.5"]
    proc = subprocess.Popen(
        [*cmd, "--iterations", str(iterations)], stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    screen = pyte.Screen(120, 30)
    stream = pyte.ByteStream(screen)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            stream.feed(data)
        elif proc.poll() is not None:
            break
    rc = proc.wait(10)
    os.close(master)
    return list(screen.display), rc


def test_top_renders_the_live_cluster_in_a_terminal(tiny_model, tmp_path):
    path = tiny_model("qwen3", num_layers=4)
    workers = start_workers(2, tmp_path, prefix="top")
    server = ServerProcess(
        tmp_path,
        "--model",
        str(path),
        "--workers",
        ",".join(w.address for w in workers),
        "--strategy",
        "uniform",
    )
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
            httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

    t = threading.Thread(target=load, daemon=True)
    try:
        t.start()
        time.sleep(1)
        lines, rc = _screen(server.url, 4)
        text = "\n".join(lines)
        assert rc == 0, text
        assert "top0" in text and "top1" in text, text
        assert "0..2" in text and "2..4" in text, text
        rows = [line for line in lines if line.startswith(("0 ", "1 "))]
        assert len(rows) == 2 and all(line.rstrip().endswith("ok") for line in rows), text
        assert " MB / " in text, text
        # Tokens/s of at least one stage moved while requests ran.
        assert any(float(line.split()[-4]) > 0 for line in rows if line.split()[-4] != "-"), text
        # With the workers gone, it still draws (showing them down) and exits cleanly.
        stop.set()
        t.join(60)
        for w in workers:
            w.kill()
        lines, rc = _screen(server.url, 2)
        assert rc == 0 and "DOWN" in "\n".join(lines), "\n".join(lines)
    finally:
        stop.set()
        server.stop()
        for w in workers:
            w.stop()
    # Nobody listening: an error on screen, not a crash.
    lines, rc = _screen("http://127.0.0.1:9", 2)
    assert rc == 0 and "no answer" in "\n".join(lines)


def _one_answer_server(answer: bytes) -> tuple[str, threading.Event]:
    """A loopback TCP server that answers every connection with `answer`."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(answer)
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", done


def test_top_survives_servers_that_answer_garbage():
    body = b'{"devices": "x"}'
    wrong_shape = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for answer, shown in [(b"garbage\r\n\r\n", "no answer"), (wrong_shape, "unexpected status")]:
        url, done = _one_answer_server(answer)
        try:
            lines, rc = _screen(url, 2)
        finally:
            done.set()
        assert rc == 0 and shown in "\n".join(lines), "\n".join(lines)


def test_top_draws_in_a_terminal_that_reports_no_size():
    lines, rc = _screen("http://127.0.0.1:9", 1, size=False)
    assert rc == 0 and "mlx-dist top" in "\n".join(lines)
