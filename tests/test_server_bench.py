"""`mlx-dist bench-throughput`, the load generator of the server figures:
`--ttft-tokens 0` leaves the time-to-first-token measurement out."""

from __future__ import annotations

import subprocess
import sys


def test_bench_throughput_skips_the_first_token_time_with_ttft_tokens_0():
    args = ["--stages", "1", "--streams", "1", "--gen-tokens", "4", "--repeats", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dist.cli", "bench-throughput", *args, "--ttft-tokens", "0"]
        + ["--no-reference", "--random-shape", "tiny"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "time to first token: not measured (--ttft-tokens 0)" in out.stdout
    assert "1 stages" in out.stdout and "tok/s" in out.stdout
