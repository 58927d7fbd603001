#!/usr/bin/env bash
# Builds mlx-dist, starts a local cluster of two workers, serves the built-in
# demo model (SmolLM2-135M-Instruct) split over them with the OpenAI API, and
# asks it a chat question through the official OpenAI client.
source "$(dirname "$0")/../.ci/env.sh"
bin=.venv/bin/mlx-dist
tmp=$(mktemp -d)
pids=()
# The cluster goes when the script ends, however it ends.
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null; rm -rf "$tmp"' EXIT

# Starts "$@" in the background as NAME, its output in $tmp/NAME.out. Not in
# a subshell: `pids` must hold it for the trap.
start() {
    local name=$1
    shift
    "$@" >"$tmp/$name.out" 2>"$tmp/$name.log" &
    pids+=($!)
}

# Prints NAME's address from its "listening on" line once there.
address() {
    local name=$1 pid=$2
    for _ in $(seq 600); do
        grep -q '^listening on' "$tmp/$name.out" && { awk '/^listening on/ {print $3; exit}' "$tmp/$name.out"; return; }
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/$name.log" >&2; return 1; }
        sleep 0.2
    done
    echo "timed out starting $name" >&2
    return 1
}

# Fetched here, in the foreground, so that its progress shows: the server's
# output goes to a file.
.venv/bin/python -m mlx_dist.demo >/dev/null

start w1 "$bin" worker --port 0 --name worker-1
start w2 "$bin" worker --port 0 --name worker-2
w1=$(address w1 "${pids[0]}")
w2=$(address w2 "${pids[1]}")
echo "local cluster: $w1 $w2" >&2
start server "$bin" serve --port 0 --workers "$w1,$w2" --strategy uniform
url=$(address server "${pids[2]}")
cat "$tmp/server.out" >&2   # the plan: which worker holds which layers
echo "serving on $url" >&2
.venv/bin/python examples/chat_client.py "$url" "${1:-What is the capital of France?}"
