"""Starting `mlx-dist serve` (or uvicorn) processes on loopback ports for tests."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


class ServerProcess:
    """`mlx-dist serve --port 0 ARGS`; `url` is where it listens once ready."""

    def __init__(self, log_dir: Path, *args: str, env: dict | None = None, name: str = "server"):
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "mlx_dist.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            env=dict(os.environ, **(env or {})),
            text=True,
        )
        self.stdout: list[str] = []
        self.url = self._wait_listening()

    def _wait_listening(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                self.stdout.append(line)
                if line.startswith("listening on "):
                    url = line.split()[-1]
                    # Keep reading: uvicorn's access log goes to stdout, and a
                    # full pipe would block the server's event loop.
                    threading.Thread(target=self._read_stdout, daemon=True).start()
                    wait_ready(url)
                    return url
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        raise RuntimeError(f"the server did not start: {self.log.read_text()[-3000:]}")

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0, headers: dict | None = None) -> None:
    """Waits until GET /health answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became healthy")
