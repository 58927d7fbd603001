"""One model split by layers over worker processes on loopback: the output
equals single-device mlx-dist and mlx-lm token for token."""

from __future__ import annotations

import json
import time

import mlx_dist
import pytest
from cluster_utils import start_workers, together
from mlx_dist import _core
from tiny_models import mlx_lm_tokens

PROMPT = "the quick brown fox jumps over the lazy dog"
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    procs = start_workers(4, tmp_path_factory.mktemp("workers"))
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def six_layer(tiny_model):
    return {arch: tiny_model(arch, num_layers=6) for arch in ARCHS}


def greedy(model, tok, ids, n=24):
    return [r.token for r in mlx_dist.stream_generate(model, tok, ids, max_tokens=n)]


def greedy_together(model, tok, prompts, n):
    """`greedy` of each prompt, all running at once (one thread each)."""
    return together([lambda p=p: greedy(model, tok, tok.encode(p), n) for p in prompts])


SPLITS = [
    (2, "uniform", None),
    (3, "uniform", None),
    (4, "uniform", None),
    (2, "custom", [1, 5]),  # a one-layer stage
    (3, "custom", [4, 1, 1]),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_split_equals_single_device_and_mlx_lm(arch, six_layer, workers):
    path = six_layer[arch]
    local, tok = mlx_dist.load(str(path))
    ids = tok.encode(PROMPT)
    want = greedy(local, tok, ids)
    assert want == mlx_lm_tokens(path, ids, 24)
    for n, strategy, proportions in SPLITS:
        addrs = [w.address for w in workers[:n]]
        model, dtok = mlx_dist.load(
            str(path), workers=addrs, strategy=strategy, proportions=proportions
        )
        plan = model.plan_dict
        layers = [s["layers"]["end"] - s["layers"]["start"] for s in plan["stages"]]
        assert sum(layers) == 6 and len(layers) == n, plan
        if proportions:
            assert layers == proportions
        got = greedy(model, dtok, ids)
        assert got == want, (n, strategy, proportions)


def test_quantized_and_bf16_models_split(tiny_model, workers):
    for kwargs in ({"quantize": {"group_size": 32, "bits": 4}}, {"dtype": "bfloat16"}):
        path = tiny_model("qwen3", num_layers=4, **kwargs)
        local, tok = mlx_dist.load(str(path))
        ids = tok.encode(PROMPT)
        model, dtok = mlx_dist.load(str(path), workers=[w.address for w in workers[:3]])
        assert greedy(model, dtok, ids) == greedy(local, tok, ids)


def test_text_sampling_and_stop_match_local(six_layer, workers):
    path = six_layer["llama"]
    local, tok = mlx_dist.load(str(path))
    model, dtok = mlx_dist.load(
        str(path), workers=[w.address for w in workers[:2]], strategy="uniform"
    )
    sampler = mlx_dist.make_sampler(temp=0.9, top_k=20)
    for kwargs in ({}, {"sampler": sampler, "seed": 5}):
        a = mlx_dist.generate(local, tok, PROMPT, max_tokens=20, **kwargs)
        b = mlx_dist.generate(model, dtok, PROMPT, max_tokens=20, **kwargs)
        assert a == b
    procs = mlx_dist.make_logits_processors(repetition_penalty=1.5, presence_penalty=0.5)
    a = greedy(local, tok, tok.encode(PROMPT))
    assert [
        r.token
        for r in mlx_dist.stream_generate(
            model, dtok, PROMPT, max_tokens=24, logits_processors=procs
        )
    ] == [
        r.token
        for r in mlx_dist.stream_generate(
            local, tok, PROMPT, max_tokens=24, logits_processors=procs
        )
    ]
    assert a  # the greedy run itself produced tokens
    # logprobs travel when asked for
    rs = list(mlx_dist.stream_generate(model, dtok, PROMPT, max_tokens=3, logprobs=True))
    ls = list(mlx_dist.stream_generate(local, tok, PROMPT, max_tokens=3))
    for r, l in zip(rs, ls, strict=True):
        assert r.logprobs.shape == l.logprobs.shape
        assert abs(float((r.logprobs - l.logprobs).abs().max())) < 1e-5


@pytest.mark.parametrize("n", [1, 3])
def test_ring_and_chain_give_the_same_output(n, six_layer, workers):
    """Decode steps round the ring (the last worker hands each token to the
    first, which runs the next step) and steps sent by the coordinator give
    the same tokens and log-probabilities, greedy and sampled; the ring
    really carried the tokens."""
    path = six_layer["qwen3"]
    local, tok = mlx_dist.load(str(path))
    ids = tok.encode(PROMPT)
    want = greedy(local, tok, ids)
    first = workers[0].address

    def ring_tokens():
        return _core.worker_info(first)["traffic"]["ring_tokens"]

    runs = {}
    for ring in (True, False):
        model, dtok = mlx_dist.load(
            str(path), workers=[w.address for w in workers[:n]], strategy="uniform", ring=ring
        )
        before = ring_tokens()
        got = greedy(model, dtok, ids)
        assert got == want, ring
        came = ring_tokens() - before
        # All but the first (the prompt's step) and the last (back up the
        # chain); the ring may run a step past an early end.
        assert (len(got) - 1 <= came <= 23) if ring else came == 0, (came, len(got))
        sampler = mlx_dist.make_sampler(temp=0.9, top_k=20)
        rs = list(
            mlx_dist.stream_generate(
                model, dtok, ids, max_tokens=12, sampler=sampler, seed=3, logprobs=True
            )
        )
        runs[ring] = ([r.token for r in rs], [r.logprobs for r in rs])
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        assert float((a - b).abs().max()) < 1e-6


def test_the_ring_waits_for_a_reader_that_stops(six_layer, workers):
    """The ring runs a couple of steps ahead of what the caller has read,
    no more: a caller that stops reading wastes a few steps at most, and one
    that goes away ends the ring."""
    path = six_layer["llama"]
    addrs = [w.address for w in workers[:3]]
    model, tok = mlx_dist.load(str(path), workers=addrs, strategy="uniform")

    def ring_tokens():
        # Only the first stage receives them.
        return sum(_core.worker_info(a)["traffic"]["ring_tokens"] for a in addrs)

    before = ring_tokens()
    stream = mlx_dist.stream_generate(model, tok, PROMPT, max_tokens=200)
    for _ in range(5):
        next(stream)
    time.sleep(1.0)
    came = ring_tokens() - before
    # Five read (and one the generator reads ahead), two steps of credit,
    # the prompt's own step: far from the 199 of a ring that never waits.
    assert 4 <= came <= 9, came
    stream.close()
    del stream
    time.sleep(0.5)
    assert ring_tokens() - before == came  # nothing more went round
    assert all(_core.worker_info(w.address)["engine"]["sequences"] == 0 for w in workers[:3])


def test_concurrent_sequences_do_not_mix(six_layer, workers):
    path = six_layer["qwen2"]
    model, tok = mlx_dist.load(str(path), workers=[w.address for w in workers[:3]])
    prompts = [PROMPT, "a completely different prompt about cats", "hello world " * 5]
    want = [greedy(model, tok, tok.encode(p), 32) for p in prompts]
    assert greedy_together(model, tok, prompts, 32) == want


def test_workers_that_poll_for_results_give_the_same_tokens(
    six_layer, tmp_path_factory, monkeypatch
):
    # GPU workers poll for a step's result; make CPU workers do it too, for
    # single steps and batched ones (concurrent sequences).
    monkeypatch.setenv("MLX_DIST_STEP_SPIN_US", "20000")
    procs = start_workers(3, tmp_path_factory.mktemp("polling"))
    try:
        path = six_layer["qwen3"]
        local, tok = mlx_dist.load(str(path))
        model, dtok = mlx_dist.load(str(path), workers=[w.address for w in procs])
        prompts = [PROMPT, "a completely different prompt about cats", "hello world " * 5]
        want = [greedy(local, tok, tok.encode(p), 24) for p in prompts]
        assert greedy(model, dtok, dtok.encode(prompts[0]), 24) == want[0]
        assert greedy_together(model, dtok, prompts, 24) == want
        batched = sum(_core.worker_info(w.address)["engine"]["batched_steps"] for w in procs)
        assert batched > 0, "the concurrent sequences never ran as one batch"
    finally:
        for p in procs:
            p.stop()


def test_workers_that_warm_up_give_the_same_tokens(six_layer, tmp_path_factory, monkeypatch):
    """Workers that compile their kernels as they load (as CUDA workers do)
    run warm-up steps on sequences of their own: none of them is left held
    or counted, and the tokens, single and batched, are unchanged."""
    monkeypatch.setenv("MLX_DIST_WARM_UP", "1")
    log_dir = tmp_path_factory.mktemp("warm")
    procs = start_workers(2, log_dir)
    try:
        path = six_layer["qwen3"]
        local, tok = mlx_dist.load(str(path))
        model, dtok = mlx_dist.load(
            str(path), workers=[w.address for w in procs], strategy="uniform"
        )
        for w in procs:
            info = _core.worker_info(w.address)["engine"]
            assert info["shard"], info
            assert info["sequences"] == 0 and info["steps"] == 0, info
            assert info["cache_bytes"] == 0 and info["prefix_entries"] == 0, info
            assert "compiled this stage's kernels" in w.log.read_text()
        prompts = [PROMPT, "a completely different prompt about cats", "hello world " * 5]
        want = [greedy(local, tok, tok.encode(p), 24) for p in prompts]
        assert greedy(model, dtok, dtok.encode(prompts[0]), 24) == want[0]
        assert greedy_together(model, dtok, prompts, 24) == want
    finally:
        for p in procs:
            p.stop()


def test_steps_launched_ahead_give_the_same_output(
    six_layer, workers, tmp_path_factory, monkeypatch
):
    """Workers that launch a sequence's next decode step before its input
    arrives (as GPU workers do) give the same tokens and log-probabilities
    as workers that do not: over the ring and the chain, greedy and seeded
    sampling, with logits processors, int8-compressed activations, with a
    reader that pauses (prepared steps time out and are undone) and with
    concurrent sequences (undone when another joins)."""
    monkeypatch.setenv("MLX_DIST_LAUNCH_AHEAD", "1")
    log_dir = tmp_path_factory.mktemp("ahead")
    procs = start_workers(3, log_dir)
    try:
        path = six_layer["qwen3"]
        local, tok = mlx_dist.load(str(path))
        ids = tok.encode(PROMPT)
        want = greedy(local, tok, ids)

        def launched(addrs):
            return [_core.worker_info(a)["engine"]["steps_launched_ahead"] for a in addrs]

        def run(addrs, ring):
            model, dtok = mlx_dist.load(str(path), workers=addrs, strategy="uniform", ring=ring)
            out = {"greedy": greedy(model, dtok, ids)}
            for name, kw in {
                "sampled": {"sampler": mlx_dist.make_sampler(temp=0.9, top_k=20), "seed": 3},
                "penalised": {
                    "logits_processors": mlx_dist.make_logits_processors(repetition_penalty=1.3)
                },
            }.items():
                rs = list(
                    mlx_dist.stream_generate(model, dtok, ids, max_tokens=12, logprobs=True, **kw)
                )
                out[name] = ([r.token for r in rs], [r.logprobs for r in rs])
            paused = []
            for i, r in enumerate(mlx_dist.stream_generate(model, dtok, ids, max_tokens=24)):
                if i < 3:
                    time.sleep(0.3)
                paused.append(r.token)
            out["paused"] = paused
            model8, tok8 = mlx_dist.load(
                str(path), workers=addrs, strategy="uniform", ring=ring, compression="int8"
            )
            before = launched(addrs)
            rs = list(mlx_dist.stream_generate(model8, tok8, ids, max_tokens=12, logprobs=True))
            out["int8"] = ([r.token for r in rs], [r.logprobs for r in rs])
            out["int8 launched"] = [b - a for a, b in zip(before, launched(addrs), strict=True)]
            return out

        def info(key):
            return sum(_core.worker_info(w.address)["engine"][key] for w in procs)

        for ring in (True, False):
            ahead = run([w.address for w in procs], ring)
            plain = run([w.address for w in workers[:3]], ring)
            assert ahead["greedy"] == want and ahead["paused"] == want, ring
            # Every stage launched steps ahead, int8 activations included.
            assert all(n > 0 for n in ahead["int8 launched"]), ahead["int8 launched"]
            for name in ("sampled", "penalised", "int8"):
                assert ahead[name][0] == plain[name][0], (ring, name)
                for a, b in zip(ahead[name][1], plain[name][1], strict=True):
                    assert float((a - b).abs().max()) < 1e-5
        used = info("steps_launched_ahead")
        assert used > 0, "no step was launched ahead"
        assert all(
            _core.worker_info(w.address)["engine"]["steps_launched_ahead"] > 0 for w in procs
        )
        assert info("steps_launched_ahead_undone") > 0

        model, dtok = mlx_dist.load(
            str(path), workers=[w.address for w in procs], strategy="uniform"
        )
        prompts = [PROMPT, "a completely different prompt about cats", "hello world " * 5]
        wants = [greedy(local, tok, tok.encode(p), 24) for p in prompts]
        assert greedy_together(model, dtok, prompts, 24) == wants
        assert all(_core.worker_info(w.address)["engine"]["sequences"] == 0 for w in procs)
        for log in log_dir.glob("*.log"):
            assert "could not launch" not in log.read_text(), log
    finally:
        for p in procs:
            p.stop()


def test_worker_holds_only_its_share_of_weights(tiny_model, workers):
    path = tiny_model("llama", num_layers=12)
    local, _ = mlx_dist.load(str(path))
    total = local.nbytes
    mlx_dist.load(str(path), workers=[w.address for w in workers[:3]], strategy="uniform")
    infos = [_core.worker_info(w.address) for w in workers[:3]]
    shards = [i["engine"]["shard"] for i in infos]
    assert [s["layer_end"] - s["layer_start"] for s in shards] == [4, 4, 4]
    assert sum(s["weight_bytes"] for s in shards) == total
    middle = shards[1]
    assert not middle["embed"] and not middle["head"]
    # A third of the layers and neither the embedding nor the head.
    assert 0.2 * total < middle["weight_bytes"] <= total / 3
    # MLX's own figure in that worker process: its weights, not the model.
    active = infos[1]["memory"]["active"]
    assert middle["weight_bytes"] <= active < 1.2 * middle["weight_bytes"] + 65536, (active, middle)


def test_model_is_pushed_to_workers_without_local_files(six_layer, tmp_path_factory):
    path = six_layer["phi3"]
    procs = start_workers(2, tmp_path_factory.mktemp("push"), "--no-local-files", prefix="p")
    try:
        local, tok = mlx_dist.load(str(path))
        ids = tok.encode(PROMPT)
        messages = []
        model, dtok = mlx_dist.load(
            str(path),
            workers=[p.address for p in procs],
            progress=lambda *a: messages.append(a),
        )
        assert any("sending" in m[3] for m in messages)
        assert greedy(model, dtok, ids) == greedy(local, tok, ids)
        # A second load finds the pushed copy and sends nothing.
        messages.clear()
        mlx_dist.load(
            str(path), workers=[p.address for p in procs], progress=lambda *a: messages.append(a)
        )
        assert not any("sending" in m[3] for m in messages)
    finally:
        for p in procs:
            p.stop()


def test_unreachable_worker_is_named_within_seconds(six_layer, workers):
    start = time.monotonic()
    with pytest.raises(_core.WorkerError, match="127.0.0.1:9") as e:
        mlx_dist.load(
            str(six_layer["llama"]),
            workers=[workers[0].address, "127.0.0.1:9"],
            connect_timeout=2.0,
        )
    assert e.value.address == "127.0.0.1:9"
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("victim", [1, 2])
def test_killed_worker_fails_the_request_naming_it(victim, six_layer, tmp_path_factory):
    """A middle or the last worker, mid-ring; with recovery off
    (test_recovery.py covers it on)."""
    procs = start_workers(3, tmp_path_factory.mktemp("kill"), prefix="k")
    try:
        path = six_layer["llama"]
        model, tok = mlx_dist.load(
            str(path), workers=[p.address for p in procs], strategy="uniform", recover=False
        )
        stream = mlx_dist.stream_generate(model, tok, PROMPT, max_tokens=200)
        next(stream)
        procs[victim].kill()
        start = time.monotonic()
        with pytest.raises(_core.WorkerError) as err:
            for _ in stream:
                pass
        assert time.monotonic() - start < 10
        dead = procs[victim]
        assert dead.address in str(err.value) or dead.name in str(err.value), err.value
        # Named as data, not only in words: whichever stage found it.
        assert (err.value.stage, err.value.address) == (dead.name, dead.address), err.value
    finally:
        for p in procs:
            p.stop()


def test_bad_cluster_input_is_a_clear_error(six_layer, workers):
    path = str(six_layer["llama"])
    with pytest.raises(ValueError, match="strategy"):
        mlx_dist.load(path, workers=[workers[0].address], strategy="fastest")
    with pytest.raises(ValueError, match="host:port"):
        mlx_dist.load(path, workers=["nonsense"])
    with pytest.raises(ValueError):
        mlx_dist.load(
            path, workers=[w.address for w in workers[:2]], strategy="custom", proportions=[1]
        )
    with pytest.raises((ValueError, MemoryError), match="GB|MB|bytes"):
        mlx_dist.load(path, workers=[{"address": workers[0].address, "memory_gb": 0.00001}])


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_cluster_config_files(fmt, six_layer, workers, tmp_path):
    from mlx_dist.cluster import load_config

    a, b = workers[0].address, workers[1].address
    texts = {
        "yaml": f"strategy: memory_proportional\nworkers:\n  - address: {a}\n    memory_gb: 20\n"
        f"  - {{address: {b}, memory_gb: 10, name: small}}\n",
        "toml": f'strategy = "memory_proportional"\n[[workers]]\naddress = "{a}"\nmemory_gb = 20\n'
        f'[[workers]]\naddress = "{b}"\nmemory_gb = 10\nname = "small"\n',
        "json": json.dumps(
            {
                "strategy": "memory_proportional",
                "workers": [
                    {"address": a, "memory_gb": 20},
                    {"address": b, "memory_gb": 10, "name": "small"},
                ],
            }
        ),
    }
    f = tmp_path / f"cluster.{fmt}"
    f.write_text(texts[fmt])
    cfg = load_config(f)
    assert [w["address"] for w in cfg["workers"]] == [a, b]
    model, tok = mlx_dist.load(
        str(six_layer["llama"]), workers=cfg["workers"], strategy=cfg["strategy"]
    )
    stages = model.plan_dict["stages"]
    # Declared memory 2:1 -> 4 and 2 of the 6 layers; the declared name shows.
    assert [s["layers"]["end"] - s["layers"]["start"] for s in stages] == [4, 2]
    assert stages[1]["name"] == "small"
    local, ltok = mlx_dist.load(str(six_layer["llama"]))
    assert greedy(model, tok, tok.encode(PROMPT)) == greedy(local, ltok, ltok.encode(PROMPT))


def test_bad_cluster_config_files(tmp_path):
    from mlx_dist.cluster import load_config

    cases = {
        "a.yaml": "workers: [",
        "b.toml": "workers = 3 = 4",
        "c.json": "{",
        "d.yaml": "- just a list",
        "e.yaml": "model: x\n",
        "f.yaml": "workers: ['nohost']\n",
        "g.yaml": "workers: [{address: 'h:1', speed: 3}]\n",
        "h.ini": "workers=1",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises((ValueError, TypeError)):
            load_config(tmp_path / name)


def test_cli_generate_over_workers(six_layer, workers):
    import subprocess
    import sys

    path = str(six_layer["llama"])
    args = ["--model", path, "--prompt", PROMPT, "--max-tokens", "8", "--ignore-chat-template"]
    one = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    addrs = ",".join(w.address for w in workers[:2])
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_dist.cli",
            "generate",
            *args,
            "--workers",
            addrs,
            "--strategy",
            "uniform",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout == two.stdout
    assert "stage" in two.stderr and "tokens-per-sec" in two.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "generate", *args, "--workers", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode != 0 and "127.0.0.1:9" in bad.stderr and "Traceback" not in bad.stderr


def test_workers_require_the_cluster_token(six_layer, tmp_path_factory):
    procs = start_workers(1, tmp_path_factory.mktemp("token"), "--token", "s3cret", prefix="t")
    try:
        path = str(six_layer["llama"])
        with pytest.raises(ConnectionError, match="token"):
            mlx_dist.load(path, workers=[procs[0].address], token="")
        model, tok = mlx_dist.load(path, workers=[procs[0].address], token="s3cret")
        local, ltok = mlx_dist.load(path)
        assert greedy(model, tok, tok.encode(PROMPT)) == greedy(local, ltok, ltok.encode(PROMPT))
    finally:
        _core.set_cluster_token(None)
        for p in procs:
            p.stop()
