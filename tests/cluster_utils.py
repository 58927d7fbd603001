"""Starting worker processes on loopback ports for tests."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mlx_dist.bench import processes


class WorkerProcess:
    """`mlx-dist worker` on a loopback port, logging to `log_dir/NAME.log`."""

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
        self.process = processes.worker(
            self.name, *self.args, port=port, env=env, log=self.log, timeout=60.0
        )
        self.proc = self.process.proc
        self.address = self.process.address

    def restart(self) -> None:
        """A fresh process (no model loaded) on the same address."""
        self.stop()
        self._launch(int(self.address.rsplit(":", 1)[1]))

    def kill(self) -> None:
        self.process.kill()

    def pause(self) -> None:
        """Freezes the process (SIGSTOP): alive, but answering nothing."""
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def stop(self) -> None:
        self.process.stop(10)


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
