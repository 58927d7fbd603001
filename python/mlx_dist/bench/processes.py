"""Starting the worker and server processes that the benches and the tests
run: one helper starts a command, sends its stderr to a log file (or
nowhere), waits for its ``listening on ADDR`` line, keeps reading its stdout
so that the pipe never fills, and stops it."""

from __future__ import annotations

import collections
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import BinaryIO

from mlx_dist.announce import free_port as _free_port

LISTENING = "listening on "


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on `host`, for a process about to bind it."""
    return _free_port(host)


class Process:
    """`cmd` as a child process. Its stderr goes to `log` (a path, appended
    to; an open binary file; or None: nowhere). A thread reads its stdout
    all along and keeps the last lines in `lines`: a process whose stdout
    pipe is full blocks in its next print (uvicorn's access log did so
    after about a thousand requests, and froze the server).

    With `wait_listening`, waits up to `timeout` seconds for a stdout line
    ``listening on ADDR`` and sets `address` to ADDR; a process that exits
    or stays silent is stopped and raises an error ending with what it
    wrote."""

    def __init__(
        self,
        cmd: list[str],
        *,
        name: str = "process",
        log: Path | BinaryIO | None = None,
        env: dict | None = None,
        wait_listening: bool = True,
        timeout: float = 120.0,
    ):
        self.name = name
        self.cmd = list(cmd)
        self.log = log
        self.lines: collections.deque[str] = collections.deque(maxlen=1000)
        self.address: str | None = None
        self._settled = threading.Event()
        if isinstance(log, (str, Path)):
            self.log = Path(log)
            self.log.parent.mkdir(parents=True, exist_ok=True)
            err = self.log.open("ab")
        else:
            err = subprocess.DEVNULL if log is None else log
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                text=True,
                encoding="utf-8",
                errors="replace",
            )
        finally:
            if isinstance(self.log, Path):
                err.close()
        threading.Thread(target=self._drain, name=f"{name} stdout", daemon=True).start()
        if wait_listening:
            self.wait_listening(timeout)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.address is None and line.startswith(LISTENING):
                self.address = line.split()[-1]
                self._settled.set()
        self._settled.set()

    def wait_listening(self, timeout: float = 120.0) -> str:
        """The address of the process's ``listening on ADDR`` line, once
        it has written it."""
        if not self._settled.wait(timeout) or self.address is None:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.tail()}")
        return self.address

    def wait_healthy(self, url: str, timeout: float = 600.0) -> bool:
        """Whether ``GET url/health`` answered 200 within `timeout` seconds
        (False as soon as the process exits)."""
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return True
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.5)
        return False

    def tail(self, lines: int = 20) -> str:
        """The last `lines` lines the process wrote to its log (stdout's
        when it has no log file)."""
        text = ""
        if isinstance(self.log, Path):
            text = self.log.read_bytes()[-16384:].decode(errors="replace")
        elif self.log is not None:
            # pread: the child shares this file's offset.
            fd = self.log.fileno()
            size = os.fstat(fd).st_size
            text = os.pread(fd, min(size, 16384), max(size - 16384, 0)).decode(errors="replace")
        if not text.strip():
            text = "".join(self.lines)
        return "\n".join(text.strip().splitlines()[-lines:])

    def pause(self) -> None:
        """Freezes the process (SIGSTOP): alive, but answering nothing."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """Asks the process to end (SIGTERM; SIGCONT first, in case it is
        paused) without waiting."""
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Ends the process: SIGTERM, then SIGKILL if it still runs after
        `timeout` seconds."""
        self.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def stop_all(processes: list[Process], timeout: float = 15.0) -> None:
    """Stops every process, asking them all to end before waiting for any."""
    for p in processes:
        p.terminate()
    for p in processes:
        p.stop(timeout)


def worker(
    name: str,
    *args: str,
    port: int = 0,
    env: dict | None = None,
    log: Path | None = None,
    timeout: float = 120.0,
) -> Process:
    """``mlx-dist worker --name NAME --port PORT ARGS`` on loopback, once it
    listens (`address`)."""
    cmd = [sys.executable, "-m", "mlx_dist.cli", "worker", "--port", str(port), "--name", name]
    return Process([*cmd, *args], name=f"worker {name}", log=log, env=env, timeout=timeout)
