"""Starting `mlx-dist serve` (or uvicorn) processes on loopback ports for tests."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
from mlx_dist.bench.processes import Process, free_port

__all__ = ["ServerProcess", "free_port", "wait_ready"]


class ServerProcess:
    """`mlx-dist serve --port 0 ARGS`; `url` is where it listens once ready."""

    def __init__(self, log_dir: Path, *args: str, env: dict | None = None, name: str = "server"):
        self.log = log_dir / f"{name}.log"
        self.log.write_bytes(b"")
        cmd = [sys.executable, "-m", "mlx_dist.cli", "serve", "--port", "0", *args]
        self.process = Process(cmd, name=name, log=self.log, env=dict(os.environ, **(env or {})))
        self.proc = self.process.proc
        self.url = self.process.address
        wait_ready(self.url)

    @property
    def stdout(self) -> list[str]:
        """The last lines it wrote to stdout (its access log)."""
        return list(self.process.lines)

    def stop(self) -> None:
        self.process.stop()


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
