"""mlx-dist: run one large language model across several machines with MLX."""

# Importing mlx.core first loads libmlx, which the native extension links to.
import mlx.core  # noqa: F401

from mlx_dist import _core  # noqa: E402

__version__ = "0.1.0"
__all__ = ["_core"]
