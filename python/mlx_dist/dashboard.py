"""``mlx-dist top``: a live terminal dashboard of a running server's
cluster, redrawn in place from ``GET /cluster/status``: per device the
layers it holds, memory, busy fraction, time per step, tokens/s, batch
size, sequences and health.

Rates (busy %, tokens/s) come from the difference between two successive
snapshots of the workers' counters, so the first frame shows "-"."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

from mlx_dist.rates import Rates


def fetch(url: str, api_key: str | None, timeout: float = 3.0) -> dict:
    req = urllib.request.Request(url.rstrip("/") + "/cluster/status")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = json.loads(r.read())
    if not isinstance(body, dict):
        raise TypeError("the server's status is not a JSON object")
    return body


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


COLUMNS = (
    ("stage", 5),
    ("device", 12),
    ("address", 21),
    ("layers", 9),
    ("memory", 21),
    ("busy", 6),
    ("ms/step", 8),
    ("tok/s", 9),
    ("batch", 6),
    ("seqs", 5),
    ("health", 8),
)


def _row(values: list[str]) -> str:
    return " ".join(
        v[:w].ljust(w) if i < 3 else v[:w].rjust(w)
        for i, (v, (_, w)) in enumerate(zip(values, COLUMNS, strict=True))
    )


def render(
    status: dict | None, rates: dict[str, dict], url: str, width: int, error: str = ""
) -> str:
    lines = [f"mlx-dist top  {url}  {time.strftime('%H:%M:%S')}"]
    if status is None:
        lines.append(f"no answer: {error}")
        return "\n".join(line[:width] for line in lines)
    engine = status.get("engine", {})
    total = sum(r["tokens_per_s"] for r in rates.values())
    lines.append(
        f"model {status.get('model', '?')} ({status.get('model_type', '?')})  "
        f"sequences {engine.get('active_sequences', 0)} running, {engine.get('queued', 0)} queued  "
        f"{total:.1f} tok/s through the stages"
        + (f"  re-plans {status['epoch']}" if status.get("epoch") else "")
    )
    if status.get("excluded"):
        lines.append(f"left out of the plan: {', '.join(status['excluded'])}")
    if error:
        lines.append(f"last refresh failed: {error}")
    lines.append("")
    lines.append(_row([name for name, _ in COLUMNS]))
    for d in status.get("devices", []):
        info = d.get("info") or {}
        figures = info.get("engine") or {}
        memory, device = info.get("memory") or {}, info.get("device") or {}
        key = str(d.get("address", d.get("name")))
        r = rates.get(key)
        layers = d.get("layers") or [None, None]
        batches = figures.get("batches") or 0
        step_ms = d.get("last_step_ms")
        if r and r["ms_per_step"] is not None:
            step_ms = r["ms_per_step"]
        ok = d.get("reachable", True)
        # Answering, but inside one long step or load (kernels compiling,
        # a long prompt): its other figures are from before it.
        busy_for = (info.get("busy_for_micros") or 0) / 1e6
        health = "DOWN" if not ok else f"busy {busy_for:.0f}s" if busy_for >= 1 else "ok"
        lines.append(
            _row(
                [
                    str(d.get("stage", "")),
                    str(d.get("name", device.get("name", "?"))),
                    str(d.get("address", "")),
                    f"{layers[0]}..{layers[1]}",
                    f"{human(memory.get('active'))} / {human(device.get('memory_total'))}"
                    if info
                    else "-",
                    f"{100 * r['busy']:.0f}%" if r else "-",
                    f"{step_ms:.2f}" if step_ms is not None else "-",
                    f"{r['tokens_per_s']:.1f}" if r else "-",
                    f"{figures.get('batched_steps', 0) / batches:.1f}" if batches else "-",
                    str(figures.get("sequences", "-")),
                    health,
                ]
            )
        )
        if not ok:
            lines.append(f"      {d.get('error', '')}")
    return "\n".join(line[:width] for line in lines)


def _width(out) -> int:
    """The terminal's width: asked of the terminal itself first ($COLUMNS
    may be stale or inherited)."""
    try:
        columns = os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    # A pty nobody sized reports 0 columns: fall back rather than draw blank lines.
    return columns or shutil.get_terminal_size((120, 30)).columns or 120


def main(args) -> int:
    # `mlx-dist top` fills both in from MLX_DIST_URL and MLX_DIST_API_KEY.
    url = args.url or "http://127.0.0.1:8100"
    key = args.api_key
    rates = Rates()
    frame = 0
    out = sys.stdout
    out.write("\x1b[?25l")  # hide the cursor while redrawing
    try:
        while args.iterations is None or frame < args.iterations:
            width = _width(out)
            try:
                status = fetch(url, key)
                screen = render(status, rates.update(status, time.monotonic()), url, width)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                # Down, refusing, or not speaking HTTP/JSON: say so and keep polling.
                screen = render(
                    None, {}, url, width, str(getattr(e, "reason", e)).strip() or repr(e)
                )
            except (AttributeError, TypeError, KeyError, IndexError) as e:
                # JSON of another shape (another service on that port?).
                screen = render(None, {}, url, width, f"unexpected status: {e!r}")
            out.write("\x1b[H\x1b[2J" + screen + "\n")
            out.flush()
            frame += 1
            if args.iterations is None or frame < args.iterations:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        out.write("\x1b[?25h")
        out.flush()
    return 0
