"""Starting worker processes on loopback ports for tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class WorkerProcess:
    def __init__(self, name: str, log_dir: Path, *args: str, port: int = 0):
        self.name = name
        self.log_dir = log_dir
        self.args = args
        self.log = log_dir / f"{name}.log"
        self._launch(port)

    def _launch(self, port: int) -> None:
        env = dict(
            os.environ, MLX_DIST_CACHE=str(self.log_dir / f"cache-{self.name}"), MLX_DIST_LOG="info"
        )
        cmd = [sys.executable, "-m", "mlx_dist.cli", "worker", "--port", str(port)]
        cmd += ["--name", self.name, *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log.open("ab"), env=env, text=True
        )
        self.address = self._wait_listening()

    def restart(self) -> None:
        """A fresh process (no model loaded) on the same address."""
        self.stop()
        self._launch(int(self.address.rsplit(":", 1)[1]))

    def _wait_listening(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("listening on "):
                    return line.split()[-1]
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        raise RuntimeError(f"worker {self.name} did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """Freezes the process (SIGSTOP): alive, but answering nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_workers(n: int, log_dir: Path, *args: str, prefix: str = "w") -> list[WorkerProcess]:
    return [WorkerProcess(f"{prefix}{i}", log_dir, *args) for i in range(n)]


def together(calls, timeout: float = 120.0) -> list:
    """Calls every function in `calls` at once (one thread each, released
    together); their results, in order (None for one still running)."""
    got: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        got[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return got
