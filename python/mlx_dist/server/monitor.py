"""The health monitor: between requests, a stage that stops answering
gets the model re-planned without it before the next request needs it,
and a worker left out that answers again is taken back."""

from __future__ import annotations

import asyncio
import sys

from mlx_dist.server.state import ServerState


async def monitor(state: ServerState) -> None:
    """Checks the workers every ``health_interval`` seconds, for ever."""
    interval = state.settings.health_interval
    while True:
        await asyncio.sleep(interval)
        if state.engine.active:
            # Running sequences notice a failure themselves (their streams
            # break or miss their deadline); a probe now could wait behind
            # a long step and misread a busy worker as a dead one.
            continue
        try:
            down = [w for w in await state.workers(timeout=interval) if not w["reachable"]]
            if down:
                names = ", ".join(f"{w['name']} ({w['address']})" for w in down)
                state.replan_soon(f"no answer to health checks from {names}")
            elif await asyncio.to_thread(state.excluded_back):
                state.replan_soon("a worker left out of the plan answers again")
        except (ConnectionError, ValueError, RuntimeError, OSError) as e:
            print(f"mlx-dist: health check failed: {e}", file=sys.stderr, flush=True)
