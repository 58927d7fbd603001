"""Where each server setting comes from: arguments, then MLX_DIST_*
variables, then the cluster config file, then the defaults."""

from __future__ import annotations

import json

import pytest
from mlx_dist.server import ServerSettings, resolve_settings


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(
        json.dumps(
            {
                "workers": ["h1:7470", "h2:7470"],
                "model": "from-config",
                "strategy": "uniform",
                "compression": "int8",
                "kv_tokens": 1000,
                "proportions": "0.5,0.5",
            }
        )
    )
    return str(path)


def test_arguments_then_environment_then_config_then_defaults(config):
    env = {
        "MLX_DIST_CLUSTER_CONFIG": config,
        "MLX_DIST_KV_TOKENS": "2000",
        "MLX_DIST_STRATEGY": "balanced",
        "MLX_DIST_MAX_QUEUE": "3",
    }
    s = resolve_settings({"strategy": "custom", "max_tokens": 7, "model": None}, env=env)
    assert s.strategy == "custom"  # the argument over the environment and the file
    assert s.kv_tokens == 2000 and s.max_queue == 3  # the environment over the file
    assert s.model == "from-config" and s.compression == "int8"  # None: not given
    assert [w["address"] for w in s.workers] == ["h1:7470", "h2:7470"]
    assert s.proportions == [0.5, 0.5]
    assert s.max_tokens == 7 and s.max_concurrency == 8  # the default
    args = s.cluster_args()
    assert (args["strategy"], args["kv_tokens"], args["compression"]) == ("custom", 2000, "int8")


def test_without_a_config_load_defaults_fill_in():
    s = resolve_settings({"workers": "h1:1,h2:2", "proportions": "0.25,0.75"}, env={})
    assert s.cluster_args() == {
        "workers": "h1:1,h2:2",
        "strategy": "custom",
        "proportions": [0.25, 0.75],
        "compression": "none",
        "kv_tokens": 4096,
        "tls_ca": None,
    }
    assert ServerSettings().cluster_args()["strategy"] == "balanced"


def test_bad_names_and_values_are_refused():
    with pytest.raises(TypeError, match="max_tokenz"):
        resolve_settings({"max_tokenz": 3}, env={})
    with pytest.raises(ValueError, match="MLX_DIST_MAX_QUEUE='many'"):
        resolve_settings(env={"MLX_DIST_MAX_QUEUE": "many"})
    with pytest.raises(ValueError, match="MLX_DIST_PROPORTIONS"):
        resolve_settings(env={"MLX_DIST_PROPORTIONS": "half,half"})


def test_a_settings_object_counts_as_given_and_the_environment_can_be_left_out(config):
    given = ServerSettings(cluster_config=config, kv_tokens=3000)
    s = resolve_settings(given, env={"MLX_DIST_MAX_QUEUE": "3"})
    # Every field of a ServerSettings is given, defaults included.
    assert s.max_queue == 64 and s.kv_tokens == 3000 and s.strategy == "uniform"
    assert resolve_settings(env={}).max_queue == 64
