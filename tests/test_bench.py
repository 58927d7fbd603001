"""The benchmark commands run end to end on a tiny random model and print
every row they promise. What they measure is read from their output by a
person; only that they work is tested here (no timing)."""

from __future__ import annotations

import re
import subprocess
import sys


def _bench(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", *args, "--random-shape", "tiny"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_pipeline_measures_chain_and_ring(tmp_path):
    out = _bench(
        "bench-pipeline",
        "--stages",
        "1,2",
        "--gen-tokens",
        "12",
        "--repeats",
        "1",
        "--launch-ahead",
        "--worker-logs",
        str(tmp_path),
    )
    # Two plain workers and two launching ahead, each with its log.
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert logs == ["bench0.0.log", "bench0.1.log", "bench1.0.log", "bench1.1.log"], logs
    assert all("serving on" in (tmp_path / n).read_text() for n in logs)
    limit = int(re.search(r"hidden x 2 \+ 64 = (\d+) bytes", out).group(1))
    setups = ["1 workers, chain", "1 workers, ring", "2 workers, chain", "2 workers, ring"]
    for setup in setups + [s + ", ahead" for s in setups]:
        row = next(
            line
            for line in out.splitlines()
            if line.strip() == setup or line.strip().startswith(setup + " ")
        )
        tok_s = float(row.split(setup)[1].split()[0])
        assert tok_s > 0, row
        # Every pipeline's greedy tokens are the single device's.
        assert row.split()[-1] == "yes", row
        # A hop carries one token's activations and little else.
        if setup.startswith("2 "):
            assert 0 < int(row.split()[-2]) <= limit, row
    for label in ("", ", ahead"):
        line = next(
            x for x in out.splitlines() if x.startswith(f"int8 codec over 2 workers{label}:")
        )
        assert 0 < int(line.split(" bytes/hop/token")[0].split()[-1]) < 0.6 * limit, line


def test_bench_throughput_measures_the_servers_side_by_side():
    out = _bench(
        "bench-throughput",
        "--stages",
        "1,2",
        "--streams",
        "1,2",
        "--gen-tokens",
        "8",
        "--ttft-tokens",
        "64",
        "--repeats",
        "1",
        "--strategy",
        "uniform",
        "--servers",
        "--chain",
    )
    assert "2 stages (uniform): layers 2+2, decode round the ring" in out
    assert "2 stages (uniform): layers 2+2, decode steps sent by the coordinator" in out
    assert re.search(r"mlx-lm BatchGenerator, 1 device,  2 streams: +[0-9.]+ tok/s", out)
    for server in (
        "mlx-dist serve, 1 device",
        "mlx-dist serve --no-batch",
        "mlx-dist serve, 1 worker",
        "mlx-dist serve, 2 workers",
        "mlx_lm.server, 1 device",
    ):
        row = next(line for line in out.splitlines() if line.startswith(server))
        rates = [float(x) for x in re.findall(r"\d+: ([0-9.]+) \(", row)]
        assert len(rates) == 2 and all(r > 0 for r in rates), row
    assert "2 stages (pipelined chunks)" in out


def test_a_server_that_does_not_start_is_reported_with_what_it_said():
    """The servers benchmark names a server that exits at start-up and
    shows the last lines it wrote (before, only its command line)."""
    import tempfile

    import pytest
    from mlx_dist.bench.processes import free_port as _free_port
    from mlx_dist.bench.throughput import _start_server

    said = "import sys; print('No module named fastapi', file=sys.stderr); sys.exit(1)"
    with tempfile.TemporaryFile() as log, pytest.raises(RuntimeError) as e:
        _start_server([sys.executable, "-c", said], _free_port(), "a server", log)
    assert "a server did not start" in str(e.value)
    assert "No module named fastapi" in str(e.value)


def test_bench_ops_prints_every_op_for_every_batch_size():
    out = _bench("bench-ops", "--rows", "1,2", "--layers", "2", "--repeats", "1")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("us per op"))
    assert lines[header].split()[-2:] == ["R=1", "R=2"]
    names = [
        "matmul 256->768 as [R,1,K]",
        "matmul 256->768 as [R,K]",
        "attention, no mask",
        "attention, row mask",
        "cache write, scatter of R rows",
        "cache write, slice_update of 1 row",
        "rope, an offset per row",
    ]
    for name in names:
        row = next(line for line in lines if line.startswith(name))
        figures = [float(x) for x in row[len(name) :].split()]
        assert len(figures) == 2 and all(f > 0 for f in figures), row
    # Taking the rows as one matrix changes no value.
    assert "give the same values: yes" in out


def test_bench_gguf_reports_what_each_worker_reads_and_holds():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "bench-gguf", "--shape", "tiny"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("worker")]
    assert len(lines) == 3, out.stdout
    shares = [int(re.search(r"\((\d+)% of the file\)", ln).group(1)) for ln in lines]
    # Two of six layers each (with the embedding or head at the ends), never the whole file.
    assert all(15 <= s <= 60 for s in shares), out.stdout
