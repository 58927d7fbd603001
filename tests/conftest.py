"""Shared fixtures: tiny random models written once per test session."""

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory `tiny_model(arch="llama", **kwargs) -> Path`, see `make_tiny_model`.

    Each distinct set of arguments is made once per session and the directory is shared,
    so a test that changes files must copy it first.
    """
    made: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **kwargs)
        return made[key]

    return make
