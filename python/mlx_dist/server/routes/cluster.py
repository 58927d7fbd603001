"""The cluster: ``/health``, ``/cluster/status``, ``/cluster/join``, ``/metrics``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from mlx_dist.server.errors import APIError, bad, responses
from mlx_dist.server.middleware import has_key
from mlx_dist.server.routes.deps import Ready, State
from mlx_dist.server.schemas import JoinRequest
from mlx_dist.server.validation import check_text

# Seconds a joining worker has to answer before it is refused.
_JOIN_PROBE_S = 3.0

router = APIRouter()


@router.get("/health", responses=responses(503))
async def health(request: Request, st: State):
    """200 when every stage answers, else 503. With an API key set, the
    details (model, workers, their devices) only for a caller sending it."""
    if not st.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    workers = await st.workers(timeout=2.0) if st.distributed else []
    ok = all(w["reachable"] for w in workers)
    code = 200 if ok else 503
    body: dict[str, Any] = {"status": "ok" if ok else "degraded"}
    key = st.settings.api_key
    if key and not has_key(dict(request.scope["headers"]), key):
        return JSONResponse(body, status_code=code)
    body.update(model=st.name, workers=workers)
    if st.distributed:
        body["excluded"] = st.excluded
    return JSONResponse(body, status_code=code)


@router.post("/cluster/join", responses=responses(400, 401, 403, 413, 422, 503))
async def cluster_join(req: JoinRequest, st: Ready):
    """A worker announces itself (``mlx-dist worker --coordinator``). It
    needs the cluster token when one is set, else the ``allow_join``
    setting; the address must answer as a worker; re-plans for joins
    start at most once every ``join_interval`` seconds."""
    check_text(req.address, "address")
    if not st.over_workers:
        raise bad("this server runs the model on one device: it takes no workers")
    if not st.cluster_token and not st.settings.allow_join:
        raise APIError(
            403,
            "joining is off: give the cluster a token (--token, sent by the workers) "
            "or start the server with --allow-join",
            code="join_not_allowed",
        )
    address = req.address.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise bad(f"bad worker address {address!r}: expected host:port", "address")
    try:
        await asyncio.to_thread(st.probe_worker, address, _JOIN_PROBE_S)
    except (ConnectionError, ValueError, RuntimeError, OSError) as e:
        raise bad(f"no worker answers at {address}: {e}", "address") from None
    try:
        added = await asyncio.to_thread(st.add_worker, address)
    except ValueError as e:
        raise bad(str(e), "address") from None
    wait = None
    if added or address in st.excluded:
        # The next plan uses it; sequences running replay onto it.
        wait = st.replan_for_join(f"worker {address} announced itself")
    return {
        "address": address,
        "added": added,
        "workers": st.all_workers,
        "replan_in_seconds": wait,
    }


@router.get("/cluster/status", responses=responses(401, 503))
async def cluster_status(st: Ready):
    return await st.cluster_status()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **responses(401),
    },
)
async def metrics(st: State):
    if st.ready:
        try:
            st.metrics.stages({"devices": await st.devices()}, time.monotonic())
        except (ConnectionError, ValueError, RuntimeError, OSError):
            pass  # the request figures still answer
    return Response(st.metrics.render(), media_type=st.metrics.content_type)
