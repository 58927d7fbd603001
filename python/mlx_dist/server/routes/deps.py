"""What routes depend on: the server's state (``Depends(ready_state)``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from mlx_dist.server.state import ServerState


def server_state(request: Request) -> ServerState:
    """The state of the application serving ``request`` (made on first use)."""
    return request.app.state.server_state()


def ready_state(state: Annotated[ServerState, Depends(server_state)]) -> ServerState:
    """The state, once the model is loaded (else a 503)."""
    state.check_ready()
    return state


State = Annotated[ServerState, Depends(server_state)]
Ready = Annotated[ServerState, Depends(ready_state)]
