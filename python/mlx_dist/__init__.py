"""mlx-dist: run one large language model across several machines with MLX.

The Python API follows mlx-lm's: ``load`` -> ``(model, tokenizer)``, then
``generate`` / ``stream_generate`` with the same names and arguments.
"""

# Importing mlx.core first loads libmlx, which the native extension links to.
import mlx.core  # noqa: F401

from mlx_dist._core import (
    CapacityError,
    KvBudgetExceeded,
    KvBudgetFull,
    NotReadyError,
    TlsError,
    WorkerError,
)
from mlx_dist.generate import GenerationResponse, generate, stream_generate
from mlx_dist.sample_utils import make_logits_processors, make_sampler
from mlx_dist.utils import Model, TokenizerWrapper, load


def serve(*args, **kwargs):
    """Serves a model with the OpenAI API (see :func:`mlx_dist.server.serve`)."""
    from mlx_dist.server import serve as _serve

    return _serve(*args, **kwargs)


__version__ = "0.1.0"
__all__ = [
    "CapacityError",
    "GenerationResponse",
    "KvBudgetExceeded",
    "KvBudgetFull",
    "Model",
    "NotReadyError",
    "TlsError",
    "TokenizerWrapper",
    "WorkerError",
    "generate",
    "load",
    "make_logits_processors",
    "make_sampler",
    "serve",
    "stream_generate",
]
