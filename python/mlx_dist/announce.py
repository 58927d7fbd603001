"""A worker telling a coordinator it is there (``mlx-dist worker
--coordinator URL``): once its port answers, it posts its address to the
server's ``/cluster/join``, which takes it into the next plan."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request


def free_port(host: str) -> int:
    """A port free now on `host` (the worker binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def advertised_address(host: str, port: int) -> str:
    """How others reach this worker: its host name when it listens on all
    interfaces."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=1):
            return True
    except OSError:
        return False


def announce(
    url: str, address: str, host: str, port: int, token: str | None, within: float = 120.0
) -> bool:
    """Waits for the worker to listen, then posts `address` to `url`,
    retrying with backoff for `within` seconds. Reports on stderr."""
    deadline = time.monotonic() + within
    while not _listening(host, port):
        if time.monotonic() > deadline:
            print(f"mlx-dist: not announced: port {port} never opened", file=sys.stderr)
            return False
        time.sleep(0.2)
    body = json.dumps({"address": address}).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-MLX-Dist-Token"] = token
    wait, last = 0.5, ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            url.rstrip("/") + "/cluster/join", data=body, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
            print(f"announced {address} to {url}", file=sys.stderr, flush=True)
            return True
        except urllib.error.HTTPError as e:
            last = f"{e.code}: {e.read()[:300].decode(errors='replace')}"
            if e.code in (400, 401, 403, 404):
                break  # retrying will not help (403: the server takes no joins)
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(wait)
        wait = min(wait * 2, 5.0)
    print(f"mlx-dist: could not announce {address} to {url}: {last}", file=sys.stderr)
    return False
