"""The worker inside the serving process (one device, batched): its errors
name it `local`, never by its internal loopback address."""

from __future__ import annotations

import mlx_dist
import pytest
from mlx_dist import _core


def test_errors_of_the_in_process_worker_do_not_show_its_address(tiny_model):
    path = str(tiny_model("llama"))
    address = _core.start_local_worker()
    try:
        # As `mlx-dist serve` loads a model on one device.
        model, tok = mlx_dist.load(path, workers=[address], strategy="uniform", recover=False)
        assert model._core.names == ["local"]
        ids = tok.encode("the old lighthouse stood at the end of the harbour")
        g = _core.Generation(model._core, tok._core, ids, max_tokens=40, logprobs=False)
        next(g)
        # Loading the model again drops the sequences the worker holds: the
        # running one fails at its next step, and the error names the worker.
        mlx_dist.load(path, workers=[address], strategy="uniform", recover=False)
        with pytest.raises(ConnectionError) as failed:
            list(g)
        message = str(failed.value)
        assert "worker local" in message, message
        assert address not in message and "127.0.0.1" not in message, message
    finally:
        _core.stop_local_worker(address)
        # `start_local_worker` made up a cluster token for this process.
        _core.set_cluster_token(None)
