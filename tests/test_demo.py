"""The built-in demo model (SmolLM2-135M-Instruct, GGUF Q4_1): it answers,
and greedy generation equals mlx-lm's on the same weights."""

import os
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx_dist
import mlx_lm
import numpy as np
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def demo(demo_gguf):
    return mlx_dist.load(str(demo_gguf))


@pytest.fixture(scope="module")
def reference(demo_mlx_dir):
    return mlx_lm.load(str(demo_mlx_dir))


def test_load_without_argument_is_the_demo_model(demo_gguf):
    model, _ = mlx_dist.load()
    assert model.path == str(demo_gguf)
    assert model.model_type == "llama" and model.config["num_hidden_layers"] == 30


def test_demo_answers_paris(demo):
    model, tok = demo
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    text = mlx_dist.generate(model, tok, prompt, max_tokens=32)
    assert "Paris" in text


def test_demo_matches_mlx_lm_token_for_token(demo, reference):
    model, tok = demo
    ref_model, ref_tok = reference
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == list(ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True))
    ours = list(mlx_dist.stream_generate(model, tok, prompt, max_tokens=48))
    theirs = list(mlx_lm.stream_generate(ref_model, ref_tok, mx.array(prompt), max_tokens=48))
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert "".join(r.text for r in ours) == "".join(r.text for r in theirs)
    assert ours[-1].finish_reason == theirs[-1].finish_reason

    logits = np.array(model(prompt))[0]
    ref_logits = np.array(ref_model(mx.array(prompt)[None]).astype(mx.float32))[0]
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_demo_cli_generate(demo_gguf):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "generate", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tokens-per-sec" in out.stderr


def test_demo_over_three_workers_answers_like_one_device(demo, demo_gguf, tmp_path):
    from cluster_utils import start_workers

    model, tok = demo
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    want = mlx_dist.generate(model, tok, prompt, max_tokens=32)
    procs = start_workers(3, tmp_path, prefix="demo")
    try:
        # Balanced would keep this small model on one device: split it evenly.
        dmodel, dtok = mlx_dist.load(
            str(demo_gguf), workers=[p.address for p in procs], strategy="uniform"
        )
        stages = dmodel.plan_dict["stages"]
        assert len(stages) == 3, dmodel.plan
        text = mlx_dist.generate(dmodel, dtok, prompt, max_tokens=32)
        assert "Paris" in text
        assert text == want
    finally:
        for p in procs:
            p.stop()


def _session(sid: int) -> list[int]:
    """The processes of session `sid` still alive (Linux /proc)."""
    alive = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            # After the command's name: state, ppid, pgrp, session.
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
                alive.append(int(d))
    return alive


@pytest.mark.skipif(not os.path.isdir("/proc") or not os.environ.get("UV"), reason="Linux, uv run")
def test_demo_script_answers_and_leaves_nothing_running():
    """The README's first command: a two-worker cluster answers, then goes."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    # The script's set-up finds the uv that runs these tests.
    env["PATH"] = os.path.dirname(env["UV"]) + os.pathsep + env["PATH"]
    proc = subprocess.Popen(
        ["bash", str(root / "examples" / "demo.sh")],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        left = [p for p in _session(proc.pid) if p != proc.pid]
        for p in left:
            os.kill(p, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "Paris" in out, out
    assert "local cluster:" in err and "serving on http://" in err, err[-3000:]
    assert not left, f"the script left processes {left} running"
