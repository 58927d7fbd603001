"""A coordinator that holds no copy of the weights: it plans from what a worker
describes (config, footprint, tokenizer files) and drives workers that read the
model from their own Hugging Face cache. Its output equals a coordinator's that
has the model."""

from __future__ import annotations

import shutil

import mlx_dist
import pytest
from cluster_utils import start_workers
from gguf import GGMLQuantizationType as T
from gguf_models import make_gguf_model

REPO = "tests/remote-tiny"
PROMPT = "The old lighthouse"


def _cache(root, model_dir, files=None):
    """A hub cache holding `model_dir` as REPO (only `files`, when given)."""
    snap = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    for f in model_dir.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    return root


@pytest.mark.parametrize("coordinator_has", ["nothing", "tokenizer files"])
@pytest.mark.parametrize("layout", ["safetensors", "gguf"])
def test_a_coordinator_without_the_weights_answers_as_one_with_them(
    coordinator_has, layout, tiny_model, tmp_path, monkeypatch
):
    if layout == "gguf":
        gguf, _ = make_gguf_model(tmp_path / "g", "qwen3", lambda n, s: T.Q8_0)
        model_dir = tmp_path / "gdir"
        model_dir.mkdir()
        shutil.copy(gguf, model_dir / "model.gguf")
    else:
        model_dir = tiny_model("qwen3", num_layers=4)
    workers_cache = _cache(tmp_path / "workers-hub", model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(workers_cache))
    procs = start_workers(2, tmp_path)
    try:
        with_copy, tok = mlx_dist.load(REPO, workers=[p.address for p in procs], strategy="uniform")
        want = mlx_dist.generate(with_copy, tok, PROMPT, max_tokens=12)
        del with_copy

        if coordinator_has == "nothing":
            own = tmp_path / "empty-hub"
            own.mkdir()
        else:
            # A tokenizer from the model's directory, or (GGUF) as convert writes it.
            src = model_dir
            if layout == "gguf":
                src = tmp_path / "tok"
                tok.save(str(src))
            own = _cache(
                tmp_path / "own-hub", src, files={"tokenizer.json", "tokenizer_config.json"}
            )
        monkeypatch.setenv("HF_HUB_CACHE", str(own))
        with pytest.raises((FileNotFoundError, ValueError)):
            mlx_dist.load(REPO)  # nothing to load on its own here
        model, tok2 = mlx_dist.load(REPO, workers=[p.address for p in procs], strategy="uniform")
        assert len(model.plan_dict["stages"]) == 2
        assert model.config["model_type"] == "qwen3"
        assert tok2.encode(PROMPT) == tok.encode(PROMPT)
        assert mlx_dist.generate(model, tok2, PROMPT, max_tokens=12) == want
    finally:
        for p in procs:
            p.stop()


def test_no_worker_having_the_model_is_an_error_naming_each(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "none"))
    procs = start_workers(2, tmp_path)
    try:
        with pytest.raises(FileNotFoundError) as e:
            mlx_dist.load(REPO, workers=[p.address for p in procs])
        msg = str(e.value)
        assert "no worker has it either" in msg and all(p.name in msg for p in procs), msg
    finally:
        for p in procs:
            p.stop()
